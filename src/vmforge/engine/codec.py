"""Compression codecs in one place, with the fastest installed deflate.

Codec names:
  ``deflate``  raw deflate, no header (qcow2's zlib compression_type, window 2^12 when
               writing as qemu does so qemu's inflate with windowBits -12 reads it)
  ``zlib``     RFC 1950 zlib stream (VMDK grains)
  ``zstd``     Zstandard frames (qcow2 compression_type 1)

Deflate is written by zlib-ng (``zlib_ng``; libdeflate, ``deflate``, for zlib streams)
when installed, with ISA-L (``isal``) taking the units that do not compress, and read by
ISA-L; the standard library stands in for
either. All of them produce ordinary deflate streams any inflater reads.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..errors import CorruptImage, UnsupportedFeature


# The codec libraries load on first use, not with this module: opening an image (for
# ``vmforge info``) needs neither ISA-L, zlib-ng nor zstandard.
@functools.cache
def _isal() -> ModuleType | None:
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib


@functools.cache
def _zlib_ng() -> ModuleType | None:
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return None
    return zlib_ng


@functools.cache
def _libdeflate() -> ModuleType | None:
    try:
        import deflate
    except ImportError:
        return None
    return deflate


@functools.cache
def _fast_zlib() -> tuple[ModuleType, str]:
    """The fastest installed inflate module and its name (isal, zlib-ng or zlib)."""
    if (isal := _isal()) is not None:
        return isal, "isal"
    if (ng := _zlib_ng()) is not None:
        return ng, "zlib-ng"
    return zlib, "zlib"


@functools.cache
def _zstandard() -> Any:
    """The zstandard module, or None when it is not installed."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a declared dependency
        return None
    return zstandard


# vmforge's default deflate, chosen by measurement (bench/convert.py's OS image, 64 KiB
# units, against zlib level 6 which is what qemu-img writes): zlib-ng level 5 is 2.3-2.9 %
# larger at 0.37-0.41x zlib's time; ISA-L, four times faster again, is 9-11 % larger on
# real binaries, which breaks issue 5's "no more than 5 % larger" target.
DEFAULT_ZLIB_NG_LEVEL = 5
# Where the stream may use deflate's whole 32 KiB window (zlib streams: VMDK grains),
# libdeflate does better still: at its level 5, 0.3-0.6 % smaller than zlib level 6 at
# 0.27x its time on the same data. It has no window setting, so qcow2 cannot use it.
DEFAULT_LIBDEFLATE_LEVEL = 5
# Units whose first 4 KiB do not shrink below 95 % under ISA-L's quickest level are
# compressed data already (archives, media, ciphertext; the benchmark's random chunks):
# zlib-ng would spend 15-18 ms per MiB on them to save under 1 %, so ISA-L takes them.
_PROBE_BYTES = 4096
_INCOMPRESSIBLE = 0.95


def _isal_level(level: int) -> int:
    # ISA-L has levels 0..3; map zlib's 1..9 onto them (1->1, 6->2, 9->3).
    return 0 if level <= 0 else 1 if level <= 4 else 2 if level <= 7 else 3


def _one_shot(module: ModuleType, level: int, wbits: int) -> Callable[[bytes | memoryview], bytes]:
    def deflate(data: bytes | memoryview) -> bytes:
        c = module.compressobj(level, zlib.DEFLATED, wbits)
        return bytes(c.compress(data) + c.flush())

    return deflate


def _libdeflate_zlib(module: ModuleType, level: int, data: bytes | memoryview) -> bytes:
    return bytes(module.zlib_compress(data, level))


def _deflater(wbits: int, level: int | None) -> Callable[[bytes | memoryview], bytes]:
    """Deflate (``wbits`` < 0) or zlib (``wbits`` > 0) compression of one whole unit.

    An explicit ``level`` is zlib's level, applied by zlib-ng (or zlib; ISA-L maps it onto
    its four levels when it is the only fast library). ``None`` is vmforge's default: zlib-ng
    at DEFAULT_ZLIB_NG_LEVEL (libdeflate for zlib streams), with incompressible units
    handed to ISA-L.
    """
    isal, ng, libdeflate = _isal(), _zlib_ng(), _libdeflate()
    full: Callable[[bytes | memoryview], bytes]
    if level is None and wbits == 15 and libdeflate is not None:
        full = functools.partial(_libdeflate_zlib, libdeflate, DEFAULT_LIBDEFLATE_LEVEL)
    elif ng is not None:
        full = _one_shot(ng, DEFAULT_ZLIB_NG_LEVEL if level is None else level, wbits)
    elif isal is not None:
        full = _one_shot(isal, _isal_level(1 if level is None else level), wbits)
        # ISA-L already compresses at its probe's speed: sending incompressible units to
        # its level 1 (below) would save nothing
        return full
    else:
        full = _one_shot(zlib, 6 if level is None else level, wbits)
    if level is not None or isal is None:
        return full
    probe = _one_shot(isal, 0, wbits)
    quick = _one_shot(isal, 1, wbits)
    limit = _PROBE_BYTES * _INCOMPRESSIBLE

    def deflate_default(data: bytes | memoryview) -> bytes:
        view = memoryview(data)
        if len(view) >= 2 * _PROBE_BYTES and len(probe(view[:_PROBE_BYTES])) >= limit:
            return quick(view)
        return full(view)

    return deflate_default


def compressor(codec: str, level: int | None = None) -> Callable[[bytes | memoryview], bytes]:
    """A thread-safe function compressing one whole unit with ``codec``."""
    if codec == "deflate":
        # window 2^12: qemu inflates qcow2 clusters with windowBits -12
        return _deflater(-12, level)
    if codec == "zlib":
        return _deflater(15, level)
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
