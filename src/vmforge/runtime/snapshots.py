"""Snapshots of a VM: full state (RAM and devices) or disk only, stored in its overlays.

Both kinds are qcow2 internal snapshots in the VM's writable qcow2 disks (its overlay
``disk0.qcow2`` first), so ``vmforge snapshot -l`` on the overlay lists them too.

* full state, running VM: QMP ``snapshot-save`` / ``snapshot-load`` jobs (QEMU 6.0+;
  the QMP form of ``savevm``/``loadvm``). The RAM and device state go into the overlay
  (``vmstate`` node ``disk0``), the disks' snapshot is taken at the same instant; QEMU
  pauses the guest while it writes and resumes it afterwards, and ``snapshot-load``
  resumes the guest where it was saved.
* disk only, running VM: ``blockdev-snapshot-internal-sync`` on each writable disk
  (the guest keeps running; what it has not flushed is not in the snapshot).
* a stopped VM: the snapshots are made, applied and listed in the overlay files
  directly (``ops.snapshot``), as ``qemu-img snapshot`` would; RAM state cannot be
  restored without a running QEMU, so applying a full-state snapshot to a stopped VM
  restores its disks only (and says so).

QEMU refuses to load a disk-only snapshot into a running guest (its disks would change
under it); so do we, with a hint to stop the VM first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..model.hardware import VirtualHardware
from ..model.info import SnapshotInfo
from ..ops import snapshot as opsnap
from .errors import MachineError
from .machine import Machine
from .state import VmState

#: a snapshot-save of a few hundred MiB of RAM takes seconds under TCG; allow for big guests
JOB_TIMEOUT = 600.0


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of a VM as the user sees it."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    vm_clock_nsec: int

    @property
    def full_state(self) -> bool:
        return self.vm_state_size > 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "vm_state_size": self.vm_state_size,
                "date_sec": self.date_sec, "vm_clock_nsec": self.vm_clock_nsec,
                "kind": "full" if self.full_state else "disk-only"}


def check_tag(tag: str) -> str:
    # QEMU's snapshot names are free text, but a name that looks like a snapshot id
    # ("1") is ambiguous for loadvm/-a (ids are tried first), and control characters
    # make listings unreadable
    if not tag or len(tag) > 128 or not tag.isprintable():
        raise UsageError(f"invalid snapshot name {tag!r}", hint="use 1 to 128 printable characters")
    if tag.isdigit():
        raise UsageError(f"snapshot name {tag!r} looks like a snapshot id",
                         hint="use a name with at least one letter")
    return tag


def snapshot_disks(st: VmState) -> list[tuple[str, str]]:
    """(QEMU node name, path) of each writable qcow2 disk of the VM: where snapshots live."""
    hw = VirtualHardware.from_dict(st.read_spec()["hardware"])
    out = [(f"disk{i}", d.path) for i, d in enumerate(hw.disks)
           if d.format == "qcow2" and not d.readonly and not d.cdrom]
    if not out or out[0][0] != "disk0":
        raise MachineError(f"VM {st.name!r} has no qcow2 overlay to hold snapshots")
    return out


def _from_info(s: SnapshotInfo) -> Snapshot:
    return Snapshot(s.id, s.name, s.vm_state_size, s.date_sec, s.vm_clock_nsec)


def _from_qmp(s: dict[str, Any]) -> Snapshot:
    return Snapshot(str(s["id"]), str(s["name"]), int(s.get("vm-state-size", 0)),
                    int(s.get("date-sec", 0)),
                    int(s.get("vm-clock-sec", 0)) * 1_000_000_000 + int(s.get("vm-clock-nsec", 0)))


def list_snapshots(st: VmState) -> list[Snapshot]:
    """The snapshots in the VM's overlay: from QEMU while it runs, else from the file."""
    disks = snapshot_disks(st)
    if st.running():
        for block in Machine(st).qmp("query-block"):
            inserted = block.get("inserted") or {}
            if inserted.get("node-name") == disks[0][0]:
                return [_from_qmp(s) for s in inserted.get("image", {}).get("snapshots", [])]
        raise MachineError(f"QEMU of VM {st.name!r} has no node {disks[0][0]}")
    return [_from_info(s) for s in opsnap.list_snapshots(disks[0][1], "qcow2")]


