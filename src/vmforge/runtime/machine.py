"""A QEMU process for one VM: its command line, launch, readiness and shutdown.

The command line is built from a ``VirtualHardware`` by a pure function
(``build_command``) so it can be checked without starting anything. House rules it
follows (SECURITY.md "Running guests"): ``-nodefaults`` (no device we did not ask for),
an explicit ``driver`` for every image node, ``-sandbox on`` where the binary has
seccomp, QMP only on a UNIX socket inside the VM's 0700 state directory, and an
untrusted base attached with ``backing: null`` so QEMU cannot follow a reference in it.

QEMU is started with ``-daemonize``: the process we run exits only once QEMU has
finished initialising (so the QMP socket exists) or has failed (its exit code and
message are the launch error); the VM then runs on its own and any vmforge process
can reach it through its state directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import UsageError
from ..model.hardware import Bus, Firmware, NicModel, VirtualHardware, parse_forward
from ..util.run import CommandError, describe, run, which
from .accel import Accel
from .errors import GuestTimeout, LaunchError, MachineError
from .qmp import Command, qmp, qmp_session
from .state import VmState, process_is_vm, wait_gone

QEMU_SYSTEM = "qemu-system-x86_64"
#: the seccomp groups denied besides the default set. spawn and elevateprivileges stay
#: allowed because -daemonize forks and calls setsid() after the filter is installed:
#: denying either kills QEMU with SIGSYS before it can print why (found on QEMU 7.2)
SANDBOX = "on,obsolete=deny,resourcecontrol=deny"
#: image formats whose QEMU driver takes a "backing" option (QAPI BlockdevOptionsQcow2 and
#: BlockdevOptionsGenericCOWFormat); the others cannot have a backing file at all
COW_DRIVERS = ("qcow2", "qcow", "qed", "vmdk")
OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
NIC_DEVICES = {NicModel.VIRTIO: "virtio-net-pci", NicModel.E1000: "e1000",
               NicModel.RTL8139: "rtl8139"}


@dataclass(frozen=True)
class PinnedBase:
    """The base under a disk's overlay, named to QEMU explicitly with no backing of its own."""

    path: str
    format: str


def find_qemu() -> str:
    path = which(QEMU_SYSTEM)
    if path is None:
        raise MachineError(f"{QEMU_SYSTEM} is not installed",
                           hint="install qemu-system-x86 (make apt)")
    return path


@lru_cache(maxsize=4)
def sandbox_supported(qemu: str) -> bool:
    """True if this QEMU build has seccomp (its help lists -sandbox)."""
    try:
        return "-sandbox" in run([qemu, "-help"], timeout=20).stdout
    except CommandError:
        return False


def default_mac(name: str, index: int) -> str:
    """A stable locally administered MAC in QEMU's 52:54:00 range, from the VM name."""
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _blockdev(options: dict[str, Any]) -> list[str]:
    return ["-blockdev", json.dumps(options, separators=(",", ":"))]


def _disk_args(hw: VirtualHardware, pinned: dict[int, PinnedBase]) -> list[str]:
    args: list[str] = []
    controllers: set[str] = set()
    ide_slot = 0
    sata_slot = 0
    for i, disk in enumerate(hw.disks):
        node = f"disk{i}"
        fmt: dict[str, Any] = {
            "driver": disk.format, "node-name": node, "read-only": disk.readonly,
            "file": {"driver": "file", "filename": os.path.abspath(disk.path),
                     "read-only": disk.readonly},
        }
        base = pinned.get(i)
        if base is not None:
            base_node: dict[str, Any] = {
                "driver": base.format, "node-name": f"base{i}", "read-only": True,
                "file": {"driver": "file", "filename": os.path.abspath(base.path),
                         "read-only": True},
            }
            if base.format in COW_DRIVERS:
                base_node["backing"] = None  # never follow a reference inside the base
            args += _blockdev(base_node)
            fmt["backing"] = f"base{i}"
        args += _blockdev(fmt)
        kind = "cd" if disk.cdrom else "hd"
        # a direct kernel boot takes bootindex 0 for its option ROM
        boot = "" if hw.kernel else f",bootindex={i}"
        if disk.bus is Bus.VIRTIO and not disk.cdrom:
            args += ["-device", f"virtio-blk-pci,drive={node},id=dev{i}{boot}"]
        elif disk.bus is Bus.SCSI or (disk.bus is Bus.VIRTIO and disk.cdrom):
            if "scsi" not in controllers:
                args += ["-device", "virtio-scsi-pci,id=scsi0"]
                controllers.add("scsi")
            args += ["-device", f"scsi-{kind},drive={node},bus=scsi0.0,id=dev{i}{boot}"]
        elif disk.bus is Bus.SATA or (disk.bus is Bus.IDE and hw.machine == "q35"):
            # q35's own controller is AHCI (ICH9); its ports are ide.0..ide.5
            if hw.machine == "q35":
                bus, sata_slot = f"ide.{sata_slot}", sata_slot + 1
            else:
                if "ahci" not in controllers:
                    args += ["-device", "ahci,id=sata0"]
                    controllers.add("ahci")
                bus, sata_slot = f"sata0.{sata_slot}", sata_slot + 1
            args += ["-device", f"ide-{kind},drive={node},bus={bus},id=dev{i}{boot}"]
        else:  # IDE on the pc machine's PIIX: two buses, master and slave on each
            if ide_slot >= 4:
                raise UsageError("the pc machine has only 4 IDE slots")
            args += ["-device", f"ide-{kind},drive={node},bus=ide.{ide_slot // 2},"
                                f"unit={ide_slot % 2},id=dev{i}{boot}"]
            ide_slot += 1
    return args


