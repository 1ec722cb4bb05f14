"""vm snapshot/restore/snapshots, vm clone, vm start and run --count on real QEMU processes.

Boots are expensive under TCG (~10 s), so each VM test checks many things per boot.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import assert_clean_error, run_vmforge, sha256, vmforge_ok
from vmforge.runtime.machine import Machine
from vmforge.runtime.state import VmState

from .conftest import qemu_processes

COUNT = re.compile(rb"VMFORGE-COUNT (\d+)")


def _boot_args(guest, *switches: str, memory: str = "128M") -> list[str]:
    return ["--memory", memory, "--net", "none", "--kernel", guest.kernel, "--initrd",
            guest.initrd, "--append", guest.append(*switches)]


def _vm_json(*args: object) -> object:
    return json.loads(vmforge_ok("vm", *args, "--output", "json").stdout)


def _log(root: Path, name: str) -> bytes:
    return (root / name / "serial.log").read_bytes()


def _counts(data: bytes) -> list[int]:
    return [int(m) for m in COUNT.findall(data)]


def _wait(root: Path, name: str, pred, timeout: float = 90) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = _log(root, name)
        if pred(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def _guest_file(overlay: Path, tmp: Path, name: str) -> str | None:
    """``name`` from the ext4 inside ``overlay`` (via qemu-img convert + debugfs), or None."""
    flat = tmp / f"{overlay.parent.name}.raw"
    qemu_img("convert", "-O", "raw", overlay, flat)
    out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(flat)], capture_output=True,
                         text=True, check=True)
    flat.unlink()
    return out.stdout if out.stdout else None


@pytest.mark.vm
def test_full_and_disk_snapshots_restore_and_clones(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    before = sha256(base)
    vmforge_ok("run", "--detach", "--untrusted", "-f", "raw", "--name", "s1",
               *_boot_args(guest, "vmforge.disk=1", "vmforge.write=1", "vmforge.counter=1"), base)
    st = VmState(vm_root / "s1")
    _wait(vm_root, "s1", lambda d: b"VMFORGE-WROTE" in d and len(_counts(d)) >= 2)

    # full state: RAM and devices into the overlay, the counter keeps running meanwhile
    saved_at = _counts(_log(vm_root, "s1"))[-1]
    full = _vm_json("snapshot", "s1", "full1")
    after_save = _counts(_log(vm_root, "s1"))[-1]
    assert full["kind"] == "full" and full["vm_state_size"] > 1 << 20 and full["name"] == "full1"
    disk = _vm_json("snapshot", "s1", "disk1", "--disk-only")
    assert disk["kind"] == "disk-only" and disk["vm_state_size"] == 0
    listed = _vm_json("snapshots", "s1")
    assert [(s["name"], s["kind"]) for s in listed] == [("full1", "full"), ("disk1", "disk-only")]
    # the same snapshots as the image tools see them in the overlay (qemu-img is the oracle)
    ours = vmforge_ok("snapshot", "-l", st.overlay_path(0)).stdout
    theirs = qemu_img("snapshot", "-U", "-l", st.overlay_path(0)).stdout
    assert "full1" in ours and "disk1" in ours and ours.strip() == theirs.strip()
    assert_clean_error(run_vmforge("vm", "snapshot", "s1", "full1"), contains="already has")
    assert_clean_error(run_vmforge("vm", "snapshot", "s1", "7"), contains="looks like a snapshot id")

    # restore: the guest's counter goes back to the saved value and continues from there
    data = _wait(vm_root, "s1", lambda d: _counts(d)[-1] >= after_save + 4)
    before_restore = _counts(data)[-1]
    mark = len(data)
    restored = _vm_json("restore", "s1", "full1")
    assert restored["restored"].startswith("RAM")
    data = _wait(vm_root, "s1", lambda d: len(_counts(d[mark:])) >= 3)
    resumed = _counts(data[mark:])
    assert saved_at <= resumed[0] <= after_save + 1 < before_restore, (saved_at, resumed)
    assert resumed[1:3] == [resumed[0] + 1, resumed[0] + 2]  # and it goes on counting
    assert_clean_error(run_vmforge("vm", "restore", "s1", "disk1"),
                       contains="disk-only snapshot")
    assert_clean_error(run_vmforge("vm", "restore", "s1", "nope"), contains="no snapshot named")

    # clone of a running VM: a fresh overlay on the base (the guest's writes are not in it)
    c1 = _vm_json("clone", "s1", "c1")
    assert c1["copied_overlay"] is False and 0 < c1["bytes_on_disk"] < 1 << 20

    vmforge_ok("vm", "stop", "s1")
    # clone of a stopped VM: carries what the guest wrote, shares the same base
    c2 = _vm_json("clone", "s1", "c2")
    assert c2["copied_overlay"] is True
    for name, has_written in (("c1", False), ("c2", True)):
        overlay = VmState(vm_root / name).overlay_path(0)
        info = qemu_img_json("info", "-U", overlay)
        assert info["full-backing-filename"] == str(base) and info["backing-filename-format"] == "raw"
        assert qemu_img("check", overlay, check=False).returncode == 0
        assert "snapshots" not in info  # only the overlay's data, not its snapshots
        assert (_guest_file(overlay, tmp_path, "written") == "written by the guest\n") is has_written
    shown = _vm_json("show", "c2")
    assert shown["status"] == "stopped" and shown["base"] == str(base) and shown["untrusted"]

    # a stopped VM: disk-only snapshots are made and applied in the overlay file
    _vm_json("snapshot", "s1", "offline", "--disk-only")
    assert_clean_error(run_vmforge("vm", "snapshot", "s1", "ram"), contains="not running")
    back = _vm_json("restore", "s1", "disk1")
    assert back["restored"] == "disks"
    assert "full1" in qemu_img("snapshot", "-l", st.overlay_path(0)).stdout
    vmforge_ok("vm", "snapshot", "s1", "offline", "--delete")
    assert [s["name"] for s in _vm_json("snapshots", "s1")] == ["full1", "disk1"]
    assert qemu_img("check", st.overlay_path(0), check=False).returncode == 0

    assert sha256(base) == before
    for name in ("s1", "c1", "c2"):
        vmforge_ok("vm", "rm", name)
    assert not qemu_processes(vm_root)


@pytest.mark.vm
def test_three_linked_clones_run_at_once_then_restart_one(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    before = sha256(base)
    proc = run_vmforge("run", "--output", "json", "--count", "3", "--name", "lc", "-f", "raw",
                       *_boot_args(guest, "vmforge.counter=1"), base)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == ["lc-1", "lc-2", "lc-3"]
    pids = {_vm_json("show", r["name"])["pid"] for r in rows}
    assert len(pids) == 3 and pids <= set(qemu_processes(vm_root))  # all three at once
    for r in rows:
        assert r["marker"] == "VMFORGE-GUEST-UP" and r["guest_up_seconds"] > 0
        overlay = VmState(vm_root / r["name"]).overlay_path(0)
        assert r["overlay_bytes"] == overlay.stat().st_blocks * 512
        assert 0 < r["overlay_bytes"] <= r["bytes_on_disk"] < base.stat().st_size
        assert qemu_img_json("info", "-U", overlay)["full-backing-filename"] == str(base)
    table = vmforge_ok("vm", "list").stdout
    assert sum(1 for line in table.splitlines() if " running " in line) == 3

    # a killed clone starts again on its own overlay; the old boot's log is kept aside
    # (--no-wait: the boot itself was checked above, this saves a TCG boot of CI time)
    st = VmState(vm_root / "lc-2")
    deadline = time.monotonic() + 60  # the counter's first line, however loaded the host
    while b"VMFORGE-COUNT" not in st.serial_path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    vmforge_ok("vm", "kill", "lc-2")
    old_log = st.serial_path.read_bytes()
    again = json.loads(vmforge_ok("vm", "start", "lc-2", "--no-wait", "--output", "json").stdout)
    assert again["marker"] is None and st.running()
    (block,) = Machine(st).qmp("query-block")
    assert block["inserted"]["image"]["filename"] == str(st.overlay_path(0))
    assert st.serial_path.with_suffix(".log.1").read_bytes() == old_log
    assert b"VMFORGE-COUNT" in old_log and b"VMFORGE-COUNT" not in st.serial_path.read_bytes()
    assert_clean_error(run_vmforge("vm", "start", "lc-2"), contains="already running")
    for r in rows:
        vmforge_ok("vm", "rm", "--force", r["name"])
    assert not qemu_processes(vm_root)
    assert sha256(base) == before


def test_snapshot_and_clone_refusals(guest, vm_root, tmp_path):
    """Without a boot: a VM launched with --no-wait and killed at once is a stopped VM."""
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    vmforge_ok("run", "--detach", "--no-wait", "-f", "raw", "--name", "r1", *_boot_args(guest),
               base)
    vmforge_ok("vm", "kill", "r1")
    assert_clean_error(run_vmforge("vm", "snapshot", "r1", "a"), contains="not running")
    assert_clean_error(run_vmforge("vm", "snapshot", "r1", ""), contains="invalid snapshot name")
    assert_clean_error(run_vmforge("vm", "restore", "r1", "a"), contains="no snapshot named 'a'")
    assert_clean_error(run_vmforge("vm", "snapshots", "ghost"), contains="no VM named")
    assert "has no snapshots" in vmforge_ok("vm", "snapshots", "r1").stdout
    vmforge_ok("vm", "clone", "r1", "r2")
    assert_clean_error(run_vmforge("vm", "clone", "r1", "r2"), contains="already exists")
    assert_clean_error(run_vmforge("vm", "clone", "ghost", "r3"), contains="no VM named")
    assert_clean_error(run_vmforge("vm", "clone", "r1", "../x"), contains="invalid VM name")
    for count in ("0", "65"):
        assert_clean_error(run_vmforge("run", "--count", count, base), contains="out of range")
    # one name of a --count set is taken: nothing is started
    (vm_root / "r-1").mkdir()
    assert_clean_error(run_vmforge("run", "--count", "2", "--name", "r", "-f", "raw", base),
                       contains="'r-1' already exists")
    assert not (vm_root / "r-2").exists()
    (vm_root / "r-1").rmdir()
    for name in ("r1", "r2"):
        vmforge_ok("vm", "rm", name)
    assert not qemu_processes(vm_root)
