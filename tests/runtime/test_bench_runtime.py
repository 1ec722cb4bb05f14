"""bench/runtime.py (the runtime rows of `make bench`) runs end to end, so it cannot rot.

One real run with the smallest settings (1 rep, a budget of two clones: 2 boots, 1
migration, 1 refused clone), one run whose first check fails, and the pure helpers.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import qemu_processes

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "runtime.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_runtime", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_runtime"] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def short_dir():
    """A work directory short enough for the VMs' UNIX sockets (108 bytes), which
    pytest's per-worker tmp_path under xdist is not."""
    path = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, cwd=REPO)


def _median(section: str, row: str) -> float:
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {row}"))
    return float(line.split("|")[2].split()[0])


@pytest.mark.vm
def test_smallest_run_measures_verifies_and_writes_its_section(guest, tmp_path, short_dir):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- bench:convert -->\nconvert rows\n<!-- /bench:convert -->\n\n"
                  "### Notes\n\nkept as they are\n")
    work = short_dir / "w"
    proc = _bench("--reps", "1", "--memory", "128M", "--budget", "256M", "--work-dir", str(work),
                  "--markdown", str(md))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"machine: \d+ CPUs, .*QEMU emulator version .*load average", proc.stdout)
    assert not qemu_processes(short_dir)
    assert not [p for p in work.rglob("*") if p.suffix in (".sock", ".pid")]

    text = md.read_text()
    # the other sections are untouched; ours is appended once, after them
    assert text.startswith("# Benchmarks\n\n<!-- bench:convert -->\nconvert rows\n"
                           "<!-- /bench:convert -->\n\n### Notes\n\nkept as they are\n")
    assert text.count("<!-- bench:runtime -->") == 1 and text.rstrip().endswith(
        "<!-- /bench:runtime -->")
    section = text[text.index("<!-- bench:runtime -->"):]
    accel = re.search(r"Accelerator: \*\*(KVM|TCG)\*\* \((.+)\)\.", section)
    assert accel, section
    qmp = _median(section, f"QEMU start → QMP ready ({accel[1]})")
    marker = _median(section, f"QEMU start → guest marker `VMFORGE-GUEST-UP` ({accel[1]})")
    assert 0 < qmp < marker < 180
    total = _median(section, "live migration on loopback: total time")
    downtime = _median(section, "live migration: downtime")
    assert 0 < total < 60_000 and 0 <= downtime <= total
    assert _median(section, "live migration: RAM sent") > 1
    # two 128 MiB VMs fit in 256 MiB; vmforge's capacity check refused the third
    assert "**Linked clones in a 256 MiB budget, 128 MiB each: 2 ran at once**" in section
    assert "what vmforge's policy allows: 2" in section
    assert re.search(r'refused the next one: "starting the VM \(128 MiB\) would exceed the '
                     r"host's (memory )?capacity", section), section
    assert 0 < _median(section, "disk used at creation") < 16 * 1024  # KiB: overlays, no copy
    assert _median(section, "QEMU resident memory while all ran") > 10  # MiB
    assert "the base image's SHA-256 was unchanged" in section


@pytest.mark.vm
def test_a_failed_check_exits_1_writes_nothing_and_leaves_no_qemu(guest, tmp_path, short_dir):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    # no guest prints its marker within 1 s: `vmforge run` fails, so the boot row fails
    proc = _bench("--reps", "1", "--budget", "128M", "--boot-timeout", "1",
                  "--work-dir", str(short_dir / "w"), "--markdown", str(md), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: `vmforge run" in proc.stderr and "within 1 s" in proc.stderr, proc.stderr
    assert md.read_text() == "# Benchmarks\n"
    assert not qemu_processes(short_dir)


def test_bad_arguments_are_refused():
    for args in (["--budget", "64M"], ["--reps", "0"], ["--memory", "100.5M"],
                 ["--budget", "65G", "--memory", "1G"]):
        proc = _bench(*args, timeout=60)
        assert proc.returncode == 2 and "error:" in proc.stderr, (args, proc.stderr)


def test_markdown_section_is_replaced_in_place(tmp_path):
    bench = _load()
    md = tmp_path / "B.md"
    md.write_text("head\n\n<!-- bench:runtime -->\nold\n<!-- /bench:runtime -->\n\ntail\n")
    bench.write_markdown(md, "new body\n")
    assert md.read_text() == ("head\n\n<!-- bench:runtime -->\nnew body\n<!-- /bench:runtime -->"
                              "\n\ntail\n")
    missing = tmp_path / "none.md"
    bench.write_markdown(missing, "body")
    assert missing.read_text().endswith("<!-- bench:runtime -->\nbody\n<!-- /bench:runtime -->\n")


def test_counter_check_accepts_a_guest_that_went_on_and_rejects_a_restart():
    bench = _load()
    bench.check_counter_continues([0, 1, 2, 3, 4, 5], 3, "hop")
    bench.check_counter_continues([0, 1, 2, 0, 1, 2, 3, 4], 2, "hop")  # an earlier boot's log
    for counts, last in (([0, 1, 2, 3, 0, 1, 2], 3),  # restarted after the migration
                         ([0, 1, 2, 3], 3),           # stopped counting
                         ([5, 6, 8, 9], 6),           # lost a value
                         ([0, 1], 7)):                # the value seen before is gone
        with pytest.raises(bench.CheckFailed):
            bench.check_counter_continues(counts, last, "hop")
    # a number still being written at the end of the log is not a value yet
    assert [int(n) for n in bench.COUNT.findall(b"VMFORGE-COUNT 1\r\nVMFORGE-COUNT 1")] == [1]
