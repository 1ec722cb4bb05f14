"""Tables of fixed-width unsigned integers (L1/L2, BAT, grain tables) without numpy.

Writers keep their tables in :class:`array.array`: importing numpy costs a new
``vmforge convert`` 70-100 ms, more than the rest of its start-up, and a writer only
fills, updates and serialises its tables, which ``array`` does in C (``bytes(n)``
initialisers, ``array * n``, slice assignment, ``byteswap``).

An array has no byte order of its own: its items are C integers in the host's order.
Tables stay in host order in memory, so that reading or updating an entry is plain
indexing, and the on-disk order is applied at the boundary: a big-endian table (qcow2
L1/L2 and refcount table, VHD BAT) read on a little-endian host is byte-swapped once
by :func:`from_bytes`, and :func:`to_bytes` swaps a copy when writing it out (one C
pass over the table, leaving the table itself as it was).
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Iterator
from typing import Literal

Order = Literal["little", "big"]

#: array typecode of each width in bytes. The C types behind 'I' and 'L' differ in
#: size between platforms, so the codes are chosen by their item size here.
_CODES: dict[int, str] = {}
for _code in "QLIHB":
    _CODES[array(_code).itemsize] = _code
del _code


def typecode(width: int) -> str:
    """The array typecode of unsigned integers of ``width`` bytes (1, 2, 4 or 8)."""
    return _CODES[width]


def zeros(width: int, count: int) -> array[int]:
    """``count`` zero entries of ``width`` bytes each."""
    return array(_CODES[width], bytes(width * count))


def filled(width: int, count: int, value: int) -> array[int]:
    """``count`` entries of ``width`` bytes, each ``value``."""
    return array(_CODES[width], [value]) * count


def series(width: int, start: int, count: int, step: int) -> array[int]:
    """``start, start + step, ...``: ``count`` entries of ``width`` bytes.

    Built without a Python integer per entry (which costs ~90 ns each for entries
    with high flag bits set, such as qcow2's COPIED bit): a Python int holding the
    entries as little-endian lanes of ``width`` bytes is added lane by lane by
    CPython's big-integer addition, since no lane carries into the next while every
    entry fits its width (checked first, as array would).
    """
    if step == 0:
        return filled(width, count, start)
    if count < 64 or step < 0:
        return array(_CODES[width], range(start, start + count * step, step))
    last = start + (count - 1) * step
    if start < 0 or last >> (8 * width):
        raise OverflowError(f"{last} does not fit in {width} bytes")
    ramp, ones = _lanes(width, step, count)
    lanes = ramp + start * ones
    return from_bytes(lanes.to_bytes(width * count, "little"), width, "little")


def _lanes(width: int, step: int, count: int) -> tuple[int, int]:
    """``0, step, 2*step, ...`` and ``1, 1, 1, ...`` (``count`` lanes) as little-endian
    ints, kept for reuse: a writer asks for a few shapes (a whole L2 table...) often."""
    key = (width, step, count)
    found = _LANES.get(key)
    if found is None:
        ramp = array(_CODES[width], range(0, count * step, step))
        if sys.byteorder != "little":
            ramp.byteswap()
        found = (int.from_bytes(ramp.tobytes(), "little"),
                 int.from_bytes((1).to_bytes(width, "little") * count, "little"))
        if len(_LANES) >= 16:
            _LANES.clear()
        _LANES[key] = found
    return found


#: (width, step, count) -> lanes for series()
_LANES: dict[tuple[int, int, int], tuple[int, int]] = {}


#: even_run: the longest slice compared at once (tables can hold millions of entries;
#: the series a compare needs is built for it, about 5 ns an entry)
_RUN_CHUNK = 4096
#: even_run: shorter series are built directly; longer ones in power-of-two lengths,
#: whose shapes ``series`` keeps, and sliced
_RUN_SMALL = 64


def even_run(table: array[int], i: int, last: int, step: int, limit: int | None = None) -> int:
    """How many entries from ``i`` (at least 1, at most ``last - i``) read ``table[i]``,
    ``table[i] + step``, ``table[i] + 2 * step``...; with a ``step``, only entries below
    ``limit`` count (default: what the entries' width holds), so that a series never
    runs into a sentinel value, a flag bit or past the width.

    Allocation tables (qcow2 L2, VMDK grain tables, VHD/VHDX/Parallels BATs, the VDI
    block map) are mostly runs of blocks stored one after another or left unallocated;
    a reader measures each run with this instead of looking at every entry. Whole
    slices of the table are compared with the series (array == array compares items in
    C), doubling the slice while they match and halving inside the first slice that
    does not, so the Python work follows the number of runs, not of entries.
    """
    entry = table[i]
    avail = last - i
    if step:
        if limit is None:
            limit = 1 << (8 * table.itemsize)
        if entry >= limit:
            return 1
        avail = min(avail, (limit - 1 - entry) // step + 1)
    if avail <= 1 or table[i + 1] != entry + step:
        return 1
    width = table.itemsize
    n = size = 2
    while n < avail:
        size = min(size, avail - n)
        want = _shaped_series(width, entry + n * step, size, step)
        got = table[i + n:i + n + size]
        if got != want:
            # got[:good] matches, got[:bad] does not: halve to the first mismatch
            good, bad = 0, size
            while bad - good > 1:
                mid = (good + bad) // 2
                if got[good:mid] == want[good:mid]:
                    good = mid
                else:
                    bad = mid
            return n + good
        n += size
        size = min(2 * size, _RUN_CHUNK)
    return n


def _shaped_series(width: int, start: int, count: int, step: int) -> array[int]:
    """``series(width, start, count, step)``, built from the shapes ``series`` keeps."""
    if not step:
        return filled(width, count, start)
    if count < _RUN_SMALL or not count & (count - 1):
        return series(width, start, count, step)
    whole = 1 << count.bit_length()  # the next power of two, if its series fits the width
    if (start + (whole - 1) * step) >> (8 * width):
        return series(width, start, count, step)
    return series(width, start, whole, step)[:count]


def from_bytes(data: bytes | bytearray | memoryview, width: int, order: Order) -> array[int]:
    """A table stored in ``order`` (its length a multiple of ``width``) as host integers."""
    table = array(_CODES[width])
    table.frombytes(data)
    if order != sys.byteorder:
        table.byteswap()
    return table


def to_bytes(table: array[int], order: Order) -> bytes:
    """The table's bytes in ``order``; the table itself is left as it is."""
    if order == sys.byteorder:
        return table.tobytes()
    swapped = table[:]
    swapped.byteswap()
    return swapped.tobytes()


def stored_view(table: array[int], order: Order) -> bytes | memoryview:
    """The table's bytes in ``order`` for writing out: a view of the table itself (no
    copy) when the host stores integers that way, else a byte-swapped copy. A grain
    table of a large disk is then written without a second copy of it in memory."""
    if order == sys.byteorder:
        return memoryview(table).cast("B")
    return to_bytes(table, order)


def unpack_bits(data: bytes | bytearray, bitorder: Order) -> bytearray:
    """One byte, 0 or 1, per bit of ``data`` (8 per byte), as ``numpy.unpackbits`` gives.

    ``bitorder`` "big" takes each byte's most significant bit first, "little" its least
    significant. Eight C-level passes (a translate and a strided copy each), whatever
    the length: a sector bitmap of a few KiB costs microseconds.
    """
    out = bytearray(8 * len(data))
    for j in range(8):
        out[j::8] = data.translate(_BIT[7 - j if bitorder == "big" else j])
    return out


def pack_bits(flags: bytes | bytearray, bitorder: Order) -> bytes:
    """Inverse of :func:`unpack_bits`: ``flags`` holds 0 or 1 per byte; a last partial
    byte is padded with clear bits."""
    if len(flags) % 8:
        flags = bytes(flags) + bytes(8 - len(flags) % 8)
    packed = 0
    for j in range(8):
        # every byte of the plane is 0 or 1: shifting the whole number moves each
        # byte's bit within that byte, never into the next
        packed |= int.from_bytes(flags[j::8], "big") << (7 - j if bitorder == "big" else j)
    return packed.to_bytes(len(flags) // 8, "big")


def bit_runs(bitmap: bytes, first: int, last: int,
             bitorder: Order) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, set)`` for the runs of equal bits ``[first, last)`` of a bitmap
    (a VHD or VHDX sector bitmap): bit n is in byte n // 8, its least significant bit
    first with ``bitorder`` "little", its most significant first with "big".

    The bitmap stays packed (a "big" one is bit-reversed per byte first, one C pass): a
    run's end is found inside its first byte by bit arithmetic, else by searching for
    the first whole byte that is not all clear (or all set), in C.
    """
    if bitorder == "big":
        bitmap = bitmap.translate(_REVERSED)
    end_byte = -(-last // 8)
    i = first
    while i < last:
        at = i >> 3
        value = bitmap[at] >> (i & 7) & 1
        fill = 0xFF if value else 0
        differ = (bitmap[at] ^ fill) >> (i & 7)  # bits from i on that end the run
        if differ:
            j = i + _lowest_bit(differ)
        else:
            found = _OTHER_BYTE[value].search(bitmap, at + 1, end_byte)
            j = last if found is None else \
                8 * found.start() + _lowest_bit(bitmap[found.start()] ^ fill)
        j = min(j, last)
        yield i, j, bool(value)
        i = j


def _lowest_bit(x: int) -> int:
    """The position of the lowest set bit of ``x`` (> 0)."""
    return (x & -x).bit_length() - 1


#: _OTHER_BYTE[v] finds the first byte of a bitmap that is not all v bits
_OTHER_BYTE = [re.compile(b"[^\\x00]"), re.compile(b"[^\\xff]")]
#: each byte with its bits in reverse order
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))

#: _BIT[s][b] is bit s of byte b
_BIT = [bytes((b >> s) & 1 for b in range(256)) for s in range(8)]
