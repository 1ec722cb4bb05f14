"""OVA packages: a USTAR tar of the .ovf, its manifest (.mf) and the files it references.

References: DMTF DSP0243 2.1.1 section 5.3 (OVF package: the descriptor first, then
the manifest and certificate, then the files in References order; tar in USTAR
format), 5.1 (manifest lines ``SHA256(name)= hex``; SHA1 in OVF 1.x packages).

Reading is hostile-input handling (SECURITY.md rows 22-24): the tar is read once, as a
stream, and nothing is ever extracted by member name. Links, devices, FIFOs,
directories, absolute or ``..`` names, names with a directory part and duplicate
names are refused; the first member must be the .ovf; every other member must be the
manifest, a certificate or a file the descriptor references. Each referenced file is
copied into a private work directory while its digests are computed, and only once the
manifest has verified every file is any disk opened (as an untrusted image). A
certificate file, when present, must sign the manifest (``signing``); an unsigned
package still imports. Writing packages is in ``ova_write``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import IO

from ..errors import CorruptImage, ImageNotFound, LimitExceeded, OutputError, UnsupportedFeature
from ..model.hardware import VirtualHardware
from ..ops import convert, create, open_image
from .ovf import Descriptor, parse_ovf
from .signing import SignatureInfo, verify_cert_file

#: manifests and certificates are a few lines
MAX_MANIFEST = 1 << 20
MAX_MEMBERS = 4096
_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\(([^()]+)\)= ?([0-9a-fA-F]+)$")
ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_PLAIN = re.compile(r"^[^/\\\x00-\x1f]+$")
_COPY_CHUNK = 1 << 20


class PackageError(CorruptImage):
    """An OVA breaks the package rules (member types, names, order, manifest)."""

    hint = "the package is damaged or hostile; nothing from it was used"


@dataclass
class Package:
    """A verified OVA: its descriptor and the work-directory copy of each referenced file."""

    descriptor: Descriptor
    ovf_name: str
    ovf_bytes: bytes
    files: dict[str, str] = field(default_factory=dict)  # href -> verified copy
    manifest: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (algo, hex)
    manifest_name: str | None = None
    manifest_bytes: bytes = b""
    cert: tuple[str, bytes] | None = None  # (member name, bytes) of a certificate file
    #: the verified signer, when the package carries a certificate file
    signature: SignatureInfo | None = None


def _member_name(m: tarfile.TarInfo, path: str) -> str:
    kind = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else
            "a device" if m.ischr() or m.isblk() else "a FIFO" if m.isfifo() else
            "a directory" if m.isdir() else None)
    if kind is None and m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = f"a member of tar type {m.type!r}"
    if kind is not None:
        raise PackageError(f"member {m.name!r} is {kind}; an OVA holds only regular files",
                           path=path)
    name = m.name[2:] if m.name.startswith("./") else m.name
    if name.startswith("/") or ".." in name.split("/"):
        raise PackageError(f"member name {m.name!r} escapes the package (absolute or '..')",
                           path=path)
    if not _PLAIN.match(name):
        raise PackageError(f"member name {m.name!r} has a directory part or control characters",
                           path=path, hint="OVA members are plain file names")
    return name


def _read_capped(f: IO[bytes], size: int, cap: int, what: str, path: str) -> bytes:
    if size > cap:
        raise LimitExceeded(f"{what} is {size} bytes", path=path, limit=f"{cap} bytes")
    data = f.read(size)
    if len(data) != size:
        raise PackageError(f"{what} is truncated", path=path)
    return data


def _copy(src: IO[bytes], dest: str, size: int, algos: list[str], path: str) -> dict[str, str]:
    hashers = {a: hashlib.new(ALGORITHMS[a]) for a in algos}
    left = size
    with open(dest, "xb") as out:
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise PackageError(f"member {os.path.basename(dest)} is truncated", path=path)
            for h in hashers.values():
                h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def looks_like_ova(path: str) -> bool:
    """True if ``path`` starts with a valid ustar header naming an .ovf (an OVA's first
    member); a cheap sniff, not a verification."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if len(head) < 512 or head[257:262] != b"ustar":  # POSIX ustar magic
        return False
    try:
        stored = int(head[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    # the ustar checksum: the header's byte sum with its own field read as spaces
    if stored != sum(head[:148]) + 8 * 32 + sum(head[156:]):
        return False
    return head[:100].split(b"\0")[0].lower().endswith(b".ovf")


def parse_manifest(text: bytes, path: str) -> dict[str, tuple[str, str]]:
    """``{name: (algorithm, hex)}``; refuses malformed and duplicate lines."""
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise PackageError("manifest is not ASCII text", path=path) from None
    out: dict[str, tuple[str, str]] = {}
    for line in lines:
        if not line.strip():
            continue
        m = _MF_LINE.match(line.strip())
        if m is None:
            raise PackageError(f"manifest line {line[:80]!r} is not 'SHA256(name)= hex'", path=path)
        algo, name, digest = m.groups()
        if len(digest) != hashlib.new(ALGORITHMS[algo]).digest_size * 2:
            raise PackageError(f"manifest digest of {name} has the wrong length", path=path)
        if name in out:
            raise PackageError(f"manifest names {name} twice", path=path)
        out[name] = (algo, digest.lower())
    return out


def read_ova(path: str, workdir: str, *, configuration: str | None = None,
             require_manifest: bool = True) -> Package:
    """Stream ``path`` once, copying each referenced file into ``workdir`` (which the
    caller owns and removes), and verify the manifest. Raises PackageError,
    LimitExceeded, UnsupportedFeature and the descriptor's errors."""
    if not os.path.isfile(path):
        raise ImageNotFound(f"{path}: not a regular file", path=None)
    seen: set[str] = set()
    pkg: Package | None = None
    digests: dict[str, dict[str, str]] = {}
    with open(path, "rb") as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|")  # noqa: SIM115 (closed with raw)
            for index, m in enumerate(tar):
                if index >= MAX_MEMBERS:
                    raise LimitExceeded("too many tar members", path=path, limit=str(MAX_MEMBERS))
                name = _member_name(m, path)
                if name in seen:
                    raise PackageError(f"member {name} appears twice", path=path)
                seen.add(name)
                data = tar.extractfile(m)
                assert data is not None  # a regular file always has a data stream
                if index == 0:
                    if not name.lower().endswith(".ovf"):
                        raise PackageError(f"the first member is {name!r}, not the .ovf descriptor",
                                           path=path, hint="DSP0243 puts the .ovf first in an OVA")
                    text = _read_capped(data, m.size, 4 << 20, "the descriptor", path)
                    pkg = Package(parse_ovf(text, name=f"{path}:{name}",
                                            configuration=configuration), name, text)
                    digests[name] = {a: hashlib.new(h, text).hexdigest() for a, h in ALGORITHMS.items()}
                    _check_hrefs(pkg.descriptor, path)
                    continue
                assert pkg is not None
                lower = name.lower()
                if lower.endswith(".mf"):
                    if pkg.manifest_name is not None:
                        raise PackageError("more than one manifest", path=path)
                    pkg.manifest_name = name
                    pkg.manifest_bytes = _read_capped(data, m.size, MAX_MANIFEST, "the manifest",
                                                      path)
                    pkg.manifest = parse_manifest(pkg.manifest_bytes, path)
                elif lower.endswith(".cert"):
                    if pkg.cert is not None:
                        raise PackageError("more than one certificate file", path=path)
                    pkg.cert = (name, _read_capped(data, m.size, MAX_MANIFEST,
                                                   "the certificate", path))
                elif name in {f.href for f in pkg.descriptor.files}:
                    ref = next(f for f in pkg.descriptor.files if f.href == name)
                    if ref.size is not None and ref.size != m.size:
                        raise PackageError(f"{name} is {m.size} bytes, the descriptor says "
                                           f"{ref.size}", path=path)
                    algos = sorted({a for a, _ in pkg.manifest.values()}) or list(ALGORITHMS)
                    copy = os.path.join(workdir, f"file{len(pkg.files)}")
                    digests[name] = _copy(data, copy, m.size, algos, path)
                    pkg.files[name] = copy
                else:
                    raise PackageError(f"member {name} is not referenced by the descriptor",
                                       path=path, hint="an OVA holds only the files its .ovf lists")
        except tarfile.TarError as err:
            raise PackageError(f"not a valid tar file: {err}", path=path) from None
    if pkg is None:
        raise PackageError("the package is empty (no .ovf descriptor)", path=path)
    for ref in pkg.descriptor.files:
        if ref.href not in pkg.files:
            raise PackageError(f"the descriptor references {ref.href}, which the package lacks",
                               path=path)
    _verify(pkg, digests, require_manifest, path)
    return pkg


def _check_hrefs(desc: Descriptor, path: str) -> None:
    for ref in desc.files:
        if not _PLAIN.match(ref.href) or ref.href in (".", "..") or ":" in ref.href:
            raise PackageError(f"href {ref.href!r} is not a file of the package",
                               path=path, hint="URLs and paths outside the package are refused")


def _verify(pkg: Package, digests: dict[str, dict[str, str]], require_manifest: bool,
            path: str) -> None:
    if pkg.manifest_name is None:
        if pkg.cert is not None:
            raise PackageError(f"{pkg.cert[0]} signs a manifest the package lacks", path=path)
        if require_manifest:
            raise PackageError("the package has no manifest (.mf): its files cannot be verified",
                               path=path, hint="pass --no-manifest to import it unverified")
        return
    for name in pkg.manifest:
        if name not in digests:
            raise PackageError(f"the manifest names {name}, which the package lacks", path=path)
    for name, got in digests.items():
        if name not in pkg.manifest:
            raise PackageError(f"the manifest has no digest for {name}", path=path)
        algo, want = pkg.manifest[name]
        if got.get(algo) != want:
            raise PackageError(f"{algo} digest mismatch for {name}", path=path,
                               hint="the package was altered or damaged after it was made")
    if pkg.cert is not None:
        # the signature covers the manifest's bytes; the manifest covers every file
        pkg.signature = verify_cert_file(pkg.cert[1], pkg.manifest_name, pkg.manifest_bytes,
                                         f"{path}:{pkg.cert[0]}")


# --- import --------------------------------------------------------------------------

_EXT = {"qcow2": "qcow2", "raw": "img", "vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx", "vdi": "vdi"}


@dataclass(frozen=True)
class Imported:
    """What ``import_ova`` made: the declared hardware (disk paths relative to the output
    directory), the files written, and the package's signer if it was signed."""

    hardware: VirtualHardware
    files: list[str]
    signature: SignatureInfo | None = None


def import_ova(path: str, outdir: str, *, out_fmt: str = "qcow2",
               configuration: str | None = None, require_manifest: bool = True) -> Imported:
    """Verify ``path`` (manifest digests, and the signature when it carries a
    certificate file), convert each disk into ``outdir`` (one file per disk) and write
    ``hardware.json`` beside them.

    Everything is staged in a private directory inside ``outdir`` and moved into place
    only at the end; on failure nothing is left behind (and ``outdir`` is removed if
    this call created it).
    """
    created = not os.path.exists(outdir)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{outdir}: cannot create the directory: {err.strerror}") from None
    work = tempfile.mkdtemp(prefix=".vmforge-import-", dir=outdir)
    try:
        pkg = read_ova(path, work, configuration=configuration, require_manifest=require_manifest)
        staged = os.path.join(work, "out")
        os.mkdir(staged)
        desc = pkg.descriptor
        paths: dict[str, tuple[str, str]] = {}
        finals: list[str] = []
        for disk in desc.disks:
            out_name = f"{os.path.splitext(_disk_href(desc, disk.disk_id))[0]}.{_EXT.get(out_fmt, out_fmt)}"
            if out_name in finals:
                out_name = f"{disk.disk_id}-{out_name}"
            dest = os.path.join(staged, out_name)
            if disk.file_ref is None:  # a blank disk the appliance expects (DSP0243 9.1)
                create(dest, out_fmt, disk.capacity)
            else:
                if disk.vmdk_subformat is None:
                    raise UnsupportedFeature(f"disk format {disk.format!r} in an OVA", path=path,
                                             hint="vmforge imports VMDK disks")
                copy = pkg.files[desc.file(disk.file_ref).href]
                with open_image(copy, "vmdk", untrusted=True) as img:
                    if img.virtual_size != disk.capacity:
                        raise PackageError(f"disk {disk.disk_id} is {img.virtual_size} bytes, "
                                           f"the descriptor says {disk.capacity}", path=path)
                convert(copy, dest, out_fmt, src_fmt="vmdk", untrusted=True)
            paths[disk.disk_id] = (out_name, out_fmt)
            finals.append(out_name)
        disk_hrefs = {desc.file(d.file_ref).href for d in desc.disks if d.file_ref}
        for href, copy in pkg.files.items():
            if href not in disk_hrefs:  # CD images and other files: kept as they are
                os.replace(copy, os.path.join(staged, href))
                finals.append(href)
        hw = desc.to_hardware(paths)
        with open(os.path.join(staged, "hardware.json"), "x") as f:
            json.dump(hw.to_dict(), f, indent=2)
            f.write("\n")
        finals.append("hardware.json")
        with open(os.path.join(staged, pkg.ovf_name), "xb") as fb:
            fb.write(pkg.ovf_bytes)
        finals.append(pkg.ovf_name)
        for name in finals:
            if os.path.lexists(os.path.join(outdir, name)):
                raise OutputError(f"{os.path.join(outdir, name)} already exists",
                                  hint="import into an empty directory")
        for name in finals:
            os.replace(os.path.join(staged, name), os.path.join(outdir, name))
        return Imported(hw, [os.path.join(outdir, n) for n in finals], pkg.signature)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(outdir)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _disk_href(desc: Descriptor, disk_id: str) -> str:
    disk = desc.disk(disk_id)
    return desc.file(disk.file_ref).href if disk.file_ref else disk_id
