"""Writing OVF 1.0 and 2.0 descriptors, and building one from ``VirtualHardware``.

References: DMTF DSP0243 1.1.0 / 2.1.1 (see ovf.py). What is written is the resolved
hardware of one configuration: Items carry no ovf:configuration and no
DeploymentOptionSection is written. Every Item uses the CIM RASD namespace (valid in
both versions; 2.x's StorageItem/EthernetPortItem are read but not needed to write).
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from ..errors import UnsupportedFeature, UsageError
from ..model.hardware import Bus, Firmware, NicModel, VirtualHardware
from .ovf import (
    NAT_NAMES,
    OVF_NS,
    RASD_NS,
    RT_CD,
    RT_CPU,
    RT_DISK,
    RT_ETHERNET,
    RT_FLOPPY,
    RT_IDE,
    RT_MEMORY,
    RT_OTHER_STORAGE,
    RT_SCSI,
    RT_SERIAL,
    STREAM_OPTIMIZED,
    VMDK_URI,
    VMW_NS,
    VSSD_NS,
    Controller,
    Descriptor,
    DiskDef,
    Drive,
    EthernetPort,
    FileRef,
    Hardware,
    NetworkDef,
)

_CTRL_RT = {"ide": RT_IDE, "scsi": RT_SCSI, "sata": RT_OTHER_STORAGE}
_DRIVE_RT = {"disk": RT_DISK, "cdrom": RT_CD, "floppy": RT_FLOPPY}
_NIC_SUBTYPE = {NicModel.E1000: "E1000", NicModel.VIRTIO: "virtio", NicModel.RTL8139: "RTL8139"}
#: the network a NIC on the runtime's ``user`` (NAT) network is written on
NAT_NETWORK = "NAT"


class _Xml:
    """A tiny serializer: elements as (prefix, name), namespaces declared once on the root."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def open(self, tag: str, attrs: dict[str, str] | None = None, *, empty: bool = False) -> None:
        text = "".join(f" {k}={quoteattr(v)}" for k, v in (attrs or {}).items())
        self.lines.append("  " * self.depth + f"<{tag}{text}{'/' if empty else ''}>")
        if not empty:
            self.depth += 1

    def close(self, tag: str) -> None:
        self.depth -= 1
        self.lines.append("  " * self.depth + f"</{tag}>")

    def leaf(self, tag: str, text: str, attrs: dict[str, str] | None = None) -> None:
        extra = "".join(f" {k}={quoteattr(v)}" for k, v in (attrs or {}).items())
        self.lines.append("  " * self.depth + f"<{tag}{extra}>{escape(text)}</{tag}>")


def write_ovf(desc: Descriptor) -> bytes:
    """The descriptor as UTF-8 XML in its version's namespace."""
    if desc.version not in OVF_NS:
        raise UsageError(f"cannot write OVF version {desc.version}", hint="use 1.0 or 2.0")
    x = _Xml()
    x.lines.append('<?xml version="1.0" encoding="UTF-8"?>')
    ns = OVF_NS[desc.version]
    x.open("ovf:Envelope", {"ovf:version": desc.version, "xmlns": ns, "xmlns:ovf": ns,
                            "xmlns:rasd": RASD_NS, "xmlns:vssd": VSSD_NS, "xmlns:vmw": VMW_NS})
    x.open("ovf:References")
    for f in desc.files:
        attrs = {"ovf:href": f.href, "ovf:id": f.id}
        if f.size is not None:
            attrs["ovf:size"] = str(f.size)
        x.open("ovf:File", attrs, empty=True)
    x.close("ovf:References")
    if desc.disks:
        x.open("ovf:DiskSection")
        x.leaf("ovf:Info", "Virtual disk information")
        for d in desc.disks:
            attrs = {"ovf:capacity": str(d.capacity), "ovf:capacityAllocationUnits": "byte",
                     "ovf:diskId": d.disk_id}
            if d.file_ref is not None:
                attrs["ovf:fileRef"] = d.file_ref
            if d.format is not None:
                attrs["ovf:format"] = d.format
            if d.populated_size is not None:
                attrs["ovf:populatedSize"] = str(d.populated_size)
            x.open("ovf:Disk", attrs, empty=True)
        x.close("ovf:DiskSection")
    if desc.networks:
        x.open("ovf:NetworkSection")
        x.leaf("ovf:Info", "The list of logical networks")
        for n in desc.networks:
            x.open("ovf:Network", {"ovf:name": n.name})
            x.leaf("ovf:Description", n.description)
            x.close("ovf:Network")
        x.close("ovf:NetworkSection")
    x.open("ovf:VirtualSystem", {"ovf:id": desc.system_id})
    x.leaf("ovf:Info", "A virtual machine")
    if desc.name is not None:
        x.leaf("ovf:Name", desc.name)
    if desc.os_id is not None:
        x.open("ovf:OperatingSystemSection", {"ovf:id": str(desc.os_id)})
        x.leaf("ovf:Info", "The kind of installed guest operating system")
        if desc.os_description is not None:
            x.leaf("ovf:Description", desc.os_description)
        x.close("ovf:OperatingSystemSection")
    _hardware(x, desc)
    x.close("ovf:VirtualSystem")
    x.close("ovf:Envelope")
    return ("\n".join(x.lines) + "\n").encode()


