"""The BAT (2.5) and sector bitmaps (2.4.2) as the reader scans them, without numpy.

A BAT is an ``array.array`` of host-order integers (util/tables.py). Reading an image
must not import numpy (~0.09 s of a ``vmforge convert``'s start-up), yet a BAT may hold
millions of entries, so every scan here follows the number of runs, not of entries:

- the state of every entry (bits 0-2) is gathered at once from the entries' low bytes
  (a strided memoryview copy and a ``bytes.translate``), one byte per entry; the end
  of a run of equal states is then a regular-expression search for the first other
  byte, done in C;
- a run of present blocks that lie one after another in the file is measured by
  comparing whole slices of the table with the series it should equal (a memcmp),
  doubling then halving the slice, as the qcow2 reader measures its L2 runs;
- a sector bitmap stays packed: the end of a run of set or clear bits is found by
  searching for the first byte that is not all set (all clear), also in C.
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Iterator

from ...util import tables
from . import structs as S

#: _STATE[b]: the State field (bits 0-2, 2.5.1 BAT_STATE_MASK) of an entry
#: whose least significant byte is b
_STATE = bytes(b & S.BAT_STATE_MASK for b in range(256))
#: where an entry's least significant byte sits among its 8 bytes in host order
_LOW = 0 if sys.byteorder == "little" else 7
#: _OTHER[v] finds the first byte that is not v (a state, 0-7)
_OTHER = [re.compile(b"[^\\x%02x]" % v) for v in range(8)]
#: one past the largest value an 8-byte entry holds: a series must not pass it
_ENTRY_LIMIT = 1 << 64


def payload_entries(bat: array[int], blocks: int, ratio: int) -> array[int]:
    """The payload block entries of ``bat``, block ``b`` at index ``b``: the sector
    bitmap entry that follows every ``ratio`` payload entries (2.5) is taken out, and
    the padding entries of a differencing disk's last chunk cut off. Two C passes."""
    payload = bat[:]
    del payload[ratio::ratio + 1]
    del payload[blocks:]
    return payload


def bitmap_entries(bat: array[int], ratio: int) -> array[int]:
    """The sector bitmap entries of ``bat``, chunk ``c`` at index ``c`` (2.5)."""
    return bat[ratio::ratio + 1]


def states(entries: array[int]) -> bytes:
    """One byte per entry: its State field (2.5.1), gathered without a loop."""
    if not entries:
        return b""
    low = memoryview(entries).cast("B")[_LOW::entries.itemsize]
    return low.tobytes().translate(_STATE)


def same_end(values: bytes, i: int, end: int) -> int:
    """The end of the run of bytes equal to ``values[i]`` that starts at ``i`` (< end),
    at most ``end``; ``values`` holds states (bytes 0-7)."""
    found = _OTHER[values[i]].search(values, i + 1, end)
    return end if found is None else found.start()


def state_runs(st: bytes, first: int, last: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, state)`` for the runs of equal states in ``[first, last)``."""
    i = first
    while i < last:
        j = same_end(st, i, last)
        yield i, j, st[i]
        i = j


def contiguous_runs(table: array[int], first: int, last: int,
                    step: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, first entry)`` for the runs of ``[first, last)`` whose entries
    step evenly by ``step`` (blocks that follow one another in the file)."""
    i = first
    while i < last:
        entry = table[i]
        if i + 1 < last and table[i + 1] == entry + step:
            j = i + tables.even_run(table, i, last, step)
        else:  # (even_run's first test, inline: blocks written in any order stay cheap)
            j = i + 1
        yield i, j, entry
        i = j


__all__ = ["bitmap_entries", "contiguous_runs", "payload_entries",
           "same_end", "state_runs", "states"]
