"""The extent: the one shape every image takes inside vmforge.

A reader describes a virtual disk as consecutive extents. Each says what a range of
guest bytes is (data stored somewhere, known zeros, or not allocated in this layer)
and, for data, where the bytes live in the host file. Its JSON form is exactly one
entry of ``qemu-img map --output=json`` so the two can be diffed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any


class ExtentKind(enum.Enum):
    """What a range of guest bytes is."""

    DATA = "data"  # bytes stored in a file (maybe compressed)
    ZERO = "zero"  # known to read as zeros in this layer (raw hole, qcow2 zero flag)
    UNALLOCATED = "unallocated"  # not in this layer: the backing file decides, else zeros


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes ``[start, start+length)`` of one kind.

    ``depth`` is the layer of the backing chain that answered (0 = top).
    For compressed data, the bytes are not addressable one by one: ``host_offset`` and
    ``stored_length`` locate the compressed unit, ``unit_length`` is its decompressed
    size, and ``inner_offset`` is where ``start`` falls inside the decompressed unit.
    ``hole`` marks DATA whose host bytes are known to read as zeros (a file-system hole
    under a preallocated cluster): qemu-img map shows it as data and zero, and the
    engine never reads it.
    """

    start: int
    length: int
    kind: ExtentKind
    host_offset: int | None = None
    depth: int = 0
    compressed: bool = False
    stored_length: int = 0
    unit_length: int = 0
    inner_offset: int = 0
    hole: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def present(self) -> bool:
        return self.kind is not ExtentKind.UNALLOCATED

    @property
    def reads_zero(self) -> bool:
        return self.kind is not ExtentKind.DATA or self.hole

    def clip(self, start: int, end: int) -> Extent:
        """The part of this extent inside ``[start, end)`` (which must overlap it)."""
        new_start = max(self.start, start)
        new_end = min(self.end, end)
        delta = new_start - self.start
        if delta == 0 and new_end == self.end:
            return self
        if self.compressed:
            return replace(
                self, start=new_start, length=new_end - new_start,
                inner_offset=self.inner_offset + delta,
            )
        host = self.host_offset + delta if self.host_offset is not None else None
        return replace(self, start=new_start, length=new_end - new_start, host_offset=host)

    def joins(self, nxt: Extent) -> bool:
        """True when ``nxt`` continues this extent so that qemu-img map would merge them."""
        if nxt.start != self.end or nxt.kind is not self.kind or nxt.depth != self.depth:
            return False
        if nxt.hole != self.hole:
            return False
        if self.compressed or nxt.compressed:
            return False
        if self.host_offset is None or nxt.host_offset is None:
            return self.host_offset is None and nxt.host_offset is None
        return nxt.host_offset == self.host_offset + self.length

    def merged(self, nxt: Extent) -> Extent:
        return replace(self, length=self.length + nxt.length)

    def to_qemu_json(self) -> dict[str, Any]:
        """One entry of ``qemu-img map --output=json``."""
        out: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.reads_zero,
            "data": self.kind is ExtentKind.DATA,
        }
        if self.host_offset is not None and not self.compressed:
            out["offset"] = self.host_offset
        return out


def coalesce(extents: Any) -> Any:
    """Merge neighbours that qemu-img map would print as one line (a generator)."""
    pending: Extent | None = None
    for ext in extents:
        if pending is not None and pending.joins(ext):
            pending = pending.merged(ext)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending
