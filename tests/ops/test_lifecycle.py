"""commit, rebase, resize, dd, clone and overlay, each done once by qemu-img and once by
vmforge on identical copies: the guest-visible bytes must agree and qemu-img check must
find vmforge's results clean. Refusals leave every file byte-identical.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img, qemu_img_json, qemu_io
from tests.helpers import assert_clean_error, map_classes, run_vmforge, sha256, vmforge_ok

MiB = 1 << 20
KiB = 1 << 10


def _img(path: Path, size: int, *, backing: Path | None = None, cluster: int = 65536,
         writes: tuple[str, ...] = ()) -> Path:
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    qemu_img(*args, path, str(size), cwd=path.parent)
    if writes:
        qemu_io(path, list(writes))
    return path


def _chain(d: Path, top_cluster: int = 65536) -> tuple[Path, Path, Path]:
    """base <- mid <- top with data, zero writes and discards at unaligned places."""
    base = _img(d / "base.qcow2", 6 * MiB,
                writes=("write -P 0x11 0 2M", "write -P 0x12 4M 1M"))
    mid = _img(d / "mid.qcow2", 6 * MiB, backing=base,
               writes=("write -P 0x21 1M 1M", "write -z 4M 512K"))
    top = _img(d / "top.qcow2", 6 * MiB, backing=mid, cluster=top_cluster,
               writes=("write -P 0x31 100K 300K", "write -z 1536K 64K", "write -P 0x32 5M 4K",
                       "discard 4608K 64K"))
    return base, mid, top


def _twin(d: Path, name: str) -> Path:
    """A copy of the whole directory ``d`` for the other tool to work on."""
    other = d.parent / name
    shutil.copytree(d, other)
    return other


def _raw(path: Path, fmt: str = "qcow2") -> bytes:
    out = path.with_suffix(".check.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def _clean(path: Path) -> None:
    proc = qemu_img("check", path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- commit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_cluster", [65536, 4096, 2 * MiB])
@pytest.mark.parametrize("how", ["plain", "keep", "deep"])
def test_commit_like_qemu(tmp_path: Path, how: str, top_cluster: int) -> None:
    ours = tmp_path / "ours"
    ours.mkdir()
    base, mid, top = _chain(ours, top_cluster)
    theirs = _twin(ours, "theirs")
    composed = _raw(top)
    args = {"plain": [], "keep": ["-d"], "deep": ["-b", "base.qcow2"]}[how]
    vmforge_ok("commit", "-q", *args, "top.qcow2", cwd=ours)
    qemu_img("commit", "-q", *args, "top.qcow2", cwd=theirs)
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        _clean(ours / name)
        assert _raw(ours / name) == _raw(theirs / name), f"{name} differs from qemu-img's"
    assert _raw(ours / "top.qcow2") == composed  # the guest sees the same disk
    if how == "plain":  # emptied: everything comes from the backing file again
        entries = qemu_img_json("map", "--output=json", ours / "top.qcow2")
        assert all(e["depth"] > 0 for e in entries if e["data"] or e["zero"]), entries


def test_commit_grows_a_smaller_base(tmp_path: Path) -> None:
    for d in ("ours", "theirs"):
        (tmp_path / d).mkdir()
        base = _img(tmp_path / d / "base.qcow2", 1 * MiB, writes=("write -P 1 0 1M",))
        _img(tmp_path / d / "top.qcow2", 3 * MiB, backing=base, writes=("write -P 2 2M 512K",))
    vmforge_ok("commit", "-q", "top.qcow2", cwd=tmp_path / "ours")
    qemu_img("commit", "-q", "top.qcow2", cwd=tmp_path / "theirs")
    _clean(tmp_path / "ours" / "base.qcow2")
    assert _raw(tmp_path / "ours" / "base.qcow2") == _raw(tmp_path / "theirs" / "base.qcow2")


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable even for root (the immutable attribute), then restore it."""
    os.chmod(path, 0o444)
    # root ignores modes: use the immutable flag
    if os.access(path, os.W_OK) and subprocess.run(["chattr", "+i", str(path)],
                                                   capture_output=True).returncode:
        os.chmod(path, 0o644)
        pytest.skip("cannot make a file read-only here (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        os.chmod(path, 0o644)


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(d.iterdir())}


