"""CLI contract: entry points, one-line errors, no tracebacks unless --debug, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import assert_clean_error, describe, run_vmforge, vmforge_ok


def test_console_script_and_module_both_work(tmp_path):
    p1 = run_vmforge("--help", isolated=True)
    p2 = subprocess.run([sys.executable, "-m", "vmforge", "--help"], capture_output=True, text=True,
                        timeout=60)
    assert p1.returncode == 0, describe(p1)
    assert p2.returncode == 0, p2.stderr
    for cmd in ("info", "create", "convert", "compare", "map", "check", "measure"):
        assert cmd in p1.stdout


ERROR_CASES = {
    "missing-file": ("info", "{tmp}/nope.qcow2"),
    "directory": ("info", "{tmp}"),
    "unknown-format": ("info", "-f", "nosuchfmt", "{tmp}/x.raw"),
    "unknown-command": ("frobnicate",),
    "bad-size": ("create", "-f", "qcow2", "{tmp}/a.qcow2", "12Q"),
    "negative-size": ("create", "-f", "qcow2", "{tmp}/a.qcow2", "-5"),
    "create-no-size": ("create", "-f", "qcow2", "{tmp}/a.qcow2"),
    "convert-no-dest": ("convert", "-O", "raw", "{tmp}/x.raw"),
    "convert-bad-out-fmt": ("convert", "-O", "nosuchfmt", "{tmp}/x.raw", "{tmp}/y"),
    "compress-raw": ("convert", "-c", "-O", "raw", "{tmp}/x.raw", "{tmp}/y.raw"),
    "bad-option": ("convert", "-O", "qcow2", "-o", "cluster_size=3", "{tmp}/x.raw", "{tmp}/y.qcow2"),
    "measure-nothing": ("measure", "-O", "qcow2"),
    "measure-both": ("measure", "-O", "qcow2", "--size", "1G", "{tmp}/x.raw"),
    "map-bad-output": ("map", "--output=xml", "{tmp}/x.raw"),
    "snapshot-on-raw": ("convert", "-l", "s1", "-O", "raw", "{tmp}/x.raw", "{tmp}/y.raw"),
    "wrong-format": ("info", "-f", "qcow2", "{tmp}/x.raw"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_without_traceback(tmp_path, case):
    (tmp_path / "x.raw").write_bytes(b"\x01" * 65536)
    args = [a.format(tmp=tmp_path) for a in ERROR_CASES[case]]
    proc = run_vmforge(*args, timeout=60, isolated=True)
    assert_clean_error(proc)


def test_qemu_agrees_these_are_errors(tmp_path):
    (tmp_path / "x.raw").write_bytes(b"\x01" * 65536)
    for case in ("missing-file", "unknown-format", "bad-size", "create-no-size", "compress-raw",
                 "bad-option", "measure-nothing", "wrong-format"):
        args = [a.format(tmp=tmp_path) for a in ERROR_CASES[case]]
        assert qemu_img(*args, check=False).returncode != 0, case


def test_debug_shows_traceback(tmp_path):
    proc = run_vmforge("--debug", "info", tmp_path / "nope.qcow2", isolated=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr or "vmforge:" in proc.stderr


def test_info_human_output(tmp_path):
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", path, "10M")
    out = vmforge_ok("info", path).stdout
    assert "file format: qcow2" in out
    assert "10 MiB (10485760 bytes)" in out
    assert "cluster_size: 65536" in out


@pytest.mark.parametrize("cmd", [
    ("info", "--output=json", "{img}"), ("map", "--output=json", "{img}"), ("info", "{img}"),
    ("check", "--output=json", "{img}"), ("measure", "--output=json", "-O", "qcow2", "{img}"),
    ("compare", "{img}", "{img}"), ("info", "{tmp}/missing.qcow2"),
])
def test_in_process_runner_matches_real_process(tmp_path, cmd):
    """The suite runs most CLI calls in-process for speed; it must see what a user sees."""
    from tests.helpers import run_vmforge_inprocess

    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "10M")
    from tests.data.qemu import qemu_io

    qemu_io(img, ["write -P 0x33 1M 128k", "write -z 3M 64k"])
    args = [a.format(img=img, tmp=tmp_path) for a in cmd]
    real = run_vmforge(*args, isolated=True)
    inproc = run_vmforge_inprocess(*args)
    assert (inproc.returncode, inproc.stdout, inproc.stderr) == \
        (real.returncode, real.stdout, real.stderr)


#: commands that read no image: nothing to distrust ("vm" manages VMs that 'run' started,
#: "host" reports the host's capacity)
NO_INPUT_IMAGE = {"formats", "create", "vm", "host"}


def test_every_command_that_reads_an_image_accepts_untrusted():
    """SECURITY.md: every command takes --untrusted (no file but the named one is opened)."""
    import argparse

    from vmforge.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, cmd in sub.choices.items():
        options = {o for a in cmd._actions for o in a.option_strings}
        if name not in NO_INPUT_IMAGE and "--untrusted" not in options:
            missing.append(name)
    assert not missing, f"commands without --untrusted: {missing}"


def test_untrusted_refuses_overlays_in_every_image_command(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    vmforge_ok("create", "-q", "-f", "qcow2", base, "1M")
    vmforge_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    for args in (["info"], ["map"], ["check"], ["convert", "-O", "raw"], ["resize"],
                 ["commit"], ["clone", "--full"], ["overlay"]):
        extra = {"convert": [tmp_path / "o.raw"], "resize": ["2M"],
                 "clone": [tmp_path / "c.qcow2"], "overlay": [tmp_path / "v.qcow2"]}
        proc = run_vmforge(*args, "--untrusted", top, *extra.get(args[0], []))
        assert_clean_error(proc, contains="refused in untrusted mode")
    assert not (tmp_path / "o.raw").exists() and not (tmp_path / "c.qcow2").exists()
