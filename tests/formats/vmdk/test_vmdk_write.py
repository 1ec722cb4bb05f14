"""Writing VMDK (create and convert -O vmdk), checked by qemu-img 7.2.

Every subformat x adapter type passes ``qemu-img check`` and ``compare``; the files
are laid out as qemu-img lays them out (same extent file names and sizes, same headers
and descriptors but for the random CID); deltas made by vmforge read as the composed
chain; multi-file outputs never leave a file under a final name when they fail.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest

from tests.data.qemu import check_json, qemu_img, qemu_img_json, qemu_io
from tests.helpers import (
    assert_clean_error,
    map_diff,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)
from vmforge.formats.vmdk import structs as S
from vmforge.formats.vmdk.writer import extent_names

MiB = 1 << 20
GiB = 1 << 30
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
OURS = SUBFORMATS[:4]  # streamOptimized's layout is stream_writer's (tests in test_vmdk_stream)
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
PATTERNS = [("mixed", 4 * MiB), ("holes", 4 * MiB), ("odd_size", 4 * MiB), ("tiny_odd", 4 * MiB),
            ("all_zero", 2 * MiB)]
CASES = [(sf, "ide", p, s) for sf in SUBFORMATS for p, s in PATTERNS] + \
        [(sf, a, "mixed", 4 * MiB) for sf in SUBFORMATS for a in ADAPTERS[1:]]
IDS = [f"{sf}-{a}-{p}-{s}" for sf, a, p, s in CASES]
_CID = re.compile(r"^CID=[0-9a-f]+$", re.M)


def files_of(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}


def descriptor_text(img: Path) -> str:
    """The descriptor, embedded or not, with the random CID blanked."""
    raw = img.read_bytes()
    if raw[:4] == S.SPARSE_MAGIC:
        h = S.SparseExtentHeader.unpack(raw)
        raw = raw[h.descriptorOffset * 512:(h.descriptorOffset + h.descriptorSize) * 512]
    return _CID.sub("CID=*", raw.split(b"\0")[0].decode())


def assert_checks_and_compares(src: Path, out: Path, virtual_size: int) -> None:
    rc, data = check_json(out, fmt="vmdk")
    assert rc == 0, data
    proc = qemu_img("compare", "-f", "raw", "-F", "vmdk", src, out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert qemu_img_json("info", out)["virtual-size"] == virtual_size


@pytest.mark.parametrize(("subformat", "adapter", "name", "size"), CASES, ids=IDS)
def test_written_vmdk_passes_qemu_check_and_compare(pattern_file, tmp_path, subformat, adapter,
                                                    name, size):
    src = pattern_file(name, size=size)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    opts = f"subformat={subformat},adapter_type={adapter}"
    out = ours / "disk.vmdk"
    vmforge_ok("convert", "-O", "vmdk", "-o", opts, src, out)
    assert_checks_and_compares(src, out, -(-src.stat().st_size // 512) * 512)
    assert vmforge_json("map", out) == qemu_img_json("map", out)
    if subformat not in OURS:
        return
    ref = theirs / "disk.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", opts, src, ref)
    # the same files, the same descriptor (but the CID), the same sparse layout
    assert [n for n in files_of(ours)] == [n for n in files_of(theirs)]
    assert descriptor_text(out) == descriptor_text(ref)
    for f in sorted(ours.iterdir()):
        mine, qemus = f.read_bytes(), (theirs / f.name).read_bytes()
        if mine[:4] == S.SPARSE_MAGIC:
            assert len(mine) == len(qemus), f.name
            assert mine[:512] == qemus[:512], f.name
            assert mine[11264:] == qemus[11264:], f.name  # tables and grains
        elif f.name != "disk.vmdk":  # flat extents hold the data as it is
            assert mine.rstrip(b"\0") == qemus.rstrip(b"\0"), f.name


@pytest.mark.parametrize("subformat", OURS)
@pytest.mark.parametrize("size", [0, 1, 1000000, 3 * MiB + 512, 2 * GiB + 512])
def test_create_matches_qemu(tmp_path, subformat, size):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    vmforge_ok("create", "-f", "vmdk", "-o", f"subformat={subformat}", ours / "d.vmdk", size)
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", theirs / "d.vmdk", size)
    # the same files; sizes equal but for a text descriptor (the random CID's length)
    mine, qemus = files_of(ours), files_of(theirs)
    assert mine.keys() == qemus.keys()
    text = ours / "d.vmdk" if (ours / "d.vmdk").read_bytes()[:4] != S.SPARSE_MAGIC else None
    assert {k: v for k, v in mine.items() if text is None or k != text.name} == \
        {k: v for k, v in qemus.items() if text is None or k != text.name}
    assert descriptor_text(ours / "d.vmdk") == descriptor_text(theirs / "d.vmdk")
    for name in mine:
        if (ours / name).read_bytes()[:4] == S.SPARSE_MAGIC:
            assert (ours / name).read_bytes()[:512] == (theirs / name).read_bytes()[:512]
    if size == 0:
        return  # qemu-img cannot open its own empty VMDKs ("Unsupported image type")
    rc, data = check_json(ours / "d.vmdk", fmt="vmdk")
    assert rc == 0, data
    q_ours, q_theirs = qemu_img_json("info", ours / "d.vmdk"), qemu_img_json("info", theirs / "d.vmdk")
    for key in ("virtual-size", "cluster-size"):
        assert q_ours.get(key) == q_theirs.get(key), key
    assert vmforge_json("map", ours / "d.vmdk") == qemu_img_json("map", ours / "d.vmdk")


OPTION_SETS = ["hwversion=7", "compat6=on", "toolsversion=1234", "zeroed_grain=on",
               "adapter_type=legacyESX,hwversion=11", "subformat=twoGbMaxExtentSparse,compat6=on"]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_options_match_qemu(tmp_path, options):
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    vmforge_ok("create", "-f", "vmdk", "-o", options, ours, 5 * MiB)
    qemu_img("create", "-q", "-f", "vmdk", "-o", options, theirs, 5 * MiB)
    assert descriptor_text(ours) == descriptor_text(theirs).replace("theirs", "ours")
    if ours.read_bytes()[:4] == S.SPARSE_MAGIC:
        assert ours.read_bytes()[:512] == theirs.read_bytes()[:512]


@pytest.mark.parametrize(("options", "expect"), [
    ("compat6=on,hwversion=7", "compat6 cannot be enabled with hwversion set"),
    ("subformat=monolithicFlat,zeroed_grain=on", "Flat image can't enable zeroed grain"),
    ("subformat=bogus", "invalid subformat"),
    ("adapter_type=scsi", "invalid adapter_type"),
    ("zeroed_grain=maybe", "invalid value"),
    ("cluster_size=4096", "does not support option"),
])
def test_bad_options_refused(tmp_path, options, expect):
    proc = run_vmforge("create", "-f", "vmdk", "-o", options, tmp_path / "x.vmdk", MiB)
    assert_clean_error(proc, contains=expect)
    assert list(tmp_path.iterdir()) == []
    assert qemu_img("create", "-f", "vmdk", "-o", options, tmp_path / "q.vmdk", MiB,
                    check=False).returncode != 0


def test_flat_with_backing_refused(tmp_path):
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", MiB)
    proc = run_vmforge("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "-b",
                       "base.vmdk", "-F", "vmdk", tmp_path / "x.vmdk")
    assert_clean_error(proc, contains="Flat image can't have backing file")
    proc = run_vmforge("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "raw",
                       tmp_path / "x.vmdk")
    assert_clean_error(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.vmdk"]


# -- deltas -------------------------------------------------------------------------------

def _cid(img: Path, key: str = "CID") -> int:
    m = re.search(rf"^{key}=([0-9a-f]+)$", descriptor_text(img) if key != "CID"
                  else _raw_descriptor(img), re.M)
    assert m, img
    return int(m.group(1), 16)


def _raw_descriptor(img: Path) -> str:
    raw = img.read_bytes()
    h = S.SparseExtentHeader.unpack(raw)
    return raw[h.descriptorOffset * 512:(h.descriptorOffset + h.descriptorSize) * 512] \
        .split(b"\0")[0].decode()


@pytest.mark.parametrize("depth", [2, 3])
def test_vmforge_made_delta_chain(pattern_file, tmp_path, depth):
    """base (vmforge convert) <- deltas (vmforge convert -B of modified copies)."""
    size = 4 * MiB
    base_src = pattern_file("mixed", size=size)
    base = tmp_path / "base.vmdk"
    vmforge_ok("convert", "-O", "vmdk", base_src, base)
    layers, prev_raw = [base], base_src.read_bytes()
    for i in range(1, depth):
        data = bytearray(prev_raw)
        data[i * MiB:i * MiB + 70000] = bytes([i + 1]) * 70000  # crosses grain boundaries
        data[3 * MiB:3 * MiB + 65536] = bytes(65536)  # zeros over the parent's data
        src = tmp_path / f"src{i}.raw"
        src.write_bytes(bytes(data))
        delta = tmp_path / f"delta{i}.vmdk"
        vmforge_ok("convert", "-O", "vmdk", "-B", layers[-1].name, "-F", "vmdk", src, delta,
                   cwd=tmp_path)
        assert _cid(delta, "parentCID") == _cid(layers[-1])
        rc, data_json = check_json(delta, fmt="vmdk")
        assert rc == 0, data_json
        proc = qemu_img("compare", "-f", "raw", "-F", "vmdk", src, delta, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        layers.append(delta)
        prev_raw = bytes(data)
    top = layers[-1]
    info = qemu_img_json("info", top)
    assert info["backing-filename"] == layers[-2].name
    assert info["backing-filename-format"] == "vmdk"
    ours, theirs = vmforge_json("map", top), qemu_img_json("map", top)
    assert ours == theirs, map_diff(ours, theirs)
    # an empty overlay created on top reads as the chain
    overlay = tmp_path / "overlay.vmdk"
    vmforge_ok("create", "-f", "vmdk", "-b", top.name, "-F", "vmdk", overlay, cwd=tmp_path)
    assert qemu_img("compare", overlay, top, check=False).returncode == 0


@pytest.mark.parametrize("zeroed", ["off", "on"])
def test_delta_layout_matches_qemu(pattern_file, tmp_path, zeroed):
    """convert -B: the same grains allocated (zeros included) as qemu-img allocates."""
    base_src = pattern_file("mixed", size=4 * MiB)
    base = tmp_path / "base.vmdk"
    qemu_img("convert", "-O", "vmdk", base_src, base)
    src = pattern_file("holes", size=4 * MiB)
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    args = ["-O", "vmdk", "-o", f"zeroed_grain={zeroed}", "-B", "base.vmdk", "-F", "vmdk"]
    vmforge_ok("convert", *args, src, ours, cwd=tmp_path)
    qemu_img("convert", *args, src, theirs, cwd=tmp_path)
    assert qemu_img_json("map", ours) == qemu_img_json("map", theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    assert qemu_img("compare", "-f", "raw", "-F", "vmdk", src, ours, check=False).returncode == 0


# -- multi-file outputs: final names, never half-written -------------------------------------

@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse",
                                       "twoGbMaxExtentFlat"])
def test_failed_convert_leaves_no_files(pattern_file, tmp_path, subformat):
    src = tmp_path / "src.vmdk"
    qemu_img("convert", "-O", "vmdk", pattern_file("mixed", size=4 * MiB), src)
    raw = bytearray(src.read_bytes())
    h = S.SparseExtentHeader.unpack(raw)
    gt = struct.unpack_from("<I", raw, h.gdOffset * 512)[0]
    struct.pack_into("<I", raw, gt * 512 + 4 * 40, 0x7FFFFFF0)  # grain 40 past EOF
    src.write_bytes(bytes(raw))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_vmforge("convert", "-O", "vmdk", "-o", f"subformat={subformat}", src,
                       out_dir / "disk.vmdk")
    assert_clean_error(proc)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse",
                                       "twoGbMaxExtentFlat"])
def test_multi_file_output_replaces_existing(pattern_file, tmp_path, subformat):
    out = tmp_path / "disk.vmdk"
    for name in ("mixed", "holes"):  # the second convert replaces the first's files
        src = pattern_file(name, size=4 * MiB)
        vmforge_ok("convert", "-O", "vmdk", "-o", f"subformat={subformat}", src, out)
        assert qemu_img("compare", "-f", "raw", "-F", "vmdk", src, out,
                        check=False).returncode == 0
    expected = ["disk.vmdk", *extent_names(str(out), subformat, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)


def test_extent_names_like_qemu():
    assert extent_names("/a/b.c.vmdk", "monolithicFlat", 1) == ["b.c-flat.vmdk"]
    assert extent_names("x", "twoGbMaxExtentSparse", 2) == ["x-s001", "x-s002"]
    assert extent_names("y.img", "twoGbMaxExtentFlat", 1) == ["y-f001.img"]


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_output_over_two_gib(tmp_path, subformat):
    size = 2 * GiB + 2 * MiB
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for off, byte in ((MiB, 1), (2 * GiB - 40000, 2), (size - 5000, 3)):
            f.seek(off)
            f.write(bytes([byte]) * 90000 if off + 90000 <= size else bytes([byte]) * 5000)
    out = tmp_path / "big.vmdk"
    vmforge_ok("convert", "-O", "vmdk", "-o", f"subformat={subformat}", src, out)
    assert_checks_and_compares(src, out, size)
    info = vmforge_json("info", out)
    assert [e["virtual-size"] for e in info["format-specific"]["data"]["extents"]] == \
        [2 * GiB, 2 * MiB]
    qemu_io(out, ["read -P 2 2147443648 40000", "read -P 2 2147483648 50000"], fmt="vmdk")


def test_streamoptimized_with_backing_refused(tmp_path):
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", MiB)
    proc = run_vmforge("create", "-f", "vmdk", "-o", "subformat=streamOptimized", "-b",
                       "base.vmdk", "-F", "vmdk", tmp_path / "x.vmdk")
    assert_clean_error(proc, contains="backing file")


def test_written_file_is_not_rewritten_by_reading(pattern_file, tmp_path):
    out = tmp_path / "d.vmdk"
    vmforge_ok("convert", "-O", "vmdk", pattern_file("mixed", size=4 * MiB), out)
    before = out.read_bytes()
    vmforge_ok("convert", "-O", "raw", out, tmp_path / "o.raw")
    vmforge_ok("check", out)
    assert out.read_bytes() == before
    shutil.rmtree(tmp_path / "o.raw", ignore_errors=True)
