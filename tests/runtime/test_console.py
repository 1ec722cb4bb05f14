"""vmforge vm pause / resume / console: one boot (TCG) for the whole lifecycle, the refusals
without one."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import select
import socket
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, run_vmforge, vmforge_cmd, vmforge_json, vmforge_ok
from vmforge.errors import UsageError
from vmforge.model.hardware import VirtualHardware
from vmforge.runtime import console, state
from vmforge.runtime.accel import Accel
from vmforge.runtime.errors import MachineError
from vmforge.runtime.machine import build_command

from .conftest import qemu_processes

COUNT = re.compile(rb"VMFORGE-COUNT (\d+)")
ACTIONS = (["pause"], ["resume"], ["console", "--timeout", "1"])


def _counts(st: state.VmState) -> list[int]:
    return [int(n) for n in COUNT.findall(st.serial_path.read_bytes())]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _stopped_vm(root: Path, name: str) -> state.VmState:
    st = state.create(name, root)
    st.write_spec({"name": name, "hardware": VirtualHardware().to_dict()})
    return st


# --- no boot ---------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: a[0])
def test_unknown_vm_is_refused(vm_root, action):
    assert_clean_error(run_vmforge("vm", action[0], "ghost-vm", *action[1:]),
                       contains="no VM named 'ghost-vm'")


@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: a[0])
def test_stopped_vm_is_refused(vm_root, action):
    st = _stopped_vm(vm_root, f"idle-{action[0]}")
    try:
        assert_clean_error(run_vmforge("vm", action[0], st.name, *action[1:]),
                           contains=f"VM '{st.name}' is not running")
    finally:
        state.remove(st)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_console_timeout_must_be_positive(vm_root, timeout):
    assert_clean_error(run_vmforge("vm", "console", "any", f"--timeout={timeout}"),
                       contains="is not a positive number of seconds")


def test_second_console_client_is_refused(vm_root):
    """The console lock is taken before the connection: a second client hears why."""
    st = _stopped_vm(vm_root, "locked")
    fd = os.open(st.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a first 'vm console' holds
        with pytest.raises(MachineError, match="already has a console attached"):
            console.attach(st, 0, lambda data: None, interactive=False, timeout=1)
    finally:
        os.close(fd)
    # released: the next client gets as far as the (stopped) VM
    with pytest.raises(MachineError, match="is not running"):
        console.attach(st, 0, lambda data: None, interactive=False, timeout=1)
    state.remove(st)


def test_migration_destination_has_its_own_console_socket(tmp_path):
    st = state.VmState(tmp_path / "m")
    argv = build_command("qemu", VirtualHardware(), st, Accel("tcg", "test"),
                         qmp_name="incoming-0a1b2c3d.sock", pid_name="incoming-0a1b2c3d.pid",
                         console_name="incoming-0a1b2c3d.con")
    chardevs = [a for i, a in enumerate(argv[1:]) if argv[i] == "-chardev"]
    (serial,) = [c for c in chardevs if "id=serial0" in c]
    assert f"path={st.dir.absolute() / 'incoming-0a1b2c3d.con'}," in serial
    assert f"logfile={st.dir.absolute() / 'serial.log'},logappend=on" in serial


def test_every_socket_name_fits_sun_path(tmp_path):
    """create() measures the longest socket a VM directory will hold (a migration
    destination's QMP socket), not just qmp.sock: a root where qmp.sock would fit but
    that one would not is refused."""
    fits_qmp = state.MAX_SOCKET_PATH - len("/vm/qmp.sock")
    root = tmp_path / ("d" * (fits_qmp - len(str(tmp_path)) - 1))
    assert len(str(root / "vm" / "qmp.sock")) == state.MAX_SOCKET_PATH
    with pytest.raises(UsageError, match="too long for a UNIX socket"):
        state.create("vm", root)
    longest = len("/vm/") + len(state.LONGEST_SOCKET_NAME)
    ok_root = tmp_path / ("e" * (state.MAX_SOCKET_PATH - longest - len(str(tmp_path)) - 1))
    st = state.create("vm", ok_root)
    assert len(os.fsencode(str(st.dir / "incoming-0a1b2c3d.sock"))) == state.MAX_SOCKET_PATH


class _Alive:
    """Stands in for a VmState whose QEMU runs (the relay only asks that)."""

    def running(self) -> bool:
        return True


def _drain(sock: socket.socket, size: int, into: bytearray, hang_up: bool) -> None:
    while len(into) < size:
        chunk = sock.recv(4096)
        if not chunk:
            return
        into += chunk
        time.sleep(0.001)  # a slow guest: the relay must hold back, not buffer all stdin
    if hang_up:  # the guest's last words, then QEMU closes the connection
        sock.sendall(b"bye\r\n")
        sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("interactive", [False, True])
def test_relay_both_ways(interactive):
    """Without QEMU: a socket pair is the console. Everything on stdin reaches the guest in
    order (piped faster than the guest reads); guest bytes reach the output; Ctrl-] detaches
    only on a terminal, after sending what came before it; the guest closing ends it."""
    ours, guest_end = socket.socketpair()
    ours.setblocking(False)
    r, w = os.pipe()
    payload = bytes(random.Random(7).randrange(32, 127) for _ in range(300_000))
    tail = b"\x1d" if interactive else b""
    feeder = threading.Thread(target=lambda: (os.write(w, payload + tail), os.close(w)))
    received = bytearray()
    reader = threading.Thread(target=_drain,
                              args=(guest_end, len(payload), received, not interactive))
    out: list[bytes] = []
    guest_end.sendall(b"login: ")
    feeder.start()
    reader.start()
    try:
        why = console._relay(_Alive(), ours, r, out.append, interactive, 30)
        reader.join(30)
        assert bytes(received) == payload
        if interactive:
            assert why == "detached" and b"".join(out) == b"login: "
        else:
            # the end of stdin was not the end: the guest's later output still came
            assert why == "stopped" and b"".join(out) == b"login: bye\r\n"
    finally:
        feeder.join(30)
        os.close(r)
        ours.close()
        guest_end.close()


def test_relay_times_out_and_keeps_reading_after_eof():
    ours, guest_end = socket.socketpair()
    ours.setblocking(False)
    r, w = os.pipe()
    os.write(w, b"uname\n")
    os.close(w)
    start = time.monotonic()
    try:
        assert console._relay(_Alive(), ours, r, lambda data: None, False, 1.0) == "timeout"
        assert 0.9 < time.monotonic() - start < 5
        assert guest_end.recv(100) == b"uname\n"
    finally:
        os.close(r)
        ours.close()
        guest_end.close()


# --- one boot ----------------------------------------------------------------------------------

@pytest.mark.vm
def test_pause_resume_console(guest, vm_root, tmp_path):
    base = tmp_path / "empty.raw"
    base.write_bytes(bytes(1 << 20))
    vmforge_json("run", "--detach", "--name", "con1", "--net", "none", "-f", "raw",
                 "--memory", "256M", "--kernel", guest.kernel, "--initrd", guest.initrd,
                 "--append", guest.append("vmforge.counter=1", "vmforge.shell=1"), base)
    st = state.VmState(vm_root / "con1")
    try:
        _wait(lambda: len(_counts(st)) >= 2, 60, "the counter")
        assert b"VMFORGE-SHELL" in st.serial_path.read_bytes()

        # pause: the counter stops, and both list and show say so
        assert vmforge_ok("vm", "pause", "con1").stdout.strip() == "VM con1: paused"
        shown = json.loads(vmforge_ok("vm", "show", "con1", "--output", "json").stdout)
        assert shown["status"] == "paused" and shown["qemu_status"] == "paused"
        (row,) = [r for r in json.loads(vmforge_ok("vm", "list", "--output", "json").stdout)
                  if r["name"] == "con1"]
        assert row["status"] == "paused"
        assert "paused" in vmforge_ok("vm", "list").stdout.split("con1", 1)[1].split("\n")[0]
        frozen = _counts(st)
        time.sleep(2.5)
        assert _counts(st) == frozen
        assert "was already paused" in vmforge_ok("vm", "pause", "con1").stdout

        # resume: it counts on from where it stopped
        assert vmforge_ok("vm", "resume", "con1").stdout.strip() == "VM con1: resumed"
        _wait(lambda: len(_counts(st)) >= len(frozen) + 2, 20, "the counter after resume")
        counts = _counts(st)
        assert counts[:len(frozen) + 2] == list(range(counts[0], counts[0] + len(frozen) + 2))
        assert json.loads(vmforge_ok("vm", "show", "con1", "--output", "json").stdout)[
            "status"] == "running"
        assert "was not paused" in vmforge_ok("vm", "resume", "con1").stdout

        # the console: a real process (it reads its stdin); the guest's shell computes 42,
        # so the output proves the input reached the guest
        first = subprocess.Popen([*vmforge_cmd(), "vm", "console", "con1", "--timeout", "10"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert first.stderr is not None
        hello = first.stderr.readline().decode()
        assert hello.startswith("connected to the serial console of VM con1"), hello
        second = subprocess.run([*vmforge_cmd(), "vm", "console", "con1", "--timeout", "1"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=60)
        assert_clean_error(second, contains="already has a console attached")
        started = time.monotonic()
        out, err = first.communicate(b"echo VMFORGE-CONSOLE-$((6*7))\n", timeout=60)
        assert first.returncode == 0, err
        assert 5 < time.monotonic() - started < 30  # it ran until --timeout, not until EOF
        assert "VMFORGE-CONSOLE-42" in out.decode(errors="replace").splitlines() or \
            b"VMFORGE-CONSOLE-42\r\n" in out, out
        assert b"VMFORGE-COUNT" in out  # guest output reached stdout too
        assert "after 10 s" in err.decode()

        # the log kept everything: counter lines before, during and after the console
        log = vmforge_ok("vm", "logs", "con1").stdout
        assert "VMFORGE-CONSOLE-42" in log and log.count("VMFORGE-COUNT") > len(frozen) + 5
        logged = _counts(st)
        assert logged == list(range(logged[0], logged[0] + len(logged)))

        # on a terminal: raw mode while attached (keys go to the guest as typed), Ctrl-]
        # detaches, and the terminal is restored
        _interactive_session()

        # a console without --timeout ends when the VM stops
        attached = subprocess.Popen([*vmforge_cmd(), "vm", "console", "con1"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        assert attached.stderr is not None
        assert attached.stderr.readline().startswith(b"connected")
        assert "killed" in vmforge_ok("vm", "kill", "con1").stdout
        _, err = attached.communicate(timeout=30)
        assert attached.returncode == 0 and b"closed" in err, err
        assert not st.console_path.exists() and not st.qmp_path.exists()
        assert not qemu_processes(vm_root)
    finally:
        run_vmforge("vm", "rm", "--force", "con1")


def _read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the last holder of the terminal has gone
                break
            seen += chunk
    return seen


def _interactive_session() -> None:
    master, slave = os.openpty()
    try:
        cooked = termios.tcgetattr(slave)
        assert cooked[3] & termios.ICANON
        proc = subprocess.Popen([*vmforge_cmd(), "vm", "console", "con1"], stdin=slave,
                                stdout=slave, stderr=slave, start_new_session=True)
        try:
            hello = _read_until(master, b"Ctrl-] detaches", 30)
            assert b"connected to the serial console of VM con1" in hello, hello
            assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw
            # a carriage return ends the line, as the Enter key sends it in raw mode
            os.write(master, b"echo VMFORGE-TTY-$((6*7))\r")
            assert b"VMFORGE-TTY-42" in _read_until(master, b"VMFORGE-TTY-42", 20)
            os.write(master, b"\x1d")
            assert proc.wait(timeout=20) == 0
            assert b"detached from VM con1" in _read_until(master, b"keeps running", 5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert termios.tcgetattr(slave) == cooked
    finally:
        os.close(master)
        os.close(slave)
