"""Reading qcow2 (versions 2 and 3): L1/L2 mapping, snapshots, host-file layout.

The header is validated in header.py before anything here allocates a table. Tables
are ``array.array`` of host-order integers (util/tables.py), not numpy arrays: opening
an image to convert or map it then costs no numpy import (~0.09 s of start-up here).
An L2 table is scanned run by run, not entry by entry: a run of entries that step
evenly (contiguous data, unallocated or zero clusters) is measured by comparing whole
slices of the table with the expected series, a few C-level compares per run, so the
cost follows the number of runs, not of clusters.
"""

from __future__ import annotations

import os
import threading
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...engine.chain import resolve_backing_path
from ...errors import (
    BackingChainError,
    CorruptImage,
    LimitExceeded,
    TruncatedImage,
    UnsupportedFeature,
    VmforgeError,
)
from ...model import Extent, ExtentKind
from ...model.check import CheckResult
from ...model.info import ImageInfo, SnapshotInfo
from ...util import tables
from ..base import BackingRef, HostFile, ImageReader, OpenOptions, file_data_runs
from . import structs as S
from .header import Geometry, check_table, parse_extensions, read_header

if TYPE_CHECKING:
    import numpy as np

_L2_CACHE_TABLES = 64

# unit kinds of the L2 scan
_UNALLOC, _DATA, _ZERO, _COMPRESSED = 0, 1, 2, 3
#: host offsets end below this (bits 9-55 of a descriptor, qcow2.txt "Cluster mapping")
_HOST_LIMIT = 1 << 56
#: an extended L2 bitmap (qcow2.txt "Extended L2 Entries"): bits 0-31 say a subcluster
#: is allocated, bits 32-63 that it reads as zeros
_ALL_ALLOCATED = (1 << S.EXTL2_SUBCLUSTERS) - 1
_ALL_ZERO = _ALL_ALLOCATED << S.EXTL2_SUBCLUSTERS
#: bitmaps that give all subclusters of a cluster one kind
_WHOLE_CLUSTER = {_ALL_ALLOCATED: _DATA, 0: _UNALLOC, _ALL_ZERO: _ZERO}

#: (start unit, end unit, kind, host offset of the first unit or 0, raw descriptor)
Run = tuple[int, int, int, int, int]


