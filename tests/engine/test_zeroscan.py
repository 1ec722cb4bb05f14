"""The copy engine's zero scan (engine/zeroscan.py) against a per-block definition.

A block is zero when every byte is; runs are maximal and alternate. The buffers mix the
blocks that take each path of the scan: data that starts with a non-zero word, data that
starts with zeros (compared whole), zero runs of many lengths, a short last block, and
enough blocks that start with zeros yet hold data to switch to the block-by-block
bound. The scan must give the definition's answer, and so must the file probe.
"""

from __future__ import annotations

import mmap
import random
from itertools import groupby

import pytest

from vmforge.engine import zeroscan


def reference(data: bytes, g: int, base: int) -> list[tuple[int, int, bool]]:
    zero = [not any(data[a:a + g]) for a in range(0, len(data), g)]
    runs, pos = [], 0
    for is_zero, same in groupby(zero):
        end = min(pos + len(list(same)) * g, len(data))
        runs.append((base + pos, end - pos, is_zero))
        pos = end
    return runs


def block(kind: str, g: int, rnd: random.Random) -> bytes:
    if kind == "zero":
        return bytes(g)
    if kind == "data":  # the usual case: a non-zero first word
        return bytes([rnd.randrange(1, 256)]) + rnd.randbytes(g - 1)
    out = bytearray(g)  # starts (and may end) with zeros, one non-zero byte somewhere
    out[rnd.choice([8, g // 2, g - 1, rnd.randrange(8, g)])] = rnd.randrange(1, 256)
    return bytes(out)


def mixed_buffer(g: int, blocks: int, seed: int, weights: tuple[int, int, int]) -> bytes:
    rnd = random.Random(seed)
    out, kinds = [], ("zero", "data", "hidden")
    while len(out) < blocks:
        kind = rnd.choices(kinds, weights)[0]
        # zero runs of every length up to past a doubling step or two
        out += [block(kind, g, rnd)] * (rnd.choice([1, 2, 3, 7, 8, 9, 33]) if kind == "zero"
                                        else 1)
    return b"".join(out[:blocks])


CASES = [  # (block size, blocks, (zero, data, hidden) weights)
    (g, blocks, weights)
    for g, blocks in ((512, 2200), (4096, 300), (65536, 40))
    for weights in ((1, 1, 1), (1, 8, 0), (8, 1, 1), (0, 0, 1))
]


@pytest.fixture
def scan():
    return zeroscan.zero_runs


@pytest.mark.parametrize(("g", "blocks", "weights"), CASES)
@pytest.mark.parametrize("tail", [0, 8, 504])
def test_zero_runs_match_the_definition(scan, g: int, blocks: int,
                                        weights: tuple[int, int, int], tail: int):
    data = mixed_buffer(g, blocks, seed=g + blocks + tail + sum(weights), weights=weights)
    data = data[:len(data) - g + tail] if tail else data  # a short last block
    base = 7 << 30
    want = reference(data, g, base)
    assert scan(data, len(data), g, base) == want
    # the pipeline's pooled buffers: an mmap longer than the data, garbage past it
    buf = mmap.mmap(-1, len(data) + 2 * g)
    buf[:len(data)] = data
    buf[len(data):] = b"\xff" * (2 * g)
    assert scan(buf, len(data), g, base) == want


def test_blocks_hiding_data_past_a_zero_word_hit_the_bound(monkeypatch, scan):
    """All 512-byte blocks start with zeros and hold data: past ``_MAX_MISSES`` of them
    the rest of the chunk is compared block by block, with the same answer."""
    g, rnd = 512, random.Random(5)
    calls = []
    real = zeroscan._zero_end
    monkeypatch.setattr(zeroscan, "_zero_end", lambda *a: calls.append(a) or real(*a))
    blocks = [block("hidden", g, rnd) for _ in range(zeroscan._MAX_MISSES + 600)]
    blocks[3:5] = [bytes(g)] * 2
    blocks[-40:-30] = [bytes(g)] * 10  # zero blocks after the switch
    data = b"".join(blocks)
    assert scan(data, len(data), g, 0) == reference(data, g, 0)
    assert len(calls) == 1  # the scan took its bound: one zero run galloped


def test_edges(scan):
    for g in (512, 4096):
        assert scan(b"", 0, g, 0) == []
        assert scan(bytes(g), g, g, 10) == [(10, g, True)]
        assert scan(b"\1" + bytes(g - 1), g, g, 0) == [(0, g, False)]
        assert scan(bytes(100), 100, g, 0) == [(0, 100, True)]  # only a short block
        assert scan(bytes(99) + b"\1", 100, g, 0) == [(0, 100, False)]
        data = bytes(3 * g) + b"\1" + bytes(g - 1)
        assert scan(data, len(data), g, 0) == [(0, 3 * g, True), (3 * g, g, False)]


@pytest.mark.parametrize("g", [16384, 65536])
def test_probe_reads_a_file_range_like_the_buffer_scan(tmp_path, g: int):
    data = mixed_buffer(g, 60, seed=g, weights=(2, 1, 1))[:-g] + bytes(g)
    path = tmp_path / "src"
    lead = 12345  # the range starts inside the file, anywhere
    path.write_bytes(b"\xee" * lead + data)
    with open(path, "rb") as f:
        fd = f.fileno()
        assert zeroscan.probe_zero_runs(fd, lead, len(data), g, 99) == reference(data, g, 99)
        short = len(data) - g // 2
        assert zeroscan.probe_zero_runs(fd, lead, short, g, 0) == reference(data[:short], g, 0)
        # past the end of the file: bytes that are not there are not zeros of the source
        past = zeroscan.probe_zero_runs(fd, lead + len(data) - g, 3 * g, g, 0)
        assert past == [(0, g, True), (g, 2 * g, False)], past
