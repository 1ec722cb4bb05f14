"""model/: sizes parsed and printed the way qemu-img does; extents as qemu-img map entries."""

from __future__ import annotations

import re

import pytest

from tests.data.qemu import qemu_img
from vmforge.model import Extent, ExtentKind, coalesce, human_size, parse_size

SIZE_TEXTS = ["0", "1", "512", "1k", "1K", "1M", "1.5M", "10G", "1T", "2P", "1E", "4096b", "100M",
              "1536K", "0.5G", "3.25K"]


@pytest.mark.parametrize("text", SIZE_TEXTS)
def test_parse_size_matches_qemu(text):
    proc = qemu_img("measure", "-O", "raw", "--size", text, check=False)
    if proc.returncode != 0:
        from vmforge.errors import UsageError

        with pytest.raises(UsageError):
            parse_size(text)
        return
    m = re.search(r"required size: (\d+)", proc.stdout)
    assert m, proc.stdout
    assert -(-parse_size(text) // 512) * 512 == int(m.group(1))  # measure rounds up to sectors


@pytest.mark.parametrize("bad", ["", "abc", "-1", "12Q", "1.0000001K", "K"])
def test_parse_size_rejects(bad):
    from vmforge.errors import UsageError

    with pytest.raises(UsageError):
        parse_size(bad)


@pytest.mark.parametrize("n", [0, 1, 512, 1000, 1023, 1024, 1025, 10 * 2**20, 1023 * 2**20,
                               1000 * 2**20 - 1, 3_158_528, 2**40, 123456789])
def test_human_size_matches_qemu_info(tmp_path, n):
    path = tmp_path / "x.raw"
    with open(path, "wb") as f:
        f.truncate(n)
    out = qemu_img("info", "-f", "raw", path).stdout
    m = re.search(r"virtual size: (.+?) \((\d+) bytes\)", out)
    assert m, out
    assert human_size(int(m.group(2))) == m.group(1)


def test_extent_json_shape():
    e = Extent(0, 65536, ExtentKind.DATA, host_offset=327680)
    assert list(e.to_qemu_json()) == ["start", "length", "depth", "present", "zero", "data", "offset"]
    assert e.to_qemu_json() == {"start": 0, "length": 65536, "depth": 0, "present": True,
                                "zero": False, "data": True, "offset": 327680}
    z = Extent(65536, 512, ExtentKind.UNALLOCATED, depth=2)
    assert z.to_qemu_json() == {"start": 65536, "length": 512, "depth": 2, "present": False,
                                "zero": True, "data": False}


def test_coalesce_merges_like_qemu_map():
    exts = [Extent(0, 4096, ExtentKind.DATA, host_offset=8192),
            Extent(4096, 4096, ExtentKind.DATA, host_offset=12288),  # contiguous: merges
            Extent(8192, 4096, ExtentKind.DATA, host_offset=65536),  # jump: new entry
            Extent(12288, 4096, ExtentKind.ZERO),
            Extent(16384, 4096, ExtentKind.ZERO),
            Extent(20480, 4096, ExtentKind.ZERO, depth=1)]
    out = list(coalesce(iter(exts)))
    assert [(e.start, e.length) for e in out] == [(0, 8192), (8192, 4096), (12288, 8192), (20480, 4096)]