def segment_group(segment: str) -> tuple[str, int]:
    """The multicast group and port that carry the named segment (stable per name)."""
    digest = hashlib.sha256(f"vmforge-segment/{segment}".encode()).digest()
    # 239.255.0.0/16 is the IPv4 organization-local scope (RFC 2365): never routed beyond
    # this site; the sender binds to loopback so frames stay on this host
    return f"239.255.{digest[0]}.{digest[1] or 1}", 20000 + int.from_bytes(digest[2:4]) % 40000


def _nic_args(hw: VirtualHardware, name: str) -> list[str]:
    args: list[str] = []
    for i, nic in enumerate(hw.nics):
        if nic.network == "none":
            continue  # a NIC with nothing behind it: QEMU would only warn, so omit it
        if nic.network == "user":
            netdev = f"user,id=net{i}"
            for fwd in nic.forwards:
                host, guest = parse_forward(fwd)
                # loopback only: a forward must not open the guest to the network
                netdev += f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
        else:
            # a named segment: QEMU's socket netdev on a multicast group, which needs no
            # root (a bridge or tap would); every VM on the segment joins the same group
            group, port = segment_group(nic.network)
            netdev = f"socket,id=net{i},mcast={group}:{port},localaddr=127.0.0.1"
        mac = nic.mac or default_mac(name, i)
        args += ["-netdev", netdev,
                 "-device", f"{NIC_DEVICES[nic.model]},netdev=net{i},mac={mac},id=nic{i}"]
    return args


def _firmware_args(hw: VirtualHardware, state: VmState) -> list[str]:
    if hw.firmware is Firmware.BIOS:
        return []
    code = next((p for p in OVMF_CODE if os.path.exists(p)), None)
    template = next((p for p in OVMF_VARS if os.path.exists(p)), None)
    if code is None or template is None:
        raise MachineError("UEFI firmware (OVMF) is not installed", hint="install the ovmf package")
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={state.dir.absolute() / 'efivars.fd'}"]


def build_command(qemu: str, hw: VirtualHardware, state: VmState, accel: Accel, *,
                  pinned: dict[int, PinnedBase] | None = None, sandbox: bool = True,
                  incoming: str | None = None, qmp_name: str = "qmp.sock",
                  pid_name: str = "qemu.pid", console_name: str = "console.sock") -> list[str]:
    """The full QEMU command line for ``hw`` (pure: starts and opens nothing).

    ``incoming`` (a migration URI such as ``tcp:127.0.0.1:4444``) starts a migration
    destination: QEMU waits for the state of the running source instead of booting. It
    runs beside the source in the same directory, so its QMP socket, pid file and console
    socket get other names (``qmp_name``, ``pid_name``, ``console_name``) until the source
    has gone.
    """
    hw.validate()
    d = state.dir.absolute()
    argv = [qemu, "-name", f"{state.name},process=vmforge-{state.name}",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", hw.machine, *accel.qemu_args(hw.cpus),
            "-smp", str(hw.cpus), "-m", f"{hw.memory >> 20}M"]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += _firmware_args(hw, state)
    argv += _disk_args(hw, pinned or {})
    argv += _nic_args(hw, state.name)
    # the balloon lets 'vmforge vm set --memory' take memory back from a running guest
    argv += ["-device", "virtio-balloon-pci,id=balloon0"]
    if hw.serial:
        # a UNIX socket 'vmforge vm console' connects to (one client at a time: QEMU stops
        # accepting while one is connected); QEMU copies all the port's output into the log
        # whether or not a client is connected (checked on QEMU 7.2). logappend: a migration
        # destination writes on after what the source wrote
        argv += ["-chardev", f"socket,id=serial0,path={d / console_name},server=on,wait=off,"
                             f"logfile={d / 'serial.log'},logappend=on",
                 "-serial", "chardev:serial0"]
    if hw.kernel:
        argv += ["-kernel", os.path.abspath(hw.kernel)]
        if hw.initrd:
            argv += ["-initrd", os.path.abspath(hw.initrd)]
        if hw.append:
            argv += ["-append", hw.append]
    argv += ["-chardev", f"socket,id=qmp,path={d / qmp_name},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control",
             "-pidfile", str(d / pid_name), "-daemonize"]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


