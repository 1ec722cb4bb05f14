"""What the safe inspector finds in a file, independent of how it is printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Reference:
    """A name inside an image that points at another file (SECURITY.md: never followed
    in untrusted mode). ``field`` names where it was found."""

    kind: str  # "backing-file", "data-file", "extent", "parent"
    field: str  # e.g. "qcow2 header backing_file_offset", "VMDK descriptor extent 2"
    value: str


@dataclass(slots=True)
class FormatFacts:
    """One format's reading of its headers, without touching guest data or other files."""

    format: str
    virtual_size: int | None
    subformat: str | None = None
    references: list[Reference] = field(default_factory=list)
    #: facts that make an image unsafe to use as it is: {"corrupt": "corrupt bit set"}
    hazards: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Check:
    """One named safety check and its outcome."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class InspectReport:
    """The inspector's verdict on one file or stream."""

    name: str
    file_size: int
    format: str | None = None
    subformat: str | None = None
    virtual_size: int | None = None
    references: list[Reference] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def safe(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file-size": self.file_size,
            "format": self.format,
            "subformat": self.subformat,
            "virtual-size": self.virtual_size,
            "references": [{"kind": r.kind, "field": r.field, "value": r.value}
                           for r in self.references],
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "details": self.details,
            "safe": self.safe,
        }
