"""OVF descriptors (DMTF DSP0243 1.x and 2.x): parse into a ``Descriptor``, map to hardware.

References: DMTF DSP0243 "Open Virtualization Format Specification" 1.1.0 and 2.1.1:
section 7 (Envelope, References), 9.1 DiskSection, 9.2 NetworkSection, 9.8
DeploymentOptionSection, 9.9 OperatingSystemSection, 8.3 VirtualHardwareSection and
its Items (CIM_ResourceAllocationSettingData, DSP1043 ResourceType values), annex A
(programmatic units, "byte * 2^30"); 2.x adds StorageItem (CIM_StorageAllocation-
SettingData) and EthernetPortItem (CIM_EthernetPortAllocationSettingData).

A descriptor is hostile input: it is parsed with ``defusedxml`` (no DTD, no entity, no
external reference: SECURITY.md row 24) and only after a size check. The result is a
``Descriptor`` that keeps the OVF-level detail (controllers, drive addresses, empty CD
drives); ``Descriptor.to_hardware()`` maps it to the runtime's ``VirtualHardware``.
Writing is in ``ovf_write``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NoReturn
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from ..errors import CorruptImage, LimitExceeded, UnsupportedFeature, UsageError
from ..model.hardware import Bus, Disk, Firmware, Nic, NicModel, VirtualHardware

#: DSP0243 envelope namespaces by the version we report
OVF_NS = {"1.0": "http://schemas.dmtf.org/ovf/envelope/1",
          "2.0": "http://schemas.dmtf.org/ovf/envelope/2"}
#: the pre-standard namespace of OVF 0.9 (VMware, 2007)
OVF09_NS = "http://www.vmware.com/schema/ovf/1/envelope"
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
RASD_NS = CIM + "CIM_ResourceAllocationSettingData"
VSSD_NS = CIM + "CIM_VirtualSystemSettingData"
SASD_NS = CIM + "CIM_StorageAllocationSettingData"
EPASD_NS = CIM + "CIM_EthernetPortAllocationSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
#: DiskSection ovf:format URIs naming VMDK subformats (VMware's "vmdk.html#...")
VMDK_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#"
STREAM_OPTIMIZED = VMDK_URI + "streamOptimized"

#: a descriptor is a few KiB; 4 MiB bounds memory and parse time on hostile input
MAX_DESCRIPTOR = 4 << 20
#: a sanity bound on a disk's declared capacity (8 EiB would overflow int64 users)
MAX_CAPACITY = 1 << 62

# DSP1043 / CIM_ResourceAllocationSettingData.ResourceType values used here
RT_OTHER = 1
RT_CPU = 3
RT_MEMORY = 4
RT_IDE = 5
RT_SCSI = 6
RT_ETHERNET = 10
RT_FLOPPY = 14
RT_CD = 15
RT_DVD = 16
RT_DISK = 17
RT_OTHER_STORAGE = 20  # SATA (AHCI) and other storage controllers
RT_SERIAL = 21
RT_USB = 23
CONTROLLER_TYPES = {RT_IDE: "ide", RT_SCSI: "scsi", RT_OTHER_STORAGE: "sata"}
DRIVE_TYPES = {RT_DISK: "disk", RT_CD: "cdrom", RT_DVD: "cdrom", RT_FLOPPY: "floppy"}
#: network names that mean "the hypervisor's NAT", which the runtime calls ``user``
NAT_NAMES = ("nat", "vm network")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class FileRef:
    """References/File: a file of the package (``href`` relative to the descriptor)."""

    id: str
    href: str
    size: int | None = None


@dataclass(frozen=True)
class DiskDef:
    """DiskSection/Disk: a virtual disk; ``file_ref`` None means "create it blank"."""

    disk_id: str
    capacity: int
    file_ref: str | None = None
    format: str | None = None
    populated_size: int | None = None

    @property
    def vmdk_subformat(self) -> str | None:
        """``streamOptimized`` etc. when the format URI names a VMDK subformat."""
        if self.format and "vmdk" in self.format.lower() and "#" in self.format:
            return self.format.rsplit("#", 1)[1]
        return None


@dataclass(frozen=True)
class NetworkDef:
    name: str
    description: str = ""


@dataclass(frozen=True)
class Configuration:
    """DeploymentOptionSection/Configuration: one hardware profile."""

    id: str
    label: str = ""
    description: str = ""
    default: bool = False


@dataclass(frozen=True)
class Controller:
    """A storage controller Item (ResourceType 5 IDE, 6 SCSI, 20 SATA/other)."""

    instance_id: str
    kind: str
    subtype: str = ""
    address: str | None = None


@dataclass(frozen=True)
class Drive:
    """A disk, CD/DVD or floppy Item; ``disk_id``/``file_id`` from its HostResource."""

    instance_id: str
    kind: str
    parent: str | None = None
    address_on_parent: str | None = None
    disk_id: str | None = None
    file_id: str | None = None


@dataclass(frozen=True)
class EthernetPort:
    """An Ethernet adapter Item (ResourceType 10); ``mac`` from rasd:Address."""

    instance_id: str
    subtype: str = ""
    connection: str | None = None
    connected: bool = True
    mac: str | None = None


@dataclass(frozen=True)
class Hardware:
    """The resolved VirtualHardwareSection (one deployment configuration)."""

    cpus: int = 0  # 0: not declared (minimal descriptors declare no hardware)
    memory: int = 0
    cores_per_socket: int | None = None
    controllers: tuple[Controller, ...] = ()
    drives: tuple[Drive, ...] = ()
    nics: tuple[EthernetPort, ...] = ()
    serial_ports: int = 0
    system_types: tuple[str, ...] = ()
    firmware: str = "bios"


@dataclass(frozen=True)
class Descriptor:
    """One OVF envelope with one VirtualSystem, its hardware resolved for ``configuration``."""

    version: str
    system_id: str
    name: str | None = None
    os_id: int | None = None
    os_description: str | None = None
    files: tuple[FileRef, ...] = ()
    disks: tuple[DiskDef, ...] = ()
    networks: tuple[NetworkDef, ...] = ()
    configurations: tuple[Configuration, ...] = ()
    configuration: str | None = None
    hardware: Hardware = Hardware()

    def file(self, file_id: str) -> FileRef:
        for f in self.files:
            if f.id == file_id:
                return f
        raise KeyError(file_id)

    def disk(self, disk_id: str) -> DiskDef:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d
        raise KeyError(disk_id)

    def to_hardware(self, paths: dict[str, tuple[str, str]] | None = None) -> VirtualHardware:
        """The runtime's model of this machine.

        ``paths`` maps a DiskSection diskId to the (path, format) of its local copy (an
        import converted it); by default a disk is its package file (href, vmdk). Empty
        CD drives and floppies have no place in ``VirtualHardware`` and are left out.
        Raises UsageError when the hardware is out of the model's range.
        """
        paths = paths or {}
        controllers = {c.instance_id: c for c in self.hardware.controllers}
        disks: list[Disk] = []
        for drive in self.hardware.drives:
            ctrl = controllers.get(drive.parent or "")
            bus = _bus(ctrl)
            if drive.kind == "disk" and drive.disk_id is not None:
                path, fmt = paths.get(drive.disk_id) or _default_path(self, drive.disk_id)
                disks.append(Disk(path=path, format=fmt, bus=bus))
            elif drive.kind == "cdrom" and drive.file_id is not None:
                disks.append(Disk(path=self.file(drive.file_id).href, format="raw", bus=bus,
                                  cdrom=True))
        nics = tuple(Nic(model=nic_model(n.subtype), mac=n.mac.lower() if n.mac else None,
                         network=_runtime_network(n)) for n in self.hardware.nics)
        machine = "pc" if any(t in ("qemu-pc", "vmforge-pc") for t in self.hardware.system_types) \
            else "q35"
        base = VirtualHardware()
        return VirtualHardware(
            cpus=self.hardware.cpus or base.cpus, memory=self.hardware.memory or base.memory,
            disks=tuple(disks), nics=nics,
            firmware=Firmware.UEFI if self.hardware.firmware == "efi" else Firmware.BIOS,
            machine=machine, serial=self.hardware.serial_ports > 0).validate()


def _default_path(desc: Descriptor, disk_id: str) -> tuple[str, str]:
    disk = desc.disk(disk_id)
    if disk.file_ref is None:
        return disk_id, "vmdk"
    return desc.file(disk.file_ref).href, "vmdk"


def _bus(ctrl: Controller | None) -> Bus:
    if ctrl is None:
        return Bus.VIRTIO
    if ctrl.kind == "ide":
        return Bus.IDE
    if ctrl.kind == "scsi":
        return Bus.SCSI
    if "virtio" in ctrl.subtype.lower():
        return Bus.VIRTIO
    return Bus.SATA


def nic_model(subtype: str) -> NicModel:
    """The first ResourceSubType token vmforge can present (E1000 for VMXNET3/PCNet32)."""
    for token in subtype.lower().split():
        if token in ("e1000", "e1000e"):
            return NicModel.E1000
        if token in ("virtio", "virtio-net"):
            return NicModel.VIRTIO
        if token == "rtl8139":
            return NicModel.RTL8139
    # VMXNET3, PCNet32 and friends: the E1000 is the adapter every guest has a driver for
    return NicModel.E1000


def _runtime_network(nic: EthernetPort) -> str:
    if not nic.connected:
        return "none"
    name = nic.connection or ""
    if not name or name.lower() in NAT_NAMES or not _SEGMENT.match(name) or name == "none":
        return "user"
    return name


# --- parsing -------------------------------------------------------------------------

class _Ctx:
    def __init__(self, ns: str, name: str) -> None:
        self.ns = ns
        self.name = name

    def q(self, local: str) -> str:
        return f"{{{self.ns}}}{local}"

    def attr(self, el: Element, local: str, default: str | None = None) -> str | None:
        return el.get(self.q(local), el.get(local, default))

    def need(self, el: Element, local: str) -> str:
        value = self.attr(el, local)
        if value is None or not value.strip():
            self.fail(f"{_local(el.tag)} has no ovf:{local}")
        return value.strip()

    def fail(self, message: str) -> NoReturn:
        raise CorruptImage(f"OVF descriptor: {message}", path=self.name,
                           hint="the descriptor is not valid OVF (DSP0243)")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(el: Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip()


def _child_text(item: Element, local: str) -> str | None:
    """A RASD/SASD/EPASD property by local name: VirtualBox writes the 2.x namespaces
    with a trailing ".xsd", so the namespace of an Item's properties is not checked."""
    for child in item:
        if _local(child.tag) == local:
            return _text(child)
    return None


