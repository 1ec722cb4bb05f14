"""The BAT scan (formats/vhdx/bat.py, VhdxReader.iter_extents and _check_bat) against
the rules it implements, written out one block and one sector at a time.

The scan measures runs a slice or a regular-expression search at a time, so its edges
get BATs built to hit them: contiguous blocks whose reserved bits change in the middle,
blocks written in any order, offsets near the top of the 64 bits, chunk boundaries
(a small chunk ratio puts a sector bitmap entry every few blocks), sector bitmaps
whose runs end on and off byte boundaries, regions lying among the blocks, blocks past
the end of the file. The differential tests against qemu-img cover the images qemu
and vmforge write.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vmforge.formats.vhdx import bat as B
from vmforge.formats.vhdx import reader as R
from vmforge.formats.vhdx import structs as S
from vmforge.model import Extent, ExtentKind, coalesce
from vmforge.util import tables

MiB = 1 << 20
BS = MiB
STATE_MASK, OFFSET_MASK = S.BAT_STATE_MASK, S.BAT_FILE_OFFSET_MASK
FULL, PARTIAL = S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT
TOP_MB = (1 << 44) - 1  # the highest FileOffsetMB

# -- building BATs -------------------------------------------------------------------------

# A payload table is made of segments, so that long runs (the fast paths) and their
# edges occur; offsets are in MiB.
segment = st.one_of(
    # blocks one after another in the file; "bump" sets a reserved bit (3-19) on one
    st.tuples(st.just("data"), st.integers(1, 40), st.integers(8, 200),
              st.sampled_from(["plain", "bump"])),
    st.tuples(st.just("shuffled"), st.integers(2, 12), st.integers(8, 200), st.randoms()),
    st.tuples(st.just("partial"), st.integers(1, 6), st.integers(8, 200)),
    # not stored: offset 0, offsets stepping (qemu's fixed disks), or scattered
    st.tuples(st.just("absent"), st.integers(1, 40), st.sampled_from([0, 1, 2, 3, 5]),
              st.sampled_from(["none", "step", "scattered"])),
)
hostile = st.one_of(
    segment,
    st.tuples(st.just("near-top"), st.integers(1, 6)),  # the series would carry out of 64 bits
    st.tuples(st.just("state4"), st.integers(1, 3)),
    st.tuples(st.just("low"), st.integers(1, 3)),  # inside the header section
)


def build_payload(segments: list[tuple[Any, ...]]) -> list[int]:
    out: list[int] = []
    for seg in segments:
        kind, n = seg[0], seg[1]
        if kind == "data":
            base = seg[2] * MiB
            out += [(base + k * BS) | FULL | (1 << 3 if seg[3] == "bump" and k == n // 2 else 0)
                    for k in range(n)]
        elif kind == "shuffled":
            offsets = [seg[2] * MiB + k * BS for k in range(n)]
            seg[3].shuffle(offsets)
            out += [o | FULL for o in offsets]
        elif kind == "partial":
            out += [(seg[2] * MiB + k * BS) | PARTIAL for k in range(n)]
        elif kind == "absent":
            state, style = seg[2], seg[3]
            out += [state | (0 if style == "none" else (50 + k * (1 if style == "step" else 7)) * MiB)
                    for k in range(n)]
        elif kind == "near-top":
            out += [((TOP_MB - n // 2 + k) % (1 << 44)) * MiB | FULL for k in range(n)]
        elif kind == "state4":
            out += [4] * n
        else:
            out += [(k * 4096) | FULL for k in range(n)]
    return out


def entry_count(blocks: int, ratio: int, has_parent: bool) -> int:
    """2.5 (as S.bat_entry_count, for any chunk ratio): a sector bitmap entry follows every
    chunk of ``ratio`` payload entries; a differencing disk's last chunk is padded."""
    if has_parent:
        return -(-blocks // ratio) * (ratio + 1)
    return blocks + max(0, blocks - 1) // ratio


def interleave(payload: list[int], ratio: int, has_parent: bool, sb_at: int) -> array[int]:
    """The BAT of 2.5 around ``payload``; the bitmap of chunk c at ``sb_at + c`` MiB."""
    blocks = len(payload)
    entries = entry_count(blocks, ratio, has_parent)
    bat = array("Q", bytes(8 * entries))
    for b, e in enumerate(payload):
        bat[S.bat_index(b, ratio)] = e
    for c in range(-(-blocks // ratio)):
        at = S.sb_index(c, ratio)
        if at < entries:
            bat[at] = ((sb_at + c) * MiB | S.SB_BLOCK_PRESENT) if has_parent else 0
    return bat


class FakeHost:
    def __init__(self, size: int, bitmaps: dict[int, bytes]) -> None:
        self.size, self.bitmaps = size, bitmaps

    def pread(self, offset: int, length: int) -> bytes:
        return self.bitmaps[offset].ljust(length, b"\0")


def fake_reader(payload: list[int], *, ratio: int, has_parent: bool, sector: int,
                size: int, tail: int, bitmaps: dict[int, bytes], sb_at: int,
                regions: list[tuple[int, int]]) -> R.VhdxReader:
    """A VhdxReader over a BAT in memory, set up as _open sets one up."""
    r = R.VhdxReader.__new__(R.VhdxReader)
    r.path = "fake.vhdx"
    r.block_size, r.sector, r.ratio, r.blocks = BS, sector, ratio, len(payload)
    r.virtual_size = len(payload) * BS - tail
    r.meta = SimpleNamespace(has_parent=has_parent)  # type: ignore[assignment]
    r.bat = interleave(payload, ratio, has_parent, sb_at)
    r.payload = B.payload_entries(r.bat, r.blocks, ratio)
    r.states = B.states(r.payload)
    r.host = FakeHost(size, {(sb_at + c) * MiB: raw for c, raw in bitmaps.items()})  # type: ignore
    r.regions = [(0, S.HEADER_SECTION_SIZE), *regions]
    r._bitmaps = OrderedDict()
    r._bitmaps_lock = threading.Lock()
    r.bat_errors = r._check_bat()
    return r


# -- the rules, one block and one sector at a time ------------------------------------------

def reference_errors(r: R.VhdxReader) -> list[str]:
    """QEMU's vhdx_check_bat_entries and ours, entry by entry (the order of 1.x's numpy code:
    partial without parent, state 4, then past, cut and overlapping blocks, then bitmaps)."""
    entries = [r.bat[S.bat_index(b, r.ratio)] for b in range(r.blocks)]
    states = [e & STATE_MASK for e in entries]
    size = r.host.size
    errors = []
    if not r.meta.has_parent and PARTIAL in states:
        errors.append(f"BAT entry {states.index(PARTIAL)} is PARTIALLY_PRESENT in a disk "
                      "without a parent")
    if 4 in states:
        errors.append(f"BAT entry {states.index(4)} has the undefined state 4")
    past, cut, overlap = [], [], []
    for i, e in enumerate(entries):
        if states[i] not in (FULL, PARTIAL):
            continue
        o = e & OFFSET_MASK
        n = min(BS, r.virtual_size - i * BS)
        if o >= size or o < S.HEADER_SECTION_SIZE:
            past.append(f"BAT entry {i} start offset {o} points outside the file "
                        f"({size} bytes); the image has probably been truncated")
        elif o + n > size:
            cut.append(f"BAT entry {i} end offset {o + n - 1} points after the end of the "
                       f"file ({size} bytes); the image has probably been truncated")
        elif any(rl and o < r0 + rl and r0 < o + BS for r0, rl in r.regions[1:]):
            overlap.append(f"BAT entry {i} (block at {o}) overlaps VHDX metadata")
    errors += past + cut + overlap
    if r.meta.has_parent:
        for c in range(-(-r.blocks // r.ratio)):
            e = r.bat[S.sb_index(c, r.ratio)]
            if e & STATE_MASK == S.SB_BLOCK_PRESENT:
                sb = e & OFFSET_MASK
                if sb < S.HEADER_SECTION_SIZE or sb + S.SECTOR_BITMAP_SIZE > size:
                    errors.append(f"sector bitmap of chunk {c} at {sb} lies outside the file")
    return errors


def reference_extents(r: R.VhdxReader, start: int, end: int) -> list[Extent]:
    """2.5.1.1 per block, 2.4.2 per sector (bit n: bit n % 8 of byte n // 8, LSB first)."""
    absent = ExtentKind.UNALLOCATED if r.meta.has_parent else ExtentKind.ZERO
    spb = BS // r.sector
    out = []

    def stored(g0: int, g1: int, host: int) -> None:
        keep = max(0, min(g1 - g0, r.host.size - host))
        if keep:
            out.append(Extent(g0, keep, ExtentKind.DATA, host_offset=host))
        if keep < g1 - g0:
            out.append(Extent(g0 + keep, g1 - g0 - keep, ExtentKind.ZERO))

    for blk in range(r.blocks):
        g0, g1 = blk * BS, min(r.virtual_size, (blk + 1) * BS)
        e = r.bat[S.bat_index(blk, r.ratio)]
        state, host = e & STATE_MASK, e & OFFSET_MASK
        if state == S.PAYLOAD_BLOCK_NOT_PRESENT:
            out.append(Extent(g0, g1 - g0, absent))
        elif state in R.ZERO_STATES:
            out.append(Extent(g0, g1 - g0, ExtentKind.ZERO))
        elif state == FULL:
            stored(g0, g1, host)
        else:
            sb = r.bat[S.sb_index(blk // r.ratio, r.ratio)] & OFFSET_MASK
            bitmap = r.host.pread(sb, S.SECTOR_BITMAP_SIZE)
            runs: list[list[int]] = []  # sectors of the block: [first, end, bit]
            for s in range(-(-(g1 - g0) // r.sector)):
                n = (blk % r.ratio) * spb + s
                bit = bitmap[n // 8] >> (n % 8) & 1
                if runs and runs[-1][2] == bit:
                    runs[-1][1] = s + 1
                else:
                    runs.append([s, s + 1, bit])
            for s0, s1, bit in runs:
                a, b = g0 + s0 * r.sector, min(g1, g0 + s1 * r.sector)
                if bit:
                    stored(a, b, host + s0 * r.sector)
                else:
                    out.append(Extent(a, b - a, ExtentKind.UNALLOCATED))
    clipped = [e.clip(start, end) for e in out if e.start < end and e.end > start]
    return list(coalesce(clipped))


# -- the tests ----------------------------------------------------------------------------

def bitmap_for(draw: Any, bits: int) -> bytes:
    """A sector bitmap of long runs of set and clear bits that end anywhere (on a byte
    boundary or not), with a few random bytes (short runs) somewhere."""
    edges = sorted(draw(st.lists(st.integers(0, bits), max_size=10)))
    value = draw(st.booleans())
    n = pos = 0
    for edge in [*edges, bits]:  # bits [pos, edge) take the value, then it flips
        if value:
            n |= ((1 << edge) - 1) ^ ((1 << pos) - 1)
        value, pos = not value, edge
    out = bytearray(n.to_bytes((bits + 7) // 8, "little"))
    noise = draw(st.binary(max_size=6))
    at = draw(st.integers(0, len(out)))
    out[at:at + len(noise)] = noise
    return bytes(out[:(bits + 7) // 8])


@st.composite
def images(draw: Any, segments: Any = segment, stray_partial: bool = False) -> R.VhdxReader:
    payload = build_payload(draw(st.lists(segments, min_size=1, max_size=8)))
    has_parent = draw(st.booleans())
    if not has_parent and not (stray_partial and draw(st.booleans())):
        payload = [e if e & STATE_MASK != PARTIAL else e - 1 for e in payload]  # FULL
    ratio = draw(st.sampled_from([1, 2, 3, 5, 16]))
    sector = draw(st.sampled_from([512, 4096]))
    chunks = -(-len(payload) // ratio)
    spb = BS // sector
    bitmaps = {c: bitmap_for(draw, ratio * spb) for c in range(chunks)} if has_parent else {}
    sb_at = 300  # bitmaps at 300 MiB + chunk
    regions = [(MiB, MiB), (2 * MiB, MiB), (3 * MiB, MiB)]
    if draw(st.booleans()):  # a region among the blocks (a BAT moved to the end...)
        regions.append((draw(st.integers(8, 260)) * MiB + draw(st.sampled_from([0, 4096])),
                        draw(st.sampled_from([0, 4096, MiB]))))
    need = max([(e & OFFSET_MASK) + BS for e in payload if e & STATE_MASK in (FULL, PARTIAL)]
               + [(sb_at + chunks) * MiB])
    size = need - draw(st.sampled_from([0, 0, 0, 4096, BS, 40 * BS]))
    tail = draw(st.sampled_from([0, 0, sector, BS // 2]))
    return fake_reader(payload, ratio=ratio, has_parent=has_parent, sector=sector,
                       size=size, tail=tail, bitmaps=bitmaps, sb_at=sb_at, regions=regions)


@settings(max_examples=300, deadline=None)
@given(images(hostile, stray_partial=True))
def test_check_bat_follows_the_rule(r):
    assert r.bat_errors == reference_errors(r)


@settings(max_examples=250, deadline=None)
@given(images(), st.data())
def test_extents_follow_the_rule(r, data):
    assume(not r.bat_errors)
    start = data.draw(st.integers(0, r.virtual_size - 1))
    end = data.draw(st.integers(start + 1, r.virtual_size))
    if data.draw(st.booleans()):  # block and sector aligned ranges are the common ones
        start -= start % r.sector
        end = max(end - end % r.sector, start + r.sector)
    got = list(coalesce(r.iter_extents(start, end - start)))
    assert got == reference_extents(r, start, end)
    # the extents tile the range with no gap
    assert got[0].start == start and got[-1].end == end
    assert all(a.end == b.start for a, b in zip(got, got[1:], strict=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile, min_size=1, max_size=8), st.data())
def test_even_run_is_exactly_the_even_prefix(segments, data):
    """Never longer (the scan would join blocks that are not contiguous, or wrap past the
    64 bits), and not shorter either (right, one block at a time, but slow)."""
    table = array("Q", build_payload(segments))
    i = data.draw(st.integers(0, len(table) - 1))
    last = data.draw(st.integers(i + 1, len(table)))
    entry = table[i]
    n = 1
    while i + n < last and table[i + n] == entry + n * BS and entry + n * BS < 1 << 64:
        n += 1
    assert tables.even_run(table, i, last, BS) == n
    runs = list(B.contiguous_runs(table, i, last, BS))
    assert runs[0] == (i, i + n, entry)
    assert [a for a, _, _ in runs[1:]] == [b for _, b, _ in runs[:-1]] and runs[-1][1] == last


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.sampled_from([1, 2, 3, 4, 16, 4096]), st.booleans(), st.data())
def test_payload_and_bitmap_entries_follow_2_5(blocks, ratio, has_parent, data):
    """Payload block b is BAT entry b + b // ratio; chunk c's bitmap entry is the one after
    its ratio payload entries; each entry's state is its bits 0-2."""
    entries = entry_count(blocks, ratio, has_parent)
    values = data.draw(st.lists(st.integers(0, (1 << 64) - 1), min_size=entries,
                                max_size=entries))
    bat = array("Q", values)
    payload = B.payload_entries(bat, blocks, ratio)
    assert list(payload) == [bat[S.bat_index(b, ratio)] for b in range(blocks)]
    chunks = B.bitmap_entries(bat, ratio)
    assert list(chunks) == [bat[S.sb_index(c, ratio)] for c in range(len(chunks))]
    assert len(chunks) == (-(-blocks // ratio) if has_parent else max(0, blocks - 1) // ratio)
    assert B.states(payload) == bytes(e & STATE_MASK for e in payload)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_bit_runs_follow_the_bits(data):
    bits = data.draw(st.integers(1, 400))
    bitmap = bitmap_for(data.draw, bits)
    first = data.draw(st.integers(0, bits - 1))
    last = data.draw(st.integers(first + 1, bits))
    want = []
    for n in range(first, last):
        value = bool(bitmap[n // 8] >> (n % 8) & 1)
        if want and want[-1][2] == value:
            want[-1][1] = n + 1
        else:
            want.append([n, n + 1, value])
    assert [list(run) for run in tables.bit_runs(bitmap, first, last, "little")] == want
    # the same bits, most significant first in each byte (a VHD sector bitmap)
    flipped = bytes(int(f"{b:08b}"[::-1], 2) for b in bitmap)
    assert [list(run) for run in tables.bit_runs(flipped, first, last, "big")] == want


def test_state_runs_over_millions_of_entries():
    """A 64 TiB disk in 1 MiB blocks has 64M entries: runs that long come out whole."""
    st_bytes = bytes([0]) * 3_000_000 + bytes([FULL]) * 2 + bytes([2]) * 1_000_000
    assert list(B.state_runs(st_bytes, 1, len(st_bytes) - 1)) == [
        (1, 3_000_000, 0), (3_000_000, 3_000_002, FULL), (3_000_002, 4_000_001, 2)]
