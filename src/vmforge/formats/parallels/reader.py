"""Reading Parallels images: header validation, the BAT, extents.

Every header field is checked against qemu's rules (block/parallels.c parallels_open),
fixed caps and the file size before the BAT is allocated. Where qemu is lenient with
hostile input (a BAT past the end of the file reads as zeros there), vmforge refuses.
Clusters past the end of the file are refused when read (TruncatedImage); qemu reads
zeros there. The Format Extension (dirty bitmaps) carries no guest data and is ignored.
The BAT is an ``array.array`` walked run by run (table_runs.py): no numpy.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from ...errors import CorruptImage, FormatMismatch, LimitExceeded, TruncatedImage
from ...model import Extent, ExtentKind
from ...model.info import ImageInfo
from ...util import tables
from ..base import ByteSource, HostFile, ImageReader, OpenOptions
from ..table_runs import runs
from . import structs as S

#: a BAT entry of 0: the cluster is not allocated (parallels.txt, the BAT; bat2sect)
_GAPS = (0,)
#: BAT entries are 32-bit: a run of contiguous clusters ends below this
_ENTRY_LIMIT = 1 << 32


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


def read_bat(host: HostFile, h: S.Header) -> array[int]:
    """The BAT as host-order integers (size validated by read_header)."""
    return tables.from_bytes(host.pread(S.HEADER_SIZE, h.bat_entries * 4), 4, "little")


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
        # a run breaks where allocation changes or data stops being contiguous on the
        # host (qemu's block_status merges those); the entry unit divides the cluster
        step = cs // self.unit
        for a, b, entry in runs(self.bat, first, last, step, _GAPS, _ENTRY_LIMIT):
            g_start = max(start, a * cs)
            g_end = min(end, b * cs)
            if not entry:
                yield Extent(g_start, g_end - g_start, ExtentKind.UNALLOCATED)
            else:
                host = entry * self.unit + (g_start - a * cs)
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
