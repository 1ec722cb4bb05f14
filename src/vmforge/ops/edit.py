"""Changing an existing image in place: one writer, finished on success, aborted otherwise.

Every in-place operation (resize, commit, rebase) checks what it can before it opens
the image for writing, so a refusal leaves the file exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..errors import ImageNotFound, ReadOnlyImage
from ..formats import ImageWriter, get_format
from ..formats.base import ImageReader
from ..model import ExtentKind
from .output import finishing


def require_writable(path: str) -> None:
    """Refuse early (nothing opened for writing) when the file cannot be written."""
    if not os.path.exists(path):
        raise ImageNotFound("no such file", path=path)
    if not os.access(path, os.W_OK):
        raise ReadOnlyImage("the file is read-only", path=path,
                            hint="check its permissions, or work on a copy")


@contextlib.contextmanager
def edit_image(path: str, fmt: str) -> Iterator[ImageWriter]:
    """The format's writer on the existing image ``path``; finished when the block succeeds."""
    require_writable(path)
    with finishing(get_format(fmt).open_for_write(path), path) as writer:
        yield writer


def own_data_ranges(layer: ImageReader, start: int, length: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of what this layer itself stores as data in the range."""
    for ext in layer.iter_extents(start, length):
        if ext.kind is ExtentKind.DATA and not ext.hole:
            yield ext.start, ext.length
