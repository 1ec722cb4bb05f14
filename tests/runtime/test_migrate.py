"""vm migrate: live migration on loopback into a QEMU that vmforge starts with -incoming."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time

import pytest

from tests.helpers import assert_clean_error, run_vmforge, sha256, vmforge_ok
from vmforge.errors import UsageError
from vmforge.runtime.migrate import parse_uri
from vmforge.runtime.state import VmState

from .conftest import qemu_processes

COUNT = re.compile(rb"VMFORGE-COUNT (\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counts(st: VmState) -> list[int]:
    return [int(m) for m in COUNT.findall(st.serial_path.read_bytes())]


def _wait_counts(st: VmState, n: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(_counts(st)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return _counts(st)


@pytest.mark.parametrize(("uri", "message"), [
    ("tcp:127.0.0.1", "invalid migration URI"),
    ("tcp:127.0.0.1:0", "invalid migration URI"),
    ("tcp:127.0.0.1:70000", "invalid migration URI"),
    ("unix:/tmp/x", "invalid migration URI"),
    ("tcp:192.0.2.1:4444", "this host only"),
])
def test_bad_uris(uri, message):
    with pytest.raises(UsageError, match=message):
        parse_uri(uri)


@pytest.mark.vm
def test_live_migration_on_loopback_keeps_the_guest_running(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    before = sha256(base)
    vmforge_ok("run", "--detach", "--untrusted", "-f", "raw", "--name", "mg", "--memory", "128M",
               "--net", "none", "--kernel", guest.kernel, "--initrd", guest.initrd, "--append",
               guest.append("vmforge.counter=1"), base)
    st = VmState(vm_root / "mg")
    _wait_counts(st, 2)
    src_pid = st.pid()

    # bad input first: nothing is started, the guest keeps running in its first QEMU
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_clean_error(run_vmforge("vm", "migrate", "mg", "--to", f"tcp:127.0.0.1:{port}"),
                           contains="Address already in use")
    assert_clean_error(run_vmforge("vm", "migrate", "mg", "--to", "tcp:203.0.113.9:4444"),
                       contains="this host only")
    assert qemu_processes(vm_root) == [src_pid]

    for _hop in range(2):  # twice: a former destination is a good source too
        last = _counts(st)[-1]
        proc = run_vmforge("vm", "migrate", "mg", "--to", f"tcp:127.0.0.1:{_free_port()}",
                           "--output", "json")
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout)
        assert done["source_pid"] == src_pid and done["destination_pid"] != src_pid
        assert 0 < done["total_ms"] < 60_000 and 0 <= done["downtime_ms"] <= done["total_ms"]
        assert done["transferred_bytes"] > 1 << 20
        # the source QEMU has exited; the VM directory leads to the destination
        assert qemu_processes(vm_root) == [done["destination_pid"]] == [st.pid()]
        assert sorted(p.name for p in st.dir.iterdir() if not p.name.startswith("disk")) == \
            ["console.sock", "qemu.pid", "qmp.sock", "serial.log", "spec.json"]
        shown = json.loads(vmforge_ok("vm", "show", "mg", "--output", "json").stdout)
        assert shown["status"] == "running" and shown["pid"] == done["destination_pid"]
        # the counter goes on in the same serial log, without starting over
        counts = _wait_counts(st, len(_counts(st)) + 2)
        after = counts[counts.index(last):]
        assert after == list(range(last, last + len(after))) and len(after) >= 3, counts
        src_pid = done["destination_pid"]
    spec = json.loads(st.spec_path.read_text())
    assert len(spec["migrations"]) == 2
    assert "stopped by powerdown" in vmforge_ok("vm", "stop", "mg").stdout
    assert not qemu_processes(vm_root)
    assert sha256(base) == before
    vmforge_ok("vm", "rm", "mg")
