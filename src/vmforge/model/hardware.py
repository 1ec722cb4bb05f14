"""The virtual hardware of one machine, as pure data.

This is the model both ends map to: ``runtime/`` turns it into a QEMU command line and
the OVF package code maps a VirtualHardwareSection to and from it. It holds no paths
that are opened here and starts nothing; ``validate()`` checks what can be checked
without the host (counts, sizes, MAC syntax, that every disk names its format).

The JSON form (``to_dict``/``from_dict``) is what a VM's state directory stores.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum, StrEnum
from typing import Any

from ..errors import UsageError
from .sizes import human_size, parse_size


class Bus(StrEnum):
    """How a disk is attached (OVF: the controller's ResourceType)."""

    VIRTIO = "virtio"
    SATA = "sata"
    IDE = "ide"
    SCSI = "scsi"


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class NicModel(StrEnum):
    """Ethernet devices every hypervisor we export to can present."""

    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


#: QEMU q35/pc accept up to 255 vCPUs without an IOMMU for x2APIC interrupt remapping
MAX_CPUS = 255
MIN_MEMORY = 16 << 20
#: a sanity bound for a typo ("64T"), far above what any host here has
MAX_MEMORY = 4 << 40
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MACHINE_TYPES = ("q35", "pc")


def _enum(cls: type[Enum], value: object, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in cls)
        raise UsageError(f"unknown {what} {value!r}", hint=f"choose one of: {choices}") from None


def parse_memory(text: str | int) -> int:
    """``"512M"`` -> bytes; a whole number of MiB between 16 MiB and 4 TiB.

    A bare number is MiB, as in QEMU's ``-m``. Raises UsageError.
    """
    if isinstance(text, str) and text.strip().isdigit():
        text = text.strip() + "M"
    try:
        value = parse_size(text)
    except UsageError:
        raise UsageError(f"unknown memory size {text!r}",
                         hint="use a size such as 512M or 2G") from None
    if value % (1 << 20) or not MIN_MEMORY <= value <= MAX_MEMORY:
        raise UsageError(f"memory size {text!r} is out of range",
                         hint=f"a whole number of MiB from {human_size(MIN_MEMORY)} to "
                              f"{human_size(MAX_MEMORY)}")
    return value


def parse_cpus(text: str | int) -> int:
    """A vCPU count 1..MAX_CPUS. Raises UsageError."""
    try:
        value = int(str(text).strip(), 10)
    except ValueError:
        raise UsageError(f"unknown CPU count {text!r}", hint="use a whole number such as 2") from None
    if not 1 <= value <= MAX_CPUS:
        raise UsageError(f"CPU count {value} is out of range", hint=f"use 1 to {MAX_CPUS}")
    return value


def parse_forward(text: str) -> tuple[int, int]:
    """``"HOST:GUEST"`` TCP ports -> (host, guest). Raises UsageError."""
    host, sep, guest = text.partition(":")
    try:
        ports = (int(host, 10), int(guest, 10)) if sep else None
    except ValueError:
        ports = None
    if ports is None or not all(0 < p < 65536 for p in ports):
        raise UsageError(f"invalid port forward {text!r}", hint="use HOST:GUEST, e.g. 2222:22")
    return ports


@dataclass(frozen=True)
class Disk:
    """One disk. ``format`` is always explicit: a guest-written header never changes it."""

    path: str
    format: str
    bus: Bus = Bus.VIRTIO
    readonly: bool = False
    cdrom: bool = False

    def validate(self) -> None:
        if not self.path:
            raise UsageError("a disk needs a path")
        if not self.format:
            raise UsageError(f"disk {self.path}: the format must be stated explicitly")


@dataclass(frozen=True)
class Nic:
    """One network interface. ``network`` is ``user`` (NAT), ``none``, or a segment name."""

    model: NicModel = NicModel.VIRTIO
    mac: str | None = None
    network: str = "user"
    #: user-mode NAT port forwards "HOST:GUEST" (TCP; the host side listens on loopback)
    forwards: tuple[str, ...] = ()

    def validate(self) -> None:
        for fwd in self.forwards:
            parse_forward(fwd)
        if self.forwards and self.network != "user":
            raise UsageError("port forwards need the user-mode network (--net user)")
        if self.mac is not None:
            mac = self.mac.lower()
            if not _MAC.match(mac):
                raise UsageError(f"invalid MAC address {self.mac!r}", hint="use 52:54:00:xx:xx:xx")
            if int(mac[:2], 16) & 1:  # the I/G bit: a multicast address cannot be a NIC's
                raise UsageError(f"MAC address {self.mac} is a multicast address",
                                 hint="the first octet must be even")
        if not (self.network in ("user", "none") or _NAME.match(self.network)):
            raise UsageError(f"invalid network name {self.network!r}")


@dataclass(frozen=True)
class VirtualHardware:
    """CPUs, memory, disks, NICs, firmware, machine type and serial console of one VM.

    ``kernel``/``initrd``/``append`` describe a direct kernel boot (no boot loader in
    the disk); ``serial`` says whether the first serial port exists (the runtime logs it).
    """

    cpus: int = 1
    memory: int = 256 << 20
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    firmware: Firmware = Firmware.BIOS
    machine: str = "q35"
    serial: bool = True
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> VirtualHardware:
        """Check counts, sizes and names; returns self. Raises UsageError."""
        parse_cpus(self.cpus)
        if not isinstance(self.memory, int) or self.memory % (1 << 20) or \
                not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise UsageError(f"memory size {self.memory} is out of range",
                             hint="a whole number of MiB from 16 MiB to 4 TiB")
        if self.machine not in MACHINE_TYPES:
            raise UsageError(f"unknown machine type {self.machine!r}",
                             hint=f"choose one of: {', '.join(MACHINE_TYPES)}")
        for disk in self.disks:
            disk.validate()
        macs = [n.mac.lower() for n in self.nics if n.mac]
        if len(macs) != len(set(macs)):
            raise UsageError("two NICs have the same MAC address")
        for nic in self.nics:
            nic.validate()
        if (self.initrd or self.append) and not self.kernel:
            raise UsageError("--initrd and --append need --kernel")
        return self

    def with_disks(self, disks: tuple[Disk, ...]) -> VirtualHardware:
        return replace(self, disks=disks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as their values)."""
        data = asdict(self)
        data["firmware"] = self.firmware.value
        data["disks"] = [dict(asdict(d), bus=d.bus.value) for d in self.disks]
        data["nics"] = [dict(asdict(n), model=n.model.value) for n in self.nics]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VirtualHardware:
        """The inverse of ``to_dict``; raises UsageError on unknown values or keys."""
        try:
            disks = tuple(Disk(**dict(d, bus=_enum(Bus, d.get("bus", "virtio"), "disk bus")))
                          for d in data.get("disks", ()))
            nics = tuple(Nic(**dict(n, model=_enum(NicModel, n.get("model", "virtio"), "NIC model"),
                                    forwards=tuple(n.get("forwards", ()))))
                         for n in data.get("nics", ()))
            rest = {k: v for k, v in data.items() if k not in ("disks", "nics", "firmware")}
            hw = cls(disks=disks, nics=nics,
                     firmware=_enum(Firmware, data.get("firmware", "bios"), "firmware"), **rest)
        except TypeError as err:
            raise UsageError(f"invalid hardware description: {err}") from None
        return hw.validate()
