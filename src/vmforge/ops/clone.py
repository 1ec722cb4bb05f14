"""``clone`` and ``overlay``: many VMs from one golden image.

A linked clone is an overlay whose backing file is the base, so N VMs start from one
base without copying it (the base stays immutable: VMs write to their overlays). A
full clone is a flat, independent copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..engine.copy import CopyStats, Progress
from ..errors import UsageError
from ..formats import get_format
from .convert import convert
from .create import create
from .image import open_image


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
    """A flat copy of ``base`` (its whole chain) in ``fmt`` (default: the base's format)."""
    if os.path.exists(dest):
        raise UsageError(f"{dest} already exists", hint="choose a new name or remove it first")
    if fmt is None:
        with open_image(base, base_fmt, untrusted=untrusted) as img:
            fmt = img.format
    return convert(base, dest, fmt, src_fmt=base_fmt, options=options, progress=progress,
                   untrusted=untrusted)
