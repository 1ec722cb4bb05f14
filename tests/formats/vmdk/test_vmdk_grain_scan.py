"""The grain table scan (scan.grain_runs, even_run) and the check built on it, against
the rules written out one entry at a time.

The scan measures evenly stepping entries a slice at a time, so its edges get tables
built to hit them: a data run that reaches the top of a 32-bit sector number, a
seSparse run whose 12 low cluster bits (entry bits 48-59) wrap, zeroed grains with
different raw values, a hostile entry inside or right after a run, runs that end
exactly at a doubling or halving step. The differential tests against qemu-img map
(test_vmdk_read.py) cover the images qemu writes; hostile seSparse offsets that wrap
past 2**63 or 2**64 are checked against qemu-img here.
"""

from __future__ import annotations

import struct
from array import array
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    map_diff,
    run_vmforge,
    vmforge_json,
)
from vmforge.errors import CorruptImage
from vmforge.formats.vmdk import scan
from vmforge.formats.vmdk import structs as S
from vmforge.formats.vmdk.extents import COWDExtent, HostedSparseExtent, SESparseExtent
from vmforge.util import tables

SECTOR = 512
LOW12 = 0x0FFF << 48  # seSparse: the cluster's low 12 bits
TOP32 = (1 << 32) - 1


# -- the rules, one entry at a time ---------------------------------------------------
def kdmv_unit(entry: int, zeroed_grain: bool) -> tuple[int, int]:
    """VMDK 5.0 "Grain Table Entry" as qemu reads it: 0 unallocated, 1 a zeroed grain
    when the header says so, anything else the grain's sector."""
    if entry == 0:
        return scan.UNALLOC, 0
    if entry == 1 and zeroed_grain:
        return scan.ZERO, 0
    return scan.DATA, entry * SECTOR


def sesparse_unit(entry: int, grains_offset: int) -> tuple[int, int]:
    """qemu 7.2 vmdk_get_cluster_offset for seSparse (4 KiB grains)."""
    top = entry & 0xF000000000000000
    if top == 0:
        if entry:
            raise CorruptImage("bad")
        return scan.UNALLOC, 0
    if top in (0x1000000000000000, 0x2000000000000000):
        return scan.ZERO, 0
    if top == 0x3000000000000000:
        cluster = ((entry & 0x0FFF000000000000) >> 48) | ((entry & 0x0000FFFFFFFFFFFF) << 12)
        # uint64 arithmetic, handed on as int64
        host = ((grains_offset + cluster * 8) * SECTOR) % (1 << 64)
        return scan.DATA, host - (1 << 64) if host >= 1 << 63 else host
    raise CorruptImage("bad")


def reference_runs(units: list[tuple[int, int]], first: int, gb: int,
                   compressed: bool) -> list[tuple[int, int, int, int]]:
    runs: list[list[int]] = []
    for k, (kind, host) in enumerate(units):
        i = first + k
        if runs and runs[-1][2] == kind:
            if kind != scan.DATA:
                joins = True
            else:
                # qemu's offsets are 64-bit: contiguous across a wrap
                joins = not compressed and (host - units[k - 1][1] - gb) % (1 << 64) == 0
            if joins:
                runs[-1][1] = i + 1
                continue
        runs.append([i, i + 1, kind, host])
    return [(a, b, c, d) for a, b, c, d in runs]


# -- extents made without a file --------------------------------------------------------
HOST = SimpleNamespace(path="fake.vmdk", size=1 << 62)


def hosted(grain_sectors: int, zeroed_grain: bool, compressed: bool) -> Any:
    ext = object.__new__(HostedSparseExtent)
    ext.grain_sectors = grain_sectors
    ext.grain_bytes = grain_sectors * SECTOR
    ext.zeroed_grain = zeroed_grain
    ext.compressed = compressed
    ext.host = HOST
    return ext


def cowd(grain_sectors: int) -> Any:
    ext = object.__new__(COWDExtent)
    ext.grain_sectors = grain_sectors
    ext.grain_bytes = grain_sectors * SECTOR
    ext.host = HOST
    return ext


