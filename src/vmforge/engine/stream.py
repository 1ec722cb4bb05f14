"""Turning extents into bytes: the one read loop in vmforge.

Zero-fill, backing fall-through (already resolved by Chain), host reads and
decompression all happen here, so formats never write a read loop of their own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from ..model import Extent
from .chain import Chain
from .codec import decompress

_CACHE_UNITS = 8


class HostFileLike(Protocol):
    """What the engine needs of a layer's file (formats.base.HostFile provides it)."""

    fd: int
    size: int
    path: str


class ExtentStream:
    """Random-access reads of a chain's guest bytes.

    Not thread-safe because of the small cache of decompressed units; give each
    thread its own ExtentStream over the same chain (readers themselves use pread).
    """

    def __init__(self, chain: Chain[Any]) -> None:
        self.chain = chain
        self._units: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    @property
    def virtual_size(self) -> int:
        return self.chain.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)``; past the end of the disk is an error."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with guest bytes from ``offset`` (buf must start zeroed or be overwritten)."""
        length = len(buf)
        if offset < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"read of {length} bytes at {offset} is outside the disk ({self.virtual_size} bytes)")
        for ext in self.chain.iter_extents(offset, length):
            self.read_extent(ext, buf[ext.start - offset: ext.end - offset])

    def verbatim(self, offset: int, length: int) -> tuple[HostFileLike, int] | None:
        """``(file, host offset)`` when guest bytes ``[offset, offset+length)`` lie as they
        are, contiguously, in one file inside its size (the copy engine then copies them
        in the kernel); None when any part is compressed, lies elsewhere, or reads zero
        without the file reading zero there (the reader's ``verbatim_file`` decides)."""
        found: tuple[HostFileLike, int] | None = None
        expect = 0
        for ext in self.chain.iter_extents(offset, length):
            if ext.compressed or ext.host_offset is None:
                return None
            host = self.chain.layers[ext.depth].verbatim_file(ext)
            if host is None:
                return None
            if found is None:
                found, expect = (host, ext.host_offset), ext.host_offset
            elif host is not found[0] or ext.host_offset != expect:
                return None
            expect += ext.length
        if found is None or expect > found[0].size:
            return None
        return found

    def read_extent(self, ext: Extent, out: memoryview) -> None:
        """Write the guest bytes of one resolved extent into ``out`` (len == ext.length)."""
        if ext.reads_zero:
            out[:] = bytes(len(out))
            return
        layer = self.chain.layers[ext.depth]
        if not ext.compressed:
            layer.read_host(ext, out)
            return
        assert ext.host_offset is not None
        key = (ext.depth, ext.host_offset)
        unit = self._units.get(key)
        if unit is None:
            stored = bytearray(ext.stored_length)
            layer.read_host(ext, memoryview(stored))
            assert layer.codec is not None
            unit = decompress(layer.codec, stored, ext.unit_length, path=layer.path,
                              offset=ext.host_offset)
            self._units[key] = unit
            if len(self._units) > _CACHE_UNITS:
                self._units.popitem(last=False)
        else:
            self._units.move_to_end(key)
        out[:] = unit[ext.inner_offset: ext.inner_offset + ext.length]
