"""Grain tables scanned run by run, without numpy.

A grain table is an ``array.array`` of host-order integers (util/tables.py). Opening a
VMDK to convert or map it then costs no numpy import (0.06-0.09 s of start-up here).

The scan follows the number of runs, not of grains: a run of entries that step evenly
(host-contiguous grains, a row of unallocated or zeroed grains) is measured by
comparing whole slices of the table with the expected series, a few C-level compares
per run. An entry that continues a run without stepping evenly (a seSparse grain whose
12 low cluster bits wrap, a seSparse zero grain with other low bits) is taken alone and
the slices resume after it. Every entry of a run is either checked alone or equal to
an entry of the series that starts at one that was, so a hostile entry is never
skipped.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Protocol

from ...util import tables

# Grain kinds
UNALLOC, ZERO, DATA = 0, 1, 2

#: (first table index, end table index, kind, host byte offset of the first grain; 0
#: unless the run is data)
Run = tuple[int, int, int, int]

#: host offsets are 64-bit in qemu: a hostile seSparse table's grains stay contiguous
#: across a wrap (qemu-img map joins them), so contiguity is compared modulo 2**64
_U64 = (1 << 64) - 1


class GrainRule(Protocol):
    """What a sparse extent's grain table entries mean (SparseExtent and subclasses)."""

    @property
    def gte_width(self) -> int:
        """Bytes per grain table entry."""

    @property
    def grain_bytes(self) -> int:
        """Bytes per grain."""

    @property
    def data_step(self) -> int:
        """What is added to a data entry to point at the next grain on the host."""

    @property
    def compressed(self) -> bool:
        """Each data grain is its own unit (compressed grains)."""

    def grain_unit(self, entry: int) -> tuple[int, int]:
        """(kind, host byte offset or 0) of one entry; raises CorruptImage for an entry
        the format forbids."""

    def even_room(self, entry: int) -> int:
        """How many entries (at least 1) of ``entry, entry + data_step, ...`` stay data
        entries pointing at consecutive grains: the series must not carry out of the
        field that holds the grain's offset."""


def grain_runs(rule: GrainRule, table: array[int], first: int, last: int) -> Iterator[Run]:
    """Runs of grain table entries ``[first, last)``: a run breaks where the kind
    changes, where data stops being contiguous on the host (modulo 2**64, see _U64),
    and around every compressed grain. Raises CorruptImage (from ``grain_unit``) for a
    forbidden entry."""
    width = rule.gte_width
    if table[first:last] == tables.zeros(width, last - first):
        yield first, last, UNALLOC, 0  # common: a table with nothing, or nothing left
        return
    gb = rule.grain_bytes
    i = first
    while i < last:
        entry = table[i]
        kind, host = rule.grain_unit(entry)
        if kind == DATA and rule.compressed:
            yield i, i + 1, kind, host
            i += 1
            continue
        j, cur, cur_host = i, entry, host
        while True:
            if kind == DATA:
                n = tables.even_run(table, j, min(last, j + rule.even_room(cur)),
                                    rule.data_step)
            else:
                n = tables.even_run(table, j, last, 0)
            j += n
            if j >= last:
                break
            nxt = table[j]
            nkind, nhost = rule.grain_unit(nxt)
            if nkind != kind or (kind == DATA and (nhost - cur_host - n * gb) & _U64):
                break
            cur, cur_host = nxt, nhost
        yield i, j, kind, host
        i = j