def _item(x: _Xml, iid: str, rtype: int, props: list[tuple[str, str | None]],
          extra: list[tuple[str, dict[str, str], str]] | None = None) -> None:
    x.open("ovf:Item")
    # rasd properties in the schema's (alphabetical) order, as the XSD sequence wants
    values = dict(props, InstanceID=iid, ResourceType=str(rtype))
    for key in sorted(values):
        if values[key] is not None:
            x.leaf(f"rasd:{key}", values[key] or "")
    for tag, attrs, text in extra or ():
        x.leaf(tag, text, attrs)
    x.close("ovf:Item")


def _hardware(x: _Xml, desc: Descriptor) -> None:
    hw = desc.hardware
    x.open("ovf:VirtualHardwareSection")
    x.leaf("ovf:Info", "Virtual hardware requirements")
    x.open("ovf:System")
    x.leaf("vssd:ElementName", "Virtual Hardware Family")
    x.leaf("vssd:InstanceID", "0")
    x.leaf("vssd:VirtualSystemIdentifier", desc.system_id)
    if hw.system_types:
        x.leaf("vssd:VirtualSystemType", " ".join(hw.system_types))
    x.close("ovf:System")
    cores = [("vmw:CoresPerSocket", {"ovf:required": "false"}, str(hw.cores_per_socket))] \
        if hw.cores_per_socket is not None else None
    if hw.cpus:
        _item(x, "1", RT_CPU, [("AllocationUnits", "hertz * 10^6"),
                               ("Description", "Number of Virtual CPUs"),
                               ("ElementName", f"{hw.cpus} virtual CPU(s)"),
                               ("VirtualQuantity", str(hw.cpus))], cores)
    if hw.memory:
        if hw.memory % (1 << 20):
            raise UsageError(f"memory size {hw.memory} is not a whole number of MiB")
        _item(x, "2", RT_MEMORY, [("AllocationUnits", "byte * 2^20"),
                                  ("Description", "Memory Size"),
                                  ("ElementName", f"{hw.memory >> 20}MB of memory"),
                                  ("VirtualQuantity", str(hw.memory >> 20))])
    for c in hw.controllers:
        _item(x, c.instance_id, _CTRL_RT[c.kind],
              [("Address", c.address), ("ElementName", f"{c.kind.upper()} controller"),
               ("ResourceSubType", c.subtype or None)])
    for d in hw.drives:
        host = f"ovf:/disk/{d.disk_id}" if d.disk_id else \
            (f"ovf:/file/{d.file_id}" if d.file_id else None)
        _item(x, d.instance_id, _DRIVE_RT[d.kind],
              [("AddressOnParent", d.address_on_parent), ("ElementName", d.kind),
               ("HostResource", host), ("Parent", d.parent)])
    for n in hw.nics:
        _item(x, n.instance_id, RT_ETHERNET,
              [("Address", n.mac), ("AutomaticAllocation", "true" if n.connected else "false"),
               ("Connection", n.connection), ("ElementName", f"Ethernet adapter {n.instance_id}"),
               ("ResourceSubType", n.subtype or None)])
    first = 3 + len(hw.controllers) + len(hw.drives) + len(hw.nics)
    taken = {"1", "2"} | {c.instance_id for c in hw.controllers} | \
        {d.instance_id for d in hw.drives} | {n.instance_id for n in hw.nics}
    for i in range(hw.serial_ports):
        iid = str(first + i)
        while iid in taken:
            iid = str(int(iid) + 1)
        taken.add(iid)
        _item(x, iid, RT_SERIAL, [("ElementName", f"Serial port {i + 1}")])
    if hw.firmware == "efi":
        # VMware's key; DSP0243 itself has no firmware field
        x.open("vmw:Config", {"ovf:required": "false", "vmw:key": "firmware", "vmw:value": "efi"},
               empty=True)
    x.close("ovf:VirtualHardwareSection")


def format_uri(fmt: str, subformat: str = "streamOptimized") -> str:
    """The DiskSection ovf:format for a disk file; only VMDK has a registered URI."""
    if fmt != "vmdk":
        raise UnsupportedFeature(f"{fmt} disks in an OVF descriptor",
                                 hint="OVF packages carry VMDK disks: convert to vmdk first")
    return STREAM_OPTIMIZED if subformat == "streamOptimized" else VMDK_URI + subformat


