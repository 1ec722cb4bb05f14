"""Backing chains: opening them safely and resolving extents through them.

A chain is a list of layers, top first. Where a layer says UNALLOCATED, the layer
below answers; the result carries ``depth``. Opening follows the rules of
../SECURITY.md: backing names are only regular files (never ``json:`` or protocol
names), resolved relative to the image that names them, with a depth limit and loop
detection; in untrusted mode any backing reference is refused before it is opened.

The engine does not know the formats; the caller passes an ``opener`` that turns a
path and an optional format name into a reader (see vmforge.formats.open_layer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Generic, Protocol, TypeVar

from ..errors import BackingChainError, VmforgeError
from ..model import Extent, ExtentKind, coalesce
from ..model.info import BackingRef


class Layer(Protocol):
    """What the engine needs of one layer (formats.base.ImageReader fulfils it)."""

    path: str
    virtual_size: int
    codec: str | None
    backing: BackingRef | None

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]: ...

    def read_host(self, extent: Extent, buf: memoryview) -> None: ...

    def close(self) -> None: ...


#: qemu has no fixed limit; 64 is far beyond any real chain and stops runaway ones.
MAX_CHAIN_DEPTH = 64

_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

L = TypeVar("L", bound=Layer)


class Chain(Generic[L]):
    """Layers of one virtual disk, top first; owns and closes them."""

    def __init__(self, layers: list[L]) -> None:
        if not layers:
            raise ValueError("a chain needs at least one layer")
        self.layers = layers

    @property
    def top(self) -> L:
        return self.layers[0]

    @property
    def virtual_size(self) -> int:
        return self.layers[0].virtual_size

    def iter_extents(
        self, start: int = 0, length: int | None = None, *, max_depth: int | None = None
    ) -> Iterator[Extent]:
        """Resolved extents over ``[start, start+length)``, merged as qemu-img map merges them.

        ``max_depth`` stops resolution at that layer: ranges below it stay UNALLOCATED
        (used by ``convert -B`` to copy only what the top layers hold).
        """
        size = self.virtual_size
        if length is None:
            length = size - start
        end = min(size, start + length)
        if start >= end:
            return iter([])
        limit = len(self.layers) - 1 if max_depth is None else min(max_depth, len(self.layers) - 1)
        merged: Iterator[Extent] = coalesce(self._resolve(0, start, end, limit))
        return merged

    def _resolve(self, depth: int, start: int, end: int, limit: int) -> Iterator[Extent]:
        layer = self.layers[depth]
        for ext in layer.iter_extents(start, end - start):
            if ext.kind is ExtentKind.UNALLOCATED and depth < limit:
                # the backing file shows through, but only as far as it reaches: past its
                # end the range stays unallocated at this depth (as qemu-img map says)
                reach = min(ext.end, self.layers[depth + 1].virtual_size)
                if ext.start < reach:
                    yield from self._resolve(depth + 1, ext.start, reach, limit)
                if reach < ext.end:
                    yield replace(ext.clip(max(ext.start, reach), ext.end), depth=depth)
            elif depth:
                yield replace(ext, depth=depth)
            else:
                yield ext

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> Chain[L]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_backing_path(image_path: str, backing_name: str) -> str:
    """Where a backing name points, relative to the image naming it (as qemu resolves it).

    Raises BackingChainError for protocol or ``json:`` names, which vmforge never follows.
    """
    if backing_name.startswith("json:") or _PROTOCOL.match(backing_name):
        raise BackingChainError(
            f"{image_path}: backing file '{backing_name}' is a protocol or json: name",
            path=image_path,
            hint="vmforge follows only plain file names; rebase the image onto a file",
        )
    directory = os.path.dirname(image_path)
    if os.path.isabs(backing_name) or not directory:
        return backing_name
    return os.path.join(directory, backing_name)


def untrusted_reference(path: str, name: str) -> BackingChainError:
    """The refusal of an image that names a backing file, in untrusted mode."""
    return BackingChainError(
        f"{path}: refers to backing file '{name}' (refused in untrusted mode)", path=path,
        hint="untrusted images must be self-contained; flatten it where it was made")


def open_chain(
    path: str,
    fmt: str | None,
    opener: Callable[[str, str | None], L],
    *,
    untrusted: bool = False,
    follow_backing: bool = True,
    max_depth: int = MAX_CHAIN_DEPTH,
) -> Chain[L]:
    """Open ``path`` and, unless told not to, every backing file below it."""
    layers: list[L] = []
    seen: set[tuple[int, int]] = set()
    try:
        current, current_fmt = path, fmt
        while True:
            layer = opener(current, current_fmt)
            layers.append(layer)
            if len(layers) > 1:
                # Differencing formats also name their parent by identity (VHD/VHDX
                # unique IDs, VMDK CIDs); a child that can check it does so here.
                verify = getattr(layers[-2], "verify_parent", None)
                if verify is not None:
                    verify(layer)
            ident = getattr(getattr(layer, "host", None), "ident", None)
            if ident is not None:
                if ident in seen:
                    raise BackingChainError(
                        f"{path}: backing chain loops back to {current}", path=path)
                seen.add(ident)
            # A differencing layer that could not locate its parent (VHD locators that all
            # miss, a VDI parent known only by UUID) says what it tried, when asked to follow.
            missing = getattr(layer, "missing_parent", None)
            if missing is not None and follow_backing:
                raise missing
            ref = layer.backing
            if ref is None:
                break
            if untrusted:  # refused even when not following: untrusted images stand alone
                raise untrusted_reference(current, ref.filename)
            if not follow_backing:
                break
            if len(layers) > max_depth:
                raise BackingChainError(
                    f"{path}: backing chain deeper than {max_depth} layers", path=path)
            current = resolve_backing_path(layer.path, ref.filename)
            current_fmt = ref.format
    except VmforgeError:
        for layer in layers:
            layer.close()
        raise
    return Chain(layers)
