"""util.tables: the writers' array.array tables, checked against struct and numpy."""

from __future__ import annotations

import random
import struct
import sys

import numpy as np
import pytest

from vmforge.util import tables

WIDTHS = (1, 2, 4, 8)
STRUCT_CODE = {1: "B", 2: "H", 4: "I", 8: "Q"}


@pytest.mark.parametrize("width", WIDTHS)
def test_typecodes_have_their_width(width: int) -> None:
    assert tables.zeros(width, 3).itemsize == width
    assert list(tables.zeros(width, 3)) == [0, 0, 0]
    top = (1 << (8 * width)) - 1
    assert list(tables.filled(width, 4, top)) == [top] * 4


def _series_cases() -> list[tuple[int, int, int, int]]:
    rng = random.Random(5)
    cases = []
    for width in (2, 4, 8):
        limit = 1 << (8 * width)
        for count in (0, 1, 63, 64, 65, 1000, 8192):
            for step in (0, 1, 512, 1 << 16, -3):
                span = max(count - 1, 0) * step
                low = max(0, -span)
                high = limit - max(span, 0)
                if high <= low:
                    continue
                for start in (low, high - 1, rng.randrange(low, high)):
                    cases.append((width, start, count, step))
    return cases


@pytest.mark.parametrize(("width", "start", "count", "step"), _series_cases())
def test_series_is_the_arithmetic_progression(width: int, start: int, count: int, step: int) -> None:
    got = tables.series(width, start, count, step)
    assert got.itemsize == width
    assert got.tolist() == [start + i * step for i in range(count)]


def test_series_with_flag_bits_and_overflow() -> None:
    # qcow2 L2 entries: COPIED (bit 63) set on cluster offsets, as the writer builds them
    copied = 1 << 63
    got = tables.series(8, copied | 0x50000, 8192, 0x10000)
    assert got.tolist() == [copied | (0x50000 + i * 0x10000) for i in range(8192)]
    with pytest.raises(OverflowError):  # the last entry past 64 bits: refused, not wrapped
        tables.series(8, (1 << 64) - 100, 200, 1)
    with pytest.raises(OverflowError):
        tables.series(4, 0xFFFFFF00, 64, 8)


@pytest.mark.parametrize("width", (2, 4, 8))
@pytest.mark.parametrize("order", ("little", "big"))
def test_bytes_round_trip_in_either_order(width: int, order: tables.Order) -> None:
    rng = random.Random(width)
    values = [rng.randrange(1 << (8 * width)) for _ in range(300)]
    prefix = "<" if order == "little" else ">"
    stored = struct.pack(f"{prefix}{len(values)}{STRUCT_CODE[width]}", *values)
    table = tables.from_bytes(stored, width, order)
    assert table.tolist() == values
    assert tables.to_bytes(table, order) == stored
    assert bytes(tables.stored_view(table, order)) == stored
    assert table.tolist() == values  # writing it out left the table as it was
    if order == sys.byteorder:  # no copy: the view shares the table's memory
        view = tables.stored_view(table, order)
        assert isinstance(view, memoryview) and view.obj is table


@pytest.mark.parametrize("order", ("little", "big"))
@pytest.mark.parametrize("nbytes", (0, 1, 3, 512, 777))
def test_bits_match_numpy(order: tables.Order, nbytes: int) -> None:
    data = random.Random(nbytes).randbytes(nbytes)
    flags = tables.unpack_bits(data, order)
    expected = np.unpackbits(np.frombuffer(data, np.uint8), bitorder=order)
    assert bytes(flags) == expected.tobytes()
    assert tables.pack_bits(flags, order) == data
    for cut in (1, 5, 8):  # a partial last byte is padded with clear bits, as packbits does
        if len(flags) >= cut:
            short = flags[:len(flags) - cut]
            packed = np.packbits(np.frombuffer(bytes(short), np.uint8), bitorder=order)
            assert tables.pack_bits(short, order) == packed.tobytes()
