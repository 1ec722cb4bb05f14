"""Reading fixed and dynamic VHD files as extents.

Everything a header says is checked against the file size and QEMU's caps before any
table is allocated. Reads follow QEMU 7.2 (block/vpc.c): an allocated block reads as
stored data whatever its sector bitmap says, an unallocated one as zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from ...errors import CorruptImage, LimitExceeded, TruncatedImage, UnsupportedFeature
from ...model import Extent, ExtentKind
from ...model.info import ImageInfo
from ..base import HostFile, ImageReader, OpenOptions, file_data_runs
from . import structs as S

#: our cap on the BAT (bytes) on top of qemu's INT_MAX/4 entries: 2040 GiB in 32 KiB
#: blocks; the BAT must also fit in the file, so memory never exceeds the file's size
MAX_BAT_BYTES = 256 << 20


def read_footer(host: HostFile) -> tuple[S.Footer, bool]:
    """The footer and whether the disk is dynamic (footer copy at offset 0) or fixed.

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
    if footer.disk_type == S.DISK_TYPE_DIFFERENCING:
        raise UnsupportedFeature("VHD differencing disks", path=path,
                                 detail="only fixed and dynamic VHDs are read")
    want = S.DISK_TYPE_DYNAMIC if dynamic else S.DISK_TYPE_FIXED
    if footer.disk_type != want:
        where = "at offset 0" if dynamic else "at the end of the file"
        raise CorruptImage(f"VHD footer {where} has disk type {footer.disk_type}, "
                           f"expected {want}", path=path, offset=at)
    return footer, dynamic


class VpcReader(ImageReader):
    format_name = "vpc"

    def __init__(self, path: str, options: OpenOptions | None = None) -> None:
        self.path = path
        self.host = HostFile(path)
        try:
            self.footer, self.dynamic = read_footer(self.host)
            self.virtual_size = self.footer.guest_size()
            if self.virtual_size > S.MAX_SECTORS * S.SECTOR:
                raise LimitExceeded(f"disk size {self.virtual_size} is beyond 2040 GiB",
                                    path=path, limit="VHD_MAX_SECTORS")
            self.header: S.DynamicHeader | None = None
            self.bat: np.ndarray | None = None
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
        path, host, footer = self.path, self.host, self.footer
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
        if self.virtual_size // bs > 0xFFFFFFFF:
            raise LimitExceeded("too many blocks", path=path, limit="blocks")
        if hdr.max_table_entries * bs < self.virtual_size:
            raise CorruptImage(f"block allocation table too small ({hdr.max_table_entries} "
                               f"entries of {bs} bytes for {self.virtual_size} bytes)",
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
        bat = np.frombuffer(host.pread(hdr.table_offset, bat_bytes), dtype=">u4").astype(np.uint32)
        self.header, self.block_size, self.bitmap_size = hdr, bs, hdr.bitmap_size
        used = bat[bat != S.BAT_UNUSED]
        if used.size:
            # Every allocated block (bitmap + data) must lie inside the file, as qemu checks
            # ("free_data_block_offset points after the end of file").
            last = int(used.max()) * S.SECTOR + self.bitmap_size + bs
            if last > host.size:
                raise TruncatedImage(f"a data block ends at {last}, past the end of the file "
                                     f"({host.size} bytes): the image has been truncated",
                                     path=path, offset=int(used.max()) * S.SECTOR)
        self.bat = bat

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
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs + 1
        entries = self.bat[first:last]
        i = 0
        n = last - first
        while i < n:
            g_start = max(start, (first + i) * bs)
            if entries[i] == S.BAT_UNUSED:
                j = i + 1
                while j < n and entries[j] == S.BAT_UNUSED:
                    j += 1
                g_end = min(end, (first + j) * bs)
                # qemu reports unallocated blocks as known zeros (BDRV_BLOCK_ZERO)
                yield Extent(g_start, g_end - g_start, ExtentKind.ZERO)
                i = j
                continue
            g_end = min(end, (first + i + 1) * bs)
            host = int(entries[i]) * S.SECTOR + self.bitmap_size + (g_start - (first + i) * bs)
            yield Extent(g_start, g_end - g_start, ExtentKind.DATA, host_offset=host)
            i += 1

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert extent.host_offset is not None
        self.host.preadinto(buf, extent.host_offset)

    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path, format="vpc", virtual_size=self.virtual_size,
                         actual_size=self.host.allocated,
                         cluster_size=self.block_size if self.dynamic else None)

    def close(self) -> None:
        self.host.close()
