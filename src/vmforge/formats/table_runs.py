"""Runs of evenly stepping entries in an allocation table, found without numpy.

The VHD BAT, the VDI block map and the Parallels BAT are ``array.array`` tables of
host-order integers (util/tables.py). A reader turns a table into extents run by run:
blocks that are unallocated (the same sentinel, entry after entry) or stored one after
another on the host (each entry ``step`` more than the last). Such a run is measured by
``tables.even_run`` (slices of the table compared with the series in C), so the Python
work follows the number of runs, not of entries: a 2 TiB VHD has a million BAT
entries, a sparse one only a few runs.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from ..util import tables

#: see fragmented(): after this many runs, averaging fewer than _SHORT_RUN entries each
_MANY_RUNS = 1024
_SHORT_RUN = 16


def runs(table: array[int], first: int, last: int, step: int, gaps: tuple[int, ...],
         limit: int) -> Iterator[tuple[int, int, int]]:
    """Maximal runs ``(a, b, entry)`` covering entries ``[first, last)``: ``table[a]`` is
    ``entry`` and each following entry up to ``b`` is the same when ``entry`` is one of
    ``gaps`` (unallocated), else ``step`` more than the one before (and below ``limit``).
    """
    i = first
    while i < last:
        entry = table[i]
        s = 0 if entry in gaps else step
        j = i + 1
        # a run of one (blocks stored out of order) is told without a call
        if j < last and table[j] == entry + s:
            j = i + tables.even_run(table, i, last, s, limit)
        yield i, j, entry
        i = j


def fragmented(count: int, entries: int) -> bool:
    """Whether ``count`` runs found over the first ``entries`` entries are many short
    ones (a table whose blocks were stored in the order they were written, not in disk
    order): a consumer that needs every entry then does better to take the rest of the
    table in one pass (a C-level ``max``, a plain loop) than run by run (~0.3 us each).
    """
    return count >= _MANY_RUNS and count * _SHORT_RUN > entries
