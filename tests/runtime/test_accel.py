"""Accelerator choice. The probe guest itself is checked by running it under TCG."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmforge.errors import UsageError
from vmforge.runtime import accel
from vmforge.runtime.accel import PROBE_EXIT, choose_accel, probe_image

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def test_probe_image_is_a_boot_sector():
    img = probe_image()
    assert len(img) == 512 and img[510:] == b"\x55\xaa"


@needs_qemu
def test_probe_guest_reaches_long_mode_under_tcg(tmp_path):
    """The same boot sector the KVM probe runs, under TCG: it must exit with PROBE_EXIT,
    which it only does after the jump to 64-bit code."""
    disk = tmp_path / "probe.img"
    disk.write_bytes(probe_image())
    proc = subprocess.run([QEMU, "-nodefaults", "-display", "none", "-machine", "pc", "-accel",
                           "tcg", "-m", "16", "-drive", f"file={disk},format=raw,if=ide",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert proc.returncode == PROBE_EXIT, proc.stderr


def test_tcg_requested_skips_the_probe(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("probe must not run")
    monkeypatch.setattr(accel, "probe_kvm", boom)
    assert choose_accel("qemu", "tcg", tmp_path).name == "tcg"
    monkeypatch.setenv("VMFORGE_ACCEL", "tcg")
    assert choose_accel("qemu", None, tmp_path).name == "tcg"


def test_fallback_and_cache(monkeypatch, tmp_path):
    calls = []

    def probe(qemu, timeout=accel.PROBE_TIMEOUT):
        calls.append(qemu)
        return False, "KVM probe failed (test)"
    monkeypatch.delenv("VMFORGE_ACCEL", raising=False)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    first = choose_accel("qemu", None, tmp_path)
    assert first.name == "tcg" and "KVM probe failed (test)" in first.reason
    assert choose_accel("qemu", "auto", tmp_path) == first  # cached for this boot
    assert len(calls) == 1
    with pytest.raises(UsageError, match="KVM is not usable"):
        choose_accel("qemu", "kvm", tmp_path)
    assert len(calls) == 1


def test_kvm_when_probe_passes(monkeypatch, tmp_path):
    monkeypatch.delenv("VMFORGE_ACCEL", raising=False)
    monkeypatch.setattr(accel, "probe_kvm", lambda q, timeout=0: (True, "ran in 0.1 s"))
    chosen = choose_accel("qemu", None, None)
    assert chosen.name == "kvm" and chosen.qemu_args(2) == ["-accel", "kvm", "-cpu", "host"]


def test_unknown_accel():
    with pytest.raises(UsageError, match="unknown accelerator"):
        choose_accel("qemu", "hvf", None)


def test_probe_without_kvm_device(monkeypatch):
    monkeypatch.setattr(accel.os.path, "exists", lambda p: False)
    works, why = accel.probe_kvm("qemu")
    assert not works and "no /dev/kvm" in why
