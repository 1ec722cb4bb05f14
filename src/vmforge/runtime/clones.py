"""Linked clones of VMs: many VMs from one base, each writing only to its own overlay.

* ``clone(NAME, NEW)``: a new, stopped VM with NAME's hardware. If NAME runs, NEW's
  overlay is a fresh linked clone of NAME's base (a running overlay changes under us,
  so its content is not copied). If NAME is stopped, NEW also gets what NAME wrote:
  the clusters of NAME's overlay are copied into a new overlay on the same base (only
  the overlay's own data, not its internal snapshots), so the two VMs share the base
  and nothing else: starting NAME again later cannot change NEW.
* ``run_many(IMAGE, N)``: N VMs from one image, each its own overlay (``vmforge run
  --count N``).

Disk use per clone is what its overlay occupies on the host (allocated blocks).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..model.hardware import Nic, VirtualHardware
from ..ops.clone import linked_clone
from ..ops.convert import convert
from . import state as vmstate
from . import vm as vmrun
from .cloudinit import Seed
from .errors import MachineError, VmExists
from .host import check_capacity
from .machine import Machine, default_mac


@dataclass(frozen=True)
class Cloned:
    name: str
    source: str
    copied_overlay: bool
    bytes_on_disk: int


def disk_used(st: vmstate.VmState) -> int:
    """Host bytes allocated to the VM's own files (overlays, state), not to its base."""
    total = 0
    for entry in st.dir.iterdir():
        if entry.is_file() and not entry.is_symlink():
            total += entry.stat().st_blocks * 512
    return total


def _fresh_macs(hw: VirtualHardware, name: str) -> tuple[Nic, ...]:
    # two VMs on one network with one MAC would steal each other's frames; a NIC without
    # an explicit MAC gets one derived from the (new) VM name anyway
    return tuple(replace(n, mac=default_mac(name, i) if n.mac else None)
                 for i, n in enumerate(hw.nics))


def clone(source: str, new: str, *, root: Path | None = None) -> Cloned:
    """Create the stopped VM ``new`` as a linked clone of VM ``source``.

    Raises VmNotFound, VmExists, MachineError (a source without a base overlay).
    """
    src = vmstate.vm(source, root)
    spec = src.read_spec()
    hw = VirtualHardware.from_dict(spec["hardware"])
    base, base_format = spec.get("base"), spec.get("base_format")
    if not base or not base_format or not hw.disks:
        raise MachineError(f"VM {source!r} has no base image to clone")
    if any(not d.cdrom for d in hw.disks[1:]):
        raise MachineError(f"VM {source!r} has more than one disk; cloning it is not supported yet")
    untrusted = bool(spec.get("untrusted"))
    running = src.running()
    st = vmstate.create(new, root or src.dir.parent)
    try:
        overlay = st.overlay_path(0)
        if running:
            linked_clone(base, str(overlay), "qcow2", base_fmt=base_format, absolute=True,
                         untrusted=untrusted)
        else:
            # the overlay's own clusters only (qemu-img convert -B), onto the same base
            convert(hw.disks[0].path, str(overlay), "qcow2", src_fmt="qcow2", backing=base,
                    backing_fmt=base_format)
        # read-only CD-ROMs (a cloud-init seed) are copied along: the clone owns its files
        cdroms = []
        for d in hw.disks[1:]:
            copy = st.dir / Path(d.path).name
            shutil.copyfile(d.path, copy)
            cdroms.append(replace(d, path=str(copy)))
        new_hw = replace(hw, disks=(replace(hw.disks[0], path=str(overlay)), *cdroms),
                         nics=_fresh_macs(hw, new))
        st.write_spec({
            "name": new, "hardware": new_hw.to_dict(), "base": base, "base_format": base_format,
            "untrusted": untrusted, "markers": spec.get("markers") or list(vmrun.DEFAULT_MARKERS),
            "created": time.time(), "cloned_from": source,
        })
    except BaseException:
        vmstate.remove(st)
        raise
    return Cloned(new, source, not running, disk_used(st))


def run_many(image: str, hw: VirtualHardware, count: int, *, name: str | None = None,
             image_format: str | None = None, untrusted: bool = False, accel: str | None = None,
             markers: tuple[str, ...] = vmrun.DEFAULT_MARKERS, wait: bool = True,
             timeout: float = 180.0, root: Path | None = None,
             seed: Seed | None = None) -> list[vmrun.Started]:
    """Start ``count`` VMs from ``image``, named NAME-1..NAME-N; all or none.

    If one fails, the ones already started are killed and removed.
    """
    root = root or vmstate.state_root()
    stem = name or vmstate.unique_name(Path(image).stem, root)
    names = [f"{stem}-{i}" for i in range(1, count + 1)]
    for n in names:
        vmstate.check_name(n)
        if (root / n).exists():
            raise VmExists(f"a VM named {n!r} already exists")
    check_capacity([hw] * count, root)  # all or none: refuse before starting the first
    started: list[vmrun.Started] = []
    try:
        # launch them all first, then wait: the guests boot side by side
        for n in names:
            started.append(vmrun.start(image, hw, name=n, image_format=image_format,
                                       untrusted=untrusted, accel=accel, markers=markers,
                                       wait=False, root=root, seed=seed))
        if wait:
            launched = time.monotonic()
            done = []
            for s in started:
                left = max(1.0, timeout - (time.monotonic() - launched))
                marker, _ = Machine(s.state).wait_for_marker(markers, left)
                seconds = time.monotonic() - launched + s.qmp_seconds
                done.append(replace(s, marker=marker, guest_seconds=seconds))
            started = done
    except BaseException:
        for s in started:
            vmrun.remove(s.name, force=True, root=root)
        raise
    return started


def overlay_bytes(st: vmstate.VmState) -> int:
    """Host bytes of the VM's first overlay."""
    try:
        return os.stat(st.overlay_path(0)).st_blocks * 512
    except OSError:
        return 0
