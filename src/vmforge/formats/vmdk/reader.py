"""Reading VMDK disks: a sparse file with its embedded descriptor, or a text
descriptor naming extent files.

Safety (../SECURITY.md rows 11-14): extent names are checked before any file is
opened and resolved only inside the descriptor's directory; in untrusted mode a
descriptor naming any other file is refused before opening it; descriptors are bounded
to 1 MiB, must sit inside the file and contain only known lines; table sizes are
checked against qemu's limits and the file size before anything is allocated.

Where vmforge differs from qemu-img 7.2 on purpose:
  * ``ZERO`` extents read as zeros and ``RDONLY`` extents are read (qemu skips both
    lines, which makes the disk shorter); ``NOACCESS`` extents are refused.
  * a bare ESX "COWD" or seSparse extent file (no descriptor) is refused with a hint;
    qemu fails on it too (no CID) or probes it as raw.
  * a child whose parentCID differs from its parent's CID is refused when the chain is
    opened; qemu fails the first read that falls through to the parent.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from typing import Any

from ...errors import (
    BackingChainError,
    CorruptImage,
    LimitExceeded,
    TruncatedImage,
    UnsupportedFeature,
)
from ...model import Extent
from ...model.check import CheckResult
from ...model.info import BackingRef, ImageInfo
from ..base import ByteSource, HostFile, ImageReader, OpenOptions
from . import structs as S
from .descriptor import (
    MAX_DESCRIPTOR_BYTES,
    NO_PARENT_CID,
    Descriptor,
    ExtentLine,
    check_extent_name,
    looks_like_text_descriptor,
    parse_descriptor,
)
from .extents import (
    COWDExtent,
    FlatExtent,
    SESparseExtent,
    VmdkExtent,
    ZeroExtent,
    open_hosted_sparse,
)

SECTOR = S.SECTOR_SIZE

# createType values whose descriptor is a separate text file, and what qemu 7.2 accepts
TEXT_CREATE_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
                     "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")


def read_embedded_descriptor(host: ByteSource, h: S.SparseExtentHeader) -> Descriptor:
    """The descriptor embedded in a sparse extent, bounds-checked, then parsed.

    qemu reads the CIDs from it and fails without one. Raises CorruptImage or
    LimitExceeded.
    """
    off, size = h.descriptorOffset * SECTOR, h.descriptorSize * SECTOR
    if not off or not size:
        raise CorruptImage("sparse VMDK has no embedded descriptor (no CID)",
                           path=host.path, offset=28)
    if size > MAX_DESCRIPTOR_BYTES:
        raise LimitExceeded(f"embedded VMDK descriptor of {size} bytes is larger than "
                            f"{MAX_DESCRIPTOR_BYTES}", path=host.path, limit="descriptor size")
    if off + size > host.size or off < SECTOR:
        raise CorruptImage(f"embedded VMDK descriptor at offset {off} ({size} bytes) lies "
                           f"outside the file ({host.size} bytes)", path=host.path, offset=28)
    if h.overHead and off + size > h.overHead * SECTOR:
        # the descriptor belongs to the metadata area before the first grain
        raise CorruptImage(f"embedded VMDK descriptor at offset {off} ({size} bytes) runs "
                           f"into the grain area (from {h.overHead * SECTOR})",
                           path=host.path, offset=28)
    return parse_descriptor(host.pread(off, size), host.path, embedded=True)


class VmdkReader(ImageReader):
    format_name = "vmdk"
    codec = "zlib"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.path = path
        self.options = options
        self.extents: list[VmdkExtent] = []
        #: a seSparse extent opened without its descriptor (no CIDs known)
        self.bare_extent = False
        #: a sparse extent whose descriptor is embedded in it
        self.monolithic = False
        self._hosts: list[HostFile] = []
        self.host = self._open_host(path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.virtual_size = sum(e.size for e in self.extents)
        self._starts = [e.start for e in self.extents]
        if self.descriptor.parent_filename_hint is not None:
            self.backing = BackingRef(self.descriptor.parent_filename_hint, "vmdk")

    def _open_host(self, path: str) -> HostFile:
        host = HostFile(path)
        self._hosts.append(host)
        return host

    # -- opening ------------------------------------------------------------------
    def _open(self) -> None:
        host = self.host
        if host.size < 4:
            raise TruncatedImage("File is too small, not a valid image", path=self.path)
        head = host.pread_upto(0, SECTOR)
        magic = head[:4]
        if magic == S.SPARSE_MAGIC:
            self._open_monolithic(head)
        elif magic == S.COWD_MAGIC:
            raise UnsupportedFeature(
                "bare ESX sparse extent (COWD)", path=self.path,
                hint="open the vmfsSparse descriptor file that names this extent")
        elif S.is_sesparse(head):
            # an ESXi seSparse extent on its own: everything needed to read it is in its
            # header; only the CIDs (kept in the descriptor) are unknown
            self.extents.append(SESparseExtent(0, self.host))
            self.descriptor = Descriptor(create_type="seSparse", cid=NO_PARENT_CID)
            self.create_type = "seSparse"
            self.bare_extent = True
        else:
            self._open_text()

    def _open_monolithic(self, head: bytes) -> None:
        extent = open_hosted_sparse(0, self.host, head)
        self.monolithic = True
        h = extent.header
        self.extents.append(extent)
        self.descriptor = read_embedded_descriptor(self.host, h)
        self.create_type = "streamOptimized" if extent.compressed else "monolithicSparse"

    def _open_text(self) -> None:
        if self.host.size > MAX_DESCRIPTOR_BYTES:
            # not a descriptor anyone wrote; and not VMDK at all if the caller probed
            raise LimitExceeded(f"VMDK descriptor file of {self.host.size} bytes is larger "
                                f"than {MAX_DESCRIPTOR_BYTES}", path=self.path,
                                limit="descriptor size")
        # qemu pads a descriptor file with NULs to 10 KiB when it updates the CID;
        # parsing stops at the first NUL
        raw = self.host.pread(0, self.host.size)
        desc = parse_descriptor(raw, self.path)
        self.descriptor = desc
        if desc.create_type not in TEXT_CREATE_TYPES:
            raise UnsupportedFeature(f"VMDK createType '{desc.create_type}' in a descriptor "
                                     "file", path=self.path,
                                     detail="qemu reads " + ", ".join(TEXT_CREATE_TYPES))
        self.create_type = desc.create_type
        # every name is checked, and untrusted mode decided, before any file is opened
        own = os.path.basename(self.path)
        for line in desc.extents:
            if line.filename is None:
                continue
            check_extent_name(line.filename, self.path)
            if self.options.untrusted and line.filename != own:
                raise CorruptImage(
                    f"VMDK descriptor names the extent file '{line.filename}' (refused in "
                    "untrusted mode)", path=self.path,
                    hint="untrusted images must be self-contained; convert it to a "
                         "monolithicSparse or streamOptimized VMDK where it was made")
            if line.access == "NOACCESS":
                raise UnsupportedFeature(f"VMDK NOACCESS extent '{line.filename}'",
                                         path=self.path)
            if line.type in ("VMFSRDM", "VMFSRAW"):
                raise UnsupportedFeature(f"VMDK {line.type} extent (raw device mapping)",
                                         path=self.path)
        directory = os.path.dirname(self.path)
        start = 0
        for line in desc.extents:
            extent = self._open_extent(line, start, directory)
            extent.index = len(self.extents)
            self.extents.append(extent)
            start += extent.size

    def _open_extent(self, line: ExtentLine, start: int, directory: str) -> VmdkExtent:
        size = line.sectors * SECTOR
        if line.type == "ZERO":
            return ZeroExtent(start, size)
        assert line.filename is not None
        host = self._open_host(os.path.join(directory, line.filename))
        if line.type in ("FLAT", "VMFS"):
            return FlatExtent(start, size, host, line.offset * SECTOR, line.type)
        head = host.pread_upto(0, SECTOR)
        if line.type == "SESPARSE":
            extent: VmdkExtent = SESparseExtent(start, host)
        elif head[:4] == S.SPARSE_MAGIC:
            extent = open_hosted_sparse(start, host, head)
        elif head[:4] == S.COWD_MAGIC and len(head) == SECTOR:
            extent = COWDExtent(start, host, S.COWDHeader.unpack(head))
        else:
            raise CorruptImage(f"extent file {host.path} is not a VMDK sparse extent "
                               "(Image not in VMDK format)", path=self.path)
        extent.type_name = line.type
        if extent.size != size:
            # qemu silently uses the extent header's capacity; a disagreement means the
            # descriptor and the extent do not belong together
            raise CorruptImage(f"extent {line.filename} holds {extent.size // SECTOR} sectors "
                               f"but the descriptor says {line.sectors}", path=self.path)
        return extent

    # -- reading ------------------------------------------------------------------
    def _extent_at(self, offset: int) -> VmdkExtent:
        return self.extents[bisect.bisect_right(self._starts, offset) - 1]

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        pos = start
        if pos >= end:
            return
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            ext = self.extents[i]
            stop = min(end, ext.end)
            if stop > pos:
                yield from ext.iter_extents(pos, stop)
            pos = stop
            i += 1

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        self._extent_at(extent.start).read_host(extent, buf)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        return self._extent_at(extent.start).verbatim_file(extent)

    # -- chain --------------------------------------------------------------------
    def verify_parent(self, parent: Any) -> None:
        """The parent must be a VMDK whose CID is this image's parentCID (qemu refuses
        reads through a parent whose CID changed: vmdk_is_cid_valid)."""
        pdesc = getattr(parent, "descriptor", None)
        if not isinstance(pdesc, Descriptor):
            raise BackingChainError(
                f"{self.path}: parent {parent.path} is not a VMDK image, so it has no CID "
                f"to match parentCID {self.descriptor.parent_cid:08x}", path=self.path)
        if pdesc.cid != self.descriptor.parent_cid:
            raise BackingChainError(
                f"{self.path}: parentCID {self.descriptor.parent_cid:08x} does not match the "
                f"CID {pdesc.cid:08x} of its parent {parent.path}", path=self.path,
                hint="the parent was changed after this delta was made; its data may no "
                     "longer fit")

    # -- info and check -----------------------------------------------------------
    def info(self) -> ImageInfo:
        actual = sum(h.allocated for h in self._hosts_unique())
        first = self.extents[0] if self.extents else None
        same = all(e.flat == first.flat and e.compressed == first.compressed
                   and (e.flat or e.grain_bytes == first.grain_bytes)
                   for e in self.extents) if first else False
        cluster = first.grain_bytes if first and same and not first.flat else None
        info = ImageInfo(filename=self.path, format="vmdk", virtual_size=self.virtual_size,
                         actual_size=actual, cluster_size=cluster)
        if self.backing is not None:
            info.backing_filename = self.backing.filename
            info.full_backing_filename = _full_backing(self.path, self.backing.filename)
            info.backing_format = self.backing.format
        extents = []
        for e in self.extents:
            # keys in qemu-img's order (compressed, virtual-size, filename, cluster-size, format)
            item: dict[str, Any] = {"compressed": True} if e.compressed else {}
            item["virtual-size"] = e.size
            item["filename"] = e.host.path if e.host is not None else self.path
            if not e.flat and e.grain_bytes:
                item["cluster-size"] = e.grain_bytes
            # qemu names the type only of extents listed in a descriptor file
            item["format"] = "" if self.monolithic else e.type_name
            extents.append(item)
        data: dict[str, Any] = {
            "cid": self.descriptor.cid,
            "parent-cid": self.descriptor.parent_cid,
            "create-type": self.create_type,
            "extents": extents,
        }
        if self.bare_extent:
            # the CIDs live in the descriptor, which is not there
            del data["cid"], data["parent-cid"]
        info.format_specific = {"type": "vmdk", "data": data}
        return info

    def _hosts_unique(self) -> list[HostFile]:
        seen: set[tuple[int, int]] = set()
        out = []
        for h in self._hosts:
            if h.ident not in seen:
                seen.add(h.ident)
                out.append(h)
        return out

    def check(self) -> CheckResult:
        """qemu's vmdk_co_check: every allocated grain must point inside its file. qemu
        stops at the first problem, counts one corruption and fails the check itself
        ("Check failed: Invalid argument", exit code 1), so a check error is counted too."""
        res = CheckResult(filename=self.path, format="vmdk")
        for e in self.extents:
            messages = e.check_messages()
            if messages:
                res.messages.extend(messages)
                res.corruptions += 1
                res.check_errors += 1
                break
        return res

    def close(self) -> None:
        for h in self._hosts:
            h.close()
        self._hosts = []


def _full_backing(path: str, name: str) -> str:
    directory = os.path.dirname(path)
    if os.path.isabs(name) or not directory:
        return name
    return os.path.join(directory, name)


__all__ = ["NO_PARENT_CID", "VmdkReader", "looks_like_text_descriptor"]
