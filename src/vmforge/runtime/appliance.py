"""Booting an OVA appliance with the virtual hardware its OVF descriptor declares.

``start_appliance`` creates the VM's state directory, verifies and imports the package
into ``<state>/appliance/`` (``packages.ova.import_ova``: manifest digests, signature if
any, each disk converted to qcow2; the OVA itself is only read), puts a qcow2 overlay on
each imported disk (``disk<i>.qcow2``, as every VM has) and boots. ``vmforge vm rm``
removes the directory, and with it the import.

What the descriptor declares and what QEMU gets (the runtime's buses and devices):

=====================  ==============================================================
declared               booted as
=====================  ==============================================================
CPUs, memory           ``-smp``, ``-m`` (the model's defaults when none are declared)
IDE controller         IDE (PIIX on ``pc``; on ``q35`` its built-in AHCI ports)
SATA (AHCI)            AHCI
SCSI (any subtype)     virtio-scsi: QEMU emulates no LSI 53C1030 (VMware's "lsilogic");
                       its lsi53c895a is another chip, so the runtime's SCSI bus is used
virtio subtype         virtio-blk
NIC E1000/RTL8139      e1000 / rtl8139; VMXNET3, PCNet32 and others: e1000
NIC on NAT/VM Network  user-mode NAT; another network name: a segment of that name
firmware efi           UEFI (OVMF)
VirtualSystemType      ``qemu-pc``/``vmforge-pc``: the ``pc`` machine, else ``q35``
=====================  ==============================================================

Command-line flags win over what is declared (``Overrides``). The first serial port is
always present: the runtime reads the guest's console from it. Hard disks come first
(the first one boots and is the VM's base), CD images after them, read-only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ImageNotFound, UsageError
from ..model.hardware import Bus, Disk, Nic, VirtualHardware
from ..ops.clone import linked_clone
from ..packages.ova import import_ova
from . import state as vmstate
from .accel import choose_accel
from .cloudinit import Seed, write_seed
from .machine import find_qemu
from .vm import DEFAULT_MARKERS, Started, _boot, _check_boot_files  # shared with 'run IMAGE'

#: where the package is imported, inside the VM's state directory
APPLIANCE_DIR = "appliance"


@dataclass(frozen=True)
class Overrides:
    """Flags given on the command line; ``None`` keeps what the descriptor declares.

    ``network`` (``user``, ``none`` or a segment name) is put on every declared NIC (one
    NIC is added when the descriptor declares none); ``forwards`` go to the first NIC on
    the user network.
    """

    cpus: int | None = None
    memory: int | None = None
    machine: str | None = None
    disk_bus: Bus | None = None
    network: str | None = None
    forwards: tuple[str, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None

    def apply(self, declared: VirtualHardware) -> VirtualHardware:
        """``declared`` with these flags on top, the serial console added; validated.
        Raises UsageError."""
        disks = tuple(d if self.disk_bus is None or d.cdrom else replace(d, bus=self.disk_bus)
                      for d in declared.disks)
        nics = declared.nics
        if self.network is not None:
            nics = tuple(replace(n, network=self.network) for n in nics) or \
                ((Nic(network=self.network),) if self.network != "none" else ())
        if self.forwards:
            user = [i for i, n in enumerate(nics) if n.network == "user"]
            if not user:
                raise UsageError("--forward needs a NIC on the user network",
                                 hint="add --net user")
            nics = tuple(replace(n, forwards=self.forwards) if i == user[0] else n
                         for i, n in enumerate(nics))
        return replace(
            declared, disks=disks, nics=nics, serial=True,
            cpus=self.cpus if self.cpus is not None else declared.cpus,
            memory=self.memory if self.memory is not None else declared.memory,
            machine=self.machine or declared.machine,
            kernel=self.kernel or declared.kernel, initrd=self.initrd or declared.initrd,
            append=self.append or declared.append).validate()


def start_appliance(ova: str, overrides: Overrides, *, name: str | None = None,
                    configuration: str | None = None, accel: str | None = None,
                    markers: tuple[str, ...] = DEFAULT_MARKERS, wait: bool = True,
                    timeout: float = 180.0, root: Path | None = None,
                    seed: Seed | None = None) -> Started:
    """Import ``ova`` into a new VM ``name`` and boot it (see the module docstring).

    ``configuration`` picks an OVF deployment option. Raises ImageNotFound, the
    package's errors (PackageError, SignatureError, LimitExceeded...), UsageError for
    hardware out of range, LaunchError, GuestTimeout. After a failure before the guest
    runs, no state directory is left.
    """
    root = root or vmstate.state_root()
    if not os.path.isfile(ova):
        raise ImageNotFound("no such file" if not os.path.exists(ova) else "not a regular file",
                            path=ova)
    qemu = find_qemu()
    name = vmstate.check_name(name) if name else vmstate.unique_name(Path(ova).stem, root)
    st = vmstate.create(name, root)
    try:
        appdir = st.dir / APPLIANCE_DIR
        imported = import_ova(ova, str(appdir), out_fmt="qcow2", configuration=configuration)
        hw = overrides.apply(imported.hardware)
        _check_boot_files(hw)
        drives = [d for d in hw.disks if not d.cdrom] + [d for d in hw.disks if d.cdrom]
        disks: list[Disk] = []
        for i, d in enumerate(drives):
            path = str(appdir / d.path)
            if d.cdrom:
                disks.append(replace(d, path=path, readonly=True))
                continue
            overlay = st.overlay_path(i)
            linked_clone(path, str(overlay), "qcow2", base_fmt=d.format, absolute=True,
                         untrusted=True)
            disks.append(replace(d, path=str(overlay), format="qcow2"))
        if seed is not None:
            iso = st.dir / "seed.iso"
            write_seed(replace(seed, instance_id=f"vmforge-{name}"), iso)
            disks.append(Disk(str(iso), "raw", bus=Bus.SATA, readonly=True, cdrom=True))
        hw = replace(hw, disks=tuple(disks))
        base = next((d for d in drives if not d.cdrom), None)
        sig = imported.signature
        st.write_spec({
            "name": name, "hardware": hw.to_dict(),
            "base": str(appdir / base.path) if base is not None else None,
            "base_format": base.format if base is not None else None,
            # the package came from elsewhere: QEMU gets disk 0's base with no backing
            "untrusted": True, "markers": list(markers), "created": time.time(),
            "appliance": os.path.abspath(ova),
            "appliance_signer": sig.subject if sig is not None else None,
        })
        chosen = choose_accel(qemu, accel, cache_dir=root)
    except BaseException:
        vmstate.remove(st)
        raise
    return _boot(st, qemu, chosen, wait=wait, timeout=timeout, remove_on_failure=True)

