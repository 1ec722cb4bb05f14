"""Writing new qcow2 images (versions 2 and 3) from a stream of data and zeros.

Layout: cluster 0 holds the header, its extensions and the backing name; guest data
(and packed compressed clusters) are appended in the order they arrive; L2 tables go
to disk as soon as the engine says nothing before them will change (``flush_before``),
so memory stays bounded whatever the disk size; L1, refcount blocks and the refcount
table are written last, computed from an exact per-cluster count, so ``qemu-img
check`` finds no leak and no error.

Tables are ``array.array``s of host-order integers (util.tables), byte-swapped to
qcow2's big-endian order when written: a convert to qcow2 never imports numpy.
"""

from __future__ import annotations

import os
import sys
from array import array
from dataclasses import dataclass
from typing import Any

from ...engine.codec import compressor as make_compressor
from ...errors import CorruptImage, OutputError, ReadOnlyImage, UnsupportedFeature
from ...util import tables
from ...util.fileio import WriteData, byte_view, punch_hole, pwrite_all, write_zeros
from ..base import BackingRef, ImageWriter, OpenOptions
from . import structs as S


@dataclass(frozen=True, slots=True)
class Qcow2Options:
    """Validated creation options (see formats.qcow2.options for parsing)."""

    version: int = 3
    cluster_bits: int = 16
    compression_type: int = S.COMPRESSION_ZLIB
    preallocation: str = "off"
    lazy_refcounts: bool = False
    refcount_order: int = 4
    extended_l2: bool = False
    compression_level: int | None = None


#: clusters whose refcounts _alloc sets in one go
_ALLOC_PIECE = 1 << 16


class _L2:
    """One L2 table while it is being filled."""

    __slots__ = ("entries", "host", "dirty")

    def __init__(self, entries: array[int], host: int | None) -> None:
        self.entries = entries
        self.host = host
        self.dirty = True


