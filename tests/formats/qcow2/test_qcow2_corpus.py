"""Real qcow2 images made by other tools (corpus/dissect-hypervisor/qcow2), read like qemu-img.

The samples are decompressed (sparse) into a temp dir by the ``corpus_qcow2`` fixture;
nothing is copied into the repository.
"""

from __future__ import annotations

import pytest

import vmforge
from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    map_diff,
    run_vmforge,
    sha256,
    vmforge_json,
    vmforge_ok,
)
from vmforge import errors

pytestmark = pytest.mark.slow

PLAIN = ["basic.qcow2", "basic-zstd.qcow2", "backing-chain-1.qcow2", "backing-chain-2.qcow2",
         "backing-chain-3.qcow2", "snapshot.qcow2"]
INFO_KEYS = ("virtual-size", "format", "cluster-size", "backing-filename", "full-backing-filename",
             "backing-filename-format", "format-specific", "dirty-flag", "snapshots", "filename",
             "actual-size")


@pytest.fixture(scope="module")
def qemu_raws(corpus_qcow2, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus-qemu-raw")
    cache = {}

    def get(name, snapshot=None):
        key = (name, snapshot)
        if key not in cache:
            dest = out / f"{name}-{snapshot}.raw"
            args = ["convert"] + (["-l", snapshot] if snapshot else []) + ["-O", "raw"]
            qemu_img(*args, name, dest, cwd=corpus_qcow2)
            cache[key] = dest
        return cache[key]

    return get


@pytest.mark.parametrize("name", PLAIN)
def test_corpus_convert_raw(corpus_qcow2, qemu_raws, tmp_path, name):
    out = tmp_path / "v.raw"
    vmforge_ok("convert", "-O", "raw", name, out, cwd=corpus_qcow2)
    assert_same_bytes(out, qemu_raws(name))


@pytest.mark.parametrize("name", PLAIN)
def test_corpus_info(corpus_qcow2, name):
    expected = qemu_img_json("info", name, cwd=corpus_qcow2)
    got = vmforge_json("info", name, cwd=corpus_qcow2)
    for k in INFO_KEYS:
        assert got.get(k) == expected.get(k), f"{k}: vmforge={got.get(k)!r} qemu={expected.get(k)!r}"


def test_corpus_backing_chain_info(corpus_qcow2):
    expected = qemu_img_json("info", "--backing-chain", "backing-chain-1.qcow2", cwd=corpus_qcow2)
    got = vmforge_json("info", "--backing-chain", "backing-chain-1.qcow2", cwd=corpus_qcow2)
    assert [g.get("filename") for g in got] == [e["filename"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        for k in INFO_KEYS:
            assert g.get(k) == e.get(k), f"{e['filename']} {k}: vmforge={g.get(k)!r} qemu={e.get(k)!r}"


@pytest.mark.parametrize("name", PLAIN)
def test_corpus_map(corpus_qcow2, name):
    expected = qemu_img_json("map", name, cwd=corpus_qcow2)
    got = vmforge_json("map", name, cwd=corpus_qcow2)
    assert got == expected, map_diff(got, expected)


@pytest.mark.parametrize("name", PLAIN)
def test_corpus_api_reads(corpus_qcow2, qemu_raws, name):
    """Whole read, 4 KiB and odd 7777-byte reads over every mapped region (+ margins)."""
    raw = qemu_raws(name)
    path = corpus_qcow2 / name
    with vmforge.open_image(path) as img, open(raw, "rb") as f:
        assert img.virtual_size == raw.stat().st_size
        regions = [(e.start, e.length) for e in img.iter_extents()
                   if e.kind is vmforge.model.ExtentKind.DATA]
        assert regions, "no data extents"
        for start, length in regions[:64]:
            lo = max(0, start - 8192)
            hi = min(img.virtual_size, start + min(length, 1 << 20) + 8192)
            f.seek(lo)
            expected = f.read(hi - lo)
            assert img.read(lo, hi - lo) == expected, f"read [{lo}, {hi}) differs"
            for off in range(lo, hi, 4096):
                n = min(4096, hi - off)
                assert img.read(off, n) == expected[off - lo:off - lo + n], off
            off = lo + 1
            while off < hi:
                n = min(7777, hi - off)
                assert img.read(off, n) == expected[off - lo:off - lo + n], off
                off += n


@pytest.mark.parametrize("name", PLAIN)
def test_corpus_check(corpus_qcow2, name):
    import json

    from tests.data.qemu import check_json

    q_rc, q = check_json(corpus_qcow2 / name)
    proc = run_vmforge("check", "--output=json", corpus_qcow2 / name)
    assert proc.returncode == q_rc
    v = json.loads(proc.stdout)
    for k in ("corruptions", "leaks", "check-errors", "image-end-offset", "total-clusters",
              "allocated-clusters", "compressed-clusters", "fragmented-clusters"):
        assert v.get(k, 0) == q.get(k, 0), k


# --- snapshots -------------------------------------------------------------------------------
SNAPSHOTS = ["you can't see me", "confused"]


def test_corpus_snapshot_list(corpus_qcow2):
    expected = qemu_img_json("info", "snapshot.qcow2", cwd=corpus_qcow2)["snapshots"]
    got = vmforge_json("info", "snapshot.qcow2", cwd=corpus_qcow2)["snapshots"]
    assert got == expected
    assert [s["name"] for s in got] == SNAPSHOTS


@pytest.mark.parametrize("snap", SNAPSHOTS + ["1", "2"])
def test_corpus_snapshot_read(corpus_qcow2, qemu_raws, tmp_path, snap):
    param = snap if snap.isdigit() else f"snapshot.name={snap}"
    expected = qemu_raws("snapshot.qcow2", param)
    out = tmp_path / "s.raw"
    vmforge_ok("convert", "-l", snap, "-O", "raw", "snapshot.qcow2", out, cwd=corpus_qcow2)
    assert_same_bytes(out, expected)
    assert sha256(expected) != sha256(qemu_raws("snapshot.qcow2")), "snapshot equals current state?"


def test_corpus_snapshot_api(corpus_qcow2, qemu_raws):
    for snap in SNAPSHOTS:
        expected = qemu_raws("snapshot.qcow2", f"snapshot.name={snap}")
        with vmforge.open_image(corpus_qcow2 / "snapshot.qcow2", snapshot=snap) as img, \
                open(expected, "rb") as f:
            head = f.read(8 << 20)
            assert img.read(0, len(head)) == head


# --- external data file -------------------------------------------------------------------------
def test_corpus_data_file_refused_by_default(corpus_qcow2, tmp_path):
    before = sha256(corpus_qcow2 / "data-file.qcow2")
    out = tmp_path / "o.raw"
    proc = run_vmforge("convert", "-O", "raw", "data-file.qcow2", out, cwd=corpus_qcow2)
    assert_clean_error(proc)
    assert not out.exists()
    with pytest.raises(errors.UnsupportedFeature), \
            vmforge.open_image(corpus_qcow2 / "data-file.qcow2") as img:
        img.read(0, 4096)
    with pytest.raises(errors.VmforgeError), \
            vmforge.open_image(corpus_qcow2 / "data-file.qcow2", untrusted=True,
                               allow_data_file=True) as img:
        img.read(0, 4096)
    assert sha256(corpus_qcow2 / "data-file.qcow2") == before


def test_corpus_data_file_read_when_allowed(corpus_qcow2, qemu_raws, tmp_path):
    expected = qemu_raws("data-file.qcow2")
    out = tmp_path / "o.raw"
    vmforge_ok("convert", "--allow-data-file", "-O", "raw", "data-file.qcow2", out, cwd=corpus_qcow2)
    assert_same_bytes(out, expected)
    with vmforge.open_image(corpus_qcow2 / "data-file.qcow2", allow_data_file=True) as img, \
            open(expected, "rb") as f:
        for off in (0, 1 << 20, 100_000_000, 267386880 - 5000):
            f.seek(off)
            want = f.read(77777)
            assert img.read(off, len(want)) == want, off


def test_corpus_data_file_info_matches_qemu(corpus_qcow2):
    """info reports the data file (as qemu-img does) without reading it."""
    expected = qemu_img_json("info", "data-file.qcow2", cwd=corpus_qcow2)
    proc = run_vmforge("info", "--output=json", "data-file.qcow2", cwd=corpus_qcow2)
    if proc.returncode == 0:
        import json

        got = json.loads(proc.stdout)
        assert got["format-specific"] == expected["format-specific"]
        assert got["virtual-size"] == expected["virtual-size"]
    else:
        assert_clean_error(proc)
