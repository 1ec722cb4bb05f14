"""Parallels (ploop) images, read only, differential against qemu-img 7.2.

Images qemu-img writes, the qemu-iotests samples and the expanding ``.hds`` files of
the dissect-hypervisor ``.hdd`` bundles read like qemu-img reads them (bytes, map,
info). Hostile headers fail with one typed error line.
"""

from __future__ import annotations

import shutil
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
    poke,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)
from vmforge.errors import CorruptImage, LimitExceeded, TruncatedImage
from vmforge.formats import detect_format
from vmforge.formats.base import OpenOptions
from vmforge.formats.parallels import ParallelsFormat, ParallelsReader
from vmforge.formats.parallels import structs as S

MiB = 1 << 20
# (pattern, size, cluster_size): even and odd sizes, default and small clusters
CASES = [("mixed", 4 * MiB, "1M"), ("holes", 4 * MiB, "64K"), ("odd_size", 4 * MiB, "1M"),
         ("tiny_odd", 4 * MiB, "4K"), ("zero_runs", 4 * MiB, "64K"), ("all_zero", 2 * MiB, "1M"),
         ("mixed", 7 * MiB + 3 * 512, "256K"), ("random", MiB + 1000, "4K")]
IDS = [f"{p}-{s}-{c}" for p, s, c in CASES]
# qemu 7.2 has no bdrv_get_info for parallels: cluster-size and format-specific are absent
INFO_KEYS = ("virtual-size", "format", "cluster-size", "format-specific", "dirty-flag")
IOTESTS = CORPUS / "qemu-iotests"
HDD = CORPUS / "dissect-hypervisor" / "hdd"

# header field offsets (docs/interop/parallels.txt)
OFF_VERSION = 16
OFF_TRACKS = 28
OFF_BAT_ENTRIES = 32
OFF_NB_SECTORS = 36
OFF_INUSE = 44


@pytest.fixture(scope="module")
def qemu_par(qemu_made):
    """``(pattern, size, cluster) -> (image made by qemu-img, qemu's raw of it)``."""
    return lambda name, size, cluster: qemu_made("parallels", f"cluster_size={cluster}", name, size)


def _same_as_qemu(img: Path, tmp_path: Path, *, raw: bool = True) -> None:
    """map equal to qemu's; with ``raw``, vmforge's raw conversion equal to qemu's."""
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    assert vmforge_json("info", img)["virtual-size"] == qemu_img_json("info", img)["virtual-size"]
    if raw:
        q, v = tmp_path / "q.raw", tmp_path / "v.raw"
        qemu_img("convert", "-f", "parallels", "-O", "raw", img, q)
        vmforge_ok("convert", "-O", "raw", img, v)
        assert_same_bytes(v, q)


# --- reading what qemu-img writes ----------------------------------------------------

@pytest.mark.parametrize(("name", "size", "cluster"), CASES, ids=IDS)
def test_convert_to_raw_matches_qemu(qemu_par, tmp_path, name, size, cluster):
    img, expected = qemu_par(name, size, cluster)
    out = tmp_path / "out.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    assert_same_bytes(out, expected)


@pytest.mark.parametrize(("name", "size", "cluster"), CASES, ids=IDS)
def test_map_and_info_match_qemu(qemu_par, name, size, cluster):
    img, _ = qemu_par(name, size, cluster)
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    ours, theirs = vmforge_json("info", img), qemu_img_json("info", img)
    for key in INFO_KEYS:
        assert (key in ours) == (key in theirs) and ours.get(key) == theirs.get(key), key


def test_api_reads_match_qemu(qemu_par):
    img, raw = qemu_par("mixed", 7 * MiB + 3 * 512, "256K")
    expected = raw.read_bytes()
    with vmforge.open_image(str(img)) as image:
        assert image.format == "parallels"
        assert image.virtual_size == len(expected)
        assert image.read(0, len(expected)) == expected
        off = 1
        while off < len(expected):
            n = min(77777, len(expected) - off)
            assert image.read(off, n) == expected[off:off + n], off
            off += n


def test_probe_detects_parallels(qemu_par):
    img, _ = qemu_par("mixed", 4 * MiB, "1M")
    assert detect_format(str(img)) is ParallelsFormat
    head = img.read_bytes()[:64]
    assert ParallelsFormat.probe(head, 4 * MiB) == 100
    assert ParallelsFormat.probe(head[:63], 63) == 0  # qemu wants a whole header
    bad_version = head[:16] + struct.pack("<I", 3) + head[20:]
    assert ParallelsFormat.probe(bad_version, 4 * MiB) == 0


def test_header_roundtrip(qemu_par):
    img, _ = qemu_par("mixed", 4 * MiB, "64K")
    head = img.read_bytes()[:64]
    h = S.Header.unpack(head)
    assert h.pack() == head
    assert h.is_v2 and h.tracks == 128 and h.entry_unit == 64 * 1024
    assert h.total_sectors * 512 == 4 * MiB