class Qcow2Writer(ImageWriter):
    accepts_spans = True  # write() only slices data and passes it to pwrite_all
    def __init__(self, path: str, size: int, opts: Qcow2Options,
                 backing: BackingRef | None = None) -> None:
        self._setup(path, size, opts, backing)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"{path}: cannot create: {err.strerror}") from None
        self.extensions: list[S.HeaderExtension] | None = None  # kept as-is when reopening
        self.keep_features = (0, 0, 0)  # incompatible, compatible, autoclear bits to keep
        if opts.preallocation != "off":
            self._preallocate()

    def _setup(self, path: str, size: int, opts: Qcow2Options, backing: BackingRef | None) -> None:
        self.path = path
        self.virtual_size = size
        self.opts = opts
        self.backing = backing
        self.cs = 1 << opts.cluster_bits
        self.granularity = self.cs
        self.entry_words = 2 if opts.extended_l2 else 1
        self.l2_entries = self.cs // (8 * self.entry_words)
        self.l2_span = self.l2_entries * self.cs
        self.l1_size = -(-size // self.l2_span)
        self.l1 = tables.zeros(8, self.l1_size)
        self.tables: dict[int, _L2] = {}
        # 4 bytes per host cluster: 64 MiB for 1 TiB of data in 64 KiB clusters
        self.refcounts = tables.zeros(4, 1024)
        self.max_refcount = (1 << (1 << opts.refcount_order)) - 1
        self.next_host = self.cs  # cluster 0 is the header
        self._ref(0, 1)
        self.cbyte = 0  # next free byte for packed compressed data (0: none open)
        self.offset_mask, self.csize_shift = S.compressed_fields(opts.cluster_bits)
        codec = "zstd" if opts.compression_type == S.COMPRESSION_ZSTD else "deflate"
        self._codec = codec
        self.extensions = None
        self.keep_features = (0, 0, 0)
        self.snapshot_table = (0, 0)  # (nb_snapshots, snapshots_offset) kept when reopening

    @classmethod
    def open_existing(cls, path: str) -> Qcow2Writer:
        """Reopen an existing image to write guest data into it (``convert -n``).

        Data and L2 tables are updated in place; L1 and the refcount structures are
        written anew at the end and the old ones freed. Images this cannot update
        safely are refused: corrupt or dirty ones, external data files and persistent
        bitmaps. Internal snapshots are kept: clusters and L2 tables they share with
        the active state (refcount > 1) are copied before they are changed, the
        snapshot table is left as it is.
        """
        from .reader import Qcow2Reader

        reader = Qcow2Reader(path, OpenOptions())
        try:
            h = reader.header
            if h.incompatible_features & S.INCOMPAT_CORRUPT:
                raise ReadOnlyImage("image is marked corrupt; vmforge will not write to it",
                                    path=path)
            if h.incompatible_features & S.INCOMPAT_DIRTY:
                raise ReadOnlyImage("image has the dirty bit set (refcounts may be stale)",
                                    path=path, hint="run 'vmforge check' and repair it first")
            for bit, what in ((S.INCOMPAT_DATA_FILE, "external data file"),):
                if h.incompatible_features & bit:
                    raise UnsupportedFeature(f"writing into an image with an {what}", path=path)
            if h.autoclear_features & S.AUTOCLEAR_BITMAPS:
                raise UnsupportedFeature("writing into an image with persistent bitmaps", path=path)
            opts = Qcow2Options(
                version=h.version, cluster_bits=h.cluster_bits,
                compression_type=h.compression_type, preallocation="off",
                lazy_refcounts=bool(h.compatible_features & S.COMPAT_LAZY_REFCOUNTS),
                refcount_order=h.refcount_order,
                extended_l2=bool(h.incompatible_features & S.INCOMPAT_EXTL2))
            self = cls.__new__(cls)
            self._setup(path, h.size, opts, reader.backing)
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            cs = self.cs
            self.l1 = reader.l1[:]  # the same host-order array, copied
            nb = -(-reader.host.size // cs)
            from .check import stored_refcounts

            stored = stored_refcounts(reader, nb)
            self.refcounts = tables.from_bytes(stored.clip(0, 0xFFFFFFFF).astype("=u4").tobytes(),
                                               4, sys.byteorder)
            self.next_host = nb * cs
            # the old L1 and refcount structures are replaced when finishing
            self._unref_range(h.l1_table_offset, h.l1_size * 8)
            self._unref_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
            table = tables.from_bytes(reader.host.pread(h.refcount_table_offset,
                                                        h.refcount_table_clusters * cs), 8, "big")
            for entry in table:
                if entry & S.REFT_OFFSET_MASK:
                    self._unref_range(entry & S.REFT_OFFSET_MASK, cs)
            self.extensions = list(reader.extensions)
            self.snapshot_table = (h.nb_snapshots, h.snapshots_offset)
            self.keep_features = (h.incompatible_features & ~S.INCOMPAT_DIRTY,
                                  h.compatible_features, h.autoclear_features)
            return self
        finally:
            reader.close()

    def _unref_range(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        counts = self.refcounts
        for c in range(first, min(last + 1, len(counts))):
            if counts[c]:
                counts[c] -= 1

    # -- host cluster accounting -----------------------------------------------------------

    def _grow_refcounts(self, need: int) -> None:
        counts = self.refcounts
        if need > len(counts):
            counts.frombytes(bytes(4 * (max(need, 2 * len(counts)) - len(counts))))

    def _ref(self, cluster: int, count: int = 1, n: int = 1) -> None:
        """Add ``count`` references to host clusters ``[cluster, cluster+n)`` (a few)."""
        self._grow_refcounts(cluster + n)
        for c in range(cluster, cluster + n):
            self.refcounts[c] += count

    def _unref(self, cluster: int) -> None:
        """Drop one reference to host cluster ``cluster``."""
        if cluster >= len(self.refcounts) or not self.refcounts[cluster]:
            raise CorruptImage("a cluster in use has a refcount of 0", path=self.path,
                               offset=cluster * self.cs,
                               hint="run 'vmforge check -r all' on it first")
        self.refcounts[cluster] -= 1

    def _alloc(self, n: int) -> int:
        """n contiguous new host clusters, referenced once; returns the host offset."""
        host = self.next_host
        self.next_host += n * self.cs
        first = host // self.cs
        self._grow_refcounts(first + n)
        # Clusters from next_host on have never been counted (count 0), so the new
        # ones are set to 1 with C-level copies, a piece at a time: preallocating a
        # whole disk allocates millions of clusters at once.
        ones = tables.filled(4, min(n, _ALLOC_PIECE), 1)
        for lo in range(first, first + n, _ALLOC_PIECE):
            hi = min(lo + _ALLOC_PIECE, first + n)
            self.refcounts[lo:hi] = ones if hi - lo == len(ones) else ones[:hi - lo]
        return host

    # -- L2 tables ---------------------------------------------------------------------------

    def _table(self, index: int) -> _L2:
        table = self.tables.get(index)
        if table is None:
            host = int(self.l1[index]) & S.L1E_OFFSET_MASK
            if host:  # flushed earlier and written to again: bring it back
                entries = tables.from_bytes(os.pread(self.fd, self.cs, host), 8, "big")
                if self._shared(host):
                    # a snapshot uses this table too: change a copy of it (written to a
                    # new cluster at flush); the data clusters keep their counts, since
                    # each L1 table reaching them still counts once
                    self._unref(host // self.cs)
                    self.l1[index] = 0
                    table = _L2(entries, None)
                else:
                    table = _L2(entries, host)
            else:
                table = _L2(tables.zeros(8, self.l2_entries * self.entry_words), None)
            self.tables[index] = table
        table.dirty = True
        return table

    def _shared(self, host: int) -> bool:
        """Whether host cluster ``host`` is also used by a snapshot (refcount above 1)."""
        c = host // self.cs
        return c < len(self.refcounts) and int(self.refcounts[c]) > 1

    def _own(self, guest_cluster: int, entry: int) -> int:
        """Host offset of guest cluster's data, copied first if a snapshot shares it."""
        host = entry & S.L2E_OFFSET_MASK
        if not self._shared(host):
            return host
        new = self._alloc(1)
        pwrite_all(self.fd, os.pread(self.fd, self.cs, host), new)
        self._unref(host // self.cs)
        if self.entry_words == 2:  # keep the subcluster bitmap as it is
            w = self.entry_words
            index, slot = divmod(guest_cluster, self.l2_entries)
            self._table(index).entries[slot * w] = new | S.OFLAG_COPIED | (entry & S.OFLAG_ZERO)
        else:
            self._set_range(guest_cluster, 1, new | S.OFLAG_COPIED | (entry & S.OFLAG_ZERO))
        return new

    def _write_table(self, index: int, table: _L2) -> None:
        if table.host is None:
            table.host = self._alloc(1)
            self.l1[index] = table.host | S.OFLAG_COPIED
        pwrite_all(self.fd, tables.to_bytes(table.entries, "big"), table.host)
        table.dirty = False

    def flush_before(self, offset: int) -> None:
        limit = offset // self.l2_span
        for index in sorted(i for i in self.tables if i < limit):
            table = self.tables.pop(index)
            if table.dirty:
                self._write_table(index, table)

    def _set_range(self, first: int, count: int, entry: int, step: int = 0,
                   bitmap: int = 0) -> None:
        """Set ``count`` entries from guest cluster ``first`` to entry + i*step."""
        w = self.entry_words
        done = 0
        while done < count:
            index, slot = divmod(first + done, self.l2_entries)
            n = min(count - done, self.l2_entries - slot)
            table = self._table(index)
            values = tables.series(8, entry + done * step, n, step)
            if w == 1:
                table.entries[slot:slot + n] = values
            else:
                table.entries[slot * w:(slot + n) * w:w] = values
                table.entries[slot * w + 1:(slot + n) * w:w] = tables.filled(8, n, bitmap)
            done += n

    def _get_range(self, first: int, count: int) -> array[int]:
        """Standard entries of ``count`` guest clusters from ``first`` (0 where no table)."""
        w = self.entry_words
        out = tables.zeros(8, count)
        done = 0
        while done < count:
            index, slot = divmod(first + done, self.l2_entries)
            n = min(count - done, self.l2_entries - slot)
            if index in self.tables or int(self.l1[index]) & S.L1E_OFFSET_MASK:
                out[done:done + n] = self._table(index).entries[slot * w:(slot + n) * w:w]
            done += n
        return out

    # -- data ----------------------------------------------------------------------------------

    def write(self, offset: int, data: WriteData) -> None:
        view = byte_view(data)
        cs = self.cs
        if offset % cs:
            raise ValueError("qcow2 writes must start on a cluster boundary")
        first = offset // cs
        count = -(-len(view) // cs)
        existing = self._get_range(first, count)
        if existing.count(0) == count:
            host = self._alloc(count)
            pwrite_all(self.fd, view, host)
            self._set_range(first, count, host | S.OFLAG_COPIED, cs, 0xFFFFFFFF)
            return
        # Some clusters are already placed (preallocated image, or written before):
        # overwrite those in place, allocate the others one by one.
        for i in range(count):
            part = view[i * cs:(i + 1) * cs]
            entry = existing[i]
            if entry & S.L2E_OFFSET_MASK and not entry & S.OFLAG_COMPRESSED:
                host = entry & S.L2E_OFFSET_MASK
                if self._shared(host):  # a snapshot keeps the old cluster
                    self._unref(host // cs)
                    host = self._alloc(1)
            else:
                if entry & S.OFLAG_COMPRESSED:
                    self._unref_compressed(entry)
                host = self._alloc(1)
            pwrite_all(self.fd, part, host)
            self._set_range(first + i, 1, host | S.OFLAG_COPIED, 0, 0xFFFFFFFF)

    def _unref_compressed(self, entry: int) -> None:
        start = entry & self.offset_mask
        sectors = ((entry >> self.csize_shift) & ((1 << (62 - self.csize_shift)) - 1)) + 1
        first = (start & ~511) // self.cs
        last = ((start & ~511) + sectors * 512 - 1) // self.cs
        for c in range(first, last + 1):
            self._unref(c)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero whole clusters (the engine aligns zero runs to the cluster size)."""
        cs = self.cs
        if offset % cs:
            raise ValueError("qcow2 zero writes must start on a cluster boundary")
        end = offset + length
        if end % cs and end < self.virtual_size:
            # a partial last cluster (the source ends inside it): zero just that part
            tail = end - end % cs
            self._zero_partial(tail, end - tail)
            if tail == offset:
                return
            length = tail - offset
        first, count = offset // cs, -(-length // cs)
        if self.opts.version < 3:
            # version 2 has no zero flag: store real zeros
            chunk = 256
            for c in range(first, first + count, chunk):
                n = min(chunk, first + count - c)
                self.write(c * cs, bytes(min(n * cs, self.virtual_size - c * cs)))
            return
        existing = self._get_range(first, count)
        if existing.count(0) != count:
            for i, entry in enumerate(existing):
                if entry & S.OFLAG_COMPRESSED:
                    self._unref_compressed(entry)
                elif entry & S.L2E_OFFSET_MASK and self._shared(entry & S.L2E_OFFSET_MASK):
                    # a snapshot keeps the cluster: this state just reads zeros
                    self._unref((entry & S.L2E_OFFSET_MASK) // cs)
                elif entry & S.L2E_OFFSET_MASK:  # keep the cluster, read it as zeros
                    host = entry & S.L2E_OFFSET_MASK
                    if self.entry_words == 2:
                        self._set_range(first + i, 1, host | S.OFLAG_COPIED, 0, 0xFFFFFFFF << 32)
                    else:
                        self._set_range(first + i, 1, host | S.OFLAG_COPIED | S.OFLAG_ZERO)
                    continue
                self._set_zero(first + i, 1)
            return
        self._set_zero(first, count)

    def _zero_partial(self, offset: int, length: int) -> None:
        entry = self._get_range(offset // self.cs, 1)[0]
        host = entry & S.L2E_OFFSET_MASK
        if host and not entry & (S.OFLAG_COMPRESSED | S.OFLAG_ZERO):
            host = self._own(offset // self.cs, entry)
            write_zeros(self.fd, host + offset % self.cs, length)  # keep the rest of it
        elif not entry & S.OFLAG_ZERO:
            self.write_zeroes(offset - offset % self.cs, self.cs)

    def _set_zero(self, first: int, count: int) -> None:
        if self.entry_words == 2:
            self._set_range(first, count, 0, 0, 0xFFFFFFFF << 32)
        else:
            self._set_range(first, count, S.OFLAG_ZERO)

    def compressor(self, level: int | None = None) -> Any:
        return make_compressor(self._codec,
                               self.opts.compression_level if level is None else level)

    def write_compressed(self, offset: int, stored: bytes) -> None:
        """Store one compressed cluster, packed after the previous one (as qemu packs them)."""
        cs = self.cs
        if offset % cs:
            raise ValueError("compressed writes must be whole clusters")
        if len(stored) >= cs:
            raise ValueError("compressed data must be smaller than a cluster")
        start = self.cbyte
        if start:
            current_end = (start // cs + 1) * cs
            end = start + len(stored)
            if self.refcounts[start // cs] >= self.max_refcount:
                start = 0
            elif end > current_end:
                if self.next_host == current_end and end <= current_end + cs:
                    self.next_host += cs  # extend into the next cluster, counted below
                else:
                    start = 0
        if not start:
            start = self.next_host
            self.next_host += cs
        end = start + len(stored)
        pwrite_all(self.fd, stored, start)
        first_c, last_c = start // cs, (end - 1) // cs
        self._ref(first_c, 1, last_c - first_c + 1)
        sectors = (end - 1) // 512 - start // 512  # additional sectors beyond the first
        existing = self._get_range(offset // cs, 1)[0]
        if existing & S.OFLAG_COMPRESSED:
            self._unref_compressed(existing)
        self._set_range(offset // cs, 1, S.OFLAG_COMPRESSED | (sectors << self.csize_shift) | start)
        self.cbyte = end if end % cs else 0

    # -- preallocation -------------------------------------------------------------------------

    def _preallocate(self) -> None:
        cs = self.cs
        clusters = -(-self.virtual_size // cs)
        host = self._alloc(clusters) if clusters else self.next_host
        end = host + clusters * cs
        if clusters:
            self._set_range(0, clusters, host | S.OFLAG_COPIED, cs, 0xFFFFFFFF)
        try:
            os.ftruncate(self.fd, end)
            if self.opts.preallocation == "falloc" and clusters:
                os.posix_fallocate(self.fd, host, clusters * cs)
            elif self.opts.preallocation == "full" and clusters:
                write_zeros(self.fd, host, clusters * cs)
        except OSError as err:
            raise OutputError(f"{self.path}: preallocation failed: {err.strerror}") from None

    # -- completion ----------------------------------------------------------------------------

    def finish(self) -> None:
        try:
            self.flush_before(self.l1_size * self.l2_span)
            cs = self.cs
            l1_bytes = tables.to_bytes(self.l1, "big")
            l1_clusters = max(1, -(-len(l1_bytes) // cs))
            l1_offset = self._alloc(l1_clusters)
            pwrite_all(self.fd, l1_bytes, l1_offset)
            rt_offset, rt_clusters = self._write_refcounts()
            self._write_header(l1_offset, rt_offset, rt_clusters)
            os.ftruncate(self.fd, max(self.next_host, os.fstat(self.fd).st_size)
                         if self.opts.preallocation != "off" else self.next_host)
        finally:
            os.close(self.fd)
            self.fd = -1

    def _write_refcounts(self) -> tuple[int, int]:
        """Refcount blocks then table, sized to cover themselves (qemu's fixed point)."""
        cs = self.cs
        bits = 1 << self.opts.refcount_order
        per_block = cs * 8 // bits
        per_table_cluster = cs // 8
        used = self.next_host // cs
        blocks = table = 0
        while True:
            total = used + blocks + table
            new_blocks = -(-total // per_block)
            new_table = -(-new_blocks // per_table_cluster)
            if (new_blocks, new_table) == (blocks, table):
                break
            blocks, table = new_blocks, new_table
        block_offset = self._alloc(blocks)
        table_offset = self._alloc(table)
        total = self.next_host // cs
        counts = self.refcounts
        for b in range(blocks):  # one block at a time: memory stays one cluster wide
            block = counts[b * per_block:min((b + 1) * per_block, total)]
            block.frombytes(bytes(4 * (per_block - len(block))))
            try:
                packed = S.pack_refcounts(block, bits)
            except ValueError:
                raise OutputError(f"{self.path}: a refcount exceeds refcount_bits={bits}") from None
            pwrite_all(self.fd, packed, block_offset + b * cs)
        entries = tables.series(8, block_offset, blocks, cs)
        entries.frombytes(bytes(8 * (table * per_table_cluster - blocks)))
        pwrite_all(self.fd, tables.to_bytes(entries, "big"), table_offset)
        return table_offset, table

    def _write_header(self, l1_offset: int, rt_offset: int, rt_clusters: int) -> None:
        o = self.opts
        v3 = o.version >= 3
        incompat = 0
        if o.extended_l2:
            incompat |= S.INCOMPAT_EXTL2
        if o.compression_type != S.COMPRESSION_ZLIB:
            incompat |= S.INCOMPAT_COMPRESSION
        header_length = (S.V3_HEADER_LENGTH_COMPRESSION if v3 else S.V2_HEADER_LENGTH)
        exts = b""
        if self.extensions is not None:
            exts = b"".join(e.pack() for e in self.extensions)
        else:
            if self.backing is not None and self.backing.format:
                exts += S.HeaderExtension(S.EXT_BACKING_FORMAT, self.backing.format.encode()).pack()
            if v3:
                exts += S.HeaderExtension(S.EXT_FEATURE_TABLE, _feature_table()).pack()
        exts += bytes(8)  # end of extensions
        name = self.backing.filename.encode() if self.backing is not None else b""
        bfo = header_length + len(exts) if name else 0
        h = S.Header(
            version=o.version, backing_file_offset=bfo, backing_file_size=len(name),
            cluster_bits=o.cluster_bits, size=self.virtual_size, crypt_method=0,
            l1_size=self.l1_size, l1_table_offset=l1_offset, refcount_table_offset=rt_offset,
            refcount_table_clusters=rt_clusters, nb_snapshots=self.snapshot_table[0],
            snapshots_offset=self.snapshot_table[1],
            incompatible_features=incompat | self.keep_features[0],
            compatible_features=(S.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0)
            | self.keep_features[1],
            autoclear_features=self.keep_features[2], refcount_order=o.refcount_order,
            header_length=header_length,
            compression_type=o.compression_type,
        )
        blob = h.pack() + exts + name
        if len(blob) > self.cs:
            raise OutputError(f"{self.path}: header and backing name do not fit one cluster",
                              hint="use a larger cluster_size or a shorter backing path")
        pwrite_all(self.fd, blob, 0)

    # -- changes to an existing image (resize, rebase) -----------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow or shrink the guest disk; L1 is rewritten at finish in its new size.

        Shrinking frees every cluster wholly past the new end, as qemu's truncate does.
        Growing zeroes what an earlier shrink left in the last cluster, so the new
        space reads as zeros.
        """
        check_new = -(-new_size // self.l2_span)
        if new_size < self.virtual_size:
            self._discard_from(-(-new_size // self.cs))
        elif new_size > self.virtual_size and self.virtual_size % self.cs:
            end = min(new_size, self.virtual_size - self.virtual_size % self.cs + self.cs)
            self._zero_partial(self.virtual_size, end - self.virtual_size)
        l1 = self.l1[:min(check_new, self.l1_size)]
        l1.frombytes(bytes(8 * (check_new - len(l1))))
        self.l1, self.l1_size, self.virtual_size = l1, check_new, new_size

    def _discard_from(self, first: int) -> None:
        """Unmap guest clusters from ``first`` on; L2 tables left empty are freed."""
        w = self.entry_words
        for index in range(first // self.l2_entries, self.l1_size):
            if index not in self.tables and not int(self.l1[index]) & S.L1E_OFFSET_MASK:
                continue
            table = self._table(index)
            slot = max(0, first - index * self.l2_entries)
            for entry in table.entries[slot * w::w]:
                if entry & S.OFLAG_COMPRESSED:
                    self._unref_compressed(entry)
                elif entry & S.L2E_OFFSET_MASK:
                    self._unref((entry & S.L2E_OFFSET_MASK) // self.cs)
            table.entries[slot * w:] = tables.zeros(8, len(table.entries) - slot * w)
            if slot == 0:  # the whole table goes
                if table.host is not None:
                    self._unref(table.host // self.cs)
                del self.tables[index]
                self.l1[index] = 0

    def make_empty(self) -> None:
        """Unmap every guest cluster; freed clusters become holes in the file."""
        before = self.refcounts[:]
        self._discard_from(0)
        run_start = run_end = -1  # one hole per run of consecutive freed clusters
        for c, (was, now) in enumerate(zip(before, self.refcounts, strict=True)):
            if not (was and not now):
                continue
            if c != run_end:
                if run_end > run_start:
                    punch_hole(self.fd, run_start * self.cs, (run_end - run_start) * self.cs)
                run_start = c
            run_end = c + 1
        if run_end > run_start:
            punch_hole(self.fd, run_start * self.cs, (run_end - run_start) * self.cs)

    def set_backing(self, backing: BackingRef | None) -> None:
        """Store another backing reference; the header is rewritten at finish."""
        self.backing = backing
        if self.extensions is not None:
            rest = [e for e in self.extensions if e.type != S.EXT_BACKING_FORMAT]
            if backing is not None and backing.format:
                rest.insert(0, S.HeaderExtension(S.EXT_BACKING_FORMAT, backing.format.encode()))
            self.extensions = rest

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _feature_table() -> bytes:
    """The feature name table extension naming the bits we know (qcow2.txt type 0x6803f857)."""
    rows = [
        (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
        (0, 3, "compression type"), (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
    ]
    return b"".join(bytes([kind, bit]) + name.encode().ljust(46, b"\0") for kind, bit, name in rows)
