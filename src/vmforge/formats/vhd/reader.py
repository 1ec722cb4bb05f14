"""Reading fixed, dynamic and differencing VHD files as extents.

Everything a header says is checked against the file size and QEMU's caps before any
table is allocated. Dynamic disks read as QEMU 7.2 reads them (block/vpc.c): an
allocated block reads as stored data whatever its sector bitmap says, an unallocated
one as zeros. Differencing disks (which qemu cannot read) follow the specification:
a block's sector bitmap says which sectors this file holds; the others, and whole
blocks absent from the BAT, are unallocated and fall through to the parent.

No numpy: the BAT is an ``array.array`` walked run by run (table_runs.py), and a
sector bitmap is split into runs by unpacking it a byte a bit and matching runs of
equal bytes, so opening a VHD to convert or map it does not pay numpy's import.
"""

from __future__ import annotations

import struct
import threading
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ...engine.chain import resolve_backing_path
from ...errors import BackingChainError, CorruptImage, LimitExceeded, TruncatedImage
from ...model import Extent, ExtentKind
from ...model.info import ImageInfo
from ...util import tables
from ..base import ByteSource, HostFile, ImageReader, OpenOptions, file_data_runs
from ..table_runs import fragmented, runs
from . import structs as S
from .parent import Locator, choose_parent, read_locators

#: our cap on the BAT (bytes) on top of qemu's INT_MAX/4 entries: 2040 GiB in 32 KiB
#: blocks; the BAT must also fit in the file, so memory never exceeds the file's size
MAX_BAT_BYTES = 256 << 20
#: sector bitmaps of differencing blocks kept decoded (runs), per reader
_BITMAP_CACHE = 64
#: a run of sectors present (bit set) or absent, in a bitmap unpacked one byte a bit
#: the BAT's one sentinel: "Block Allocation Table", an unused entry
_GAPS = (S.BAT_UNUSED,)


def read_footer(host: ByteSource) -> tuple[S.Footer, bool]:
    """The footer and whether the disk is sparse (dynamic or differencing: footer copy at
    offset 0) or fixed.

    Raises CorruptImage when neither offset 0 nor the last 512 bytes hold a footer, or
    when its checksum is wrong (qemu 7.2 refuses that too: "Incorrect header checksum").
    """
    path = host.path
    if host.size < S.FOOTER_SIZE:
        raise TruncatedImage(f"file of {host.size} bytes is too short for a VHD footer",
                             path=path, offset=0)
    raw = host.pread(0, S.FOOTER_SIZE)
    dynamic = raw[:8] == S.COOKIE
    if dynamic and struct.unpack_from(">I", raw, 60)[0] == S.DISK_TYPE_FIXED:
        # A fixed disk whose guest data starts with a footer (a VHD inside a VHD), or an
        # empty one that is nothing but its footer: the footer at the end decides.
        # qemu reads these as dynamic and fails.
        dynamic = False
    at = 0
    if not dynamic:
        at = host.size - S.FOOTER_SIZE
        raw = host.pread(at, S.FOOTER_SIZE)
        if raw[:8] != S.COOKIE:
            raise CorruptImage("invalid VPC image: no 'conectix' footer at the start or the end",
                               path=path, offset=at)
    if not S.footer_checksum_ok(raw):
        raise CorruptImage("incorrect VHD footer checksum", path=path, offset=at)
    footer = S.Footer.unpack(raw)
    want = (S.DISK_TYPE_DYNAMIC, S.DISK_TYPE_DIFFERENCING) if dynamic else (S.DISK_TYPE_FIXED,)
    if footer.disk_type not in want:
        where = "at offset 0" if dynamic else "at the end of the file"
        expected = " or ".join(map(str, want))
        raise CorruptImage(f"VHD footer {where} has disk type {footer.disk_type}, "
                           f"expected {expected}", path=path, offset=at)
    return footer, dynamic