def test_dirty_image_reads_like_qemu(qemu_par, tmp_path):
    """inuse set: qemu refuses read-write but reads read-only, and so does vmforge."""
    src, _ = qemu_par("mixed", 4 * MiB, "64K")
    img = tmp_path / "dirty.hds"
    shutil.copyfile(src, img)
    poke(img, OFF_INUSE, "<I", S.INUSE_MAGIC)
    _same_as_qemu(img, tmp_path)


def test_disk_larger_than_bat_reads_zeros_like_qemu(qemu_par, tmp_path):
    """Clusters past the BAT are unallocated (seek_to_sector: index >= bat_size)."""
    src, _ = qemu_par("mixed", 4 * MiB, "64K")
    img = tmp_path / "short-bat.hds"
    shutil.copyfile(src, img)
    poke(img, OFF_BAT_ENTRIES, "<I", 20)
    _same_as_qemu(img, tmp_path)


# --- corpus ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["parallels-v1", "parallels-v2"])
def test_iotests_samples_read_like_qemu(tmp_path, name):
    img = decompress_sparse(IOTESTS / f"{name}.bz2", tmp_path / f"{name}.img")
    _same_as_qemu(img, tmp_path)


def test_iotests_bitmap_sample_reads_like_qemu(tmp_path):
    """64 GiB virtual with a dirty-bitmap extension: map, and a qcow2 copy compared."""
    img = decompress_sparse(IOTESTS / "parallels-with-bitmap.bz2", tmp_path / "bitmap.img")
    _same_as_qemu(img, tmp_path, raw=False)
    out = tmp_path / "copy.qcow2"
    vmforge_ok("convert", "-O", "qcow2", img, out)
    proc = qemu_img("compare", "-f", "parallels", "-F", "qcow2", img, out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("bundle", ["expanding", "split"])
def test_hdd_bundle_data_file_reads_like_qemu(tmp_path, bundle):
    (gz,) = sorted((HDD / f"{bundle}.hdd").glob(f"{bundle}.hdd.0.*.hds.gz"))
    img = decompress_sparse(gz, tmp_path / f"{bundle}.hds")
    assert detect_format(str(img)) is ParallelsFormat
    _same_as_qemu(img, tmp_path, raw=bundle == "expanding")
    if bundle == "split":  # 2 GB virtual: compare through a qcow2 copy
        out = tmp_path / "copy.qcow2"
        vmforge_ok("convert", "-O", "qcow2", img, out)
        proc = qemu_img("compare", "-f", "parallels", "-F", "qcow2", img, out, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# --- hostile ---------------------------------------------------------------------------

def _hostile(qemu_par, tmp_path: Path, offset: int, fmt: str, value: int) -> Path:
    src, _ = qemu_par("mixed", 4 * MiB, "64K")
    img = tmp_path / "hostile.hds"
    shutil.copyfile(src, img)
    poke(img, offset, fmt, value)
    return img


def test_truncated_header_refused_at_every_length(qemu_par, tmp_path):
    src, _ = qemu_par("mixed", 4 * MiB, "64K")
    head = src.read_bytes()[:64]
    img = tmp_path / "short.hds"
    for n in range(64):
        img.write_bytes(head[:n])
        with pytest.raises(TruncatedImage):
            ParallelsReader(str(img), OpenOptions())
        if n % 8 == 0:
            assert_clean_error(run_vmforge("info", "-f", "parallels", img))


@pytest.mark.parametrize(("offset", "fmt", "value", "error"), [
    (OFF_BAT_ENTRIES, "<I", 0xFFFFFFFF, LimitExceeded),
    (OFF_BAT_ENTRIES, "<I", S.MAX_BAT_ENTRIES, TruncatedImage),
    (OFF_BAT_ENTRIES, "<I", 1_000_000, TruncatedImage),
    (OFF_TRACKS, "<I", 0, CorruptImage),
    (OFF_TRACKS, "<I", 0xFFFFFFFF, LimitExceeded),
    (OFF_NB_SECTORS, "<Q", 1 << 62, LimitExceeded),
], ids=["bat-huge", "bat-at-cap", "bat-past-eof", "tracks-zero", "tracks-huge", "size-huge"])
def test_hostile_header_refused(qemu_par, tmp_path, offset, fmt, value, error):
    img = _hostile(qemu_par, tmp_path, offset, fmt, value)
    with pytest.raises(error):
        ParallelsReader(str(img), OpenOptions())
    for cmd in ("info", "map"):
        assert_clean_error(run_vmforge(cmd, "-f", "parallels", img, isolated=True,
                                       mem_limit=1 << 30, timeout=60))


def test_wrong_version_refused_when_forced(qemu_par, tmp_path):
    img = _hostile(qemu_par, tmp_path, OFF_VERSION, "<I", 3)
    assert detect_format(str(img)) is not ParallelsFormat
    assert_clean_error(run_vmforge("info", "-f", "parallels", img))


def test_cluster_past_eof_refused_on_read(qemu_par, tmp_path):
    img = _hostile(qemu_par, tmp_path, S.HEADER_SIZE, "<I", 0x00FFFFFF)
    assert_clean_error(run_vmforge("convert", "-O", "raw", img, tmp_path / "out.raw"))
    with vmforge.open_image(str(img)) as image, pytest.raises(TruncatedImage):
        image.read(0, 512)
