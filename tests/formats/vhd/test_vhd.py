"""VHD (vpc), fixed and dynamic, differential against qemu-img 7.2.

Reading: images qemu-img makes and real images from the corpus read like qemu-img
reads them (bytes, map, info). Writing: vmforge's files pass qemu-img compare and get
the size qemu-img would have chosen. Hostile files fail with one typed error line.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import vmforge
from tests.conftest import CORPUS
from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    decompress_sparse,
    map_diff,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)
from vmforge import errors
from vmforge.formats import detect_format
from vmforge.formats.vhd import VpcFormat, plan_size
from vmforge.formats.vhd import structs as S

MiB = 1 << 20
SUBFORMATS = {
    "dynamic": "subformat=dynamic",
    "fixed": "subformat=fixed",
    "dynamic-force": "subformat=dynamic,force_size=on",
    "fixed-force": "subformat=fixed,force_size=on",
}
# (pattern, size): even and odd sizes, a tiny one, and one spanning several 2 MiB blocks
PATTERNS = [("holes", 4 * MiB), ("mixed", 4 * MiB), ("odd_size", 4 * MiB), ("tiny_odd", 4 * MiB),
            ("zero_runs", 4 * MiB), ("mixed", 7 * MiB + 3 * 512)]
INFO_KEYS = ("virtual-size", "format", "cluster-size", "format-specific", "dirty-flag")


@pytest.fixture(scope="module")
def qemu_vhd(qemu_made):
    """``(pattern, size, subformat) -> (vhd made by qemu-img, qemu's raw of it)``."""
    return lambda name, size, sub: qemu_made("vpc", SUBFORMATS[sub], name, size)


@pytest.mark.parametrize("sub", list(SUBFORMATS))
@pytest.mark.parametrize(("name", "size"), PATTERNS)
def test_read_qemu_made(qemu_vhd, tmp_path, name, size, sub):
    vhd, expected_raw = qemu_vhd(name, size, sub)
    out = tmp_path / "v.raw"
    vmforge_ok("convert", "-f", "vpc", "-O", "raw", vhd, out)
    assert_same_bytes(out, expected_raw)
    got = vmforge_json("map", "-f", "vpc", vhd)
    want = qemu_img_json("map", "-f", "vpc", vhd)
    assert got == want, map_diff(got, want)
    gi = vmforge_json("info", "-f", "vpc", vhd)
    qi = qemu_img_json("info", "-f", "vpc", vhd)
    assert {k: gi.get(k) for k in INFO_KEYS} == {k: qi.get(k) for k in INFO_KEYS}


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_api_reads(qemu_vhd, sub):
    vhd, raw = qemu_vhd("mixed", 7 * MiB + 3 * 512, sub)
    expected = raw.read_bytes()
    with vmforge.open_image(str(vhd), "vpc") as img:
        assert img.virtual_size == len(expected)
        assert img.read(0, len(expected)) == expected
        for off in range(0, len(expected), 4096):
            assert img.read(off, min(4096, len(expected) - off)) == expected[off:off + 4096]
        off = 1
        while off < len(expected):
            n = min(7777, len(expected) - off)
            assert img.read(off, n) == expected[off:off + n], f"read at {off}"
            off += n


def test_dynamic_probed_without_format(qemu_vhd):
    vhd, _ = qemu_vhd("holes", 4 * MiB, "dynamic")
    assert vmforge_json("info", vhd)["format"] == "vpc"


def test_fixed_probe_tail_scores():
    size = plan_size(3 * MiB, False)[0]  # a fixed disk's file is its CHS-rounded size + 512
    footer = writer_footer(size, S.DISK_TYPE_FIXED)
    assert VpcFormat.probe_tail(footer, size + 512) > 1
    assert VpcFormat.probe_tail(footer, size + 1024) == 0  # size inconsistent with the file
    bad = bytearray(footer)
    bad[100] ^= 1  # checksum no longer matches
    assert VpcFormat.probe_tail(bytes(bad), size + 512) == 0
    assert VpcFormat.probe(footer, size + 512) == 100  # a dynamic disk starts with the copy
    assert VpcFormat.probe(bytes(512), size + 512) == 0


def test_fixed_probed_without_format(qemu_vhd):
    vhd, _ = qemu_vhd("holes", 4 * MiB, "fixed")
    assert detect_format(str(vhd)).name == "vpc"


def writer_footer(size: int, disk_type: int) -> bytes:
    from vmforge.formats.vhd.writer import make_footer

    disk, chs = plan_size(size, False)
    return make_footer(disk, chs, disk_type, False).sealed()


# --- writing ---------------------------------------------------------------------------


def _mask_volatile(footer: bytes) -> bytes:
    """A footer without time stamp, checksum and unique id (different on every run)."""
    b = bytearray(footer)
    b[24:28] = bytes(4)
    b[64:84] = bytes(20)
    return bytes(b)


@pytest.mark.parametrize("sub", list(SUBFORMATS))
@pytest.mark.parametrize(("name", "size"), PATTERNS)
def test_write_matches_qemu(pattern_file, qemu_vhd, tmp_path, name, size, sub):
    src = pattern_file(name, size=size)
    out = tmp_path / "w.vhd"
    vmforge_ok("convert", "-O", "vpc", "-o", SUBFORMATS[sub], src, out)
    qemu_img("compare", "-f", "raw", "-F", "vpc", src, out)  # exit 0 unless identical
    qvhd, _ = qemu_vhd(name, size, sub)
    qi = qemu_img_json("info", "-f", "vpc", qvhd)
    wi = qemu_img_json("info", "-f", "vpc", out)
    assert wi["virtual-size"] == qi["virtual-size"]
    assert wi.get("cluster-size") == qi.get("cluster-size")
    mine, theirs = out.read_bytes(), qvhd.read_bytes()
    if sub.startswith("dynamic"):
        # each block's data starts on a 4 KiB boundary (writer.DATA_ALIGN), after a gap
        # of less than 4 KiB that qemu's layout does not have
        dyn = S.DynamicHeader.unpack(mine[512:1536])
        bat = struct.unpack_from(f">{dyn.max_table_entries}I", mine, dyn.table_offset)
        used = [e for e in bat if e != S.BAT_UNUSED]
        assert all((e * 512 + dyn.bitmap_size) % 4096 == 0 for e in used), used
        assert len(theirs) <= len(mine) < len(theirs) + 4096 * (len(used) + 1)
    else:
        assert len(mine) == len(theirs)
    assert _mask_volatile(mine[-512:]) == _mask_volatile(theirs[-512:])
    if sub.startswith("dynamic"):
        # qemu-img's layout: footer copy, header, BAT, the same blocks in the same order
        # (their host offsets differ by the alignment above)
        assert mine[:512] == mine[-512:]
        assert mine[512:1536] == theirs[512:1536]
        got = qemu_img_json("map", "-f", "vpc", out)
        want = qemu_img_json("map", "-f", "vpc", qvhd)
        assert [e.pop("offset", None) is None for e in got] == \
            [e.pop("offset", None) is None for e in want]
        assert got == want, map_diff(got, want)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", ["0", "1000", "1M", "4G", "127G", "200G"])
def test_create_size_like_qemu(tmp_path, sub, force, size):
    o = f"subformat={sub}" + (",force_size=on" if force else "")
    mine, theirs = tmp_path / "m.vhd", tmp_path / "q.vhd"
    vmforge_ok("create", "-f", "vpc", "-o", o, mine, size)
    qemu_img("create", "-f", "vpc", "-o", o, theirs, size)
    if sub == "fixed" and size == "0":
        # the file is only its footer, at offset 0: qemu takes it for a dynamic disk and
        # cannot open its own image; vmforge reads it as the empty fixed disk it is
        assert os.path.getsize(mine) == os.path.getsize(theirs) == 512
        assert qemu_img("info", "-f", "vpc", theirs, check=False).returncode != 0
        assert vmforge_json("info", "-f", "vpc", mine)["virtual-size"] == 0
        assert vmforge_json("info", "-f", "vpc", theirs)["virtual-size"] == 0
        return
    wi = qemu_img_json("info", "-f", "vpc", mine)
    qi = qemu_img_json("info", "-f", "vpc", theirs)
    assert wi["virtual-size"] == qi["virtual-size"]
    assert os.path.getsize(mine) == os.path.getsize(theirs)
    assert vmforge_json("info", "-f", "vpc", mine)["virtual-size"] == qi["virtual-size"]


def test_four_gib_rounds_up_like_qemu():
    assert plan_size(4 << 30, False)[0] == 4_295_467_008
    assert plan_size(4 << 30, True)[0] == 4 << 30


def test_create_too_large_refused(tmp_path):
    proc = run_vmforge("create", "-f", "vpc", tmp_path / "x.vhd", "2041G")
    assert_clean_error(proc, contains="too large")
    assert not (tmp_path / "x.vhd").exists()


def test_create_bad_options(tmp_path):
    assert_clean_error(run_vmforge("create", "-f", "vpc", "-o", "subformat=sparse",
                                   tmp_path / "x.vhd", "1M"), contains="subformat")
    assert_clean_error(run_vmforge("create", "-f", "vpc", "-o", "cluster_size=64K",
                                   tmp_path / "x.vhd", "1M"), contains="cluster_size")


# --- corpus ----------------------------------------------------------------------------

QEMU_IOTESTS = ["d2v-zerofilled.vhd", "hyperv2012r2-dynamic.vhd", "virtualpc-dynamic.vhd"]
DISSECT = ["dynamic.vhd", "fixed.vhd"]
SMALL = {"d2v-zerofilled.vhd", "dynamic.vhd", "fixed.vhd"}  # the rest are 127 GiB


@pytest.fixture(scope="module")
def corpus_vhd(tmp_path_factory):
    dest = tmp_path_factory.mktemp("corpus-vhd")
    for name in QEMU_IOTESTS + ["afl5.img"]:
        src = CORPUS / "qemu-iotests" / f"{name}.bz2"
        if not src.exists():
            pytest.fail(f"corpus missing: {src}")
        decompress_sparse(src, dest / name)
    for name in DISSECT:
        src = CORPUS / "dissect-hypervisor" / "vhd" / f"{name}.gz"
        if not src.exists():
            pytest.fail(f"corpus missing: {src}")
        decompress_sparse(src, dest / name)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("name", QEMU_IOTESTS + DISSECT)
def test_corpus_like_qemu(corpus_vhd, tmp_path, name):
    path = corpus_vhd / name
    qi = qemu_img_json("info", "-f", "vpc", path)
    gi = vmforge_json("info", "-f", "vpc", path)
    assert {k: gi.get(k) for k in INFO_KEYS} == {k: qi.get(k) for k in INFO_KEYS}
    got = vmforge_json("map", "-f", "vpc", path)
    want = qemu_img_json("map", "-f", "vpc", path)
    assert got == want, map_diff(got, want)
    if name in SMALL:
        mine, theirs = tmp_path / "v.raw", tmp_path / "q.raw"
        vmforge_ok("convert", "-f", "vpc", "-O", "raw", path, mine)
        qemu_img("convert", "-f", "vpc", "-O", "raw", path, theirs)
        assert_same_bytes(mine, theirs)
    else:
        # 127 GiB: never materialised; a sparse qcow2 made by vmforge must equal the original
        q = tmp_path / "v.qcow2"
        vmforge_ok("convert", "-f", "vpc", "-O", "qcow2", path, q)
        qemu_img("compare", "-f", "vpc", "-F", "qcow2", path, q)


def test_corpus_fixed_probed_by_its_footer(corpus_vhd):
    # qemu-img cannot probe fixed VHDs (it looks at offset 0 only); vmforge reads the footer
    tail = (corpus_vhd / "fixed.vhd").read_bytes()[-512:]
    assert VpcFormat.probe_tail(tail, os.path.getsize(corpus_vhd / "fixed.vhd")) > 1
    assert detect_format(str(corpus_vhd / "fixed.vhd")).name == "vpc"


def test_afl5_refused_like_qemu(corpus_vhd):
    path = corpus_vhd / "afl5.img"
    q = qemu_img("info", path, check=False)
    assert q.returncode != 0 and "Max Table Entries too large" in q.stderr
    proc = run_vmforge("info", path, isolated=True, mem_limit=1 << 30)
    assert_clean_error(proc, contains="Max Table Entries too large (1073741825)")
    with pytest.raises(errors.LimitExceeded):
        vmforge.open_image(str(path))


# --- hostile ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_dynamic(qemu_vhd):
    return qemu_vhd("mixed", 4 * MiB, "dynamic")[0]


def _reseal_footer(buf: bytearray, at: int) -> None:
    struct.pack_into(">I", buf, at + 64, S.checksum(bytes(buf[at:at + 512]), 64))


def _reseal_header(buf: bytearray, at: int = 512) -> None:
    struct.pack_into(">I", buf, at + 36, S.checksum(bytes(buf[at:at + 1024]), 36))


def _refused(path: Path, *extra: str) -> None:
    proc = run_vmforge("convert", *extra, "-O", "raw", path, path.with_suffix(".out"))
    assert_clean_error(proc)
    proc = run_vmforge("info", *extra, path)
    assert_clean_error(proc)


def test_truncated_at_every_length(good_dynamic, tmp_path):
    data = good_dynamic.read_bytes()
    # every cut inside footer copy, header and BAT, then cuts through the data blocks
    cuts = list(range(0, 2048, 7)) + [2048, 2560, 4096, 1 << 20, len(data) - 513]
    for n in cuts:
        p = tmp_path / "cut.vhd"
        p.write_bytes(data[:n])
        with pytest.raises(errors.ImageError):
            vmforge.open_image(str(p), "vpc")
    p = tmp_path / "cut.vhd"
    p.write_bytes(data[:1000])
    _refused(p, "-f", "vpc")


def test_truncated_fixed_footer(qemu_vhd, tmp_path):
    vhd, _ = qemu_vhd("holes", 4 * MiB, "fixed")
    data = vhd.read_bytes()
    for n in (1, 100, 511):  # the footer loses its tail: no cookie at the new end
        p = tmp_path / "f.vhd"
        p.write_bytes(data[:-n])
        with pytest.raises(errors.CorruptImage):
            vmforge.open_image(str(p), "vpc")
    _refused(p, "-f", "vpc")


@pytest.mark.parametrize("field", ["footer", "header", "fixed"])
def test_bad_checksums(good_dynamic, qemu_vhd, tmp_path, field):
    if field == "fixed":
        buf = bytearray(qemu_vhd("holes", 4 * MiB, "fixed")[0].read_bytes())
        buf[-512 + 64] ^= 0x10
    else:
        buf = bytearray(good_dynamic.read_bytes())
        buf[64 if field == "footer" else 512 + 36] ^= 0x10
    p = tmp_path / "bad.vhd"
    p.write_bytes(bytes(buf))
    with pytest.raises(errors.CorruptImage, match="checksum"):
        vmforge.open_image(str(p), "vpc")
    _refused(p, "-f", "vpc")


def test_bat_past_eof(good_dynamic, tmp_path):
    buf = bytearray(good_dynamic.read_bytes())
    struct.pack_into(">Q", buf, 512 + 16, len(buf) + 512)  # table_offset
    _reseal_header(buf)
    p = tmp_path / "bat.vhd"
    p.write_bytes(bytes(buf))
    with pytest.raises(errors.TruncatedImage):
        vmforge.open_image(str(p), "vpc")
    _refused(p)


def test_bat_entry_past_eof(good_dynamic, tmp_path):
    buf = bytearray(good_dynamic.read_bytes())
    struct.pack_into(">I", buf, 1536, 0x7FFFFF00)  # block 0 far beyond the file
    p = tmp_path / "blk.vhd"
    p.write_bytes(bytes(buf))
    q = qemu_img("info", "-f", "vpc", p, check=False)
    assert q.returncode != 0  # qemu: "free_data_block_offset points after the end of file"
    with pytest.raises(errors.TruncatedImage):
        vmforge.open_image(str(p), "vpc")
    _refused(p)


@pytest.mark.parametrize("entries", [2**30 + 1, 0xFFFFFFFF, 2**27])
def test_huge_max_table_entries(good_dynamic, tmp_path, entries):
    buf = bytearray(good_dynamic.read_bytes())
    struct.pack_into(">I", buf, 512 + 28, entries)
    _reseal_header(buf)
    p = tmp_path / "mte.vhd"
    p.write_bytes(bytes(buf))
    with pytest.raises((errors.LimitExceeded, errors.TruncatedImage)):
        vmforge.open_image(str(p), "vpc")
    proc = run_vmforge("info", p, isolated=True, mem_limit=1 << 30)
    assert_clean_error(proc)


@pytest.mark.parametrize("block_size", [0, 256, 3 * MiB, 1 << 31 | 1])
def test_bad_block_size(good_dynamic, tmp_path, block_size):
    buf = bytearray(good_dynamic.read_bytes())
    struct.pack_into(">I", buf, 512 + 32, block_size)
    _reseal_header(buf)
    p = tmp_path / "bs.vhd"
    p.write_bytes(bytes(buf))
    assert qemu_img("info", "-f", "vpc", p, check=False).returncode != 0
    with pytest.raises(errors.CorruptImage):
        vmforge.open_image(str(p), "vpc")
    _refused(p)


def test_bad_header_magic_and_differencing(good_dynamic, tmp_path):
    buf = bytearray(good_dynamic.read_bytes())
    buf[512:520] = b"cxsparsX"
    p = tmp_path / "magic.vhd"
    p.write_bytes(bytes(buf))
    _refused(p)
    buf = bytearray(good_dynamic.read_bytes())
    struct.pack_into(">I", buf, 60, S.DISK_TYPE_DIFFERENCING)
    _reseal_footer(buf, 0)
    p.write_bytes(bytes(buf))
    # a differencing disk without any parent locator: nothing to follow, said plainly
    with pytest.raises(errors.BackingChainError, match="no parent locator"):
        vmforge.open_image(str(p), "vpc")
    assert_clean_error(run_vmforge("convert", "-O", "raw", p, tmp_path / "o.raw"),
                       contains="parent VHD not found")


def test_huge_geometry_refused(good_dynamic, tmp_path):
    buf = bytearray(good_dynamic.read_bytes())
    buf[28:32] = b"win "
    struct.pack_into(">Q", buf, 48, (S.MAX_SECTORS + 1) * 512)  # current_size past 2040 GiB
    _reseal_footer(buf, 0)
    p = tmp_path / "big.vhd"
    p.write_bytes(bytes(buf))
    assert qemu_img("info", "-f", "vpc", p, check=False).returncode != 0
    with pytest.raises(errors.LimitExceeded):
        vmforge.open_image(str(p), "vpc")
    _refused(p)


def test_not_a_vhd(tmp_path):
    p = tmp_path / "x.raw"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(errors.CorruptImage):
        vmforge.open_image(str(p), "vpc")
    _refused(p, "-f", "vpc")
