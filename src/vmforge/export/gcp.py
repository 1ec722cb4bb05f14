"""Google Compute Engine: ``disk.raw`` in a gzip'd tar, GNU "oldgnu" format, sparse.

Source: Google Cloud, "Manually import boot disks" (image file requirements: a raw
disk named disk.raw, archived with ``tar --format=oldgnu -Sczf``, size a whole number
of GB, by which Google means GiB). The archive is written by gnutar.py.
"""

from __future__ import annotations

from typing import Any

from ..model import align_up
from .build import ExportRequest, GiB, data_regions, region_bytes
from .facts import GNU_MAGIC, Member, Subject
from .gnutar import end_of_archive, write_sparse_member
from .rules import Profile, Rule

DOC = "Google Cloud, 'Manually import boot disks' (image file requirements)"
NAME = "disk.raw"


def _gzip_open(path: str) -> Any:
    try:  # ISA-L's gzip is ~20x faster than zlib at level 1 and reads everywhere
        from isal import igzip

        return igzip.open(path, "wb", compresslevel=1)  # type: ignore[no-untyped-call]
    except ImportError:
        import gzip

        return gzip.open(path, "wb", compresslevel=1)


def _archive(s: Subject) -> str | None:
    if s.tar is None:
        return f"the file is a {s.kind}, not a gzip-compressed tar"
    if s.tar.error:
        return s.tar.error
    if not s.tar.gzip:
        return "the tar is not gzip-compressed"
    return None


def _disk(s: Subject) -> Member | None:
    return s.tar.find(NAME) if s.tar is not None else None


def _tar_format(s: Subject) -> str | None:
    if s.tar is None:
        return None
    bad = [m.name for m in s.tar.members if m.magic != GNU_MAGIC]
    if bad:
        return f"member {bad[0]!r} is not in GNU (oldgnu) format"
    return None


def _name(s: Subject) -> str | None:
    if s.tar is None or s.tar.error:
        return None
    names = [m.name for m in s.tar.members]
    if names != [NAME]:
        return f"the archive holds {names}, not just {NAME}"
    return None


def _sparse(s: Subject) -> str | None:
    m = _disk(s)
    if m is not None and not m.info.issparse():
        return f"{NAME} is stored as a plain file (type {m.info.type!r}), not sparse ('S')"
    return None


def _size(s: Subject) -> str | None:
    m = _disk(s)
    if m is not None and (m.info.size % GiB or not m.info.size):
        return f"{NAME} is {m.info.size} bytes, not a whole number of GiB " \
            f"(next: {align_up(max(m.info.size, 1), GiB)})"
    return None


def _raw(s: Subject) -> str | None:
    m = _disk(s)
    if m is None:
        return None
    facts = s.member_disk(m)
    if facts is not None and facts.fmt != "raw":
        return f"{NAME} holds a {facts.fmt} image, not a raw disk"
    return None


RULES = (
    Rule("gcp.archive", "the file is a gzip-compressed tar", DOC, _archive),
    Rule("gcp.tar-format", "the tar is in GNU oldgnu format (tar --format=oldgnu)", DOC,
         _tar_format),
    Rule("gcp.disk-name", f"the archive holds exactly one file, named {NAME}", DOC, _name),
    Rule("gcp.sparse", f"{NAME} is stored sparse (tar -S: GNU sparse member)", DOC, _sparse),
    Rule("gcp.size-gib", f"{NAME} is a whole number of GiB", DOC, _size),
    Rule("gcp.raw", f"{NAME} is a raw disk, not another image format", DOC, _raw),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    with req.open() as img:
        size = align_up(max(img.virtual_size, 1), GiB)
        regions = data_regions(img)
        with _gzip_open(path) as out:
            write_sparse_member(out, NAME, size, regions, region_bytes(img, regions))
            end_of_archive(out)
    return {"virtual_size": size}


PROFILE = Profile("gcp", "disk.raw (size rounded up to whole GiB) in a sparse oldgnu tar.gz",
                  RULES, build, (".tar.gz",))
