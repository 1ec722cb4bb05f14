"""Hostile VMDKs (../SECURITY.md rows 11-14, 20): bad descriptors and headers each give
one clean error line and open no file other than the one named."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import assert_clean_error, assert_same_bytes, poke, run_vmforge, vmforge_ok
from vmforge.formats.vmdk import structs as S

MiB = 1 << 20
HEAD = ("# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n# Extent description\n')


@pytest.fixture
def opened(monkeypatch):
    """Absolute paths os.open was asked for while the test runs (CLI runs in-process)."""
    seen: list[str] = []
    real = os.open

    def spy(path, flags, *args, **kwargs):
        seen.append(os.path.abspath(os.fsdecode(path)))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return seen


def _only_opened(opened: list[str], *allowed: Path) -> None:
    others = set(opened) - {str(p.resolve()) for p in allowed}
    assert not others, f"opened files beyond {allowed}: {others}"


@pytest.fixture(scope="module")
def sparse_vmdk(tmp_path_factory, pattern_file):
    """A small monolithicSparse VMDK made by qemu-img."""
    d = tmp_path_factory.mktemp("hostile-src")
    img = d / "src.vmdk"
    qemu_img("convert", "-O", "vmdk", pattern_file("mixed", size=4 * MiB), img)
    return img


# -- row 12: extent names --------------------------------------------------------------

BAD_NAMES = ["/etc/passwd", "../secret.vmdk", "sub/x.vmdk", "json:{'file': 'x'}",
             "nbd://127.0.0.1/x", "file:x.vmdk", "..", "a\\b.vmdk", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_extent_names_refused_without_opening(tmp_path, opened, name):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for target in (tmp_path / "secret.vmdk", d / "sub" / "x.vmdk", d / "file:x.vmdk"):
        target.write_bytes(bytes(MiB))  # would be readable if the name were followed
    desc = d / "disk.vmdk"
    desc.write_text(HEAD + f'RW 2048 FLAT "{name}" 0\n')
    opened.clear()
    proc = run_vmforge("info", desc)
    assert_clean_error(proc, contains="extent file name")
    _only_opened(opened, desc)


# -- row 11: untrusted mode refuses any other file ---------------------------------------

@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse",
                                       "twoGbMaxExtentFlat"])
def test_untrusted_refuses_descriptor_naming_files(tmp_path, opened, subformat):
    img = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", img, 4 * MiB)
    opened.clear()
    for cmd in (["info"], ["map"], ["convert", "-O", "raw"]):
        extra = [tmp_path / "out.raw"] if cmd[0] == "convert" else []
        proc = run_vmforge(*cmd, "--untrusted", img, *extra)
        assert_clean_error(proc, contains="untrusted")
    _only_opened(opened, img, tmp_path / "out.raw")  # convert's output is never created
    assert not (tmp_path / "out.raw").exists()
    vmforge_ok("info", img)  # local mode follows the extents


def test_untrusted_refuses_vmfs_sparse_descriptor(tmp_path, opened):
    extent = tmp_path / "x-delta.vmdk"
    extent.write_bytes(S.COWDHeader(S.COWD_MAGIC, 1, 3, 2048, 1, 4, 1, 8, 0, 0, 0).pack()
                       + bytes(4096))
    desc = tmp_path / "x.vmdk"
    desc.write_text(HEAD.replace("monolithicFlat", "vmfsSparse")
                    + f'RW 2048 VMFSSPARSE "{extent.name}"\n')
    opened.clear()
    assert_clean_error(run_vmforge("info", "--untrusted", desc), contains="untrusted")
    _only_opened(opened, desc)
    # in local mode the COWD extent reads (all unallocated)
    vmforge_ok("convert", "-O", "raw", desc, tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == bytes(MiB)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_untrusted_accepts_self_contained(tmp_path, subformat):
    img = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", img, 4 * MiB)
    vmforge_ok("convert", "--untrusted", "-O", "raw", img, tmp_path / "o.raw")


# -- row 13: descriptor shape ---------------------------------------------------------------

BAD_DESCRIPTORS = {
    "no-extent": (HEAD, "names no extent"),
    "garbage-line": (HEAD + "this is not a descriptor line\n", "not understood"),
    "unknown-key": (HEAD.replace("version=1\n", "version=1\nevil=1\n"), "unknown key"),
    "duplicate-key": (HEAD + 'createType="vmfs"\nRW 8 FLAT "x" 0\n', "repeats"),
    "no-create-type": (HEAD.replace('createType="monolithicFlat"\n', "") + 'RW 8 FLAT "x" 0\n',
                       "createType"),
    "no-cid": (HEAD.replace("CID=1234abcd\n", "") + 'RW 8 FLAT "x" 0\n', "CID"),
    "bad-cid": (HEAD.replace("CID=1234abcd", "CID=xyz") + 'RW 8 FLAT "x" 0\n', "hex"),
    "unknown-extent-type": (HEAD + 'RW 8 BOGUS "x"\n', "extent type"),
    "flat-without-offset": (HEAD + 'RW 8 FLAT "x"\n', "offset"),
    "zero-size": (HEAD + 'RW 0 FLAT "x" 0\n', "size"),
    "control-chars": (HEAD + 'RW 8 FLAT "x" 0\x01\n', "control"),
    "unsupported-create-type": (HEAD.replace("monolithicFlat", "fullDevice")
                                + 'RW 8 FLAT "x" 0\n', "createType"),
    "descriptor-version": (HEAD.replace("CID", "version=9\nCID", 1) + 'RW 8 FLAT "x" 0\n',
                           "repeats"),
}


@pytest.mark.parametrize("case", list(BAD_DESCRIPTORS))
def test_bad_descriptor_refused(tmp_path, opened, case):
    text, expect = BAD_DESCRIPTORS[case]
    (tmp_path / "x").write_bytes(bytes(4096))
    desc = tmp_path / "disk.vmdk"
    desc.write_bytes(text.encode("utf-8", "surrogateescape"))
    opened.clear()
    assert_clean_error(run_vmforge("info", "-f", "vmdk", desc), contains=expect)
    _only_opened(opened, desc)


def test_non_utf8_descriptor_refused(tmp_path):
    desc = tmp_path / "disk.vmdk"
    desc.write_bytes(HEAD.encode() + b'RW 8 FLAT "\xff\xfe" 0\n')
    assert_clean_error(run_vmforge("info", desc), contains="not text")


def test_descriptor_over_one_mib_refused(tmp_path):
    desc = tmp_path / "disk.vmdk"
    desc.write_bytes(HEAD.encode() + b"#" * (1 << 20) + b'\nRW 8 FLAT "x" 0\n')
    assert_clean_error(run_vmforge("info", desc), contains="larger than")


@pytest.mark.parametrize(("field_offset", "value", "expect"), [
    (28, 1 << 40, "outside the file"),  # descriptorOffset far past the end
    (36, 1 << 30, "larger than"),  # descriptorSize of 512 GiB
    (28, 0, "no embedded descriptor"),
    (28, 200, "grain area"),  # inside the grains (qemu reads the CIDs at 0x200 anyway)
])
def test_embedded_descriptor_bounds(sparse_vmdk, tmp_path, field_offset, value, expect):
    img = tmp_path / "bad.vmdk"
    shutil.copyfile(sparse_vmdk, img)
    poke(img, field_offset, "<Q", value)
    assert_clean_error(run_vmforge("info", img), contains=expect)


# -- sparse header fields (qemu's checks, bounded memory) ----------------------------------

# (field, offset, struct format, value, vmforge's error, qemu refuses too). qemu 7.2 reads
# a grain directory past the end of the file as zeros (an empty disk) and treats an
# unknown compressAlgorithm as uncompressed; vmforge refuses both rather than guess.
HEADER_POKES = [
    ("version", 4, "<I", 5, "VMDK version 5", True),
    ("numGTEsPerGT", 44, "<I", 1024, "L2 table size too big", True),
    ("grainSize", 20, "<Q", 0, "L1 entry size is invalid", True),
    ("grainSize-huge", 20, "<Q", 0x400000, "Invalid granularity", True),
    ("capacity", 12, "<Q", 1 << 55, "L1 size too big", True),
    ("gdOffset", 56, "<Q", 1 << 30, "grain directory", False),
    ("overHead", 64, "<Q", 1 << 30, "File truncated", True),
    ("compressAlgorithm", 77, "<H", 7, "compression algorithm 7", False),
]


@pytest.mark.parametrize(("field", "offset", "fmt", "value", "expect", "qemu_refuses"),
                         HEADER_POKES, ids=[p[0] for p in HEADER_POKES])
def test_bad_header_fields_refused(sparse_vmdk, tmp_path, field, offset, fmt, value, expect,
                                   qemu_refuses):
    img = tmp_path / "bad.vmdk"
    shutil.copyfile(sparse_vmdk, img)
    poke(img, offset, fmt, value)
    proc = run_vmforge("convert", "-O", "raw", img, tmp_path / "o.raw", isolated=True,
                       mem_limit=1 << 30)
    assert_clean_error(proc, contains=expect)
    q = qemu_img("convert", "-O", "raw", img, tmp_path / "q.raw", check=False)
    assert (q.returncode != 0) == qemu_refuses, (field, q.stdout, q.stderr)


def test_header_roundtrip():
    h = S.new_sparse_header(12345, version=2, flags=S.FLAG_ZEROED_GRAIN_GTE, gd_offset=77)
    assert S.SparseExtentHeader.unpack(h.pack()) == h
    assert len(h.pack()) == 512 and h.pack()[:4] == b"KDMV"
    assert h.pack()[73:77] == b"\n \r\n"


# -- row 14: stream-optimized footer ---------------------------------------------------------

def _gd_at_end(src: Path, dest: Path) -> None:
    """Turn a qemu-made streamOptimized file into one whose header defers to a footer."""
    data = bytearray(src.read_bytes())
    data += bytes(-len(data) % 512)
    header = S.SparseExtentHeader.unpack(data)
    data[:512] = _with_gd(header, S.GD_AT_END)
    data += S.footer_sectors(header)
    dest.write_bytes(bytes(data))


def _with_gd(header: S.SparseExtentHeader, gd: int) -> bytes:
    raw = bytearray(header.pack())
    struct.pack_into("<Q", raw, 56, gd)
    return bytes(raw)


@pytest.fixture(scope="module")
def footer_vmdk(tmp_path_factory, pattern_file):
    d = tmp_path_factory.mktemp("footer")
    src, img = d / "q.vmdk", d / "footer.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
             pattern_file("mixed", size=4 * MiB), src)
    _gd_at_end(src, img)
    return src, img


def test_footer_copy_is_used(footer_vmdk, tmp_path):
    src, img = footer_vmdk
    out, expected = tmp_path / "v.raw", tmp_path / "q.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    qemu_img("convert", "-O", "raw", img, expected)  # qemu reads the footer copy too
    assert_same_bytes(out, expected)


@pytest.mark.parametrize(("where", "fmt", "value", "expect"), [
    (-1024 + 12, "<Q", 1 << 20, "footer disagrees"),  # footer capacity
    (-1024 + 20, "<Q", 256, "footer disagrees"),  # footer grainSize
    (-1536 + 12, "<I", 2, "Invalid footer"),  # footer marker type: GD instead of footer
    (-512 + 12, "<I", 1, "Invalid footer"),  # end-of-stream marker type
    (-1024 + 56, "<Q", S.GD_AT_END, "grain directory"),  # footer gdOffset still at end
])
def test_footer_disagreeing_with_header_refused(footer_vmdk, tmp_path, where, fmt, value,
                                                expect):
    _, src = footer_vmdk
    img = tmp_path / "bad.vmdk"
    shutil.copyfile(src, img)
    poke(img, img.stat().st_size + where, fmt, value)
    assert_clean_error(run_vmforge("convert", "-O", "raw", img, tmp_path / "o.raw"),
                       contains=expect)


# -- row 20: truncation at many lengths ------------------------------------------------------

def test_truncated_everywhere_is_clean(sparse_vmdk, tmp_path):
    data = sparse_vmdk.read_bytes()
    cuts = sorted({*range(0, 1100, 61), 512, 511, 10752, 11264, 20000, 65536, 131072,
                   len(data) // 2, len(data) - 1})
    img = tmp_path / "cut.vmdk"
    for cut in cuts:
        img.write_bytes(data[:cut])
        out = tmp_path / "o.raw"
        proc = run_vmforge("convert", "-f", "vmdk", "-O", "raw", img, out)
        if proc.returncode:
            assert_clean_error(proc)
            assert not out.exists()
        else:
            out.unlink()


def test_compressed_grain_with_bad_marker_refused(footer_vmdk, tmp_path):
    src, _ = footer_vmdk
    img = tmp_path / "bad.vmdk"
    shutil.copyfile(src, img)
    raw = img.read_bytes()
    h = S.SparseExtentHeader.unpack(raw)
    gt = struct.unpack_from("<I", raw, h.gdOffset * 512)[0]
    grain0 = struct.unpack_from("<I", raw, gt * 512)[0]
    poke(img, grain0 * 512 + 8, "<I", 1 << 30)  # marker size: 1 GiB of compressed data
    assert_clean_error(run_vmforge("convert", "-O", "raw", img, tmp_path / "o.raw"),
                       contains="invalid size")
    poke(img, grain0 * 512 + 8, "<I", 100)  # a short, broken zlib stream
    assert_clean_error(run_vmforge("convert", "-O", "raw", img, tmp_path / "o.raw"))


def test_text_mode_damage_detected(sparse_vmdk, tmp_path):
    """The newline check characters (flag bit 0) catch a copy that rewrote line ends."""
    img = tmp_path / "bad.vmdk"
    shutil.copyfile(sparse_vmdk, img)
    poke(img, 73, "4s", b"\r\n \r")
    assert_clean_error(run_vmforge("info", img), contains="text-mode")
