"""Consistency check of a qcow2 image, reporting like ``qemu-img check``.

Every host cluster's expected reference count is rebuilt from the metadata (header,
L1/L2 tables of the active state and of every snapshot, data and compressed
clusters, refcount structures, snapshot table, bitmaps) and compared with the stored
refcounts: stored < expected is a corruption, stored > expected a leak, exactly as
QEMU's qcow2-refcount.c classifies them. Nothing is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import CorruptImage, VmforgeError
from ...model.check import CheckResult
from . import structs as S
from .reader import Qcow2Reader


class _Refs:
    """Expected refcounts. A reference to a region ending a cluster or more past the end
    of the file is a corruption and is not counted (QEMU's qcow2_inc_refcounts_imrt)."""

    def __init__(self, clusters: int, cs: int, file_size: int = 0,
                 res: CheckResult | None = None) -> None:
        self.cs = cs
        self.counts = np.zeros(max(clusters, 1), dtype=np.uint64)
        self.file_size = file_size
        self.res = res
        self.highest = -1  # highest cluster referenced (QEMU compares up to it)

    def _past_end(self, offset: int, length: int) -> bool:
        if self.res is None or offset + length - self.file_size < self.cs:
            return False
        self.res.corruptions += 1
        self.res.messages.append(
            "ERROR: counting reference for region exceeding the end of the file by one cluster "
            f"or more: offset {offset:#x} size {length:#x}")
        return True

    def _grow(self, n: int) -> None:
        if n > len(self.counts):
            grown = np.zeros(max(n, len(self.counts) * 2), dtype=np.uint64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def add_range(self, offset: int, length: int) -> None:
        if length <= 0 or self._past_end(offset, length):
            return
        first = offset // self.cs
        last = (offset + length - 1) // self.cs
        self.highest = max(self.highest, last)
        self._grow(last + 1)
        self.counts[first:last + 1] += np.uint64(1)

    def add_clusters(self, clusters: np.ndarray[Any, Any]) -> None:
        if self.res is not None and len(clusters):
            beyond = clusters * np.uint64(self.cs) + np.uint64(self.cs) >= np.uint64(
                self.file_size + self.cs)
            for c in clusters[beyond].tolist():
                self._past_end(c * self.cs, self.cs)
            clusters = clusters[~beyond]
        if len(clusters) == 0:
            return
        self.highest = max(self.highest, int(clusters.max()))
        self._grow(int(clusters.max()) + 1)
        np.add.at(self.counts, clusters.astype(np.int64), np.uint64(1))


@dataclass
class Analysis:
    """A check's verdict plus what repair needs: stored and expected refcount per cluster."""

    result: CheckResult
    stored: np.ndarray[Any, Any]
    expected: np.ndarray[Any, Any]
    refcount_errors: int = 0  # clusters whose refcount is below the references
    copied_errors: int = 0  # QCOW_OFLAG_COPIED mismatches in the active tables

    @property
    def other_corruptions(self) -> int:
        """Corruptions that are neither refcount nor COPIED-flag errors (not repairable here)."""
        return self.result.corruptions - self.refcount_errors - self.copied_errors


def check_qcow2(reader: Qcow2Reader) -> CheckResult:
    """Check ``reader``'s image (opened on its active state) and return the verdict."""
    return analyse_qcow2(reader).result


def analyse_qcow2(reader: Qcow2Reader) -> Analysis:
    """check_qcow2 with the refcount arrays kept (for repair and in-place updates)."""
    h = reader.header
    cs = reader.geo.cluster_size
    file_size = reader.host.size
    nb_clusters = -(-file_size // cs)
    res = CheckResult(filename=reader.path, format="qcow2")
    refs = _Refs(nb_clusters, cs, file_size, res)
    has_data_file = bool(h.incompatible_features & S.INCOMPAT_DATA_FILE)
    try:
        refs.add_range(0, cs)  # header
        _count_l1(reader, refs, res, h.l1_table_offset, h.l1_size, active=True,
                  has_data_file=has_data_file)
        for snap in reader.snapshots:
            _count_l1(reader, refs, res, snap.l1_table_offset, snap.l1_size, active=False,
                      has_data_file=has_data_file)
        if h.nb_snapshots:
            refs.add_range(h.snapshots_offset, _snapshot_table_size(reader))
        refs.add_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
        stored = _stored_refcounts(reader, refs, res, nb_clusters)
        _count_bitmaps(reader, refs, res)
    except VmforgeError as err:
        res.check_errors += 1
        res.messages.append(f"ERROR {err}")
        empty = np.zeros(0, dtype=np.uint64)
        return Analysis(res, empty, empty)
    # like QEMU: clusters past the end of the file are compared only when referenced
    n = max(nb_clusters, refs.highest + 1)
    expected = np.zeros(n, dtype=np.uint64)
    expected[: len(refs.counts)] = refs.counts[:n]
    have = np.zeros(n, dtype=np.uint64)
    have[: min(n, len(stored))] = stored[:n]
    diff = np.flatnonzero(have != expected)
    refcount_errors = int(np.count_nonzero(have < expected))
    for i in diff.tolist():
        stored_c, exp_c = int(have[i]), int(expected[i])
        if stored_c < exp_c:
            res.corruptions += 1
            res.messages.append(f"ERROR cluster {i} refcount={stored_c} reference={exp_c}")
        else:
            res.leaks += 1
            res.messages.append(f"Leaked cluster {i} refcount={stored_c} reference={exp_c}")
    used = np.flatnonzero((have > 0) | (expected > 0))
    res.image_end_offset = (int(used[-1]) + 1) * cs if len(used) else 0
    copied_errors = _check_copied(reader, have, res, has_data_file)
    return Analysis(res, have, expected, refcount_errors, copied_errors)


def _snapshot_table_size(reader: Qcow2Reader) -> int:
    size = 0
    for snap in reader.snapshots:
        size += len(snap.pack())
    return size


def _count_l1(reader: Qcow2Reader, refs: _Refs, res: CheckResult, l1_offset: int, l1_size: int,
              *, active: bool, has_data_file: bool) -> None:
    cs = reader.geo.cluster_size
    geo = reader.geo
    refs.add_range(l1_offset, l1_size * 8)
    l1 = reader.read_l1(l1_offset, l1_size)
    if active:
        res.total_clusters = -(-reader.header.size // cs)
    offset_mask, shift = S.compressed_fields(geo.cluster_bits)
    sector_mask = (1 << (62 - shift)) - 1
    for l1e in l1.tolist():
        l2_off = l1e & S.L1E_OFFSET_MASK
        if not l2_off:
            continue
        if l2_off % cs:
            res.corruptions += 1
            res.messages.append(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; "
                                "L1 entry corrupted")
            continue
        refs.add_range(l2_off, cs)
        table = np.frombuffer(reader.l2_table(l2_off), dtype=np.uint64)
        w = 2 if geo.extended_l2 else 1
        std = table[::w]
        compressed = (std & np.uint64(S.OFLAG_COMPRESSED)) != 0
        offsets = std & np.uint64(S.L2E_OFFSET_MASK)
        allocated = (~compressed) & (offsets != 0)
        # compressed clusters: each host cluster the stored bytes touch gets a reference
        for entry in std[compressed].tolist():
            c_off = entry & offset_mask
            sectors = ((entry >> shift) & sector_mask) + 1
            refs.add_range(c_off & ~511, sectors * 512)
            if entry & S.OFLAG_COPIED:
                res.corruptions += 1
                res.messages.append(f"ERROR: coffset=0x{c_off:x}: copied flag must never be set "
                                    "for compressed clusters")
        misaligned = allocated & ((offsets % np.uint64(cs)) != 0)
        for entry in offsets[misaligned].tolist():
            res.corruptions += 1
            res.messages.append(f"ERROR offset={entry:x}: Data cluster is not properly aligned; "
                                "L2 entry corrupted.")
            if not has_data_file:
                refs.add_range(entry, cs)  # QEMU still counts the (unaligned) range
        good = allocated & ~misaligned
        if not has_data_file:
            refs.add_clusters(offsets[good] // np.uint64(cs))
        if active:
            res.allocated_clusters += int(good.sum() + misaligned.sum() + compressed.sum())
            res.compressed_clusters += int(compressed.sum())
            res.fragmented_clusters += int(compressed.sum())
            plain = offsets[allocated]
            if len(plain) > 1:
                res.fragmented_clusters += int(
                    (plain[1:] != plain[:-1] + np.uint64(cs)).sum())


def _stored_refcounts(reader: Qcow2Reader, refs: _Refs, res: CheckResult,
                      nb_clusters: int) -> np.ndarray[Any, Any]:
    """The refcounts the image claims, for every host cluster the table covers."""
    cs = reader.geo.cluster_size
    per_block = reader.refcounts_per_block
    limit = max(nb_clusters, len(refs.counts))
    stored = np.zeros(limit, dtype=np.uint64)
    for i, off in enumerate(reader.refcount_table().tolist()):
        if not off:
            continue
        if off % cs:
            res.corruptions += 1
            res.messages.append(f"ERROR refcount block {i} is not cluster aligned; "
                                "refcount table entry corrupted")
            continue
        if off // cs >= nb_clusters:
            res.corruptions += 1
            res.messages.append(f"ERROR refcount block {i} is outside image")
            continue
        refs.add_range(off, cs)
        first = i * per_block
        if first >= limit:
            continue  # covers only clusters past anything that exists or is referenced
        counts = reader.refcount_block(off)
        n = min(per_block, limit - first)
        stored[first:first + n] = counts[:n]
    return stored


def _count_bitmaps(reader: Qcow2Reader, refs: _Refs, res: CheckResult) -> None:
    """Persistent dirty bitmaps (qcow2.txt "Bitmaps extension"): directory, tables, data."""
    if not reader.header.autoclear_features & S.AUTOCLEAR_BITMAPS:
        return
    for ext in reader.extensions:
        if ext.type != S.EXT_BITMAPS or len(ext.data) < 24:
            continue
        dir_size = int.from_bytes(ext.data[8:16], "big")
        dir_off = int.from_bytes(ext.data[16:24], "big")
        if dir_size > 64 << 20:
            res.check_errors += 1
            return
        refs.add_range(dir_off, dir_size)
        directory = reader.host.pread(dir_off, dir_size)
        pos = 0
        while pos + 24 <= len(directory):
            table_off = int.from_bytes(directory[pos:pos + 8], "big")
            table_size = int.from_bytes(directory[pos + 8:pos + 12], "big")
            name_size = int.from_bytes(directory[pos + 14:pos + 16], "big")
            extra = int.from_bytes(directory[pos + 20:pos + 24], "big")
            refs.add_range(table_off, table_size * 8)
            entries = np.frombuffer(reader.host.pread(table_off, table_size * 8), dtype=">u8")
            offs = entries.astype(np.uint64) & np.uint64(S.L2E_OFFSET_MASK)
            refs.add_clusters(offs[offs != 0] // np.uint64(reader.geo.cluster_size))
            entry_len = 24 + extra + name_size
            pos += entry_len + (-entry_len % 8)


def stored_refcounts(reader: Qcow2Reader, nb_clusters: int) -> np.ndarray[Any, Any]:
    """The stored refcount of every host cluster below ``nb_clusters`` (for reopening)."""
    res = CheckResult(filename=reader.path, format="qcow2")
    refs = _Refs(nb_clusters, reader.geo.cluster_size)
    stored = _stored_refcounts(reader, refs, res, nb_clusters)
    if res.corruptions:
        raise CorruptImage("the refcount table is damaged", path=reader.path,
                           hint="run 'vmforge check' on it")
    return stored[:nb_clusters].copy()


def _refcount_from_blocks(reader: Qcow2Reader, cluster: int) -> int:
    """One stored refcount, read from its refcount block (0 where there is none)."""
    cs = reader.geo.cluster_size
    index, slot = divmod(cluster, reader.refcounts_per_block)
    table = reader.refcount_table()
    if index >= len(table):
        return 0
    off = int(table[index])
    if not off or off % cs or off + cs > reader.host.size:
        return 0
    return int(reader.refcount_block(off)[slot])


def _check_copied(reader: Qcow2Reader, stored: np.ndarray[Any, Any], res: CheckResult,
                  has_data_file: bool) -> int:
    """QCOW_OFLAG_COPIED must be set exactly where the stored refcount is 1."""
    cs = reader.geo.cluster_size
    w = 2 if reader.geo.extended_l2 else 1

    def refcount(offset: int) -> int:
        c = offset // cs
        return int(stored[c]) if c < len(stored) else _refcount_from_blocks(reader, c)

    before = res.corruptions
    l1 = reader.read_l1(reader.header.l1_table_offset, reader.header.l1_size)
    for index, l1e in enumerate(l1.tolist()):
        l2_off = l1e & S.L1E_OFFSET_MASK
        if not l2_off or l2_off % cs:
            continue
        rc = refcount(l2_off)
        if bool(l1e & S.OFLAG_COPIED) != (rc == 1):
            res.corruptions += 1
            res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={index} "
                                f"l1_entry={l1e:x} refcount={rc}")
        if has_data_file:
            continue
        std = np.frombuffer(reader.l2_table(l2_off), dtype=np.uint64)[::w]
        offsets = std & np.uint64(S.L2E_OFFSET_MASK)
        normal = ((std & np.uint64(S.OFLAG_COMPRESSED)) == 0) & (offsets != 0)
        normal &= (offsets % np.uint64(cs)) == 0
        if not normal.any():
            continue
        clusters = (offsets[normal] // np.uint64(cs)).astype(np.int64)
        inside = clusters < len(stored)
        counts = np.where(inside, stored[np.minimum(clusters, len(stored) - 1)], 0)
        for i in np.flatnonzero(~inside).tolist():  # past the end of the file: ask the blocks
            counts[i] = _refcount_from_blocks(reader, int(clusters[i]))
        copied = (std[normal] & np.uint64(S.OFLAG_COPIED)) != 0
        bad = copied != (counts == 1)
        for entry, rc_v in zip(std[normal][bad].tolist(), counts[bad].tolist(), strict=True):
            res.corruptions += 1
            res.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                f"refcount={rc_v}")
    return res.corruptions - before
