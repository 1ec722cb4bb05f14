"""vmforge run / vm: real QEMU processes (TCG here, ~10 s a boot: boots are few)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import (
    assert_clean_error,
    run_vmforge,
    sha256,
    vmforge_cmd,
    vmforge_json,
    vmforge_ok,
)
from vmforge.runtime.machine import Machine
from vmforge.runtime.state import VmState

from .conftest import qemu_processes


def _boot_args(guest, *switches: str) -> list[str]:
    return ["--memory", "256M", "--kernel", guest.kernel, "--initrd", guest.initrd,
            "--append", guest.append(*switches)]


def _wait_log(name: str, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = vmforge_ok("vm", "logs", name).stdout
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.3)


@pytest.mark.vm
def test_boot_write_stop_base_unchanged(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    before = sha256(base)
    started = vmforge_json("run", "--detach", "--untrusted", "-f", "raw", "--name", "w1",
                           *_boot_args(guest, "vmforge.disk=1", "vmforge.write=1"), base)
    assert started["marker"] == "VMFORGE-GUEST-UP"
    assert started["accel"] in ("kvm", "tcg") and started["accel_reason"]
    assert 0 < started["qmp_ready_seconds"] <= started["guest_up_seconds"]

    # a second vmforge process sees the running VM through the state directory
    listed = run_vmforge("vm", "list", "--output", "json", isolated=True)
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "w1"]
    assert row["status"] == "running" and row["pid"] in qemu_processes(vm_root)
    assert row["base"] == str(base) and row["base_format"] == "raw" and row["untrusted"]

    log = _wait_log("w1", "VMFORGE-WROTE")
    assert "VMFORGE-ROOT vmforge-root" in log and "VMFORGE-WROTE" in log, log

    stopped = vmforge_ok("vm", "stop", "w1").stdout
    assert "stopped by powerdown" in stopped  # the guest handled the ACPI button
    st = VmState(vm_root / "w1")
    assert not qemu_processes(vm_root)
    assert not st.qmp_path.exists() and not st.pid_path.exists()
    shown = json.loads(vmforge_ok("vm", "show", "w1", "--output", "json").stdout)
    assert shown["status"] == "stopped" and shown["qmp_socket"] is None

    # the base is untouched; the guest's writes are in the overlay
    assert sha256(base) == before
    overlay = st.overlay_path(0)
    check = qemu_img("check", "--output=json", overlay, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_img("compare", base, overlay, check=False).returncode == 1
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", overlay, flat)
    cat = subprocess.run(["debugfs", "-R", "cat /written", str(flat)], capture_output=True,
                         text=True, check=True)
    assert cat.stdout.strip() == "written by the guest"

    vmforge_ok("vm", "rm", "w1")
    assert not st.dir.exists()


@pytest.mark.vm
def test_trusted_chain_then_kill(guest, vm_root, tmp_path):
    """Local mode: the base's own backing chain is followed (formats recorded); kill is
    immediate and leaves no process, socket or pid file."""
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid)
    out = vmforge_json("run", "--detach", "--no-wait", "--name", "k1", "--net", "none",
                       *_boot_args(guest), mid)
    assert out["marker"] is None and out["guest_up_seconds"] is None
    st = VmState(vm_root / "k1")
    (block,) = Machine(st).qmp("query-block")
    image = block["inserted"]["image"]
    assert image["filename"] == str(st.overlay_path(0)) and image["format"] == "qcow2"
    assert image["backing-image"]["filename"] == str(mid)
    assert image["backing-image"]["backing-image"]["filename"] == str(base)
    assert image["backing-image"]["backing-image"]["format"] == "raw"
    assert st.qmp_path.exists() and qemu_processes(vm_root)

    assert "killed" in vmforge_ok("vm", "kill", "k1").stdout
    assert not qemu_processes(vm_root)
    assert not st.qmp_path.exists() and not st.pid_path.exists()
    assert "was not running" in vmforge_ok("vm", "kill", "k1").stdout
    vmforge_ok("vm", "rm", "k1")


def test_untrusted_image_with_backing_file_is_refused(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    proc = run_vmforge("run", "--detach", "--untrusted", "--name", "u1", *_boot_args(guest), top)
    assert_clean_error(proc)
    assert "backing" in proc.stderr
    assert not (vm_root / "u1").exists()


@pytest.mark.parametrize(("args", "contains"), [
    (["--memory", "12Q"], "unknown memory size"),
    (["--memory", "8M"], "out of range"),
    (["--cpus", "many"], "unknown CPU count"),
    (["--cpus", "0"], "CPU count 0"),
    (["--name", "../evil"], "invalid VM name"),
    (["--initrd", "/x"], "need --kernel"),
    (["--kernel", "/nonexistent/vmlinuz"], "no such kernel file"),
])
def test_bad_hardware_is_refused(guest, vm_root, tmp_path, args, contains):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    proc = run_vmforge("run", "--detach", *args, base)
    assert_clean_error(proc, contains=contains)
    assert not any(vm_root.glob("*/spec.json")) or "evil" not in str(list(vm_root.iterdir()))


def test_missing_image_and_unknown_vm(vm_root, tmp_path):
    assert_clean_error(run_vmforge("run", "--detach", tmp_path / "nope.qcow2"),
                       contains="no such file")
    assert_clean_error(run_vmforge("run", "--detach", tmp_path), contains="not a regular file")
    for action in ("show", "stop", "kill", "logs", "rm"):
        assert_clean_error(run_vmforge("vm", action, "ghost"), contains="no VM named 'ghost'")


def test_qemu_launch_failure_is_reported(guest, vm_root, tmp_path):
    """QEMU itself refuses (a kernel that is not one): exit code, QEMU's words, the command;
    nothing left running and no VM directory left behind."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    bogus = tmp_path / "not-a-kernel"
    bogus.write_bytes(b"this is not a kernel\n" * 100)
    proc = run_vmforge("run", "--detach", "--name", "f1", "--kernel", bogus, base)
    assert_clean_error(proc, contains="QEMU exited with code 1")
    assert "kernel" in proc.stderr and "qemu-system-x86_64" in proc.stderr  # the command
    assert not (vm_root / "f1").exists()


