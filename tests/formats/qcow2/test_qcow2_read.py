"""Differential reads: every qemu-made qcow2 image read by vmforge equals qemu-img's view.

For each generated spec (cluster sizes x compat, compression, refcount widths,
preallocation, lazy refcounts, extended L2, depth-3 backing chains, internal snapshots):
convert -O raw bytes, API reads (whole, 4 KiB, odd 7777-byte chunks from offset 1),
``map --output=json`` and ``info --output=json`` are compared with qemu-img's.
"""

from __future__ import annotations

import os

import pytest

import vmforge
from tests.data.qcow2_builders import SPECS, spec_names
from tests.data.qemu import qemu_img_json
from tests.helpers import (
    assert_same_bytes,
    describe,
    map_classes,
    map_diff,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)

ALL = list(SPECS)
SNAPSHOT_CASES = [(n, s) for n in spec_names("snapshots") for s in ("first", "second snap")]
INFO_FIELDS = ("virtual-size", "format", "cluster-size", "backing-filename",
               "full-backing-filename", "backing-filename-format", "format-specific",
               "dirty-flag", "snapshots", "filename")


@pytest.mark.parametrize("name", ALL)
def test_convert_to_raw_matches_qemu(images, tmp_path, name):
    b = images.get(name)
    expected = images.qemu_raw(name)
    out = tmp_path / "vmforge.raw"
    vmforge_ok("convert", "-O", "raw", b.path, out)
    assert_same_bytes(out, expected)


EXPLICIT = ["plain-cs65536-compat1.1", "compressed-zstd-cs65536-rewritten",
            "chain-raw-cs65536-65536-65536-relative", "extl2-cs65536"]


@pytest.mark.parametrize("name", EXPLICIT)
def test_convert_to_raw_with_explicit_format(images, tmp_path, name):
    b = images.get(name)
    out = tmp_path / "vmforge.raw"
    vmforge_ok("convert", "-f", "qcow2", "-O", "raw", b.path, out)
    assert_same_bytes(out, images.qemu_raw(name))


@pytest.mark.parametrize("name", ALL)
def test_api_reads_match_qemu(images, name):
    b = images.get(name)
    expected = images.qemu_raw(name).read_bytes()
    with vmforge.open_image(b.path) as img:
        assert img.format == "qcow2"
        assert img.virtual_size == len(expected)
        whole = img.read(0, len(expected))
        assert whole == expected, "whole read differs"
        for off in range(0, len(expected), 4096):
            got = img.read(off, min(4096, len(expected) - off))
            assert got == expected[off:off + 4096], f"4 KiB read at {off} differs"
        off = 1
        while off < len(expected):
            n = min(7777, len(expected) - off)
            assert img.read(off, n) == expected[off:off + n], f"7777-byte read at {off} differs"
            off += n


@pytest.mark.parametrize("name", ALL)
def test_api_extents_cover_disk_and_zero_kinds_read_zero(images, name):
    b = images.get(name)
    expected = images.qemu_raw(name).read_bytes()
    with vmforge.open_image(b.path) as img:
        pos = 0
        for ext in img.iter_extents():
            assert ext.start == pos, f"gap or overlap at {pos}: {ext}"
            assert ext.length > 0, ext
            if ext.kind is not vmforge.model.ExtentKind.DATA:
                assert expected[ext.start:ext.end].count(0) == ext.length, \
                    f"{ext.kind} extent does not read as zeros: {ext}"
            pos = ext.end
        assert pos == img.virtual_size
        # a window in the middle starts and ends where asked
        start, length = img.virtual_size // 3 + 5, img.virtual_size // 4
        exts = list(img.iter_extents(start, length))
        assert exts and exts[0].start == start and exts[-1].end == start + length


@pytest.mark.parametrize("name", ALL)
def test_extent_json_matches_qemu_map(images, name):
    b = images.get(name)
    expected = qemu_img_json("map", "-f", "qcow2", b.path)
    with vmforge.open_image(b.path) as img:
        got = [e.to_qemu_json() for e in vmforge.model.coalesce(img.iter_extents())]
    assert map_classes(got) == map_classes(expected), map_diff(got, expected)


