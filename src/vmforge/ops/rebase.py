"""``rebase``: give an overlay another backing file, keeping what the guest sees.

Safe mode (the default) compares, everywhere the overlay stores nothing, the old
backing chain with the new one and copies into the overlay whatever would change, so
the guest-visible bytes stay the same; ``backing=""`` flattens (no backing file left).
Unsafe mode (``unsafe``, qemu-img's -u) only rewrites the reference, for when the
backing file was moved or renamed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..engine.chain import resolve_backing_path
from ..errors import UsageError
from ..formats import BackingRef, get_format
from ..model import ExtentKind, align_down, align_up
from .create import require_backing_format
from .edit import edit_image, require_writable
from .image import Image, open_image

#: bytes compared at a time
_STEP = 1 << 20


def rebase(path: str, backing: str, backing_fmt: str | None = None, fmt: str | None = None, *,
           unsafe: bool = False, untrusted: bool = False) -> int:
    """Point ``path`` at ``backing`` ("" for none); returns the bytes copied into it.

    Raises UsageError for a missing -F, a new backing file of another size (safe mode:
    rebasing across sizes changes what the guest sees past the shorter end; use
    ``unsafe`` if that is meant), and anything the images' opening raises. Nothing is
    written when it refuses.
    """
    require_writable(path)
    ref = None
    if backing:
        if backing_fmt is None:
            raise UsageError("backing file specified without backing format",
                             hint="add -F with the new backing file's format")
        ref = BackingRef(backing, get_format(backing_fmt).name)
    elif backing_fmt:
        raise UsageError("a backing format was given without a backing file")
    with open_image(path, fmt, follow_backing=not unsafe, untrusted=untrusted) as img:
        fmt = img.format
        if not get_format(fmt).capabilities.backing:
            raise UsageError(f"{fmt} images have no backing file to change")
        if ref is not None:
            require_backing_format(fmt, ref.format)
        if unsafe:
            copied = 0
            with edit_image(path, fmt) as writer:
                writer.set_backing(ref)
            return copied
        with contextlib.ExitStack() as stack:
            new: Image | None = None
            if ref is not None:
                new = stack.enter_context(
                    open_image(resolve_backing_path(path, ref.filename), ref.format))
                if new.virtual_size != img.virtual_size:
                    raise UsageError(
                        f"the new backing file is {new.virtual_size} bytes but {path} is "
                        f"{img.virtual_size}",
                        hint="resize one of them first, or use -u to change only the reference")
            with edit_image(path, fmt) as writer:
                copied = 0
                g = writer.granularity
                step = align_up(_STEP, g)
                for start, end in _unallocated(img, g):
                    for pos in range(start, end, step):
                        n = min(step, end - pos)
                        old = img.read(pos, n)
                        now = new.read(pos, n) if new is not None else bytes(n)
                        if old == now:
                            continue
                        for b in range(0, n, g):  # only the clusters that differ
                            if old[b:b + g] != now[b:b + g]:
                                writer.write(pos + b, old[b:b + g])
                                copied += min(g, n - b)
                writer.set_backing(ref)
    return copied


def _unallocated(img: Image, granularity: int) -> Iterator[tuple[int, int]]:
    """Granularity-aligned ranges touching something the top layer does not store.

    Rounding out to whole clusters is safe: the bytes written are read through the
    whole old chain, so what the overlay already holds is written back unchanged.
    """
    size = img.virtual_size
    run: list[int] | None = None
    for ext in img.top.iter_extents(0, size):
        if ext.kind is not ExtentKind.UNALLOCATED:
            continue
        lo, hi = align_down(ext.start, granularity), min(align_up(ext.end, granularity), size)
        if run is not None and lo <= run[1]:
            run[1] = max(run[1], hi)
            continue
        if run is not None:
            yield run[0], run[1]
        run = [lo, hi]
    if run is not None:
        yield run[0], run[1]
