"""bench/copy_phase.py keeps working: the in-process copy timing, at its smallest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "copy_phase.py"


def run(*args: str | Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMFORGE_BENCH_DIR=str(cache))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_times_both_copies_and_verifies_vmforge_output(tmp_path):
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:  # data, a hole, data, and a hole at the end
        f.write(os.urandom(3 << 20))
        f.seek(8 << 20)
        f.write(b"text " * 200_000)
        f.truncate(16 << 20)
    for fmt in ("qcow2", "vhdx"):
        proc = run("--reps", "1", "-O", fmt, src, cache=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"disk.raw -> {fmt}, 1 runs each" in proc.stdout
        for tool in ("floor", "vmforge"):
            assert re.search(rf"^  {tool} +median \d+\.\d{{3}} s", proc.stdout, re.M), proc.stdout
        assert "vmforge output: verified by qemu-img" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # outputs removed


def test_without_sources_it_says_where_it_looked(tmp_path):
    proc = run(cache=tmp_path)
    assert proc.returncode == 2
    assert f"none cached in {tmp_path}" in proc.stderr
