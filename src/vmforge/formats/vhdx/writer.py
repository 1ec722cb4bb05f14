"""Writing fixed, dynamic and differencing VHDX files in QEMU 7.2's layout.

    0       file identifier ("vhdxfile", creator), headers at 64/128 KiB, region tables
            at 192/256 KiB (all in the 1 MiB header section)
    1 MiB   log (log_size, left empty: the file is written whole, never journalled)
    then    BAT (whole MiBs), metadata region (1 MiB), 4 MiB spare as qemu leaves it,
            then payload blocks: in guest order for fixed disks, appended in the order
            they are first written for dynamic and differencing disks, and last the
            sector bitmap blocks of a differencing disk.

The file ends on a 1 MiB boundary (2.1). Both headers get a CRC-32C; the second has
the higher sequence number. Unwritten blocks are ZERO (block_state_zero=on, QEMU's
default) or NOT_PRESENT; in a differencing disk they are always NOT_PRESENT (the
parent shows through), and a block only partly written is PARTIALLY_PRESENT with its
written sectors set in the chunk's sector bitmap.

The BAT is an ``array.array`` of host-order entries (util.tables), written
little-endian: writing a VHDX needs no numpy.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass

from ...engine.chain import resolve_backing_path
from ...errors import OptionError, OutputError
from ...util import tables
from ...util.fileio import WriteData, byte_view, pwrite_all, zero_range
from ..base import BackingRef, ImageWriter, OpenOptions
from . import structs as S

SECTOR = 512  # logical and physical sector size written, as qemu-img writes them
LOG_OFFSET = S.HEADER_SECTION_SIZE
SPARE_AFTER_METADATA = 4 * S.MiB  # qemu: data starts 5 MiB after the BAT ends
CREATOR = "vmforge"
#: payload states that read as zeros even in a differencing disk (the reader's view): a
#: block allocated over one of them must keep every sector, or the parent would show
HIDING_STATES = (S.PAYLOAD_BLOCK_UNDEFINED, S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_UNMAPPED,
                 S.PAYLOAD_BLOCK_UNMAPPED_V095)


@dataclass(frozen=True, slots=True)
class ParentInfo:
    """What a differencing disk records about its parent."""

    data_write_guid: bytes
    relative_path: str
    absolute_path: str

    def locator(self) -> S.ParentLocator:
        entries = {
            "parent_linkage": S.guid_str(self.data_write_guid),
            "relative_path": self.relative_path.replace("/", "\\"),
            "absolute_win32_path": self.absolute_path.replace("/", "\\"),
        }
        return S.ParentLocator(S.VHDX_PARENT_LOCATOR_TYPE, entries)


def parent_info(path: str, backing: BackingRef) -> tuple[ParentInfo, int]:
    """What a differencing disk at ``path`` records about ``backing``, and the parent's size.

    The parent must be a VHDX file: its DataWriteGuid becomes the child's parent_linkage.
    """
    if backing.format != "vhdx":
        raise OptionError("a VHDX differencing disk needs a VHDX parent", option="backing_fmt",
                          hint="convert the parent to vhdx first, or use -O qcow2")
    from .reader import VhdxReader

    target = resolve_backing_path(path, backing.filename)
    parent = VhdxReader(target, OpenOptions())
    try:
        size, guid = parent.virtual_size, parent.header.data_write_guid
    finally:
        parent.close()
    absolute = os.path.abspath(target)
    relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(path)))
    return ParentInfo(guid, relative, absolute), size


def _align(n: int, to: int = S.MiB) -> int:
    return -(-n // to) * to


class VhdxWriter(ImageWriter):
    accepts_spans = True  # write() only slices data and passes it to pwrite_all
    granularity = 4096

    def __init__(self, path: str, size: int, *, block_size: int, log_size: int, fixed: bool,
                 zero_state: bool, parent: ParentInfo | None = None) -> None:
        self.path = path
        self.virtual_size = size
        self.block_size = block_size
        self.log_size = log_size
        self.fixed = fixed
        self.parent = parent
        self.sector = SECTOR
        self.ratio = S.chunk_ratio(block_size, SECTOR)
        self.blocks, entries = S.bat_entry_count(size, block_size, SECTOR, parent is not None)
        self.bat_offset = _align(LOG_OFFSET + log_size)
        # qemu counts the entries of an empty disk in 32 bits as 0 + (0 - 1) / chunk ratio
        # and refuses a BAT region smaller than that, so an empty disk gets its huge BAT
        room = entries if self.blocks else 0xFFFFFFFF // self.ratio
        self.bat_length = _align(max(room, 1) * 8)
        self.meta_offset = self.bat_offset + self.bat_length
        self.data_start = self.meta_offset + S.MiB + SPARE_AFTER_METADATA
        self.bat = tables.zeros(8, entries)
        self.spb = block_size // self.sector
        #: sectors stored so far of blocks only partly written (differencing disks); the
        #: bits themselves live in the file's sector bitmap blocks, so memory stays flat
        self.counts: dict[int, int] = {}
        self.bitmaps: dict[int, int] = {}  # chunk -> file offset of its sector bitmap block
        # payload entries come in chunks of ``ratio``, each followed by a sector bitmap
        # entry (2.5): one slice per chunk
        for first in range(0, self.blocks, self.ratio):
            n = min(self.ratio, self.blocks - first)
            at = first + first // self.ratio
            if fixed:
                self.bat[at:at + n] = tables.series(
                    8, (self.data_start + first * block_size) | S.PAYLOAD_BLOCK_FULLY_PRESENT,
                    n, block_size)
            elif zero_state and parent is None:
                self.bat[at:at + n] = tables.filled(8, n, S.PAYLOAD_BLOCK_ZERO)
        self.end = self.data_start + (self.blocks * block_size if fixed else 0)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None
        try:
            os.ftruncate(self.fd, self.end)
        except OSError as err:
            self.abort()
            raise OutputError(f"{path}: cannot size the file: {err.strerror}") from None

    # -- blocks ------------------------------------------------------------------------------

    def _entry(self, blk: int) -> int:
        return self.bat[blk + blk // self.ratio]

    def _set(self, blk: int, offset: int, state: int) -> None:
        self.bat[blk + blk // self.ratio] = offset | state

    def _host(self, blk: int) -> int:
        """File offset of block ``blk``, allocating it at the end of the file if needed."""
        e = self._entry(blk)
        if e & S.BAT_STATE_MASK in (S.PAYLOAD_BLOCK_FULLY_PRESENT,
                                    S.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            return e & S.BAT_FILE_OFFSET_MASK
        self._modify(data=True)
        at = self.end
        self.end += self.block_size
        # the block reads as zeros until written: a hole, as qemu leaves it
        os.ftruncate(self.fd, self.end)
        if self.parent is None:
            self._set(blk, at, S.PAYLOAD_BLOCK_FULLY_PRESENT)
        else:
            self._set(blk, at, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            self._clear_bits(blk)
            self.counts[blk] = 0
            if e & S.BAT_STATE_MASK in HIDING_STATES:
                # the whole block hid the parent: every sector stays this file's (zeros)
                self._mark(blk, 0, min(self.block_size, self.virtual_size - blk * self.block_size))
        return at

    def _bitmap(self, chunk: int) -> int:
        """File offset of ``chunk``'s sector bitmap block, appended (all clear) if new."""
        at = self.bitmaps.get(chunk)
        if at is None:
            at = self.end
            self.end += S.SECTOR_BITMAP_SIZE
            os.ftruncate(self.fd, self.end)
            self.bitmaps[chunk] = at
            self.bat[S.sb_index(chunk, self.ratio)] = at | S.SB_BLOCK_PRESENT
        return at

    def _block_bits(self, blk: int) -> tuple[int, int]:
        """(file offset, length) of the bytes of ``blk``'s bits in its chunk's sector bitmap."""
        chunk, within = divmod(blk, self.ratio)
        # spb is a multiple of 8 (block >= 1 MiB, sector <= 4 KiB): whole bytes per block
        return self.bitmaps[chunk] + within * self.spb // 8, self.spb // 8

    def _clear_bits(self, blk: int) -> None:
        """A block newly allocated in a differencing disk starts with no sector of its own.

        An existing file may hold stale bits for a block that is not present (2.4.2 says
        they mean nothing then); they must not make parent sectors read as zeros.
        """
        if blk // self.ratio in self.bitmaps:
            at, n = self._block_bits(blk)
            pwrite_all(self.fd, bytes(n), at)

    def _mark(self, blk: int, inner: int, n: int) -> None:
        """Set the sector bitmap bits of sectors now stored in a differencing disk's block.

        2.4.2: bit k (least significant first) of the chunk's bitmap is its sector k. A
        block whose every sector is stored becomes FULLY_PRESENT (its bits stay set).
        """
        if blk not in self.counts:
            if self._entry(blk) & S.BAT_STATE_MASK != S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                return
            # a block an earlier session left partly present: count what it stores
            at, nbytes = self._block_bits(blk)
            self.counts[blk] = int.from_bytes(os.pread(self.fd, nbytes, at)).bit_count()
        sector = self.sector
        chunk, within = divmod(blk, self.ratio)
        first = within * self.spb + inner // sector
        last = within * self.spb + -(-(inner + n) // sector)
        b0, b1 = first // 8, -(-last // 8)
        at = self._bitmap(chunk) + b0
        # read as one little-endian number, bit k of the bytes is bit k of the number
        bits = int.from_bytes(os.pread(self.fd, b1 - b0, at).ljust(b1 - b0, b"\0"), "little")
        span = ((1 << (last - first)) - 1) << (first - b0 * 8)
        newly = (span & ~bits).bit_count()
        pwrite_all(self.fd, (bits | span).to_bytes(b1 - b0, "little"), at)
        self.counts[blk] += newly
        if self.counts[blk] == self.spb:
            del self.counts[blk]
            self._set(blk, self._entry(blk) & S.BAT_FILE_OFFSET_MASK,
                      S.PAYLOAD_BLOCK_FULLY_PRESENT)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        if offset < 0 or offset + length > self.virtual_size:
            raise OutputError(f"{self.path}: write of {length} bytes at {offset} is past the "
                              f"end of the disk ({self.virtual_size} bytes)")
        out = []
        end = offset + length
        while offset < end:
            blk, inner = divmod(offset, self.block_size)
            n = min(end - offset, self.block_size - inner)
            out.append((blk, inner, n))
            offset += n
        return out

    def _modify(self, *, data: bool) -> None:
        """Hook run before the file is first changed (an existing image updates its headers)."""

    def write(self, offset: int, data: WriteData) -> None:
        self._modify(data=True)
        view = byte_view(data)
        pos = 0
        for blk, inner, n in self._pieces(offset, len(view)):
            pwrite_all(self.fd, view[pos:pos + n], self._host(blk) + inner)
            self._mark(blk, inner, n)
            pos += n

    def write_zeroes(self, offset: int, length: int) -> None:
        for blk, inner, n in self._pieces(offset, length):
            state = self._entry(blk) & S.BAT_STATE_MASK
            allocated = state in (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            whole = n == min(self.block_size, self.virtual_size - blk * self.block_size)
            if not allocated:
                if self.parent is None:
                    continue  # reads as zeros already
                if whole:
                    self._modify(data=True)
                    self._set(blk, 0, S.PAYLOAD_BLOCK_ZERO)  # hides the parent's block
                    continue
            self._modify(data=True)
            zero_range(self.fd, self._host(blk) + inner, n)
            self._mark(blk, inner, n)

    # -- metadata ----------------------------------------------------------------------------

    def _metadata(self) -> bytes:
        flags = (S.PARAMS_LEAVE_BLOCKS_ALLOCATED if self.fixed else 0) | \
                (S.PARAMS_HAS_PARENT if self.parent is not None else 0)
        vd = S.META_IS_REQUIRED | S.META_IS_VIRTUAL_DISK
        items: list[tuple[bytes, int, bytes]] = [
            (S.FILE_PARAMETERS_GUID, S.META_IS_REQUIRED,
             self.block_size.to_bytes(4, "little") + flags.to_bytes(4, "little")),
            (S.VIRTUAL_DISK_SIZE_GUID, vd, self.virtual_size.to_bytes(8, "little")),
            (S.PAGE83_DATA_GUID, vd, uuid.uuid4().bytes_le),
            (S.LOGICAL_SECTOR_SIZE_GUID, vd, SECTOR.to_bytes(4, "little")),
            (S.PHYSICAL_SECTOR_SIZE_GUID, vd, SECTOR.to_bytes(4, "little")),
        ]
        if self.parent is not None:
            items.append((S.PARENT_LOCATOR_GUID, S.META_IS_REQUIRED, self.parent.locator().pack()))
        entries, blob = [], b""
        for item_id, flag, value in items:
            entries.append(S.MetadataEntry(item_id, S.METADATA_TABLE_SIZE + len(blob), len(value),
                                           flag))
            blob += value
        return S.pack_metadata_table(entries) + blob

    def finish(self) -> None:
        ident = S.FILE_SIGNATURE + CREATOR.encode("utf-16-le")
        pwrite_all(self.fd, ident, S.FILE_IDENTIFIER_OFFSET)
        seq = random.getrandbits(32)  # qemu starts from a random 32-bit number too
        first = S.Header(S.HEADER_SIGNATURE, 0, seq, uuid.uuid4().bytes_le, uuid.uuid4().bytes_le,
                         S.ZERO_GUID, S.LOG_VERSION, S.HEADER_VERSION, self.log_size, LOG_OFFSET)
        pwrite_all(self.fd, first.sealed(), S.HEADER1_OFFSET)
        second = S.Header(S.HEADER_SIGNATURE, 0, seq + 1, first.file_write_guid,
                          first.data_write_guid, S.ZERO_GUID, S.LOG_VERSION, S.HEADER_VERSION,
                          self.log_size, LOG_OFFSET)
        pwrite_all(self.fd, second.sealed(), S.HEADER2_OFFSET)
        regions = S.pack_region_table([
            S.RegionEntry(S.BAT_GUID, self.bat_offset, self.bat_length, S.REGION_REQUIRED),
            S.RegionEntry(S.METADATA_GUID, self.meta_offset, S.MiB, S.REGION_REQUIRED)])
        pwrite_all(self.fd, regions, S.REGION_TABLE1_OFFSET)
        pwrite_all(self.fd, regions, S.REGION_TABLE2_OFFSET)
        pwrite_all(self.fd, tables.to_bytes(self.bat, "little"), self.bat_offset)
        pwrite_all(self.fd, self._metadata(), self.meta_offset)
        os.ftruncate(self.fd, _align(self.end))
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
