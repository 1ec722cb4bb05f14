"""Compression codecs in one place, with the fastest installed deflate.

Codec names:
  ``deflate``  raw deflate, no header (qcow2's zlib compression_type, window 2^12 when
               writing as qemu does so qemu's inflate with windowBits -12 reads it)
  ``zlib``     RFC 1950 zlib stream (VMDK grains)
  ``zstd``     Zstandard frames (qcow2 compression_type 1)

Deflate comes from ISA-L (``isal``) when installed, else zlib-ng, else the standard
library; all three produce ordinary deflate streams any inflater reads.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..errors import CorruptImage, UnsupportedFeature


# The codec libraries load on first use, not with this module: opening an image (for
# ``vmforge info``) needs neither ISA-L nor zstandard.
@functools.cache
def _fast_zlib() -> tuple[ModuleType, str]:
    """The fastest installed deflate module and its name (isal, zlib-ng or zlib)."""
    try:
        from isal import isal_zlib

        return isal_zlib, "isal"
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        return zlib_ng, "zlib-ng"
    except ImportError:
        return zlib, "zlib"


@functools.cache
def _zstandard() -> Any:
    """The zstandard module, or None when it is not installed."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a declared dependency
        return None
    return zstandard


def _isal_level(level: int) -> int:
    # ISA-L has levels 0..3; map zlib's 1..9 onto them (1->1, 6->2, 9->3).
    return 0 if level <= 0 else 1 if level <= 4 else 2 if level <= 7 else 3


def compressor(codec: str, level: int | None = None) -> Callable[[bytes | memoryview], bytes]:
    """A thread-safe function compressing one whole unit with ``codec``."""
    if codec == "deflate":
        fast_zlib, backend = _fast_zlib()
        if backend == "isal":
            lvl = _isal_level(1 if level is None else level)

            def deflate_isal(data: bytes | memoryview) -> bytes:
                # window 2^12: qemu inflates qcow2 clusters with windowBits -12
                c = fast_zlib.compressobj(lvl, fast_zlib.DEFLATED, -12)
                return bytes(c.compress(data) + c.flush())

            return deflate_isal
        lvl = 6 if level is None else level

        def deflate_zlib(data: bytes | memoryview) -> bytes:
            c = fast_zlib.compressobj(lvl, zlib.DEFLATED, -12)
            return bytes(c.compress(data) + c.flush())

        return deflate_zlib
    if codec == "zlib":
        fast_zlib, backend = _fast_zlib()
        if backend == "isal":
            lvl = _isal_level(1 if level is None else level)
            return lambda data: bytes(fast_zlib.compress(data, lvl))
        lvl = 6 if level is None else level
        return lambda data: bytes(fast_zlib.compress(data, lvl))
    if codec == "zstd":
        zstd = _zstandard()
        if zstd is None:
            raise UnsupportedFeature("zstd compression", detail="install the 'zstandard' package")
        lvl = 3 if level is None else level
        params = zstd.ZstdCompressionParameters.from_level(lvl, write_content_size=True)
        local = _ThreadLocalCompressor(lambda: zstd.ZstdCompressor(compression_params=params))
        return lambda data: bytes(local.get().compress(data))
    raise UnsupportedFeature(f"compression codec {codec!r}")


class _ThreadLocalCompressor:
    """zstandard compressor objects are not thread-safe; keep one per thread."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        import threading

        self._factory = factory
        self._local = threading.local()

    def get(self) -> Any:
        obj = getattr(self._local, "obj", None)
        if obj is None:
            obj = self._local.obj = self._factory()
        return obj


def decompress(codec: str, stored: bytes | bytearray | memoryview, out_len: int, *, path: str | None = None,
               offset: int | None = None) -> bytes:
    """Decompress one unit to exactly ``out_len`` bytes; trailing bytes after the stream are ignored.

    Raises CorruptImage if the stream is damaged or yields a different length, and never
    produces more than ``out_len`` bytes (a bound against decompression bombs).
    """
    fast_zlib = _fast_zlib()[0]
    zstd = _zstandard() if codec == "zstd" else None
    try:
        if codec in ("deflate", "zlib"):
            wbits = -15 if codec == "deflate" else 15
            d = fast_zlib.decompressobj(wbits)
            out = d.decompress(stored, out_len)
        elif codec == "zstd":
            if zstd is None:
                raise UnsupportedFeature("zstd compression", path=path,
                                         detail="install the 'zstandard' package")
            dobj = zstd.ZstdDecompressor().decompressobj()
            out = dobj.decompress(bytes(stored))
            if len(out) > out_len:
                raise CorruptImage("compressed unit expands past its size", path=path, offset=offset)
        else:
            raise UnsupportedFeature(f"compression codec {codec!r}", path=path)
    except (zlib.error, fast_zlib.error, ValueError, MemoryError) as err:
        raise CorruptImage(f"compressed data cannot be decompressed ({err})", path=path,
                           offset=offset) from err
    except Exception as err:
        if zstd is not None and isinstance(err, zstd.ZstdError):
            raise CorruptImage(f"compressed data cannot be decompressed ({err})", path=path,
                               offset=offset) from err
        raise
    if len(out) != out_len:
        raise CorruptImage(
            f"compressed unit decompresses to {len(out)} bytes, expected {out_len}",
            path=path, offset=offset,
        )
    return bytes(out)
