"""Reading Parallels images: header validation, the BAT, extents.

Every header field is checked against qemu's rules (block/parallels.c parallels_open),
fixed caps and the file size before the BAT is allocated. Where qemu is lenient with
hostile input (a BAT past the end of the file reads as zeros there), vmforge refuses.
Clusters past the end of the file are refused when read (TruncatedImage); qemu reads
zeros there. The Format Extension (dirty bitmaps) carries no guest data and is ignored.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ...errors import CorruptImage, FormatMismatch, LimitExceeded, TruncatedImage
from ...model import Extent, ExtentKind
from ...model.info import ImageInfo
from ..base import ByteSource, HostFile, ImageReader, OpenOptions
from . import structs as S


def read_header(host: ByteSource) -> S.Header:
    """Parse and validate the header of ``host``.

    Raises TruncatedImage, FormatMismatch, CorruptImage or LimitExceeded.
    """
    path = host.path
    head = host.pread_upto(0, S.HEADER_SIZE)
    if len(head) < S.HEADER_SIZE:
        raise TruncatedImage(f"file is {len(head)} bytes, too short for a Parallels header",
                             path=path)
    h = S.Header.unpack(head)
    if h.magic not in (S.MAGIC_V1, S.MAGIC_V2) or h.version != S.VERSION:
        raise FormatMismatch("not a Parallels image (bad magic or version)", path=path)
    if h.tracks == 0:
        raise CorruptImage("invalid image: zero sectors per track (cluster size)",
                           path=path, offset=28)
    if h.tracks > S.MAX_TRACKS:
        raise LimitExceeded(f"cluster size of {h.tracks} sectors exceeds the maximum "
                            f"{S.MAX_TRACKS}", path=path, limit="tracks")
    if h.bat_entries > S.MAX_BAT_ENTRIES:
        raise LimitExceeded(f"BAT of {h.bat_entries} entries exceeds the maximum "
                            f"{S.MAX_BAT_ENTRIES}", path=path, limit="bat_entries")
    if h.total_sectors * S.SECTOR_SIZE > S.MAX_VIRTUAL_SIZE:
        raise LimitExceeded(f"disk size of {h.total_sectors} sectors does not fit a signed "
                            "64-bit offset", path=path, limit="nb_sectors")
    bat_end = S.HEADER_SIZE + h.bat_entries * 4
    if bat_end > host.size:
        raise TruncatedImage(f"BAT of {h.bat_entries} entries runs past the end of the file "
                             f"({host.size} bytes)", path=path, offset=S.HEADER_SIZE)
    return h


def read_bat(host: HostFile, h: S.Header) -> np.ndarray:
    """The BAT as a little-endian uint32 array (size validated by read_header)."""
    raw = host.pread(S.HEADER_SIZE, h.bat_entries * 4)
    return np.frombuffer(raw, dtype="<u4")


class ParallelsReader(ImageReader):
    format_name = "parallels"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.path = path
        self.host = HostFile(path)
        try:
            self.header = read_header(self.host)
            self.bat = read_bat(self.host, self.header)
        except BaseException:
            self.host.close()
            raise
        h = self.header
        self.virtual_size = h.total_sectors * S.SECTOR_SIZE
        self.cluster_size = h.tracks * S.SECTOR_SIZE
        self.unit = h.entry_unit

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        if start >= end:
            return
        cs = self.cluster_size
        first, last = start // cs, -(-end // cs)
        # Past the BAT nothing is allocated: one extent, whatever the (hostile) disk
        # size claims, so memory follows the BAT and never the virtual size.
        covered = min(last, len(self.bat))
        if covered * cs < end:
            tail = max(start, covered * cs)
            yield from self._bat_extents(start, min(end, tail), first, covered)
            yield Extent(tail, end - tail, ExtentKind.UNALLOCATED)
            return
        yield from self._bat_extents(start, end, first, last)

    def _bat_extents(self, start: int, end: int, first: int, last: int) -> Iterator[Extent]:
        """Extents of guest clusters ``[first, last)`` (all inside the BAT), clipped."""
        if start >= end:
            return
        cs = self.cluster_size
        # the table classified at once with numpy: a run breaks where allocation changes
        # or data stops being contiguous on the host (qemu's block_status merges those)
        entries = self.bat[first:last].astype(np.uint64)
        hosts = entries * np.uint64(self.unit)
        allocated = entries != 0
        brk = np.ones(len(hosts), dtype=bool)
        if len(hosts) > 1:
            same = allocated[1:] == allocated[:-1]
            contiguous = hosts[1:] == hosts[:-1] + np.uint64(cs)
            brk[1:] = ~(same & (~allocated[1:] | contiguous))
        starts = np.flatnonzero(brk).tolist()
        for i, a in enumerate(starts):
            b = starts[i + 1] if i + 1 < len(starts) else len(hosts)
            g_start = max(start, (first + a) * cs)
            g_end = min(end, (first + b) * cs)
            if not allocated[a]:
                yield Extent(g_start, g_end - g_start, ExtentKind.UNALLOCATED)
            else:
                host = int(hosts[a]) + (g_start - (first + a) * cs)
                yield Extent(g_start, g_end - g_start, ExtentKind.DATA, host_offset=host)

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert extent.host_offset is not None
        self.host.preadinto(buf, extent.host_offset)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        if extent.reads_zero and not extent.hole:
            return None  # zero by metadata: the host bytes may hold anything
        return self.host

    def info(self) -> ImageInfo:
        # qemu 7.2 has no bdrv_get_info for parallels: no cluster-size, no dirty-flag
        return ImageInfo(filename=self.path, format="parallels",
                         virtual_size=self.virtual_size, actual_size=self.host.allocated,
                         dirty=None)

    @property
    def dirty(self) -> bool:
        """The image was left open read-write (qemu opens it read-only only)."""
        return self.header.inuse == S.INUSE_MAGIC

    def close(self) -> None:
        self.host.close()