def descriptor_from_hardware(hw: VirtualHardware, *, version: str = "1.0", name: str = "vm",
                             capacities: dict[str, int], file_sizes: dict[str, int] | None = None,
                             os_id: int | None = None) -> Descriptor:
    """The descriptor of ``hw``: each disk's ``path`` becomes its package file name.

    ``capacities`` maps every non-CD disk path to its virtual size in bytes. Raises
    UsageError for what OVF cannot carry (direct kernel boot, extra settings, a path
    that is not a plain file name) and UnsupportedFeature for non-VMDK disks.
    """
    hw.validate()
    if hw.kernel or hw.initrd or hw.append or hw.extra:
        raise UsageError("a direct kernel boot (--kernel/--initrd/--append) or extra settings "
                         "cannot be carried in an OVF descriptor",
                         hint="boot from the disk's own boot loader")
    file_sizes = file_sizes or {}
    files: list[FileRef] = []
    disks: list[DiskDef] = []
    drives: list[Drive] = []
    controllers: dict[Bus, list[Controller]] = {}
    used: dict[str, int] = {}
    next_id = 3

    def new_id() -> str:
        nonlocal next_id
        next_id += 1
        return str(next_id - 1)

    def slot(bus: Bus) -> tuple[str, str]:
        """(controller InstanceID, AddressOnParent) of the next free slot on ``bus``."""
        kind = {Bus.IDE: "ide", Bus.SCSI: "scsi", Bus.SATA: "sata", Bus.VIRTIO: "sata"}[bus]
        subtype = {Bus.IDE: "PIIX4", Bus.SCSI: "lsilogic", Bus.SATA: "AHCI",
                   Bus.VIRTIO: "virtio"}[bus]
        ctrls = controllers.setdefault(bus, [])
        per = {Bus.IDE: 2, Bus.SCSI: 15, Bus.SATA: 30, Bus.VIRTIO: 30}[bus]
        n = used.get(bus.value, 0)
        used[bus.value] = n + 1
        if n // per >= (2 if bus is Bus.IDE else 1):
            raise UsageError(f"too many {bus.value} devices for one OVF machine")
        if len(ctrls) <= n // per:
            ctrls.append(Controller(new_id(), kind, subtype, str(len(ctrls))))
        port = n % per
        if bus is Bus.SCSI and port >= 7:  # SCSI unit 7 is the controller's own
            port += 1
        return ctrls[n // per].instance_id, str(port)

    for i, disk in enumerate(hw.disks, 1):
        if "/" in disk.path or "\\" in disk.path or disk.path in ("", ".", ".."):
            raise UsageError(f"disk path {disk.path!r} is not a plain file name",
                             hint="an OVF href names a file beside the descriptor")
        fid = f"file{i}"
        files.append(FileRef(fid, disk.path, file_sizes.get(disk.path)))
        parent, address = slot(disk.bus)
        if disk.cdrom:
            if disk.format != "raw":
                raise UnsupportedFeature(f"a {disk.format} CD image in an OVF descriptor",
                                         hint="CD images are ISO (raw) files")
            drives.append(Drive(new_id(), "cdrom", parent, address, None, fid))
            continue
        if disk.path not in capacities:
            raise UsageError(f"the capacity of disk {disk.path} is not known")
        did = f"vmdisk{i}"
        disks.append(DiskDef(did, capacities[disk.path], fid, format_uri(disk.format)))
        drives.append(Drive(new_id(), "disk", parent, address, did, None))
    networks: list[NetworkDef] = []
    nics: list[EthernetPort] = []
    for nic in hw.nics:
        net = NAT_NETWORK if nic.network in ("user", "none") else nic.network
        if net.lower() in NAT_NAMES and net != NAT_NETWORK:
            net = NAT_NETWORK
        if net not in {n.name for n in networks}:
            networks.append(NetworkDef(net, f"The {net} network"))
        nics.append(EthernetPort(new_id(), _NIC_SUBTYPE[nic.model], net, nic.network != "none",
                                 nic.mac))
    all_ctrls = sorted((c for cs in controllers.values() for c in cs), key=lambda c: int(c.instance_id))
    types = ("vmx-10",) if hw.machine == "q35" else ("vmx-10", "qemu-pc")
    hardware = Hardware(cpus=hw.cpus, memory=hw.memory, controllers=tuple(all_ctrls),
                        drives=tuple(drives), nics=tuple(nics), serial_ports=1 if hw.serial else 0,
                        system_types=types,
                        firmware="efi" if hw.firmware is Firmware.UEFI else "bios")
    return Descriptor(version=version, system_id=name, name=name, os_id=os_id,
                      files=tuple(files), disks=tuple(disks), networks=tuple(networks),
                      hardware=hardware)