class Qcow2Reader(ImageReader):
    format_name = "qcow2"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.path = path
        self.host = HostFile(path)
        try:
            self._open(options)
        except BaseException:
            self.host.close()
            raise

    def _open(self, options: OpenOptions) -> None:
        h, head = read_header(self.host)
        self.header = h
        self.geo = Geometry(h.cluster_bits, bool(h.incompatible_features & S.INCOMPAT_EXTL2))
        self.extensions = parse_extensions(head, h, self.path)
        self.codec = "zstd" if h.compression_type == S.COMPRESSION_ZSTD else "deflate"
        self.backing = None
        self.backing_format: str | None = None
        self.data_file_name: str | None = None
        for ext in self.extensions:
            if ext.type == S.EXT_BACKING_FORMAT:
                self.backing_format = ext.data.decode("utf-8", "replace")
            elif ext.type == S.EXT_DATA_FILE:
                self.data_file_name = ext.data.decode("utf-8", "replace")
        if h.backing_file_offset and h.backing_file_size:
            name = head[h.backing_file_offset:h.backing_file_offset + h.backing_file_size]
            self.backing = BackingRef(name.decode("utf-8", "replace"), self.backing_format)
        self.data_host: HostFile | None = self.host
        self.data_file_refused = False
        if h.incompatible_features & S.INCOMPAT_DATA_FILE:
            self._open_data_file(options)
        self.snapshots = self._read_snapshots() if h.nb_snapshots else []
        self.virtual_size = h.size
        l1_offset, l1_size = h.l1_table_offset, h.l1_size
        self.snapshot: S.SnapshotEntry | None = None
        if options.snapshot is not None:
            snap = self.find_snapshot(options.snapshot)
            self.snapshot = snap
            if snap.l1_size * 8 > S.MAX_L1_BYTES:
                raise LimitExceeded("snapshot L1 table is larger than 32 MiB", path=self.path)
            check_table(self.host, "snapshot L1 table", snap.l1_table_offset, snap.l1_size * 8,
                        self.geo.cluster_size, self.host.size)
            l1_offset, l1_size = snap.l1_table_offset, snap.l1_size
            if snap.disk_size is not None:
                self.virtual_size = snap.disk_size
            if -(-self.virtual_size // self.geo.l2_span) > l1_size:
                raise CorruptImage("snapshot L1 table is too small for its disk size", path=self.path)
        # bounds-checked by read_header/check_table above; read when first needed
        self._l1_at = (l1_offset, l1_size)
        self._l1: array[int] | None = None
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_lock = threading.Lock()
        self._prealloc: bool | None = None
        self._metadata: list[int] | None = None
        self._reftable: array[int] | None = None  # the copy pipeline maps from several threads

    def _open_data_file(self, options: OpenOptions) -> None:
        if not self.data_file_name:
            raise CorruptImage("external data file bit set but no data file name", path=self.path,
                               hint="qemu cannot open it either without naming a data file")
        if options.untrusted:
            raise UnsupportedFeature(
                "external data file", path=self.path,
                detail=f"names '{self.data_file_name}'; refused in untrusted mode")
        if not options.allow_data_file:
            # info and map still work; reading guest data is refused (see read_host)
            self.data_host = None
            self.data_file_refused = True
            return
        target = resolve_backing_path(self.path, self.data_file_name)
        self.data_host = HostFile(target)

    def find_snapshot(self, key: str) -> S.SnapshotEntry:
        """A snapshot by id or name (``snapshot.id=``/``snapshot.name=`` prefixes accepted)."""
        if key.startswith("snapshot.id="):
            matches = [s for s in self.snapshots if s.id_str == key[12:]]
        elif key.startswith("snapshot.name="):
            matches = [s for s in self.snapshots if s.name == key[14:]]
        else:
            matches = [s for s in self.snapshots if s.id_str == key] or [
                s for s in self.snapshots if s.name == key]
        if not matches:
            raise BackingChainError(f"{self.path}: no snapshot '{key}'", path=self.path,
                                    hint="list them with 'vmforge info'")
        return matches[0]

    @property
    def l1(self) -> array[int]:
        """The L1 table in use (the active one, or the opened snapshot's)."""
        if self._l1 is None:
            self._l1 = self.read_l1(*self._l1_at)
        return self._l1

    def read_l1(self, offset: int, count: int) -> array[int]:
        """An L1 table as host-order integers (bounds checked by the caller)."""
        raw = self.host.pread(offset, count * 8) if count else b""
        return tables.from_bytes(raw, 8, "big")

    def _read_snapshots(self) -> list[S.SnapshotEntry]:
        h = self.header
        out: list[S.SnapshotEntry] = []
        pos = h.snapshots_offset
        limit = h.snapshots_offset + S.MAX_SNAPSHOTS_TABLE
        for _ in range(h.nb_snapshots):
            fixed = self.host.pread(pos, S.SnapshotEntry.fixed_size())
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmstate,
             extra_len) = S.SnapshotEntry.unpack_fixed(fixed)
            if extra_len > S.MAX_SNAPSHOT_EXTRA:
                raise LimitExceeded(f"snapshot extra data of {extra_len} bytes", path=self.path)
            var_len = extra_len + id_len + name_len
            body = self.host.pread(pos + len(fixed), var_len)
            extra = body[:extra_len]
            ident = body[extra_len:extra_len + id_len].decode("utf-8", "replace")
            name = body[extra_len + id_len:].decode("utf-8", "replace")
            out.append(S.SnapshotEntry(l1_off, l1_size, ident, name, dsec, dnsec, clock, vmstate,
                                       extra))
            pos += len(fixed) + var_len
            pos += -pos % 8
            if pos > limit:
                raise LimitExceeded("snapshot table larger than 64 MiB", path=self.path)
        return out

    # -- mapping ---------------------------------------------------------------------------

    def l2_table(self, offset: int) -> array[int]:
        """One L2 table as host-order integers (extended: interleaved entry, bitmap)."""
        with self._l2_lock:
            table = self._l2_cache.get(offset)
            if table is not None:
                self._l2_cache.move_to_end(offset)
                return table
        cs = self.geo.cluster_size
        if offset % cs:
            raise CorruptImage(f"L2 table offset {offset:#x} is not cluster aligned", path=self.path,
                               offset=offset)
        if offset < cs:
            raise CorruptImage("L2 table overlaps the header", path=self.path, offset=offset)
        if offset + cs > self.host.size:
            raise TruncatedImage(f"L2 table at {offset:#x} lies past the end of the file",
                                 path=self.path, offset=offset)
        table = tables.from_bytes(self.host.pread(offset, cs), 8, "big")
        with self._l2_lock:
            self._l2_cache[offset] = table
            if len(self._l2_cache) > _L2_CACHE_TABLES:
                self._l2_cache.popitem(last=False)
        return table

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        span = self.geo.l2_span
        pos = start
        while pos < end:
            index = pos // span
            table_start = index * span
            table_end = min(end, table_start + span)
            l1e = int(self.l1[index]) if index < len(self.l1) else 0
            l2_offset = l1e & S.L1E_OFFSET_MASK
            if l2_offset == 0:
                yield Extent(pos, table_end - pos, ExtentKind.UNALLOCATED)
            else:
                yield from self._scan_l2(self.l2_table(l2_offset), table_start, pos, table_end)
            pos = table_end

    def _scan_l2(self, table: array[int], table_start: int, start: int,
                 end: int) -> Iterator[Extent]:
        geo = self.geo
        cs = geo.cluster_size
        first = (start - table_start) // cs
        last = -(-(end - table_start) // cs)
        if geo.extended_l2:
            upc = S.EXTL2_SUBCLUSTERS
            runs = _merge(self._subcluster_pieces(table, first, last), cs // upc)
        else:
            upc = 1
            runs = self._cluster_runs(table, first, last)
        unit = cs // upc
        base = table_start + first * cs
        offset_mask, shift = S.compressed_fields(geo.cluster_bits)
        sector_mask = (1 << (62 - shift)) - 1
        for a, b, kind, host, desc in runs:
            g_start = max(start, base + a * unit)
            g_end = min(end, base + b * unit)
            if g_start >= g_end:
                continue
            if kind == _UNALLOC:
                h_off = host + (g_start - (base + a * unit)) if host else None
                yield Extent(g_start, g_end - g_start, ExtentKind.UNALLOCATED, host_offset=h_off)
            elif kind == _ZERO:
                h_off = host + (g_start - (base + a * unit)) if host else None
                yield Extent(g_start, g_end - g_start, ExtentKind.ZERO, host_offset=h_off)
            elif kind == _DATA:
                h_off = host + (g_start - (base + a * unit))
                if self.metadata_preallocated():
                    yield from self._split_holes(g_start, g_end, h_off)
                else:
                    yield Extent(g_start, g_end - g_start, ExtentKind.DATA, host_offset=h_off)
            else:
                c_off = desc & offset_mask
                sectors = ((desc >> shift) & sector_mask) + 1
                cluster_start = base + (a // upc) * cs
                yield Extent(g_start, g_end - g_start, ExtentKind.DATA, host_offset=c_off,
                             compressed=True, stored_length=sectors * 512 - (c_off & 511),
                             unit_length=cs, inner_offset=g_start - cluster_start)

    def metadata_preallocated(self) -> bool:
        """Whether qemu would look through allocated clusters for file-system holes.

        QEMU (block/qcow2.c, qcow2_detect_metadata_preallocation) does so when far more
        clusters are referenced than the file has blocks allocated; we decide the same
        way so that ``map`` agrees with qemu-img and holes are never read.
        """
        if self._prealloc is None:
            self._prealloc = False
            if self.data_host is self.host:
                cs = self.geo.cluster_size
                real = self.host.allocated // cs
                threshold = max(real * 10 // 9, real + 2)
                try:
                    used = self._count_referenced_clusters(-(-self.host.size // cs), threshold)
                except VmforgeError:
                    used = 0
                self._prealloc = used >= threshold
        return self._prealloc

    @property
    def refcounts_per_block(self) -> int:
        return self.geo.cluster_size * 8 // (1 << self.header.refcount_order)

    def refcount_table(self) -> array[int]:
        """Refcount table entries (offsets of refcount blocks, reserved bits masked)."""
        if self._reftable is None:
            h = self.header
            raw = self.host.pread(h.refcount_table_offset,
                                  h.refcount_table_clusters * self.geo.cluster_size)
            entries = tables.from_bytes(raw, 8, "big")
            reserved = (~S.REFT_OFFSET_MASK & (1 << 64) - 1).to_bytes(8, "big") * len(entries)
            if int.from_bytes(raw, "big") & int.from_bytes(reserved, "big"):
                entries = array(entries.typecode, [e & S.REFT_OFFSET_MASK for e in entries])
            self._reftable = entries
        return self._reftable

    def refcount_block(self, offset: int) -> np.ndarray[Any, Any]:
        """The stored refcounts of one refcount block."""
        raw = self.host.pread(offset, self.geo.cluster_size)
        return S.unpack_refcounts(raw, 1 << self.header.refcount_order)

    def _count_referenced_clusters(self, end_cluster: int, stop_at: int) -> int:
        cs = self.geo.cluster_size
        per_block = self.refcounts_per_block
        count = 0
        for i, off in enumerate(self.refcount_table().tolist()):
            if i * per_block >= end_cluster or count >= stop_at:
                break
            if not off or off % cs or off + cs > self.host.size:
                continue
            raw = self.host.pread(off, cs)
            count += S.count_nonzero_refcounts(raw, 1 << self.header.refcount_order,
                                               min(per_block, end_cluster - i * per_block))
        return count

    def _split_holes(self, g_start: int, g_end: int, host: int) -> Iterator[Extent]:
        assert self.data_host is not None
        size = self.data_host.size
        cs = self.geo.cluster_size
        for s, e, is_data in file_data_runs(self.data_host.fd, host, host + (g_end - g_start)):
            # Past the end of the file is no hole but a cut file: left as data, so that
            # reading it fails (read_host) instead of inventing zeros.
            cut = max(s, -(-size // cs) * cs)
            if not is_data and cut < e:
                if cut > s:
                    yield Extent(g_start + (s - host), cut - s, ExtentKind.DATA, host_offset=s,
                                 hole=True)
                yield Extent(g_start + (cut - host), e - cut, ExtentKind.DATA, host_offset=cut)
                continue
            yield Extent(g_start + (s - host), e - s, ExtentKind.DATA, host_offset=s,
                         hole=not is_data)

    def _cluster_runs(self, table: array[int], first: int, last: int) -> Iterator[Run]:
        """Runs of standard L2 entries [first, last), units counted from ``first``.

        A run breaks where the kind changes, where data stops being contiguous on the
        host, and at every compressed cluster (each is its own unit). Entries that step
        evenly are taken a slice at a time (``tables.even_run``); an entry that continues a run
        but not evenly (another flag bit) is taken alone, and the slices resume after it.
        """
        data_file = bool(self.header.incompatible_features & S.INCOMPAT_DATA_FILE)
        cs = self.geo.cluster_size
        i = first
        while i < last:
            entry = table[i]
            kind, host = _kind(entry, data_file)
            if kind == _COMPRESSED:
                yield i - first, i - first + 1, kind, 0, entry
                i += 1
                continue
            j, cur, cur_host = i, entry, host
            while True:
                # data steps even at host offset 0 (an external data file's start)
                step = cs if cur_host or kind == _DATA else 0
                # a series of entries must not carry past the offset bits into flag bits
                n = tables.even_run(table, j, last, step,
                                    limit=cur - cur_host + _HOST_LIMIT if step else None)
                j += n
                prev_host = cur_host + (n - 1) * step
                if j >= last:
                    break
                nxt = table[j]
                nkind, nhost = _kind(nxt, data_file)
                if nkind != kind or not _continues(kind, prev_host, nhost, cs):
                    break
                cur, cur_host = nxt, nhost
            yield i - first, j - first, kind, host, entry
            i = j

    def _subcluster_pieces(self, table: array[int], first: int,
                           last: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Extended L2 entries [first, last) as pieces ``(start unit, end unit, kind, host,
        descriptor)`` whose units step evenly on the host (or all have none).

        Every non-compressed subcluster of an allocated cluster has a host offset, even
        when it reads as zero or is unallocated (qemu-img map reports it).
        """
        upc = S.EXTL2_SUBCLUSTERS
        unit = self.geo.cluster_size // upc
        for c in range(first, last):
            std, bitmap = table[2 * c], table[2 * c + 1]
            u = (c - first) * upc
            if std & S.OFLAG_COMPRESSED:
                yield u, u + upc, _COMPRESSED, 0, std
                continue
            off = std & S.L2E_OFFSET_MASK
            whole = _WHOLE_CLUSTER.get(bitmap)
            if whole is not None and (off or whole != _DATA):
                yield u, u + upc, whole, off, std
                continue
            for sub in range(upc):
                if bitmap >> (sub + upc) & 1:
                    kind = _ZERO
                elif bitmap >> sub & 1:
                    kind = _DATA
                else:
                    kind = _UNALLOC
                yield u + sub, u + sub + 1, kind, off + sub * unit if off else 0, std

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        host = self.data_host
        if host is None:
            raise UnsupportedFeature(
                "external data file", path=self.path,
                detail=f"guest data lives in '{self.data_file_name}'",
                hint="pass --allow-data-file (API: allow_data_file=True) if you trust this image")
        assert extent.host_offset is not None
        if extent.compressed:
            host = self.host  # compressed clusters never live in a data file
        if host is self.host:
            self._refuse_metadata_overlap(extent.host_offset, len(buf))
        got = os.preadv(host.fd, [buf], extent.host_offset)
        if got < len(buf):
            # A last cluster written short is normal (qemu reads the rest as zeros); a
            # cluster that starts past the end of the file means the file was cut:
            # qemu-img check calls that corruption, and we refuse rather than invent zeros.
            cs = self.geo.cluster_size
            last_cluster = (extent.host_offset + len(buf) - 1) // cs * cs
            if not extent.compressed and last_cluster >= host.size:
                raise TruncatedImage(
                    f"guest data at host offset {last_cluster:#x} lies past the end of the file "
                    f"({host.size} bytes)", path=host.path, offset=last_cluster)
            buf[max(got, 0):] = bytes(len(buf) - max(got, 0))

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        host = self.data_host
        if extent.compressed or extent.reads_zero or host is None or extent.host_offset is None:
            return None  # zero clusters may keep stale bytes at their host offset
        if extent.host_offset + extent.length > host.size:
            return None  # a short last cluster: read_host fills in its zeros
        if host is self.host:
            self._refuse_metadata_overlap(extent.host_offset, extent.length)
        return host

    def _refuse_metadata_overlap(self, offset: int, length: int) -> None:
        """Guest data must never come from the image's own metadata (SECURITY.md row 8)."""
        if self._metadata is None:
            self._metadata = self._metadata_clusters()
        cs = self.geo.cluster_size
        first, last = offset // cs, (offset + length - 1) // cs
        i = bisect_left(self._metadata, first)
        if i < len(self._metadata) and self._metadata[i] <= last:
            raise CorruptImage(
                f"guest data at host offset {offset:#x} overlaps the image's metadata "
                f"(cluster {self._metadata[i]})", path=self.path, offset=offset)

    def _metadata_clusters(self) -> list[int]:
        """Sorted host cluster numbers holding header, tables and refcount structures."""
        h = self.header
        cs = self.geo.cluster_size

        def span(offset: int, length: int) -> range:
            if length <= 0:
                return range(0)
            return range(offset // cs, (offset + length - 1) // cs + 1)

        clusters = {0}
        clusters.update(span(h.l1_table_offset, h.l1_size * 8))
        clusters.update(span(h.refcount_table_offset, h.refcount_table_clusters * cs))
        for snap in self.snapshots:
            clusters.update(span(snap.l1_table_offset, snap.l1_size * 8))
        if h.nb_snapshots:
            clusters.update(span(h.snapshots_offset, sum(len(s.pack()) for s in self.snapshots)))
        mask = S.L1E_OFFSET_MASK
        clusters.update((e & mask) // cs for e in self.l1 if e & mask)
        clusters.update(b // cs for b in self.refcount_table() if b)
        return sorted(clusters)

    # -- information -----------------------------------------------------------------------

    def info(self) -> ImageInfo:
        h = self.header
        specific: dict[str, Any] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": S.COMPRESSION_NAMES.get(h.compression_type, "zlib"),
        }
        if h.version >= 3:
            specific["lazy-refcounts"] = bool(h.compatible_features & S.COMPAT_LAZY_REFCOUNTS)
        specific["refcount-bits"] = 1 << h.refcount_order
        if h.incompatible_features & S.INCOMPAT_DATA_FILE:
            specific["data-file"] = self.data_file_name
            specific["data-file-raw"] = bool(h.autoclear_features & S.AUTOCLEAR_DATA_FILE_RAW)
        if h.version >= 3:
            specific["corrupt"] = bool(h.incompatible_features & S.INCOMPAT_CORRUPT)
            specific["extended-l2"] = self.geo.extended_l2
        info = ImageInfo(
            filename=self.path, format="qcow2", virtual_size=self.virtual_size,
            actual_size=self.host.allocated, cluster_size=self.geo.cluster_size,
            dirty=bool(h.incompatible_features & S.INCOMPAT_DIRTY),
            format_specific={"type": "qcow2", "data": specific},
            snapshots=[SnapshotInfo(
                id=s.id_str, name=s.name, vm_state_size=s.vm_state_size_large,
                date_sec=s.date_sec, date_nsec=s.date_nsec, vm_clock_nsec=s.vm_clock_nsec,
                icount=s.icount, disk_size=s.disk_size) for s in self.snapshots],
        )
        if self.backing is not None:
            info.backing_filename = self.backing.filename
            info.backing_format = self.backing.format
            try:
                info.full_backing_filename = resolve_backing_path(self.path, self.backing.filename)
            except BackingChainError:
                info.full_backing_filename = self.backing.filename
        return info

    def check(self) -> CheckResult:
        from .check import check_qcow2

        return check_qcow2(self)

    def close(self) -> None:
        if self.data_host is not None and self.data_host is not self.host:
            self.data_host.close()
        self.host.close()


def _kind(entry: int, data_file: bool) -> tuple[int, int]:
    """The kind of a standard L2 entry and its host offset (0 for compressed clusters).

    qcow2.txt "Standard Cluster Descriptor": bit 0 reads as zeros, bits 9-55 the host
    offset; with an external data file an entry with the COPIED flag is allocated even
    at offset 0.
    """
    if entry & S.OFLAG_COMPRESSED:
        return _COMPRESSED, 0
    host = entry & S.L2E_OFFSET_MASK
    if entry & S.OFLAG_ZERO:
        return _ZERO, host
    if host or (data_file and entry & S.OFLAG_COPIED):
        return _DATA, host
    return _UNALLOC, host


def _continues(kind: int, prev_host: int, host: int, unit: int) -> bool:
    """Whether a unit at ``host`` continues a run of ``kind`` whose last unit is at
    ``prev_host``: data must be contiguous on the host; zero and unallocated units
    either have no host offset on both sides or are contiguous too."""
    if kind == _COMPRESSED:
        return False
    if kind != _DATA and not prev_host and not host:
        return True
    return host == prev_host + unit


def _merge(pieces: Iterator[tuple[int, int, int, int, int]], unit: int) -> Iterator[Run]:
    """Join consecutive pieces into runs where ``_continues`` allows it."""
    run: list[int] | None = None  # start, end, kind, host, descriptor, host of the last unit
    for a, b, kind, host, desc in pieces:
        if run is not None and run[2] == kind and _continues(kind, run[5], host, unit):
            run[1] = b
            run[5] = host + (b - a - 1) * unit if host else 0
            continue
        if run is not None:
            yield run[0], run[1], run[2], run[3], run[4]
        run = [a, b, kind, host, desc, host + (b - a - 1) * unit if host else 0]
    if run is not None:
        yield run[0], run[1], run[2], run[3], run[4]