def _find(st: VmState, tag: str) -> Snapshot:
    for s in list_snapshots(st):
        if s.name == tag:
            return s
    raise UsageError(f"VM {st.name!r} has no snapshot named {tag!r}",
                     hint=f"'vmforge vm snapshots {st.name}' lists them")


def _run_job(machine: Machine, command: str, args: dict[str, Any], timeout: float) -> float:
    """Start a QMP job, wait until it concludes, dismiss it; seconds taken. Raises MachineError."""
    job_id = f"vmforge-{command}-{time.monotonic_ns()}"
    start = time.monotonic()
    machine.qmp(command, {"job-id": job_id, **args})
    while True:
        jobs = {j["id"]: j for j in machine.qmp("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            raise MachineError(f"QMP {command}: the job vanished before it concluded")
        if job["status"] == "concluded":
            machine.qmp("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise MachineError(f"QMP {command} failed: {job['error']}")
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise MachineError(f"QMP {command} did not finish within {timeout:g} s",
                               hint="the job goes on in QEMU; see 'vmforge vm snapshots'")
        time.sleep(0.05)


def save(st: VmState, tag: str, *, disk_only: bool = False,
         timeout: float = JOB_TIMEOUT) -> tuple[Snapshot, float]:
    """Snapshot the VM as ``tag``; (the snapshot, seconds). Names are unique per VM."""
    check_tag(tag)
    disks = snapshot_disks(st)
    if any(s.name == tag for s in list_snapshots(st)):
        raise UsageError(f"VM {st.name!r} already has a snapshot named {tag!r}",
                         hint="choose another name")
    start = time.monotonic()
    if not st.running():
        if not disk_only:
            raise MachineError(f"VM {st.name!r} is not running: there is no RAM state to save",
                               hint="use --disk-only for a snapshot of its disks")
        for _, path in disks:
            opsnap.create_snapshot(path, tag, "qcow2")
    elif disk_only:
        Machine(st).qmp_session([("blockdev-snapshot-internal-sync", {"device": node, "name": tag})
                                 for node, _ in disks])
    else:
        _run_job(Machine(st), "snapshot-save",
                 {"tag": tag, "vmstate": disks[0][0], "devices": [n for n, _ in disks]}, timeout)
    return _find(st, tag), time.monotonic() - start


def restore(st: VmState, tag: str, *, timeout: float = JOB_TIMEOUT) -> tuple[Snapshot, str, float]:
    """Go back to snapshot ``tag``; (snapshot, what was restored, seconds)."""
    snap = _find(st, tag)
    disks = snapshot_disks(st)
    start = time.monotonic()
    if st.running():
        if not snap.full_state:
            raise MachineError(f"{tag!r} is a disk-only snapshot: it cannot be loaded into a "
                               "running guest", hint=f"stop the VM first ('vmforge vm stop "
                                                     f"{st.name}'), then restore it")
        _run_job(Machine(st), "snapshot-load",
                 {"tag": tag, "vmstate": disks[0][0], "devices": [n for n, _ in disks]}, timeout)
        what = "RAM, devices and disks (the guest resumed where it was saved)"
    else:
        for _, path in disks:
            opsnap.apply_snapshot(path, tag, "qcow2")
        what = "disks" + (" (the VM is stopped: its RAM state is not loaded)"
                          if snap.full_state else "")
    return snap, what, time.monotonic() - start


def delete(st: VmState, tag: str) -> Snapshot:
    """Delete snapshot ``tag`` from every disk of the VM."""
    snap = _find(st, tag)
    disks = snapshot_disks(st)
    if st.running():
        Machine(st).qmp_session([("blockdev-snapshot-delete-internal-sync",
                                  {"device": node, "name": tag}) for node, _ in disks])
    else:
        for _, path in disks:
            opsnap.delete_snapshot(path, tag, "qcow2")
    return snap
