"""Refcount block packing (structs.pack_refcounts) at every refcount width.

The writer hands it array.array counts (no numpy on the convert path), the in-place
updater numpy ones; both must give the bytes the reader (and so qemu, whose check
the writer tests run at every width) reads back, and a count too wide is refused.
"""

from __future__ import annotations

import random
from array import array

import numpy as np
import pytest

from vmforge.formats.qcow2 import structs as S
from vmforge.util import tables

WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def _counts(bits: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    top = (1 << min(bits, 32)) - 1  # the writer keeps 32-bit counts
    return [rng.choice((0, 1, top, rng.randrange(top + 1))) for _ in range(n)]


@pytest.mark.parametrize("bits", WIDTHS)
def test_packed_block_reads_back(bits: int) -> None:
    n = 4096 * 8 // bits  # one 4 KiB block
    counts = _counts(bits, n, bits)
    packed = S.pack_refcounts(array(tables.typecode(4), counts), bits)
    assert len(packed) == 4096
    assert S.unpack_refcounts(packed, bits).tolist() == counts
    assert S.pack_refcounts(np.array(counts, dtype=np.uint64), bits) == packed
    if bits >= 8:  # big-endian integers of bits/8 bytes
        width = bits // 8
        assert [int.from_bytes(packed[i:i + width], "big")
                for i in range(0, len(packed), width)] == counts
    else:  # least significant bits first within each byte
        per_byte = 8 // bits
        assert [(packed[i // per_byte] >> (i % per_byte * bits)) & ((1 << bits) - 1)
                for i in range(n)] == counts


@pytest.mark.parametrize("bits", [b for b in WIDTHS if b < 32])
def test_a_count_too_wide_is_refused(bits: int) -> None:
    counts = [0] * (4096 * 8 // bits)
    counts[len(counts) // 3] = 1 << bits
    for buffer in (array(tables.typecode(4), counts), np.array(counts, dtype=np.uint64)):
        with pytest.raises(ValueError, match=f"{bits} bits"):
            S.pack_refcounts(buffer, bits)
