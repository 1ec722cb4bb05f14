"""Networks: named isolated segments between VMs, user-mode NAT with port forwards."""

from __future__ import annotations

import shutil
import socket

import pytest

from tests.helpers import assert_clean_error, run_vmforge, vmforge_ok
from vmforge.model.hardware import Nic, VirtualHardware
from vmforge.runtime.accel import Accel
from vmforge.runtime.machine import build_command, segment_group
from vmforge.runtime.state import VmState

from .conftest import qemu_processes, wait_serial

TCG = Accel("tcg", "test")


def _netdevs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]


def test_segments_and_forwards_on_the_command_line(tmp_path):
    hw = VirtualHardware(nics=(Nic(network="A"), Nic(network="B"),
                               Nic(network="user", forwards=("2222:22", "8080:80"))))
    argv = build_command("qemu", hw, VmState(tmp_path / "n"), TCG)
    seg_a, seg_b, user = _netdevs(argv)
    group_a, port_a = segment_group("A")
    assert seg_a == f"socket,id=net0,mcast={group_a}:{port_a},localaddr=127.0.0.1"
    assert segment_group("A") != segment_group("B") and f"mcast={group_a}" not in seg_b
    assert group_a.startswith("239.255.") and 20000 <= port_a < 60000
    assert user == ("user,id=net2,hostfwd=tcp:127.0.0.1:2222-:22,"
                    "hostfwd=tcp:127.0.0.1:8080-:80")


@pytest.mark.parametrize(("args", "contains"), [
    (["--forward", "22"], "invalid port forward"),
    (["--forward", "70000:22"], "invalid port forward"),
    (["--forward", "2222:22", "--net", "none"], "--forward needs --net user"),
    (["--net", "bridge0"], "unknown network"),
    (["--net", "segment:../x"], "invalid network name"),
])
def test_bad_network_options(vm_root, tmp_path, args, contains):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    assert_clean_error(run_vmforge("run", "--detach", *args, base), contains=contains)
    assert not any(vm_root.iterdir()) or not qemu_processes(vm_root)


def test_occupied_forward_port_is_refused(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_vmforge("run", "--detach", "--no-wait", "-f", "raw", "--name", "fw",
                           "--forward", f"{port}:22", "--kernel", guest.kernel, base)
    assert_clean_error(proc, contains="hostfwd")
    assert not (vm_root / "fw").exists() and not qemu_processes(vm_root)


@pytest.mark.vm
def test_vms_on_one_segment_reach_each_other_and_not_another(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    vms = {  # name: (segment, own address, addresses it pings)
        "a1": ("A", "10.9.0.1", ["10.9.0.2"]),
        "a2": ("A", "10.9.0.2", ["10.9.0.1"]),
        "b1": ("B", "10.9.0.3", ["10.9.0.1", "10.9.0.2"]),
    }
    for name, (segment, ip, targets) in vms.items():
        vmforge_ok("run", "--detach", "--no-wait", "-f", "raw", "--name", name, "--memory",
                   "128M", "--net", f"segment:{segment}", "--kernel", guest.kernel, "--initrd",
                   guest.initrd, "--append",
                   guest.append(f"vmforge.ip={ip}/24", f"vmforge.ping={','.join(targets)}"), base)
    try:
        for name, (_, _, targets) in vms.items():
            want = [f"VMFORGE-PING {t} " for t in targets]
            log = wait_serial(vm_root / name / "serial.log", want, 90)
            verdict = "fail" if name == "b1" else "ok"
            for t in targets:
                assert f"VMFORGE-PING {t} {verdict}" in log, (name, log)
    finally:
        for name in vms:
            vmforge_ok("vm", "rm", "--force", name)
    assert not qemu_processes(vm_root)
