"""vmforge host, capacity refusal with overcommit ratios, and the memory balloon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, run_vmforge, vmforge_ok
from vmforge.errors import UsageError
from vmforge.runtime import host as vmhost

from .conftest import qemu_processes


def test_policy_precedence(tmp_path, monkeypatch):
    for key in ("CPU_OVERCOMMIT", "MEMORY_OVERCOMMIT", "RESERVED_MEMORY"):
        monkeypatch.delenv(f"VMFORGE_{key}", raising=False)
    config = tmp_path / "host.json"
    monkeypatch.setenv("VMFORGE_HOST_CONFIG", str(config))
    assert vmhost.policy() == vmhost.Policy(4.0, 1.0, 512 << 20, "defaults")
    config.write_text(json.dumps({"memory_overcommit": 1.5, "reserved_memory": "1G"}))
    assert vmhost.policy() == vmhost.Policy(4.0, 1.5, 1 << 30, str(config))
    monkeypatch.setenv("VMFORGE_MEMORY_OVERCOMMIT", "0.5")
    assert vmhost.policy() == vmhost.Policy(4.0, 0.5, 1 << 30, "environment")


@pytest.mark.parametrize(("config", "env", "message"), [
    ({"cpu_overcommit": 2, "typo": 1}, {}, "takes only"),
    ({}, {"VMFORGE_CPU_OVERCOMMIT": "lots"}, "invalid cpu_overcommit"),
    ({}, {"VMFORGE_MEMORY_OVERCOMMIT": "0"}, "out of range"),
    ({"reserved_memory": "12Q"}, {}, "invalid reserved_memory"),
])
def test_bad_policies(tmp_path, monkeypatch, config, env, message):
    path = tmp_path / "host.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("VMFORGE_HOST_CONFIG", str(path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=message):
        vmhost.policy()


def test_host_command(vm_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VMFORGE_HOST_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("VMFORGE_ACCEL", "tcg")
    data = json.loads(vmforge_ok("host", "--output", "json").stdout)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert data["memory"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert data["cpus"] >= 1 and data["cpu_capacity"] == data["cpus"] * 4
    assert data["accel"] == "tcg" and data["policy_source"] == "defaults"
    assert "accelerator:   TCG" in vmforge_ok("host").stdout


@pytest.mark.vm
def test_capacity_refusal_and_balloon(guest, vm_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VMFORGE_HOST_CONFIG", str(tmp_path / "none.json"))
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    boot = ["-f", "raw", "--net", "none", "--memory", "256M", "--kernel", guest.kernel,
            "--initrd", guest.initrd, "--append", guest.append()]
    vmforge_ok("run", "--detach", "--name", "h1", *boot, base)
    held = json.loads(vmforge_ok("host", "--output", "json").stdout)
    assert {"name": "h1", "cpus": 1, "memory": 256 << 20} in held["vms"]

    # a memory budget that h1 already nearly fills: the next VM is refused, nothing starts
    total = held["memory"] - held["reserved_memory"]
    monkeypatch.setenv("VMFORGE_MEMORY_OVERCOMMIT", repr((held["memory_held"] + (128 << 20)) / total))
    proc = run_vmforge("run", "--detach", "--name", "h2", *boot, base)
    assert_clean_error(proc, contains="would exceed the host's memory capacity")
    assert "OVERCOMMIT" in proc.stderr
    proc = run_vmforge("run", "--detach", "--count", "2", "--name", "hc", *boot, base)
    assert_clean_error(proc, contains="starting 2 VMs (512 MiB)")
    monkeypatch.delenv("VMFORGE_MEMORY_OVERCOMMIT")
    monkeypatch.setenv("VMFORGE_CPU_OVERCOMMIT", repr((held["cpus_held"] + 0.5) / held["cpus"]))
    assert_clean_error(run_vmforge("run", "--detach", "--name", "h3", *boot, base),
                       contains="vCPUs are held")
    monkeypatch.delenv("VMFORGE_CPU_OVERCOMMIT")
    assert sorted(p.name for p in vm_root.iterdir() if p.is_dir()) == ["h1"]
    assert len(qemu_processes(vm_root)) == 1

    # the balloon: the guest gives memory back and takes it again
    for size in (160, 256):
        out = json.loads(vmforge_ok("vm", "set", "h1", "--memory", f"{size}M", "--output",
                                    "json").stdout)
        assert out["memory_target"] == out["memory_actual"] == size << 20, out
    assert_clean_error(run_vmforge("vm", "set", "h1", "--memory", "1G"),
                       contains="more than VM 'h1' was started with")
    vmforge_ok("vm", "rm", "--force", "h1")
    assert_clean_error(run_vmforge("vm", "set", "h1", "--memory", "128M"), contains="no VM named")
