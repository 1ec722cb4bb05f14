"""resize, commit and rebase in place on VHD (fixed, dynamic, differencing) and VDI.

qemu-img 7.2 cannot resize vpc or vdi and knows nothing of differencing VHDs, so the
oracle is the guest disk composed here: every write (qemu-io's, or the API's at odd
sectors) and every size change is applied to a model of the disk, and what qemu-img
and vmforge read afterwards must equal it. qemu-img also judges what it can read
(compare; check for VDI), and the VHD footer must follow the sizing rules Hyper-V,
Azure and qemu rely on. Refusals leave every file byte-identical.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import vmforge
from tests.conftest import CORPUS
from tests.data.qemu import qemu_img, qemu_img_json, qemu_io
from tests.data.vdi_diff import read_vdi_header, write_diff_vdi
from tests.helpers import (
    assert_clean_error,
    decompress_sparse,
    poke,
    run_vmforge,
    sha256,
    vmforge_json,
    vmforge_ok,
)
from tests.ops.test_lifecycle import read_only
from vmforge.formats import BackingRef
from vmforge.formats.vdi import structs as VS
from vmforge.formats.vhd import VpcFormat
from vmforge.formats.vhd import structs as S

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512

#: kind -> (qemu-img format, create options)
KINDS = {
    "vpc-dynamic": ("vpc", "subformat=dynamic"),
    "vpc-fixed": ("vpc", "subformat=fixed"),
    "vpc-dynamic-force": ("vpc", "subformat=dynamic,force_size=on"),
    "vpc-fixed-force": ("vpc", "subformat=fixed,force_size=on"),
    "vdi-dynamic": ("vdi", ""),
    "vdi-static": ("vdi", "static=on"),
}
#: data at the start, across the first 2 MiB block boundary and in the last MiB
WRITES = ((0, MiB, 0x11), (2 * MiB - 4 * KiB, 8 * KiB, 0x22), (3 * MiB, 64 * KiB, 0x33))


class Disk:
    """The guest disk as the test expects it: a size and the writes, in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.writes: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes) -> None:
        assert offset + len(data) <= self.size
        self.writes.append((offset, data))

    def resize(self, size: int) -> None:
        # what lay past a shrunken end is gone for good, even if the disk grows again
        self.writes = [(o, d[:max(0, size - o)]) for o, d in self.writes if o < size]
        self.size = size

    def save(self, path: Path) -> Path:
        with open(path, "wb") as f:
            f.truncate(self.size)
            for offset, data in self.writes:
                f.seek(offset)
                f.write(data)
        return path


def _qemu_write(path: Path, fmt: str, disk: Disk, offset: int, length: int, pattern: int) -> None:
    qemu_io(path, [f"write -P {pattern} {offset} {length}"], fmt=fmt)
    disk.write(offset, bytes([pattern]) * length)


def _make(d: Path, kind: str, size: int = 4 * MiB, name: str = "disk") -> tuple[Path, Disk]:
    fmt, options = KINDS[kind]
    path = d / f"{name}.{'vhd' if fmt == 'vpc' else 'vdi'}"
    qemu_img("create", "-q", "-f", fmt, *(["-o", options] if options else []), path, str(size))
    disk = Disk(qemu_img_json("info", "-f", fmt, "--output=json", path)["virtual-size"])
    for offset, length, pattern in WRITES:
        _qemu_write(path, fmt, disk, offset, length, pattern)
    return path, disk


def _footer(path: Path, at: int | None = None) -> tuple[S.Footer, bytes]:
    with open(path, "rb") as f:
        f.seek(os.path.getsize(path) - SECTOR if at is None else at)
        raw = f.read(SECTOR)
    return S.Footer.unpack(raw), raw


