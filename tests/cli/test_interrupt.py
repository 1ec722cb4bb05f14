"""A convert stopped by SIGTERM or Ctrl-C leaves nothing under (or beside) the destination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

VMFORGE = [sys.executable, "-m", "vmforge"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_convert_leaves_no_output(tmp_path, sig):
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:  # incompressible data so that -c takes a while
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "big.qcow2"
    proc = subprocess.Popen([*VMFORGE, "convert", "-c", "-m", "1", "-O", "qcow2", str(src), str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until the temporary output exists, then interrupt
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(out_dir.iterdir()) and proc.poll() is None:
        time.sleep(0.01)
    if not any(out_dir.iterdir()):
        proc.kill()
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"convert never started writing (exit {proc.returncode}): {err[-2000:]}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert err.strip().startswith("vmforge: interrupted"), err
    assert list(out_dir.iterdir()) == [], "a temporary or partial output was left behind"