def read_dynamic_header(host: ByteSource, footer: S.Footer, virtual_size: int) -> S.DynamicHeader:
    """The dynamic disk header at ``footer.data_offset``, validated up to the BAT bounds.

    Raises TruncatedImage, CorruptImage or LimitExceeded before anything is allocated.
    """
    path = host.path
    at = footer.data_offset
    if at > host.size - S.DynamicHeader.LEADING:
        raise TruncatedImage(f"dynamic disk header at {at} lies past the end of the file",
                             path=path, offset=at)
    raw = host.pread_upto(at, S.DYNAMIC_HEADER_SIZE)
    hdr = S.DynamicHeader.unpack(raw)
    if hdr.cookie != S.DYNAMIC_COOKIE:
        raise CorruptImage("invalid dynamic disk header magic (expected 'cxsparse')",
                           path=path, offset=at)
    bs = hdr.block_size
    if bs < S.SECTOR or bs & (bs - 1):
        raise CorruptImage(f"invalid block size {bs}", path=path, offset=at + 32)
    # The limits first, as qemu checks them, so a hostile count is named as such.
    if virtual_size // bs > 0xFFFFFFFF:
        raise LimitExceeded("too many blocks", path=path, limit="blocks")
    if hdr.max_table_entries * bs < virtual_size:
        raise CorruptImage(f"block allocation table too small ({hdr.max_table_entries} "
                           f"entries of {bs} bytes for {virtual_size} bytes)",
                           path=path, offset=at + 28)
    if hdr.max_table_entries > S.MAX_TABLE_ENTRIES or hdr.max_table_entries * 4 > MAX_BAT_BYTES:
        raise LimitExceeded(f"Max Table Entries too large ({hdr.max_table_entries})",
                            path=path, limit="max_table_entries")
    if len(raw) < S.DYNAMIC_HEADER_SIZE:
        raise TruncatedImage(f"dynamic disk header at {at} is cut by the end of the file",
                             path=path, offset=at)
    if not S.dynamic_checksum_ok(raw):
        raise CorruptImage("incorrect dynamic disk header checksum", path=path, offset=at)
    bat_bytes = hdr.max_table_entries * 4
    if hdr.table_offset > host.size or bat_bytes > host.size - hdr.table_offset:
        raise TruncatedImage(f"block allocation table ({bat_bytes} bytes at "
                             f"{hdr.table_offset}) lies past the end of the file",
                             path=path, offset=hdr.table_offset)
    return hdr


def _highest_entry(bat: array[int], step: int) -> int | None:
    """The largest BAT entry in use (None: no block is allocated).

    Run by run (``step`` apart: blocks appended in disk order), so a sparse BAT costs
    a few slice compares; a BAT whose blocks were stored in the order they were
    written has runs of one, and its rest is taken in one C-level pass instead.
    """
    top = -1
    for count, (a, b, entry) in enumerate(runs(bat, 0, len(bat), step, _GAPS, S.BAT_UNUSED), 1):
        if entry != S.BAT_UNUSED:
            top = max(top, entry + (b - a - 1) * step)
        if fragmented(count, b):
            top = max(top, max(filter(S.BAT_UNUSED.__ne__, bat[b:]), default=-1))
            break
    return top if top >= 0 else None