def parse_units(units: str | None, default: int, what: str) -> int:
    """A DSP0004 programmatic unit ("byte * 2^20") or a legacy name ("MegaBytes") as
    a multiplier. Raises UnsupportedFeature for anything else."""
    if units is None or not units.strip():
        return default
    text = units.strip().lower().replace(" ", "")
    legacy = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20,
              "mb": 1 << 20, "gigabytes": 1 << 30, "gb": 1 << 30, "terabytes": 1 << 40}
    if text in legacy:
        return legacy[text]
    m = re.fullmatch(r"bytes?\*(2|10)\^(\d{1,2})", text)
    if m:
        base, exp = int(m.group(1)), int(m.group(2))
        return int(base**exp)
    raise UnsupportedFeature(f"allocation unit {units!r} for the {what}",
                             hint="DSP0243 units look like 'byte * 2^20'")


def _int(ctx: _Ctx, text: str | None, what: str) -> int:
    if text is None or not re.fullmatch(r"\s*\d{1,20}\s*", text):
        if text is not None and "${" in text:
            raise UnsupportedFeature(f"{what} given by a property ({text})", path=ctx.name)
        ctx.fail(f"{what} {text!r} is not a whole number")
    return int(text)


def parse_ovf(data: bytes, *, name: str = "descriptor", configuration: str | None = None
              ) -> Descriptor:
    """Parse a descriptor; ``configuration`` picks a DeploymentOption (default: the
    section's default). Raises LimitExceeded, UnsupportedFeature (OVF 0.9, DTDs and
    entities, VirtualSystemCollection), CorruptImage (anything not valid OVF)."""
    if len(data) > MAX_DESCRIPTOR:
        raise LimitExceeded(f"OVF descriptor is {len(data)} bytes", path=name,
                            limit=f"{MAX_DESCRIPTOR} bytes")
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as err:
        raise UnsupportedFeature("XML DTDs, entities and external references in OVF",
                                 path=name, detail=type(err).__name__,
                                 hint="a descriptor never needs them; the file may be hostile"
                                 ) from None
    except ParseError as err:
        raise CorruptImage(f"OVF descriptor is not well-formed XML: {err}", path=name) from None
    ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if ns == OVF09_NS:
        raise UnsupportedFeature("OVF 0.9 descriptors", path=name,
                                 hint="re-export the appliance as OVF 1.0 or 2.0 (ovftool does)")
    version = next((v for v, uri in OVF_NS.items() if uri == ns), None)
    if version is None or _local(root.tag) != "Envelope":
        raise CorruptImage("not an OVF descriptor (no DSP0243 Envelope)", path=name,
                           hint="expected an Envelope in the OVF 1.x or 2.x namespace")
    ctx = _Ctx(ns, name)
    files = _references(ctx, root)
    disks = _disk_section(ctx, root, {f.id for f in files})
    networks = tuple(NetworkDef(ctx.need(n, "name"), _text(n.find(ctx.q("Description"))) or "")
                     for s in root.findall(ctx.q("NetworkSection"))
                     for n in s.findall(ctx.q("Network")))
    configs = _configurations(ctx, root)
    if root.find(ctx.q("VirtualSystemCollection")) is not None:
        raise UnsupportedFeature("OVF VirtualSystemCollection (more than one machine)", path=name)
    systems = root.findall(ctx.q("VirtualSystem"))
    if len(systems) != 1:
        ctx.fail(f"expected one VirtualSystem, found {len(systems)}")
    system = systems[0]
    chosen = _choose(ctx, configs, configuration)
    os_section = system.find(ctx.q("OperatingSystemSection"))
    os_id = None
    if os_section is not None and ctx.attr(os_section, "id") is not None:
        os_id = _int(ctx, ctx.attr(os_section, "id"), "OperatingSystemSection ovf:id")
    desc = Descriptor(
        version=version, system_id=ctx.need(system, "id"), name=_text(system.find(ctx.q("Name"))),
        os_id=os_id,
        os_description=_text(os_section.find(ctx.q("Description"))) if os_section is not None
        else None,
        files=files, disks=disks, networks=networks, configurations=configs,
        configuration=chosen)
    sections = system.findall(ctx.q("VirtualHardwareSection"))
    if not sections:
        ctx.fail("the VirtualSystem has no VirtualHardwareSection")
    return replace(desc, hardware=_hardware(ctx, sections[0], desc))


