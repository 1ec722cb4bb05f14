"""The convert benchmark (bench/convert.py) keeps working: a tiny run of every part of it.

The benchmark is run as ``make bench`` runs it (a child process), at the smallest
settings: 8 MiB mixed image, 2 MiB in the sparse disks, one repetition, no Debian OS
image (it would download packages). Its verification must turn a wrong output into
exit 1, and a source that cannot be built into a skipped section, not a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "convert.py"
TINY = ["--size", "8M", "--sparse-data", "2M", "--reps", "1", "--no-os-image"]


def bench(*args: str | Path, env: dict[str, str] | None = None, code: str | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the benchmark script (or ``code`` with bench/ and scripts/ importable)."""
    argv = [sys.executable, str(BENCH), *map(str, args)] if code is None else \
        [sys.executable, "-c", code, *map(str, args)]
    full_env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **(env or {}))
    full_env.pop("VMFORGE_BENCH_DIR", None)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=full_env)


def section(markdown: str, heading: str) -> str:
    """The text under ``### heading`` up to the next heading."""
    m = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^### |\Z)", markdown, re.S | re.M)
    assert m, f"no section {heading!r} in\n{markdown}"
    return m.group(1)


@pytest.mark.slow
def test_quick_run_measures_and_verifies_every_group(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    proc = bench("--quick", *TINY, "--scaling", "1,2", "--cache-dir", tmp_path / "cache",
                 "--markdown", md)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n"), "the rest of the file must be kept"
    assert text.count("<!-- bench:convert -->") == 1 and "<!-- /bench:convert -->" in text
    assert "Every vmforge output passed `qemu-img compare`" in text
    assert "FAILED" not in text

    # every measured row has both tools' times, a ratio, the best runs' ratio, CPU use and RSS
    row = re.compile(r"^\| (?P<title>[^|]+) \| (?P<q>\d+\.\d\d) \| (?P<v>\d+\.\d\d) \| "
                     r"(?P<ratio>\d+\.\d\d)× \| [^|]+ \| (?P<best>\d+\.\d\d)× \| "
                     r"(?P<size>\d\.\d{3}) \| "
                     r"(?P<qcpu>\d+\.\d) cores \| (?P<vcpu>\d+\.\d) cores \| (?P<qrss>\d+) \| "
                     r"(?P<vrss>\d+) \|$", re.M)
    expected = {
        "Uncompressed targets": ["raw → qcow2", "qcow2 → raw"],
        "Compressed writes": ["raw → qcow2 -c (zlib)"],
        "Reading compressed images": ["qcow2 zlib → raw"],
        "Sparse disks: time follows the data, not the virtual size": [
            "raw 1 TiB virtual / 2 MiB data → qcow2", "raw 1 TiB virtual / 4 MiB data → qcow2",
            "raw 16 GiB virtual / 2 MiB data → qcow2"],
        "Export": ["vmforge export --target vmware"],
    }
    for heading, titles in expected.items():
        rows = {m["title"]: m for m in row.finditer(section(text, heading))}
        for title in titles:
            match = next((m for t, m in rows.items() if t.startswith(title)), None)
            assert match, f"no measured row {title!r} under {heading!r}:\n{section(text, heading)}"
            assert float(match["q"]) > 0 and float(match["v"]) > 0
            assert int(match["vrss"]) > 0 and float(match["vcpu"]) > 0
            # the ratio of the unrounded medians, within the rounding of the shown times
            q, v, ratio = float(match["q"]), float(match["v"]), float(match["ratio"])
            low, high = (v - 0.005) / (q + 0.005), (v + 0.005) / max(q - 0.005, 1e-9)
            assert low - 0.005 <= ratio <= high + 0.005, match.group(0)
            # one run per tool (--reps 1): its best run is its median
            assert match["best"] == match["ratio"], match.group(0)
    # the kernel copy floor is timed (and verified) for the uncompressed cases only
    floor = re.compile(r"^\| (?P<title>[^|]+) \| (?P<floor>\d+\.\d\d) \| (?P<q>[+-]\d+\.\d\d) \| "
                       r"(?P<v>[+-]\d+\.\d\d) \| (?P<qb>\d+\.\d\d)× \| (?P<vb>\d+\.\d\d)× \|$", re.M)
    floors = {m["title"]: m for m in floor.finditer(section(text, "Uncompressed targets"))}
    assert set(floors) == {"raw → qcow2", "qcow2 → raw"}, section(text, "Uncompressed targets")
    for title, m in floors.items():
        measured = next(r for r in row.finditer(section(text, "Uncompressed targets"))
                        if r["title"] == title)
        assert float(m["floor"]) > 0
        assert abs(float(measured["v"]) - float(m["floor"]) - float(m["v"])) <= 0.011, m.group(0)
    assert "kernel copy floor" not in section(text, "Compressed writes")
    assert "≤ 0.20×, size ≤ 1.05:" in section(text, "Compressed writes")
    assert "(twice the data, same virtual size): vmforge" in section(
        text, "Sparse disks: time follows the data, not the virtual size")
    assert "_Skipped: not run (--no-os-image)_" in section(text, "OS image: real Debian files in ext4")

    scaling = section(text, "Scaling: vmforge with -m workers")
    assert re.search(r"^\| case \| -m 1 \| -m 2( \(default\))? \| fastest vs -m 1 \|$", scaling, re.M)
    assert re.search(r"^\| raw → qcow2 -c \(zlib\) \| \d+\.\d\d s, \d+\.\d cores \| "
                     r"\d+\.\d\d s, \d+\.\d cores \| \d+\.\d\d× \(-m [12]\) \|$", scaling, re.M), scaling
    # the sources were generated once into the cache, outputs were removed
    cache = tmp_path / "cache"
    assert (cache / "mixed-8M-s1-v1.raw").stat().st_size == 8 << 20
    assert (cache / "sparse-1048576M-2M-s1-v1.raw").stat().st_size == 1 << 40
    assert not list((cache / "out").iterdir())


def test_a_wrong_output_fails_the_run(tmp_path: Path) -> None:
    """A 'vmforge' whose raw output has a flipped byte: exit 1, FAILED, no markdown."""
    real = REPO / ".venv" / "bin" / "vmforge"
    if not real.exists():
        pytest.skip("no .venv/bin/vmforge")
    fake = tmp_path / "wrong-vmforge"
    fake.write_text(
        "#!/bin/bash\n"
        f"{real} \"$@\" || exit $?\n"
        'for last; do :; done\n'  # the output file is the last argument
        'if [ -f "$last" ]; then printf "\\xab\\xcd" | dd of="$last" bs=1 seek=1000000 '
        "conv=notrunc status=none; fi\n")
    fake.chmod(0o755)
    md = tmp_path / "B.md"
    proc = bench(*TINY, "--cases", "qcow2-raw", "--tools", "vmforge", "--scaling", "off",
                 "--cache-dir", tmp_path / "cache", "--markdown", md,
                 env={"VMFORGE_CMD": str(fake)})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED qcow2-raw: vmforge: qemu-img compare" in proc.stderr
    assert "**Some vmforge runs FAILED verification" in proc.stdout
    assert not md.exists()


_SKIP_OS = """
import sys
sys.path[:0] = ["bench", "scripts"]
import osimage

def unreachable(path, roots=()):
    print("stub: building the OS image", file=sys.stderr)
    raise osimage.OSImageUnavailable("apt-get download exited 100: the mirror is unreachable")

osimage.build = unreachable
import convert
sys.exit(convert.main(sys.argv[1:]))
"""


def test_os_image_unavailable_is_skipped_not_failed(tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    proc = bench("--cases", "os-raw-qcow2,os-raw-vdi", "--reps", "1", "--scaling", "off",
                 "--cache-dir", tmp_path / "cache", "--markdown", md, code=_SKIP_OS)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    body = section(md.read_text(), "OS image: real Debian files in ext4")
    assert "_Skipped: the Debian OS image cannot be built: apt-get download exited 100: the " \
           "mirror is unreachable_" in body
    assert "| raw → qcow2 |" not in body
    assert proc.stderr.count("stub: building the OS image") == 1, "tried again for every case"


# ------------------------------------------------------------ pure parts, in process


@pytest.fixture()
def bench_modules() -> Iterator[dict[str, ModuleType]]:
    """bench/'s modules imported in this process, removed again afterwards."""
    import importlib

    names = ("sampledata", "toolpaths", "measure", "report", "osimage", "sources")
    saved = sys.path[:]
    sys.path[:0] = [str(REPO / "bench"), str(REPO / "scripts")]
    try:
        yield {n: importlib.import_module(n) for n in names}
    finally:
        sys.path[:] = saved
        for n in names:
            sys.modules.pop(n, None)


def test_targets_and_scaling_cells(bench_modules: dict[str, ModuleType]) -> None:
    measure, report = bench_modules["measure"], bench_modules["report"]

    def result(q: float, v: float, q_size: int = 100, v_size: int = 100) -> object:
        return measure.Result({"qemu-img": [measure.Run(q, 1 << 20, q, q_size, True)],
                               "vmforge": [measure.Run(v, 1 << 20, 2 * v, v_size, True)]})

    def cell(q: float, v: float, target: float, size_target: float | None = None,
             v_size: int = 100) -> str:
        row = report.Row("x", "x", "g", target, size_target, result(q, v, 100, v_size))
        return str(report.target_cell(row))

    assert cell(10, 1.9, 0.2) == "≤ 0.20×: met"
    assert cell(10, 2.1, 0.2) == "≤ 0.20×: **missed**"
    assert cell(10, 1, 0.2, 1.05, v_size=105) == "≤ 0.20×, size ≤ 1.05: met"
    assert cell(10, 1, 0.2, 1.05, v_size=106) == "≤ 0.20×, size ≤ 1.05: **missed**"
    r = result(10, 4)
    assert r.cores("vmforge") == pytest.approx(2.0) and r.cores("qemu-img") == pytest.approx(1.0)

    one = measure.Result({"vmforge": [measure.Run(t, 0, t, 1, True) for t in (9.0, 8.0, 30.0)]})
    two = measure.Result({"vmforge": [measure.Run(t, 0, 2 * t, 1, True) for t in (4.0, 5.0, 4.5)]})
    table = report.scaling_table({"c": ("raw → qcow2 -c", {1: one, 2: two})}, reused=2)
    assert "| case | -m 1 | -m 2 (default) | fastest vs -m 1 |" in table
    assert "| raw → qcow2 -c | 9.00 s, 1.0 cores | 4.50 s, 2.0 cores | 2.00× (-m 2) |" in table


def test_sources_are_deterministic(tmp_path: Path, bench_modules: dict[str, ModuleType]) -> None:
    sources = bench_modules["sources"]
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    sources.build_sparse(a, 64 << 20, 4 << 20)
    sources.build_sparse(b, 64 << 20, 4 << 20)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_blocks * 512 <= 5 << 20, "the sparse source must stay sparse"
    with open(a, "rb") as f:  # the last MiB always holds data
        f.seek(63 << 20)
        assert f.read(1 << 20).count(0) < (1 << 20) // 2
    sources.build_mixed(a, 16 << 20)
    data = a.read_bytes()
    holes = sum(data[i:i + (1 << 20)].count(0) == 1 << 20 for i in range(0, 16 << 20, 1 << 20))
    assert holes == 16 - round(16 * 0.4) - round(16 * 0.3)