def test_commit_refusals_change_nothing(tmp_path: Path) -> None:
    base, mid, top = _chain(tmp_path)
    before = _hashes(tmp_path)
    assert_clean_error(run_vmforge("commit", base), contains="no backing file")
    assert_clean_error(run_vmforge("commit", "-b", "elsewhere.qcow2", top),
                       contains="not in the backing chain")
    with read_only(mid):
        assert_clean_error(run_vmforge("commit", top), contains="read-only")
    assert _hashes(tmp_path) == before
    # a base marked corrupt (incompatible feature bit 1, qcow2.txt) is never written
    with open(mid, "r+b") as f:
        f.seek(72)
        bits = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((bits | 2).to_bytes(8, "big"))
    corrupt = _hashes(tmp_path)
    assert_clean_error(run_vmforge("commit", top), contains="corrupt")
    assert _hashes(tmp_path) == corrupt


# -- rebase ----------------------------------------------------------------------------------------


def _rebase_setup(d: Path) -> None:
    old = _img(d / "old.qcow2", 4 * MiB, writes=("write -P 1 0 2M", "write -P 5 3M 4K"))
    _img(d / "new.qcow2", 4 * MiB, writes=("write -P 1 0 1M", "write -P 3 1M 2M"))
    _img(d / "vm.qcow2", 4 * MiB, backing=old,
         writes=("write -P 9 512K 64K", "write -z 1M 64K"))


@pytest.mark.parametrize("target", ["new.qcow2", ""])
def test_rebase_safe_like_qemu(tmp_path: Path, target: str) -> None:
    ours = tmp_path / "ours"
    ours.mkdir()
    _rebase_setup(ours)
    theirs = _twin(ours, "theirs")
    before = _raw(ours / "vm.qcow2")
    fmt = ["-F", "qcow2"] if target else []
    vmforge_ok("rebase", "-b", target, *fmt, "vm.qcow2", cwd=ours)
    qemu_img("rebase", "-b", target, *fmt, "vm.qcow2", cwd=theirs)
    _clean(ours / "vm.qcow2")
    assert _raw(ours / "vm.qcow2") == before  # the guest sees no change
    ours_info = qemu_img_json("info", "--output=json", ours / "vm.qcow2")
    theirs_info = qemu_img_json("info", "--output=json", theirs / "vm.qcow2")
    for key in ("backing-filename", "backing-filename-format", "virtual-size"):
        assert ours_info.get(key) == theirs_info.get(key), key
    ours_map = map_classes(qemu_img_json("map", "--output=json", ours / "vm.qcow2"))
    theirs_map = map_classes(qemu_img_json("map", "--output=json", theirs / "vm.qcow2"))
    assert ours_map == theirs_map  # the same clusters were copied in


def test_rebase_unsafe_only_renames(tmp_path: Path) -> None:
    _rebase_setup(tmp_path)
    os.rename(tmp_path / "old.qcow2", tmp_path / "moved.qcow2")
    vmforge_ok("rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", "vm.qcow2", cwd=tmp_path)
    _clean(tmp_path / "vm.qcow2")
    info = qemu_img_json("info", "--output=json", tmp_path / "vm.qcow2")
    assert info["backing-filename"] == "moved.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    qemu_img("rebase", "-u", "-b", "old.qcow2", "-F", "qcow2", tmp_path / "vm.qcow2")
    os.rename(tmp_path / "moved.qcow2", tmp_path / "old.qcow2")
    assert _raw(tmp_path / "vm.qcow2") == _raw(tmp_path / "vm.qcow2")


