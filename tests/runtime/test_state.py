"""VM state directories (no QEMU needed)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from vmforge.errors import UsageError
from vmforge.runtime import state
from vmforge.runtime.errors import VmExists, VmNotFound


def test_create_is_private_and_unique(tmp_path, monkeypatch):
    monkeypatch.setenv("VMFORGE_STATE_DIR", str(tmp_path / "root"))
    old = os.umask(0)
    try:
        st = state.create("web")
    finally:
        os.umask(old)
    assert st.dir == tmp_path / "root" / "web"
    assert stat.S_IMODE(st.dir.stat().st_mode) == 0o700
    with pytest.raises(VmExists, match="already exists"):
        state.create("web")
    assert state.unique_name("web") == "web-2"
    assert state.unique_name("my disk (1)") == "my-disk--1-"
    assert state.vm("web").dir == st.dir
    assert [v.name for v in state.all_vms()] == ["web"]
    assert st.status() == "incomplete" and not st.running()
    st.write_spec({"name": "web"})
    assert st.status() == "stopped" and st.read_spec() == {"name": "web"}


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "x" * 64, "sp ace"])
def test_bad_names(tmp_path, name):
    with pytest.raises(UsageError, match="invalid VM name"):
        state.create(name, tmp_path)


def test_missing_vm(tmp_path):
    with pytest.raises(VmNotFound):
        state.vm("ghost", tmp_path)


def test_socket_path_too_long(tmp_path):
    deep = tmp_path / ("d" * 100)
    with pytest.raises(UsageError, match="too long for a UNIX socket"):
        state.create("vm", deep)
    assert not (deep / "vm").exists()


def test_pid_must_name_the_directory(tmp_path):
    st = state.create("vm", tmp_path)
    # our own pid is alive but is not this VM's QEMU: a recycled pid never counts
    st.pid_path.write_text(f"{os.getpid()}\n")
    assert st.pid() is None and not st.running()
    assert state.process_is_vm(os.getpid(), tmp_path) is False
    st.qmp_path.write_text("")
    st.clean_runtime_files()
    assert not st.pid_path.exists() and not st.qmp_path.exists()


def test_not_gone_while_other_threads_still_hold_its_files(tmp_path):
    """A killed QEMU's leader turns zombie while its other threads still tear down, holding
    its sockets (a port forward kept answering after 'vm rm'). wait_gone waits for them."""
    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, socket, sys, threading, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True)\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n")],  # the leader exits, its thread runs on
        stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        deadline = time.monotonic() + 10
        while not state.exiting(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exiting(child.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the listening socket is still held
        assert not state.wait_gone(state.VmState(tmp_path / "vm"), child.pid, 0.3)
    finally:
        child.kill()
        child.wait()
    assert not state.exiting(child.pid)
    assert state.wait_gone(state.VmState(tmp_path / "vm"), child.pid, 1)
    assert not state.exiting(os.getpid())  # a live process with its memory is not exiting