def _references(ctx: _Ctx, root: Element) -> tuple[FileRef, ...]:
    refs = root.find(ctx.q("References"))
    out: list[FileRef] = []
    for f in refs.findall(ctx.q("File")) if refs is not None else ():
        size = ctx.attr(f, "size")
        out.append(FileRef(ctx.need(f, "id"), ctx.need(f, "href"),
                           _int(ctx, size, "File ovf:size") if size is not None else None))
        if ctx.attr(f, "chunkSize") is not None or ctx.attr(f, "compression") not in (None, "identity"):
            raise UnsupportedFeature("chunked or compressed OVF files", path=ctx.name,
                                     detail=out[-1].href)
    ids = [f.id for f in out]
    if len(ids) != len(set(ids)):
        ctx.fail("two References/File entries have the same ovf:id")
    hrefs = [f.href for f in out]
    if len(hrefs) != len(set(hrefs)):
        ctx.fail("two References/File entries name the same href")
    return tuple(out)


def _disk_section(ctx: _Ctx, root: Element, file_ids: set[str]) -> tuple[DiskDef, ...]:
    out: list[DiskDef] = []
    for section in root.findall(ctx.q("DiskSection")):
        for d in section.findall(ctx.q("Disk")):
            disk_id = ctx.need(d, "diskId")
            unit = parse_units(ctx.attr(d, "capacityAllocationUnits"), 1, f"disk {disk_id}")
            capacity = _int(ctx, ctx.attr(d, "capacity"), f"disk {disk_id} capacity") * unit
            if not 0 < capacity <= MAX_CAPACITY:
                raise LimitExceeded(f"disk {disk_id} capacity {capacity} is out of range",
                                    path=ctx.name, limit=f"1..{MAX_CAPACITY} bytes")
            file_ref = ctx.attr(d, "fileRef")
            if file_ref is not None and file_ref not in file_ids:
                ctx.fail(f"disk {disk_id} names file {file_ref!r}, which References lacks")
            populated = ctx.attr(d, "populatedSize")
            out.append(DiskDef(disk_id, capacity, file_ref, ctx.attr(d, "format"),
                               _int(ctx, populated, "populatedSize") if populated else None))
    if len({d.disk_id for d in out}) != len(out):
        ctx.fail("two DiskSection/Disk entries have the same ovf:diskId")
    return tuple(out)


