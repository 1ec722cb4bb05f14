"""Reading VDI images: header validation, the block map, extents and ``check``.

Every header field is checked against qemu's rules (block/vdi.c vdi_open), fixed caps
and the file size before the block map is allocated (../SECURITY.md rows 20-21).
Where qemu is lenient with hostile input (a block map past the end of the file reads
as zeros there, so every block points at block 0), vmforge refuses instead.

The block map is an ``array.array`` (util/tables.py), walked run by run
(table_runs.py): reading a VDI imports no numpy, and the Python work follows the
number of runs of stored or free blocks, not of blocks.
"""

from __future__ import annotations

import os
import uuid
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
from ...util import tables
from ..base import ByteSource, HostFile, ImageReader, OpenOptions, file_data_runs
from ..table_runs import fragmented, runs
from . import structs as S

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


def read_block_map(host: HostFile, h: S.Header) -> array[int]:
    """The block map, one entry a block (a host block index, BLOCK_FREE or BLOCK_ZERO),
    as a writable array of host-order integers (its size validated by read_header)."""
    return tables.from_bytes(host.pread(h.offBlocks, h.cBlocks * 4), 4, "little")


#: entries that are no host block (VDI_IMAGE_BLOCK_FREE, VDI_IMAGE_BLOCK_ZERO)
_GAPS = (S.BLOCK_FREE, S.BLOCK_ZERO)


def block_runs(bmap: array[int], first: int, last: int,
               differencing: bool) -> Iterator[tuple[int, int, int]]:
    """Runs ``(a, b, entry)`` of blocks ``[first, last)``: blocks stored one after the
    other on the host (``entry`` is block ``a``'s host block, each next one 1 more), or
    blocks that read as zeros. Free and zero blocks are one run unless ``differencing``
    (where a free block is the parent's): ``entry`` is then the first block's.
    """
    run: tuple[int, int, int] | None = None
    for a, b, entry in runs(bmap, first, last, 1, _GAPS, S.FIRST_UNALLOCATED):
        if (run is not None and not differencing and entry >= S.FIRST_UNALLOCATED
                and run[2] >= S.FIRST_UNALLOCATED):
            run = (run[0], b, run[2])
            continue
        if run is not None:
            yield run
        run = (a, b, entry)
    if run is not None:
        yield run


@dataclass
class BlockUse:
    """How a block map uses the host blocks (see :func:`host_block_use`)."""

    #: (block, entry) of the first entries naming a host block past the block count
    too_large: list[tuple[int, int]] = field(default_factory=list)
    too_large_count: int = 0
    #: host block -> how many entries name it beyond the first (blocks used twice), for
    #: the ``keep`` lowest such host blocks
    shared: dict[int, int] = field(default_factory=dict)
    #: how many entries name a host block some other entry names (all host blocks)
    extra: int = 0
    #: entries naming a host block below the block count
    stored: int = 0
    #: one past the highest host block named (0: none)
    top: int = 0


def host_block_use(bmap: array[int], blocks: int, keep: int) -> BlockUse:
    """Which host blocks the entries of ``bmap`` name, checked as qemu's vdi_co_check
    checks them: each below ``blocks`` and named once; ``keep`` of the entries past
    ``blocks`` and of the host blocks named twice are listed.

    Runs of consecutive host blocks are marked a slice at a time, so the work follows
    the number of runs; a map of blocks stored out of order (in the order a guest
    wrote them) is taken entry by entry once that shows. Memory stays within the
    map's size (which the file holds) again, whatever a hostile map names: a byte a
    host block below ``blocks`` records which are taken, and at most ``keep`` are listed.
    """
    use = BlockUse()
    taken = bytearray(blocks)
    for count, (a, b, entry) in enumerate(runs(bmap, 0, len(bmap), 1, _GAPS,
                                               S.FIRST_UNALLOCATED), 1):
        if entry < S.FIRST_UNALLOCATED:
            _use_run(use, taken, a, b, entry, blocks, keep)
        if fragmented(count, b):
            _use_one_by_one(use, taken, bmap, b, blocks, keep)
            break
    use.extra = use.stored - taken.count(1)
    return use


