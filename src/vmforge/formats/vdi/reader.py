"""Reading VDI images: header validation, the block map, extents and ``check``.

Every header field is checked against qemu's rules (block/vdi.c vdi_open), fixed caps
and the file size before the block map is allocated (../SECURITY.md rows 20-21).
Where qemu is lenient with hostile input (a block map past the end of the file reads
as zeros there, so every block points at block 0), vmforge refuses instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from ...errors import (
    BackingChainError,
    CorruptImage,
    FormatMismatch,
    ImageError,
    LimitExceeded,
    TruncatedImage,
    UnsupportedFeature,
)
from ...model import Extent, ExtentKind, align_up
from ...model.check import CheckResult
from ...model.info import BackingRef, ImageInfo
from ..base import ByteSource, HostFile, ImageReader, OpenOptions, file_data_runs
from . import structs as S

BlockMap = np.ndarray  # 1-D little-endian uint32, one entry per block

#: most lines of detail a check keeps (qemu prints one per bad entry; a hostile map
#: would otherwise produce millions)
MAX_CHECK_MESSAGES = 100


def read_header(host: ByteSource) -> S.Header:
    """Parse and validate the header of ``host``.

    Raises TruncatedImage, FormatMismatch, UnsupportedFeature, CorruptImage or LimitExceeded.
    """
    path = host.path
    head = host.pread_upto(0, S.HEADER_AREA)
    if len(head) < S.PREHEADER_SIZE:
        raise TruncatedImage(f"file is {len(head)} bytes, too short for a VDI pre-header",
                             path=path)
    h = S.Header.unpack(head)
    if h.u32Signature != S.SIGNATURE:
        raise FormatMismatch(f"not a VDI image (bad signature {h.u32Signature:08x})", path=path)
    if h.u32Version != S.VERSION_1_1:
        raise UnsupportedFeature(f"VDI version {h.version_text}", path=path,
                                 detail="only version 1.1 is read, like qemu")
    if len(head) < S.HEADER1_END:
        raise TruncatedImage(f"file is {len(head)} bytes, too short for a VDI 1.1 header",
                             path=path)
    if h.cbDisk > S.MAX_DISK_SIZE:
        raise LimitExceeded(f"VDI disk size {h.cbDisk} exceeds the maximum {S.MAX_DISK_SIZE}",
                            path=path, limit="disk size")
    if h.offBlocks % S.SECTOR_SIZE or h.offData % S.SECTOR_SIZE:
        raise CorruptImage(f"block map offset {h.offBlocks:#x} or data offset {h.offData:#x} "
                           "is not sector-aligned", path=path, offset=0x154)
    if h.LegacyGeometry.cbSector != S.SECTOR_SIZE:
        raise UnsupportedFeature(f"VDI sector size {h.LegacyGeometry.cbSector}", path=path,
                                 detail="only 512-byte sectors exist")
    if h.cbBlock != S.BLOCK_SIZE:
        raise UnsupportedFeature(f"VDI block size {h.cbBlock}", path=path,
                                 detail="only 1 MiB blocks are read, like qemu")
    if h.cbBlockExtra != 0:
        # VirtualBox puts cbBlockExtra bytes before each block's data; qemu ignores the
        # field and would return those bytes as disk data, so refuse rather than guess
        raise UnsupportedFeature(f"VDI block extra data ({h.cbBlockExtra} bytes per block)",
                                 path=path)
    if h.cBlocks > S.MAX_BLOCKS:
        raise LimitExceeded(f"VDI block count {h.cBlocks} exceeds the maximum {S.MAX_BLOCKS}",
                            path=path, limit="block count")
    if h.cbDisk > h.cBlocks * h.cbBlock:
        raise CorruptImage(f"disk size {h.cbDisk} needs more than the {h.cBlocks} blocks "
                           "of the block map", path=path, offset=0x170)
    if h.u32Type == S.TYPE_DIFF and not h.uuidLinkage.int:
        raise CorruptImage("differencing VDI without a parent UUID (uuidLinkage is zero)",
                           path=path, offset=0x1A8)
    if h.uuidLinkage.int and h.u32Type not in (S.TYPE_DIFF, S.TYPE_UNDO):
        raise CorruptImage(f"VDI image of type {h.u32Type} names a parent "
                           f"({h.uuidLinkage}); only differencing images have one",
                           path=path, offset=0x4C)
    map_bytes = h.cBlocks * 4
    if h.offBlocks < S.HEADER_AREA:
        raise CorruptImage(f"block map offset {h.offBlocks:#x} overlaps the header",
                           path=path, offset=0x154)
    if h.offBlocks + map_bytes > host.size:
        raise TruncatedImage(f"block map of {h.cBlocks} entries at {h.offBlocks:#x} runs past "
                             f"the end of the file ({host.size} bytes)", path=path,
                             offset=h.offBlocks)
    if h.cBlocks and h.offData < h.offBlocks + map_bytes:
        raise CorruptImage(f"data offset {h.offData:#x} overlaps the block map", path=path,
                           offset=0x158)
    return h


def read_block_map(host: HostFile, h: S.Header) -> BlockMap:
    """The block map as a writable little-endian uint32 array (validated size)."""
    raw = host.pread(h.offBlocks, h.cBlocks * 4)
    return np.frombuffer(bytearray(raw), dtype="<u4")


def find_parent(child: str, linkage: uuid.UUID, named: tuple[str, ...]
                ) -> tuple[BackingRef | None, BackingChainError | None]:
    """The named file whose uuidCreate is ``linkage`` (the child's uuidLinkage).

    VDI stores no parent file name (VirtualBox finds parents in its media registry), so
    only files the user named are considered, and only their headers are read.
    """
    tried = []
    for name in named:
        try:
            host = HostFile(name)
        except ImageError as err:
            tried.append(f"{name}: {err.message.removeprefix(name + ': ')}")
            continue
        try:
            h = read_header(host)
        except ImageError:
            tried.append(f"{name}: not a readable VDI")
            continue
        finally:
            host.close()
        if h.uuidCreate == linkage:
            return BackingRef(os.path.abspath(name), "vdi"), None
        tried.append(f"{name}: UUID {h.uuidCreate}")
    detail = f"; named: {', '.join(tried)}" if tried else ""
    return None, BackingChainError(
        f"{child}: differencing VDI whose parent (UUID {linkage}) was not named{detail}",
        path=child, hint="name the parent image with --parent FILE (a VDI stores only its "
                         "parent's UUID, not a file name)")


class VdiReader(ImageReader):
    format_name = "vdi"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.path = path
        self.host = HostFile(path)
        try:
            self.header = read_header(self.host)
            self.bmap = read_block_map(self.host, self.header)
        except BaseException:
            self.host.close()
            raise
        #: a differencing image: free blocks fall through to the parent
        self.differencing = bool(self.header.uuidLinkage.int)
        #: raised by the chain (engine/chain.py) when the parent was not located
        self.missing_parent: BackingChainError | None = None
        if self.differencing:
            linkage = self.header.uuidLinkage
            if options.untrusted:
                # not even the named files are opened: the chain refuses the reference
                self.missing_parent = BackingChainError(
                    f"{path}: differencing VDI refers to parent UUID {linkage} (refused in "
                    "untrusted mode)", path=path,
                    hint="untrusted images must be self-contained; flatten it where it was made")
            else:
                self.backing, self.missing_parent = find_parent(path, linkage, options.parents)
        # qemu accepts odd sizes ("VBoxManage convertfromraw" makes them) rounded up to
        # whole sectors
        self.virtual_size = align_up(self.header.cbDisk, S.SECTOR_SIZE)
        self.block_size = self.header.cbBlock
        # qemu marks data of fixed images BDRV_BLOCK_RECURSE: file holes under them read
        # as zeros and map shows them as data+zero
        self.fixed = self.header.u32Type == S.TYPE_FIXED

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        bs = self.block_size
        pos = start
        while pos < end:
            idx = pos // bs
            entry = int(self.bmap[idx])
            # extend the run while the following blocks continue it (same kind, and for
            # data, the next host block)
            run_end = min((idx + 1) * bs, end)
            nxt = idx + 1
            while run_end < end:
                e2 = int(self.bmap[nxt])
                if entry >= S.FIRST_UNALLOCATED:
                    if e2 < S.FIRST_UNALLOCATED or (self.differencing and e2 != entry):
                        break
                elif e2 != entry + (nxt - idx):
                    break
                nxt += 1
                run_end = min(nxt * bs, end)
            if entry >= S.FIRST_UNALLOCATED:
                # both FREE and ZERO read as zeros: qemu reports BDRV_BLOCK_ZERO for them.
                # In a differencing image a FREE block is the parent's (VirtualBox VDI.cpp
                # returns VERR_VD_BLOCK_FREE), a ZERO block hides it.
                kind = ExtentKind.ZERO
                if self.differencing and entry == S.BLOCK_FREE:
                    kind = ExtentKind.UNALLOCATED
                yield Extent(pos, run_end - pos, kind)
            else:
                host = self.header.offData + entry * bs + (pos - idx * bs)
                yield from self._data(pos, run_end, host)
            pos = run_end

    def _data(self, start: int, end: int, host: int) -> Iterator[Extent]:
        if not self.fixed:
            yield Extent(start, end - start, ExtentKind.DATA, host_offset=host)
            return
        for s, e, is_data in file_data_runs(self.host.fd, host, host + (end - start)):
            yield Extent(start + (s - host), e - s, ExtentKind.DATA, host_offset=s,
                         hole=not is_data)

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert extent.host_offset is not None
        self.host.preadinto(buf, extent.host_offset)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        if extent.reads_zero and not extent.hole:
            return None  # zero by metadata: the host bytes may hold anything
        return self.host

    def verify_parent(self, parent: Any) -> None:
        """The chain calls this with the opened parent: it must be the image whose
        uuidCreate this one links to."""
        header = getattr(parent, "header", None)
        if not isinstance(header, S.Header) or header.uuidCreate != self.header.uuidLinkage:
            got = header.uuidCreate if isinstance(header, S.Header) else "none (not a VDI)"
            raise BackingChainError(
                f"{self.path}: parent {parent.path} has UUID {got}, but this differencing "
                f"VDI links to {self.header.uuidLinkage}", path=self.path)

    def info(self) -> ImageInfo:
        info = ImageInfo(filename=self.path, format="vdi", virtual_size=self.virtual_size,
                         actual_size=self.host.allocated, cluster_size=self.block_size)
        if self.differencing:
            h = self.header
            if self.backing is not None:
                info.backing_filename = info.full_backing_filename = self.backing.filename
                info.backing_format = self.backing.format
            info.format_specific = {"type": "vdi", "data": {
                "image-type": S.TYPE_NAMES.get(h.u32Type, str(h.u32Type)),
                "uuid": str(h.uuidCreate),
                "parent-uuid": str(h.uuidLinkage),
                "parent-modification-uuid": str(h.uuidParentModify),
            }}
        return info

    def check(self) -> CheckResult:
        """qemu's vdi_co_check: entries beyond the block count, blocks used twice, and
        cBlocksAllocated against the count of allocated entries."""
        h = self.header
        res = CheckResult(filename=self.path, format="vdi")
        entries = self.bmap.astype(np.uint32)
        allocated = entries < S.FIRST_UNALLOCATED
        too_large = np.flatnonzero(allocated & (entries >= h.cBlocks))
        for block in too_large[:MAX_CHECK_MESSAGES].tolist():
            res.messages.append(f"ERROR: block index {block} too large, is {int(entries[block])}")
        res.corruptions += len(too_large)
        valid = entries[allocated & (entries < h.cBlocks)]
        counts = np.bincount(valid, minlength=0) if len(valid) else np.zeros(0, dtype=np.int64)
        shared = np.flatnonzero(counts > 1)
        for target in shared[:MAX_CHECK_MESSAGES].tolist():
            for _ in range(int(counts[target]) - 1):
                if len(res.messages) < 2 * MAX_CHECK_MESSAGES:
                    res.messages.append(f"ERROR: block index {target} also used by {target}")
        res.corruptions += int((counts[shared] - 1).sum()) if len(shared) else 0
        if len(valid) != h.cBlocksAllocated:
            res.messages.append(f"ERROR: allocated blocks mismatch, is {len(valid)}, "
                                f"should be {h.cBlocksAllocated}")
            res.corruptions += 1
        return res

    def close(self) -> None:
        self.host.close()
