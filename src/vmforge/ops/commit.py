"""``commit``: write an overlay's changes down into its backing file (or a deeper base).

As qemu-img does: without ``base`` the changes go into the direct backing file and the
overlay is emptied afterwards (unless ``keep``); with ``base`` they go into that image
of the chain and every image above it is left as it was. A base smaller than the
overlay grows to the overlay's size first.
"""

from __future__ import annotations

import contextlib
import os

from ..engine.copy import ChainSource, CopyStats, Progress, copy
from ..errors import UnsupportedFeature, UsageError
from ..formats import get_format
from ..formats.base import ImageReader
from .edit import edit_image, require_writable
from .image import open_image


def commit(path: str, fmt: str | None = None, *, base: str | None = None, keep: bool = False,
           progress: Progress | None = None, untrusted: bool = False) -> CopyStats:
    """Commit ``path`` into ``base`` (default: its backing file); returns what was copied.

    Refuses, before writing anything, an image without a backing file, a ``base`` that
    is not in the chain, a read-only base and formats that cannot be written in place.
    """
    with open_image(path, fmt, untrusted=untrusted) as img:
        layers = img.chain.layers
        if len(layers) < 2:
            raise UsageError(f"{path} has no backing file to commit into")
        index = 1 if base is None else _layer_index(layers, base, path)
        target = layers[index]
        if not get_format(target.format_name).capabilities.write:
            raise UnsupportedFeature(f"writing {target.format_name} images", path=target.path)
        require_writable(target.path)
        empty_top = base is None and not keep
        if empty_top:
            require_writable(img.path)
        source = ChainSource(img.chain, max_depth=index - 1)
        child = layers[index - 1]
        # formats that name their parent by a stamp that writes change (VMDK CID, VHDX
        # DataWriteGuid) must point the image above the base at the new stamp
        relink = None if empty_top or not hasattr(child, "verify_parent") else \
            (child.path, child.format_name, child.backing)
        with contextlib.ExitStack() as stack:
            # the overlay is opened for emptying first, so an overlay that cannot be
            # emptied (corrupt, unsupported) is refused before the base is written
            top_writer = stack.enter_context(edit_image(img.path, img.format)) \
                if empty_top else None
            with edit_image(target.path, target.format_name) as writer:
                if writer.virtual_size < img.virtual_size:
                    writer.resize(img.virtual_size)
                stats = copy(source, writer, explicit_zeroes=True, progress=progress)
            if top_writer is not None:
                top_writer.make_empty()
    if relink is not None and relink[2] is not None:
        child_path, child_fmt, ref = relink
        with contextlib.suppress(UnsupportedFeature), edit_image(child_path, child_fmt) as w:
            w.set_backing(ref)  # the same name; the format refreshes the stamp
    return stats


def _layer_index(layers: list[ImageReader], base: str, path: str) -> int:
    want = os.path.realpath(base)
    for i, layer in enumerate(layers[1:], start=1):
        if os.path.realpath(layer.path) == want:
            return i
    raise UsageError(f"'{base}' is not in the backing chain of {path}",
                     hint=f"see 'vmforge info --backing-chain {path}'")
