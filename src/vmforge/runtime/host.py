"""What this host can give VMs: CPUs, memory, accelerator, and what running VMs hold.

A VM is refused when starting it would take the VMs' total beyond the host's capacity:

* vCPUs: ``host CPUs x cpu_overcommit`` (default 4: idle vCPUs cost little);
* memory: ``(host memory - reserved) x memory_overcommit`` (default 1.0, reserved
  512 MiB for the host itself): a guest's RAM is real host memory once touched, and
  the kernel's OOM killer picking a QEMU is worse than a clear refusal.

A VM holds what its hardware says (the balloon can lend memory back to the host, but
the guest may take it again at any time, so capacity counts the configured size).

The ratios come from ``VMFORGE_CPU_OVERCOMMIT`` / ``VMFORGE_MEMORY_OVERCOMMIT`` /
``VMFORGE_RESERVED_MEMORY`` in the environment, else from a JSON file
(``$VMFORGE_HOST_CONFIG``, default ``$XDG_CONFIG_HOME/vmforge/host.json``) with the
keys ``cpu_overcommit``, ``memory_overcommit``, ``reserved_memory``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..model import human_size, parse_size
from ..model.hardware import VirtualHardware
from . import state as vmstate
from .errors import MachineError
from .machine import Machine

DEFAULTS: dict[str, Any] = {"cpu_overcommit": 4.0, "memory_overcommit": 1.0,
                            "reserved_memory": 512 << 20}
#: a ratio above this is a typo, not a policy
MAX_RATIO = 1000.0


class CapacityExceeded(MachineError):
    hint = ("stop a VM, ask for less, or raise the overcommit ratio (VMFORGE_CPU_OVERCOMMIT, "
            "VMFORGE_MEMORY_OVERCOMMIT or the host config file)")


@dataclass(frozen=True)
class Policy:
    cpu_overcommit: float
    memory_overcommit: float
    reserved_memory: int
    source: str


@dataclass(frozen=True)
class Held:
    name: str
    cpus: int
    memory: int


@dataclass(frozen=True)
class Host:
    cpus: int
    memory: int
    available_memory: int
    policy: Policy
    held: tuple[Held, ...]

    @property
    def cpu_capacity(self) -> int:
        return int(self.cpus * self.policy.cpu_overcommit)

    @property
    def memory_capacity(self) -> int:
        return int(max(0, self.memory - self.policy.reserved_memory) * self.policy.memory_overcommit)

    @property
    def cpus_held(self) -> int:
        return sum(h.cpus for h in self.held)

    @property
    def memory_held(self) -> int:
        return sum(h.memory for h in self.held)

    def to_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory, "available_memory": self.available_memory,
                "cpu_overcommit": self.policy.cpu_overcommit,
                "memory_overcommit": self.policy.memory_overcommit,
                "reserved_memory": self.policy.reserved_memory, "policy_source": self.policy.source,
                "cpu_capacity": self.cpu_capacity, "memory_capacity": self.memory_capacity,
                "cpus_held": self.cpus_held, "memory_held": self.memory_held,
                "vms": [{"name": h.name, "cpus": h.cpus, "memory": h.memory} for h in self.held]}


def _config_path() -> Path:
    env = os.environ.get("VMFORGE_HOST_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vmforge" / "host.json"


def _ratio(value: object, what: str) -> float:
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"invalid {what} {value!r}", hint="a number such as 1.5") from None
    if not 0 < ratio <= MAX_RATIO:
        raise UsageError(f"{what} {value!r} is out of range", hint=f"a number above 0, at most "
                                                                  f"{MAX_RATIO:g}")
    return ratio


def policy() -> Policy:
    """The overcommit policy: environment over config file over defaults. Raises UsageError."""
    values = dict(DEFAULTS)
    source = "defaults"
    path = _config_path()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"{path}: unreadable host config: {err}") from None
        if not isinstance(data, dict) or set(data) - set(DEFAULTS):
            raise UsageError(f"{path}: the host config takes only {', '.join(DEFAULTS)}")
        values.update(data)
        source = str(path)
    for key in DEFAULTS:
        env = os.environ.get(f"VMFORGE_{key.upper()}")
        if env is not None:
            values[key] = env
            source = "environment"
    reserved = values["reserved_memory"]
    try:
        reserved = parse_size(reserved) if isinstance(reserved, str) else int(reserved)
    except (UsageError, TypeError, ValueError):
        raise UsageError(f"invalid reserved_memory {reserved!r}", hint="a size such as 512M") from None
    return Policy(_ratio(values["cpu_overcommit"], "cpu_overcommit"),
                  _ratio(values["memory_overcommit"], "memory_overcommit"), reserved, source)


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def held_by_vms(root: Path | None = None, exclude: str | None = None) -> tuple[Held, ...]:
    held = []
    for st in vmstate.all_vms(root):
        if st.name == exclude or not st.running():
            continue
        try:
            hw = st.read_spec()["hardware"]
            held.append(Held(st.name, int(hw["cpus"]), int(hw["memory"])))
        except (MachineError, KeyError, TypeError, ValueError):
            continue  # a half-written spec: its VM is counted when it has one
    return tuple(held)


def host(root: Path | None = None, exclude: str | None = None) -> Host:
    mem = _meminfo()
    cpus = len(os.sched_getaffinity(0))
    return Host(cpus, mem.get("MemTotal", 0), mem.get("MemAvailable", 0), policy(),
                held_by_vms(root, exclude))


def check_capacity(hws: list[VirtualHardware], root: Path | None = None,
                   exclude: str | None = None) -> None:
    """Refuse (CapacityExceeded) if starting VMs with ``hws`` would exceed the capacity."""
    h = host(root, exclude)
    cpus = sum(hw.cpus for hw in hws)
    memory = sum(hw.memory for hw in hws)
    what = f"{len(hws)} VMs" if len(hws) > 1 else "the VM"
    if h.cpus_held + cpus > h.cpu_capacity:
        raise CapacityExceeded(
            f"starting {what} ({cpus} vCPUs) would exceed the host's capacity: {h.cpus_held} of "
            f"{h.cpu_capacity} vCPUs are held ({h.cpus} CPUs x {h.policy.cpu_overcommit:g})")
    if h.memory_held + memory > h.memory_capacity:
        raise CapacityExceeded(
            f"starting {what} ({human_size(memory)}) would exceed the host's memory capacity: "
            f"{human_size(h.memory_held)} of {human_size(h.memory_capacity)} held "
            f"(({human_size(h.memory)} - {human_size(h.policy.reserved_memory)} reserved) x "
            f"{h.policy.memory_overcommit:g})")


@contextlib.contextmanager
def capacity_lock(root: Path) -> Iterator[None]:
    """Serialise check-then-launch between vmforge processes (two starts could both fit)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".capacity.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def set_memory(st: vmstate.VmState, size: int, timeout: float = 20.0) -> tuple[int, int]:
    """Ask the guest's balloon driver to give memory back (or take it again) down to/up to
    ``size`` bytes; (target, what the guest has when it settled or ``timeout`` passed).

    Raises MachineError if the VM is not running, UsageError if ``size`` is above the
    VM's configured memory (the balloon can only lend back what the VM was started with).
    """
    hw = VirtualHardware.from_dict(st.read_spec()["hardware"])
    if size > hw.memory:
        raise UsageError(f"{human_size(size)} is more than VM {st.name!r} was started with "
                         f"({human_size(hw.memory)})",
                         hint="the balloon gives back memory; it cannot add more than the VM has")
    if not st.running():
        raise MachineError(f"VM {st.name!r} is not running")
    machine = Machine(st)
    machine.qmp("balloon", {"value": size})
    deadline = time.monotonic() + timeout
    actual = int(machine.qmp("query-balloon")["actual"])
    while actual != size and time.monotonic() < deadline:
        time.sleep(0.2)
        actual = int(machine.qmp("query-balloon")["actual"])
    return size, actual
