"""``clone`` and ``overlay``: many VMs from one golden image.

A linked clone is an overlay whose backing file is the base, so N VMs start from one
base without copying it (the base stays immutable: VMs write to their overlays). A
full clone is a flat, independent copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..engine.copy import CopyStats, Progress
from ..errors import OutputError, UsageError
from ..formats import get_format
from ..formats.base import file_data_runs
from .convert import convert
from .create import create
from .image import Image, open_image
from .output import atomic_output


def linked_clone(base: str, dest: str, fmt: str = "qcow2", *, base_fmt: str | None = None,
                 options: Mapping[str, str] | None = None, absolute: bool = False,
                 untrusted: bool = False) -> str:
    """Create ``dest``, an overlay on ``base``; returns the backing name stored in it.

    The name is relative to ``dest``'s directory unless ``absolute``, so a directory
    holding base and clones can be moved as a whole. The base's format is recorded
    explicitly (probed now, when the user names the file, never re-probed later).
    """
    format_cls = get_format(fmt)
    if not format_cls.capabilities.backing:
        raise UsageError(f"{format_cls.name} images cannot have a backing file",
                         hint="choose a format with overlays: qcow2, vpc, vhdx or vmdk")
    if os.path.exists(dest):
        raise UsageError(f"{dest} already exists", hint="choose a new name or remove it first")
    with open_image(base, base_fmt, untrusted=untrusted) as img:
        recorded_fmt = img.format
    target = os.path.abspath(base)
    name = target if absolute else os.path.relpath(target, os.path.dirname(os.path.abspath(dest)))
    create(dest, format_cls.name, None, options, backing=name, backing_fmt=recorded_fmt)
    return name


def full_clone(base: str, dest: str, fmt: str | None = None, *, base_fmt: str | None = None,
               options: Mapping[str, str] | None = None,
               progress: Progress | None = None, untrusted: bool = False) -> CopyStats:
    """A flat copy of ``base`` (its whole chain) in ``fmt`` (default: the base's format).

    When the base stands alone in a single file and nothing is to change (same format,
    no options), the clone is the file itself, copied sparsely: internal snapshots
    with their VM state, bitmaps and every other detail survive, which a conversion
    (qemu-img's or vmforge's) would drop.
    """
    if os.path.exists(dest):
        raise UsageError(f"{dest} already exists", hint="choose a new name or remove it first")
    with open_image(base, base_fmt, untrusted=untrusted) as img:
        fmt = fmt or img.format
        same = (get_format(fmt).name == img.format and not options
                and len(img.chain.layers) == 1 and _single_file(img))
        size = img.virtual_size
    if same:
        copied = _copy_file(base, dest, progress)
        return CopyStats(planned_bytes=size, read_bytes=copied, written_bytes=copied)
    return convert(base, dest, fmt, src_fmt=base_fmt, options=options, progress=progress,
                   untrusted=untrusted)


def _single_file(img: Image) -> bool:
    """True when the image is one file (no VMDK extent files, no qcow2 data file)."""
    top = img.top
    own = os.path.realpath(top.path)
    for extent in getattr(top, "extents", None) or ():
        host = getattr(extent, "host", None)
        if host is not None and os.path.realpath(host.path) != own:
            return False
    return getattr(top, "data_file_name", None) is None


def _copy_file(src: str, dest: str, progress: Progress | None) -> int:
    """Copy the data ranges of ``src`` into a new ``dest`` (holes stay holes)."""
    copied = 0
    with atomic_output(dest) as tmp:
        fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd_in).st_size
            fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd_out, size)
                for start, end, is_data in file_data_runs(fd_in, 0, size):
                    pos = start
                    while is_data and pos < end:
                        n = os.copy_file_range(fd_in, fd_out, end - pos, pos, pos)
                        if n <= 0:
                            raise OutputError(f"{dest}: copy stopped at offset {pos}")
                        pos += n
                        copied += n
                        if progress is not None:
                            progress(pos, size)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
    return copied
