"""VDI, dynamic and static, differential against qemu-img 7.2.

Reading: images qemu-img makes read like qemu-img reads them (bytes, map, info).
Writing: vmforge's files pass qemu-img check and compare and get qemu-img's size.
check: vmforge's verdict and exit code equal qemu-img's on clean and poked images.
Hostile files fail with one typed error line.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

import vmforge
from tests.data.qemu import check_json, qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    map_diff,
    poke,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)
from vmforge.formats import detect_format
from vmforge.formats.vdi import VdiFormat
from vmforge.formats.vdi import structs as S

MiB = 1 << 20
STATIC = {"dynamic": "static=off", "static": "static=on"}
# (pattern, size): even and odd sizes, one smaller than a sector, one of many blocks
PATTERNS = [("holes", 4 * MiB), ("mixed", 4 * MiB), ("odd_size", 4 * MiB), ("tiny_odd", 4 * MiB),
            ("zero_runs", 4 * MiB), ("all_zero", 2 * MiB), ("mixed", 7 * MiB + 3 * 512)]
CASES = [(p, s, k) for p, s in PATTERNS for k in STATIC]
IDS = [f"{p}-{s}-{k}" for p, s, k in CASES]
INFO_KEYS = ("virtual-size", "format", "cluster-size", "format-specific", "dirty-flag")

# field offsets in the header (VDICore.h VDIPREHEADER + VDIHEADER1PLUS)
OFF_VERSION = 0x44
OFF_TYPE = 0x4C
OFF_BLOCKS = 0x154
OFF_DATA = 0x158
OFF_CBSECTOR = 0x168
OFF_CBDISK = 0x170
OFF_CBBLOCK = 0x178
OFF_CBBLOCKEXTRA = 0x17C
OFF_CBLOCKS = 0x180
OFF_CBLOCKSALLOC = 0x184
OFF_UUID_LINKAGE = 0x1A8


@pytest.fixture(scope="module")
def qemu_vdi(qemu_made):
    """``(pattern, size, kind) -> (vdi made by qemu-img, qemu's raw of it)``."""
    return lambda name, size, kind: qemu_made("vdi", STATIC[kind], name, size)


# --- reading what qemu-img writes ----------------------------------------------------

@pytest.mark.parametrize(("name", "size", "kind"), CASES, ids=IDS)
def test_convert_to_raw_matches_qemu(qemu_vdi, tmp_path, name, size, kind):
    vdi, expected = qemu_vdi(name, size, kind)
    out = tmp_path / "out.raw"
    vmforge_ok("convert", "-O", "raw", vdi, out)
    assert_same_bytes(out, expected)


@pytest.mark.parametrize(("name", "size", "kind"), CASES, ids=IDS)
def test_map_matches_qemu(qemu_vdi, name, size, kind):
    vdi, _ = qemu_vdi(name, size, kind)
    ours = vmforge_json("map", vdi)
    theirs = qemu_img_json("map", vdi)
    assert ours == theirs, map_diff(ours, theirs)


@pytest.mark.parametrize(("name", "size", "kind"), CASES, ids=IDS)
def test_info_matches_qemu(qemu_vdi, name, size, kind):
    vdi, _ = qemu_vdi(name, size, kind)
    ours = vmforge_json("info", vdi)
    theirs = qemu_img_json("info", vdi)
    assert ours["cluster-size"] == S.BLOCK_SIZE
    for key in INFO_KEYS:
        assert ours.get(key) == theirs.get(key), key


@pytest.mark.parametrize(("name", "size", "kind"),
                         [c for c in CASES if c[0] in ("mixed", "odd_size")],
                         ids=[i for c, i in zip(CASES, IDS, strict=True) if c[0] in ("mixed", "odd_size")])
def test_api_reads_match_qemu(qemu_vdi, name, size, kind):
    vdi, raw = qemu_vdi(name, size, kind)
    expected = raw.read_bytes()
    with vmforge.open_image(str(vdi)) as img:
        assert img.format == "vdi"
        assert img.virtual_size == len(expected)
        assert img.read(0, len(expected)) == expected, "whole read differs"
        for off in range(0, len(expected), 4096):
            assert img.read(off, min(4096, len(expected) - off)) == expected[off:off + 4096], off
        off = 1
        while off < len(expected):
            n = min(7777, len(expected) - off)
            assert img.read(off, n) == expected[off:off + n], f"7777-byte read at {off} differs"
            off += n


def test_probe_detects_vdi(qemu_vdi):
    vdi, _ = qemu_vdi("mixed", 4 * MiB, "dynamic")
    assert detect_format(str(vdi)) is VdiFormat


def test_discarded_blocks_read_zero_like_qemu(qemu_vdi, tmp_path):
    """VDI_IMAGE_BLOCK_ZERO (qemu: VDI_DISCARDED) entries read zeros, mapped as zero."""
    src, _ = qemu_vdi("mixed", 4 * MiB, "dynamic")
    vdi = tmp_path / "discard.vdi"
    shutil.copyfile(src, vdi)
    h = S.Header.unpack(vdi.read_bytes()[:512])
    poke(vdi, h.offBlocks + 4, "<I", S.BLOCK_ZERO)  # block 1
    ours, theirs = vmforge_json("map", vdi), qemu_img_json("map", vdi)
    assert ours == theirs, map_diff(ours, theirs)
    qemu_raw, our_raw = tmp_path / "q.raw", tmp_path / "v.raw"
    qemu_img("convert", "-f", "vdi", "-O", "raw", vdi, qemu_raw)
    vmforge_ok("convert", "-O", "raw", vdi, our_raw)
    assert_same_bytes(our_raw, qemu_raw)


# --- writing ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "size", "kind"), CASES, ids=IDS)
def test_written_vdi_passes_qemu_check_and_compare(pattern_file, tmp_path, name, size, kind):
    src = pattern_file(name, size=size)
    out = tmp_path / "out.vdi"
    vmforge_ok("convert", "-O", "vdi", "-o", STATIC[kind], src, out)
    rc, data = check_json(out, fmt="vdi")
    assert rc == 0, data
    assert data.get("corruptions", 0) == 0 and data.get("check-errors", 0) == 0, data
    proc = qemu_img("compare", "-f", "raw", "-F", "vdi", src, out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = qemu_img_json("info", out)
    assert info["format"] == "vdi"
    assert info["virtual-size"] == -(-src.stat().st_size // 512) * 512
    # the same number of blocks as qemu-img allocates for the same source
    theirs = tmp_path / "theirs.vdi"
    qemu_img("convert", "-O", "vdi", "-o", STATIC[kind], src, theirs)
    h_ours = S.Header.unpack(out.read_bytes()[:512])
    h_theirs = S.Header.unpack(theirs.read_bytes()[:512])
    assert h_ours.cBlocksAllocated == h_theirs.cBlocksAllocated
    assert h_ours.u32Type == h_theirs.u32Type
    # qemu's block map; the data area from the next MiB, as VirtualBox lays it out
    assert h_ours.offBlocks == h_theirs.offBlocks
    assert h_ours.offData == -(-h_theirs.offData // MiB) * MiB
    assert out.stat().st_size - h_ours.offData == theirs.stat().st_size - h_theirs.offData
    assert vmforge_json("map", out) == qemu_img_json("map", out)


@pytest.mark.parametrize("kind", list(STATIC))
@pytest.mark.parametrize("size", [0, 1, 1000000, MiB, 3 * MiB + 512, 5 * MiB - 1])
def test_create_size_matches_qemu(tmp_path, size, kind):
    ours, theirs = tmp_path / "ours.vdi", tmp_path / "theirs.vdi"
    vmforge_ok("create", "-f", "vdi", "-o", STATIC[kind], ours, size)
    qemu_img("create", "-f", "vdi", "-o", STATIC[kind], theirs, size)
    qi_ours, qi_theirs = qemu_img_json("info", ours), qemu_img_json("info", theirs)
    for key in ("virtual-size", "cluster-size", "format"):
        assert qi_ours[key] == qi_theirs[key], key
    h_ours = S.Header.unpack(ours.read_bytes()[:512])
    h_theirs = S.Header.unpack(theirs.read_bytes()[:512])
    assert h_ours.offData == -(-h_theirs.offData // MiB) * MiB  # VirtualBox's alignment
    assert ours.stat().st_size - h_ours.offData == theirs.stat().st_size - h_theirs.offData
    rc, data = check_json(ours, fmt="vdi")
    assert rc == 0, data
    # for an empty disk qemu-img prints one zero-length entry, and so does vmforge
    assert vmforge_json("map", ours) == qemu_img_json("map", ours)


def test_written_header_fields(pattern_file, tmp_path):
    out = tmp_path / "out.vdi"
    vmforge_ok("convert", "-O", "vdi", pattern_file("mixed", size=4 * MiB), out)
    h = S.Header.unpack(out.read_bytes()[:512])
    assert h.u32Signature == S.SIGNATURE and h.u32Version == S.VERSION_1_1
    assert h.szFileInfo.rstrip(b"\0") == S.FILE_INFO_ORACLE
    assert h.u32Type == S.TYPE_NORMAL and h.cbBlock == MiB and h.cbBlockExtra == 0
    assert h.uuidCreate.version == 4 and h.uuidModify.version == 4
    assert h.uuidCreate != h.uuidModify
    assert h.uuidLinkage.int == 0 and h.uuidParentModify.int == 0


def test_header_roundtrip():
    h = S.new_header(3 * MiB + 512, fixed=True)
    assert S.Header.unpack(h.pack()) == h
    assert len(h.pack()) == 512


@pytest.mark.parametrize("kind", list(STATIC))
def test_convert_into_existing_vdi(pattern_file, tmp_path, kind):
    src = pattern_file("mixed", size=4 * MiB)
    out = tmp_path / "existing.vdi"
    qemu_img("create", "-f", "vdi", "-o", STATIC[kind], out, 4 * MiB)
    vmforge_ok("convert", "-n", "-O", "vdi", src, out)
    rc, data = check_json(out, fmt="vdi")
    assert rc == 0, data
    assert qemu_img("compare", "-f", "raw", "-F", "vdi", src, out, check=False).returncode == 0


def test_unknown_option_and_bad_flag_refused(tmp_path):
    assert_clean_error(run_vmforge("create", "-f", "vdi", "-o", "cluster_size=2M",
                                   tmp_path / "a.vdi", "1M"), contains="cluster_size")
    assert_clean_error(run_vmforge("create", "-f", "vdi", "-o", "static=maybe",
                                   tmp_path / "b.vdi", "1M"), contains="static")


# --- check -----------------------------------------------------------------------------

def _check_both(path: Path) -> tuple[int, dict[str, object], int, dict[str, object]]:
    qrc, qdata = check_json(path, fmt="vdi")
    proc = run_vmforge("check", "--output=json", "-f", "vdi", path)
    import json

    vdata = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return qrc, qdata, proc.returncode, vdata


def _poked_images(src: Path, root: Path) -> dict[str, Path]:
    h = S.Header.unpack(src.read_bytes()[:512])
    out = {}
    for name in ("clean", "too_large", "duplicate", "alloc_mismatch", "many_bad"):
        p = root / f"{name}.vdi"
        shutil.copyfile(src, p)
        out[name] = p
    poke(out["too_large"], h.offBlocks, "<I", h.cBlocks + 5)
    poke(out["duplicate"], h.offBlocks + 4, "<I", 0)  # block 1 -> host block 0 as well
    poke(out["alloc_mismatch"], OFF_CBLOCKSALLOC, "<I", h.cBlocksAllocated + 1)
    poke(out["many_bad"], h.offBlocks, "<4I", 0, 0, 0, 0x7FFFFFFF)
    return out


@pytest.mark.parametrize("case", ["clean", "too_large", "duplicate", "alloc_mismatch", "many_bad"])
def test_check_matches_qemu(qemu_vdi, tmp_path, case):
    src, _ = qemu_vdi("mixed", 4 * MiB, "dynamic")
    path = _poked_images(src, tmp_path)[case]
    qrc, qdata, vrc, vdata = _check_both(path)
    assert vrc == qrc
    qdata.pop("filename", None)
    vdata.pop("filename", None)
    assert vdata == qdata


# --- hostile input -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_vdi(tmp_path_factory, pattern_file):
    root = tmp_path_factory.mktemp("vdi-hostile")
    vdi = root / "base.vdi"
    qemu_img("convert", "-O", "vdi", pattern_file("mixed", size=4 * MiB), vdi)
    return vdi


def test_truncated_header_every_length(small_vdi, tmp_path):
    data = small_vdi.read_bytes()
    h = S.Header.unpack(data[:512])
    cut = tmp_path / "cut.vdi"
    for n in range(0, h.offBlocks + h.cBlocks * 4):
        cut.write_bytes(data[:n])
        for args in (("-f", "vdi"), ()):
            proc = run_vmforge("info", *args, cut)
            if not args and n < S.SIGNATURE_OFFSET + 4:
                assert proc.returncode == 0  # no signature: raw, as qemu-img sees it
                continue
            assert_clean_error(proc)


def _hostile(small_vdi: Path, tmp_path: Path, offset: int, fmt: str, *values: int | bytes) -> Path:
    p = tmp_path / "hostile.vdi"
    shutil.copyfile(small_vdi, p)
    poke(p, offset, fmt, *values)
    return p


HOSTILE = {
    "bad_signature": (0x40, "<I", 0xBEDA1080, "not a VDI image"),
    "version_1_0": (OFF_VERSION, "<I", 0x00010000, "VDI version 1.0"),
    "version_2_1": (OFF_VERSION, "<I", 0x00020001, "VDI version 2.1"),
    "cblocks_huge": (OFF_CBLOCKS, "<I", 0x20000000, "block count"),
    "cblocks_max_u32": (OFF_CBLOCKS, "<I", 0xFFFFFFFF, "block count"),
    "cblocks_past_eof": (OFF_CBLOCKS, "<I", 0x100000, "past the end"),
    "bmap_past_eof": (OFF_BLOCKS, "<I", 0x10000000, "past the end"),
    "bmap_unaligned": (OFF_BLOCKS, "<I", 0x201, "sector-aligned"),
    "data_unaligned": (OFF_DATA, "<I", 0x401, "sector-aligned"),
    "bmap_in_header": (OFF_BLOCKS, "<I", 0, "overlaps the header"),
    "data_in_bmap": (OFF_DATA, "<I", 0x200, "overlaps the block map"),
    "block_size_2M": (OFF_CBBLOCK, "<I", 2 * MiB, "block size"),
    "block_size_0": (OFF_CBBLOCK, "<I", 0, "block size"),
    "block_extra": (OFF_CBBLOCKEXTRA, "<I", 512, "block extra"),
    "sector_size": (OFF_CBSECTOR, "<I", 4096, "sector size"),
    "disk_huge": (OFF_CBDISK, "<Q", 1 << 62, "disk size"),
    "disk_beyond_blocks": (OFF_CBDISK, "<Q", 5 * MiB, "needs more than"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("cmd", ["info", "map", "convert"])
def test_hostile_header_refused(small_vdi, tmp_path, case, cmd):
    offset, fmt, value, contains = HOSTILE[case]
    p = _hostile(small_vdi, tmp_path, offset, fmt, value)
    args: list[object] = [cmd, "-f", "vdi", p]
    if cmd == "convert":
        args = ["convert", "-f", "vdi", "-O", "raw", p, tmp_path / "out.raw"]
    proc = run_vmforge(*args, isolated=case.startswith("cblocks"), mem_limit=None)
    assert_clean_error(proc, contains=contains)
    # qemu-img refuses (or, for a map past EOF, reads zeros there and fails check)
    if case not in ("cblocks_past_eof", "bmap_past_eof", "bmap_in_header", "data_in_bmap",
                    "block_extra"):
        assert qemu_img("info", "-f", "vdi", p, check=False).returncode != 0


def test_differencing_vdi_names_parent(small_vdi, tmp_path):
    parent = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    p = _hostile(small_vdi, tmp_path, OFF_UUID_LINKAGE, "16s", parent.bytes_le)
    poke(p, OFF_TYPE, "<I", S.TYPE_DIFF)
    # info describes it (qemu-img refuses even that); reading needs the parent named
    spec = vmforge_json("info", p)["format-specific"]["data"]
    assert spec["parent-uuid"] == str(parent) and spec["image-type"] == "diff"
    proc = run_vmforge("convert", "-O", "raw", p, tmp_path / "o.raw")
    assert_clean_error(proc, contains=str(parent))
    assert "differencing" in proc.stderr
    assert qemu_img("info", p, check=False).returncode != 0  # qemu refuses


def test_data_block_past_eof_is_a_clean_error(small_vdi, tmp_path):
    h = S.Header.unpack(small_vdi.read_bytes()[:512])
    p = _hostile(small_vdi, tmp_path, h.offBlocks, "<I", 1000)  # host block 1000: past EOF
    assert_clean_error(run_vmforge("convert", "-O", "raw", p, tmp_path / "o.raw"))
    assert not (tmp_path / "o.raw").exists()
