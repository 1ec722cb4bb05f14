"""Writing fixed, dynamic and differencing VHD files.

Dynamic (qemu-img's layout): footer copy (0), dynamic disk header (512), BAT (1536,
padded to a sector), then 2 MiB blocks appended in the order they are first written,
each behind a 512-byte sector bitmap with every bit set (as qemu does: the whole block
is then stored data), and the footer last. Fixed: the guest bytes, then the footer.
Differencing (qemu-img cannot write these; the layout is VirtualBox's, which Hyper-V
accepts): as dynamic, with the parent locators' data between the BAT and the first
block, and sector bitmaps with only the sectors written here set, so the others fall
through to the parent.

The BAT is an ``array.array`` and a block's sector bitmap, while kept in memory, one
byte per sector (util.tables): writing a VHD needs no numpy.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace

from ...errors import OutputError
from ...util import tables
from ...util.fileio import WriteData, byte_view, pwrite_all, zero_range
from ..base import ImageWriter
from . import structs as S
from .parent import ParentLink

BAT_OFFSET = 3 * S.SECTOR  # after the footer copy and the 1024-byte dynamic header
#: a block's data starts on a multiple of this (see _block_host)
DATA_ALIGN = 4096
#: blocks whose exact sector bitmaps are held in memory before the oldest is written out
_TRACKED_BLOCKS = 256


def make_footer(size: int, chs: tuple[int, int, int], disk_type: int, force_size: bool) -> S.Footer:
    """The footer qemu-img writes: creator "qemu" sized by CHS, or "qem2" by current_size."""
    return S.Footer(
        cookie=S.COOKIE, features=S.FEATURES_RESERVED, file_format_version=S.FILE_FORMAT_VERSION,
        data_offset=S.NO_OFFSET if disk_type == S.DISK_TYPE_FIXED else S.SECTOR,
        time_stamp=max(0, int(time.time()) - S.TIMESTAMP_BASE) & 0xFFFFFFFF,
        creator_application=b"qem2" if force_size else b"qemu",
        creator_version=0x00050003,  # what qemu writes: Virtual PC 2007 (5.3)
        creator_host_os=b"Wi2k", original_size=size, current_size=size,
        cylinders=chs[0], heads=chs[1], sectors_per_track=chs[2], disk_type=disk_type,
        checksum=0, unique_id=uuid.uuid4().bytes, saved_state=0)


class _VpcWriter(ImageWriter):
    accepts_spans = True  # write() only slices data and passes it to pwrite_all
    granularity = 4096  # zero detection unit, as qemu-img's default -S 4k

    def __init__(self, path: str, size: int, footer: S.Footer) -> None:
        self.path = path
        self.virtual_size = size
        self.footer = footer.sealed()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.virtual_size:
            raise OutputError(f"{self.path}: write of {length} bytes at {offset} is past the "
                              f"end of the disk ({self.virtual_size} bytes)")

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _close(self) -> None:
        os.close(self.fd)
        self.fd = -1


class FixedWriter(_VpcWriter):
    """The disk bytes, then the footer; unwritten ranges stay file-system holes."""

    def __init__(self, path: str, size: int, footer: S.Footer) -> None:
        super().__init__(path, size, footer)
        try:
            os.ftruncate(self.fd, size + S.FOOTER_SIZE)
        except OSError as err:
            self.abort()
            raise OutputError(f"{path}: cannot size the file: {err.strerror}") from None

    def write(self, offset: int, data: WriteData) -> None:
        self._check_range(offset, len(data))
        pwrite_all(self.fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        zero_range(self.fd, offset, length)

    def finish(self) -> None:
        pwrite_all(self.fd, self.footer, self.virtual_size)
        self._close()


class DynamicWriter(_VpcWriter):
    """Blocks allocated on first write, appended; tables and footers written by finish()."""

    def __init__(self, path: str, size: int, footer: S.Footer,
                 block_size: int = S.DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(path, size, footer)
        self.block_size = block_size
        entries = -(-size // block_size)
        self.header = S.DynamicHeader(
            cookie=S.DYNAMIC_COOKIE, data_offset=S.NO_OFFSET, table_offset=BAT_OFFSET,
            header_version=S.HEADER_VERSION, max_table_entries=entries,
            block_size=block_size, checksum=0)
        self.bitmap_size = self.header.bitmap_size
        self.bat = tables.filled(4, entries, S.BAT_UNUSED)
        bat_bytes = -(-entries * 4 // S.SECTOR) * S.SECTOR
        self.next_block = BAT_OFFSET + bat_bytes  # where the next block's bitmap goes
        # every bit set: all sectors of an allocated block hold data (spec "Data Blocks")
        self.bitmap = b"\xff" * self.bitmap_size
        self.sectors_per_block = block_size // S.SECTOR
        # block index -> one byte (0 or 1) per sector, for blocks whose sector bitmap is
        # being kept exact (differencing disks; partly-marked blocks of existing dynamic
        # disks)
        self.present: dict[int, bytearray] = {}
        #: False while no block can need exact bitmaps (a new dynamic disk)
        self._may_track = False

    def _tracks(self, index: int) -> bool:
        """Whether writes into block ``index`` must set its sector bitmap bits."""
        return False

    def _mark(self, offset: int, length: int) -> None:
        """Set the sector bitmap bits of a write, for blocks whose bitmap is kept exact."""
        if offset % S.SECTOR or length % S.SECTOR:
            raise OutputError(f"{self.path}: a differencing VHD stores whole sectors; a write "
                              f"of {length} bytes at {offset} is not sector-aligned")
        bs = self.block_size
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, bs)
            n = min(end - offset, bs - inner)
            if self._tracks(index):
                bits = self.present.get(index)
                if bits is None:
                    bits = self.present[index] = self._stored_bits(index)
                    if len(self.present) > _TRACKED_BLOCKS:  # keep memory flat
                        self._evict()
                lo, hi = inner // S.SECTOR, (inner + n) // S.SECTOR
                bits[lo:hi] = b"\x01" * (hi - lo)  # (as long as the slice: stays spb long)
            offset += n

    def _stored_bits(self, index: int) -> bytearray:
        """The sector bitmap of block ``index`` as on disk, one byte (0 or 1) per sector
        (all clear for a new block)."""
        entry = self.bat[index]
        if entry == S.BAT_UNUSED:
            return bytearray(self.sectors_per_block)
        raw = os.pread(self.fd, -(-self.sectors_per_block // 8), entry * S.SECTOR)
        # spec "Block Bitmap": the most significant bit of byte 0 is the block's sector 0
        bits = tables.unpack_bits(raw, "big")
        del bits[self.sectors_per_block:]
        return bits

    def _evict(self) -> None:
        """Write out the oldest tracked bitmap of a block already in the file."""
        for index in self.present:
            if int(self.bat[index]) != S.BAT_UNUSED:  # (a block being marked is not yet)
                self._store_bits(index)
                return

    def _store_bits(self, index: int) -> None:
        bits = self.present.pop(index)
        packed = tables.pack_bits(bits, "big")  # most significant bit = first sector
        pwrite_all(self.fd, packed + bytes(self.bitmap_size - len(packed)),
                   int(self.bat[index]) * S.SECTOR)

    def _store_all_bits(self) -> None:
        for index in list(self.present):
            self._store_bits(index)

    def flush_before(self, offset: int) -> None:
        for index in [i for i in self.present if (i + 1) * self.block_size <= offset]:
            self._store_bits(index)

    def _block_host(self, index: int) -> int:
        """Host offset of block ``index``'s data, allocating the block if it is new."""
        entry = int(self.bat[index])
        if entry == S.BAT_UNUSED:
            # the bitmap goes where the data after it starts on a 4 KiB boundary: page
            # cache pages and file-system blocks then line up with the data, and copies
            # into it pay for no partial pages (the gap before is a hole; the BAT entry
            # may be any sector, spec "Block Allocation Table")
            at = -(-(self.next_block + self.bitmap_size) // DATA_ALIGN) * DATA_ALIGN \
                - self.bitmap_size
            if at // S.SECTOR > 0xFFFFFFFE:
                raise OutputError(f"{self.path}: the VHD file would exceed what its "
                                  "32-bit sector offsets can address")
            pwrite_all(self.fd, self.bitmap, at)
            self.bat[index] = at // S.SECTOR
            self.next_block = at + self.bitmap_size + self.block_size
            # the block's data area stays a hole until written: it reads as zeros
            os.ftruncate(self.fd, self.next_block)
            entry = at // S.SECTOR
        return entry * S.SECTOR + self.bitmap_size

    def write(self, offset: int, data: WriteData) -> None:
        self._check_range(offset, len(data))
        view = byte_view(data)
        bs = self.block_size
        if self.present or self._may_track:
            self._mark(offset, len(view))
        while len(view):
            index, inner = divmod(offset, bs)
            n = min(len(view), bs - inner)
            pwrite_all(self.fd, view[:n], self._block_host(index) + inner)
            view = view[n:]
            offset += n

    def write_zeroes(self, offset: int, length: int) -> None:
        # Unallocated blocks already read as zeros and there is no backing file to hide;
        # only blocks that hold data need their bytes cleared.
        self._check_range(offset, length)
        bs = self.block_size
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, bs)
            n = min(end - offset, bs - inner)
            if int(self.bat[index]) != S.BAT_UNUSED:
                zero_range(self.fd, self._block_host(index) + inner, n)
            offset += n

    def finish(self) -> None:
        bat = tables.to_bytes(self.bat, "big")
        pad = -len(bat) % S.SECTOR
        pwrite_all(self.fd, self.footer, 0)
        pwrite_all(self.fd, self.header.sealed(), S.SECTOR)
        # unused tail entries of the BAT's last sector are 0xFF, as qemu leaves them
        pwrite_all(self.fd, bat + b"\xff" * pad, BAT_OFFSET)
        pwrite_all(self.fd, self.footer, self.next_block)
        os.ftruncate(self.fd, self.next_block + S.FOOTER_SIZE)
        self._close()


