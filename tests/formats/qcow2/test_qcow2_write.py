"""The qcow2 writer: every output passes ``qemu-img check`` and ``qemu-img compare``.

Source patterns x option sets are generated from the option axes; each output is
checked by the oracle (no corruption, no leak, no check error), compared with its
source, and its header fields are read back through ``qemu-img info``.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest

import vmforge
from tests.data.generators import PATTERNS, MiB, pattern_bytes, write_pattern
from tests.data.qcow2_builders import (
    CLUSTER_SIZES,
    COMPATS,
    COMPRESSION_TYPES,
    EXTENDED_L2_CLUSTER_SIZES,
    PREALLOCATIONS,
    REFCOUNT_BITS,
)
from tests.data.qemu import check_json, opts, qemu_img, qemu_img_json, qemu_io
from tests.helpers import assert_clean_error, run_vmforge, vmforge_json, vmforge_ok


def _option_sets() -> list[tuple[str, dict[str, object], bool]]:
    """(id, -o options, compress) generated from the axes."""
    sets: list[tuple[str, dict[str, object], bool]] = [("default", {}, False)]
    sets += [(f"compat{c}", {"compat": c}, False) for c in COMPATS]
    sets += [(f"cs{cs}", {"cluster_size": cs}, False) for cs in CLUSTER_SIZES]
    sets += [(f"compress-{t}-cs{cs}", {"compression_type": t, "cluster_size": cs}, True)
             for t, cs in itertools.product(COMPRESSION_TYPES, (512, 4096, 65536, 2 * MiB))]
    sets += [("compress-compat0.10", {"compat": "0.10"}, True)]
    sets += [(f"refcount{rb}", {"refcount_bits": rb}, False) for rb in REFCOUNT_BITS]
    sets += [("refcount1-cs512", {"refcount_bits": 1, "cluster_size": 512}, False)]
    sets += [("refcount64-cs2M", {"refcount_bits": 64, "cluster_size": 2 * MiB}, False)]
    sets += [(f"extl2-cs{cs}", {"extended_l2": "on", "cluster_size": cs}, False)
             for cs in EXTENDED_L2_CLUSTER_SIZES]
    sets += [("extl2-compress", {"extended_l2": "on"}, True)]
    sets += [("lazy", {"lazy_refcounts": "on"}, False),
             ("compat0.10-cs512", {"compat": "0.10", "cluster_size": 512}, False)]
    sets += [(f"prealloc-{p}", {"preallocation": p}, False) for p in PREALLOCATIONS]
    sets += [("prealloc-metadata-cs4096", {"preallocation": "metadata", "cluster_size": 4096}, False)]
    return sets


OPTION_SETS = _option_sets()
_BY_ID = {i: (o, c) for i, o, c in OPTION_SETS}
# every option set on the richest pattern; every pattern on a handful of option sets
CASES = [("mixed", i) for i, _, _ in OPTION_SETS] + [
    (p, i) for p, i in itertools.product(
        PATTERNS, ("default", "compress-zlib-cs65536", "cs512", "extl2-cs65536", "compat0.10"))
    if p != "mixed"
]

_INFO_KEYS = {"compat": "compat", "compression_type": "compression-type",
              "refcount_bits": "refcount-bits", "extended_l2": "extended-l2",
              "lazy_refcounts": "lazy-refcounts"}


def _expected_specific(options: dict[str, object]) -> dict[str, object]:
    exp: dict[str, object] = {}
    for k, v in options.items():
        if k in _INFO_KEYS:
            exp[_INFO_KEYS[k]] = {"on": True, "off": False}.get(str(v), v)
    return exp


def assert_check_clean(path: os.PathLike[str] | str) -> dict[str, object]:
    rc, data = check_json(path)
    assert rc == 0, f"qemu-img check exit {rc}: {data}"
    assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, data
    assert data.get("check-errors", 0) == 0, data
    return data


def assert_compare_identical(a, b, fa="raw", fb="qcow2") -> None:
    proc = qemu_img("compare", "-f", fa, "-F", fb, a, b, check=False)
    assert proc.returncode == 0, f"qemu-img compare: {proc.returncode} {proc.stdout} {proc.stderr}"


def _convert(src, dst, options, compress, *extra):
    return vmforge_ok("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
                      *opts(options), *extra, src, dst)


@pytest.mark.parametrize(("pattern", "optid"), CASES, ids=[f"{p}-{o}" for p, o in CASES])
def test_convert_to_qcow2_passes_check_and_compare(pattern_file, tmp_path, pattern, optid):
    options, compress = _BY_ID[optid]
    src = pattern_file(pattern)
    dst = tmp_path / "out.qcow2"
    _convert(src, dst, options, compress)
    data = assert_check_clean(dst)
    assert_compare_identical(src, dst)
    info = qemu_img_json("info", "-f", "qcow2", dst)
    assert info["format"] == "qcow2"
    expected_size = -(-os.path.getsize(src) // 512) * 512
    assert info["virtual-size"] == expected_size
    assert info["cluster-size"] == int(options.get("cluster_size", 65536))
    specific = info["format-specific"]["data"]
    for key, value in _expected_specific(options).items():
        assert specific.get(key) == value, f"{key}: {specific.get(key)!r} != {value!r}"
    if compress and pattern in ("mixed", "text"):
        assert data.get("compressed-clusters", 0) > 0, data
    if not compress and pattern in ("random", "text", "mixed"):
        assert data.get("compressed-clusters", 0) == 0, data
    mode = options.get("preallocation", "off")
    if mode != "off":
        assert data["allocated-clusters"] == data["total-clusters"], data
    if mode in ("falloc", "full"):
        assert os.stat(dst).st_blocks * 512 >= info["virtual-size"]
    # vmforge's own reader sees its output exactly as qemu-img map does
    got = vmforge_json("map", dst)
    assert got == qemu_img_json("map", "-f", "qcow2", dst)


@pytest.mark.parametrize("optid", ["default", "cs4096", "cs65536", "cs2097152", "extl2-cs65536",
                                   "compat0.10", "refcount1", "prealloc-metadata"])
@pytest.mark.parametrize("sparse", [None, "0", "65536"])
def test_sparseness_matches_qemu(pattern_file, tmp_path, optid, sparse):
    """Zero detection: the writer allocates as many clusters as qemu-img convert does."""
    options, compress = _BY_ID[optid]
    src = pattern_file("mixed")
    extra = [] if sparse is None else ["-S", sparse]
    mine, theirs = tmp_path / "vmforge.qcow2", tmp_path / "qemu.qcow2"
    _convert(src, mine, options, compress, *extra)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts(options), *extra, src, theirs)
    _, a = check_json(mine)
    _, b = check_json(theirs)
    assert a["allocated-clusters"] == b["allocated-clusters"], (a, b)
    assert a["total-clusters"] == b["total-clusters"], (a, b)
    assert_compare_identical(src, mine)


@pytest.mark.parametrize("workers", ["1", "3", "8"])
def test_convert_workers_and_progress(pattern_file, tmp_path, workers):
    src = pattern_file("mixed")
    dst = tmp_path / "out.qcow2"
    proc = vmforge_ok("convert", "-p", "-m", workers, "-f", "raw", "-O", "qcow2", src, dst)
    assert "Traceback" not in proc.stderr
    assert_check_clean(dst)
    assert_compare_identical(src, dst)


def test_api_convert_progress_callback(pattern_file, tmp_path):
    src = pattern_file("mixed")
    dst = tmp_path / "out.qcow2"
    calls: list[tuple[int, int]] = []
    vmforge.convert(str(src), str(dst), "qcow2", progress=lambda d, t: calls.append((d, t)))
    assert calls, "progress never called"
    dones = [d for d, _ in calls]
    assert dones == sorted(dones), "progress went backwards"
    assert all(0 <= d <= t for d, t in calls)
    assert calls[-1][0] == calls[-1][1], f"progress did not finish: {calls[-1]}"
    assert_check_clean(dst)
    assert_compare_identical(src, dst)


@pytest.mark.parametrize("optid", ["default", "compress-zstd-cs65536", "extl2-cs16384",
                                   "refcount2", "compat0.10", "prealloc-full"])
def test_api_convert_options(pattern_file, tmp_path, optid):
    options, compress = _BY_ID[optid]
    src = pattern_file("mixed")
    dst = tmp_path / "out.qcow2"
    vmforge.convert(str(src), str(dst), "qcow2", src_fmt="raw",
                    options={k: str(v) for k, v in options.items()}, compress=compress)
    assert_check_clean(dst)
    assert_compare_identical(src, dst)
    with vmforge.open_image(dst) as img:
        assert img.format == "qcow2"
        assert img.read(0, img.virtual_size) == pattern_bytes("mixed")


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_convert_concatenates_sources(pattern_file, tmp_path, out_fmt):
    a, b = pattern_file("random", 1 * MiB), pattern_file("holes", 2 * MiB)
    dst = tmp_path / f"out.{out_fmt}"
    vmforge_ok("convert", "-f", "raw", "-O", out_fmt, a, b, dst)
    expected = tmp_path / "qemu.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", a, b, expected)
    assert_compare_identical(expected, dst, "raw", out_fmt)
    if out_fmt == "qcow2":
        assert_check_clean(dst)
    dst2 = tmp_path / f"api.{out_fmt}"
    vmforge.convert([str(a), str(b)], str(dst2), out_fmt, src_fmt="raw")
    assert_compare_identical(expected, dst2, "raw", out_fmt)


def test_convert_into_existing_target(pattern_file, tmp_path):
    """-n: the target exists (made by qemu-img with its own options) and is written into."""
    src = pattern_file("mixed")
    dst = tmp_path / "existing.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", dst, os.path.getsize(src))
    vmforge_ok("convert", "-n", "-f", "raw", "-O", "qcow2", src, dst)
    assert_check_clean(dst)
    assert_compare_identical(src, dst)
    assert qemu_img_json("info", dst)["cluster-size"] == 4096


@pytest.mark.parametrize("compress", [False, True])
def test_qcow2_to_qcow2_roundtrip_of_chain(images, tmp_path, compress):
    """convert flattens a backing chain; the result is self-contained."""
    name = "chain-qcow2-cs4096-65536-512-relative"
    b = images.get(name)
    dst = tmp_path / "flat.qcow2"
    vmforge_ok("convert", *(["-c"] if compress else []), "-O", "qcow2", b.path, dst)
    assert_check_clean(dst)
    info = qemu_img_json("info", dst)
    assert "backing-filename" not in info
    assert_compare_identical(images.qemu_raw(name), dst)


# --- convert -B: overlays ---------------------------------------------------------------------
@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("how", ["cli", "api"])
def test_convert_with_backing_makes_small_overlay(tmp_path, base_fmt, how):
    size, cs = 4 * MiB, 65536
    base_raw = write_pattern(tmp_path / "base.raw", "random", size)
    if base_fmt == "qcow2":
        base = tmp_path / "base.qcow2"
        qemu_img("convert", "-O", "qcow2", base_raw, base)
    else:
        base = base_raw
    # the source: the base with a few clusters changed (some to zeros)
    buf = bytearray(base_raw.read_bytes())
    changed = {3, 17, 40, 63}
    for k in changed:
        buf[k * cs + 100:k * cs + 5000] = bytes([k]) * 4900
    buf[20 * cs:21 * cs] = bytes(cs)
    changed.add(20)
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(buf))
    dst = tmp_path / "overlay.qcow2"
    if how == "cli":
        vmforge_ok("convert", "-f", "raw", "-O", "qcow2", "-B", base.name, "-o",
                   f"backing_fmt={base_fmt}", src.name, dst.name, cwd=tmp_path)
    else:
        vmforge.convert(str(src), str(dst), "qcow2", src_fmt="raw", backing=base.name,
                        backing_fmt=base_fmt)
    info = qemu_img_json("info", dst)
    assert info["backing-filename"] == base.name
    assert info.get("backing-filename-format") == base_fmt
    assert_check_clean(dst)
    assert_compare_identical(src, dst)
    # as small as qemu-img's own overlay (qemu skips zero clusters over a backing file
    # only where it can prove them zero; it does not diff against the backing data)
    theirs = tmp_path / "qemu-overlay.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-B", base.name, "-F", base_fmt,
             src.name, theirs.name, cwd=tmp_path)
    _, mine_c = check_json(dst)
    _, their_c = check_json(theirs)
    assert mine_c["allocated-clusters"] <= their_c["allocated-clusters"], (mine_c, their_c)
    # the zeroed cluster must read as zeros over non-zero backing data
    with vmforge.open_image(dst) as img:
        assert img.read(20 * cs, cs) == bytes(cs)
        assert img.read(0, size) == bytes(buf)


# --- create -----------------------------------------------------------------------------------
def _alloc_runs(entries):
    runs = []
    for e in entries:
        key = (e["data"], e["zero"], e["present"], "offset" in e)
        if runs and runs[-1][1] == e["start"] and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], e["start"] + e["length"], key)
        else:
            runs.append((e["start"], e["start"] + e["length"], key))
    return runs


CREATE_SETS = [(i, o) for i, o, c in OPTION_SETS if not c]


@pytest.mark.parametrize(("optid", "options"), CREATE_SETS, ids=[i for i, _ in CREATE_SETS])
def test_create_matches_qemu(tmp_path, optid, options):
    mine, theirs = tmp_path / "mine.qcow2", tmp_path / "theirs.qcow2"
    vmforge_ok("create", "-f", "qcow2", *opts(options), mine, "64M")
    qemu_img("create", "-f", "qcow2", *opts(options), theirs, "64M")
    assert_check_clean(mine)
    a, b = qemu_img_json("info", mine), qemu_img_json("info", theirs)
    for key in ("virtual-size", "cluster-size", "format", "format-specific", "dirty-flag"):
        assert a.get(key) == b.get(key), f"{key}: vmforge={a.get(key)} qemu={b.get(key)}"
    # same allocation state per guest byte (host layout may differ)
    ma, mb = qemu_img_json("map", mine), qemu_img_json("map", theirs)
    assert _alloc_runs(ma) == _alloc_runs(mb)
    # a fresh image reads as zeros and accepts qemu's writes
    qemu_io(mine, ["write -P 0x11 1M 64k", "write -z 3M 4k"])
    assert_check_clean(mine)


@pytest.mark.parametrize("size", ["1G", "100M", "1536K", "1.5M", "512", "4096b", "1T"])
def test_create_sizes_match_qemu(tmp_path, size):
    vmforge_ok("create", "-f", "qcow2", tmp_path / "a.qcow2", size)
    qemu_img("create", "-f", "qcow2", tmp_path / "b.qcow2", size)
    a, b = qemu_img_json("info", tmp_path / "a.qcow2"), qemu_img_json("info", tmp_path / "b.qcow2")
    assert a["virtual-size"] == b["virtual-size"]
    assert_check_clean(tmp_path / "a.qcow2")


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_raw(tmp_path, prealloc):
    path = tmp_path / "disk.raw"
    vmforge_ok("create", "-f", "raw", "-o", f"preallocation={prealloc}", path, "10M")
    assert os.path.getsize(path) == 10 * MiB
    assert qemu_img_json("info", path)["virtual-size"] == 10 * MiB
    assert path.read_bytes() == bytes(10 * MiB)
    if prealloc != "off":
        assert os.stat(path).st_blocks * 512 >= 10 * MiB


@pytest.mark.parametrize("mode", ["relative", "absolute", "subdir", "no-size"])
@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_create_with_backing(tmp_path, mode, base_fmt):
    layers = tmp_path / "layers"
    layers.mkdir()
    base_raw = write_pattern(layers / "base.raw", "mixed", 4 * MiB)
    if base_fmt == "qcow2":
        base = layers / "base.qcow2"
        qemu_img("convert", "-O", "qcow2", base_raw, base)
    else:
        base = base_raw
    if mode == "absolute":
        overlay, ref, cwd = tmp_path / "top.qcow2", str(base), tmp_path
    elif mode == "subdir":  # name relative to the overlay's directory; run from elsewhere
        overlay, ref, cwd = tmp_path / "top.qcow2", f"layers/{base.name}", "/"
    else:
        overlay, ref, cwd = layers / "top.qcow2", base.name, layers
    size_args = [] if mode == "no-size" else ["4M"]
    vmforge_ok("create", "-f", "qcow2", "-b", ref, "-F", base_fmt, overlay, *size_args, cwd=cwd)
    theirs = overlay.with_name("qemu-" + overlay.name)
    qemu_img("create", "-f", "qcow2", "-b", ref, "-F", base_fmt, theirs, *size_args, cwd=cwd)
    a, b = qemu_img_json("info", overlay), qemu_img_json("info", theirs)
    for key in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format",
                "full-backing-filename", "format-specific"):
        assert a.get(key) == b.get(key), f"{key}: vmforge={a.get(key)} qemu={b.get(key)}"
    assert a["backing-filename"] == ref
    assert_check_clean(overlay)
    assert_compare_identical(base, overlay, base_fmt, "qcow2")


def test_create_backing_without_format_is_refused_like_qemu(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    theirs = qemu_img("create", "-f", "qcow2", "-b", base, tmp_path / "q.qcow2", check=False)
    assert theirs.returncode != 0
    proc = run_vmforge("create", "-f", "qcow2", "-b", base, tmp_path / "v.qcow2")
    assert_clean_error(proc)


def test_create_with_missing_backing_is_refused(tmp_path):
    proc = run_vmforge("create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2",
                       tmp_path / "v.qcow2", cwd=tmp_path)
    assert_clean_error(proc)
    assert qemu_img("create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2",
                    tmp_path / "q.qcow2", cwd=tmp_path, check=False).returncode != 0


BAD_CREATE_OPTIONS = [
    "cluster_size=1000", "cluster_size=256", "cluster_size=4194304", "refcount_bits=3",
    "refcount_bits=128", "compat=0.10,refcount_bits=8", "extended_l2=on,cluster_size=4096",
    "compat=0.10,compression_type=zstd", "compat=0.10,lazy_refcounts=on", "compat=2.0",
    "compression_type=lzma", "preallocation=sometimes", "no_such_option=1", "cluster_size=",
    "compat=0.10,extended_l2=on",
]


@pytest.mark.parametrize("bad", BAD_CREATE_OPTIONS)
def test_create_bad_options_refused_like_qemu(tmp_path, bad):
    theirs = qemu_img("create", "-f", "qcow2", "-o", bad, tmp_path / "q.qcow2", "1M", check=False)
    assert theirs.returncode != 0, f"qemu-img accepted {bad}"
    proc = run_vmforge("create", "-f", "qcow2", "-o", bad, tmp_path / "v.qcow2", "1M")
    assert_clean_error(proc)
    assert not (tmp_path / "v.qcow2").exists(), "a refused create left a file behind"


def test_create_json_info_roundtrip_with_vmforge_info(tmp_path):
    path = tmp_path / "a.qcow2"
    vmforge_ok("create", "-f", "qcow2", "-o", "cluster_size=8192,refcount_bits=4", path, "5M")
    got = json.loads(vmforge_ok("info", "--output=json", path).stdout)
    assert got["cluster-size"] == 8192 and got["virtual-size"] == 5 * MiB
    assert got["format-specific"]["data"]["refcount-bits"] == 4


@pytest.mark.parametrize(("cs", "size"), [(512, "1T"), (512, "64T"), (4096, "64P")])
def test_create_too_large_for_cluster_size_refused_like_qemu(tmp_path, cs, size):
    """qemu caps the L1 table (32 MiB): 1 TiB needs clusters larger than 512 bytes."""
    q = qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", tmp_path / "q.qcow2", size,
                 check=False)
    assert q.returncode != 0
    proc = run_vmforge("create", "-f", "qcow2", "-o", f"cluster_size={cs}", tmp_path / "v.qcow2", size)
    assert_clean_error(proc)
    assert not (tmp_path / "v.qcow2").exists()


@pytest.mark.parametrize("snap", ["first", "second snap"])
def test_convert_snapshot_to_qcow2(images, tmp_path, snap):
    name = "snapshots-cluster_size65536"
    b = images.get(name)
    dst = tmp_path / "snap.qcow2"
    vmforge_ok("convert", "-l", snap, "-O", "qcow2", b.path, dst)
    assert_check_clean(dst)
    assert_compare_identical(images.qemu_raw(name, snapshot=snap), dst)
    assert "snapshots" not in qemu_img_json("info", dst)


def test_convert_chain_onto_its_middle_layer(images, tmp_path):
    """convert -B MID TOP: the output holds only what differs from MID (qemu's rebase idiom)."""
    name = "chain-qcow2-cs65536-65536-65536-relative"
    b = images.get(name)
    top, mid = b.chain[0], b.chain[1]
    dst = top.parent / "rebased-vmforge.qcow2"
    theirs = top.parent / "rebased-qemu.qcow2"
    try:
        vmforge_ok("convert", "-O", "qcow2", "-B", mid.name, "-o", "backing_fmt=qcow2", top.name,
                   dst.name, cwd=top.parent)
        qemu_img("convert", "-O", "qcow2", "-B", mid.name, "-F", "qcow2", top.name, theirs.name,
                 cwd=top.parent)
        assert_check_clean(dst)
        assert_compare_identical(images.qemu_raw(name), dst)
        _, a = check_json(dst)
        _, q = check_json(theirs)
        assert a["allocated-clusters"] <= q["allocated-clusters"], (a, q)
    finally:
        dst.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
