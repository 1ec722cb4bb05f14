"""Live migration of a running VM to a destination QEMU that vmforge starts itself.

The destination runs on this host (the only target vmforge can start a QEMU on) with
the same hardware and the same overlay file (shared storage: only RAM and device state
travel), started with ``-incoming tcp:HOST:PORT``. The source gets QMP ``migrate`` and
is polled with ``query-migrate`` until the migration completes; QEMU reports the total
time and the downtime (the final stop-and-copy pause; its default limit is 300 ms).
The destination resumes the guest by itself (it was not started with ``-S``).

While both run, they share the VM directory: the destination's QMP socket and pid file
have their own names (``incoming-TOKEN.sock``, ``incoming-TOKEN.pid``, console socket
``incoming-TOKEN.con``). Once the source has quit they are renamed to the usual names,
so every vmforge command reaches the destination. TOKEN is new for every migration
because QEMU unlinks its socket and pid file by their original names when it exits: a
reused name would make the next source's exit delete the next destination's files.
If anything fails, the destination is killed and the source keeps running the guest.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..util.run import CommandError, describe, run
from .accel import Accel
from .errors import LaunchError, MachineError
from .machine import find_qemu
from .qmp import qmp
from .state import VmState, process_is_vm, wait_gone
from .vm import launch_command

_URI = re.compile(r"^tcp:(?P<host>[^:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class Migrated:
    name: str
    uri: str
    source_pid: int
    destination_pid: int
    total_ms: int
    downtime_ms: int
    setup_ms: int | None
    transferred_bytes: int | None


def parse_uri(uri: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` on this host -> (host, port); raises UsageError."""
    m = _URI.match(uri)
    if not m or not 0 < int(m["port"]) < 65536:
        raise UsageError(f"invalid migration URI {uri!r}", hint="use tcp:127.0.0.1:PORT")
    if m["host"] not in LOCAL_HOSTS:
        raise UsageError(f"cannot start a destination QEMU on {m['host']}: vmforge migrates to "
                         "this host only", hint="use tcp:127.0.0.1:PORT")
    return m["host"].strip("[]"), int(m["port"])


def _port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port} for the migration: "
                             f"{err.strerror or err}", hint="choose a free port") from None


def _kill_destination(st: VmState, token: str) -> None:
    pid_path = st.dir / f"incoming-{token}.pid"
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid and process_is_vm(pid, st.dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(st, pid, 10)
    for path in (pid_path, pid_path.with_suffix(".sock"), pid_path.with_suffix(".con")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _start_destination(st: VmState, argv: list[str], token: str) -> int:
    try:
        result = run(argv, timeout=60, check=False)
    except CommandError as err:
        raise LaunchError(f"the destination QEMU did not start: {err}", argv=argv,
                          returncode=None, output=err.output) from None
    if result.returncode != 0:
        output = (result.stderr + result.stdout).strip()
        tail = " | ".join(output.splitlines()[-3:]) or "no output"
        raise LaunchError(f"the destination QEMU exited with code {result.returncode}: {tail}",
                          argv=argv, returncode=result.returncode, output=output,
                          hint=f"command: {describe(argv)}")
    pid = int((st.dir / f"incoming-{token}.pid").read_text().strip())
    status = qmp(str((st.dir / f"incoming-{token}.sock").absolute()), "query-status")
    if status.get("status") != "inmigrate":
        raise MachineError(f"the destination QEMU is {status.get('status')!r}, not waiting for "
                           "a migration")
    return pid


def migrate(st: VmState, uri: str, *, timeout: float = 300.0) -> Migrated:
    """Move the running VM ``st`` into a new QEMU listening on ``uri``.

    Raises UsageError (bad or busy URI), MachineError (not running, migration failed),
    LaunchError (the destination refused to start). The source runs on after a failure.
    """
    host, port = parse_uri(uri)
    src_pid = st.pid()
    if src_pid is None:
        raise MachineError(f"VM {st.name!r} is not running",
                           hint=f"start it first ('vmforge vm start {st.name}')")
    spec = st.read_spec()
    # the destination must emulate the same CPU: the same accelerator as the source
    accel = Accel(str(spec.get("accel") or "tcg"), str(spec.get("accel_reason") or ""))
    _port_free(host, port)
    token = secrets.token_hex(4)
    argv = launch_command(st, find_qemu(), accel, incoming=uri, qmp_name=f"incoming-{token}.sock",
                          pid_name=f"incoming-{token}.pid",
                          console_name=f"incoming-{token}.con")
    src_qmp = str(st.qmp_path.absolute())
    try:
        dst_pid = _start_destination(st, argv, token)
        qmp(src_qmp, "migrate", {"uri": uri})
        info = _wait_migration(src_qmp, timeout)
    except BaseException:
        _kill_destination(st, token)
        with contextlib.suppress(MachineError):
            # a failed or cancelled migration leaves the source running; make sure
            if qmp(src_qmp, "query-status").get("status") == "postmigrate":
                qmp(src_qmp, "cont")
        raise
    # the guest runs on the destination now; the source only holds a stale copy
    with contextlib.suppress(MachineError):
        qmp(src_qmp, "quit")
    if not wait_gone(st, src_pid, 10) and process_is_vm(src_pid, st.dir):
        os.kill(src_pid, signal.SIGKILL)
        wait_gone(st, src_pid, 10)
    st.clean_runtime_files()
    os.replace(st.dir / f"incoming-{token}.sock", st.qmp_path)
    os.replace(st.dir / f"incoming-{token}.pid", st.pid_path)
    with contextlib.suppress(FileNotFoundError):  # a VM without a serial port has none
        os.replace(st.dir / f"incoming-{token}.con", st.console_path)
    record = {"uri": uri, "time": time.time(), "total_ms": info.get("total-time"),
              "downtime_ms": info.get("downtime"), "source_pid": src_pid,
              "destination_pid": dst_pid}
    st.write_spec(dict(spec, command=argv, migrations=[*spec.get("migrations", []), record]))
    ram = info.get("ram") or {}
    return Migrated(st.name, uri, src_pid, dst_pid, int(info.get("total-time", 0)),
                    int(info.get("downtime", 0)), info.get("setup-time"),
                    ram.get("transferred"))


def _wait_migration(src_qmp: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    unfilled_since = 0.0
    while True:
        info: dict[str, Any] = qmp(src_qmp, "query-migrate")
        status = info.get("status")
        # A QEMU that itself arrived by migration reports its incoming side as
        # "completed" (qmp_query_migrate fills the destination state last), so only a
        # completion with the outgoing side's total-time is this migration's end. QEMU
        # 7.2 also sets "completed" in the migration thread before it computes the
        # times (migration_iteration_finish), so a query in between reads total-time
        # and downtime 0: poll until the times are filled in (a real migration takes
        # milliseconds at least), for a second at most.
        if status == "completed" and "total-time" in info:
            if info["total-time"] > 0:
                return info
            unfilled_since = unfilled_since or time.monotonic()
            if time.monotonic() - unfilled_since > 1.0:
                return info
        if status in ("failed", "cancelled"):
            raise MachineError(f"the migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            with contextlib.suppress(MachineError):
                qmp(src_qmp, "migrate_cancel")
            raise MachineError(f"the migration did not complete within {timeout:g} s",
                               hint="a guest that dirties memory faster than it can be sent "
                                    "never converges; it was cancelled")
        time.sleep(0.05)