def sesparse(grains_offset: int) -> Any:
    ext = object.__new__(SESparseExtent)
    ext.grain_sectors = 8
    ext.grain_bytes = 8 * SECTOR
    ext.sheader = SimpleNamespace(grains_offset=grains_offset)
    ext.host = HOST
    return ext


# -- 32-bit tables (KDMV, COWD) ---------------------------------------------------------
kdmv_segment = st.one_of(
    st.tuples(st.just("data"), st.integers(1, 300), st.integers(2, 1 << 20)),
    st.tuples(st.just("unalloc"), st.integers(1, 300), st.just(0)),
    st.tuples(st.just("ones"), st.integers(1, 40), st.just(0)),  # zeroed grains (or sector 1)
    st.tuples(st.just("scatter"), st.integers(1, 20), st.integers(2, 1 << 24)),
    st.tuples(st.just("near-top"), st.integers(1, 40), st.just(0)),  # reaches 2**32 - 1
)


def build32(segments: list[tuple[str, int, int]], gs: int) -> array[int]:
    out = array("I")
    for kind, n, base in segments:
        if kind == "data":
            out.extend(base + k * gs for k in range(n))
        elif kind == "unalloc":
            out.extend([0] * n)
        elif kind == "ones":
            out.extend([1] * n)
        elif kind == "scatter":
            out.extend((base * (k + 3)) % TOP32 + 2 for k in range(n))
        else:  # the series would pass 2**32: the next entries wrap to small numbers
            start = TOP32 - (n // 2) * gs
            out.extend((start + k * gs) & TOP32 for k in range(n))
    return out


def draw_slice(data: Any, n: int) -> tuple[int, int]:
    first = data.draw(st.integers(0, n - 1))
    return first, data.draw(st.integers(first + 1, n))


@settings(max_examples=300, deadline=None)
@given(st.lists(kdmv_segment, min_size=1, max_size=12), st.sampled_from([1, 8, 128]),
       st.booleans(), st.booleans(), st.data())
def test_hosted_scan_follows_the_rule(segments, gs, zeroed_grain, compressed, data):
    table = build32(segments, gs)
    first, last = draw_slice(data, len(table))
    ext = hosted(gs, zeroed_grain, compressed)
    units = [kdmv_unit(table[i], zeroed_grain) for i in range(first, last)]
    expected = reference_runs(units, first, gs * SECTOR, compressed)
    assert list(scan.grain_runs(ext, table, first, last)) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(kdmv_segment, min_size=1, max_size=12), st.sampled_from([1, 128]), st.data())
def test_cowd_scan_follows_the_rule(segments, gs, data):
    table = build32(segments, gs)
    first, last = draw_slice(data, len(table))
    units = [kdmv_unit(table[i], False) for i in range(first, last)]
    expected = reference_runs(units, first, gs * SECTOR, False)
    assert list(scan.grain_runs(cowd(gs), table, first, last)) == expected


# -- 64-bit tables (seSparse) -----------------------------------------------------------
def se_data(cluster: int) -> int:
    return 0x3000000000000000 | ((cluster & 0xFFF) << 48) | (cluster >> 12)


se_segment = st.one_of(
    st.tuples(st.just("data"), st.integers(1, 300), st.integers(0, 1 << 30)),
    # contiguous clusters across a wrap of the low 12 bits (entries step unevenly there)
    st.tuples(st.just("wrap"), st.integers(2, 300), st.integers(0, 1 << 20)),
    st.tuples(st.just("unalloc"), st.integers(1, 300), st.just(0)),
    st.tuples(st.just("zero"), st.integers(1, 40), st.integers(0, 3)),
    st.tuples(st.just("scatter"), st.integers(1, 20), st.integers(0, 1 << 40)),
    # contiguous clusters whose host offsets pass 2**63 or 2**64 (a hostile table)
    st.tuples(st.just("offset-wrap"), st.integers(2, 300), st.integers(63, 64)),
)


