"""vmforge run appliance.ova: the OVA's disk imported into the VM's state directory and
booted with the hardware its OVF declares (flags win). One real boot; the rest is pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    assert_clean_error,
    pack_ustar,
    run_vmforge,
    sha256,
    vmforge_json,
    vmforge_ok,
)
from vmforge.model.hardware import Bus, Disk, Firmware, Nic, NicModel, VirtualHardware
from vmforge.packages.ova import looks_like_ova
from vmforge.packages.ovf import parse_ovf
from vmforge.runtime.accel import Accel
from vmforge.runtime.appliance import Overrides
from vmforge.runtime.machine import build_command
from vmforge.runtime.qmp import qmp
from vmforge.runtime.state import VmState

from .conftest import qemu_processes

CORPUS = Path("/work/shared/corpus/ovf")


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


@pytest.mark.vm
def test_run_exported_ova(guest, vm_root, tmp_path):
    ova = tmp_path / "guest.ova"
    vmforge_ok("export", guest.rootfs, "-f", "raw", "--target", "vmware", "--name", "guest",
               "--cpus", "2", "--memory", "384M", "-o", ova)
    before = sha256(ova)
    # declared: 2 vCPUs, 384 MiB, LSI Logic SCSI, E1000; --memory overrides the memory,
    # --disk-bus virtio puts the disk where the test guest's initramfs looks (/dev/vda)
    started = vmforge_json("run", "--detach", "--name", "app1", "--memory", "320M",
                           "--disk-bus", "virtio", "--kernel", guest.kernel,
                           "--initrd", guest.initrd, "--append", guest.append("vmforge.disk=1"),
                           "--marker", "VMFORGE-ROOT", ova)
    try:
        assert started["marker"] == "VMFORGE-ROOT"
        log = vmforge_ok("vm", "logs", "app1").stdout
        assert "VMFORGE-ROOT vmforge-root" in log, log  # the guest read the OVA's disk
        st = VmState(vm_root / "app1")
        spec = json.loads(st.spec_path.read_text())
        argv = spec["command"]
        assert _option(argv, "-smp") == ["2"] and _option(argv, "-m") == ["320M"]
        assert any(d.startswith("e1000,") for d in _option(argv, "-device"))
        assert any(d.startswith("virtio-blk-pci,drive=disk0") for d in _option(argv, "-device"))
        imported = st.dir / "appliance" / "guest-disk1.qcow2"
        assert spec["base"] == str(imported) and spec["untrusted"]
        assert spec["appliance"] == str(ova) and spec["appliance_signer"] is None
        base_nodes = [json.loads(b) for b in _option(argv, "-blockdev")]
        assert base_nodes[0]["file"]["filename"] == str(imported)  # disk 0's pinned base
        assert base_nodes[1]["file"]["filename"] == str(st.overlay_path(0))
    finally:
        vmforge_ok("vm", "rm", "--force", "app1")
    assert not (vm_root / "app1").exists() and not qemu_processes(vm_root)
    assert sha256(ova) == before  # the OVA itself is never written


_pack = pack_ustar


def test_damaged_ova_leaves_no_vm(vm_root, tmp_path):
    vmdk = (CORPUS / "ubuntu.2.0-disk1.vmdk").read_bytes()
    spoiled = vmdk[:-600] + bytes([vmdk[-600] ^ 1]) + vmdk[-599:]
    ova = _pack(tmp_path / "bad.ova", [("ubuntu.2.0.ovf", (CORPUS / "ubuntu.2.0.ovf").read_bytes()),
                                        ("ubuntu.2.0.mf", (CORPUS / "ubuntu.2.0.mf").read_bytes()),
                                        ("ubuntu.2.0-disk1.vmdk", spoiled)])
    proc = run_vmforge("run", "--name", "bad1", "--no-wait", ova)
    assert_clean_error(proc, contains="digest mismatch")
    assert not (vm_root / "bad1").exists() and not qemu_processes(vm_root)


def test_ova_only_flags(tmp_path, vm_root):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    assert_clean_error(run_vmforge("run", "--name", "flags1", "--disk-bus", "ide", "-f", "raw",
                                   disk), contains="apply to an OVA")
    ova = _pack(tmp_path / "a.ova", [("a.ovf", b"<x/>")])
    assert_clean_error(run_vmforge("run", "--name", "flags2", "--count", "2", ova),
                       contains="--count")
    assert not (vm_root / "flags1").exists() and not (vm_root / "flags2").exists()


def test_looks_like_ova(tmp_path):
    ova = _pack(tmp_path / "a.ova", [("A.OVF", b"<x/>"), ("a.mf", b"")])
    not_first = _pack(tmp_path / "b.ova", [("a.mf", b""), ("a.ovf", b"<x/>")])
    raw = tmp_path / "raw.img"
    raw.write_bytes(ova.read_bytes()[:512].replace(b"A.OVF", b"A.OVX"))
    spoiled = tmp_path / "c.ova"
    spoiled.write_bytes(b"X" + ova.read_bytes()[1:])  # the header checksum no longer holds
    assert looks_like_ova(str(ova))
    assert not any(looks_like_ova(str(p)) for p in (not_first, raw, spoiled, tmp_path / "none"))


def test_declared_hardware_and_overrides(tmp_path):
    """The VirtualBox appliance of the corpus as the runtime would boot it."""
    declared = parse_ovf((CORPUS / "ubuntu.2.0.ovf").read_bytes()).to_hardware(
        {"vmdisk1": ("ubuntu.2.0-disk1.qcow2", "qcow2")})
    hw = Overrides().apply(declared)
    assert (hw.cpus, hw.memory, hw.serial) == (1, 512 << 20, True)
    assert [(d.bus, d.format) for d in hw.disks] == [(Bus.SATA, "qcow2")]
    assert [(n.model, n.network) for n in hw.nics] == [(NicModel.E1000, "user")]
    argv = build_command("/usr/bin/qemu-system-x86_64", replace_paths(hw, tmp_path),
                         VmState(tmp_path / "vm"), Accel("tcg", "test"))
    assert any(d.startswith("ide-hd,drive=disk0,bus=ide.0") for d in _option(argv, "-device"))
    assert any(d.startswith("e1000,") for d in _option(argv, "-device"))

    flags = Overrides(cpus=3, memory=1 << 30, machine="pc", disk_bus=Bus.VIRTIO,
                      network="lab", kernel="/k", append="console=ttyS0")
    hw = flags.apply(declared)
    assert (hw.cpus, hw.memory, hw.machine, hw.kernel, hw.append) == \
        (3, 1 << 30, "pc", "/k", "console=ttyS0")
    assert [d.bus for d in hw.disks] == [Bus.VIRTIO]
    assert [(n.model, n.network) for n in hw.nics] == [(NicModel.E1000, "lab")]
    with pytest.raises(Exception, match="--forward needs a NIC on the user network"):
        Overrides(network="none", forwards=("2222:22",)).apply(declared)
    forwarded = Overrides(forwards=("2222:22",)).apply(declared)
    assert forwarded.nics[0].forwards == ("2222:22",)
    # nothing declared at all: a NIC appears only when a network is asked for
    bare = VirtualHardware(disks=(Disk("d.qcow2", "qcow2"),), firmware=Firmware.UEFI)
    assert Overrides().apply(bare).nics == ()
    assert Overrides(network="user").apply(bare).nics == (Nic(network="user"),)
    assert Overrides(cpus=2).apply(bare).firmware is Firmware.UEFI


def replace_paths(hw: VirtualHardware, root: Path) -> VirtualHardware:
    from dataclasses import replace

    return replace(hw, disks=tuple(replace(d, path=str(root / d.path)) for d in hw.disks))


@pytest.mark.vm
def test_corpus_virtualbox_appliance_imports_and_starts(vm_root, tmp_path):
    """The real VirtualBox export of the corpus, packed as an OVA, runs with the hardware
    its OVF declares. Its disk holds no OS (68 KiB of an empty 8 GiB disk), so "boots"
    here means QEMU runs the machine: devices present, disk attached, firmware running."""
    names = ("ubuntu.2.0.ovf", "ubuntu.2.0.mf", "ubuntu.2.0-disk1.vmdk")
    ova = _pack(tmp_path / "ubuntu.ova", [(n, (CORPUS / n).read_bytes()) for n in names])
    vmforge_ok("run", "--detach", "--no-wait", "--name", "vbox1", ova)
    try:
        st = VmState(vm_root / "vbox1")
        status = qmp(str(st.qmp_path), "query-status")
        assert status["running"] and status["status"] == "running"
        buses = qmp(str(st.qmp_path), "query-pci")
        classes = {dev["class_info"].get("desc") for bus in buses for dev in bus["devices"]}
        assert "Ethernet controller" in classes  # the declared E1000
        assert "SATA controller" in classes  # the declared AHCI (the disk's controller)
        blocks = {b["device"] or b["qdev"]: b for b in qmp(str(st.qmp_path), "query-block")}
        disk = next(b for b in blocks.values() if b.get("inserted", {}).get("node-name") == "disk0")
        assert disk["inserted"]["image"]["virtual-size"] == 8 << 30  # the 8 GiB the OVF says
        spec = json.loads(st.spec_path.read_text())
        assert _option(spec["command"], "-m") == ["512M"] and _option(spec["command"], "-smp") == ["1"]
    finally:
        vmforge_ok("vm", "rm", "--force", "vbox1")
    assert not (vm_root / "vbox1").exists() and not qemu_processes(vm_root)
