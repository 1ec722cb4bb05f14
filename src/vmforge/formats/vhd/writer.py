"""Writing fixed and dynamic VHD files the way qemu-img lays them out.

Dynamic: footer copy (0), dynamic disk header (512), BAT (1536, padded to a sector),
then 2 MiB blocks appended in the order they are first written, each behind a 512-byte
sector bitmap with every bit set (as qemu does: the whole block is then stored data),
and the footer last. Fixed: the guest bytes, then the footer.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np

from ...errors import OutputError
from ...util.fileio import pwrite_all, zero_range
from ..base import ImageWriter
from . import structs as S

BAT_OFFSET = 3 * S.SECTOR  # after the footer copy and the 1024-byte dynamic header


def make_footer(size: int, chs: tuple[int, int, int], disk_type: int, force_size: bool) -> S.Footer:
    """The footer qemu-img writes: creator "qemu" sized by CHS, or "qem2" by current_size."""
    return S.Footer(
        cookie=S.COOKIE, features=S.FEATURES_RESERVED, file_format_version=S.FILE_FORMAT_VERSION,
        data_offset=S.SECTOR if disk_type == S.DISK_TYPE_DYNAMIC else S.NO_OFFSET,
        time_stamp=max(0, int(time.time()) - S.TIMESTAMP_BASE) & 0xFFFFFFFF,
        creator_application=b"qem2" if force_size else b"qemu",
        creator_version=0x00050003,  # what qemu writes: Virtual PC 2007 (5.3)
        creator_host_os=b"Wi2k", original_size=size, current_size=size,
        cylinders=chs[0], heads=chs[1], sectors_per_track=chs[2], disk_type=disk_type,
        checksum=0, unique_id=uuid.uuid4().bytes, saved_state=0)


class _VpcWriter(ImageWriter):
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

    def write(self, offset: int, data: bytes | memoryview) -> None:
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
        self.bat = np.full(entries, S.BAT_UNUSED, dtype=np.uint32)
        bat_bytes = -(-entries * 4 // S.SECTOR) * S.SECTOR
        self.next_block = BAT_OFFSET + bat_bytes  # where the next block's bitmap goes
        # every bit set: all sectors of an allocated block hold data (spec "Data Blocks")
        self.bitmap = b"\xff" * self.bitmap_size

    def _block_host(self, index: int) -> int:
        """Host offset of block ``index``'s data, allocating the block if it is new."""
        entry = int(self.bat[index])
        if entry == S.BAT_UNUSED:
            at = self.next_block
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

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data).cast("B")
        bs = self.block_size
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
        bat = self.bat.astype(">u4").tobytes()
        pad = -len(bat) % S.SECTOR
        pwrite_all(self.fd, self.footer, 0)
        pwrite_all(self.fd, self.header.sealed(), S.SECTOR)
        # unused tail entries of the BAT's last sector are 0xFF, as qemu leaves them
        pwrite_all(self.fd, bat + b"\xff" * pad, BAT_OFFSET)
        pwrite_all(self.fd, self.footer, self.next_block)
        os.ftruncate(self.fd, self.next_block + S.FOOTER_SIZE)
        self._close()
