"""What a file is, gathered once and lazily for the rules: a disk image's headers, or a
tar's members, or an OVA's descriptor, manifest and digests.

Validation reads files from strangers: nothing is ever extracted or followed. A tar is
read through ``tarfile`` member headers and bounded member reads; a disk is probed by
its headers and opened untrusted (a reference to another file is a fact, not a file
to open); a sparse VMDK inside an OVA is opened in place, through the member's byte
range of the archive, for its first sector. Memory stays bounded: members are hashed
in chunks, text members are capped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

from ..errors import BackingChainError, TruncatedImage, VmforgeError
from ..formats.base import Format, HostFile
from ..formats.qcow2 import structs as Q
from ..formats.vdi import structs as VDI
from ..formats.vhd import structs as VHD
from ..formats.vmdk import structs as VMDK
from ..formats.vmdk.descriptor import MAX_DESCRIPTOR_BYTES, parse_descriptor

if TYPE_CHECKING:
    from ..packages.ovf import Descriptor

MAX_MEMBERS = 4096
MAX_TEXT = 4 << 20  # descriptors, manifests, JSON documents
_CHUNK = 1 << 20
#: POSIX.1-1988 ustar magic+version, and the old GNU magic (GNU tar's "oldgnu" and "gnu")
USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952 2.3.1 ID1 ID2
MBR_SIGNATURE = b"\x55\xaa"  # at offset 510 of a partitioned disk's first sector
MBR_PROTECTIVE = 0xEE  # partition type of a GPT disk's protective MBR (UEFI 2.x 5.2.3)

Reader = Callable[[int, int], bytes]


@dataclass
class DiskFacts:
    """A disk image as its headers describe it (``fmt`` in qemu-img's names)."""

    fmt: str
    file_size: int
    virtual_size: int | None = None
    subformat: str | None = None
    vhd_footer: VHD.Footer | None = None
    vhd_footer_raw: bytes | None = None
    vmdk_header: VMDK.SparseExtentHeader | None = None
    vdi_header: VDI.Header | None = None
    boot_sector: bytes | None = None
    references: str | None = None  # another file the image names (backing, data file)
    error: str | None = None  # why it cannot be read as its format


def _probe(head: bytes, tail: bytes, size: int) -> str:
    scores = [(max(f.probe(head, size), f.probe_tail(tail, size)), f.name)
              for f in Format.registry.values()]
    strong = [n for s, n in scores if s > 1]
    if len(strong) > 1:
        return "ambiguous"
    if not strong and tail[:8] == VHD.COOKIE:
        return "vpc"  # a fixed VHD whose footer fails the probe (checksum): judge its fields
    return strong[0] if strong else "raw"


def disk_facts(read: Reader, size: int, path: str | None = None) -> DiskFacts:
    """Facts about a disk read through ``read(offset, length)`` (short at the end).

    With ``path`` (a file of its own) the image is also opened untrusted for its size,
    first sector and references; inside a package only the headers are parsed.
    """
    head = read(0, 4096)
    tail = read(size - 512, 512) if size >= 512 else b""
    facts = DiskFacts(_probe(head, tail, size), size)
    try:
        _headers(facts, head, tail, read)
    except (VmforgeError, struct.error, ValueError) as err:
        facts.error = str(err)
    if path is not None and facts.fmt != "ambiguous":
        from ..ops import open_image

        try:
            with open_image(path, facts.fmt, untrusted=True) as img:
                facts.virtual_size = img.virtual_size
                if img.virtual_size >= 512:
                    facts.boot_sector = img.read(0, 512)
        except BackingChainError as err:
            facts.references = str(err)
        except VmforgeError as err:
            facts.error = facts.error or str(err)
    elif facts.fmt == "raw":
        facts.virtual_size = size
        facts.boot_sector = head[:512] if size >= 512 else None
    return facts


def _headers(facts: DiskFacts, head: bytes, tail: bytes, read: Reader) -> None:
    if facts.fmt == "vpc":
        raw = tail if tail[:8] == VHD.COOKIE else head[:VHD.FOOTER_SIZE]
        footer = VHD.Footer.unpack(raw)
        facts.vhd_footer, facts.vhd_footer_raw = footer, raw
        facts.subformat = {VHD.DISK_TYPE_FIXED: "fixed", VHD.DISK_TYPE_DYNAMIC: "dynamic",
                           VHD.DISK_TYPE_DIFFERENCING: "differencing"}.get(
                               footer.disk_type, f"type {footer.disk_type}")
        facts.virtual_size = footer.current_size
    elif facts.fmt == "vmdk" and head[:4] == VMDK.SPARSE_MAGIC:
        h = VMDK.SparseExtentHeader.unpack(head)
        facts.vmdk_header = h
        facts.virtual_size = h.capacity * VMDK.SECTOR_SIZE
        size = h.descriptorSize * VMDK.SECTOR_SIZE
        if h.descriptorOffset and 0 < size <= MAX_DESCRIPTOR_BYTES:
            desc = parse_descriptor(read(h.descriptorOffset * VMDK.SECTOR_SIZE, size),
                                    None, embedded=True)
            facts.subformat = desc.create_type
    elif facts.fmt == "vmdk":
        facts.subformat = "descriptor file"  # a text descriptor naming other files
        facts.references = "a VMDK descriptor file names its extents as other files"
    elif facts.fmt == "vdi":
        vdi = VDI.Header.unpack(head[:VDI.HEADER_AREA])
        facts.vdi_header = vdi
        facts.virtual_size = vdi.cbDisk
        facts.subformat = VDI.TYPE_NAMES.get(vdi.u32Type, f"type {vdi.u32Type}")
    elif facts.fmt == "qcow2":
        version, backing_offset = struct.unpack_from(">IQ", head, 4)
        facts.virtual_size = struct.unpack_from(">Q", head, 24)[0]
        incompatible = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
        if backing_offset:
            facts.references = "it names a backing file"
        elif incompatible & Q.INCOMPAT_DATA_FILE:
            facts.references = "it keeps its data in an external data file"
        facts.subformat = f"v{version}"


def has_mbr(sector: bytes | None) -> bool:
    """A classic MBR partition table (not a GPT's protective MBR)."""
    if sector is None or len(sector) < 512 or sector[510:512] != MBR_SIGNATURE:
        return False
    types = [sector[446 + 16 * i + 4] for i in range(4)]
    return MBR_PROTECTIVE not in types and any(types)


def has_gpt(sector: bytes | None) -> bool:
    if sector is None or len(sector) < 512 or sector[510:512] != MBR_SIGNATURE:
        return False
    return MBR_PROTECTIVE in [sector[446 + 16 * i + 4] for i in range(4)]


# --- tar -----------------------------------------------------------------------------

@dataclass
class Member:
    """One tar member as its header says."""

    info: tarfile.TarInfo
    magic: bytes  # header bytes 257..265

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def oldgnu(self) -> bool:
        return self.magic == GNU_MAGIC


@dataclass
class TarFacts:
    gzip: bool
    members: list[Member] = field(default_factory=list)
    error: str | None = None

    def find(self, name: str) -> Member | None:
        for m in self.members:
            if m.name.removeprefix("./") == name:
                return m
        return None


class Subject:
    """The file under validation; every fact is computed on first use. Close it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._memo: dict[str, Any] = {}
        host = HostFile(path)
        try:
            self.size = host.size
            self.head = host.pread_upto(0, 512)
        finally:
            host.close()

    def memo(self, key: str, compute: Callable[[Subject], Any]) -> Any:
        """A target's own fact about this file, computed once."""
        if key not in self._memo:
            self._memo[key] = compute(self)
        return self._memo[key]

    @property
    def is_tar(self) -> bool:
        if self.head[:2] == GZIP_MAGIC:
            return True
        return self.head[257:265] in (USTAR_MAGIC, GNU_MAGIC) and _tar_checksum_ok(self.head)

    @property
    def kind(self) -> str:
        if self.is_tar:
            return "tar.gz" if self.head[:2] == GZIP_MAGIC else "tar"
        return self.disk.fmt if self.disk else "unknown"

    @cached_property
    def disk(self) -> DiskFacts | None:
        if self.is_tar:
            return None
        host = HostFile(self.path)
        try:
            return disk_facts(host.pread_upto, host.size, self.path)
        finally:
            host.close()

    @cached_property
    def tar(self) -> TarFacts | None:
        if not self.is_tar:
            return None
        gz = self.head[:2] == GZIP_MAGIC
        facts = TarFacts(gz)
        try:
            self._tar = tar = tarfile.open(self.path, "r:gz" if gz else "r:")  # noqa: SIM115
            assert tar.fileobj is not None
            while True:
                info = tar.next()
                if info is None:
                    break
                if len(facts.members) >= MAX_MEMBERS:
                    facts.error = f"more than {MAX_MEMBERS} members"
                    break
                pos = tar.fileobj.tell()
                tar.fileobj.seek(info.offset)
                magic = tar.fileobj.read(512)[257:265]
                tar.fileobj.seek(pos)
                facts.members.append(Member(info, magic))
        except (tarfile.TarError, OSError, EOFError) as err:
            facts.error = f"not a readable tar: {err}"
        return facts

    def open_member(self, member: Member) -> IO[bytes] | None:
        """The member's data (for regular and sparse files), or None."""
        if self._tar is None or not member.info.isreg():
            return None
        try:
            return self._tar.extractfile(member.info)
        except (tarfile.TarError, OSError):
            return None

    def member_text(self, member: Member) -> bytes | None:
        """A small member's bytes (None when over MAX_TEXT or unreadable)."""
        if member.info.size > MAX_TEXT:
            return None
        f = self.open_member(member)
        if f is None:
            return None
        try:
            return f.read(MAX_TEXT)
        except (tarfile.TarError, OSError, EOFError):
            return None

    def member_digests(self, member: Member) -> dict[str, str] | None:
        f = self.open_member(member)
        if f is None:
            return None
        hashers = {"SHA1": hashlib.sha1(), "SHA256": hashlib.sha256()}
        try:
            while chunk := f.read(_CHUNK):
                for h in hashers.values():
                    h.update(chunk)
        except (tarfile.TarError, OSError, EOFError):
            return None
        return {a: h.hexdigest() for a, h in hashers.items()}

    def member_disk(self, member: Member) -> DiskFacts | None:
        f = self.open_member(member)
        if f is None:
            return None

        def read(offset: int, length: int) -> bytes:
            if offset < 0:
                return b""
            f.seek(offset)
            return f.read(length)

        try:
            facts = disk_facts(read, member.info.size)
        except (tarfile.TarError, OSError, EOFError) as err:
            return DiskFacts("unreadable", member.info.size, error=str(err))
        if facts.vmdk_header is not None and not facts.error and self.tar is not None \
                and not self.tar.gzip:
            _open_member_vmdk(facts, _MemberFile(self.path, member))
        return facts

    @cached_property
    def ova(self) -> OvaFacts | None:
        """The OVA view of a tar whose first member is an .ovf; None otherwise."""
        tar = self.tar
        if tar is None or not tar.members or not tar.members[0].name.lower().endswith(".ovf"):
            return None
        return _ova_facts(self, tar)

    def close(self) -> None:
        if self._tar is not None:
            with contextlib.suppress(OSError):
                self._tar.close()
            self._tar = None

    def __enter__(self) -> Subject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tar_checksum_ok(block: bytes) -> bool:
    """POSIX ustar "chksum": the byte sum of the header with the field read as spaces."""
    if len(block) < 512:
        return False
    try:
        stored = int(block[148:156].split(b"\x00")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:512])