@pytest.mark.parametrize("name", ALL)
def test_map_matches_qemu(images, name):
    """data/zero classification first; then exact equality (offset, depth, present)."""
    b = images.get(name)
    expected = qemu_img_json("map", "-f", "qcow2", b.path)
    got = vmforge_json("map", b.path)
    assert map_classes(got) == map_classes(expected), \
        "data/zero classification differs\n" + map_diff(got, expected)
    assert got == expected, "classification agrees, exact entries differ\n" + map_diff(got, expected)


@pytest.mark.parametrize("name", ALL)
def test_info_matches_qemu(images, name):
    """The listed fields first, then the whole JSON document."""
    b = images.get(name)
    cwd = b.path.parent  # same argument, same cwd: "filename" is comparable
    expected = qemu_img_json("info", b.path.name, cwd=cwd)
    got = vmforge_json("info", b.path.name, cwd=cwd)
    for key in INFO_FIELDS:
        assert got.get(key) == expected.get(key), \
            f"{key}: vmforge={got.get(key)!r} qemu={expected.get(key)!r}"
    assert got == expected, "listed fields agree; other keys differ"


@pytest.mark.parametrize("name", spec_names("chain"))
def test_info_backing_chain_matches_qemu(images, name):
    b = images.get(name)
    cwd = b.path.parent
    expected = qemu_img_json("info", "--backing-chain", b.path.name, cwd=cwd)
    got = vmforge_json("info", "--backing-chain", b.path.name, cwd=cwd)
    assert isinstance(got, list) and len(got) == len(expected) == len(b.chain)
    for g, e in zip(got, expected, strict=True):
        for key in INFO_FIELDS:
            assert g.get(key) == e.get(key), \
                f"{e['filename']}: {key}: vmforge={g.get(key)!r} qemu={e.get(key)!r}"


@pytest.mark.parametrize("name", spec_names("chain"))
def test_chain_read_from_other_cwd(images, tmp_path, name):
    """Relative backing names resolve against the image holding them, not the cwd."""
    b = images.get(name)
    out = tmp_path / "out.raw"
    proc = run_vmforge("convert", "-O", "raw", os.path.abspath(b.path), out, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert_same_bytes(out, images.qemu_raw(name))


@pytest.mark.parametrize(("name", "snap"), SNAPSHOT_CASES)
def test_snapshot_convert_matches_qemu(images, tmp_path, name, snap):
    b = images.get(name)
    expected = images.qemu_raw(name, snapshot=snap)
    out = tmp_path / "snap.raw"
    vmforge_ok("convert", "-l", snap, "-O", "raw", b.path, out)
    assert_same_bytes(out, expected)
    out2 = tmp_path / "snap2.raw"
    vmforge_ok("convert", "-l", f"snapshot.name={snap}", "-O", "raw", b.path, out2)
    assert_same_bytes(out2, expected)


@pytest.mark.parametrize(("name", "snap"), SNAPSHOT_CASES)
def test_snapshot_api_reads_match_qemu(images, name, snap):
    b = images.get(name)
    expected = images.qemu_raw(name, snapshot=snap).read_bytes()
    current = images.qemu_raw(name).read_bytes()
    assert expected != current, "builder must change data after the snapshot"
    with vmforge.open_image(b.path, snapshot=snap) as img:
        assert img.virtual_size == len(expected)
        assert img.read(0, len(expected)) == expected
        off = 1
        while off < len(expected):
            n = min(7777 * 9, len(expected) - off)
            assert img.read(off, n) == expected[off:off + n], f"read at {off} differs"
            off += n


@pytest.mark.parametrize("name", spec_names("snapshots"))
def test_unknown_snapshot_is_refused(images, tmp_path, name):
    b = images.get(name)
    proc = run_vmforge("convert", "-l", "no-such-snapshot", "-O", "raw", b.path, tmp_path / "x.raw")
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.raw").exists()
