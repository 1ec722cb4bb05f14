"""What every target's export shares: the request, copying an image into a new disk of
a chosen size, and the data regions of an image (for writers that map sparse files)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..formats import get_format
from ..model import ExtentKind, align_up

if TYPE_CHECKING:
    from ..ops.image import Image

MiB = 1 << 20
GiB = 1 << 30
_CHUNK = 4 << 20


@dataclass(frozen=True)
class ExportRequest:
    """One ``vmforge export``: the source, the destination, and appliance details."""

    image: str
    output: str
    fmt: str | None = None
    untrusted: bool = False
    ovf_version: str = "1.0"
    name: str | None = None
    cpus: int = 1
    memory: int = 1 << 30
    #: sign an OVA: a PEM RSA private key (which may also hold the certificate), and
    #: the certificate when it is in a file of its own (ovftool's --privateKey)
    private_key: str | None = None
    certificate: str | None = None

    def open(self) -> Image:
        from ..ops import open_image

        return open_image(self.image, self.fmt, untrusted=self.untrusted)

    @property
    def base(self) -> str:
        """A safe machine/file name: the given one or the source's file name."""
        base = self.name or os.path.splitext(os.path.basename(self.image))[0]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:48].lstrip(".") or "vm"


def copy_into(req: ExportRequest, dest: str, out_fmt: str, options: Mapping[str, str],
              size: int | None = None) -> int:
    """Write the source as a new ``out_fmt`` disk at ``dest`` of ``size`` bytes (at least
    the source's; the rest reads as zeros). Returns the size written. ``dest`` is a
    private path: the caller renames the finished output into place."""
    # imported here: the copy engine (numpy) is not needed to list or validate targets
    from ..engine.copy import ChainSource, copy
    from ..ops.output import finishing

    with req.open() as img:
        size = align_up(max(size or 0, img.virtual_size), 512)
        writer = get_format(out_fmt).create(dest, size, dict(options), None, None)
        with finishing(writer, req.output):
            copy(ChainSource(img.chain), writer)
    return size


def write_ova(req: ExportRequest, dest: str, stream_fd: int | None = None) -> dict[str, Any]:
    """The request as an OVA at ``dest`` (or, ``dest`` "-", to ``stream_fd``), signed
    when it names a private key. Returns the notes to print."""
    # imported here: OVA packaging (and cryptography) is not needed to list targets
    from ..packages.ova_write import export_ova
    from ..packages.signing import load_signer

    signer = load_signer(req.private_key, req.certificate)
    export_ova(req.image, dest, src_fmt=req.fmt, version=req.ovf_version, name=req.base,
               cpus=req.cpus, memory=req.memory, untrusted=req.untrusted, signer=signer,
               stream_fd=stream_fd)
    notes: dict[str, Any] = {"ovf_version": req.ovf_version}
    if signer is not None:
        notes["signed_by"] = signer.certificate.subject.rfc4514_string()
    return notes


def stream_ova(req: ExportRequest, fd: int) -> dict[str, Any]:
    """``write_ova`` to a pipe or socket (``export -o -``)."""
    return write_ova(req, "-", fd)


def data_regions(img: Image) -> list[tuple[int, int]]:
    """(offset, length) runs of the image that may hold non-zero bytes, merged."""
    out: list[tuple[int, int]] = []
    for e in img.iter_extents(0, img.virtual_size):
        if e.kind is not ExtentKind.DATA or e.hole:
            continue
        if out and out[-1][0] + out[-1][1] == e.start:
            out[-1] = (out[-1][0], out[-1][1] + e.length)
        else:
            out.append((e.start, e.length))
    return out


def region_bytes(img: Image, regions: list[tuple[int, int]]) -> Iterator[bytes]:
    """The guest bytes of ``regions``, in order, in chunks of at most 4 MiB."""
    stream = img.stream()
    for off, n in regions:
        end = off + n
        while off < end:
            step = min(_CHUNK, end - off)
            yield stream.read(off, step)
            off += step