def _configurations(ctx: _Ctx, root: Element) -> tuple[Configuration, ...]:
    section = root.find(ctx.q("DeploymentOptionSection"))
    if section is None:
        return ()
    out = tuple(Configuration(ctx.need(c, "id"), _text(c.find(ctx.q("Label"))) or "",
                              _text(c.find(ctx.q("Description"))) or "",
                              (ctx.attr(c, "default") or "").lower() == "true")
                for c in section.findall(ctx.q("Configuration")))
    if len({c.id for c in out}) != len(out):
        ctx.fail("two deployment configurations have the same ovf:id")
    return out


def _choose(ctx: _Ctx, configs: tuple[Configuration, ...], wanted: str | None) -> str | None:
    if wanted is not None:
        if wanted not in {c.id for c in configs}:
            choices = ", ".join(c.id for c in configs) or "none (no DeploymentOptionSection)"
            raise UsageError(f"{ctx.name}: no deployment configuration {wanted!r}",
                             hint=f"choose one of: {choices}")
        return wanted
    # DSP0243 9.8: without an ovf:default the first Configuration is the default
    return next((c.id for c in configs if c.default), configs[0].id if configs else None)


def _items(ctx: _Ctx, section: Element, chosen: str | None) -> list[tuple[int, Element]]:
    """(ResourceType, Item) for the chosen configuration: an Item with ovf:configuration
    applies only to those it lists, and overrides the plain Item of the same InstanceID."""
    picked: dict[str, tuple[bool, int, Element]] = {}
    order: list[str] = []
    for item in section:
        if _local(item.tag) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        scope = ctx.attr(item, "configuration")
        if scope is not None and (chosen is None or chosen not in scope.split()):
            continue
        iid = _child_text(item, "InstanceID") or _child_text(item, "InstanceId")
        if not iid:
            ctx.fail("a hardware Item has no InstanceID")
        rtype = _int(ctx, _child_text(item, "ResourceType"), f"Item {iid} ResourceType")
        assert iid is not None
        if iid in picked:
            if picked[iid][0] and scope is not None:
                ctx.fail(f"two Items with InstanceID {iid} apply to configuration {chosen}")
            if scope is None:
                if not picked[iid][0]:
                    ctx.fail(f"two Items have InstanceID {iid}")
                continue  # a configuration-specific Item already replaced this one
        else:
            order.append(iid)
        picked[iid] = (scope is not None, rtype, item)
    return [(picked[i][1], picked[i][2]) for i in order]


