"""``snapshot``: internal snapshots (qemu-img snapshot -l/-c/-a/-d), qcow2 only."""

from __future__ import annotations

import os

from ..errors import ImageNotFound, UnsupportedFeature
from ..formats.qcow2 import snapshot as qsnap
from ..formats.qcow2.structs import SnapshotEntry
from ..model.info import SnapshotInfo
from .image import open_image


def require_qcow2(path: str, fmt: str | None, action: str, *, untrusted: bool = False,
                  hint: str = "only qcow2 stores internal snapshots; convert it first") -> None:
    """Refuse anything but qcow2 (and, ``untrusted``, images naming other files).

    The image is opened once the way every command opens it, so untrusted mode
    refuses a backing or data file reference before anything is written.
    """
    if not os.path.lexists(path):
        raise ImageNotFound("no such file", path=path)
    with open_image(path, fmt, follow_backing=False, untrusted=untrusted) as img:
        name = img.format
    if name != "qcow2":
        raise UnsupportedFeature(f"{action} {name} images", path=path, hint=hint)


def _info(s: SnapshotEntry) -> SnapshotInfo:
    return SnapshotInfo(id=s.id_str, name=s.name, vm_state_size=s.vm_state_size_large,
                        date_sec=s.date_sec, date_nsec=s.date_nsec,
                        vm_clock_nsec=s.vm_clock_nsec, icount=s.icount, disk_size=s.disk_size)


def list_snapshots(path: str, fmt: str | None = None, *,
                   untrusted: bool = False) -> list[SnapshotInfo]:
    """The snapshots stored in ``path``, in table order."""
    require_qcow2(path, fmt, "listing snapshots in", untrusted=untrusted)
    return [_info(s) for s in qsnap.list_snapshots(path)]


def create_snapshot(path: str, name: str, fmt: str | None = None, *,
                    untrusted: bool = False) -> SnapshotInfo:
    """Snapshot the active state as ``name`` (names need not be unique, as in qemu-img)."""
    require_qcow2(path, fmt, "creating snapshots in", untrusted=untrusted)
    return _info(qsnap.create(path, name))


def apply_snapshot(path: str, key: str, fmt: str | None = None, *,
                   untrusted: bool = False) -> SnapshotInfo:
    """Revert the active state to snapshot ``key`` (an id, else a name)."""
    require_qcow2(path, fmt, "applying snapshots in", untrusted=untrusted)
    return _info(qsnap.apply(path, key))


def delete_snapshot(path: str, key: str, fmt: str | None = None, *,
                    untrusted: bool = False) -> SnapshotInfo:
    """Delete the first snapshot named ``key`` (names only, as qemu-img snapshot -d)."""
    require_qcow2(path, fmt, "deleting snapshots in", untrusted=untrusted)
    return _info(qsnap.delete(path, key))