class VpcReader(ImageReader):
    format_name = "vpc"

    def __init__(self, path: str, options: OpenOptions | None = None) -> None:
        self.path = path
        self.options = options or OpenOptions()
        self.host = HostFile(path)
        #: set when the parent of a differencing disk cannot be located (engine/chain.py
        #: raises it when asked to follow the chain)
        self.missing_parent: BackingChainError | None = None
        self.locators: list[Locator] = []
        self._bitmaps: OrderedDict[int, list[tuple[int, int, bool]]] = OrderedDict()
        self._lock = threading.Lock()
        try:
            self.footer, self.dynamic = read_footer(self.host)
            self.differencing = self.footer.disk_type == S.DISK_TYPE_DIFFERENCING
            self.virtual_size = self.footer.guest_size()
            if self.virtual_size > S.MAX_SECTORS * S.SECTOR:
                raise LimitExceeded(f"disk size {self.virtual_size} is beyond 2040 GiB",
                                    path=path, limit="VHD_MAX_SECTORS")
            self.header: S.DynamicHeader | None = None
            #: the BAT as host-order integers (sector numbers, BAT_UNUSED for none)
            self.bat: array[int] | None = None
            self.block_step = 0
            self.block_size = 0
            self.bitmap_size = 0
            if self.dynamic:
                self._open_dynamic()
            elif self.virtual_size > self.host.size - S.FOOTER_SIZE:
                raise TruncatedImage(
                    f"fixed VHD of {self.virtual_size} bytes needs a file of at least "
                    f"{self.virtual_size + S.FOOTER_SIZE} bytes, it has {self.host.size}",
                    path=path, offset=self.host.size)
        except BaseException:
            self.host.close()
            raise

    def _open_dynamic(self) -> None:
        path, host = self.path, self.host
        hdr = read_dynamic_header(host, self.footer, self.virtual_size)
        bs, bat_bytes = hdr.block_size, hdr.max_table_entries * 4
        bat = tables.from_bytes(host.pread(hdr.table_offset, bat_bytes), 4, "big")
        self.header, self.block_size, self.bitmap_size = hdr, bs, hdr.bitmap_size
        #: BAT entries (sectors) from one block to the next when blocks lie back to back,
        #: each after its sector bitmap, as qemu and vmforge append them
        self.block_step = (self.bitmap_size + bs) // S.SECTOR
        top = _highest_entry(bat, self.block_step)
        if top is not None:
            # Every allocated block (bitmap + data) must lie inside the file, as qemu checks
            # ("free_data_block_offset points after the end of file").
            last = top * S.SECTOR + self.bitmap_size + bs
            if last > host.size:
                raise TruncatedImage(f"a data block ends at {last}, past the end of the file "
                                     f"({host.size} bytes): the image has been truncated",
                                     path=path, offset=top * S.SECTOR)
        self.bat = bat
        if self.differencing:
            self.locators = read_locators(host, hdr)
            self.backing, self.missing_parent = choose_parent(
                path, self.locators, hdr.parent_name, untrusted=self.options.untrusted)

    def verify_parent(self, parent: Any) -> None:
        """Called by the chain once the parent is open: it must be the disk this one was
        made from ("Parent Unique ID" = the parent footer's "Unique Id") and as large."""
        assert self.header is not None
        footer = getattr(parent, "footer", None)
        if not isinstance(footer, S.Footer):
            raise BackingChainError(f"{self.path}: parent {parent.path} is not a VHD",
                                    path=self.path)
        want, got = uuid.UUID(bytes=self.header.parent_unique_id), uuid.UUID(bytes=footer.unique_id)
        if want != got:
            raise BackingChainError(
                f"{self.path}: parent {parent.path} has unique ID {got}, but this differencing "
                f"disk was made from {want}", path=self.path,
                hint="the parent was replaced or rebuilt; find the original parent")
        if parent.virtual_size != self.virtual_size:
            raise BackingChainError(
                f"{self.path}: parent {parent.path} is {parent.virtual_size} bytes, this "
                f"differencing disk {self.virtual_size}", path=self.path)

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        if start >= end:
            return
        if not self.dynamic:
            # Fixed: the data is the file itself; file-system holes read as zeros, and
            # qemu's map shows them as data that is zero (the raw layer answers).
            for s, e, is_data in file_data_runs(self.host.fd, start, end):
                yield Extent(s, e - s, ExtentKind.DATA, host_offset=s, hole=not is_data)
            return
        yield from self._dynamic_extents(start, end)

    def _dynamic_extents(self, start: int, end: int) -> Iterator[Extent]:
        assert self.bat is not None
        bs, step = self.block_size, self.block_step
        first, last = start // bs, (end - 1) // bs + 1
        for a, b, entry in runs(self.bat, first, last, step, _GAPS, S.BAT_UNUSED):
            if entry == S.BAT_UNUSED:
                g_start, g_end = max(start, a * bs), min(end, b * bs)
                # qemu reports unallocated blocks of a dynamic disk as known zeros
                # (BDRV_BLOCK_ZERO); in a differencing disk the parent answers
                kind = ExtentKind.UNALLOCATED if self.differencing else ExtentKind.ZERO
                yield Extent(g_start, g_end - g_start, kind)
                continue
            # blocks back to back on the host are still one extent each: the next
            # block's sector bitmap lies between two blocks' data
            for index in range(a, b):
                yield from self._block_extents(index, entry + (index - a) * step, start, end)

    def _block_extents(self, index: int, entry: int, start: int, end: int) -> Iterator[Extent]:
        """Extents of the allocated block ``index`` (at BAT ``entry``), clipped."""
        block_start = index * self.block_size
        g_start = max(start, block_start)
        g_end = min(end, block_start + self.block_size)
        data = entry * S.SECTOR + self.bitmap_size
        if not self.differencing:
            yield Extent(g_start, g_end - g_start, ExtentKind.DATA,
                         host_offset=data + (g_start - block_start))
            return
        for s, e, present in self._sector_runs(entry):
            s, e = max(s + block_start, g_start), min(e + block_start, g_end)
            if s >= e:
                continue
            if present:
                yield Extent(s, e - s, ExtentKind.DATA, host_offset=data + (s - block_start))
            else:
                yield Extent(s, e - s, ExtentKind.UNALLOCATED)

    def _sector_runs(self, entry: int) -> list[tuple[int, int, bool]]:
        """(start, end, present) byte runs inside a block from its sector bitmap.

        Bit 7 of byte 0 is the block's first sector ("Data block sector bitmap";
        VirtualBox and Xen's libvhd read the most significant bit first).
        """
        with self._lock:
            found = self._bitmaps.get(entry)
            if found is not None:
                self._bitmaps.move_to_end(entry)
                return found
        sectors = self.block_size // S.SECTOR
        raw = self.host.pread(entry * S.SECTOR, -(-sectors // 8))
        found = [(a * S.SECTOR, b * S.SECTOR, present)
                 for a, b, present in tables.bit_runs(raw, 0, sectors, "big")]
        with self._lock:
            self._bitmaps[entry] = found
            if len(self._bitmaps) > _BITMAP_CACHE:
                self._bitmaps.popitem(last=False)
        return found

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert extent.host_offset is not None
        self.host.preadinto(buf, extent.host_offset)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        if extent.reads_zero and not extent.hole:
            return None  # zero by metadata: the host bytes may hold anything
        return self.host

    def info(self) -> ImageInfo:
        info = ImageInfo(filename=self.path, format="vpc", virtual_size=self.virtual_size,
                         actual_size=self.host.allocated,
                         cluster_size=self.block_size if self.dynamic else None)
        if self.differencing and self.header is not None:
            # shown as qemu-img shows a qcow2 overlay; the VHD specifics under format-specific
            if self.backing is not None:
                info.backing_filename = self.backing.filename
                info.backing_format = self.backing.format
                if not self.options.untrusted and self.missing_parent is None:
                    info.full_backing_filename = resolve_backing_path(self.path,
                                                                      self.backing.filename)
            info.format_specific = {"type": "vpc", "data": {
                "disk-type": "differencing",
                "parent-unique-id": str(uuid.UUID(bytes=self.header.parent_unique_id)),
                "parent-time-stamp": self.header.parent_time_stamp + S.TIMESTAMP_BASE,
                "parent-name": self.header.parent_name,
                "parent-locators": "; ".join(f"{loc.code} {loc.text}".rstrip()
                                             for loc in self.locators),
            }}
        return info

    def close(self) -> None:
        self.host.close()