def build64(segments: list[tuple[str, int, int]], grains_offset: int = 0) -> array[int]:
    out = array("Q")
    for kind, n, base in segments:
        if kind == "data":
            out.extend(se_data(base + k) for k in range(n))
        elif kind == "offset-wrap":
            start = ((1 << base) - grains_offset * SECTOR) // 4096 - n // 2
            out.extend(se_data(start + k) for k in range(n))
        elif kind == "wrap":
            start = (base << 12) + 0x1000 - n // 2
            out.extend(se_data(start + k) for k in range(n))
        elif kind == "unalloc":
            out.extend([0] * n)
        elif kind == "zero":
            # SCSI-unmapped and zero grains, low bits all alike or not
            out.extend((0x1000000000000000 << (k % 2 if base & 1 else 0))
                       | ((k * base) if base & 2 else 0) for k in range(n))
        else:
            out.extend(se_data((base * (k + 7)) % (1 << 60)) for k in range(n))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(se_segment, min_size=1, max_size=12), st.integers(0, 1 << 20), st.data())
def test_sesparse_scan_follows_the_rule(segments, grains_offset, data):
    table = build64(segments, grains_offset)
    first, last = draw_slice(data, len(table))
    units = [sesparse_unit(table[i], grains_offset) for i in range(first, last)]
    expected = reference_runs(units, first, 4096, False)
    assert list(scan.grain_runs(sesparse(grains_offset), table, first, last)) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(se_segment, min_size=1, max_size=8), st.data())
def test_sesparse_hostile_entry_is_never_skipped(segments, data):
    """An invalid entry (top nibble 0 with other bits, or above 3) anywhere in the
    slice fails the scan, also right after or inside what would be an even run."""
    table = build64(segments)
    if data.draw(st.booleans()):
        # a run up to the top of the low 12 cluster bits, then what carrying on the
        # series would give: top nibble 4
        run = data.draw(st.integers(1, 300))
        cluster = (data.draw(st.integers(0, 1 << 30)) << 12) + 0x1000 - run
        table.extend(se_data(cluster + k) for k in range(run))
        table.append(table[-1] + (1 << 48))
        first, last = data.draw(st.integers(0, len(table) - 1)), len(table)
        at = len(table) - 1
    else:
        first, last = draw_slice(data, len(table))
        at = data.draw(st.integers(first, last - 1))
        table[at] = data.draw(st.sampled_from([1, 0x0000100000000000, 0x4000000000000000,
                                               0xF000000000000000,
                                               table[at] | 0x8000000000000000]))
    with pytest.raises(CorruptImage):
        list(scan.grain_runs(sesparse(0), table, first, last))


@settings(max_examples=300, deadline=None)
@given(st.lists(kdmv_segment, min_size=1, max_size=12), st.sampled_from([0, 1, 128]),
       st.data())
