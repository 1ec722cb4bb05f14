"""Crash-safe in-place metadata updates of an existing qcow2 image.

Snapshot create/apply/delete, ``check -r`` and ``amend`` all change the same few
structures: L1 tables, the snapshot table, refcounts and QCOW_OFLAG_COPIED flags
(qcow2.txt "Cluster mapping", "Host cluster management", "Snapshots"). They share
this one writer, which orders its writes so that a crash at any point leaves an image
that is valid in either its old or its new state:

1. Everything new goes to clusters that are free in the *old* state (stored refcount
   0 and referenced by nothing), so nothing the old header reaches is overwritten:
   the new active L1, a new snapshot L1 and snapshot table, new refcount blocks and
   refcount table, and a copy of every active L2 table whose entries change (its
   COPIED flags): tables are copied on write, never patched in place. Old
   structures are only freed in the new refcounts.
2. fdatasync, then the header switch: one write of bytes 24-71 (size, L1 table,
   refcount table, snapshot table; amend rewrites the header with its extensions,
   a few hundred bytes), then fdatasync. A sector write is atomic on the storage
   QEMU itself relies on for the same fields.
3. Freed clusters are punched out and a free tail of the file is cut off.

A crash before 2 leaves the old image exactly as it was (new clusters lie in space
its refcounts call free, so ``qemu-img check`` stays clean); after 2 the new image
is complete. Refcounts are never stale in either state, so the dirty bit is not
needed. One exception, amend's downgrade to version 2: zero entries of L2 tables
that snapshots still use are rewritten in place, the part that reads the same in
both states (zeros written into preallocated zero clusters) before the switch, new
clusters for zero entries over a backing file after it (a crash between leaves a
leak, never a wrong read).
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Any

import numpy as np

from ...errors import (
    CorruptImage,
    LimitExceeded,
    OutputError,
    ReadOnlyImage,
    UnsupportedFeature,
)
from ...util.fileio import punch_hole, pwrite_all
from ..base import OpenOptions
from . import structs as S
from .check import Analysis, analyse_qcow2
from .reader import Qcow2Reader

# Header bytes 24-71 (qcow2.txt "Header"): size, crypt_method, l1_size,
# l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
# snapshots_offset -- everything a metadata switch changes, in one write.
_SWITCH = struct.Struct(">QIIQQIIQ")
_SWITCH_OFFSET = 24
_EXTRA = struct.Struct(">QQQ")  # snapshot extra data: vm_state_size_large, disk_size, icount
ICOUNT_NONE = 0xFFFFFFFFFFFFFFFF


class Qcow2Update:
    """An open transaction on one image; ``commit()`` writes it, ``close()`` always."""

    def __init__(self, path: str, what: str, *, repair: bool = False) -> None:
        """Open ``path`` for the change described by ``what`` (used in refusals).

        Refuses (ReadOnlyImage, UnsupportedFeature, CorruptImage) images that are
        marked corrupt or dirty, use an external data file, cannot be opened for
        writing, or (unless ``repair``) have anything ``qemu-img check`` calls an error.
        """
        self.path = path
        self.what = what
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            raise ReadOnlyImage(f"cannot open for writing ({what})", path=path,
                                hint="check the file's permissions") from None
        except OSError as err:
            raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None
        try:
            reader = Qcow2Reader(path, OpenOptions())
            try:
                self._load(reader, repair)
            finally:
                reader.close()
        except BaseException:
            os.close(self.fd)
            raise

    def _load(self, reader: Qcow2Reader, repair: bool) -> None:
        h = reader.header
        path, what = self.path, self.what
        if h.incompatible_features & S.INCOMPAT_CORRUPT:
            raise ReadOnlyImage(f"image is marked corrupt; {what} refused", path=path,
                                hint="repair a copy with 'qemu-img check -r all'")
        if h.incompatible_features & S.INCOMPAT_DIRTY:
            raise ReadOnlyImage(f"image has the dirty bit set (refcounts may be stale); {what} "
                                "refused", path=path, hint="run 'vmforge check -r all' on it first")
        if h.incompatible_features & S.INCOMPAT_DATA_FILE:
            raise UnsupportedFeature(f"{what} in an image with an external data file", path=path)
        self.analysis: Analysis = analyse_qcow2(reader)
        res = self.analysis.result
        if res.check_errors or (res.corruptions and not repair):
            raise CorruptImage(
                f"{what} refused: the image has {res.corruptions + res.check_errors} "
                "errors", path=path, hint="run 'vmforge check' on it, and 'check -r all' on a copy")
        self.header = h
        self.geo = reader.geo
        self.cs = reader.geo.cluster_size
        self.extensions = reader.extensions
        self.snapshots: list[S.SnapshotEntry] = list(reader.snapshots)
        self.old_table_size = sum(len(s.pack()) for s in reader.snapshots)
        self.l1 = np.array(reader.l1, dtype=np.uint64)  # the reader's is an array.array
        self.l1_size = h.l1_size
        self.size = h.size
        self.bits = 1 << h.refcount_order
        self.file_size = reader.host.size
        old_table = reader.refcount_table()
        self.old_blocks = [int(o) for o in old_table.tolist() if o]
        stored = self.analysis.stored.astype(np.int64)
        expected = self.analysis.expected.astype(np.int64)
        n = max(len(stored), len(expected))
        # A cluster is busy in the old state if it is stored as used or referenced at
        # all: never allocate one of those before the switch (repair: stored may be 0).
        self.busy = np.zeros(n, dtype=bool)
        self.busy[: len(stored)] |= stored > 0
        self.busy[: len(expected)] |= expected > 0
        self.refs = np.zeros(n, dtype=np.int64)
        self.refs[: len(stored)] = stored
        self.stored_old = self.refs.copy()
        self.l2: dict[int, np.ndarray[Any, Any]] = {}  # host offset -> entries (edited copy)
        self.l2_orig: dict[int, np.ndarray[Any, Any]] = {}
        self.snapshots_changed = False
        self.pending: list[tuple[int, bytes]] = []  # new structures, written by commit()
        # L2 tables as they may be written before the switch (safe in both states);
        # without an entry here only COPIED clears go early
        self.l2_early: dict[int, np.ndarray[Any, Any]] = {}
        self.new_header: S.Header | None = None  # amend: a whole new header
        self.new_extensions: list[S.HeaderExtension] = list(self.extensions)
        bfo, bfs = h.backing_file_offset, h.backing_file_size
        self.backing_name = os.pread(self.fd, bfs, bfo) if bfo and bfs else b""

    # -- reading -------------------------------------------------------------------------------

    def read_l1(self, offset: int, count: int) -> np.ndarray[Any, Any]:
        if count * 8 > S.MAX_L1_BYTES:
            raise LimitExceeded("L1 table larger than 32 MiB", path=self.path)
        if not count:
            return np.zeros(0, dtype=np.uint64)
        raw = os.pread(self.fd, count * 8, offset)
        if len(raw) < count * 8:
            raise CorruptImage(f"L1 table at {offset:#x} runs past the end of the file",
                               path=self.path, offset=offset)
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def l2_table(self, offset: int) -> np.ndarray[Any, Any]:
        table = self.l2.get(offset)
        if table is None:
            raw = os.pread(self.fd, self.cs, offset)
            if len(raw) < self.cs:
                raise CorruptImage(f"L2 table at {offset:#x} runs past the end of the file",
                                   path=self.path, offset=offset)
            table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            self.l2_orig[offset] = table
            table = table.copy()
            self.l2[offset] = table
        return table

    # -- refcounts -----------------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        if n > len(self.refs):
            extra = n - len(self.refs)
            self.refs = np.concatenate([self.refs, np.zeros(extra, dtype=np.int64)])
            self.stored_old = np.concatenate([self.stored_old, np.zeros(extra, dtype=np.int64)])
            self.busy = np.concatenate([self.busy, np.zeros(extra, dtype=bool)])

    def add_range(self, offset: int, length: int, addend: int) -> None:
        """``addend`` references to every cluster of ``[offset, offset+length)``."""
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        self._grow(last + 1)
        self.refs[first:last + 1] += addend

    def walk(self, l1: np.ndarray[Any, Any], addend: int) -> None:
        """Add ``addend`` to every cluster one L1 table reaches (its L2 tables and data).

        Every L1 table counts once for each cluster it reaches, as in QEMU's
        qcow2_update_snapshot_refcount: a data cluster of an L2 table shared by two L1
        tables has refcount 2.
        """
        cs = self.cs
        w = 2 if self.geo.extended_l2 else 1
        offset_mask, shift = S.compressed_fields(self.geo.cluster_bits)
        sector_mask = (1 << (62 - shift)) - 1
        for l1e in l1.tolist():
            l2_off = l1e & S.L1E_OFFSET_MASK
            if not l2_off:
                continue
            self.add_range(l2_off, cs, addend)
            std = self.l2_table(l2_off)[::w]
            compressed = (std & np.uint64(S.OFLAG_COMPRESSED)) != 0
            offsets = std & np.uint64(S.L2E_OFFSET_MASK)
            plain = (~compressed) & (offsets != 0)
            clusters = (offsets[plain] // np.uint64(cs)).astype(np.int64)
            if len(clusters):
                self._grow(int(clusters.max()) + 1)
                np.add.at(self.refs, clusters, addend)
            for entry in std[compressed].tolist():
                start = (entry & offset_mask) & ~511
                sectors = ((entry >> shift) & sector_mask) + 1
                self.add_range(start, sectors * 512, addend)

    def alloc(self, length: int) -> int:
        """Host offset of ``length`` bytes of contiguous clusters, free in both states."""
        n = max(1, -(-length // self.cs))
        free = ~self.busy & (self.refs == 0)
        free[0] = False  # the header
        start = _first_run(free, n)
        if start is None:  # after the last cluster in use (a free tail is reused)
            start = int(np.flatnonzero(~free)[-1]) + 1
        self._grow(start + n)
        self.refs[start:start + n] += 1
        return start * self.cs

    # -- COPIED flags --------------------------------------------------------------------------

    def fix_copied(self, l1: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], list[str]]:
        """The active L1 with COPIED set exactly where the new refcount is 1 (also in its L2s).

        Returns the new L1 and one qemu-style line per flag changed.
        """
        cs = self.cs
        w = 2 if self.geo.extended_l2 else 1
        copied = np.uint64(S.OFLAG_COPIED)
        out = l1.copy()
        lines: list[str] = []
        for index, l1e in enumerate(l1.tolist()):
            l2_off = l1e & S.L1E_OFFSET_MASK
            if not l2_off:
                continue
            rc = int(self.refs[l2_off // cs])
            want = l1e | S.OFLAG_COPIED if rc == 1 else l1e & ~S.OFLAG_COPIED
            if want != l1e:
                lines.append(f"OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={l1e:x} "
                             f"refcount={rc}")
                out[index] = np.uint64(want)
            table = self.l2_table(l2_off)
            std = table[::w]
            offsets = std & np.uint64(S.L2E_OFFSET_MASK)
            plain = ((std & np.uint64(S.OFLAG_COMPRESSED)) == 0) & (offsets != 0)
            if not plain.any():
                continue
            counts = self.refs[(offsets[plain] // np.uint64(cs)).astype(np.int64)]
            has = (std[plain] & copied) != 0
            bad = has != (counts == 1)
            if not bad.any():
                continue
            slots = np.flatnonzero(plain)[bad]
            for slot, rc_v in zip(slots.tolist(), counts[bad].tolist(), strict=True):
                entry = int(table[slot * w])
                lines.append(f"OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc_v}")
                table[slot * w] = np.uint64(entry ^ S.OFLAG_COPIED)
        return out, lines

    # -- the commit ------------------------------------------------------------------------------

    def write_new(self, offset: int, data: bytes) -> None:
        """Queue ``data`` for clusters from alloc(); written first thing in commit()."""
        self.pending.append((offset, data))

    def set_snapshots(self, snapshots: list[S.SnapshotEntry]) -> None:
        self.snapshots = snapshots
        self.snapshots_changed = True

    def commit(self, *, active_l1: np.ndarray[Any, Any] | None = None,
               size: int | None = None, fix_flags: bool = True) -> list[str]:
        """Write the new state in the crash-safe order described in the module docstring.

        ``active_l1`` replaces the active L1 (its COPIED flags are recomputed);
        ``size`` the virtual size; ``fix_flags=False`` leaves COPIED flags alone
        (``check -r leaks``). Returns the COPIED-flag lines.
        """
        h = self.header
        cs = self.cs
        l1 = self.l1 if active_l1 is None else active_l1
        if size is not None:
            self.size = size
        # the old L1, snapshot table and refcount structures are free in the new state
        self.add_range(h.l1_table_offset, h.l1_size * 8, -1)
        if self.snapshots_changed and h.nb_snapshots:
            self.add_range(h.snapshots_offset, self.old_table_size, -1)
        self.add_range(h.refcount_table_offset, h.refcount_table_clusters * cs, -1)
        for off in self.old_blocks:
            self.add_range(off, cs, -1)
        if int(self.refs.min(initial=0)) < 0:
            raise CorruptImage(f"{self.what}: a refcount would drop below zero", path=self.path,
                               hint="run 'vmforge check' on it")
        lines: list[str] = []
        if fix_flags:
            l1, lines = self.fix_copied(l1)
        l1 = self._relocate_changed_tables(l1)
        l1_offset = self.alloc(len(l1) * 8) if len(l1) else 0
        snap_offset, snap_blob = h.snapshots_offset, b""
        if self.snapshots_changed:
            snap_blob = b"".join(normalise_entry(s, self.size, h.version).pack()
                                 for s in self.snapshots)
            if len(snap_blob) > S.MAX_SNAPSHOTS_TABLE:
                raise LimitExceeded("snapshot table larger than 64 MiB", path=self.path)
            snap_offset = self.alloc(len(snap_blob)) if self.snapshots else 0
        rt_offset, rt_clusters, blocks = self._place_refcounts()
        limit = (1 << self.bits) - 1
        if int(self.refs.max(initial=0)) > limit:
            raise LimitExceeded(
                f"{self.what}: a refcount would exceed refcount_bits={self.bits}",
                path=self.path, hint="raise it first: vmforge amend -o refcount_bits=16")
        # 1. new structures into free space
        for off, data in self.pending:
            pwrite_all(self.fd, data, off)
        if len(l1):
            pwrite_all(self.fd, l1.astype(">u8").tobytes(), l1_offset)
        if snap_blob:
            pwrite_all(self.fd, snap_blob, snap_offset)
        self._write_refcounts(rt_offset, rt_clusters, blocks)
        # 2. amend only: L2 tables that snapshots still use are changed in place, the
        # part that reads the same in both states before the switch, the rest after it
        late: list[tuple[int, np.ndarray[Any, Any]]] = []
        for off, early in self.l2_early.items():
            if self.refs[off // cs] == 0:
                continue  # only the active state used it, and it has its own copy now
            table = self.l2[off]
            if not np.array_equal(early, self.l2_orig[off]):
                pwrite_all(self.fd, early.astype(">u8").tobytes(), off)
            if not np.array_equal(early, table):
                late.append((off, table))
        os.fdatasync(self.fd)
        # 3. the switch
        nb = len(self.snapshots)
        if self.new_header is None:
            pwrite_all(self.fd, _SWITCH.pack(self.size, h.crypt_method, len(l1), l1_offset,
                                             rt_offset, rt_clusters, nb, snap_offset if nb else 0),
                       _SWITCH_OFFSET)
        else:
            pwrite_all(self.fd, self._header_blob(replace(
                self.new_header, size=self.size, l1_size=len(l1), l1_table_offset=l1_offset,
                refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
                nb_snapshots=nb, snapshots_offset=snap_offset if nb else 0)), 0)
        os.fdatasync(self.fd)
        # 4. after the switch
        for off, table in late:
            pwrite_all(self.fd, table.astype(">u8").tobytes(), off)
        self._release()
        os.fdatasync(self.fd)
        return lines

    def _relocate_changed_tables(self, l1: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Active L2 tables whose entries change go to new clusters (copy-on-write).

        So no table the old header reaches is modified in place: a crash before the
        switch leaves the old state untouched. The copy has refcount 1 (COPIED in the
        L1 entry); the original loses the active state's reference, and the data
        clusters keep their counts (each L1 table reaching them still counts once).
        """
        out = l1.copy()
        for index, l1e in enumerate(l1.tolist()):
            off = l1e & S.L1E_OFFSET_MASK
            table = self.l2.get(off) if off else None
            if table is None or np.array_equal(table, self.l2_orig[off]):
                continue
            new = self.alloc(self.cs)
            self.write_new(new, table.astype(">u8").tobytes())
            self.add_range(off, self.cs, -1)
            out[index] = np.uint64(new | S.OFLAG_COPIED)
        return out

    def _header_blob(self, header: S.Header) -> bytes:
        """Header, extensions and backing name, laid out as qemu lays them out."""
        exts = b"".join(e.pack() for e in self.new_extensions) + bytes(8)
        length = header.header_length if header.version >= 3 else S.V2_HEADER_LENGTH
        name = self.backing_name
        header = replace(header, backing_file_offset=length + len(exts) if name else 0,
                         backing_file_size=len(name))
        blob = header.pack() + exts + name
        if len(blob) > self.cs:
            raise OutputError(f"{self.path}: header and backing name do not fit one cluster")
        return blob

    def _place_refcounts(self) -> tuple[int, int, list[int]]:
        """Allocate refcount blocks and table that cover every used cluster, themselves too."""
        cs = self.cs
        per_block = cs * 8 // self.bits
        blocks = 1
        while True:
            table_clusters = max(1, -(-blocks * 8 // cs))
            rt_offset = self.alloc(table_clusters * cs)
            offsets = [self.alloc(cs) for _ in range(blocks)]
            used = np.flatnonzero(self.refs > 0)
            end = int(used[-1]) + 1 if len(used) else 1
            needed = -(-end // per_block)
            if needed <= blocks:
                return rt_offset, table_clusters, offsets
            self.add_range(rt_offset, table_clusters * cs, -1)
            for off in offsets:
                self.add_range(off, cs, -1)
            blocks = needed

    def _write_refcounts(self, rt_offset: int, rt_clusters: int, blocks: list[int]) -> None:
        cs = self.cs
        per_block = cs * 8 // self.bits
        for b, off in enumerate(blocks):
            counts = np.zeros(per_block, dtype=np.uint64)
            part = self.refs[b * per_block:(b + 1) * per_block]
            counts[:len(part)] = part
            pwrite_all(self.fd, S.pack_refcounts(counts, self.bits), off)
        table = np.zeros(rt_clusters * cs // 8, dtype=np.uint64)
        table[:len(blocks)] = blocks
        pwrite_all(self.fd, table.astype(">u8").tobytes(), rt_offset)

    def _release(self) -> None:
        """Punch clusters the old state used and the new does not; cut a free tail."""
        cs = self.cs
        n = len(self.stored_old)
        freed = np.flatnonzero((self.stored_old[:n] > 0) & (self.refs[:n] == 0))
        if len(freed):
            breaks = np.flatnonzero(np.diff(freed) != 1) + 1
            for run in np.split(freed, breaks):
                punch_hole(self.fd, int(run[0]) * cs, len(run) * cs)
        used = np.flatnonzero(self.refs > 0)
        end = (int(used[-1]) + 1) * cs if len(used) else cs
        if end < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, end)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Qcow2Update:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalise_entry(snap: S.SnapshotEntry, current_size: int, version: int) -> S.SnapshotEntry:
    """The entry as QEMU rewrites it: 24 bytes of known extra data, unknown extra kept.

    Fields missing from an old entry get QEMU's defaults (block/qcow2-snapshot.c,
    qcow2_read_snapshots): vm_state_size_large from the 32-bit field, disk_size the
    image's current size, icount "none".
    """
    extra = snap.extra_data
    large = snap.vm_state_size_large
    disk = snap.disk_size if snap.disk_size is not None else current_size
    icount = int.from_bytes(extra[16:24], "big") if len(extra) >= 24 else ICOUNT_NONE
    known = _EXTRA.pack(large, disk, icount)
    return S.SnapshotEntry(snap.l1_table_offset, snap.l1_size, snap.id_str, snap.name,
                           snap.date_sec, snap.date_nsec, snap.vm_clock_nsec,
                           snap.vm_state_size, known + extra[24:])


def _first_run(free: np.ndarray[Any, Any], n: int) -> int | None:
    """Index of the first run of ``n`` True values, or None."""
    if not free.any():
        return None
    padded = np.concatenate([[False], free, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    fits = np.flatnonzero(ends - starts >= n)
    return int(starts[fits[0]]) if len(fits) else None
