"""``check``: metadata consistency, answered by the format that has metadata to check."""

from __future__ import annotations

from ..formats import OpenOptions, open_layer
from ..model.check import CheckResult


def check(path: str, fmt: str | None = None, *, untrusted: bool = False) -> CheckResult:
    """Check one image file (backing files are not opened; nothing is written).

    Raises UnsupportedFeature("checks") for formats without metadata (qemu-img exit 63).
    """
    with open_layer(path, fmt, OpenOptions(untrusted=untrusted)) as reader:
        return reader.check()