class DifferencingWriter(DynamicWriter):
    """A differencing disk on ``link``'s parent: sector-exact bitmaps, locators, parent ID.

    Writes must be whole sectors (a partial sector would need the parent's bytes for
    the rest); ``granularity`` 512 makes the copy engine send exactly the sectors the
    source's top layer holds.
    """

    granularity = S.SECTOR

    def __init__(self, path: str, size: int, footer: S.Footer, link: ParentLink) -> None:
        super().__init__(path, size, footer)
        entries: list[S.ParentLocator] = []
        self.locator_data: list[tuple[int, bytes]] = []
        at = self.next_block  # right after the BAT
        for code, data in link.locator_data():
            # "Platform Data Space" in bytes, as Virtual PC, Hyper-V and VirtualBox store it
            space = max(S.SECTOR, -(-len(data) // S.SECTOR) * S.SECTOR)
            entries.append(S.ParentLocator(platform_code=code, platform_data_space=space,
                                           platform_data_length=len(data),
                                           platform_data_offset=at))
            self.locator_data.append((at, data))
            at += space
        self.next_block = at
        self.header = replace(
            self.header, parent_unique_id=link.unique_id, parent_time_stamp=link.time_stamp,
            parent_unicode_name=link.unicode_name(),
            parent_locator_entries=tuple(entries) + (S.ParentLocator(),) * (
                S.LOCATOR_COUNT - len(entries)))
        # an allocated block starts with no sector of its own: every bit clear
        self.bitmap = bytes(self.bitmap_size)
        self._may_track = True

    def _tracks(self, index: int) -> bool:
        return True

    def write_zeroes(self, offset: int, length: int) -> None:
        # zeros here must hide whatever the parent holds: the sectors become this file's
        self._check_range(offset, length)
        self._mark(offset, length)
        bs = self.block_size
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, bs)
            n = min(end - offset, bs - inner)
            was_new = int(self.bat[index]) == S.BAT_UNUSED
            host = self._block_host(index)
            if not was_new:  # a new block's data area is still a hole, reading zeros
                zero_range(self.fd, host + inner, n)
            offset += n

    def finish(self) -> None:
        for at, data in self.locator_data:
            pwrite_all(self.fd, data, at)
        self._store_all_bits()
        super().finish()