def test_even_run_is_exactly_the_even_prefix(segments, step, data):
    """Never longer (the scan would join entries it must not), and not shorter either
    (the scan would stay right, one entry at a time, but slow)."""
    table = build32(segments, max(step, 1))
    i, last = draw_slice(data, len(table))
    entry = table[i]
    if step:  # the caller bounds the series to the entries' width
        last = min(last, i + (TOP32 - entry) // step + 1)
    n = 1
    while i + n < last and table[i + n] == entry + n * step:
        n += 1
    assert tables.even_run(table, i, last, step) == n


# -- check (qemu's vmdk_co_check) on the runs -------------------------------------------
class TableExtent(HostedSparseExtent):
    """A hosted sparse extent whose grain tables are given, not read from a file."""

    def __init__(self, gts: list[array[int] | None], gs: int, file_size: int) -> None:
        self.start = 0
        self.gtes_per_gt = len(next(t for t in gts if t is not None))
        self.grain_sectors = gs
        self.grain_bytes = gs * SECTOR
        self.size = len(gts) * self.gtes_per_gt * self.grain_bytes
        self.zeroed_grain = True
        self.compressed = False
        self.host = SimpleNamespace(path="fake.vmdk", size=file_size)
        self.gd = array("I", range(len(gts)))
        self._gts_given = gts

    def _gt(self, gd_index: int) -> array[int] | None:
        return self._gts_given[gd_index]


@settings(max_examples=200, deadline=None)
@given(st.lists(kdmv_segment, min_size=1, max_size=12), st.sampled_from([1, 128]),
       st.integers(0, 8), st.data())
def test_check_finds_the_first_grain_past_eof(segments, gs, tables_before, data):
    table = build32(segments, gs)
    gts: list[array[int] | None] = [array("I", [0]) * len(table)] * tables_before + [table]
    allocated = [e for e in table if e > 1]
    cut = data.draw(st.sampled_from([*allocated, 0]) if allocated else st.just(0))
    file_size = cut * SECTOR + data.draw(st.integers(-1, 1)) + (1 << 40 if not cut else 0)
    ext = TableExtent(gts, gs, max(file_size, 1))
    expected: list[str] = []
    for i, e in enumerate(table):
        if e > 1 and e * SECTOR >= ext.host.size:
            sector = (tables_before * len(table) + i) * gs
            expected = [f"ERROR: cluster offset for sector {sector} points after EOF"]
            break
    assert ext.check_messages() == expected


# -- hostile seSparse offsets, against qemu-img -----------------------------------------
#: grain table entries poked into the corpus seSparse extent: (index, cluster number as
#: a function of grains_offset). qemu computes host offsets in uint64 and hands them on
#: as int64, so these wrap; qemu-img map prints the wrapped values and joins grains
#: across the wrap, check says "points after EOF", reading fails (or, past 2**64, lands
#: back inside the file and reads fine).
WRAPS = {
    "past-2**64-inside-file": [(0, lambda go: (1 << 52) + 3)],
    "negative": [(0, lambda go: (1 << 51) + 5)],
    "across-2**63": [(4, lambda go: ((1 << 63) - go * SECTOR) // 4096 - 1),
                     (5, lambda go: ((1 << 63) - go * SECTOR) // 4096)],
    "across-2**64": [(4, lambda go: ((1 << 64) - go * SECTOR) // 4096 - 1),
                     (5, lambda go: ((1 << 64) - go * SECTOR) // 4096)],
}


@pytest.mark.parametrize("case", list(WRAPS))
def test_sesparse_wrapped_offsets_like_qemu(corpus_vmdk, tmp_path, case):
    data = bytearray((corpus_vmdk / "sesparse.vmdk").read_bytes())
    h = S.SESparseConstHeader.unpack(data)
    gd_entry = struct.unpack_from("<Q", data, h.grain_dir_offset * SECTOR)[0]
    table = h.grain_tables_offset * SECTOR + (gd_entry & 0xFFFFFFFF) * h.grain_table_size * SECTOR
    for index, cluster in WRAPS[case]:
        struct.pack_into("<Q", data, table + 8 * index, se_data(cluster(h.grains_offset)))
    extent = tmp_path / "ses.vmdk"
    extent.write_bytes(bytes(data))
    desc = tmp_path / "desc.vmdk"
    desc.write_text("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
                    f'createType="seSparse"\n# Extent description\nRW {h.capacity} SESPARSE '
                    f'"{extent.name}"\n')
    ours, theirs = vmforge_json("map", desc), qemu_img_json("map", desc)
    assert ours == theirs, map_diff(ours, theirs)
    q_check, v_check = qemu_img("check", desc, check=False), run_vmforge("check", desc)
    assert v_check.returncode == q_check.returncode, (v_check, q_check)
    assert ("points after EOF" in v_check.stdout) == ("points after EOF" in q_check.stdout)
    expected, out = tmp_path / "q.raw", tmp_path / "v.raw"
    q_conv = qemu_img("convert", "-O", "raw", desc, expected, check=False)
    v_conv = run_vmforge("convert", "-O", "raw", desc, out)
    if q_conv.returncode == 0:
        assert v_conv.returncode == 0, v_conv
        assert_same_bytes(out, expected)
    else:
        assert_clean_error(v_conv, contains="outside the file")
