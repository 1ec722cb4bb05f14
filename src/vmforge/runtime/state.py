"""One directory per VM, so every vmforge process sees the same VMs.

::

    $VMFORGE_STATE_DIR/            (default $XDG_STATE_HOME/vmforge/vms, mode 0700)
      NAME/                        mode 0700: the QMP socket inside is reachable only by us
        spec.json                  what was asked (hardware, base image and format, accel)
        disk0.qcow2                the VM's overlay; the base image is only ever read
        qmp.sock                   QMP, a UNIX socket (never TCP)
        console.sock               the first serial port, a UNIX socket ('vmforge vm console')
        serial.log                 everything the first serial port printed (QEMU logs it
                                   whether or not a console client is connected)
        qemu.pid                   written by QEMU (-pidfile)

A VM is running when the pid in qemu.pid is alive and its command line names this
directory (a recycled pid of another program never counts).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .errors import VmExists, VmNotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: sun_path is 108 bytes on Linux, including the terminating NUL
MAX_SOCKET_PATH = 107
#: the longest socket name a VM directory holds: a migration destination's QMP socket
#: (runtime/migrate.py, ``incoming-TOKEN.sock`` with an 8-digit hex TOKEN)
LONGEST_SOCKET_NAME = "incoming-00000000.sock"


def state_root() -> Path:
    """Where VM directories live (``$VMFORGE_STATE_DIR`` wins; read at each call)."""
    env = os.environ.get("VMFORGE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "vmforge" / "vms"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"invalid VM name {name!r}",
                         hint="letters, digits, '.', '_' and '-', at most 63, not starting with "
                              "a punctuation mark")
    return name


@dataclass(frozen=True)
class VmState:
    """Paths and state of one VM directory."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def spec_path(self) -> Path:
        return self.dir / "spec.json"

    @property
    def qmp_path(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.sock"

    @property
    def serial_path(self) -> Path:
        return self.dir / "serial.log"

    @property
    def pid_path(self) -> Path:
        return self.dir / "qemu.pid"

    def overlay_path(self, index: int) -> Path:
        return self.dir / f"disk{index}.qcow2"

    # --- spec -------------------------------------------------------------------------
    def read_spec(self) -> dict[str, Any]:
        try:
            data = json.loads(self.spec_path.read_text())
        except FileNotFoundError:
            raise VmNotFound(f"VM {self.name!r} has no spec (half-created?)",
                             hint=f"remove it with 'vmforge vm rm {self.name}'") from None
        except ValueError as err:
            raise VmNotFound(f"VM {self.name!r}: spec.json is unreadable: {err}") from None
        if not isinstance(data, dict):
            raise VmNotFound(f"VM {self.name!r}: spec.json is not an object")
        return data

    def write_spec(self, spec: dict[str, Any]) -> None:
        tmp = self.spec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.spec_path)

    # --- process ----------------------------------------------------------------------
    def pid(self) -> int | None:
        """The QEMU pid if that process is alive and is this VM's QEMU, else None."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_is_vm(pid, self.dir) else None

    def running(self) -> bool:
        return self.pid() is not None

    def status(self) -> str:
        if self.running():
            return "running"
        return "stopped" if self.spec_path.exists() else "incomplete"

    def clean_runtime_files(self) -> None:
        """Remove the socket and pid file a dead QEMU may have left behind."""
        for path in (self.qmp_path, self.console_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def process_is_vm(pid: int, directory: Path) -> bool:
    """True if ``pid`` is alive (not a zombie) and its command line names ``directory``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    # the state letter follows the ')' that closes the command name
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    if state in (b"Z", b"X"):
        return False
    marker = os.fsencode(str(directory)) + b"/"
    return marker in cmdline


def vm_processes(directory: Path) -> list[int]:
    """Every live process whose command line names a path under ``directory``."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and process_is_vm(int(e), directory)]


#: PF_KTHREAD in /proc/PID/stat's flags (include/linux/sched.h): a kernel thread, whose
#: command line is empty too
_PF_KTHREAD = 0x00200000


def exiting(pid: int) -> bool:
    """True while ``pid`` is on its way out but still holds its files.

    A killed QEMU runs several threads: its leader turns zombie (or loses its memory,
    leaving an empty command line) while the other threads still tear down, and until the
    last of them has gone QEMU's sockets (a host port forward keeps accepting), pid file
    lock and image locks are held. Found when a forward still answered after 'vm rm'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return len(threads) > 1  # a zombie leader whose other threads are still exiting
    # fields[6] is the stat "flags" field (field 9 of proc(5))
    return cmdline == b"" and not int(fields[6]) & _PF_KTHREAD


def wait_gone(state: VmState, pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is no longer this VM's QEMU and has released its files (sockets,
    locks: see ``exiting``); True if it went."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_is_vm(pid, state.dir) and not exiting(pid):
            return True
        time.sleep(0.05)
    return not process_is_vm(pid, state.dir) and not exiting(pid)


def vm(name: str, root: Path | None = None) -> VmState:
    """An existing VM by name; raises VmNotFound."""
    check_name(name)
    state = VmState((root or state_root()) / name)
    if not state.dir.is_dir():
        raise VmNotFound(f"no VM named {name!r}")
    return state


def create(name: str, root: Path | None = None) -> VmState:
    """A new, empty VM directory (0700); raises VmExists, UsageError for a bad name."""
    check_name(name)
    root = root or state_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = VmState(root / name)
    sock = os.fspath((state.dir / LONGEST_SOCKET_NAME).absolute())
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise UsageError(f"the VM state path is too long for a UNIX socket ({sock})",
                         hint="set VMFORGE_STATE_DIR to a shorter directory")
    try:
        state.dir.mkdir(mode=0o700)
    except FileExistsError:
        raise VmExists(f"a VM named {name!r} already exists ({state.status()})") from None
    os.chmod(state.dir, 0o700)  # mkdir's mode is filtered by the umask
    return state


def remove(state: VmState) -> None:
    shutil.rmtree(state.dir, ignore_errors=True)


def all_vms(root: Path | None = None) -> Iterator[VmState]:
    root = root or state_root()
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir() and _NAME.match(entry.name):
            yield VmState(entry)


def unique_name(stem: str, root: Path | None = None) -> str:
    """``stem`` made a valid name, with -2, -3... appended until it is free."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("._-")[:50] or "vm"
    root = root or state_root()
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name