@dataclass
class OvaFacts:
    ovf: Member
    descriptor: Descriptor | None
    ovf_error: str | None
    manifest_member: Member | None
    manifest: dict[str, tuple[str, str]] | None
    manifest_text: bytes | None
    manifest_error: str | None
    digests: dict[str, dict[str, str] | None]
    disks: dict[str, DiskFacts | None]
    cert_member: Member | None = None
    cert_text: bytes | None = None  # None when absent, unreadable or too large


def _ova_facts(s: Subject, tar: TarFacts) -> OvaFacts:
    # imported here: OVF parsing (defusedxml) and OVA packaging load only for an OVA
    from ..packages.ova import parse_manifest
    from ..packages.ovf import parse_ovf

    ovf = tar.members[0]
    text = s.member_text(ovf)
    desc, ovf_error = None, None
    if text is None:
        ovf_error = "the descriptor is unreadable or too large"
    else:
        try:
            desc = parse_ovf(text, name=ovf.name)
        except VmforgeError as err:
            ovf_error = str(err)
    mf = next((m for m in tar.members if m.name.lower().endswith(".mf")), None)
    manifest, mf_text, mf_error = None, None, None
    if mf is not None:
        mf_text = s.member_text(mf)
        try:
            manifest = parse_manifest(mf_text or b"", s.path)
        except VmforgeError as err:
            mf_error = str(err)
    digests = {m.name: s.member_digests(m) for m in tar.members
               if m is not mf and not m.name.lower().endswith(".cert")}
    disks: dict[str, DiskFacts | None] = {}
    if desc is not None:
        for d in desc.disks:
            if d.file_ref is None:
                continue
            with contextlib.suppress(KeyError):
                href = desc.file(d.file_ref).href
                member = tar.find(href)
                disks[href] = s.member_disk(member) if member is not None else None
    cert = next((m for m in tar.members if m.name.lower().endswith(".cert")), None)
    return OvaFacts(ovf, desc, ovf_error, mf, manifest, mf_text, mf_error, digests, disks, cert,
                    s.member_text(cert) if cert is not None else None)