def test_rebase_refusals_change_nothing(tmp_path: Path) -> None:
    _rebase_setup(tmp_path)
    _img(tmp_path / "small.qcow2", 2 * MiB)
    before = _hashes(tmp_path)
    assert_clean_error(run_vmforge("rebase", "-b", "small.qcow2", "-F", "qcow2", "vm.qcow2",
                                   cwd=tmp_path), contains="bytes")
    assert_clean_error(run_vmforge("rebase", "-b", "new.qcow2", "vm.qcow2", cwd=tmp_path),
                       contains="backing format")
    assert_clean_error(run_vmforge("rebase", "-b", "gone.qcow2", "-F", "qcow2", "vm.qcow2",
                                   cwd=tmp_path), contains="no such file")
    assert _hashes(tmp_path) == before


# -- resize ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("change", ["+3M", "9M", "--shrink 2M", "--shrink -1536K", "+0"])
def test_resize_like_qemu(tmp_path: Path, fmt: str, change: str) -> None:
    paths = []
    for who in ("ours", "theirs"):
        p = tmp_path / f"{who}.{fmt}"
        qemu_img("create", "-q", "-f", fmt, p, "4M")
        qemu_io(p, ["write -P 7 0 2M", "write -P 8 3M 4K"] if "shrink" not in change
                else ["write -P 7 0 1M"], fmt=fmt)
        paths.append(p)
    *flags, size = change.split()
    vmforge_ok("resize", "-q", "-f", fmt, *flags, paths[0], "--", size)
    qemu_img("resize", "-q", "-f", fmt, *flags, paths[1], "--", size)
    if fmt == "qcow2":
        _clean(paths[0])
    assert _raw(paths[0], fmt) == _raw(paths[1], fmt)


def test_resize_grow_after_shrink_reads_zeros(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_io(p, ["write -P 7 0 4M"])
    vmforge_ok("resize", "--shrink", "--force", p, str(1 * MiB + 512))
    vmforge_ok("resize", p, "4M")
    _clean(p)
    data = _raw(p)
    assert data[:MiB + 512] == b"\x07" * (MiB + 512)
    assert data[MiB + 512:].count(0) == len(data) - MiB - 512


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize_refusals_change_nothing(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"d.{fmt}"
    qemu_img("create", "-q", "-f", fmt, p, "4M")
    qemu_io(p, ["write -P 7 3M 512"], fmt=fmt)
    before = sha256(p)
    assert_clean_error(run_vmforge("resize", "-f", fmt, p, "2M"), contains="--shrink")
    assert_clean_error(run_vmforge("resize", "--shrink", "-f", fmt, p, "2M"),
                       contains="offset 3145728")
    assert_clean_error(run_vmforge("resize", "-f", fmt, p, "0"), contains="positive")
    assert_clean_error(run_vmforge("resize", "-f", fmt, p, "--", "-5M"), contains="positive")
    if fmt == "qcow2":
        assert_clean_error(run_vmforge("resize", p, "+100"), contains="multiple of 512")
    assert sha256(p) == before
    # only zeros past the new end: no data is lost, so no --force needed
    qemu_io(p, ["write -z 3M 512"] if fmt == "qcow2" else ["write -P 0 3M 512"], fmt=fmt)
    vmforge_ok("resize", "--shrink", "-f", fmt, p, "2M")


# -- dd --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operands", [["bs=512", "count=1"], ["bs=64K", "skip=3", "count=20"],
                                      ["bs=1000", "skip=3"], ["bs=1M"], ["bs=4K", "count=0"]])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_dd_matches_coreutils(tmp_path: Path, pattern_file, operands: list[str],
                              out_fmt: str) -> None:
    """POSIX dd is the oracle: qemu-img dd counts ``count`` from the start of the input,
    not from ``skip`` (its output is count-skip blocks), which no other dd does."""
    src = pattern_file("mixed")
    qcow = tmp_path / "src.qcow2"
    qemu_img("convert", "-O", "qcow2", src, qcow)
    expected = tmp_path / "expected.raw"
    subprocess.run(["dd", f"if={src}", f"of={expected}", *operands, "status=none"], check=True)
    out = tmp_path / f"out.{out_fmt}"
    vmforge_ok("dd", "-O", out_fmt, f"if={qcow}", f"of={out}", *operands)
    got = _raw(out, out_fmt)
    want = expected.read_bytes()
    assert got[:len(want)] == want
    assert got[len(want):].count(0) == len(got) - len(want)  # rounded up to a sector


