"""VM state directories (no QEMU needed)."""

from __future__ import annotations

import os
import stat

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