class _MemberFile(HostFile):
    """One member of an uncompressed tar as a read-only file: the member's bytes in the
    archive, read in place (nothing is extracted), so a disk's reader can open it."""

    def __init__(self, archive: str, member: Member) -> None:
        super().__init__(archive)
        self.path = f"{archive}:{member.name}"
        self.base = member.info.offset_data
        self.size = member.info.size

    def pread(self, offset: int, length: int) -> bytes:
        data = self.pread_upto(offset, length)
        if len(data) != length:
            raise TruncatedImage(f"needs {length} bytes at offset {offset} but the member is "
                                 f"{self.size} bytes", path=self.path, offset=offset)
        return data

    def pread_upto(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return os.pread(self.fd, length, self.base + offset) if length else b""

    def preadinto(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.pread(offset, len(buf))


def _open_member_vmdk(facts: DiskFacts, host: _MemberFile) -> None:
    """Open a sparse VMDK member in place (untrusted) for its size, first sector and
    any parent it names; a failure is the disk's error. ``host`` is closed."""
    # imported here: reading a disk inside a package is only needed for an OVA
    from ..engine.chain import Chain
    from ..engine.stream import ExtentStream
    from ..formats.base import ImageReader, OpenOptions
    from ..formats.vmdk.reader import VmdkReader

    class MemberVmdk(VmdkReader):
        # the reader opens its one file through _open_host: hand it the member instead
        def _open_host(self, path: str) -> HostFile:
            self._hosts.append(host)
            return host

    try:
        opened: ImageReader = MemberVmdk(host.path, OpenOptions(untrusted=True))
        with Chain([opened]) as chain:
            reader = chain.top
            facts.virtual_size = reader.virtual_size
            if reader.backing is not None:
                facts.references = f"it names a parent disk ({reader.backing.filename})"
            if reader.virtual_size >= 512:
                facts.boot_sector = ExtentStream(chain).read(0, 512)
    except VmforgeError as err:
        facts.error = str(err)
    finally:
        host.close()


