"""The pieces a VMDK disk is made of: flat, zero and sparse extents.

Each extent covers ``[start, start+size)`` of the guest disk and turns that range into
typed Extents (data / zero / unallocated). Sparse extents (hosted "KDMV", ESX "COWD",
ESXi seSparse) look guest offsets up through a grain directory (qemu's L1) and grain
tables (L2); every size is checked against the file before anything is allocated, and
grain tables are read on demand into a small cache. Tables are ``array.array`` of
host-order integers and are scanned run by run (scan.py): reading a VMDK imports no
numpy.
"""

from __future__ import annotations

import abc
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator

from ...errors import CorruptImage, LimitExceeded, TruncatedImage, UnsupportedFeature
from ...model import Extent, ExtentKind, align_up
from ...util import tables
from ..base import ByteSource, HostFile, file_data_runs
from . import structs as S
from .scan import DATA, UNALLOC, ZERO, Run, grain_runs

SECTOR = S.SECTOR_SIZE
#: grain tables kept in memory per extent (512 entries of 4 bytes each for KDMV)
GT_CACHE = 64
#: largest virtual size accepted (qemu's int64 byte offsets)
MAX_VIRTUAL_BYTES = 1 << 62
#: a KDMV or COWD grain table entry is a 32-bit sector number
_GTE_MAX = (1 << 32) - 1
_U64 = (1 << 64) - 1
#: file offsets are off_t (int64)
_MAX_FILE_OFFSET = (1 << 63) - 1

#: compressed grains carry the extent's index in the high bits of host_offset, so the
#: engine's per-layer cache of decompressed units never mixes two extent files
COMPRESSED_INDEX_SHIFT = 48


class VmdkExtent(abc.ABC):
    """One extent of the disk; subclasses fill in the mapping."""

    #: what qemu-img info shows as the extent's "format" ("" for the image's own file)
    type_name: str = ""
    host: HostFile | None = None
    flat = False
    compressed = False
    grain_bytes = 0

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        self.index = 0

    @property
    def end(self) -> int:
        return self.start + self.size

    @abc.abstractmethod
    def iter_extents(self, start: int, end: int) -> Iterator[Extent]:
        """Extents of ``[start, end)`` (guest offsets inside this extent)."""

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert self.host is not None and extent.host_offset is not None
        offset = extent.host_offset
        if extent.compressed:
            offset &= (1 << COMPRESSED_INDEX_SHIFT) - 1
        if not 0 <= offset <= _MAX_FILE_OFFSET - len(buf):
            # a hostile seSparse grain whose offset wrapped (SESparseExtent._host); qemu
            # fails the read with EIO
            raise CorruptImage(f"grain at host offset {offset & _U64:#x} lies outside the "
                               "file", path=self.host.path)
        self.host.preadinto(buf, offset)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        """Where uncompressed grains and flat data lie as they are (see ImageReader)."""
        if extent.compressed or (extent.reads_zero and not extent.hole):
            return None
        if extent.host_offset is not None and extent.host_offset < 0:
            return None  # a wrapped seSparse offset: read_host says what is wrong
        return self.host

    def check_messages(self) -> list[str]:
        """qemu's vmdk_co_check verdict for this extent: empty when consistent."""
        return []


class ZeroExtent(VmdkExtent):
    """A descriptor "ZERO" extent: reads zeros, stores nothing."""

    type_name = "ZERO"

    def iter_extents(self, start: int, end: int) -> Iterator[Extent]:
        yield Extent(start, end - start, ExtentKind.ZERO)


class FlatExtent(VmdkExtent):
    """Guest bytes stored as they are in a file from byte ``file_offset`` on.

    qemu marks them BDRV_BLOCK_RECURSE: holes of the host file (and the part past its
    end, which qemu reads as zeros) are data that reads zero, as map shows.
    """

    type_name = "FLAT"
    flat = True

    def __init__(self, start: int, size: int, host: HostFile, file_offset: int,
                 type_name: str = "FLAT") -> None:
        super().__init__(start, size)
        self.host = host
        self.file_offset = file_offset
        self.type_name = type_name

    def iter_extents(self, start: int, end: int) -> Iterator[Extent]:
        assert self.host is not None
        h0 = self.file_offset + (start - self.start)
        for s, e, is_data in file_data_runs(self.host.fd, h0, h0 + (end - start)):
            yield Extent(start + (s - h0), e - s, ExtentKind.DATA, host_offset=s,
                         hole=not is_data)


