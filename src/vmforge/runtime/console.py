"""Pause/resume a running VM and attach to its serial console.

The first serial port is a UNIX socket in the VM directory (``console.sock``, see
runtime/machine.py); QEMU also copies everything the port prints into ``serial.log``,
connected or not, so ``vmforge vm logs`` and the boot marker never depend on a console
client. ``attach`` relays bytes both ways between that socket and the caller's file
descriptors; the CLI owns the terminal (raw mode) and what is printed about it.

One console client at a time: QEMU's socket chardev stops accepting while a client is
connected, so a second one would hang silently in the listen backlog. ``attach`` holds
an exclusive ``flock`` on the VM directory while connected and refuses a second client
with a clear error instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import socket
import termios
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

from .errors import MachineError
from .qmp import qmp
from .state import VmState

#: the byte that detaches an interactive console: Ctrl-] (ASCII GS), as telnet and
#: virsh console use
DETACH = b"\x1d"
#: QEMU run states (QAPI RunState) in which 'pause'/'resume' would interfere with an
#: operation in progress: a migration or a snapshot save/load
BUSY_STATES = ("inmigrate", "postmigrate", "finish-migrate", "save-vm", "restore-vm",
               "prelaunch")
#: how often the relay checks that the VM still runs (seconds)
_POLL = 0.5
#: stdin is not read while this much waits for the guest (a guest reads its serial port
#: slowly; piping a big file in must not fill our memory)
_MAX_PENDING = 64 * 1024


def require_running(st: VmState) -> int:
    """The QEMU pid; MachineError if the VM is not running."""
    pid = st.pid()
    if pid is None:
        raise MachineError(f"VM {st.name!r} is not running",
                           hint=f"start it first ('vmforge vm start {st.name}')")
    return pid


def run_state(st: VmState) -> str:
    """QEMU's run state (QMP query-status), e.g. ``running`` or ``paused``."""
    require_running(st)
    status = qmp(str(st.qmp_path.absolute()), "query-status")
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        raise MachineError(f"unexpected QMP answer to query-status: {status!r}")
    return str(status["status"])


def pause(st: VmState) -> bool:
    """Stop the guest's CPUs (QMP ``stop``); False if it was already paused."""
    return _switch(st, "stop", already="paused", verb="paused")


def resume(st: VmState) -> bool:
    """Let a paused guest run on (QMP ``cont``); False if it was already running."""
    return _switch(st, "cont", already="running", verb="resumed")


def _switch(st: VmState, command: str, *, already: str, verb: str) -> bool:
    state = run_state(st)
    if state == already:
        return False
    if state in BUSY_STATES:
        raise MachineError(f"VM {st.name!r} is busy ({state}); it cannot be {verb} now",
                           hint="wait for the migration or snapshot to finish")
    qmp(str(st.qmp_path.absolute()), command)
    return True


@contextlib.contextmanager
def _exclusive(st: VmState) -> Iterator[None]:
    """The console lock: an flock on the VM directory, released when the process ends."""
    fd = os.open(st.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise MachineError(f"VM {st.name!r} already has a console attached",
                               hint="only one console client at a time; detach the other "
                                    "(Ctrl-]) or wait for it to end") from None
        yield
    finally:
        os.close(fd)


def _connect(st: VmState) -> socket.socket:
    require_running(st)
    path = st.console_path.absolute()
    if not path.exists():
        raise MachineError(f"VM {st.name!r} has no console socket",
                           hint="it has no serial port, or was started by an older vmforge: "
                                "restart it ('vmforge vm stop', 'vmforge vm start')")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(os.fspath(path))
    except OSError as err:
        sock.close()
        raise MachineError(f"cannot connect to the console of VM {st.name!r}: "
                           f"{err.strerror or err}") from None
    sock.setblocking(False)
    return sock


def attach(st: VmState, stdin_fd: int, output: Callable[[bytes], None], *,
           interactive: bool, timeout: float | None = None,
           on_connected: Callable[[], None] | None = None) -> str:
    """Relay ``stdin_fd`` -> guest and guest -> ``output`` until one of:

    ``detached`` (interactive and the user typed Ctrl-]), ``stopped`` (the VM stopped or
    QEMU closed the connection), ``timeout`` (after ``timeout`` seconds). The end of
    stdin does not end a non-interactive session: guest output keeps coming until the VM
    stops or the time is up (KeyboardInterrupt propagates to the caller).
    Raises MachineError when the VM is not running or a console is already attached.
    """
    with _exclusive(st):
        sock = _connect(st)
        try:
            if on_connected is not None:
                on_connected()
            return _relay(st, sock, stdin_fd, output, interactive, timeout)
        finally:
            sock.close()


def _relay(st: VmState, sock: socket.socket, stdin_fd: int, output: Callable[[bytes], None],
           interactive: bool, timeout: float | None) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    # poll, not epoll: epoll refuses (EPERM) a regular file or /dev/null as stdin, which
    # poll reports as always readable
    sel = selectors.PollSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(stdin_fd, selectors.EVENT_READ)
    stdin_open, reading = True, True
    pending = b""  # stdin bytes the guest has not taken yet
    try:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return "timeout"
            wait = _POLL if deadline is None else min(_POLL, deadline - now)
            for key, events in sel.select(wait):
                if key.fileobj is sock and events & selectors.EVENT_READ:
                    data = _recv(sock)
                    if data == b"":
                        return "stopped"
                    if data:
                        output(data)
                elif key.fileobj == stdin_fd:
                    data = os.read(stdin_fd, 4096)
                    if not data:
                        # end of input: stop reading it but keep the connection open
                        # (a half-close would make QEMU drop the client)
                        stdin_open = False
                    elif interactive and DETACH in data:
                        _send_all(sock, pending + data[:data.index(DETACH)])
                        return "detached"
                    else:
                        pending += data
            if pending:
                pending = pending[_send(sock, pending):]
            if reading != (stdin_open and len(pending) < _MAX_PENDING):
                reading = not reading
                if reading:
                    sel.register(stdin_fd, selectors.EVENT_READ)
                else:
                    sel.unregister(stdin_fd)
            # wake up when the socket can take more only while something waits to go
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
            if sel.get_key(sock).events != events:
                sel.modify(sock, events)
            if not st.running():
                return "stopped"
    finally:
        sel.close()


def _recv(sock: socket.socket) -> bytes | None:
    """Guest bytes; None when there is nothing after all, b"" when QEMU closed."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""  # reset by QEMU: the same as closed


def _send(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as err:
        raise MachineError(f"the console connection broke: {err.strerror or err}") from None


def _send_all(sock: socket.socket, data: bytes) -> None:
    deadline = time.monotonic() + 5
    while data and time.monotonic() < deadline:
        data = data[_send(sock, data):]
        if data:
            time.sleep(0.01)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode for the block, restored on any exit."""
    saved: list[Any] = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
