"""What ``info`` reports about one image, independent of how it is printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class BackingRef:
    """A reference from an image to its backing file, exactly as stored."""

    filename: str
    format: str | None


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot, with qemu-img's field meanings."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None = None
    disk_size: int | None = None

    def to_qemu_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "icount": self.icount,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        }
        if self.icount is None:
            del out["icount"]
        return out


@dataclass(slots=True)
class ImageInfo:
    """Facts about one image file (one layer of a chain)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None
    dirty: bool | None = False  # None: the format has no such flag (qemu prints none)
    format_specific: dict[str, Any] = field(default_factory=dict)
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
