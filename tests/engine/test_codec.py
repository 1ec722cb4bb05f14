"""The deflate codec: standard streams, zlib-ng by default, ISA-L for incompressible units."""

from __future__ import annotations

import os
import zlib

import numpy
import pytest

from tests.data.generators import random_bytes, text_bytes
from vmforge.engine import codec

UNIT = 64 * 1024
# (codec, wbits an inflater needs): qcow2 clusters are raw deflate that qemu inflates
# with windowBits -12; VMDK grains are zlib streams
CODECS = [("deflate", -12), ("zlib", 15)]


def _zlib_ng_stream(level: int, wbits: int, data: bytes) -> bytes:
    from zlib_ng import zlib_ng

    c = zlib_ng.compressobj(level, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def _isal_stream(level: int, wbits: int, data: bytes) -> bytes:
    from isal import isal_zlib

    c = isal_zlib.compressobj(level, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def test_default_deflate_is_zlib_ng_with_qcow2s_window():
    data = text_bytes(UNIT, seed=3)
    out = codec.compressor("deflate")(data)
    assert out == _zlib_ng_stream(codec.DEFAULT_ZLIB_NG_LEVEL, -12, data)
    # qemu inflates qcow2 clusters with windowBits -12: a farther match would fail here
    assert zlib.decompressobj(-12).decompress(out) == data


def test_default_zlib_stream_is_libdeflates():
    import deflate

    data = text_bytes(UNIT, seed=3)
    out = codec.compressor("zlib")(data)
    assert out == deflate.zlib_compress(data, codec.DEFAULT_LIBDEFLATE_LEVEL)
    assert zlib.decompress(out) == data


@pytest.mark.parametrize("name,wbits", CODECS)
def test_default_gives_incompressible_units_to_isal(name, wbits):
    data = random_bytes(UNIT, seed=4)
    out = codec.compressor(name)(data)
    assert out == _isal_stream(1, wbits, data)
    assert zlib.decompressobj(wbits).decompress(out) == data


@pytest.mark.parametrize("name,wbits", CODECS)
def test_an_explicit_level_is_zlibs_level_without_the_probe(name, wbits):
    for data in (text_bytes(UNIT, seed=5), random_bytes(UNIT, seed=6)):
        for level in (1, 9):
            out = codec.compressor(name, level)(data)
            assert out == _zlib_ng_stream(level, wbits, data)
            assert zlib.decompressobj(wbits).decompress(out) == data


@pytest.mark.parametrize("name,wbits", CODECS)
def test_default_size_on_real_machine_code_is_within_5_percent_of_zlib_6(name, wbits):
    """Issue 5's size target, on real compiled code (numpy's core extension module)."""
    so = numpy._core._multiarray_umath.__file__ if hasattr(numpy, "_core") else \
        numpy.core._multiarray_umath.__file__
    with open(so, "rb") as f:
        blob = f.read(8 * 1024 * 1024)
    assert len(blob) >= 2 * 1024 * 1024, so
    ours = theirs = 0
    deflate = codec.compressor(name)
    for at in range(0, len(blob) - UNIT + 1, UNIT):
        unit = blob[at:at + UNIT]
        c = zlib.compressobj(6, zlib.DEFLATED, wbits)
        theirs += len(c.compress(unit) + c.flush())
        ours += len(deflate(unit))
    assert ours <= 1.05 * theirs, (ours / theirs, so)


def test_probe_leaves_short_units_to_the_full_compressor():
    data = os.urandom(codec._PROBE_BYTES)
    out = codec.compressor("deflate")(data)
    assert out == _zlib_ng_stream(codec.DEFAULT_ZLIB_NG_LEVEL, -12, data)
