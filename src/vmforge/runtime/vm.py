"""Start a VM from an image: overlay, spec, QEMU, wait for the guest; and look VMs up.

The base image is only ever read: the VM writes into a qcow2 overlay in its state
directory (``ops.linked_clone``), so the base's checksum is unchanged by any session.
The base's format is determined once here (probed, or as the caller states it) and
recorded; in untrusted mode the base may not refer to any other file and QEMU is told
explicitly not to open one.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ImageNotFound, UnsupportedFeature, UsageError
from ..model.hardware import Bus, Disk, VirtualHardware
from ..ops.clone import linked_clone
from ..ops.image import Image, open_image
from . import state as vmstate
from .accel import Accel, choose_accel
from .cloudinit import Seed, write_seed
from .console import run_state
from .errors import GuestTimeout, MachineError
from .host import capacity_lock, check_capacity
from .machine import Machine, PinnedBase, build_command, find_qemu, sandbox_supported

#: what a guest prints when it is up: our test guest's marker, or a login prompt
DEFAULT_MARKERS = ("VMFORGE-GUEST-UP", "login:")


@dataclass(frozen=True)
class Started:
    """The outcome of ``start``."""

    name: str
    state: vmstate.VmState
    accel: Accel
    qmp_seconds: float
    marker: str | None
    guest_seconds: float | None


def start(image: str, hw: VirtualHardware, *, name: str | None = None,
          image_format: str | None = None, untrusted: bool = False, accel: str | None = None,
          markers: tuple[str, ...] = DEFAULT_MARKERS, wait: bool = True,
          timeout: float = 180.0, root: Path | None = None,
          seed: Seed | None = None) -> Started:
    """Create the VM ``name`` on an overlay of ``image`` and boot it.

    ``seed`` attaches a cloud-init NoCloud seed ISO (made in the state directory; its
    instance-id is replaced by the VM's name so each VM and clone gets its own).

    ``hw`` gives everything but the disk. Raises ImageNotFound/ImageError for the image,
    UsageError for bad hardware, LaunchError when QEMU refuses, GuestTimeout when no
    marker appears (the VM is then killed; its log stays for 'vmforge vm logs').
    Nothing is left running and no state directory is left after a failed launch.
    """
    root = root or vmstate.state_root()
    if not os.path.isfile(image):
        raise ImageNotFound("no such file" if not os.path.exists(image) else "not a regular file",
                            path=image)
    _check_boot_files(hw)
    qemu = find_qemu()
    hw.validate()
    with open_image(image, image_format, untrusted=untrusted) as img:
        base_format = img.format
        _refuse_data_files(img)
    chosen = choose_accel(qemu, accel, cache_dir=root)
    name = vmstate.check_name(name) if name else vmstate.unique_name(Path(image).stem, root)
    st = vmstate.create(name, root)
    try:
        overlay = st.overlay_path(0)
        linked_clone(image, str(overlay), "qcow2", base_fmt=base_format, absolute=True,
                     untrusted=untrusted)
        hw = replace(hw, disks=(Disk(str(overlay), "qcow2"), *hw.disks))
        if seed is not None:
            iso = st.dir / "seed.iso"
            write_seed(replace(seed, instance_id=f"vmforge-{name}"), iso)
            hw = replace(hw, disks=(*hw.disks, Disk(str(iso), "raw", bus=Bus.SATA,
                                                    readonly=True, cdrom=True)))
        st.write_spec({
            "name": name, "hardware": hw.to_dict(), "base": os.path.abspath(image),
            "base_format": base_format, "untrusted": untrusted, "markers": list(markers),
            "created": time.time(),
        })
    except BaseException:
        vmstate.remove(st)
        raise
    return _boot(st, qemu, chosen, wait=wait, timeout=timeout, remove_on_failure=True)


def boot(name: str, *, accel: str | None = None, wait: bool = True, timeout: float = 180.0,
         root: Path | None = None) -> Started:
    """Start the existing, stopped VM ``name`` again on its overlay (a clone, or after stop).

    Raises VmNotFound, MachineError if it already runs, LaunchError, GuestTimeout.
    """
    st = vmstate.vm(name, root)
    if st.running():
        raise MachineError(f"VM {name!r} is already running")
    qemu = find_qemu()
    _check_boot_files(VirtualHardware.from_dict(st.read_spec()["hardware"]))
    chosen = choose_accel(qemu, accel, cache_dir=st.dir.parent)
    return _boot(st, qemu, chosen, wait=wait, timeout=timeout, remove_on_failure=False)


def _refuse_data_files(img: Image) -> None:
    # the image was opened without allow_data_file, which only keeps vmforge from reading
    # the data file; QEMU would open it on its own (SECURITY.md #2: local mode follows an
    # external data file only when asked explicitly, and 'run' has no way to ask)
    for info in img.chain_info():
        specific = info.format_specific.get("data")
        name = specific.get("data-file") if isinstance(specific, dict) else None
        if name:
            raise UnsupportedFeature(
                "external data file", path=info.filename,
                detail=f"names '{name}'; a VM is not started on one",
                hint="convert it into a self-contained image first "
                     "('vmforge convert --allow-data-file')")


def _check_boot_files(hw: VirtualHardware) -> None:
    for what, path in (("kernel", hw.kernel), ("initrd", hw.initrd)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{path}: no such {what} file",
                             hint=f"--{what} names a file on this host")


def launch_command(st: vmstate.VmState, qemu: str, chosen: Accel, *,
                   incoming: str | None = None, qmp_name: str = "qmp.sock",
                   pid_name: str = "qemu.pid", console_name: str = "console.sock") -> list[str]:
    """The QEMU command line for the VM in ``st`` as its spec describes it."""
    spec = st.read_spec()
    hw = VirtualHardware.from_dict(spec["hardware"])
    base = spec.get("base")
    pinned = ({0: PinnedBase(str(base), str(spec["base_format"]))}
              if spec.get("untrusted") and base else {})
    return build_command(qemu, hw, st, chosen, pinned=pinned, sandbox=sandbox_supported(qemu),
                         incoming=incoming, qmp_name=qmp_name, pid_name=pid_name,
                         console_name=console_name)


def _boot(st: vmstate.VmState, qemu: str, chosen: Accel, *, wait: bool, timeout: float,
          remove_on_failure: bool) -> Started:
    """Launch QEMU for a VM directory that has its spec and overlay; wait for the guest."""
    machine = Machine(st)
    spec = st.read_spec()
    markers = tuple(spec.get("markers") or DEFAULT_MARKERS)
    try:
        argv = launch_command(st, qemu, chosen)
        st.write_spec(dict(spec, accel=chosen.name, accel_reason=chosen.reason, command=argv))
        _rotate_log(st)
        with capacity_lock(st.dir.parent):
            check_capacity([VirtualHardware.from_dict(spec["hardware"])], st.dir.parent,
                           exclude=st.name)
            machine.launch(argv)
    except BaseException:
        machine.kill()
        if remove_on_failure:
            vmstate.remove(st)
        raise
    qmp_seconds = machine.qmp_ready_seconds or 0.0
    if not wait:
        return Started(st.name, st, chosen, qmp_seconds, None, None)
    try:
        marker, seconds = machine.wait_for_marker(markers, timeout)
    except (GuestTimeout, BaseException):
        machine.kill()
        raise
    return Started(st.name, st, chosen, qmp_seconds, marker, seconds + qmp_seconds)


def _rotate_log(st: vmstate.VmState) -> None:
    # the serial log is opened in append mode (a migration's destination writes on after
    # the source), so the log of an earlier boot is moved aside: its marker must not count
    if st.serial_path.exists():
        os.replace(st.serial_path, st.serial_path.with_suffix(".log.1"))


def describe_vm(st: vmstate.VmState) -> dict[str, Any]:
    """What 'vm show' and 'vm list' print: the spec plus live status."""
    spec = st.read_spec()
    pid = st.pid()
    hw = spec.get("hardware", {})
    disks = [{"path": d["path"], "format": d["format"],
              "bytes_on_disk": _used(d["path"])} for d in hw.get("disks", [])]
    status = "running" if pid else "stopped"
    qemu_status = None
    if pid:
        # QEMU's own run state: 'paused' after 'vmforge vm pause' (or while a migration or
        # snapshot holds the guest); a QMP socket busy with another client is not an error
        with contextlib.suppress(MachineError):
            qemu_status = run_state(st)
        if qemu_status == "paused":
            status = "paused"
    return {
        "name": st.name, "status": status, "qemu_status": qemu_status, "pid": pid,
        "base": spec.get("base"), "base_format": spec.get("base_format"),
        "untrusted": spec.get("untrusted", False), "accel": spec.get("accel"),
        "accel_reason": spec.get("accel_reason"), "cpus": hw.get("cpus"),
        "memory": hw.get("memory"), "disks": disks, "kernel": hw.get("kernel"),
        "state_dir": str(st.dir), "qmp_socket": str(st.qmp_path) if pid else None,
        "serial_log": str(st.serial_path),
    }


def _used(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def stop(name: str, *, timeout: float = 30.0, root: Path | None = None) -> str:
    """Stop gracefully (ACPI, quit, kill); returns how it ended."""
    return Machine(vmstate.vm(name, root)).stop(timeout)


def kill(name: str, *, root: Path | None = None) -> bool:
    return Machine(vmstate.vm(name, root)).kill()


def remove(name: str, *, force: bool = False, root: Path | None = None) -> None:
    """Delete a VM's directory (overlay included); a running VM needs ``force``."""
    st = vmstate.vm(name, root)
    if st.running():
        if not force:
            raise MachineError(f"VM {name!r} is running",
                               hint=f"stop it first ('vmforge vm stop {name}') or use --force")
        Machine(st).kill()
    vmstate.remove(st)
