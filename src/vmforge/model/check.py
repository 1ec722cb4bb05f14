"""The outcome of ``check``, with qemu-img's JSON shape and exit codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXIT_CLEAN = 0
EXIT_NOT_COMPLETED = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63


@dataclass
class CheckResult:
    filename: str
    format: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 1 not completed, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return EXIT_NOT_COMPLETED
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN

    def to_qemu_json(self) -> dict[str, Any]:
        """qemu-img check --output=json: optional counters appear only when non-zero."""
        out: dict[str, Any] = {}
        if self.image_end_offset:
            out["image-end-offset"] = self.image_end_offset
        if self.total_clusters:
            out["total-clusters"] = self.total_clusters
        out["check-errors"] = self.check_errors
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.allocated_clusters:
            out["allocated-clusters"] = self.allocated_clusters
        out["filename"] = self.filename
        out["format"] = self.format
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        if self.compressed_clusters:
            out["compressed-clusters"] = self.compressed_clusters
        return out
