"""VHDX, fixed and dynamic, differential against qemu-img 7.2; the corpus; the dirty log.

Reading: images qemu-img writes (every block size it offers, fixed and dynamic,
block_state_zero on and off) and real images from Hyper-V and Disk2vhd read as qemu
reads them. Writing: vmforge's files pass qemu-img check and compare and get qemu's
block size. The dirty-log sample is refused like qemu refuses it, and replayed in
memory on request to the bytes qemu produces after its own replay.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

import vmforge
from tests.data.qemu import check_json, qemu_img, qemu_img_json
from tests.formats.vhdx.helpers import assert_map_consistent, corpus_file
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    run_vmforge,
    sha256,
    vmforge_json,
    vmforge_ok,
)
from vmforge.formats import detect_format
from vmforge.formats.vhdx import default_block_size
from vmforge.formats.vhdx import structs as S

MiB = 1 << 20
INFO_KEYS = ("virtual-size", "format", "cluster-size", "format-specific", "dirty-flag")
PATTERNS = [("mixed", 4 * MiB), ("holes", 4 * MiB), ("odd_size", 4 * MiB), ("zero_runs", 4 * MiB),
            ("mixed", 9 * MiB + 3 * 512), ("tiny_odd", 4 * MiB)]
# every combination qemu-img offers, each with one of the patterns in turn
OPTION_MATRIX = [
    f"subformat={sub},block_size={bs},block_state_zero={z}"
    for sub, bs, z in itertools.product(("dynamic", "fixed"), ("1M", "8M", "32M", "256M"),
                                        ("on", "off"))
]
READ_CASES = [(o, *PATTERNS[i % len(PATTERNS)]) for i, o in enumerate(OPTION_MATRIX)]


def _info_subset(info: dict) -> dict:
    return {k: info.get(k) for k in INFO_KEYS}


@pytest.mark.parametrize(("options", "name", "size"), READ_CASES)
def test_read_qemu_made(qemu_made, tmp_path, options, name, size):
    img, expected_raw = qemu_made("vhdx", options, name, size)
    out = tmp_path / "v.raw"
    vmforge_ok("convert", "-f", "vhdx", "-O", "raw", img, out)
    assert_same_bytes(out, expected_raw)
    assert _info_subset(vmforge_json("info", "-f", "vhdx", img)) == \
        _info_subset(qemu_img_json("info", "-f", "vhdx", img))
    # qemu has no block status for vhdx: one data entry without offset, whatever the file
    assert [(e["data"], e["zero"], "offset" in e)
            for e in qemu_img_json("map", "-f", "vhdx", img)] == [(True, False, False)]
    entries = assert_map_consistent(img, expected_raw)
    if "block_state_zero=on" in options and "dynamic" in options and name == "holes":
        assert any(e["zero"] for e in entries), "unwritten ZERO blocks must show as zero"


def test_api_reads_odd_offsets(qemu_made):
    img, raw = qemu_made("vhdx", "block_size=1M", "mixed", 9 * MiB + 3 * 512)
    expected = raw.read_bytes()
    with vmforge.open_image(str(img), "vhdx") as image:
        assert image.virtual_size == len(expected)
        for off in range(0, len(expected), 4096):
            assert image.read(off, min(4096, len(expected) - off)) == expected[off:off + 4096]
        off = 1
        while off < len(expected):
            n = min(7777, len(expected) - off)
            assert image.read(off, n) == expected[off:off + n], f"read at {off}"
            off += n


def test_probe(qemu_made):
    img, _ = qemu_made("vhdx", "", "holes", 4 * MiB)
    assert detect_format(str(img)).name == "vhdx"
    assert vmforge_json("info", img)["format"] == "vhdx"


# --- writing ---------------------------------------------------------------------------

WRITE_MATRIX = OPTION_MATRIX + ["", "log_size=3M", "subformat=fixed,log_size=2M"]


@pytest.mark.parametrize("options", WRITE_MATRIX)
def test_write_passes_qemu(pattern_file, qemu_made, tmp_path, options):
    name, size = PATTERNS[WRITE_MATRIX.index(options) % len(PATTERNS)]
    src = pattern_file(name, size=size)
    out = tmp_path / "w.vhdx"
    vmforge_ok("convert", "-O", "vhdx", *(["-o", options] if options else []), src, out)
    code, report = check_json(out, "vhdx")
    assert code == 0 and report["check-errors"] == 0, report
    qemu_img("compare", "-f", "raw", "-F", "vhdx", src, out)
    assert os.path.getsize(out) % MiB == 0, "VHDX files end on a 1 MiB boundary"
    qvhdx, qraw = qemu_made("vhdx", options, name, size)
    mine, theirs = qemu_img_json("info", "-f", "vhdx", out), qemu_img_json("info", qvhdx)
    assert (mine["virtual-size"], mine["cluster-size"]) == \
        (theirs["virtual-size"], theirs["cluster-size"])
    assert_map_consistent(out, qraw)
    if "log_size=3M" in options:
        with vmforge.open_image(str(out)) as img:
            assert img.top.header.log_length == 3 * MiB  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", ["0", "1M", "1G", "1025M", "100G", "101G", "2T"])
def test_create_like_qemu(tmp_path, size):
    mine, theirs = tmp_path / "m.vhdx", tmp_path / "q.vhdx"
    vmforge_ok("create", "-f", "vhdx", mine, size)
    qemu_img("create", "-f", "vhdx", theirs, size)
    qi, wi = qemu_img_json("info", theirs), qemu_img_json("info", mine)
    assert (wi["virtual-size"], wi["cluster-size"]) == (qi["virtual-size"], qi["cluster-size"])
    assert default_block_size(qi["virtual-size"]) == qi["cluster-size"]
    assert check_json(mine, "vhdx")[0] == 0
    entries = [e for e in vmforge_json("map", mine) if e["length"]]
    assert sum(e["length"] for e in entries) == qi["virtual-size"]
    assert all(e["zero"] and not e["data"] for e in entries), "a new disk holds no data"


@pytest.mark.parametrize(("options", "word"), [
    ("subformat=differencing", "subformat"), ("block_size=3M", "block_size"),
    ("block_size=512M", "block_size"), ("block_size=512K", "block_size"),
    ("log_size=1536K", "log_size"), ("cluster_size=64K", "cluster_size"),
    ("block_state_zero=maybe", "block_state_zero")])
def test_create_bad_options(tmp_path, options, word):
    proc = run_vmforge("create", "-f", "vhdx", "-o", options, tmp_path / "x.vhdx", "16M")
    assert_clean_error(proc, contains=word)
    assert not (tmp_path / "x.vhdx").exists()


def test_create_too_large(tmp_path):
    assert_clean_error(run_vmforge("create", "-f", "vhdx", tmp_path / "x.vhdx", "65T"),
                       contains="64TB")


# --- check -------------------------------------------------------------------------------


def test_check_clean_and_damaged(pattern_file, tmp_path):
    src = pattern_file("mixed", size=4 * MiB)
    good = tmp_path / "good.vhdx"
    vmforge_ok("convert", "-O", "vhdx", "-o", "block_size=1M", src, good)
    assert run_vmforge("check", good).returncode == 0 == check_json(good, "vhdx")[0]
    with vmforge.open_image(str(good)) as img:
        reader = img.top
        bat_at = reader.bat_region.file_offset  # type: ignore[attr-defined]
        first = int(reader.bat[0])  # type: ignore[attr-defined]
        meta_at = reader.meta_region.file_offset  # type: ignore[attr-defined]
    assert first & S.BAT_STATE_MASK == S.PAYLOAD_BLOCK_FULLY_PRESENT
    cases = {
        "past-eof": (1 << 40) | S.PAYLOAD_BLOCK_FULLY_PRESENT,
        "overlap": meta_at | S.PAYLOAD_BLOCK_FULLY_PRESENT,
    }
    for label, entry in cases.items():
        bad = tmp_path / f"{label}.vhdx"
        shutil.copyfile(good, bad)
        with open(bad, "r+b") as f:
            f.seek(bat_at)
            f.write(entry.to_bytes(8, "little"))
        assert check_json(bad, "vhdx")[0] == 2, label
        proc = run_vmforge("check", "--output=json", bad)
        assert proc.returncode == 2, proc.stderr
        assert_clean_error(run_vmforge("convert", "-O", "raw", bad, tmp_path / "x.raw"),
                           contains="BAT entry 0")
    truncated = tmp_path / "cut.vhdx"
    shutil.copyfile(good, truncated)
    os.truncate(truncated, os.path.getsize(good) - 3 * MiB)
    assert check_json(truncated, "vhdx")[0] == 2
    assert run_vmforge("check", truncated).returncode == 2


# --- corpus ------------------------------------------------------------------------------

CORPUS_READ = ["qemu-iotests/iotest-dynamic-1G.vhdx.bz2", "qemu-iotests/test-disk2vhd.vhdx.bz2",
               "dissect-hypervisor/vhdx/fixed.vhdx.gz", "dissect-hypervisor/vhdx/dynamic.vhdx.gz"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-vhdx")


@pytest.mark.parametrize("rel", CORPUS_READ)
def test_corpus_like_qemu(corpus_dir, tmp_path, rel):
    path = corpus_file(corpus_dir, rel)
    assert _info_subset(vmforge_json("info", path)) == _info_subset(qemu_img_json("info", path))
    mine, theirs = tmp_path / "v.raw", tmp_path / "q.raw"
    vmforge_ok("convert", "-O", "raw", path, mine)
    qemu_img("convert", "-f", "vhdx", "-O", "raw", path, theirs)
    assert_same_bytes(mine, theirs)
    assert_map_consistent(path, theirs)
    assert run_vmforge("check", path).returncode == 0 == check_json(path, "vhdx")[0]


def test_corpus_disk2vhd_identical_headers(corpus_dir):
    path = corpus_file(corpus_dir, "qemu-iotests/test-disk2vhd.vhdx.bz2")
    raw = path.read_bytes()[:S.HEADER2_OFFSET + S.HEADER_SIZE]
    assert raw[S.HEADER1_OFFSET:S.HEADER1_OFFSET + 4096] == raw[S.HEADER2_OFFSET:]
    assert vmforge_json("info", path)["virtual-size"] == 268_435_456


# --- the dirty log -------------------------------------------------------------------------

DIRTY = "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2"


@pytest.fixture(scope="module")
def dirty(corpus_dir, tmp_path_factory):
    """(the dirty file, qemu's raw after replaying the log on a copy with check -r all)."""
    path = corpus_file(corpus_dir, DIRTY)
    work = tmp_path_factory.mktemp("dirty")
    copy = work / "replayed-by-qemu.vhdx"
    shutil.copyfile(path, copy)
    os.chmod(copy, 0o644)
    proc = qemu_img("check", "-r", "all", copy, check=False)
    assert proc.returncode == 0 and "1 corruptions" in proc.stdout, proc.stdout + proc.stderr
    raw = work / "expected.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", copy, raw)
    return path, copy, raw


