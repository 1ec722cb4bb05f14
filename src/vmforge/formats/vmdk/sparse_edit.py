"""One hosted sparse extent ("KDMV", uncompressed) opened for changes in place.

Used by inplace.py for monolithicSparse and twoGbMaxExtentSparse. The grain directory
(qemu's L1) and redundant grain directory are held in memory; grain tables are read on
demand, changed in memory and written, both copies, by ``finish``, which writes the
header last. Everything new (grains, grain tables, a relocated directory) is appended
past the end of the file, so until ``finish`` the old metadata still describes the old
disk and ``abort`` can truncate the appended space away. Grains that already exist are
overwritten in place, as qemu and VMware do.

Before anything is written the extent's layout is checked: every structure (header,
embedded descriptor, both directories, every grain table, every allocated grain) must
lie inside the file and overlap no other one, so a hostile image cannot make a write
land on metadata.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ...errors import CorruptImage, LimitExceeded, OutputError
from ...model import align_up
from ...util.fileio import pwrite_all, zero_range
from . import structs as S

SECTOR = S.SECTOR_SIZE

#: reads ``length`` guest bytes of the parent at an offset inside this extent (zeros
#: past the parent's end); None when the disk has no parent
ParentRead = Callable[[int, int], bytes] | None


class SparseEdit:
    """A KDMV extent being changed. Offsets are bytes inside the extent."""

    def __init__(self, fd: int, path: str, header: S.SparseExtentHeader,
                 parent_read: ParentRead = None) -> None:
        if header.compressed or header.has_markers:
            raise CorruptImage("compressed sparse extent given to the in-place writer",
                               path=path)
        self.fd = fd
        self.path = path
        self.header = header
        self.parent_read = parent_read
        self.grain = header.grain_bytes
        self.gtes = header.numGTEsPerGT
        self.gt_sectors = -(-(self.gtes * S.GTE_SIZE) // SECTOR)
        self.zeroed_grain = header.has_zeroed_grain
        self.redundant = bool(header.flags & S.FLAG_REDUNDANT_GRAIN_TABLE) and header.rgdOffset > 0
        self.capacity = header.capacity  # sectors
        self.orig_size = os.fstat(fd).st_size
        self.end = align_up(self.orig_size, SECTOR)  # where the next appended structure goes
        entries = header.gd_entries
        self.gd_offset = header.gdOffset
        self.rgd_offset = header.rgdOffset if self.redundant else 0
        #: entries the directories' sectors hold (a growth beyond needs a new directory)
        self.gd_room = -(-(entries * S.GTE_SIZE) // SECTOR) * SECTOR // S.GTE_SIZE
        self.gd = self._read_dir(header.gdOffset, entries)
        self.rgd = self._read_dir(header.rgdOffset, entries) if self.redundant else None
        self.tables: dict[int, np.ndarray] = {}
        self.dirty: set[int] = set()
        self.dir_dirty = False
        self.changed = False
        self._validate()

    # -- opening --------------------------------------------------------------------------
    def _read_dir(self, sector: int, entries: int) -> np.ndarray:
        nbytes = entries * S.GTE_SIZE
        if sector <= 0 or sector * SECTOR + nbytes > self.orig_size:
            raise CorruptImage(f"grain directory at sector {sector} lies outside the file",
                               path=self.path, offset=sector * SECTOR)
        raw = os.pread(self.fd, nbytes, sector * SECTOR)
        return np.frombuffer(raw, dtype="<u4").copy()

    def _validate(self) -> None:
        """Refuse an extent whose structures overlap or leave the file (nothing written)."""
        h = self.header
        starts: list[np.ndarray] = [np.array([0], dtype=np.int64)]
        lens: list[np.ndarray] = [np.array([1], dtype=np.int64)]
        if h.descriptorOffset and h.descriptorSize:
            starts.append(np.array([h.descriptorOffset], dtype=np.int64))
            lens.append(np.array([h.descriptorSize], dtype=np.int64))
        dir_sectors = self.gd_room * S.GTE_SIZE // SECTOR
        limit = self.end // SECTOR
        grains: list[np.ndarray] = []
        for directory, at in ((self.gd, self.gd_offset), (self.rgd, self.rgd_offset)):
            if directory is None:
                continue
            starts.append(np.array([at], dtype=np.int64))
            lens.append(np.array([dir_sectors], dtype=np.int64))
            tables = directory[directory != 0].astype(np.int64)
            if len(tables) and int(tables.max()) + self.gt_sectors > limit:
                raise CorruptImage("a grain table lies past the end of the file",
                                   path=self.path)
            starts.append(tables)
            lens.append(np.full(len(tables), self.gt_sectors, dtype=np.int64))
        for index in range(len(self.gd)):
            table = self._read_table(index)
            if table is None:
                continue
            used = table[table > (S.GTE_ZEROED if self.zeroed_grain else S.GTE_UNALLOCATED)]
            grains.append(used.astype(np.int64))
        if grains:
            g = np.concatenate(grains)
            if len(g) and (int(g.min()) < h.overHead or int(g.max()) >= limit):
                raise CorruptImage("a grain table entry points outside the grain area of the "
                                   "file", path=self.path,
                                   hint="run 'vmforge check' on the image")
            starts.append(g)
            lens.append(np.full(len(g), h.grainSize, dtype=np.int64))
        s = np.concatenate(starts)
        e = s + np.concatenate(lens)
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        if len(s) > 1 and bool((s[1:] < e[:-1]).any()):
            at = int(s[1:][s[1:] < e[:-1]][0])
            raise CorruptImage(f"VMDK structures overlap at sector {at} (a grain or grain "
                               "table is used twice)", path=self.path, offset=at * SECTOR,
                               hint="run 'vmforge check' on the image")

    # -- tables ---------------------------------------------------------------------------
    def _append(self, nbytes: int) -> int:
        """Sector of ``nbytes`` of new space at the end of the file."""
        sector = self.end // SECTOR
        if sector + -(-nbytes // SECTOR) > S.MAX_EXTENT_SECTORS:
            raise OutputError(f"{self.path}: the VMDK extent is full (its offsets are 32-bit "
                              "sector numbers)")
        self.end += align_up(nbytes, SECTOR)
        return sector

    def _read_table(self, index: int) -> np.ndarray | None:
        """Grain table ``index`` from the file (a copy), None when it has none."""
        sector = int(self.gd[index])
        if not sector:
            return None
        raw = os.pread(self.fd, self.gtes * S.GTE_SIZE, sector * SECTOR)
        if len(raw) != self.gtes * S.GTE_SIZE:
            raise CorruptImage(f"grain table {index} runs past the end of the file",
                               path=self.path)
        return np.frombuffer(raw, dtype="<u4").copy()

    def _table(self, index: int, *, create: bool = True) -> np.ndarray | None:
        table = self.tables.get(index)
        if table is not None:
            return table
        table = self._read_table(index)
        if table is None and not create:
            return None
        if table is None:
            # a directory entry without a table (tools that allocate tables lazily):
            # give it one, in both directories
            table = np.zeros(self.gtes, dtype="<u4")
            self._new_table(index)
        self.tables[index] = table
        return table

    def _new_table(self, index: int) -> None:
        """Room for grain table ``index`` (zeros: appended space reads as zero)."""
        self.gd[index] = self._append(self.gt_sectors * SECTOR)
        if self.rgd is not None:
            self.rgd[index] = self._append(self.gt_sectors * SECTOR)
        self.dir_dirty = True

    def _entry(self, grain: int) -> tuple[np.ndarray, int]:
        table = self._table(grain // self.gtes)
        assert table is not None
        return table, grain % self.gtes

    def _allocated(self, entry: int) -> bool:
        return entry > S.GTE_ZEROED or (entry == S.GTE_ZEROED and not self.zeroed_grain)

    # -- guest data ------------------------------------------------------------------------
    def write(self, offset: int, data: memoryview) -> None:
        self.changed = True
        while len(data):
            grain, inner = divmod(offset, self.grain)
            n = min(len(data), self.grain - inner)
            table, slot = self._entry(grain)
            entry = int(table[slot])
            if self._allocated(entry):
                pwrite_all(self.fd, data[:n], entry * SECTOR + inner)
            else:
                useful = min(self.grain, self.capacity * SECTOR - grain * self.grain)
                if inner == 0 and n >= useful:
                    piece: bytes | bytearray | memoryview = data[:n]
                else:
                    # the rest of a new grain comes from the parent, as qemu's
                    # get_whole_cluster does (zeros without one, or for a zeroed grain)
                    buf = bytearray(self.grain)
                    if entry == S.GTE_UNALLOCATED and self.parent_read is not None:
                        got = self.parent_read(grain * self.grain, useful)
                        buf[:len(got)] = got
                    buf[inner:inner + n] = data[:n]
                    piece = buf
                sector = self._append(self.grain)
                pwrite_all(self.fd, piece, sector * SECTOR)
                table[slot] = sector
                self.dirty.add(grain // self.gtes)
            data, offset = data[n:], offset + n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read zero whatever the parent holds there."""
        self.changed = True
        end = offset + length
        while offset < end:
            grain, inner = divmod(offset, self.grain)
            n = min(end - offset, self.grain - inner)
            useful = min(self.grain, self.capacity * SECTOR - grain * self.grain)
            table, slot = self._entry(grain)
            entry = int(table[slot])
            whole = inner == 0 and n >= useful
            if self.zeroed_grain and whole:
                if self._allocated(entry):
                    zero_range(self.fd, entry * SECTOR, self.grain)
                table[slot] = S.GTE_ZEROED
                self.dirty.add(grain // self.gtes)
            elif self._allocated(entry):
                zero_range(self.fd, entry * SECTOR + inner, n)
            elif entry == S.GTE_UNALLOCATED and self.parent_read is not None:
                self.write(offset, memoryview(bytes(n)))
            offset += n

    def discard_from(self, offset: int) -> None:
        """Unmap every grain wholly at or past ``offset``; their space becomes holes."""
        first = -(-offset // self.grain)
        for index in range(first // self.gtes, len(self.gd)):
            table = self._table(index, create=False)
            if table is None:
                continue
            slot = max(0, first - index * self.gtes)
            part = table[slot:]
            freed = part[part > S.GTE_ZEROED] if self.zeroed_grain else part[part != 0]
            for sector in freed.tolist():
                zero_range(self.fd, sector * SECTOR, self.grain)
            part[:] = S.GTE_UNALLOCATED
            self.dirty.add(index)
        self.changed = True

    # -- size -----------------------------------------------------------------------------
    def resize(self, capacity: int) -> None:
        """New capacity in sectors: shrinking unmaps what lies past it, growing adds grain
        tables (and a larger directory at the end of the file when the old one is full).

        What an earlier shrink left in the old last grain past the old end is zeroed, so
        the new space reads zero (or the parent, which the caller decides about)."""
        old_bytes, new_bytes = self.capacity * SECTOR, capacity * SECTOR
        entries = -(-capacity // (self.gtes * self.header.grainSize))
        if entries > S.MAX_L1_ENTRIES:
            raise LimitExceeded(f"{entries} grain directory entries is more than "
                                f"{S.MAX_L1_ENTRIES}", path=self.path,
                                limit="grain directory entries")
        if new_bytes < old_bytes:
            self.discard_from(new_bytes)
            self.gd = self.gd[:entries].copy()
            if self.rgd is not None:
                self.rgd = self.rgd[:entries].copy()
            self.dir_dirty = True
        elif new_bytes > old_bytes:
            tail = old_bytes % self.grain
            if tail:
                table, slot = self._entry(old_bytes // self.grain)
                entry = int(table[slot])
                if self._allocated(entry):
                    zero_range(self.fd, entry * SECTOR + tail,
                               min(self.grain, new_bytes - old_bytes + tail) - tail)
            if entries > self.gd_room:
                self._relocate(entries)
            old = len(self.gd)
            self.gd = np.concatenate([self.gd, np.zeros(entries - old, dtype="<u4")])
            if self.rgd is not None:
                self.rgd = np.concatenate([self.rgd, np.zeros(entries - old, dtype="<u4")])
            # tables are allocated now, as qemu and VMware allocate them at creation:
            # their tools write only into grains whose table exists
            for index in range(old, entries):
                self._new_table(index)
            self.dir_dirty = True
        self.capacity = capacity
        self.changed = True

    def _relocate(self, entries: int) -> None:
        """Move both directories to the end of the file with room for ``entries``."""
        nbytes = align_up(entries * S.GTE_SIZE, SECTOR)
        if self.rgd is not None:
            self.rgd_offset = self._append(nbytes)
        self.gd_offset = self._append(nbytes)
        self.gd_room = nbytes // S.GTE_SIZE
        self.dir_dirty = True

    def make_empty(self) -> None:
        """Unmap every grain (the parent shows through again)."""
        self.discard_from(0)

    # -- completion -----------------------------------------------------------------------
    def finish(self, descriptor: bytes | None) -> None:
        """Tables, then directories, then the header (and embedded descriptor)."""
        for index in sorted(i for i in self.dirty if i < len(self.gd)):
            raw = self.tables[index].astype("<u4").tobytes()
            pwrite_all(self.fd, raw, int(self.gd[index]) * SECTOR)
            if self.rgd is not None:
                pwrite_all(self.fd, raw, int(self.rgd[index]) * SECTOR)
        if self.end > os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, self.end)  # appended tables that were never written
        if self.dir_dirty:
            room = self.gd_room * S.GTE_SIZE
            for directory, at in ((self.rgd, self.rgd_offset), (self.gd, self.gd_offset)):
                if directory is not None:
                    raw = directory.astype("<u4").tobytes()
                    pwrite_all(self.fd, raw + bytes(room - len(raw)), at * SECTOR)
        h = self.header
        fields = {f: getattr(h, f) for f in h.__dataclass_fields__}
        fields.update(capacity=self.capacity, gdOffset=self.gd_offset,
                      rgdOffset=self.rgd_offset if self.redundant else h.rgdOffset)
        pwrite_all(self.fd, S.SparseExtentHeader(**fields).pack(), 0)
        if descriptor is not None:
            room = h.descriptorSize * SECTOR
            pwrite_all(self.fd, descriptor + bytes(room - len(descriptor)),
                       h.descriptorOffset * SECTOR)

    def abort(self) -> None:
        """Drop the space appended since opening (nothing refers to it yet)."""
        if os.fstat(self.fd).st_size > self.orig_size:
            os.ftruncate(self.fd, self.orig_size)


def create_sparse_extent(fd: int, path: str, capacity: int) -> S.SparseExtentHeader:
    """Lay out an empty extent as qemu's vmdk_init_extent does (a twoGb* extent file
    without an embedded descriptor); returns its header."""
    from .writer import _SparseFile

    sparse = _SparseFile(fd, path, capacity, zeroed_grain=False)
    sparse.finish(None)
    return sparse.header