class Machine:
    """A running (or about to run) QEMU for one VM directory.

    Used as a context manager, leaving the block stops the VM (graceful first).
    Every method works from any process: state is found through the directory.
    """

    def __init__(self, state: VmState) -> None:
        self.state = state
        self.qmp_ready_seconds: float | None = None

    # --- start --------------------------------------------------------------------------
    def launch(self, argv: Sequence[str], timeout: float = 60.0) -> None:
        """Start QEMU; raises LaunchError with exit code, command and output."""
        if self.state.running():
            raise MachineError(f"VM {self.state.name!r} is already running")
        self.state.clean_runtime_files()
        start = time.monotonic()
        try:
            result = run(argv, timeout=timeout, check=False)
        except CommandError as err:
            self.kill()
            raise LaunchError(f"QEMU did not start: {err}", argv=list(argv), returncode=None,
                              output=err.output) from None
        if result.returncode != 0:
            output = (result.stderr + result.stdout).strip()
            tail = " | ".join(output.splitlines()[-3:]) or "no output"
            code = result.returncode
            how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0
                   else f"exited with code {code}")
            raise LaunchError(f"QEMU {how}: {tail}",
                              argv=list(argv), returncode=result.returncode, output=output,
                              hint=f"command: {describe(list(argv))}")
        if self.state.pid() is None:
            raise LaunchError("QEMU exited right after starting", argv=list(argv),
                              returncode=result.returncode, output=result.stderr,
                              hint=f"see {self.state.serial_path}")
        status = self.qmp("query-status")
        self.qmp_ready_seconds = time.monotonic() - start
        if not isinstance(status, dict) or "status" not in status:
            raise MachineError(f"unexpected QMP answer to query-status: {status!r}")

    def qmp(self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return qmp(str(self.state.qmp_path.absolute()), command, args, timeout)

    def qmp_session(self, commands: Sequence[Command], timeout: float = 10.0) -> list[Any]:
        """Several QMP commands in one connection (stops at the first that fails)."""
        return qmp_session(str(self.state.qmp_path.absolute()), commands, timeout)

    def wait_for_marker(self, markers: Sequence[str], timeout: float) -> tuple[str, float]:
        """Wait until one of ``markers`` appears on the serial log; (marker, seconds).

        Raises GuestTimeout after ``timeout`` seconds, MachineError if QEMU exits.
        """
        start = time.monotonic()
        wanted = [m.encode() for m in markers]
        seen = b""
        while True:
            try:
                with open(self.state.serial_path, "rb") as log:
                    seen = log.read()
            except FileNotFoundError:
                pass
            for m, raw in zip(markers, wanted, strict=True):
                if raw in seen:
                    return m, time.monotonic() - start
            elapsed = time.monotonic() - start
            if not self.state.running():
                raise MachineError(f"VM {self.state.name!r} stopped before the guest was up "
                                   f"({elapsed:.1f} s)")
            if elapsed > timeout:
                raise GuestTimeout(
                    f"the guest did not print {' or '.join(map(repr, markers))} within "
                    f"{timeout:g} s", hint=f"see 'vmforge vm logs {self.state.name}'")
            time.sleep(0.1)

    # --- stop ---------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> str:
        """ACPI power-down, then QMP quit, then SIGKILL; returns which one ended it."""
        pid = self.state.pid()
        if pid is None:
            self.state.clean_runtime_files()
            return "not running"
        how = "kill"
        try:
            self.qmp("system_powerdown", timeout=5)
            if wait_gone(self.state, pid, timeout):
                how = "powerdown"
        except MachineError:
            pass
        if how == "kill":
            try:
                self.qmp("quit", timeout=5)
                if wait_gone(self.state, pid, 5):
                    how = "quit"
            except MachineError:
                pass
        if how == "kill":
            self._sigkill(pid)
        self.state.clean_runtime_files()
        return how

    def kill(self) -> bool:
        """SIGKILL the VM's QEMU at once; True if one was running."""
        pid = self.state.pid()
        if pid is not None:
            self._sigkill(pid)
        self.state.clean_runtime_files()
        return pid is not None

    def _sigkill(self, pid: int) -> None:
        if process_is_vm(pid, self.state.dir):  # never a recycled pid of another program
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        if not wait_gone(self.state, pid, 10):
            raise MachineError(f"QEMU (pid {pid}) of VM {self.state.name!r} survived SIGKILL")

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
