"""Reading VMDK, differential against qemu-img 7.2.

Every subformat x adapter type qemu-img writes reads like qemu-img reads it (bytes,
``map``, ``info``); multi-extent disks (> 2 GiB, twoGbMaxExtent*), zeroed grains,
deltas made by qemu (depth 2-3, parentCID checked), seSparse through a descriptor,
``check`` verdicts and exit codes on clean and poked images.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

import vmforge
from tests.data.qemu import qemu_img, qemu_img_json, qemu_io
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    map_diff,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)
from vmforge.formats import detect_format
from vmforge.formats.vmdk import VmdkFormat
from vmforge.formats.vmdk import structs as S

MiB = 1 << 20
GiB = 1 << 30
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
PATTERNS = [("mixed", 4 * MiB), ("holes", 4 * MiB), ("odd_size", 4 * MiB), ("all_zero", 2 * MiB),
            ("tiny_odd", 4 * MiB)]
# every pattern with the default adapter, every adapter with one pattern
CASES = [(sf, "ide", p, s) for sf in SUBFORMATS for p, s in PATTERNS] + \
        [(sf, a, "mixed", 4 * MiB) for sf in SUBFORMATS for a in ADAPTERS[1:]]
IDS = [f"{sf}-{a}-{p}-{s}" for sf, a, p, s in CASES]


@pytest.fixture(scope="module")
def qemu_vmdk(qemu_made):
    def make(subformat: str, adapter: str, name: str, size: int) -> tuple[Path, Path]:
        return qemu_made("vmdk", f"subformat={subformat},adapter_type={adapter}", name, size)
    return make


def _fmt_specific_equal(ours: dict, theirs: dict) -> None:
    for key in ("virtual-size", "format", "cluster-size", "format-specific"):
        assert ours.get(key) == theirs.get(key), (key, ours.get(key), theirs.get(key))


@pytest.mark.parametrize(("subformat", "adapter", "name", "size"), CASES, ids=IDS)
def test_read_matches_qemu(qemu_vmdk, tmp_path, subformat, adapter, name, size):
    img, expected = qemu_vmdk(subformat, adapter, name, size)
    out = tmp_path / "out.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    assert_same_bytes(out, expected)
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    _fmt_specific_equal(vmforge_json("info", img), qemu_img_json("info", img))


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_api_reads_match_qemu(qemu_vmdk, subformat):
    img, raw = qemu_vmdk(subformat, "ide", "mixed", 4 * MiB)
    expected = raw.read_bytes()
    with vmforge.open_image(str(img)) as image:
        assert image.format == "vmdk"
        assert image.virtual_size == len(expected)
        assert image.read(0, len(expected)) == expected
        for off in range(0, len(expected), 4096):
            assert image.read(off, 4096) == expected[off:off + 4096], off
        off = 1
        while off < len(expected):
            n = min(7777, len(expected) - off)
            assert image.read(off, n) == expected[off:off + n], off
            off += n


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_probe_detects_vmdk(qemu_vmdk, subformat):
    img, _ = qemu_vmdk(subformat, "ide", "mixed", 4 * MiB)
    assert detect_format(str(img)) is VmdkFormat


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                                       "monolithicSparse"])
def test_multi_extent_disk_matches_qemu(tmp_path, subformat):
    """A disk over 2 GiB: writes on both sides of the extent boundary and at the end."""
    img = tmp_path / "big.vmdk"
    size = 2 * GiB + 3 * MiB + 512
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", img, size)
    qemu_io(img, ["write -P 0x11 1M 64k", f"write -P 0x22 {2 * GiB - 96 * 1024} 192k",
                  f"write -P 0x33 {size - 4096} 4096", "write -P 0x44 7 3"], fmt="vmdk")
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    info = vmforge_json("info", img)
    _fmt_specific_equal(info, qemu_img_json("info", img))
    if subformat.startswith("twoGb"):
        assert len(info["format-specific"]["data"]["extents"]) == 2
    out = tmp_path / "out.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    proc = qemu_img("compare", "-f", "raw", "-F", "vmdk", out, img, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with vmforge.open_image(str(img)) as image:
        assert image.read(2 * GiB - 4, 8) == b"\x22" * 8  # a read across the extent boundary


def test_zeroed_grains_read_like_qemu(tmp_path):
    img = tmp_path / "z.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, 4 * MiB)
    qemu_io(img, ["write -P 0x55 0 1M", "write -z 64k 128k", "write -z 2M 64k"], fmt="vmdk")
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    assert any(e["zero"] and e["present"] and not e["data"] for e in ours)
    out, expected = tmp_path / "out.raw", tmp_path / "q.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    qemu_img("convert", "-O", "raw", img, expected)
    assert_same_bytes(out, expected)


def _qemu_chain(tmp_path: Path, depth: int, subformat: str = "monolithicSparse") -> list[Path]:
    """base <- d1 <- ... made by qemu-img, each layer writing its own pattern."""
    layers = [tmp_path / "base.vmdk"]
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", layers[0], 8 * MiB)
    qemu_io(layers[0], ["write -P 1 0 3M", "write -P 9 7M 1M"], fmt="vmdk")
    for i in range(1, depth):
        layer = tmp_path / f"delta{i}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-b", layers[-1].name, "-F", "vmdk", layer,
                 cwd=tmp_path)
        qemu_io(layer, [f"write -P {i + 1} {i}M 1536k", f"write -P {i + 20} {5 * MiB + i} 1000"],
                fmt="vmdk")
        layers.append(layer)
    return layers


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse"])
def test_qemu_made_delta_chain_reads_composed(tmp_path, depth, subformat):
    top = _qemu_chain(tmp_path, depth, subformat)[-1]
    ours, theirs = vmforge_json("map", top), qemu_img_json("map", top)
    assert ours == theirs, map_diff(ours, theirs)
    out, expected = tmp_path / "out.raw", tmp_path / "q.raw"
    vmforge_ok("convert", "-O", "raw", top, out)
    qemu_img("convert", "-O", "raw", top, expected)
    assert_same_bytes(out, expected)
    info, qinfo = vmforge_json("info", top), qemu_img_json("info", top)
    for key in ("backing-filename", "backing-filename-format", "format-specific"):
        assert info.get(key) == qinfo.get(key), key


def test_parent_cid_mismatch_refused_like_qemu(tmp_path):
    base, child = _qemu_chain(tmp_path, 2)
    # a write through qemu changes the parent's CID, invalidating the child
    qemu_io(base, ["write -P 7 6M 64k"], fmt="vmdk")
    assert qemu_img("convert", "-O", "raw", child, tmp_path / "q.raw", check=False).returncode
    proc = run_vmforge("convert", "-O", "raw", child, tmp_path / "v.raw")
    assert_clean_error(proc, contains="parentCID")
    with vmforge.open_image(str(base)) as b:
        cid = b.info().format_specific["data"]["cid"]
    assert f"{cid:08x}" in proc.stderr
    assert not (tmp_path / "v.raw").exists()


def test_delta_refused_in_untrusted_mode(tmp_path):
    top = _qemu_chain(tmp_path, 2)[-1]
    assert_clean_error(run_vmforge("convert", "--untrusted", "-O", "raw", top,
                                   tmp_path / "o.raw"), contains="untrusted")


def _sesparse_descriptor(directory: Path, extent: str, sectors: int) -> Path:
    # no blank line right before the extent line: qemu's sscanf would read it twice
    desc = directory / "ses-desc.vmdk"
    desc.write_text("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
                    f'createType="seSparse"\n# Extent description\nRW {sectors} SESPARSE '
                    f'"{extent}"\n')
    return desc


def test_sesparse_descriptor_and_bare_extent_read_like_qemu(corpus_vmdk, tmp_path):
    extent = tmp_path / "ses.vmdk"
    shutil.copyfile(corpus_vmdk / "sesparse.vmdk", extent)
    capacity = struct.unpack_from("<Q", extent.read_bytes()[:512], 16)[0]
    desc = _sesparse_descriptor(tmp_path, extent.name, capacity)
    ours, theirs = vmforge_json("map", desc), qemu_img_json("map", desc)
    assert ours == theirs, map_diff(ours, theirs)
    _fmt_specific_equal(vmforge_json("info", desc), qemu_img_json("info", desc))
    expected = tmp_path / "q.raw"
    qemu_img("convert", "-O", "raw", desc, expected)
    for src in (desc, extent):  # the bare extent reads the same as through its descriptor
        out = tmp_path / "v.raw"
        vmforge_ok("convert", "-O", "raw", src, out)
        assert_same_bytes(out, expected)
    # qemu-img calls the bare extent raw; vmforge says what it is
    info = vmforge_json("info", extent)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "seSparse"
    assert info["format-specific"]["data"]["extents"][0]["format"] == "SESPARSE"
    assert qemu_img_json("info", extent)["format"] == "raw"


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse",
                                       "monolithicFlat"])
def test_check_clean_matches_qemu(qemu_vmdk, subformat):
    img, _ = qemu_vmdk(subformat, "ide", "mixed", 4 * MiB)
    proc = run_vmforge("check", img)
    assert proc.returncode == 0 == qemu_img("check", img, check=False).returncode, proc.stderr


def _gt_entry_offset(img: Path, grain: int) -> int:
    """Byte offset of the (primary) grain table entry of ``grain`` in a KDMV file."""
    raw = img.read_bytes()
    h = S.SparseExtentHeader.unpack(raw)
    gt = struct.unpack_from("<I", raw, h.gdOffset * 512 + 4 * (grain // h.numGTEsPerGT))[0]
    return gt * 512 + 4 * (grain % h.numGTEsPerGT)


def test_check_grain_past_eof_verdict_matches_qemu(qemu_vmdk, tmp_path):
    src, _ = qemu_vmdk("monolithicSparse", "ide", "mixed", 4 * MiB)
    img = tmp_path / "bad.vmdk"
    shutil.copyfile(src, img)
    with open(img, "r+b") as f:
        f.seek(_gt_entry_offset(img, 3))
        f.write(struct.pack("<I", 0x100000))  # grain 3 far past the end of the file
    theirs = qemu_img("check", img, check=False)
    ours = run_vmforge("check", img)
    assert ours.returncode == theirs.returncode == 1, (ours, theirs)
    assert "points after EOF" in ours.stdout + ours.stderr
    assert "points after EOF" in theirs.stdout + theirs.stderr
    # reading the bad grain fails cleanly
    assert_clean_error(run_vmforge("convert", "-O", "raw", img, tmp_path / "o.raw"))


def _cowd_extent(path: Path) -> None:
    """An ESX "COWD" sparse extent: 1 MiB, 4 KiB grains, grains 3 and 10 allocated."""
    header = S.COWDHeader(S.COWD_MAGIC, 1, 3, 2048, 8, 4, 1, 56, 0, 0, 0).pack()
    data = bytearray(header + bytes(56 * 512 - len(header)))
    struct.pack_into("<I", data, 4 * 512, 5)  # GD[0] -> grain table at sector 5
    struct.pack_into("<I", data, 5 * 512 + 4 * 3, 40)  # grain 3 at sector 40
    struct.pack_into("<I", data, 5 * 512 + 4 * 10, 48)  # grain 10 at sector 48
    data[40 * 512:44 * 512] = b"\xab" * 2048 + b"\xcd" * 2048
    data[48 * 512:56 * 512] = bytes(range(256)) * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["vmfsSparse", "vmfs"])
def test_vmfs_descriptors_read_like_qemu(tmp_path, kind):
    if kind == "vmfsSparse":
        _cowd_extent(tmp_path / "x-delta.vmdk")
        line = 'RW 2048 VMFSSPARSE "x-delta.vmdk"'
    else:
        (tmp_path / "x-flat.vmdk").write_bytes(bytes(range(256)) * 4096)
        line = 'RW 2048 VMFS "x-flat.vmdk"'
    desc = tmp_path / "x.vmdk"
    desc.write_text("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
                    f'createType="{kind}"\n# Extent description\n{line}\n')
    ours, theirs = vmforge_json("map", desc), qemu_img_json("map", desc)
    assert ours == theirs, map_diff(ours, theirs)
    _fmt_specific_equal(vmforge_json("info", desc), qemu_img_json("info", desc))
    out, expected = tmp_path / "v.raw", tmp_path / "q.raw"
    vmforge_ok("convert", "-O", "raw", desc, out)
    qemu_img("convert", "-O", "raw", desc, expected)
    assert_same_bytes(out, expected)
    assert any(out.read_bytes())


def test_zero_and_rdonly_extents(tmp_path):
    """ZERO extents read zeros and RDONLY extents are read, as the VMDK spec says
    (qemu 7.2 skips both lines, so its disk is shorter: a documented difference)."""
    (tmp_path / "a-flat.vmdk").write_bytes(b"\x11" * 4096)
    desc = tmp_path / "a.vmdk"
    desc.write_text("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
                    'createType="monolithicFlat"\n# Extent description\n'
                    'RW 8 FLAT "a-flat.vmdk" 0\nRW 16 ZERO\nRDONLY 8 FLAT "a-flat.vmdk" 0\n')
    with vmforge.open_image(str(desc)) as image:
        assert image.virtual_size == 32 * 512
        assert image.read(0, 32 * 512) == b"\x11" * 4096 + bytes(8192) + b"\x11" * 4096
    assert qemu_img_json("info", desc)["virtual-size"] == 4096
    assert_clean_error(run_vmforge("info", tmp_path / "n.vmdk"))  # no such file
    desc.write_text(desc.read_text().replace("RDONLY", "NOACCESS"))
    assert_clean_error(run_vmforge("info", desc), contains="NOACCESS")
