"""The run scan of allocation tables (formats/table_runs.py) and what the VHD, VDI and
Parallels readers build on it, against the rules written out one entry at a time.

The scan measures evenly stepping entries a slice at a time (doubling up to a chunk,
halving inside the first slice that differs), so tables are built to hit its edges:
runs longer than a chunk, runs that end at a doubling or halving step, a series that
would reach a sentinel or the top of 32 bits, one entry off inside a long run, and
tables of blocks stored out of order (runs of one), where the consumers switch to one
pass over the rest. The readers are differential-tested against qemu-img on images of
tens of thousands of entries at the end, so that the long slices run on real files.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.data.qemu import qemu_img, qemu_img_json, qemu_io
from tests.helpers import map_diff, vmforge_json
from vmforge.formats import table_runs
from vmforge.formats.parallels.reader import ParallelsReader
from vmforge.formats.vdi import reader as vdi_reader
from vmforge.formats.vdi import structs as vdi_s
from vmforge.formats.vhd import reader as vhd_reader
from vmforge.formats.vhd import structs as vhd_s
from vmforge.model import ExtentKind
from vmforge.util import tables

TOP32 = 1 << 32
CHUNK = tables._RUN_CHUNK
FREE, ZERO = vdi_s.BLOCK_FREE, vdi_s.BLOCK_ZERO
UNUSED = vhd_s.BAT_UNUSED

#: (step, gaps, limit) as each reader calls the scan: VHD blocks of 2 MiB (4096 sectors
#: after a 512-byte bitmap), VDI host blocks, Parallels v1 (sectors of 1 MiB clusters)
#: and v2 (clusters)
CONFIGS = {
    "vhd": (4097, (UNUSED,), UNUSED),
    "vdi": (1, (FREE, ZERO), vdi_s.FIRST_UNALLOCATED),
    "parallels-v1": (2048, (0,), TOP32),
    "parallels-v2": (1, (0,), TOP32),
}


# -- the rule, one entry at a time ----------------------------------------------------
def reference_runs(table: array[int], first: int, last: int, step: int, gaps: tuple[int, ...],
                   limit: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for i in range(first, last):
        e = table[i]
        if out:
            a, b, e0 = out[-1]
            s = 0 if e0 in gaps else step
            if e == e0 + (b - a) * s and (not s or e < limit):
                out[-1] = (a, b + 1, e0)
                continue
        out.append((i, i + 1, e))
    return out


def even_prefix(table: array[int], i: int, last: int, step: int, limit: int) -> int:
    entry, n = table[i], 1
    while i + n < last and table[i + n] == entry + n * step and (
            not step or entry + n * step < limit):
        n += 1
    return n


# -- tables made of segments that hit the scan's edges ---------------------------------
def segment(config: str) -> st.SearchStrategy[tuple[Any, ...]]:
    step, gaps, limit = CONFIGS[config]
    top = (limit - 1) // step  # the highest first entry of a run of one
    lengths = st.one_of(st.integers(1, 70), st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1]),
                        st.integers(1, 3 * CHUNK))
    return st.one_of(
        st.tuples(st.just("gap"), lengths, st.sampled_from(gaps)),
        st.tuples(st.just("data"), lengths, st.integers(1, max(1, top - 4 * CHUNK))),
        # a long run with one entry off (one more, or a gap) somewhere inside
        st.tuples(st.just("bump"), st.integers(2, 2 * CHUNK), st.integers(1, 1 << 20),
                  st.data()),
        # blocks stored out of order
        st.tuples(st.just("shuffled"), st.integers(1, 300), st.randoms(use_true_random=False)),
        # a series that runs into the limit (a sentinel, or the top of 32 bits)
        st.tuples(st.just("near-limit"), st.integers(1, 200)),
    )


def build(config: str, segments: list[tuple[Any, ...]]) -> array[int]:
    step, gaps, limit = CONFIGS[config]
    out = tables.zeros(4, 0)
    for seg in segments:
        kind, n = seg[0], seg[1]
        if kind == "gap":
            out.extend(tables.filled(4, n, seg[2]))
        elif kind == "data":
            first = min(seg[2], (limit - 1 - (n - 1) * step) if n * step < limit else 1)
            out.extend(array(out.typecode, range(first, first + n * step, step)))
        elif kind == "bump":
            run = array(out.typecode, range(seg[2], seg[2] + n * step, step))
            at = seg[3].draw(st.integers(1, n - 1))
            run[at] = seg[3].draw(st.sampled_from([run[at] + 1, gaps[0], run[at - 1]]))
            out.extend(run)
        elif kind == "shuffled":
            values = [1 + k * step for k in range(n)]
            seg[2].shuffle(values)
            out.extend(array(out.typecode, values))
        else:
            start = limit - (n // 2) * step
            out.extend(array(out.typecode, [min(start + k * step, TOP32 - 1) for k in range(n)]))
    return out


def table_and_range(config: str) -> st.SearchStrategy[tuple[array[int], int, int]]:
    @st.composite
    def make(draw: st.DrawFn) -> tuple[array[int], int, int]:
        table = build(config, draw(st.lists(segment(config), min_size=1, max_size=6)))
        first = draw(st.integers(0, len(table) - 1))
        last = draw(st.one_of(st.just(len(table)), st.integers(first + 1, len(table))))
        return table, first, last
    return make()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_runs_follow_the_rule(config):
    step, gaps, limit = CONFIGS[config]

    @settings(max_examples=100, deadline=None)
    @given(table_and_range(config))
    def check(case: tuple[array[int], int, int]) -> None:
        table, first, last = case
        got = list(table_runs.runs(table, first, last, step, gaps, limit))
        assert got == reference_runs(table, first, last, step, gaps, limit)

    check()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_even_run_is_exactly_the_even_prefix(config):
    """Never longer (the readers would join blocks they must not), nor shorter (the
    readers stay right but take a run in pieces)."""
    step, _, limit = CONFIGS[config]

    @settings(max_examples=100, deadline=None)
    @given(table_and_range(config), st.booleans())
    def check(case: tuple[array[int], int, int], gap: bool) -> None:
        table, i, last = case
        s = 0 if gap else step
        assert tables.even_run(table, i, last, s, limit) == even_prefix(table, i, last, s,
                                                                             limit)

    check()


def test_fragmented_is_many_short_runs():
    assert not table_runs.fragmented(1023, 1023)  # few runs, however short
    assert table_runs.fragmented(1024, 1024)
    assert table_runs.fragmented(1024, 16 * 1024 - 1)
    assert not table_runs.fragmented(1024, 16 * 1024)  # 16 entries a run on average


# -- VHD --------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(table_and_range("vhd"), st.booleans())
def test_vhd_highest_entry(case, shuffled_tail):
    """The run walk, and the one pass it switches to over a BAT of blocks out of order."""
    table, _, _ = case
    if shuffled_tail:  # enough runs of one for the switch
        table.extend(array(table.typecode, range(5000 * 4097, 3000 * 4097, -4097)))
        table.extend(tables.filled(4, 7, UNUSED))
    used = [e for e in table if e != UNUSED]
    assert vhd_reader._highest_entry(table, 4097) == (max(used) if used else None)


def out_of_order(runs: int, then: list[int], step: int) -> array[int]:
    """``runs`` entries in descending order (a run each, the scan then switches to one
    pass over the rest), then ``then``: what the switch must not lose sits right at it."""
    return array(tables.typecode(4), [(10 + runs - k) * step for k in range(runs)] + then)


@pytest.mark.parametrize("at", [0, 1, 5])
def test_vhd_highest_entry_at_the_switch(at):
    high = 90000 * 4097
    then = [UNUSED] * at + [high] + [UNUSED, 4097]
    assert vhd_reader._highest_entry(out_of_order(1024, then, 4097), 4097) == high
    assert vhd_reader._highest_entry(out_of_order(1023, then, 4097), 4097) == high


def fake_vhd(bitmap: bytes, block_size: int) -> Any:
    host = SimpleNamespace(pread=lambda offset, n: bitmap[:n])
    return SimpleNamespace(_lock=threading.Lock(), _bitmaps=OrderedDict(), host=host,
                           block_size=block_size)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([4096, 512 * 1024, 2 << 20]), st.data())
def test_vhd_sector_bitmap_runs(block_size, data):
    """VHD spec "Data block sector bitmap": bit 7 of byte 0 is the first sector."""
    sectors = block_size // 512
    n = -(-sectors // 8)
    raw = data.draw(st.one_of(
        st.binary(min_size=n, max_size=n),
        st.lists(st.sampled_from([0, 0xFF, 0x80, 0x01, 0x7F]), min_size=n, max_size=n).map(bytes)))
    got = vhd_reader.VpcReader._sector_runs(fake_vhd(raw, block_size), 7)
    bits = [raw[k // 8] >> (7 - k % 8) & 1 for k in range(sectors)]
    expected: list[tuple[int, int, bool]] = []
    for k, bit in enumerate(bits):
        if expected and expected[-1][2] == bool(bit):
            expected[-1] = (expected[-1][0], (k + 1) * 512, bool(bit))
        else:
            expected.append((k * 512, (k + 1) * 512, bool(bit)))
    assert got == expected


# -- VDI --------------------------------------------------------------------------------
def reference_block_runs(bmap: array[int], first: int, last: int,
                         differencing: bool) -> list[tuple[int, int, int]]:
    """The rule of the reader before the scan: a run continues while the next block is
    stored right after (host block + 1) or both read as zeros (free and zero apart in a
    differencing image)."""
    out: list[tuple[int, int, int]] = []
    for i in range(first, last):
        e = bmap[i]
        if out:
            a, b, e0 = out[-1]
            if e0 >= vdi_s.FIRST_UNALLOCATED:
                joins = e >= vdi_s.FIRST_UNALLOCATED and (not differencing or e == e0)
            else:
                joins = e == e0 + (b - a) and e < vdi_s.FIRST_UNALLOCATED
            if joins:
                out[-1] = (a, b + 1, e0)
                continue
        out.append((i, i + 1, e))
    return out


@settings(max_examples=100, deadline=None)
@given(table_and_range("vdi"), st.booleans())
def test_vdi_block_runs(case, differencing):
    bmap, first, last = case
    got = list(vdi_reader.block_runs(bmap, first, last, differencing))
    assert got == reference_block_runs(bmap, first, last, differencing)


def reference_use(bmap: array[int], blocks: int, keep: int) -> vdi_reader.BlockUse:
    """qemu 7.2 vdi_co_check, one entry at a time."""
    use = vdi_reader.BlockUse()
    counts: dict[int, int] = {}
    for block, entry in enumerate(bmap):
        if entry >= vdi_s.FIRST_UNALLOCATED:
            continue
        use.top = max(use.top, entry + 1)
        if entry >= blocks:
            use.too_large_count += 1
            if len(use.too_large) < keep:
                use.too_large.append((block, entry))
            continue
        use.stored += 1
        counts[entry] = counts.get(entry, 0) + 1
    shared = sorted(t for t, c in counts.items() if c > 1)
    use.shared = {t: counts[t] - 1 for t in shared[:keep]}
    use.extra = sum(c - 1 for c in counts.values())
    return use


def vdi_maps() -> st.SearchStrategy[tuple[array[int], int]]:
    """Maps of host blocks below ``blocks``, some twice, some past it, and runs of
    blocks stored out of order (long enough for the switch to a plain loop)."""
    @st.composite
    def make(draw: st.DrawFn) -> tuple[array[int], int]:
        blocks = draw(st.integers(1, 6000))
        pieces = draw(st.lists(st.one_of(
            st.tuples(st.just("run"), st.integers(0, blocks), st.integers(1, 2 * CHUNK)),
            st.tuples(st.just("gap"), st.sampled_from([FREE, ZERO]), st.integers(1, 3 * CHUNK)),
            st.tuples(st.just("past"), st.integers(blocks, blocks + 10), st.integers(1, 300)),
            st.tuples(st.just("shuffled"), st.integers(0, blocks), st.integers(1, 2500),
                      st.randoms(use_true_random=False)),
        ), min_size=1, max_size=6))
        bmap = tables.zeros(4, 0)
        for kind, a, n, *rest in pieces:
            if kind == "gap":
                bmap.extend(tables.filled(4, n, a))
            elif kind == "shuffled":
                values = list(range(a, a + n))
                rest[0].shuffle(values)
                bmap.extend(array(bmap.typecode, values))
            else:
                bmap.extend(array(bmap.typecode, range(a, a + n)))
        return bmap, blocks
    return make()


@settings(max_examples=120, deadline=None)
@given(vdi_maps(), st.sampled_from([0, 3, 100]))
def test_vdi_host_block_use(case, keep):
    bmap, blocks = case
    assert vdi_reader.host_block_use(bmap, blocks, keep) == reference_use(bmap, blocks, keep)


@pytest.mark.parametrize("at", [0, 1, 5])
def test_vdi_host_block_use_at_the_switch(at):
    """The entries right at the switch to a plain loop: the highest, one past the block
    count, and one naming a host block named before."""
    blocks = 3000
    for then in ([FREE] * at + [2999, 12], [ZERO] * at + [3005, 2999], [FREE] * at + [11, 11]):
        bmap = out_of_order(1024, then, 1)
        assert vdi_reader.host_block_use(bmap, blocks, 10) == reference_use(bmap, blocks, 10)


# -- Parallels --------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["parallels-v1", "parallels-v2"]), st.data())
def test_parallels_extents(config, data):
    """qemu's parallels block_status as qemu-img map merges it: clusters whose host
    offsets follow each other are one extent, unallocated ones another."""
    step = CONFIGS[config][0]
    bat, first, last = data.draw(table_and_range(config))
    cs = 1 << 20
    reader = SimpleNamespace(cluster_size=cs, unit=cs // step, bat=bat)
    start = data.draw(st.integers(first * cs, last * cs - 1))
    end = data.draw(st.integers(start + 1, last * cs))
    got = [(e.start, e.length, e.kind, e.host_offset)
           for e in ParallelsReader._bat_extents(reader, start, end, start // cs, -(-end // cs))]
    expected: list[list[Any]] = []
    for c in range(start // cs, -(-end // cs)):
        lo, hi = max(start, c * cs), min(end, (c + 1) * cs)
        host = bat[c] * reader.unit + (lo - c * cs) if bat[c] else None
        kind = ExtentKind.DATA if bat[c] else ExtentKind.UNALLOCATED
        if expected and expected[-1][2] == kind and (
                host is None or expected[-1][3] + expected[-1][1] == host):
            expected[-1][1] += hi - lo
        else:
            expected.append([lo, hi - lo, kind, host])
    assert got == [tuple(e) for e in expected]


# -- long tables on real files, against qemu-img ------------------------------------------
def _map_equal(img: Any) -> None:
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)


def test_vhd_of_many_blocks_maps_like_qemu(tmp_path):
    """64 GiB: 32768 BAT entries, unused runs of thousands, blocks appended out of order."""
    img = tmp_path / "big.vpc"
    qemu_img("create", "-q", "-f", "vpc", img, "64G")
    qemu_io(img, ["write -P 1 40G 6M", "write -P 2 1G 1M", "write -P 3 63G 512",
                  "write -P 4 0 4M", "write -P 5 10G 2M"], fmt="vpc")
    _map_equal(img)


def test_vdi_of_many_blocks_maps_like_qemu(tmp_path):
    """A static 300 MiB VDI (one run of 300 host blocks) and a 64 GiB dynamic one
    (65536 entries, blocks stored in the order written)."""
    static = tmp_path / "static.vdi"
    qemu_img("create", "-q", "-f", "vdi", "-o", "static=on", static, "300M")
    _map_equal(static)
    dynamic = tmp_path / "dynamic.vdi"
    qemu_img("create", "-q", "-f", "vdi", dynamic, "64G")
    qemu_io(dynamic, ["write -P 1 40G 5M", "write -P 2 1G 1M", "write -P 3 63G 512",
                      "write -P 4 0 3M", "write -z 20G 2M"], fmt="vdi")
    _map_equal(dynamic)


def test_parallels_of_many_clusters_maps_like_qemu(tmp_path):
    """4 KiB clusters: 16384 BAT entries over 64 MiB, a run of 1024 clusters stored
    back to back, and clusters stored in the reverse of disk order."""
    img = tmp_path / "small-clusters.parallels"
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", img, "64M")
    writes = ["write -P 1 8M 4M"] + [f"write -P 2 {40 * 1024 - k * 8}k 4k" for k in range(40)]
    qemu_io(img, writes, fmt="parallels")
    _map_equal(img)
