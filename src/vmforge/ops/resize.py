"""``resize``: grow or shrink a disk in place, refusing to drop data unless told to."""

from __future__ import annotations

from ..errors import UsageError
from ..model import parse_size
from .edit import edit_image, own_data_ranges, require_writable
from .image import Image, open_image

#: bytes read at a time when checking that a shrink drops only zeros
_SCAN = 4 << 20


def parse_new_size(spec: str | int, current: int) -> int:
    """``10G`` absolute, ``+1G``/``-1G`` relative to ``current`` (qemu-img's syntax)."""
    if isinstance(spec, int):
        return spec
    text = spec.strip()
    if text[:1] in "+-":
        delta = parse_size(text[1:])
        return current + delta if text[0] == "+" else current - delta
    return parse_size(text)


def resize(path: str, size: str | int, fmt: str | None = None, *, shrink: bool = False,
           force: bool = False, untrusted: bool = False) -> int:
    """Change the virtual size of ``path``; returns the new size.

    Shrinking needs ``shrink`` (as qemu-img's --shrink) and is refused when the image
    itself holds non-zero data past the new end, unless ``force``. Raises UsageError
    for sizes the format cannot take, UnsupportedFeature for formats that cannot be
    resized, ReadOnlyImage for read-only files; nothing is written when it refuses.
    """
    require_writable(path)
    with open_image(path, fmt, follow_backing=False, untrusted=untrusted) as img:
        current, fmt = img.virtual_size, img.format
        new = parse_new_size(size, current)
        if new <= 0:
            raise UsageError("the new image size must be positive")
        if fmt != "raw" and new % 512:
            raise UsageError(f"the new size must be a multiple of 512 for {fmt} images",
                             hint=f"try {new + (-new) % 512}")
        if new < current:
            if not shrink:
                raise UsageError(f"{new} bytes is smaller than the current {current}",
                                 hint="add --shrink to shrink the image (data past the new end "
                                      "is dropped)")
            if not force:
                lost = _first_nonzero(img, new, current - new)
                if lost is not None:
                    raise UsageError(
                        f"shrinking to {new} bytes would drop data stored at offset {lost}",
                        hint="move the data (shrink the file system first) or add --force")
    if new == current:
        return new
    with edit_image(path, fmt) as writer:
        writer.resize(new)
    return new


def _first_nonzero(img: Image, start: int, length: int) -> int | None:
    """Offset of the first non-zero byte this image itself stores in the range, if any."""
    for off, n in own_data_ranges(img.top, start, length):
        pos, end = off, off + n
        while pos < end:
            chunk = img.read(pos, min(_SCAN, end - pos))
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return pos + len(chunk) - len(stripped)
            pos += len(chunk)
    return None