def _hardware(ctx: _Ctx, section: Element, desc: Descriptor) -> Hardware:
    cpus, memory, cores, serial = 0, 0, None, 0
    controllers: list[Controller] = []
    drives: list[Drive] = []
    nics: list[EthernetPort] = []
    items = _items(ctx, section, desc.configuration)
    for rtype, item in items:
        iid = _child_text(item, "InstanceID") or _child_text(item, "InstanceId") or ""
        if rtype == RT_CPU:
            cpus = _int(ctx, _child_text(item, "VirtualQuantity"), "CPU VirtualQuantity")
            cps = next((_text(c) for c in item if _local(c.tag) == "CoresPerSocket"), None)
            cores = _int(ctx, cps, "CoresPerSocket") if cps else None
        elif rtype == RT_MEMORY:
            # VMware and VirtualBox readers take memory without units as MiB
            unit = parse_units(_child_text(item, "AllocationUnits"), 1 << 20, "memory")
            memory = _int(ctx, _child_text(item, "VirtualQuantity"), "memory VirtualQuantity") * unit
        elif rtype in CONTROLLER_TYPES:
            controllers.append(Controller(iid, CONTROLLER_TYPES[rtype],
                                          _child_text(item, "ResourceSubType") or "",
                                          _child_text(item, "Address")))
        elif rtype in DRIVE_TYPES:
            drives.append(_drive(ctx, item, iid, DRIVE_TYPES[rtype], desc))
        elif rtype == RT_ETHERNET:
            auto = (_child_text(item, "AutomaticAllocation") or "true").lower()
            nics.append(EthernetPort(iid, _child_text(item, "ResourceSubType") or "",
                                     _child_text(item, "Connection"), auto != "false",
                                     _mac(_child_text(item, "Address"))))
        elif rtype == RT_SERIAL:
            serial += 1
    ctrl_ids = {c.instance_id for c in controllers}
    for drive in drives:
        if drive.parent is not None and drive.parent not in ctrl_ids:
            ctx.fail(f"drive Item {drive.instance_id} names parent {drive.parent}, "
                     "which is not a storage controller")
    firmware = "bios"
    for cfg in section.findall(f"{{{VMW_NS}}}Config"):
        if cfg.get(f"{{{VMW_NS}}}key") == "firmware":
            firmware = (cfg.get(f"{{{VMW_NS}}}value") or "bios").lower()
    system = section.find(ctx.q("System"))
    types = (_child_text(system, "VirtualSystemType") or "").split() if system is not None else []
    return Hardware(cpus=cpus, memory=memory, cores_per_socket=cores,
                    controllers=tuple(controllers), drives=tuple(drives), nics=tuple(nics),
                    serial_ports=serial, system_types=tuple(types),
                    firmware="efi" if firmware == "efi" else "bios")