@pytest.mark.vm
def test_foreground_run_follows_console_and_stops_on_ctrl_c(guest, vm_root, tmp_path):
    """Without --detach, run copies the serial console to stdout; SIGTERM/Ctrl-C stops the VM
    gracefully and nothing is left running."""
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    proc = subprocess.Popen([*vmforge_cmd(), "run", "--name", "fg1", "--net", "none",
                             *map(str, _boot_args(guest, "vmforge.counter=1")), str(base)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, VMFORGE_STATE_DIR=str(vm_root)))
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "VMFORGE-COUNT 1" in line:
                break
        assert any("guest up after" in ln for ln in lines), "".join(lines)
        assert any("VMFORGE-COUNT 1" in ln for ln in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "VM fg1 stopped (powerdown)" in err
    assert not qemu_processes(vm_root)
    vmforge_ok("vm", "rm", "fg1")


@pytest.mark.vm
def test_guest_timeout_kills_the_vm_and_keeps_its_log(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    proc = run_vmforge("run", "--detach", "--name", "t1", "--net", "none", "--marker",
                       "NEVER-PRINTED", "--timeout", "1", *_boot_args(guest), base)
    assert_clean_error(proc, contains="did not print 'NEVER-PRINTED' within 1 s")
    assert "vmforge vm logs t1" in proc.stderr
    assert not qemu_processes(vm_root)
    assert json.loads(vmforge_ok("vm", "show", "t1", "--output", "json").stdout)["status"] == \
        "stopped"
    vmforge_ok("vm", "logs", "t1")
    vmforge_ok("vm", "rm", "t1")
    assert not (vm_root / "t1").exists()
