"""OVF descriptors: the real ones in the corpus, round trips, and hostile XML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vmforge.errors import CorruptImage, LimitExceeded, UnsupportedFeature, UsageError
from vmforge.model.hardware import Bus, Disk, Firmware, Nic, NicModel, VirtualHardware
from vmforge.packages.ovf import MAX_DESCRIPTOR, STREAM_OPTIMIZED, parse_ovf
from vmforge.packages.ovf_write import descriptor_from_hardware, write_ovf

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "ovf"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus/ovf")
GIB, MIB = 1 << 30, 1 << 20


def load(name: str, configuration: str | None = None):  # type: ignore[no-untyped-def]
    return parse_ovf((CORPUS / name).read_bytes(), name=name, configuration=configuration)


def test_virtualbox_ovf2_hardware() -> None:
    d = load("ubuntu.2.0.ovf")
    assert d.version == "2.0" and d.system_id == "ubuntu"
    hw = d.hardware
    assert (hw.cpus, hw.memory) == (1, 512 * MIB)
    assert [(c.kind, c.subtype) for c in hw.controllers] == \
        [("ide", "PIIX4"), ("ide", "PIIX4"), ("sata", "AHCI")]
    ctrl = {c.instance_id: c for c in hw.controllers}
    disk, cd = hw.drives
    assert disk.kind == "disk" and ctrl[disk.parent].kind == "sata" and disk.address_on_parent == "0"
    assert d.disk(disk.disk_id).capacity == 8 * GIB
    assert d.disk(disk.disk_id).vmdk_subformat == "streamOptimized"
    assert d.file(d.disk(disk.disk_id).file_ref).href == "ubuntu.2.0-disk1.vmdk"
    assert cd.kind == "cdrom" and ctrl[cd.parent].address == "1" and cd.file_id is None
    assert [(n.subtype, n.connection) for n in hw.nics] == [("E1000", "NAT")]
    assert [n.name for n in d.networks] == ["NAT"]
    assert d.to_hardware() == VirtualHardware(
        cpus=1, memory=512 * MIB, serial=False,
        disks=(Disk("ubuntu.2.0-disk1.vmdk", "vmdk", Bus.SATA),),
        nics=(Nic(NicModel.E1000, None, "user"),))


def test_vmware_ovf1_hardware() -> None:
    d = load("vmware.ovf")
    hw = d.hardware
    assert d.version == "1.0"
    assert (hw.cpus, hw.cores_per_socket, hw.memory) == (2, 2, 1536 * MIB)
    assert sorted(c.kind for c in hw.controllers) == ["ide", "ide", "scsi"]
    scsi = next(c for c in hw.controllers if c.kind == "scsi")
    assert "lsilogic" in scsi.subtype.split()
    (disk,) = hw.drives
    assert disk.parent == scsi.instance_id
    assert d.disk(disk.disk_id).capacity == 1 * GIB
    assert d.disk(disk.disk_id).format == STREAM_OPTIMIZED
    assert [(n.subtype, n.connection) for n in hw.nics] == [("E1000", "lanethernet0")] * 4
    assert hw.firmware == "bios"
    vh = d.to_hardware()
    assert vh.disks == (Disk("input.vmdk", "vmdk", Bus.SCSI),)
    assert [n.network for n in vh.nics] == ["lanethernet0"] * 4


@pytest.mark.parametrize("config,cpus,memory", [
    (None, 1, 4096), ("1CPU-4GB", 1, 4096), ("2CPU-4GB", 2, 4096), ("4CPU-4GB", 4, 4096),
    ("4CPU-8GB", 4, 8192)])
def test_csr1000v_deployment_options(config: str | None, cpus: int, memory: int) -> None:
    d = load("csr1000v.ovf", config)
    assert [c.id for c in d.configurations] == ["1CPU-4GB", "2CPU-4GB", "4CPU-4GB", "4CPU-8GB"]
    assert d.configuration == (config or "1CPU-4GB")
    assert (d.hardware.cpus, d.hardware.memory) == (cpus, memory * MIB)
    assert len(d.hardware.nics) == 3 and d.hardware.serial_ports == 2
    cds = [x for x in d.hardware.drives if x.kind == "cdrom"]
    assert [c.file_id for c in cds] == ["csr1000v.iso", None]
    vh = d.to_hardware()
    assert vh.disks[1] == Disk("input.iso", "raw", Bus.IDE, cdrom=True)
    assert {n.model for n in vh.nics} == {NicModel.VIRTIO}  # "VMXNET3 virtio": the one we have


@pytest.mark.parametrize("config,memory,nics", [
    (None, 384 * MIB, 2), ("1CPU-1GB-8NIC", GIB, 8), ("1CPU-3GB-10NIC", 3 * GIB, 10),
    ("1CPU-3GB-16NIC", 3 * GIB, 16)])
def test_iosv_deployment_options(config: str | None, memory: int, nics: int) -> None:
    d = load("iosv.ovf", config)
    assert (d.hardware.memory, len(d.hardware.nics)) == (memory, nics)
    blank = d.disk("flash2")
    assert blank.file_ref is None and blank.capacity == 128 * MIB


def test_unknown_configuration_refused() -> None:
    with pytest.raises(UsageError, match="no deployment configuration"):
        load("csr1000v.ovf", "8CPU")


def test_minimal_has_no_hardware() -> None:
    d = load("minimal.ovf")
    assert d.hardware.cpus == 0 and not d.hardware.drives and not d.files
    assert d.to_hardware().disks == ()


def test_invalid_refused() -> None:
    with pytest.raises(CorruptImage, match="OVF descriptor"):
        load("invalid.ovf")


def test_ovf09_refused_clearly() -> None:
    with pytest.raises(UnsupportedFeature, match="OVF 0.9"):
        load("v0.9.ovf")


@pytest.mark.parametrize("name", ["ubuntu.2.0.ovf", "vmware.ovf", "csr1000v.ovf", "iosv.ovf",
                                  "minimal.ovf"])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_descriptor_round_trip(name: str, version: str) -> None:
    """parse -> write -> parse keeps everything but the deployment options (a written
    descriptor is the resolved profile)."""
    d = dataclasses.replace(load(name), configurations=(), configuration=None, version=version)
    again = parse_ovf(write_ovf(d))
    assert again == d
    assert again.to_hardware() == d.to_hardware()


def _hardware_matrix() -> list[VirtualHardware]:
    out = []
    for i, (bus, nic, fw, machine) in enumerate([
            (Bus.SCSI, NicModel.E1000, Firmware.BIOS, "q35"),
            (Bus.SATA, NicModel.VIRTIO, Firmware.UEFI, "pc"),
            (Bus.IDE, NicModel.RTL8139, Firmware.BIOS, "pc"),
            (Bus.VIRTIO, NicModel.E1000, Firmware.UEFI, "q35")]):
        disks = tuple(Disk(f"d{j}.vmdk", "vmdk", bus) for j in range(1 + i % 3))
        disks += (Disk("boot.iso", "raw", Bus.IDE, cdrom=True),) if i % 2 else ()
        nics = (Nic(nic, f"52:54:00:12:34:5{i}", "user"), Nic(NicModel.E1000, None, "seg-a"),
                Nic(nic, None, "none"))[: 1 + i % 3]
        out.append(VirtualHardware(cpus=1 + i, memory=(256 << i) * MIB, disks=disks, nics=nics,
                                   firmware=fw, machine=machine, serial=bool(i % 2)))
    return out


@pytest.mark.parametrize("hw", _hardware_matrix(), ids=lambda h: f"{h.cpus}cpu")
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_hardware_round_trip(hw: VirtualHardware, version: str) -> None:
    caps = {d.path: (1 + i) * GIB for i, d in enumerate(hw.disks)}
    desc = descriptor_from_hardware(hw, version=version, name="rt", capacities=caps)
    xml = write_ovf(desc)
    back = parse_ovf(xml)
    assert back == desc
    assert back.to_hardware() == hw
    assert {d.disk_id: d.capacity for d in back.disks} == \
        {f"vmdisk{i}": caps[d.path] for i, d in enumerate(hw.disks, 1) if not d.cdrom}


def test_what_ovf_cannot_carry_is_refused() -> None:
    hw = VirtualHardware(kernel="/boot/vmlinuz")
    with pytest.raises(UsageError, match="kernel"):
        descriptor_from_hardware(hw, capacities={})
    hw = VirtualHardware(disks=(Disk("d.qcow2", "qcow2"),))
    with pytest.raises(UnsupportedFeature, match="qcow2"):
        descriptor_from_hardware(hw, capacities={"d.qcow2": GIB})
    hw = VirtualHardware(disks=(Disk("/abs/d.vmdk", "vmdk"),))
    with pytest.raises(UsageError, match="plain file name"):
        descriptor_from_hardware(hw, capacities={"/abs/d.vmdk": GIB})


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References>&lol4;</References></Envelope>
"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References>&x;</References></Envelope>
"""
DTD_ONLY = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope SYSTEM "http://example.invalid/ovf.dtd">
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>
"""


@pytest.mark.parametrize("data", [BILLION_LAUGHS, EXTERNAL, DTD_ONLY], ids=["laughs", "xxe", "dtd"])
def test_hostile_xml_refused(data: bytes) -> None:
    with pytest.raises(UnsupportedFeature, match="DTDs, entities"):
        parse_ovf(data)


@pytest.mark.parametrize("data,match", [
    (b"<Envelope", "not well-formed"),
    (b"<Envelope xmlns='urn:other'/>", "not an OVF descriptor"),
    (b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'/>", "one VirtualSystem"),
])
def test_malformed_refused(data: bytes, match: str) -> None:
    with pytest.raises(CorruptImage, match=match):
        parse_ovf(data)


def test_size_cap() -> None:
    with pytest.raises(LimitExceeded):
        parse_ovf(b" " * (MAX_DESCRIPTOR + 1))


def test_capacity_units_and_overflow() -> None:
    base = (CORPUS / "vmware.ovf").read_bytes()
    d = parse_ovf(base.replace(b'ovf:capacityAllocationUnits="byte * 2^30"',
                               b'ovf:capacityAllocationUnits="byte * 2^20"'))
    assert d.disks[0].capacity == MIB
    with pytest.raises(LimitExceeded):
        parse_ovf(base.replace(b'ovf:capacity="1"', b'ovf:capacity="99999999999999999999"'))
    with pytest.raises(UnsupportedFeature, match="allocation unit"):
        parse_ovf(base.replace(b'"byte * 2^30"', b'"furlongs"'))