def test_dirty_log_refused_like_qemu(dirty):
    path, _, _ = dirty
    q = qemu_img("info", path, check=False)
    assert q.returncode != 0 and "log that needs to be replayed" in q.stderr
    before = sha256(path)
    for cmd in (["info"], ["map"], ["check"], ["convert", "-O", "raw", path.parent / "no.raw"]):
        proc = run_vmforge(*cmd[:1], path, *cmd[1:]) if cmd[0] != "convert" else \
            run_vmforge("convert", "-O", "raw", path, path.parent / "no.raw")
        assert_clean_error(proc, contains="log needs replay")
        assert "--replay-log" in proc.stderr
    with pytest.raises(vmforge.errors.CorruptImage):
        vmforge.open_image(str(path))
    assert sha256(path) == before


def test_dirty_log_replayed_in_memory(dirty, tmp_path):
    path, repaired, expected = dirty
    before = sha256(path)
    out = tmp_path / "v.raw"
    vmforge_ok("convert", "--replay-log", "-O", "raw", path, out)
    assert_same_bytes(out, expected)
    info = vmforge_json("info", "--replay-log", path)
    assert _info_subset(info) == _info_subset(qemu_img_json("info", repaired))
    assert vmforge_ok("compare", "--replay-log", path, repaired).returncode == 0
    entries = vmforge_json("map", "--replay-log", path)
    # the replayed BAT differs from the stale one on disk: the log really was applied
    with vmforge.open_image(str(repaired)) as fixed, \
            vmforge.open_image(str(path), replay_log=True) as mine:
        assert fixed.top.bat == mine.top.bat  # type: ignore[attr-defined]
        assert mine.top.log_replayed  # type: ignore[attr-defined]
        at = mine.top.bat_region.file_offset  # type: ignore[attr-defined]
        with open(path, "rb") as f:
            f.seek(at)
            stale = f.read(4096)
        assert stale != mine.top.bat[:512].tobytes()  # type: ignore[attr-defined]
    assert sum(e["length"] for e in entries) == 10 << 30
    vhdx_out = tmp_path / "flat.vhdx"
    vmforge_ok("convert", "--replay-log", "-O", "vhdx", path, vhdx_out)
    # (qemu-img compare would read all 10 GiB: qemu has no block status for vhdx)
    assert check_json(vhdx_out, "vhdx")[0] == 0
    vmforge_ok("compare", expected, vhdx_out)
    assert sha256(path) == before, "the original file must never be written"


def test_dirty_log_repaired_in_place(dirty, tmp_path):
    """``check -r all`` replays the log into the file, as qemu-img check -r all does."""
    path, _, expected = dirty
    mine = tmp_path / "mine.vhdx"
    shutil.copyfile(path, mine)
    os.chmod(mine, 0o644)
    with vmforge.open_image(str(path), replay_log=True) as img:
        guid = img.top.header.data_write_guid  # type: ignore[attr-defined]
    proc = vmforge_ok("check", "-r", "all", mine)
    assert "1 corruptions" in proc.stdout and "No errors were found" in proc.stdout
    again = vmforge_json("check", "-r", "all", mine)
    assert "corruptions-fixed" not in again and again["check-errors"] == 0
    assert qemu_img("check", mine).returncode == 0  # qemu opens it now: the log is empty
    out = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", mine, out)
    assert_same_bytes(out, expected)
    with vmforge.open_image(str(mine)) as img:
        assert img.top.header.log_guid == bytes(16)  # type: ignore[attr-defined]
        assert img.top.header.data_write_guid == guid  # type: ignore[attr-defined]
