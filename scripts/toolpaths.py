"""Finding and running the external tools that the demo and the benchmarks drive.

vmforge is run as a command (as a user would), never imported, so these scripts test
the installed CLI. ``VMFORGE_CMD`` overrides the command, e.g. ``python -m vmforge``.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ToolMissing(Exception):
    """A tool that is needed is not installed or does not run."""


def run(cmd: Sequence[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command with stdin closed, capturing text output.

    With ``check``, a non-zero exit raises RuntimeError carrying the command and stderr.
    """
    proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def find_vmforge() -> list[str]:
    """The command prefix that runs the vmforge CLI; ToolMissing if none works.

    Tried in order: $VMFORGE_CMD, the ``vmforge`` script beside this interpreter, the
    repository's .venv, PATH, then ``python -m vmforge``. The first whose ``--help``
    exits 0 wins.
    """
    candidates: list[list[str]] = []
    if env := os.environ.get("VMFORGE_CMD"):
        candidates.append(shlex.split(env))
    scripts = [Path(sys.executable).with_name("vmforge"), REPO / ".venv" / "bin" / "vmforge"]
    if found := shutil.which("vmforge"):
        scripts.append(Path(found))
    for script in scripts:
        if script.is_file() and os.access(script, os.X_OK) and [str(script)] not in candidates:
            candidates.append([str(script)])
    try:
        if importlib.util.find_spec("vmforge.__main__") is not None:
            candidates.append([sys.executable, "-m", "vmforge"])
    except ImportError:
        pass
    if not candidates:
        raise ToolMissing(
            "the vmforge CLI was not found. Run `make setup` (it installs vmforge into .venv) "
            "and use .venv/bin/python, or set VMFORGE_CMD."
        )
    errors = []
    for cmd in candidates:
        try:
            proc = run([*cmd, "--help"])
        except OSError as err:
            errors.append(f"  {shlex.join(cmd)}: {err.strerror}")
            continue
        if proc.returncode == 0:
            return cmd
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        errors.append(f"  {shlex.join(cmd)} --help -> exit {proc.returncode}: {last}")
    raise ToolMissing("the vmforge CLI does not run:\n" + "\n".join(errors))


def find_qemu_img() -> str:
    """Path of qemu-img (the test oracle); ToolMissing with the install hint if absent."""
    path = shutil.which("qemu-img")
    if path is None:
        raise ToolMissing(
            "qemu-img was not found; it is the referee that verifies vmforge's output. "
            "Install it with `make setup` (Debian package qemu-utils)."
        )
    return path
