"""Raw images: reads, map and info against qemu-img for every generated pattern."""

from __future__ import annotations

import pytest

import vmforge
from tests.data.generators import PATTERNS, pattern_bytes
from tests.data.qemu import convert_raw, qemu_img_json
from tests.helpers import assert_same_bytes, map_classes, map_diff, vmforge_json, vmforge_ok


@pytest.mark.parametrize("pattern", PATTERNS)
def test_raw_convert_matches_qemu(pattern_file, tmp_path, pattern):
    src = pattern_file(pattern)
    expected = convert_raw(src, tmp_path / "qemu.raw", fmt="raw")
    out = tmp_path / "vmforge.raw"
    vmforge_ok("convert", "-f", "raw", "-O", "raw", src, out)
    assert_same_bytes(out, expected)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_raw_api_reads(pattern_file, pattern):
    src = pattern_file(pattern)
    data = pattern_bytes(pattern)
    info = qemu_img_json("info", "-f", "raw", src)
    with vmforge.open_image(src, "raw") as img:
        assert img.format == "raw"
        assert img.virtual_size == info["virtual-size"]
        padded = data + bytes(img.virtual_size - len(data))  # qemu rounds raw up to 512
        assert img.read(0, img.virtual_size) == padded
        for off in range(0, img.virtual_size, 4096):
            n = min(4096, img.virtual_size - off)
            assert img.read(off, n) == padded[off:off + n], off
        off = 1
        while off < img.virtual_size:
            n = min(7777, img.virtual_size - off)
            assert img.read(off, n) == padded[off:off + n], off
            off += n


@pytest.mark.parametrize("pattern", PATTERNS)
def test_raw_map_matches_qemu(pattern_file, pattern):
    src = pattern_file(pattern)
    expected = qemu_img_json("map", "-f", "raw", src)
    got = vmforge_json("map", "-f", "raw", src)
    assert map_classes(got) == map_classes(expected), map_diff(got, expected)
    assert got == expected, map_diff(got, expected)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_raw_info_matches_qemu(pattern_file, pattern):
    src = pattern_file(pattern)
    expected = qemu_img_json("info", src)
    got = vmforge_json("info", src)
    assert got == expected
