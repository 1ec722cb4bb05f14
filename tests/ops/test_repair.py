"""``vmforge check -r`` against ``qemu-img check -r`` on copies of the same damaged image."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.qcow2_poke import QCOW_OFLAG_COPIED, Qcow2File
from tests.data.qemu import check_json, convert_raw, qemu_img, qemu_io
from tests.helpers import assert_clean_error, assert_same_bytes, run_vmforge, sha256


def make_image(path: Path, *, snapshot: bool = False) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, 1 << 20)
    qemu_io(path, ["write -P 0x11 0 64k", "write -P 0x22 512k 16k"])
    if snapshot:
        qemu_img("snapshot", "-c", "s", path)
        qemu_io(path, ["write -P 0x33 0 8k"])
    return path


def data_cluster(q: Qcow2File, guest: int) -> int:
    return q.data_cluster_host_offset(guest) // q.cluster_size


def leak_data(q: Qcow2File) -> None:
    q.set_refcount(data_cluster(q, 0), 2)
    q.set_refcount(data_cluster(q, 4096), 5)


def leak_unreferenced(q: Qcow2File) -> None:
    # a free cluster inside the file: the one after the last data cluster written
    q.set_refcount(data_cluster(q, 512 * 1024 + 12288) + 1, 1)


def shared_too_low(q: Qcow2File) -> None:  # needs the snapshot: refcount 2 -> 1
    q.set_refcount(data_cluster(q, 16384), 1)


def referenced_zero(q: Qcow2File) -> None:
    q.set_refcount(data_cluster(q, 8192), 0)


def copied_missing(q: Qcow2File) -> None:
    q.set_l2_entry(4096, q.l2_entry(4096) & ~QCOW_OFLAG_COPIED)


DAMAGE: dict[str, tuple[Callable[[Qcow2File], None], bool]] = {
    "leaks": (leak_data, False),
    "leak-free-cluster": (leak_unreferenced, False),
    "refcount-too-low": (shared_too_low, True),
    "refcount-zero": (referenced_zero, False),
    "copied-flag": (copied_missing, False),
    "leaks+snapshot": (leak_data, True),
}


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_repair_like_qemu(tmp_path: Path, damage: str, mode: str, output: str) -> None:
    poke, snapshot = DAMAGE[damage]
    ours = make_image(tmp_path / "ours.qcow2", snapshot=snapshot)
    good = convert_raw(ours, tmp_path / "good.raw")
    poke(Qcow2File(ours))
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    before = sha256(ours)
    q = qemu_img("check", "-r", mode, f"--output={output}", theirs, check=False)
    v = run_vmforge("check", "-r", mode, f"--output={output}", ours)
    assert v.returncode == q.returncode, (v.stdout, v.stderr, q.stdout, q.stderr)
    if q.returncode == 1:  # qemu could not do it: nothing written by us either
        assert "Traceback" not in v.stderr
        assert v.stderr.splitlines()[-1].startswith("vmforge: Check failed"), v.stderr
        assert sha256(ours) == before
        return
    if output == "json":
        mine, qemus = json.loads(v.stdout), json.loads(q.stdout)
        for d in (mine, qemus):
            d.pop("filename")
            d.pop("image-end-offset", None)  # where the new refcount blocks went
        assert mine == qemus
    else:
        def body(text: str) -> list[str]:
            return [ln for ln in text.splitlines() if not ln.startswith("Image end offset")]
        assert body(v.stdout) == body(q.stdout)
    assert check_json(ours) [0] == check_json(theirs)[0]
    assert_same_bytes(convert_raw(ours, tmp_path / "ours.raw"), good)
    if snapshot:
        a = convert_raw(ours, tmp_path / "a.raw", snapshot="s")
        b = convert_raw(theirs, tmp_path / "b.raw", snapshot="s")
        assert_same_bytes(a, b)


def test_unrepairable_damage_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.qcow2")
    q = Qcow2File(img)
    q.set_l2_entry(0, q.l2_entry(0) | 0x200)  # data cluster not aligned
    before = sha256(img)
    assert_clean_error(run_vmforge("check", "-r", "all", img), contains="repairs only")
    assert sha256(img) == before


def test_clean_image_is_left_alone(tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.qcow2", snapshot=True)
    before = sha256(img)
    v = run_vmforge("check", "-r", "all", img)
    assert v.returncode == 0
    assert v.stdout == qemu_img("check", "-r", "all", img).stdout
    assert sha256(img) == before


def test_other_formats(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(4096))
    assert run_vmforge("check", "-r", "all", raw).returncode == 63
