"""Fixtures for VM tests: the test guest (built once per machine) and a VM state root."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.data.guest import Guest, GuestUnavailable, build
from vmforge.runtime.state import vm_processes

QEMU_SYSTEM = shutil.which("qemu-system-x86_64")


def qemu_processes(root: Path) -> list[int]:
    """Live (non-zombie) processes whose command line names ``root``."""
    return vm_processes(root)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def guest() -> Guest:
    if QEMU_SYSTEM is None:
        pytest.skip("qemu-system-x86_64 is not installed (make apt)")
    try:
        return build()
    except GuestUnavailable as err:
        pytest.skip(f"cannot build the test guest: {err}")


@pytest.fixture(scope="session")
def _vm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one root per session so the KVM probe result (cached in it) is reused
    return tmp_path_factory.mktemp("vms")


@pytest.fixture
def vm_root(_vm_root: Path, monkeypatch: pytest.MonkeyPatch):
    """VMFORGE_STATE_DIR for this test; afterwards no QEMU of it may still run."""
    monkeypatch.setenv("VMFORGE_STATE_DIR", str(_vm_root))
    yield _vm_root
    leftovers = qemu_processes(_vm_root)
    for pid in leftovers:  # clean up before failing, so one bug does not leak into others
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"QEMU processes left running: {leftovers}"


def wait_serial(path: Path, done: Iterable[str], timeout: float) -> str:
    """The serial log once every entry of ``done`` is in it (or the time is up)."""
    wanted = tuple(done)
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text(errors="replace") if path.exists() else ""
        if all(d in log for d in wanted) or time.monotonic() > deadline:
            return log
        time.sleep(0.3)
