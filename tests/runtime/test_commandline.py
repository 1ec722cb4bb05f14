"""The QEMU command line built from VirtualHardware (pure: nothing is started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmforge.errors import UsageError
from vmforge.model.hardware import Bus, Disk, Nic, NicModel, VirtualHardware
from vmforge.runtime.accel import Accel
from vmforge.runtime.machine import PinnedBase, build_command, default_mac
from vmforge.runtime.state import VmState

TCG = Accel("tcg", "test")
KVM = Accel("kvm", "test")


def _state(tmp_path: Path) -> VmState:
    return VmState(tmp_path / "vm1")


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _blockdevs(argv: list[str]) -> list[dict]:
    return [json.loads(b) for b in _options(argv, "-blockdev")]


def test_house_rules(tmp_path):
    st = _state(tmp_path)
    hw = VirtualHardware(cpus=2, memory=1 << 30, disks=(Disk(str(tmp_path / "d.qcow2"), "qcow2"),),
                         nics=(Nic(),))
    argv = build_command("/usr/bin/qemu-system-x86_64", hw, st, TCG)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert _options(argv, "-display") == ["none"]
    assert _options(argv, "-smp") == ["2"] and _options(argv, "-m") == ["1024M"]
    assert _options(argv, "-accel") == ["tcg,thread=multi"]
    assert _options(argv, "-sandbox")[0].startswith("on")
    # QMP only on a UNIX socket inside the state directory; serial into its log
    qmp = [c for c in _options(argv, "-chardev") if c.startswith("socket,id=qmp,")]
    assert qmp == [f"socket,id=qmp,path={st.dir.absolute() / 'qmp.sock'},server=on,wait=off"]
    assert not any("tcp:" in a or "telnet" in a for a in argv)
    # the serial port: a UNIX socket for 'vm console', everything it prints logged too
    d = st.dir.absolute()
    assert (f"socket,id=serial0,path={d / 'console.sock'},server=on,wait=off,"
            f"logfile={d / 'serial.log'},logappend=on") in _options(argv, "-chardev")
    assert _options(argv, "-serial") == ["chardev:serial0"]
    assert _options(argv, "-pidfile") == [str(st.dir.absolute() / "qemu.pid")]
    assert "-daemonize" in argv
    # the legacy -drive (with its format probing) is never used for disks
    assert "-drive" not in argv and "-hda" not in argv


def test_every_image_node_names_its_driver(tmp_path):
    disks = tuple(Disk(str(tmp_path / f"d{i}"), fmt, bus) for i, (fmt, bus) in
                  enumerate([("qcow2", Bus.VIRTIO), ("raw", Bus.SATA), ("vmdk", Bus.SCSI),
                             ("vpc", Bus.IDE)]))
    argv = build_command("qemu", VirtualHardware(disks=disks), _state(tmp_path), TCG)
    nodes = _blockdevs(argv)
    assert [n["driver"] for n in nodes] == ["qcow2", "raw", "vmdk", "vpc"]
    assert all(n["file"]["driver"] == "file" for n in nodes)
    devices = _options(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,id=dev0,bootindex=0" in devices
    assert "ide-hd,drive=disk1,bus=ide.0,id=dev1,bootindex=1" in devices  # q35 AHCI port
    assert "virtio-scsi-pci,id=scsi0" in devices
    assert "scsi-hd,drive=disk2,bus=scsi0.0,id=dev2,bootindex=2" in devices


def test_pc_machine_ide_and_sata(tmp_path):
    disks = (Disk("/a", "raw", Bus.IDE), Disk("/b", "raw", Bus.IDE, cdrom=True),
             Disk("/c", "raw", Bus.SATA))
    argv = build_command("qemu", VirtualHardware(machine="pc", disks=disks), _state(tmp_path), TCG)
    devices = _options(argv, "-device")
    assert "ide-hd,drive=disk0,bus=ide.0,unit=0,id=dev0,bootindex=0" in devices
    assert "ide-cd,drive=disk1,bus=ide.0,unit=1,id=dev1,bootindex=1" in devices
    assert "ahci,id=sata0" in devices
    assert "ide-hd,drive=disk2,bus=sata0.0,id=dev2,bootindex=2" in devices


def test_untrusted_base_is_pinned_without_backing(tmp_path):
    hw = VirtualHardware(disks=(Disk("/vm/disk0.qcow2", "qcow2"),))
    for fmt in ("qcow2", "raw"):
        argv = build_command("qemu", hw, _state(tmp_path), TCG,
                             pinned={0: PinnedBase("/img/base", fmt)})
        base, top = _blockdevs(argv)
        assert top["backing"] == "base0" and base["node-name"] == "base0"
        assert base["driver"] == fmt and base["read-only"] is True
        assert base["file"] == {"driver": "file", "filename": "/img/base", "read-only": True}
        # a COW base may not open anything it names; raw has no backing option at all
        assert ("backing" in base and base["backing"] is None) == (fmt == "qcow2")


def test_trusted_overlay_leaves_backing_to_its_header(tmp_path):
    argv = build_command("qemu", VirtualHardware(disks=(Disk("/vm/o.qcow2", "qcow2"),)),
                         _state(tmp_path), TCG)
    (node,) = _blockdevs(argv)
    assert "backing" not in node


def test_kernel_boot_and_nics(tmp_path):
    hw = VirtualHardware(disks=(Disk("/vm/o.qcow2", "qcow2"),), kernel="/k/vmlinuz",
                         initrd="/k/initrd", append="console=ttyS0 quiet",
                         nics=(Nic(NicModel.E1000, "52:54:00:aa:bb:cc"), Nic(network="none"),
                               Nic()))
    argv = build_command("qemu", hw, _state(tmp_path), KVM)
    assert _options(argv, "-kernel") == ["/k/vmlinuz"]
    assert _options(argv, "-initrd") == ["/k/initrd"]
    assert _options(argv, "-append") == ["console=ttyS0 quiet"]
    assert _options(argv, "-accel") == ["kvm"] and _options(argv, "-cpu") == ["host"]
    # the option ROM of a direct kernel boot owns bootindex 0
    assert not any("bootindex" in d for d in _options(argv, "-device"))
    devices = _options(argv, "-device")
    assert "e1000,netdev=net0,mac=52:54:00:aa:bb:cc,id=nic0" in devices
    assert f"virtio-net-pci,netdev=net2,mac={default_mac('vm1', 2)},id=nic2" in devices
    assert _options(argv, "-netdev") == ["user,id=net0", "user,id=net2"]


def test_default_mac_is_stable_and_local():
    mac = default_mac("web", 0)
    assert mac == default_mac("web", 0) != default_mac("web", 1) != default_mac("db", 0)
    assert mac.startswith("52:54:00:") and len(mac) == 17


def test_no_sandbox_when_unsupported(tmp_path):
    argv = build_command("qemu", VirtualHardware(), _state(tmp_path), TCG, sandbox=False)
    assert "-sandbox" not in argv


def test_refusals(tmp_path):
    # named segments are implemented (test_networks.py); forwards exist only on user NAT
    with pytest.raises(UsageError, match="port forwards need the user-mode network"):
        build_command("qemu", VirtualHardware(nics=(Nic(network="segA", forwards=("1:2",)),)),
                      _state(tmp_path), TCG)
    with pytest.raises(UsageError, match="4 IDE slots"):
        build_command("qemu", VirtualHardware(machine="pc", disks=tuple(
            Disk(f"/d{i}", "raw", Bus.IDE) for i in range(5))), _state(tmp_path), TCG)
    with pytest.raises(UsageError):
        build_command("qemu", VirtualHardware(cpus=0), _state(tmp_path), TCG)
