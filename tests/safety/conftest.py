"""Fixtures of the safety tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

_CODE_SUFFIXES = (".py", ".pyc", ".so")


@pytest.fixture
def opened_files() -> Iterator[list[str]]:
    """Every path the process opens while the test body runs (Python's audit hook)."""
    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active[0] and event == "open" and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            # vmforge's own modules load on first use (a format's inspect module, say);
            # reading their code is the interpreter's business, not the image's
            if not path.endswith(_CODE_SUFFIXES):
                seen.append(path)

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the test
    yield seen
    active[0] = False
