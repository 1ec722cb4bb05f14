"""``dd``: copy a window of one image (skip, count in blocks of bs) into a new image.

qemu-img dd's semantics: the output is a new image in the chosen format whose size is
the copied length; ``skip`` blocks of the input are passed over; without ``count``
everything to the end of the input is copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from ..engine.copy import ChainSource, CopyStats, RangeReader, copy
from ..errors import UsageError
from ..formats import get_format
from ..model import Extent, align_up
from .image import open_image
from .output import atomic_output, finishing


class WindowSource:
    """``[offset, offset+length)`` of a chain, seen as a disk starting at 0."""

    def __init__(self, inner: ChainSource, offset: int, length: int) -> None:
        self.inner = inner
        self.offset = offset
        self.virtual_size = length
        self.name = inner.name

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        for ext in self.inner.iter_extents(self.offset + start, length):
            yield replace(ext, start=ext.start - self.offset)

    def reader(self) -> RangeReader:
        return _WindowReader(self.inner.reader(), self.offset)

    def bottom_depth(self) -> int:
        return self.inner.bottom_depth()


class _WindowReader:
    def __init__(self, inner: RangeReader, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.inner.readinto(self.offset + offset, buf)


def dd(src: str, dest: str, *, bs: int = 512, count: int | None = None, skip: int = 0,
       src_fmt: str | None = None, out_fmt: str = "raw", untrusted: bool = False) -> CopyStats:
    """Copy ``count`` blocks of ``bs`` bytes from block ``skip`` of ``src`` into new ``dest``."""
    if bs <= 0:
        raise UsageError("bs must be positive")
    if count is not None and count < 0 or skip < 0:
        raise UsageError("count and skip must not be negative")
    format_cls = get_format(out_fmt)
    with open_image(src, src_fmt, untrusted=untrusted) as img:
        start = skip * bs
        if start > img.virtual_size:
            raise UsageError(f"skip={skip} starts past the end of {src} ({img.virtual_size} bytes)")
        length = img.virtual_size - start
        if count is not None:
            length = min(length, count * bs)
        source = WindowSource(ChainSource(img.chain), start, length)
        with atomic_output(dest) as tmp, \
                finishing(format_cls.create(tmp, align_up(length, 512), {}, None, None),
                          dest) as writer:
            return copy(source, writer, explicit_zeroes=False)