def _drive(ctx: _Ctx, item: Element, iid: str, kind: str, desc: Descriptor) -> Drive:
    host = _child_text(item, "HostResource")
    disk_id = file_id = None
    if host:
        # "ovf:/disk/ID" (DSP0243 9.1), also written "/disk/ID" by VirtualBox
        m = re.fullmatch(r"(?:ovf:)?/(disk|file)/(.+)", host)
        if m is None:
            ctx.fail(f"drive Item {iid}: HostResource {host!r} is not ovf:/disk/ID or ovf:/file/ID")
        if m.group(1) == "disk":
            disk_id = m.group(2)
            if disk_id not in {d.disk_id for d in desc.disks}:
                ctx.fail(f"drive Item {iid} names disk {disk_id!r}, which DiskSection lacks")
        else:
            file_id = m.group(2)
            if file_id not in {f.id for f in desc.files}:
                ctx.fail(f"drive Item {iid} names file {file_id!r}, which References lacks")
    return Drive(iid, kind, _child_text(item, "Parent"), _child_text(item, "AddressOnParent"),
                 disk_id, file_id)


def _mac(text: str | None) -> str | None:
    """rasd:Address of a NIC is its MAC, written with ':' or '-' or not separated."""
    if not text:
        return None
    digits = re.sub(r"[:-]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{12}", digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))