def test_dd_refusals(tmp_path: Path, pattern_file) -> None:
    src = pattern_file("mixed")
    out = tmp_path / "out.raw"
    assert_clean_error(run_vmforge("dd", f"if={src}", f"of={out}", "bs=1M", "skip=100"),
                       contains="past the end")
    assert_clean_error(run_vmforge("dd", f"if={src}", "bs=1M"), contains="of=")
    assert_clean_error(run_vmforge("dd", f"if={src}", f"of={out}", "bsize=1"),
                       contains="unrecognised")
    assert not out.exists()


# -- clone / overlay -------------------------------------------------------------------------------


def test_linked_clones_share_one_base(tmp_path: Path, pattern_file) -> None:
    golden = tmp_path / "images" / "golden.qcow2"
    golden.parent.mkdir()
    qemu_img("convert", "-O", "qcow2", pattern_file("mixed"), golden)
    before = sha256(golden)
    vms = tmp_path / "vms"
    vms.mkdir()
    for n in range(3):
        vmforge_ok("clone", "--linked", golden, vms / f"vm{n}.qcow2")
        qemu_io(vms / f"vm{n}.qcow2", [f"write -P {n + 1} {n}M 64K"])
    vmforge_ok("overlay", golden, vms / "vm3.qcow2")
    for n in range(4):
        vm = vms / f"vm{n}.qcow2"
        _clean(vm)
        info = qemu_img_json("info", "--output=json", vm)
        assert info["backing-filename"] == "../images/golden.qcow2"  # relative by default
        assert info["backing-filename-format"] == "qcow2"
    assert sha256(golden) == before  # the base stays immutable
    # moving the whole tree keeps every clone working
    shutil.move(tmp_path / "images", tmp_path / "moved-images")
    shutil.move(vms, tmp_path / "moved-vms")
    (tmp_path / "images").symlink_to("moved-images")
    expected = bytearray(pattern_file("mixed").read_bytes())
    expected[2 * MiB:2 * MiB + 64 * KiB] = b"\x03" * 64 * KiB
    assert _raw(tmp_path / "moved-vms" / "vm2.qcow2") == bytes(expected)


def test_full_clone_is_independent(tmp_path: Path, pattern_file) -> None:
    golden = tmp_path / "golden.qcow2"
    qemu_img("convert", "-O", "qcow2", pattern_file("mixed"), golden)
    overlay = tmp_path / "vm.qcow2"
    vmforge_ok("clone", "--linked", "--absolute", golden, overlay)
    assert qemu_img_json("info", "--output=json", overlay)["backing-filename"] == str(golden)
    full = tmp_path / "full.qcow2"
    vmforge_ok("clone", "--full", overlay, full)
    info = qemu_img_json("info", "--output=json", full)
    assert "backing-filename" not in info
    _clean(full)
    assert qemu_img("compare", full, golden, check=False).returncode == 0
    assert_clean_error(run_vmforge("clone", "--full", overlay, full), contains="already exists")
    assert_clean_error(run_vmforge("clone", golden, tmp_path / "x.qcow2"))
    assert_clean_error(run_vmforge("clone", "--linked", "-O", "raw", golden, tmp_path / "y.raw"),
                       contains="backing file")


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
def test_full_clone_of_a_multi_file_vmdk_is_a_real_copy(tmp_path: Path, subformat: str) -> None:
    """A descriptor naming extent files is converted, never copied as a lone descriptor."""
    src = tmp_path / "src" / "disk.vmdk"
    src.parent.mkdir()
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", src, "4M")
    qemu_io(src, ["write -P 0x42 1M 64K"], fmt="vmdk")
    expected = _raw(src, "vmdk")
    clone = tmp_path / "clone.vmdk"
    vmforge_ok("clone", "--full", src, clone)
    shutil.rmtree(src.parent)  # the clone must not depend on the source's extent files
    assert _raw(clone, "vmdk") == expected