def _use_run(use: BlockUse, taken: bytearray, a: int, b: int, entry: int, blocks: int,
             keep: int) -> None:
    """host_block_use for blocks ``[a, b)``, stored at host blocks ``entry, entry + 1...``."""
    use.top = max(use.top, entry + (b - a))
    cut = a + max(0, min(b - a, blocks - entry))  # blocks [a, cut) name valid host blocks
    if cut < b:
        use.too_large_count += b - cut
        more = max(0, min(b - cut, keep - len(use.too_large)))
        use.too_large.extend((k, entry + (k - a)) for k in range(cut, cut + more))
    lo, hi = entry, entry + (cut - a)
    if lo < hi:
        use.stored += hi - lo
        if taken.find(1, lo, hi) < 0:
            taken[lo:hi] = b"\x01" * (hi - lo)
        else:  # some named before (damage): one at a time
            _take(use, taken, range(lo, hi), keep)


def _take(use: BlockUse, taken: bytearray, targets: Iterable[int], keep: int) -> None:
    """Mark ``targets`` taken, counting those taken before (:func:`_shared`)."""
    for target in targets:
        if taken[target]:
            _shared(use, target, keep)
        taken[target] = 1


def _shared(use: BlockUse, target: int, keep: int) -> None:
    """Host block ``target`` is named once more: listed if among the ``keep`` lowest."""
    shared = use.shared
    if target in shared:
        shared[target] += 1
    elif len(shared) < keep:
        shared[target] = 1
    elif keep and target < (highest := max(shared)):
        # the highest listed drops out for good: ``keep`` lower ones are shared now
        del shared[highest]
        shared[target] = 1


def _use_one_by_one(use: BlockUse, taken: bytearray, bmap: array[int], start: int,
                    blocks: int, keep: int) -> None:
    """host_block_use for entries ``[start, ...)``: one plain loop (~0.15 us an entry)."""
    rest = bmap[start:]
    stored = 0
    damaged = False
    for entry in rest:
        if entry < blocks:  # (blocks is below FIRST_UNALLOCATED)
            stored += 1
            if taken[entry]:
                _shared(use, entry, keep)
            taken[entry] = 1
        elif entry < S.FIRST_UNALLOCATED:
            damaged = True
    use.stored += stored
    use.top = max(use.top, taken.rfind(1) + 1)
    if not damaged:
        return
    use.top = max(use.top, max(filter(S.FIRST_UNALLOCATED.__gt__, rest)) + 1)
    for k, entry in enumerate(rest, start):  # entries past the block count
        if blocks <= entry < S.FIRST_UNALLOCATED:
            use.too_large_count += 1
            if len(use.too_large) < keep:
                use.too_large.append((k, entry))


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
        if start >= end:
            return
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        for a, b, entry in block_runs(self.bmap, first, last, self.differencing):
            g_start, g_end = max(start, a * bs), min(end, b * bs)
            if entry >= S.FIRST_UNALLOCATED:
                # both FREE and ZERO read as zeros: qemu reports BDRV_BLOCK_ZERO for them.
                # In a differencing image a FREE block is the parent's (VirtualBox VDI.cpp
                # returns VERR_VD_BLOCK_FREE), a ZERO block hides it.
                kind = ExtentKind.ZERO
                if self.differencing and entry == S.BLOCK_FREE:
                    kind = ExtentKind.UNALLOCATED
                yield Extent(g_start, g_end - g_start, kind)
            else:
                host = self.header.offData + entry * bs + (g_start - a * bs)
                yield from self._data(g_start, g_end, host)

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
        use = host_block_use(self.bmap, h.cBlocks, MAX_CHECK_MESSAGES)
        for block, entry in use.too_large:
            res.messages.append(f"ERROR: block index {block} too large, is {entry}")
        res.corruptions += use.too_large_count
        for target in sorted(use.shared):
            for _ in range(use.shared[target]):
                if len(res.messages) < 2 * MAX_CHECK_MESSAGES:
                    res.messages.append(f"ERROR: block index {target} also used by {target}")
        res.corruptions += use.extra
        if use.stored != h.cBlocksAllocated:
            res.messages.append(f"ERROR: allocated blocks mismatch, is {use.stored}, "
                                f"should be {h.cBlocksAllocated}")
            res.corruptions += 1
        return res

    def close(self) -> None:
        self.host.close()