def _assert_vhd_rules(path: Path, size: int) -> None:
    """The footer says ``size`` the way qemu, Hyper-V and Azure read it."""
    footer, raw = _footer(path)
    assert raw[:8] == S.COOKIE and S.footer_checksum_ok(raw)
    assert footer.current_size == size
    chs = (footer.cylinders, footer.heads, footer.sectors_per_track)
    if footer.creator_application in S.CURRENT_SIZE_CREATORS:
        # sized by current_size; qemu's force_size writes the largest geometry, else
        # the specification's geometry for the size
        assert chs in (S.CHS_MAX, S.calculate_geometry(size // SECTOR))
    else:  # sized by its geometry, which must then hold exactly the size
        assert footer.chs_sectors * SECTOR == size, (chs, size)
    if footer.disk_type == S.DISK_TYPE_FIXED:
        assert os.path.getsize(path) == size + SECTOR
        return
    _, copy_raw = _footer(path, 0)
    assert copy_raw == raw  # the copy at offset 0 and the footer at the end agree
    with open(path, "rb") as f:
        f.seek(footer.data_offset)
        hdr = S.DynamicHeader.unpack(f.read(S.DYNAMIC_HEADER_SIZE))
    assert hdr.max_table_entries == -(-size // hdr.block_size)


def _assert_disk(path: Path, fmt: str, disk: Disk, *, qemu: bool = True,
                 parents: tuple[Path, ...] = ()) -> None:
    """qemu-img (where it can read the image) and vmforge both show ``disk``."""
    expected = disk.save(path.parent / f"{path.name}.expected.raw")
    extra = [a for p in parents for a in ("--parent", p)]
    info = vmforge_json("info", "-f", fmt, *extra, path)
    assert info["virtual-size"] == disk.size
    if parents:  # (compare does not pass --parent on to the first image)
        flat = path.parent / f"{path.name}.flat.raw"
        vmforge_ok("convert", "-f", fmt, *extra, "-O", "raw", path, flat)
        assert qemu_img("compare", "-f", "raw", "-F", "raw", flat, expected).returncode == 0
        flat.unlink()
    else:
        vmforge_ok("compare", "-q", "-f", fmt, "-F", "raw", path, expected)
    if qemu:
        assert qemu_img_json("info", "-f", fmt, "--output=json", path)["virtual-size"] == disk.size
        proc = qemu_img("compare", "-f", fmt, "-F", "raw", path, expected, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if fmt == "vdi":
            proc = qemu_img("check", "-f", "vdi", path, check=False)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt == "vpc" and qemu:
        _assert_vhd_rules(path, disk.size)
    expected.unlink()


# -- resize ----------------------------------------------------------------------------------------

#: (resize arguments, new size): small growth; growth past one BAT/block-map sector
#: (256 MiB of 2 MiB VHD blocks, 128 MiB of 1 MiB VDI blocks), which moves the BAT or
#: the first data blocks; a shrink that drops data inside a block
CHANGES: dict[str, tuple[list[str], str, Callable[[int], int]]] = {
    "grow": ([], "+3M", lambda size: size + 3 * MiB),
    "grow-far": ([], "270M", lambda size: 270 * MiB),
    "shrink": (["--shrink", "--force"], "3162624", lambda size: 3 * MiB + 16 * KiB + SECTOR),
    "shrink-blocks": (["--shrink", "--force"], "1050112", lambda size: MiB + 3 * SECTOR),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resize(tmp_path: Path, kind: str, change: str) -> None:
    fmt = KINDS[kind][0]
    path, disk = _make(tmp_path, kind)
    flags, arg, new_size = CHANGES[change]
    vmforge_ok("resize", "-q", "-f", fmt, *flags, path, arg)
    disk.resize(new_size(disk.size))
    _assert_disk(path, fmt, disk)
    # qemu keeps using the image: a new block lands after whatever moved
    end = disk.size - 64 * KiB
    _qemu_write(path, fmt, disk, end, 64 * KiB, 0x44)
    _qemu_write(path, fmt, disk, 512 * KiB, 4 * KiB, 0x55)
    _assert_disk(path, fmt, disk)
    # growing again shows zeros where the shrink dropped data (and nothing stale)
    disk.resize(disk.size + 5 * MiB)
    vmforge_ok("resize", "-q", "-f", fmt, path, str(disk.size))
    _assert_disk(path, fmt, disk)


@pytest.mark.parametrize("kind", ["vpc-dynamic", "vpc-dynamic-force", "vdi-dynamic",
                                  "vdi-static"])
def test_growing_hides_stale_bytes_past_the_old_end(tmp_path: Path, kind: str) -> None:
    """Bytes another tool left in a partial last block past the end must not show up."""
    fmt = KINDS[kind][0]
    path, disk = _make(tmp_path, kind, size=3 * MiB + 512 * KiB)
    _qemu_write(path, fmt, disk, disk.size - 4 * KiB, 4 * KiB, 0x66)
    with vmforge.open_image(str(path), fmt) as img:
        (ext,) = list(img.top.iter_extents(disk.size - SECTOR, SECTOR))
        host = ext.host_offset
    with open(path, "r+b") as f:
        f.seek(host + SECTOR)
        f.write(b"\xee" * (64 * KiB))  # past the guest's end, inside the last block
    vmforge_ok("resize", "-q", "-f", fmt, path, "+2M")
    disk.resize(disk.size + 2 * MiB)
    _assert_disk(path, fmt, disk)


def test_dynamic_vhd_bat_moves_to_the_end(tmp_path: Path) -> None:
    path, disk = _make(tmp_path, "vpc-dynamic")
    vmforge_ok("resize", "-q", "-f", "vpc", path, "600M")
    with open(path, "rb") as f:
        f.seek(SECTOR)
        hdr = S.DynamicHeader.unpack(f.read(S.DYNAMIC_HEADER_SIZE))
    # the first block sat right after the old one-sector BAT: no room to grow there
    assert hdr.table_offset >= 4 * SECTOR + 2 * MiB
    assert hdr.max_table_entries == 300
    disk.resize(600 * MiB)
    _assert_disk(path, "vpc", disk)
    # the BAT is the last structure now: it grows where it is, and blocks follow it
    vmforge_ok("resize", "-q", "-f", "vpc", path, "1200M")
    with open(path, "rb") as f:
        f.seek(SECTOR)
        again = S.DynamicHeader.unpack(f.read(S.DYNAMIC_HEADER_SIZE))
    assert again.table_offset == hdr.table_offset and again.max_table_entries == 600
    disk.resize(1200 * MiB)
    _qemu_write(path, "vpc", disk, 1100 * MiB, 64 * KiB, 0x71)
    _assert_disk(path, "vpc", disk)


def test_vdi_block_map_grows_over_moved_blocks(tmp_path: Path) -> None:
    path, disk = _make(tmp_path, "vdi-dynamic")
    before = read_vdi_header(path)
    vmforge_ok("resize", "-q", "-f", "vdi", path, "300M")
    after = read_vdi_header(path)
    assert after.cBlocks == 300 and after.cbDisk == 300 * MiB
    assert after.offData >= after.offBlocks + 300 * 4 > before.offData
    assert (after.offData - before.offData) % MiB == 0  # moved by whole blocks
    disk.resize(300 * MiB)
    _assert_disk(path, "vdi", disk)


@pytest.mark.parametrize("size", [str(8 * MiB), str(100 * MiB), "64M"])
@pytest.mark.parametrize("created", ["4M", "5000K"])
def test_fixed_vhd_stays_an_azure_vhd(tmp_path: Path, created: str, size: str) -> None:
    """Azure: fixed, a whole number of MiB, current_size exact and the file one footer longer."""
    p = tmp_path / "azure.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, created)
    vmforge_ok("resize", "-q", "-f", "vpc", "--shrink", p, size)
    want = int(size[:-1]) * MiB if size.endswith("M") else int(size)
    footer, _ = _footer(p)
    assert footer.disk_type == S.DISK_TYPE_FIXED and footer.current_size == want
    assert os.path.getsize(p) == want + SECTOR and want % MiB == 0
    assert qemu_img_json("info", "-f", "vpc", "--output=json", p)["virtual-size"] == want
    _assert_vhd_rules(p, want)


def test_geometry_sized_vhd_keeps_its_creator_when_the_size_is_a_geometry(tmp_path: Path) -> None:
    p, disk = _make(tmp_path, "vpc-dynamic")
    target = S.geometry_for_size(20 * MiB)[0]  # qemu-img's own rounding for 20M
    vmforge_ok("resize", "-q", "-f", "vpc", p, str(target))
    footer, _ = _footer(p)
    assert footer.creator_application == b"qemu"
    disk.resize(target)
    _assert_disk(p, "vpc", disk)


# -- differencing VHD chains -----------------------------------------------------------------------


def _diff(parent: Path, child: Path, disk: Disk, seed: int) -> None:
    """A differencing disk with data and zero writes at odd sectors, some across blocks."""
    rng = np.random.default_rng(seed)
    sectors = disk.size // SECTOR
    w = VpcFormat.create(str(child), disk.size, {}, BackingRef(parent.name, "vpc"))
    spots = [(4093, 7, False), (8191, 2, True)]
    spots += [(int(rng.integers(0, sectors - 40)) | 1, int(rng.integers(1, 40)),
               bool(rng.integers(0, 4) == 0)) for _ in range(16)]
    for first, n, zeros in spots:
        off, length = first * SECTOR, n * SECTOR
        if zeros:
            w.write_zeroes(off, length)
            disk.write(off, bytes(length))
        else:
            data = rng.integers(1, 256, size=length, dtype=np.uint8).tobytes()
            w.write(off, data)
            disk.write(off, data)
    w.finish()


def _vhd_chain(d: Path, base_kind: str) -> tuple[list[Path], Disk]:
    """base (qemu-img) <- d1 <- d2 and the disk d2 shows."""
    base, disk = _make(d, base_kind, size=5 * MiB, name="base")
    d1, d2 = d / "d1.vhd", d / "d2.vhd"
    _diff(base, d1, disk, 1)
    _diff(d1, d2, disk, 2)
    return [base, d1, d2], disk


def _bat(path: Path) -> np.ndarray:
    footer, _ = _footer(path, 0)
    with open(path, "rb") as f:
        f.seek(footer.data_offset)
        hdr = S.DynamicHeader.unpack(f.read(S.DYNAMIC_HEADER_SIZE))
        f.seek(hdr.table_offset)
        return np.frombuffer(f.read(hdr.max_table_entries * 4), dtype=">u4")


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("how", ["plain", "keep", "deep", "into-base"])
@pytest.mark.parametrize("base_kind", ["vpc-dynamic", "vpc-fixed"])
def test_commit_vhd_chain(tmp_path: Path, base_kind: str, how: str) -> None:
    (base, d1, d2), disk = _vhd_chain(tmp_path, base_kind)
    top = d1 if how == "into-base" else d2
    d1_view = tmp_path / "d1-view.raw"
    vmforge_ok("convert", "-O", "raw", d1, d1_view)
    args = {"plain": [], "keep": ["-d"], "deep": ["-b", base.name], "into-base": []}[how]
    blocks_before = int(np.count_nonzero(_bat(top) != S.BAT_UNUSED))
    vmforge_ok("commit", "-q", *args, top.name, cwd=tmp_path)
    _assert_disk(d2, "vpc", disk, qemu=False)  # the guest sees the same disk
    committed_into = base if how in ("deep", "into-base") else d1
    if committed_into == base:
        if how == "deep":
            _assert_disk(base, "vpc", disk)  # everything d1 and d2 held is in the base
        else:
            # what d1 showed (base + d1) is now the base's own, as qemu-img reads it
            assert qemu_img("compare", "-f", "vpc", "-F", "raw", base, d1_view).returncode == 0
            vmforge_ok("compare", "-q", "-f", "vpc", "-F", "vpc", d1, base)
            _assert_vhd_rules(base, disk.size)
    else:
        _assert_disk(d1, "vpc", disk, qemu=False)  # d1 shows what d2 showed
    blocks_after = int(np.count_nonzero(_bat(top) != S.BAT_UNUSED))
    if how in ("plain", "into-base"):  # emptied, and the file cut after its metadata
        assert blocks_after == 0 and os.path.getsize(top) < 64 * KiB
    else:
        assert blocks_after == blocks_before


@pytest.mark.parametrize("base_kind", ["vpc-dynamic", "vpc-fixed", "vdi-dynamic", "vdi-static"])
def test_commit_grows_a_smaller_base(tmp_path: Path, base_kind: str) -> None:
    fmt = KINDS[base_kind][0]
    base, disk = _make(tmp_path, base_kind)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", fmt, top, "9M", cwd=tmp_path)
    disk.resize(9 * MiB)
    for offset, length, pattern in ((MiB - 512, 4 * KiB, 0x61), (8 * MiB, 1 * MiB, 0x62)):
        _qemu_write(top, "qcow2", disk, offset, length, pattern)
    qemu_io(top, [f"write -z {3 * MiB} 4K"])
    disk.write(3 * MiB, bytes(4 * KiB))
    vmforge_ok("commit", "-q", top)
    _assert_disk(base, fmt, disk)


def _rebase_setup(d: Path) -> tuple[Path, Path, Path, Disk, Disk]:
    old, _ = _make(d, "vpc-dynamic", size=5 * MiB, name="old")
    new, new_disk = _make(d, "vpc-dynamic", size=5 * MiB, name="new")
    qemu_io(new, ["write -P 0x77 1M 2M"], fmt="vpc")
    new_disk.write(MiB, b"\x77" * 2 * MiB)
    vm = d / "vm.vhd"
    disk = Disk(new_disk.size)
    disk.writes = [(o, bytes([p]) * n) for o, n, p in WRITES]
    _diff(old, vm, disk, 3)
    own = Disk(disk.size)  # what the child itself holds
    own.writes = disk.writes[len(WRITES):]
    return old, new, vm, disk, own


@pytest.mark.parametrize("where", ["beside", "long-path"])
def test_rebase_vhd_safe(tmp_path: Path, where: str) -> None:
    old, new, vm, disk, _ = _rebase_setup(tmp_path)
    target = new.name
    if where == "long-path":  # a locator longer than the space the old one had
        sub = tmp_path / ("p" * 200) / ("q" * 200)
        sub.mkdir(parents=True)
        shutil.move(new, sub / "new.vhd")
        target = str((sub / "new.vhd").relative_to(tmp_path))
    vmforge_ok("rebase", "-b", target, "-F", "vpc", vm.name, cwd=tmp_path)
    _assert_disk(vm, "vpc", disk, qemu=False)
    info = vmforge_json("info", vm)
    assert info["backing-filename"] == target
    os.remove(old)  # the old parent is not needed any more
    _assert_disk(vm, "vpc", disk, qemu=False)


@pytest.mark.parametrize("unsafe", [False, True])
def test_rebase_vhd_flatten(tmp_path: Path, unsafe: bool) -> None:
    _, _, vm, disk, own = _rebase_setup(tmp_path)
    # sectors a block does not hold may contain anything (the parent's show through):
    # fill them with garbage, which a flattened disk must not show
    _litter_unowned_sectors(vm)
    vmforge_ok("rebase", *(["-u"] if unsafe else []), "-b", "", vm.name, cwd=tmp_path)
    footer, _ = _footer(vm)
    assert footer.disk_type == S.DISK_TYPE_DYNAMIC
    # a standalone dynamic disk now: qemu-img reads it; -u keeps only the child's sectors
    _assert_disk(vm, "vpc", own if unsafe else disk)
    info = vmforge_json("info", vm)
    assert "backing-filename" not in info


def _litter_unowned_sectors(path: Path) -> None:
    footer, _ = _footer(path, 0)
    with open(path, "r+b") as f:
        f.seek(footer.data_offset)
        hdr = S.DynamicHeader.unpack(f.read(S.DYNAMIC_HEADER_SIZE))
        for entry in _bat(path).tolist():
            if entry == S.BAT_UNUSED:
                continue
            f.seek(entry * SECTOR)
            bits = np.unpackbits(np.frombuffer(f.read(hdr.block_size // SECTOR // 8), np.uint8))
            assert 0 < bits.sum() < len(bits)  # partly the child's, partly the parent's
            for sector in np.flatnonzero(bits == 0)[::7].tolist():
                f.seek(entry * SECTOR + hdr.bitmap_size + sector * SECTOR)
                f.write(b"\xbd" * SECTOR)


def test_rebase_vhd_unsafe(tmp_path: Path) -> None:
    old, new, vm, disk, own = _rebase_setup(tmp_path)
    os.rename(old, tmp_path / "moved.vhd")
    assert_clean_error(run_vmforge("info", "--backing-chain", vm), contains="not found")
    vmforge_ok("rebase", "-u", "-b", "moved.vhd", "-F", "vpc", vm.name, cwd=tmp_path)
    _assert_disk(vm, "vpc", disk, qemu=False)
    # -u onto another parent of the same size: the child's sectors over the new parent
    vmforge_ok("rebase", "-u", "-b", new.name, "-F", "vpc", vm.name, cwd=tmp_path)
    mixed = Disk(disk.size)
    mixed.writes = [(o, bytes([p]) * n) for o, n, p in WRITES] + [(MiB, b"\x77" * 2 * MiB)]
    mixed.writes += own.writes
    _assert_disk(vm, "vpc", mixed, qemu=False)


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resize_refusals_change_nothing(tmp_path: Path, kind: str) -> None:
    fmt = KINDS[kind][0]
    path, _ = _make(tmp_path, kind)
    before = _hashes(tmp_path)
    assert_clean_error(run_vmforge("resize", "-f", fmt, "--shrink", path, "2M"),
                       contains="would drop data")
    huge = "3000G" if fmt == "vpc" else "1000T"  # past 2040 GiB / 512 TiB
    assert_clean_error(run_vmforge("resize", "-f", fmt, path, huge), contains="too large")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", path.name, "-F", fmt, top, cwd=tmp_path)
    qemu_io(top, ["write -P 9 0 64K"])
    before = _hashes(tmp_path)
    with read_only(path):
        assert_clean_error(run_vmforge("resize", "-f", fmt, path, "+1M"), contains="read-only")
        assert_clean_error(run_vmforge("commit", top), contains="read-only")
    assert _hashes(tmp_path) == before


def _corrupt(path: Path, kind: str) -> str:
    """Damage ``path`` the way its format's writer must refuse; returns the error text."""
    if kind.startswith("vdi"):  # two entries naming one block (qemu's check: "also used by")
        h = read_vdi_header(path)
        poke(path, h.offBlocks + 4 * 3, "<I", 0)
        return "used twice"
    footer, _ = _footer(path)
    if footer.disk_type == S.DISK_TYPE_FIXED:  # a footer whose checksum is wrong
        poke(path, os.path.getsize(path) - SECTOR + 64, ">I", footer.checksum ^ 1)
        return "checksum"
    # block 1's entry points into the BAT itself
    poke(path, 3 * SECTOR + 4, ">I", 3)
    return "overlap"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_corrupt_images_are_not_written(tmp_path: Path, kind: str) -> None:
    fmt = KINDS[kind][0]
    path, _ = _make(tmp_path, kind)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", path.name, "-F", fmt, top, cwd=tmp_path)
    qemu_io(top, ["write -P 9 0 64K"])
    text = _corrupt(path, kind)
    before = _hashes(tmp_path)
    assert_clean_error(run_vmforge("resize", "-f", fmt, path, "+1M"), contains=text)
    assert_clean_error(run_vmforge("commit", top), contains=text)
    assert _hashes(tmp_path) == before


def test_vhd_chain_refusals_change_nothing(tmp_path: Path) -> None:
    (base, d1, d2), _ = _vhd_chain(tmp_path, "vpc-dynamic")
    other, _ = _make(tmp_path, "vpc-dynamic", size=9 * MiB, name="other")
    solo, _ = _make(tmp_path, "vpc-dynamic", size=5 * MiB, name="solo")
    before = _hashes(tmp_path)
    # a differencing disk keeps its parent's size
    assert_clean_error(run_vmforge("resize", d2, "+2M"), contains="differencing VHD")
    # safe rebase onto a parent of another size changes what the guest sees
    assert_clean_error(run_vmforge("rebase", "-b", other.name, "-F", "vpc", d2.name,
                                   cwd=tmp_path), contains="bytes")
    # and even -u cannot give a differencing VHD a parent of another size
    assert_clean_error(run_vmforge("rebase", "-u", "-b", other.name, "-F", "vpc", d2.name,
                                   cwd=tmp_path), contains="parent's size")
    # a standalone dynamic VHD cannot become a differencing one in place
    for unsafe in ([], ["-u"]):
        assert_clean_error(run_vmforge("rebase", *unsafe, "-b", base.name, "-F", "vpc",
                                       solo.name, cwd=tmp_path), contains="dynamic VHD")
    with read_only(d1):
        assert_clean_error(run_vmforge("commit", d2), contains="read-only")
    with read_only(d2):
        assert_clean_error(run_vmforge("commit", d2), contains="read-only")  # it would be emptied
        assert_clean_error(run_vmforge("rebase", "-b", "", d2), contains="read-only")
    assert _hashes(tmp_path) == before
    # a differencing disk whose block shares space with its BAT is never written
    entry = int(_bat(d2)[0])
    poke(d2, 3 * SECTOR + 4 * 2, ">I", entry)  # block 2 claims block 0's place
    before = _hashes(tmp_path)
    for args in (["rebase", "-b", "", d2], ["rebase", "-u", "-b", base.name, "-F", "vpc", d2]):
        assert_clean_error(run_vmforge(*args, cwd=tmp_path), contains="overlap")
    assert _hashes(tmp_path) == before
    # commit refuses to empty it, and opens it for emptying before it writes d1: so
    # nothing in the chain changes
    assert_clean_error(run_vmforge("commit", d2, cwd=tmp_path), contains="overlap")
    assert _hashes(tmp_path) == before


# -- VDI differencing ------------------------------------------------------------------------------


def _block(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, size=MiB, dtype=np.uint8).tobytes()


def test_differencing_vdi_resizes_only_when_trivial(tmp_path: Path) -> None:
    base, disk = _make(tmp_path, "vdi-dynamic", size=5 * MiB, name="base")
    child = tmp_path / "child.vdi"
    write_diff_vdi(child, read_vdi_header(base), {1: _block(1), 4: _block(4)}, zero={2})
    disk.write(MiB, _block(1))
    disk.write(4 * MiB, _block(4))
    disk.write(2 * MiB, bytes(MiB))
    # growing within the block map's sector: only cbDisk and the map change
    vmforge_ok("resize", "-q", child, "+2M")
    disk.resize(disk.size + 2 * MiB)
    _assert_disk(child, "vdi", disk, qemu=False, parents=(base,))
    h = read_vdi_header(child)
    assert (h.cbDisk, h.cBlocks, h.u32Type) == (7 * MiB, 7, VS.TYPE_DIFF)
    # more needs the data blocks moved: refused, nothing changed
    before = _hashes(tmp_path)
    assert_clean_error(run_vmforge("resize", child, "300M"), contains="differencing VDI")
    # a differencing VDI's parent cannot be changed or emptied by vmforge
    assert_clean_error(run_vmforge("rebase", "-u", "-b", "", child), contains="vdi")
    # commit cannot even find the parent: a VDI names it only by UUID
    assert_clean_error(run_vmforge("commit", child), contains="parent")
    with read_only(child):
        assert_clean_error(run_vmforge("resize", child, "+1M"), contains="read-only")
    assert _hashes(tmp_path) == before


def test_api_resize_keeps_commit_data(tmp_path: Path) -> None:
    """Through the API: a resize of a VHD opened for writing, then writes past the old end."""
    path, disk = _make(tmp_path, "vpc-dynamic")
    w = VpcFormat.open_for_write(str(path))
    w.resize(disk.size + 4 * MiB)
    disk.resize(disk.size + 4 * MiB)
    data = b"\x5a" * (64 * KiB)
    w.write(disk.size - 64 * KiB, data)
    disk.write(disk.size - 64 * KiB, data)
    w.finish()
    _assert_disk(path, "vpc", disk)
    with vmforge.open_image(str(path), "vpc") as img:
        assert img.read(disk.size - 64 * KiB, 64 * KiB) == data
    assert struct.unpack(">I", _footer(path)[1][60:64])[0] == S.DISK_TYPE_DYNAMIC


def test_writes_into_a_partly_marked_dynamic_block_are_marked(tmp_path: Path) -> None:
    """A dynamic disk may mark only the sectors written (the specification allows it, and
    Hyper-V then reads unmarked ones as zeros): sectors written now are marked too."""
    path, disk = _make(tmp_path, "vpc-dynamic")
    entry = int(_bat(path)[0])
    marked = np.zeros(4096, dtype=bool)
    marked[:2048] = True  # the 1 MiB qemu-io wrote at 0
    poke(path, entry * SECTOR, f"{SECTOR}s", np.packbits(marked).tobytes())
    w = VpcFormat.open_for_write(str(path))
    w.write(1536 * KiB, b"\x42" * (8 * KiB))
    w.finish()
    disk.write(1536 * KiB, b"\x42" * (8 * KiB))
    with open(path, "rb") as f:
        f.seek(entry * SECTOR)
        bits = np.unpackbits(np.frombuffer(f.read(SECTOR), np.uint8)).astype(bool)
    marked[3072:3072 + 16] = True
    assert (bits == marked).all()
    _assert_disk(path, "vpc", disk)


@pytest.mark.parametrize("name", ["dynamic.vhd", "fixed.vhd"])
def test_windows_made_vhd_grows(tmp_path: Path, name: str) -> None:
    """Hyper-V's disks ("win ", sized by current_size) keep their creator and exact size."""
    path = tmp_path / name
    decompress_sparse(CORPUS / "dissect-hypervisor" / "vhd" / f"{name}.gz", path)
    original = tmp_path / "original.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", path, original)
    size = os.path.getsize(original)
    vmforge_ok("resize", "-q", "-f", "vpc", path, str(size + 3 * MiB))
    footer, _ = _footer(path)
    assert footer.creator_application == b"win "
    disk = Disk(size + 3 * MiB)
    disk.writes = [(0, original.read_bytes())]
    _assert_disk(path, "vpc", disk)


def test_large_zero_write_into_a_differencing_vhd(tmp_path: Path) -> None:
    """Zeros over more blocks than the writer keeps bitmaps for: memory stays bounded and
    every block's bitmap lands on its own block."""
    base = tmp_path / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", base, "600M")
    qemu_io(base, ["write -P 0x13 0 1M", "write -P 0x14 599M 1M"], fmt="vpc")
    child = tmp_path / "child.vhd"
    VpcFormat.create(str(child), 600 * MiB, {}, BackingRef(base.name, "vpc")).finish()
    w = VpcFormat.open_for_write(str(child))
    w.write_zeroes(SECTOR, 600 * MiB - 2 * SECTOR)
    w.finish()
    assert os.path.getsize(child) < 700 * MiB
    disk = Disk(600 * MiB)
    disk.write(0, b"\x13" * MiB)
    disk.write(599 * MiB, b"\x14" * MiB)
    disk.write(SECTOR, bytes(600 * MiB - 2 * SECTOR))
    _assert_disk(child, "vpc", disk, qemu=False)


@pytest.mark.parametrize("target", ["new.vdi", "new.vhd", ""])
def test_rebase_qcow2_overlay_across_vhd_and_vdi(tmp_path: Path, target: str) -> None:
    """A qcow2 overlay on a VHD moves onto a VDI, another VHD or nothing; qemu-img reads
    every step, so its view before and after is the oracle."""
    old, _ = _make(tmp_path, "vpc-dynamic-force", name="old")
    size = qemu_img_json("info", "-f", "vpc", "--output=json", old)["virtual-size"]
    for name, fmt, options in (("new.vdi", "vdi", ""), ("new.vhd", "vpc", "force_size=on")):
        qemu_img("create", "-q", "-f", fmt, *(["-o", options] if options else []),
                 tmp_path / name, str(size))
        qemu_io(tmp_path / name, ["write -P 0x21 512K 2M"], fmt=fmt)
    vm = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", old.name, "-F",
             "vpc", vm, cwd=tmp_path)
    qemu_io(vm, ["write -P 0x31 3584K 8K", "write -z 1M 4K"])
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", vm, before)
    fmt = {"new.vdi": ["-F", "vdi"], "new.vhd": ["-F", "vpc"], "": []}[target]
    vmforge_ok("rebase", "-b", target, *fmt, vm.name, cwd=tmp_path)
    assert qemu_img("compare", "-F", "raw", vm, before).returncode == 0
    assert qemu_img("check", vm).returncode == 0
    info = qemu_img_json("info", "--output=json", vm)
    assert info.get("backing-filename") == (target or None)
