"""``vmforge amend`` against ``qemu-img amend`` on copies of the same image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.data.qemu import check_json, qemu_img, qemu_io
from tests.helpers import assert_clean_error, run_vmforge, sha256

SOURCES = {
    "plain": "",
    "zstd": "compression_type=zstd",
    "rc8": "refcount_bits=8",
    "lazy": "lazy_refcounts=on",
    "extl2": "extended_l2=on",
    "v2": "compat=0.10",
}
AMENDS = ["compat=0.10", "compat=1.1", "refcount_bits=64", "refcount_bits=4", "refcount_bits=1",
          "lazy_refcounts=on", "lazy_refcounts=off", "compat=0.10,refcount_bits=16",
          "compat=0.10,refcount_bits=8", "compat=0.10,lazy_refcounts=on"]


def make_image(path: Path, options: str, *, backing: Path | None = None) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    qemu_img(*args, *(["-o", options] if options else []), path, 4 << 20)
    qemu_io(path, ["write -P 0x11 0 192k", "write -z 0 64k", "write -z 1M 64k"])
    qemu_img("snapshot", "-c", "s", path)
    qemu_io(path, ["write -z 64k 64k", "write -P 0x22 2M 64k"])
    return path


def specific(path: Path) -> dict[str, object]:
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return dict(info["format-specific"]["data"])


@pytest.mark.parametrize("amend", AMENDS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_amend_like_qemu(tmp_path: Path, source: str, amend: str) -> None:
    ours = make_image(tmp_path / "ours.qcow2", SOURCES[source])
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    before = sha256(ours)
    qemu_ok = qemu_img("amend", "-o", amend, theirs, check=False).returncode == 0
    proc = run_vmforge("amend", "-o", amend, ours)
    if not qemu_ok:
        assert_clean_error(proc)
        assert sha256(ours) == before
        return
    assert proc.returncode == 0, proc.stderr
    assert check_json(ours)[0] == 0, qemu_img("check", ours, check=False).stderr
    assert specific(ours) == specific(theirs)
    assert qemu_img("compare", ours, theirs).returncode == 0
    for snap in ("s",):
        a = qemu_img("convert", "-l", snap, "-O", "raw", ours, tmp_path / "a.raw")
        b = qemu_img("convert", "-l", snap, "-O", "raw", theirs, tmp_path / "b.raw")
        assert a.returncode == b.returncode == 0
        assert sha256(tmp_path / "a.raw") == sha256(tmp_path / "b.raw")


def test_downgrade_keeps_zero_clusters_over_a_backing_file(tmp_path: Path) -> None:
    """A zero cluster must keep hiding the backing data once version 2 has no zero flag."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 4 << 20)
    qemu_io(base, ["write -P 0x5a 0 4M"])
    ours = make_image(tmp_path / "ours.qcow2", "", backing=base)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    qemu_img("amend", "-o", "compat=0.10", theirs)
    assert run_vmforge("amend", "-o", "compat=0.10", ours).returncode == 0
    assert check_json(ours)[0] == 0
    assert specific(ours) == specific(theirs)
    assert qemu_img("compare", ours, theirs).returncode == 0
    qemu_img("convert", "-l", "s", "-O", "raw", ours, tmp_path / "a.raw")
    qemu_img("convert", "-l", "s", "-O", "raw", theirs, tmp_path / "b.raw")
    assert sha256(tmp_path / "a.raw") == sha256(tmp_path / "b.raw")


@pytest.mark.parametrize("options,contains", [
    ("cluster_size=4096", "not supported"),
    ("compat=2.0", "Invalid compatibility level"),
    ("refcount_bits=3", "power of two"),
])
def test_bad_options_are_refused(tmp_path: Path, options: str, contains: str) -> None:
    img = make_image(tmp_path / "x.qcow2", "")
    before = sha256(img)
    assert_clean_error(run_vmforge("amend", "-o", options, img), contains=contains)
    assert sha256(img) == before


def test_bitmaps_block_a_downgrade(tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.qcow2", "")
    qemu_img("bitmap", "--add", img, "bm0")
    before = sha256(img)
    assert_clean_error(run_vmforge("amend", "-o", "compat=0.10", img), contains="bitmaps")
    assert sha256(img) == before