class SparseExtent(VmdkExtent):
    """Common grain-directory walk of KDMV, COWD and seSparse extents."""

    type_name = "SPARSE"
    grain_sectors: int
    gtes_per_gt: int
    #: bytes per grain table entry (little-endian on disk)
    gte_width = S.GTE_SIZE
    gd: array[int]

    def __init__(self, start: int, size: int, host: HostFile) -> None:
        super().__init__(start, size)
        self.host = host
        self._gts: OrderedDict[int, array[int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def data_step(self) -> int:
        """What is added to a data entry (a sector number) to point at the next grain."""
        return self.grain_sectors

    # -- table access -------------------------------------------------------------
    def _load_gd(self, offset: int, entries: int, entry_size: int) -> None:
        """Read the grain directory after checking it lies inside the file."""
        assert self.host is not None
        if entries > S.MAX_L1_ENTRIES:
            raise LimitExceeded(f"L1 size too big ({entries} grain directory entries)",
                                path=self.host.path, limit="grain directory entries")
        nbytes = entries * entry_size
        if offset + nbytes > self.host.size:
            raise TruncatedImage(
                f"grain directory of {entries} entries at offset {offset} runs past the end "
                f"of the file ({self.host.size} bytes)", path=self.host.path, offset=offset)
        raw = self.host.pread(offset, nbytes) if nbytes else b""
        self.gd = tables.from_bytes(raw, entry_size, "little")

    def _gt_offset(self, gd_index: int) -> int:
        """Byte offset of grain table ``gd_index``, 0 when the table is not allocated."""
        return self.gd[gd_index] * SECTOR

    def _gt(self, gd_index: int) -> array[int] | None:
        assert self.host is not None
        offset = self._gt_offset(gd_index)
        if not offset:
            return None
        # the copy engine's worker threads walk the tables at the same time
        with self._lock:
            table = self._gts.get(offset)
            if table is not None:
                self._gts.move_to_end(offset)
                return table
        nbytes = self.gtes_per_gt * self.gte_width
        if offset + nbytes > self.host.size:
            raise TruncatedImage(
                f"grain table {gd_index} at offset {offset} runs past the end of the file "
                f"({self.host.size} bytes)", path=self.host.path, offset=offset)
        table = tables.from_bytes(self.host.pread(offset, nbytes), self.gte_width, "little")
        with self._lock:
            self._gts[offset] = table
            if len(self._gts) > GT_CACHE:
                self._gts.popitem(last=False)
        return table

    def grain_unit(self, entry: int) -> tuple[int, int]:
        """(kind, host byte offset) of a grain table entry: 0 is unallocated, any other
        value the grain's sector (qemu's rule for COWD and plain KDMV)."""
        if entry == S.GTE_UNALLOCATED:
            return UNALLOC, 0
        return DATA, entry * SECTOR

    def even_room(self, entry: int) -> int:
        """Entries of ``entry, entry + data_step, ...`` that fit the 32-bit entry."""
        return (_GTE_MAX - entry) // self.grain_sectors + 1

    def _table_runs(self, gd_index: int, first: int, last: int) -> list[Run] | None:
        """Runs (scan.grain_runs) of entries ``[first, last)`` of grain table
        ``gd_index``; None when the whole table is unallocated. Every entry of the slice
        is checked before any run is returned, as qemu-img map fails before printing."""
        if gd_index >= len(self.gd):
            assert self.host is not None
            raise CorruptImage(f"grain table {gd_index} lies beyond the grain directory",
                               path=self.host.path)
        table = self._gt(gd_index)
        if table is None:
            return None
        return list(grain_runs(self, table, first, last))

    # -- extents ------------------------------------------------------------------
    def iter_extents(self, start: int, end: int) -> Iterator[Extent]:
        """One extent per run of data grains (per grain when compressed); unallocated
        or zero runs next to each other, also across grain tables, come as one: a large
        disk qemu made has thousands of allocated but empty tables."""
        gb = self.grain_bytes
        span = gb * self.gtes_per_gt
        gap_start, gap_kind = start, -1  # the non-data run not yet yielded (-1: none)
        pos = start
        while pos < end:
            gd_index = (pos - self.start) // span
            table_start = self.start + gd_index * span
            stop = min(end, table_start + span)
            first = (pos - table_start) // gb
            last = -(-(stop - table_start) // gb)
            runs = self._table_runs(gd_index, first, last)
            for i0, i1, kind, host in runs if runs is not None else [(first, last, UNALLOC, 0)]:
                g0 = table_start + i0 * gb
                s0 = pos if pos > g0 else g0
                if kind != DATA:
                    if kind != gap_kind:
                        if gap_kind >= 0:
                            yield _gap(gap_start, s0, gap_kind)
                        gap_start, gap_kind = s0, kind
                    continue
                if gap_kind >= 0:
                    yield _gap(gap_start, s0, gap_kind)
                    gap_kind = -1
                e0 = min(stop, table_start + i1 * gb)
                if self.compressed:
                    yield self._data(s0, e0, (g0 - self.start) // gb, s0 - g0, host)
                else:
                    yield Extent(s0, e0 - s0, ExtentKind.DATA, host + (s0 - g0))
            pos = stop
        if gap_kind >= 0:
            yield _gap(gap_start, end, gap_kind)

    def _data(self, pos: int, stop: int, grain: int, inner: int, host: int) -> Extent:
        return Extent(pos, stop - pos, ExtentKind.DATA, host_offset=host + inner)

    def check_messages(self) -> list[str]:
        """Every allocated grain must start inside the extent file (qemu stops at the
        first error and reports one corruption)."""
        assert self.host is not None
        gb = self.grain_bytes
        span = gb * self.gtes_per_gt
        grains = -(-self.size // gb)
        for gd_index in range(-(-self.size // span)):
            sector = (self.start + gd_index * span) // SECTOR
            count = min(self.gtes_per_gt, grains - gd_index * self.gtes_per_gt)
            try:
                runs = self._table_runs(gd_index, 0, count)
            except CorruptImage:
                return [f"ERROR: could not get cluster_offset for sector {sector}"]
            for i0, i1, kind, host in runs or ():
                # a data run's grains lie at host, host + gb, ...: the first one at or
                # past the end of the file. qemu compares unsigned: a wrapped (negative)
                # seSparse offset is past it
                past = max(0, -(-(self.host.size - host) // gb)) if host >= 0 else 0
                if kind == DATA and i0 + past < i1:
                    sector += (i0 + past) * self.grain_sectors
                    return [f"ERROR: cluster offset for sector {sector} points after EOF"]
        return []


class HostedSparseExtent(SparseExtent):
    """A "KDMV" sparse extent: monolithicSparse, twoGbMaxExtentSparse, streamOptimized."""

    def __init__(self, start: int, host: HostFile, header: S.SparseExtentHeader) -> None:
        super().__init__(start, header.capacity * SECTOR, host)
        self.header = header
        self.grain_sectors = header.grainSize
        self.grain_bytes = header.grain_bytes
        self.gtes_per_gt = header.numGTEsPerGT
        self.compressed = header.compressed
        self.markers = header.has_markers
        self.zeroed_grain = header.has_zeroed_grain
        self._load_gd(header.gdOffset * SECTOR, header.gd_entries, S.GTE_SIZE)

    def grain_unit(self, entry: int) -> tuple[int, int]:
        if entry == S.GTE_ZEROED and self.zeroed_grain:
            return ZERO, 0
        return super().grain_unit(entry)

    def _data(self, pos: int, stop: int, grain: int, inner: int, host: int) -> Extent:
        if not self.compressed:
            return Extent(pos, stop - pos, ExtentKind.DATA, host_offset=host + inner)
        assert self.host is not None
        unit = min(self.grain_bytes, self.size - grain * self.grain_bytes)
        if self.markers:
            # GrainMarker: lba, size, then the zlib stream
            head = self.host.pread_upto(host, S.GRAIN_MARKER_SIZE)
            if len(head) < S.GRAIN_MARKER_SIZE:
                raise TruncatedImage(f"grain marker at offset {host} lies past the end of "
                                     "the file", path=self.host.path, offset=host)
            size = int.from_bytes(head[8:12], "little")
            data = host + S.GRAIN_MARKER_SIZE
        else:
            # compressed without markers: qemu inflates up to two grains' worth
            size = min(2 * self.grain_bytes, self.host.size - host)
            data = host
        if size <= 0 or size > 2 * self.grain_bytes:
            # qemu: a zero or oversized length is -EINVAL on read
            raise CorruptImage(f"compressed grain at offset {host} has an invalid size "
                               f"of {size} bytes", path=self.host.path, offset=host)
        if data + size > self.host.size:
            raise TruncatedImage(f"compressed grain at offset {host} runs past the end of "
                                 "the file", path=self.host.path, offset=host)
        return Extent(pos, stop - pos, ExtentKind.DATA,
                      host_offset=(self.index << COMPRESSED_INDEX_SHIFT) + data,
                      compressed=True, stored_length=size, unit_length=unit,
                      inner_offset=inner)


def _gap(start: int, end: int, kind: int) -> Extent:
    return Extent(start, end - start, ExtentKind.UNALLOCATED if kind == UNALLOC else ExtentKind.ZERO)


def open_hosted_sparse(start: int, host: HostFile, head: bytes) -> HostedSparseExtent:
    """Validate a KDMV header (and a footer it defers to) in qemu's order, then load
    its grain directory. Raises ImageError subclasses for everything qemu refuses."""
    return HostedSparseExtent(start, host, read_sparse_header(host, head))


def read_sparse_header(host: ByteSource, head: bytes) -> S.SparseExtentHeader:
    """The KDMV header (or the footer copy it defers to), validated in qemu's order;
    nothing is allocated. Raises ImageError subclasses for everything qemu refuses."""
    path = host.path
    if len(head) < SECTOR:
        raise TruncatedImage(f"file is {len(head)} bytes, too short for a VMDK header",
                             path=path)
    header = S.SparseExtentHeader.unpack(head)
    if header.capacity == 0 and header.descriptorOffset:
        raise UnsupportedFeature("VMDK sparse file holding only a descriptor", path=path)
    if header.gdOffset == S.GD_AT_END:
        header = _footer_header(host, header)
    if header.version > 3:
        raise UnsupportedFeature(f"VMDK version {header.version}", path=path,
                                 detail="versions 1 to 3 are read")
    if header.compressAlgorithm not in (S.COMPRESSION_NONE, S.COMPRESSION_DEFLATE):
        raise UnsupportedFeature(f"VMDK compression algorithm {header.compressAlgorithm}",
                                 path=path, detail="only deflate (1) exists")
    if header.numGTEsPerGT > S.MAX_GTES_PER_GT:
        raise LimitExceeded(f"L2 table size too big ({header.numGTEsPerGT} entries per "
                            "grain table)", path=path, limit="grain table entries")
    if header.sectors_per_gt == 0:
        raise CorruptImage("L1 entry size is invalid (grain size or grain table size is 0)",
                           path=path, offset=4)
    if header.overHead * SECTOR > align_up(host.size, SECTOR):
        raise TruncatedImage(f"File truncated, expecting at least {header.overHead * SECTOR} "
                             "bytes", path=path)
    if header.grainSize > S.MAX_GRAIN_SECTORS:
        raise CorruptImage(f"Invalid granularity ({header.grainSize} sectors), image may be "
                           "corrupt", path=path, offset=20)
    if header.gd_entries > S.MAX_L1_ENTRIES:
        raise LimitExceeded(f"L1 size too big ({header.gd_entries} grain directory entries)",
                            path=path, limit="grain directory entries")
    if header.capacity * SECTOR > MAX_VIRTUAL_BYTES:
        raise LimitExceeded(f"VMDK capacity of {header.capacity} sectors is too large",
                            path=path, limit="virtual size")
    if header.flags & S.FLAG_VALID_NEWLINE_DETECTION and \
            header.newlineChars not in (S.NEWLINE_CHECK, bytes(4)):
        # the reason the characters exist: a copy in text mode rewrote line ends (qemu
        # does not look, and would return the damaged bytes; all zeros is left alone)
        raise CorruptImage(f"VMDK newline check characters are {header.newlineChars!r}, not "
                           f"{S.NEWLINE_CHECK!r}: the file was damaged by a text-mode copy",
                           path=path, offset=73)
    return header


def _footer_header(host: ByteSource, header: S.SparseExtentHeader) -> S.SparseExtentHeader:
    """The footer's copy of the header (stream-optimized, GD at the end), checked for
    its markers and against the header it replaces (../SECURITY.md row 14)."""
    path = host.path
    at = align_up(host.size, SECTOR) - 3 * SECTOR
    if at < SECTOR:
        raise TruncatedImage("streamOptimized VMDK too short for its footer", path=path)
    raw = host.pread_upto(at, 3 * SECTOR)
    if len(raw) < 3 * SECTOR - (align_up(host.size, SECTOR) - host.size):
        raise TruncatedImage("streamOptimized VMDK footer is cut short", path=path)
    raw += bytes(3 * SECTOR - len(raw))
    fmark = S.Marker.unpack(raw, 0)
    eos = S.Marker.unpack(raw, 2 * SECTOR)
    if raw[SECTOR:SECTOR + 4] != S.SPARSE_MAGIC or fmark.size != 0 \
            or fmark.type != S.MARKER_FOOTER or eos.val != 0 or eos.size != 0 \
            or eos.type != S.MARKER_EOS:
        raise CorruptImage("Invalid footer: a streamOptimized VMDK whose grain directory "
                           "is at the end must end with footer and end-of-stream markers",
                           path=path, offset=at)
    footer = S.SparseExtentHeader.unpack(raw, SECTOR)
    for name in ("version", "capacity", "grainSize", "numGTEsPerGT", "compressAlgorithm",
                 "descriptorOffset", "descriptorSize"):
        a, b = getattr(header, name), getattr(footer, name)
        if a != b:
            raise CorruptImage(f"streamOptimized footer disagrees with the header ({name} "
                               f"{b} in the footer, {a} in the header)", path=path, offset=at)
    if footer.gdOffset == S.GD_AT_END:
        raise CorruptImage("streamOptimized footer does not say where the grain directory "
                           "is", path=path, offset=at)
    return footer


class COWDExtent(SparseExtent):
    """An ESX "COWD" sparse extent (vmfsSparse), as qemu reads it: 4096 entries per
    grain table, no compression, no zeroed grains."""

    type_name = "VMFSSPARSE"

    def __init__(self, start: int, host: HostFile, header: S.COWDHeader) -> None:
        super().__init__(start, header.numSectors * SECTOR, host)
        path = host.path
        self.header = header
        if header.grainSize == 0:
            raise CorruptImage("L1 entry size is invalid (grain size 0)", path=path)
        if header.grainSize > S.MAX_GRAIN_SECTORS:
            raise CorruptImage(f"Invalid granularity ({header.grainSize} sectors), image may "
                               "be corrupt", path=path)
        self.grain_sectors = header.grainSize
        self.grain_bytes = header.grainSize * SECTOR
        self.gtes_per_gt = S.COWDHeader.NUM_GTES_PER_GT
        if header.numGDEntries * self.gtes_per_gt * header.grainSize < header.numSectors:
            raise CorruptImage(f"grain directory of {header.numGDEntries} entries cannot map "
                               f"{header.numSectors} sectors", path=path)
        self._load_gd(header.gdOffset * SECTOR, header.numGDEntries, S.GTE_SIZE)


class SESparseExtent(SparseExtent):
    """ESXi's seSparse extent, read the way qemu 7.2 reads it (read-only, strict
    header checks, 4 KiB grains, 64-bit grain directory and table entries)."""

    type_name = "SESPARSE"
    gte_width = 8

    def __init__(self, start: int, host: HostFile) -> None:
        path = host.path
        head = host.pread_upto(0, SECTOR)
        if len(head) < SECTOR:
            raise TruncatedImage("seSparse extent shorter than its header", path=path)
        h = S.SESparseConstHeader.unpack(head)
        problems = [
            (h.magic != S.SESPARSE_MAGIC, f"bad const header magic {h.magic:#x}"),
            (h.version != S.SESPARSE_VERSION, f"version {h.version:#018x}"),
            (h.grain_size != 8, f"grain size {h.grain_size}"),
            (h.grain_table_size != 64, f"grain table size {h.grain_table_size}"),
            (h.flags != 0, f"flags {h.flags:#x}"),
            (any((h.reserved1, h.reserved2, h.reserved3, h.reserved4)), "reserved fields"),
            (not h.pad_is_zero, "non-zero const header padding"),
        ]
        for bad, what in problems:
            if bad:
                raise UnsupportedFeature(f"seSparse {what}", path=path,
                                         detail="qemu reads only seSparse version 2.1")
        vol = host.pread_upto(h.volatile_header_offset * SECTOR, SECTOR)
        if len(vol) < SECTOR or int.from_bytes(vol[:8], "little") != S.SESPARSE_VOLATILE_MAGIC:
            raise CorruptImage("seSparse volatile header is missing or has a bad magic",
                               path=path)
        if int.from_bytes(vol[24:32], "little"):
            raise UnsupportedFeature("seSparse journal replay", path=path,
                                     detail="the image is dirty")
        if any(vol[32:]):
            raise UnsupportedFeature("seSparse non-zero volatile header padding", path=path)
        if h.capacity * SECTOR > MAX_VIRTUAL_BYTES:
            raise LimitExceeded(f"seSparse capacity of {h.capacity} sectors is too large",
                                path=path, limit="virtual size")
        super().__init__(start, h.capacity * SECTOR, host)
        self.sheader = h
        self.grain_sectors = h.grain_size
        self.grain_bytes = h.grain_size * SECTOR
        self.gtes_per_gt = h.grain_table_size * SECTOR // 8
        self._load_gd(h.grain_dir_offset * SECTOR, h.grain_dir_size * SECTOR // 8, 8)
        if len(self.gd) * self.gtes_per_gt * self.grain_bytes < self.size:
            raise CorruptImage("seSparse grain directory is too small for the capacity",
                               path=path)

    def _gt_offset(self, gd_index: int) -> int:
        entry = self.gd[gd_index]
        if entry == 0:
            return 0
        if entry >> 32 != 0x10000000:
            # qemu: the top 32 bits are 0x10000000 for an allocated table
            assert self.host is not None
            raise CorruptImage(f"seSparse grain directory entry {gd_index} is invalid "
                               f"({entry:#x})", path=self.host.path)
        table_bytes = self.gtes_per_gt * 8
        return (self.sheader.grain_tables_offset * SECTOR
                + (entry & 0xFFFFFFFF) * table_bytes)

    @property
    def data_step(self) -> int:
        # the cluster's low 12 bits are the entry's bits 48-59 (see grain_unit)
        return 1 << 48

    def even_room(self, entry: int) -> int:
        """Entries of ``entry, entry + data_step, ...`` before bits 48-59 carry into
        the entry's top nibble."""
        return ((_SESPARSE_LOW_CLUSTER - (entry & _SESPARSE_LOW_CLUSTER)) >> 48) + 1

    def _host(self, entry: int) -> int:
        """The host offset of an allocated grain's entry. qemu computes it in uint64 and
        passes it on as int64, so a hostile cluster number wraps: qemu-img map prints
        the wrapped, signed value (and joins grains across the wrap: scan.py compares
        offsets modulo 2**64); reading there fails."""
        cluster = ((entry & _SESPARSE_LOW_CLUSTER) >> 48) | \
            ((entry & _SESPARSE_HIGH_CLUSTER) << 12)
        host = (self.sheader.grains_offset + cluster * self.grain_sectors) * SECTOR & _U64
        return host - (1 << 64) if host >> 63 else host

    def grain_unit(self, entry: int) -> tuple[int, int]:
        """qemu 7.2 vmdk_get_cluster_offset: the top nibble says 0 unallocated (then the
        entry must be 0), 1 SCSI-unmapped or 2 zero grain (both read zeros), 3 allocated;
        bits 48-59 are the grain's cluster number's low 12 bits, bits 0-47 the rest."""
        nibble = entry >> 60
        if nibble == 3:
            return DATA, self._host(entry)
        if nibble in (1, 2):
            return ZERO, 0
        if entry == 0:
            return UNALLOC, 0
        assert self.host is not None
        raise CorruptImage(f"seSparse grain table entry {entry:#x} is invalid",
                           path=self.host.path)


#: seSparse grain table entry fields (qemu 7.2 vmdk_get_cluster_offset)
_SESPARSE_LOW_CLUSTER = 0x0FFF000000000000
_SESPARSE_HIGH_CLUSTER = 0x0000FFFFFFFFFFFF
