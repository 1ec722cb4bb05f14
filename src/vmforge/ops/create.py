"""``create``: a new empty image, maybe an overlay on a backing file."""

from __future__ import annotations

from collections.abc import Mapping

from ..engine.chain import resolve_backing_path
from ..errors import UsageError
from ..formats import BackingRef, get_format
from ..model import align_up
from .image import open_image
from .output import atomic_output, finishing


def backing_ref(backing: str | None, backing_fmt: str | None, dest: str,
                options: Mapping[str, str]) -> tuple[BackingRef | None, int | None]:
    """The backing reference to store and the backing image's size (opened to check it).

    The name is stored as given (relative names stay relative to the new image, as
    qemu-img does); the backing file is opened through that resolution to learn its
    size and format, so a typo fails now rather than at boot.
    """
    backing = backing or options.get("backing_file")
    backing_fmt = backing_fmt or options.get("backing_fmt")
    if not backing:
        if backing_fmt:
            raise UsageError("a backing format was given without a backing file")
        return None, None
    target = resolve_backing_path(dest, backing)
    with open_image(target, backing_fmt) as base:
        if backing_fmt is None:
            # Recording a probed format would let a raw base that a guest filled with an
            # image header turn into that format later (OSSA-2024-002); qemu-img refuses too.
            raise UsageError(
                "backing file specified without backing format",
                hint=f"add -F {base.format} (the format vmforge detects for {backing})")
        return BackingRef(backing, backing_fmt), base.virtual_size


def require_backing_format(fmt: str, backing_fmt: str | None) -> None:
    """Refuse, before anything is written, a parent the format cannot link to."""
    allowed = get_format(fmt).backing_formats
    if allowed is not None and backing_fmt is not None and backing_fmt not in allowed:
        want = " or ".join(_TITLES.get(a, a) for a in allowed)
        raise UsageError(f"a {_TITLES.get(fmt, fmt)} differencing disk needs a {want} parent, "
                         f"not {backing_fmt}",
                         hint="convert the parent first, or use a qcow2 overlay")


#: the names users know these formats by, in messages
_TITLES = {"vpc": "VHD", "vhdx": "VHDX", "vmdk": "VMDK"}


def create(path: str, fmt: str, size: int | None = None, options: Mapping[str, str] | None = None,
           backing: str | None = None, backing_fmt: str | None = None) -> None:
    """Create an image; ``size`` may be omitted when a backing file gives it.

    Raises UsageError, OptionError, ImageError (backing) or OutputError.
    """
    opts = dict(options or {})
    format_cls = get_format(fmt)
    ref, backing_size = backing_ref(backing, backing_fmt, path, opts)
    if ref is not None:
        require_backing_format(format_cls.name, ref.format)
    if size is None:
        if backing_size is None:
            raise UsageError("an image size is needed", hint="add a size such as 10G")
        size = backing_size
    size = align_up(size, 512)  # qemu-img rounds every new image up to whole sectors
    with atomic_output(path) as tmp, \
            finishing(format_cls.create(tmp, size, opts, ref, backing_size), path):
        pass  # an empty image is complete once its metadata is written
