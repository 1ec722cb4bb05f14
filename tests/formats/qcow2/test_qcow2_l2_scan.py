"""The L2 scan (reader._cluster_runs, _subcluster_pieces + _merge) against the rule it
implements, written out one unit at a time.

The scan measures evenly stepping entries a slice at a time, so its edges (a flag bit
that changes inside a contiguous run, offsets near the top of the offset bits, a run
that ends exactly at a doubling or halving step) get tables built to hit them; the
differential tests against qemu-img map cover the images qemu writes.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vmforge.formats.qcow2 import reader as R
from vmforge.formats.qcow2 import structs as S
from vmforge.util import tables

CS = 65536
COPIED, COMPRESSED, ZERO = S.OFLAG_COPIED, S.OFLAG_COMPRESSED, S.OFLAG_ZERO
TOP = ((1 << 56) - CS)  # the highest cluster-aligned host offset


def unit_of(entry: int, data_file: bool) -> tuple[int, int]:
    """qcow2.txt "Standard Cluster Descriptor", one entry: (kind, host or 0)."""
    if entry & COMPRESSED:
        return R._COMPRESSED, 0
    host = entry & S.L2E_OFFSET_MASK
    if entry & ZERO:
        return R._ZERO, host
    if host or (data_file and entry & COPIED):
        return R._DATA, host
    return R._UNALLOC, host


def fake_reader(data_file: bool, extended: bool) -> Any:
    header = SimpleNamespace(incompatible_features=S.INCOMPAT_DATA_FILE if data_file else 0)
    geo = SimpleNamespace(cluster_size=CS, extended_l2=extended)
    return SimpleNamespace(header=header, geo=geo)


# Tables made of segments, so that long even runs (the fast path) and their edges occur.
segment = st.one_of(
    # contiguous data, COPIED on all, some or none of it
    st.tuples(st.just("data"), st.integers(1, 300), st.integers(0, TOP // CS),
              st.sampled_from(["all", "none", "one"])),
    st.tuples(st.just("unalloc"), st.integers(1, 300)),
    st.tuples(st.just("zero"), st.integers(1, 50), st.integers(0, 3)),
    st.tuples(st.just("compressed"), st.integers(1, 5)),
    st.tuples(st.just("near-top"), st.integers(1, 40)),  # offsets that reach bit 56
)


def build(segments: list[tuple[Any, ...]], rng_offset: int) -> array[int]:
    out = array("Q")
    for seg in segments:
        kind, n = seg[0], seg[1]
        if kind == "data":
            base = seg[2] * CS
            for k in range(n):
                host = (base + k * CS) & S.L2E_OFFSET_MASK
                copied = seg[3] == "all" or (seg[3] == "one" and k == n // 2)
                out.append(host | (COPIED if copied else 0))
        elif kind == "unalloc":
            out.extend([0] * n)
        elif kind == "zero":
            host = seg[2] * CS * 7
            out.extend([ZERO | (host + k * CS if host else 0) for k in range(n)])
        elif kind == "compressed":
            out.extend([COMPRESSED | ((rng_offset + k) * 1024) for k in range(n)])
        else:  # the series carries on into the reserved bits 56-61: a hostile table
            start = TOP - (n // 2) * CS
            out.extend([COPIED | (start + k * CS) for k in range(n)])
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(segment, min_size=1, max_size=12), st.integers(0, 1000), st.booleans(),
       st.data())
def test_standard_scan_follows_the_rule(segments, rng_offset, data_file, data):
    table = build(segments, rng_offset)
    first = data.draw(st.integers(0, len(table) - 1))
    last = data.draw(st.integers(first + 1, len(table)))
    units = [(*unit_of(table[i], data_file), table[i], i) for i in range(first, last)]
    expected = reference_runs_with_unit(units, CS)
    got = list(R.Qcow2Reader._cluster_runs(fake_reader(data_file, False), table, first, last))
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(segment, min_size=1, max_size=12), st.integers(0, 1000), st.data())
def test_even_run_is_exactly_the_even_prefix(segments, rng_offset, data):
    """Never longer (the scan would join entries it must not), and not shorter either
    (the scan would stay right, one entry at a time, but slow)."""
    table = build(segments, rng_offset)
    i = data.draw(st.integers(0, len(table) - 1))
    last = data.draw(st.integers(i + 1, len(table)))
    entry = table[i]
    step = data.draw(st.sampled_from([0, CS]))
    n = 1
    while (i + n < last and table[i + n] == entry + n * step
           and (not step or (entry & S.L2E_OFFSET_MASK) + n * step < 1 << 56)):
        n += 1
    limit = entry - (entry & S.L2E_OFFSET_MASK) + (1 << 56)
    assert tables.even_run(table, i, last, step, limit) == n


def reference_runs_with_unit(units: list[tuple[int, int, int, int]],
                             unit: int) -> list[tuple[int, int, int, int, int]]:
    runs: list[list[int]] = []
    for i, (kind, host, desc, cluster) in enumerate(units):
        if runs:
            pk, ph, _, pc = units[i - 1]
            if kind == pk:
                if kind == R._COMPRESSED:
                    joins = cluster == pc
                elif kind == R._DATA:
                    joins = host == ph + unit
                else:
                    joins = (host == 0 and ph == 0) or host == ph + unit
                if joins:
                    runs[-1][1] = i + 1
                    continue
        runs.append([i, i + 1, kind, host, desc])
    return [tuple(r) for r in runs]  # type: ignore[misc]


bitmap = st.one_of(
    st.sampled_from([0, R._ALL_ALLOCATED, R._ALL_ZERO, R._ALL_ALLOCATED | R._ALL_ZERO]),
    st.integers(0, (1 << 64) - 1),
)
ext_cluster = st.tuples(st.sampled_from(["alloc", "none", "compressed"]),
                        st.integers(0, 64), bitmap)


@settings(max_examples=300, deadline=None)
@given(st.lists(ext_cluster, min_size=1, max_size=24), st.data())
def test_extended_scan_follows_the_rule(clusters, data):
    upc = S.EXTL2_SUBCLUSTERS
    sub = CS // upc
    table = array("Q")
    for i, (what, off, bits) in enumerate(clusters):
        if what == "alloc":
            std = (off + i) * CS if off else 0  # off 0: allocated bits but no host
            table.extend([std | COPIED, bits])
        elif what == "none":
            table.extend([0, bits])
        else:
            table.extend([COMPRESSED | (off * 1024), 0])
    n = len(clusters)
    first = data.draw(st.integers(0, n - 1))
    last = data.draw(st.integers(first + 1, n))
    units = []
    for c in range(first, last):
        std, bits = table[2 * c], table[2 * c + 1]
        off = std & S.L2E_OFFSET_MASK
        for s in range(upc):
            if std & COMPRESSED:
                units.append((R._COMPRESSED, 0, std, c))
                continue
            if bits >> (s + 32) & 1:
                kind = R._ZERO
            elif bits >> s & 1:
                kind = R._DATA
            else:
                kind = R._UNALLOC
            units.append((kind, off + s * sub if off else 0, std, c))
    expected = reference_runs_with_unit(units, sub)
    fake = fake_reader(False, True)
    got = list(R._merge(R.Qcow2Reader._subcluster_pieces(fake, table, first, last), sub))
    assert got == expected


def test_refcount_nonzero_counts_match_unpacked_blocks():
    import random

    rng = random.Random(5)
    for bits in (1, 2, 4, 8, 16, 32, 64):
        per_block = CS * 8 // bits
        counts = [rng.choice([0, 0, 1, (1 << bits) - 1, rng.randrange(1 << bits)])
                  for _ in range(per_block)]
        raw = S.pack_refcounts(array("Q", counts), bits)
        for n in (0, 1, 3, 7, 8, 9, per_block // 2 + 1, per_block):
            want = sum(1 for c in counts[:n] if c)
            assert S.count_nonzero_refcounts(raw, bits, n) == want, (bits, n)
