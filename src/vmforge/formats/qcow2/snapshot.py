"""Internal snapshots of qcow2 images: create, apply, delete (qcow2.txt "Snapshots").

Behaviour follows qemu-img 7.2 (block/qcow2-snapshot.c, block/snapshot.c, qemu-img.c):

* create: the new id is one more than the largest numeric id; names need not be
  unique (qemu-img accepts duplicates); the active L1 is copied into new clusters and
  every cluster it reaches gains a reference; date from the wall clock in
  microseconds, VM clock 0, no VM state, extra data with disk_size and icount 0
  (qemu-img leaves icount 0, it is not "none").
* lookup: apply tries an id first, then a name; delete matches names only (qemu-img
  snapshot -d uses bdrv_snapshot_find); the first match wins.
* apply: the active state becomes a copy of the snapshot's L1, the virtual size the
  snapshot's disk_size (qemu 7.2 resizes the same way).
* delete: the snapshot's references are dropped; clusters nobody else uses are freed.

All writes go through update.Qcow2Update, which orders them so that a crash leaves
either the old or the new state (see its module docstring).
"""

from __future__ import annotations

import time

import numpy as np

from ...errors import CorruptImage, ImageError, OptionError
from . import structs as S
from .update import Qcow2Update

# QEMUSnapshotInfo.name is char[256] in QEMU: longer names would be cut silently there.
MAX_NAME_BYTES = 255


class SnapshotNotFound(ImageError):
    """No snapshot has this id or name."""

    hint = "list them with 'vmforge snapshot -l'"


def find(snapshots: list[S.SnapshotEntry], key: str, path: str | None = None, *,
         by_id: bool = True) -> int:
    """Index of the snapshot whose id is ``key``, else the first named ``key``.

    ``by_id=False`` matches names only: qemu-img snapshot -d looks snapshots up with
    bdrv_snapshot_find, which compares names only, while -a (qcow2_snapshot_goto)
    tries the id first.
    """
    if by_id:
        for i, s in enumerate(snapshots):
            if s.id_str == key:
                return i
    for i, s in enumerate(snapshots):
        if s.name == key:
            return i
    raise SnapshotNotFound(f"snapshot '{key}' not found", path=path)


def new_id(snapshots: list[S.SnapshotEntry]) -> str:
    """One more than the largest id read as a number (QEMU's find_new_snapshot_id, strtoul)."""
    top = 0
    for s in snapshots:
        digits = ""
        for ch in s.id_str.lstrip():
            if not ch.isdigit():
                break
            digits += ch
        top = max(top, int(digits) if digits else 0)
    return str(top + 1)


def create(path: str, name: str, *, now_us: int | None = None) -> S.SnapshotEntry:
    """Add a snapshot of the active state named ``name``; returns its entry."""
    if len(name.encode()) > MAX_NAME_BYTES:
        raise OptionError(f"snapshot name is longer than {MAX_NAME_BYTES} bytes",
                          hint="qemu would cut it short; choose a shorter name")
    if now_us is None:
        now_us = time.time_ns() // 1000
    with Qcow2Update(path, "creating a snapshot") as up:
        if len(up.snapshots) >= S.MAX_SNAPSHOTS:
            raise OptionError(f"image already has {S.MAX_SNAPSHOTS} snapshots")
        l1 = up.l1
        up.walk(l1, +1)
        l1_offset = up.alloc(len(l1) * 8) if len(l1) else 0
        entry = S.SnapshotEntry(
            l1_table_offset=l1_offset, l1_size=len(l1), id_str=new_id(up.snapshots), name=name,
            date_sec=now_us // 1_000_000, date_nsec=now_us % 1_000_000 * 1000, vm_clock_nsec=0,
            vm_state_size=0,
            extra_data=(0).to_bytes(8, "big") + up.size.to_bytes(8, "big") + bytes(8))
        if len(l1):
            # the copy carries no COPIED flags: they only mean something in the active L1
            copy = l1 & ~np.uint64(S.OFLAG_COPIED)
            up.write_new(l1_offset, copy.astype(">u8").tobytes())
        up.set_snapshots([*up.snapshots, entry])
        up.commit()
        return entry


def apply(path: str, key: str) -> S.SnapshotEntry:
    """Make snapshot ``key`` (id or name) the active state; returns its entry."""
    with Qcow2Update(path, "applying a snapshot") as up:
        snap = up.snapshots[find(up.snapshots, key, path)]
        size = snap.disk_size if snap.disk_size is not None else up.size
        span = up.geo.l2_span
        if -(-size // span) > snap.l1_size:
            raise CorruptImage(f"snapshot '{snap.name}' has an L1 table too small for its disk "
                               "size", path=path)
        sn_l1 = up.read_l1(snap.l1_table_offset, snap.l1_size)
        up.walk(sn_l1, +1)
        up.walk(up.l1, -1)
        # QEMU only grows the active L1 (qcow2_grow_l1_table) and pads it with zeros
        active = np.zeros(max(len(up.l1), snap.l1_size), dtype=np.uint64)
        active[:snap.l1_size] = sn_l1
        up.commit(active_l1=active, size=size)
        return snap


def delete(path: str, key: str) -> S.SnapshotEntry:
    """Remove the first snapshot named ``key``; returns the entry removed."""
    with Qcow2Update(path, "deleting a snapshot") as up:
        index = find(up.snapshots, key, path, by_id=False)
        snap = up.snapshots[index]
        up.walk(up.read_l1(snap.l1_table_offset, snap.l1_size), -1)
        up.add_range(snap.l1_table_offset, snap.l1_size * 8, -1)
        up.set_snapshots(up.snapshots[:index] + up.snapshots[index + 1:])
        up.commit()
        return snap


def list_snapshots(path: str) -> list[S.SnapshotEntry]:
    """The snapshot table as stored (read-only; no consistency check)."""
    from ..base import OpenOptions
    from .reader import Qcow2Reader

    reader = Qcow2Reader(path, OpenOptions())
    try:
        return list(reader.snapshots)
    finally:
        reader.close()
