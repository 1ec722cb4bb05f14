"""The oracle: thin wrappers around qemu-img and qemu-io (tests only, never src/)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


class OracleError(RuntimeError):
    pass


def _no_core() -> None:  # qemu-io 'abort' must not leave core files around
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(cmd: list[str], *, cwd: str | os.PathLike[str] | None = None, check: bool = True,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=env, preexec_fn=_no_core,
    )
    if check and proc.returncode != 0:
        raise OracleError(
            f"{' '.join(map(str, cmd))} -> exit {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def qemu_img(*args: Any, cwd: str | os.PathLike[str] | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG, "qemu-img is not installed"
    return run([QEMU_IMG, *map(str, args)], cwd=cwd, check=check, timeout=timeout)


def qemu_img_json(*args: Any, cwd: str | os.PathLike[str] | None = None,
                  ok_codes: tuple[int, ...] = (0,)) -> Any:
    """Run ``qemu-img ARGS --output=json`` (the flag goes right after the command)."""
    cmd, *rest = map(str, args)
    proc = qemu_img(cmd, "--output=json", *rest, cwd=cwd, check=False)
    if proc.returncode not in ok_codes:
        raise OracleError(f"qemu-img {cmd} {rest} -> {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)


def qemu_io(path: str | os.PathLike[str], commands: list[str], *, fmt: str = "qcow2",
            cwd: str | os.PathLike[str] | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    assert QEMU_IO, "qemu-io is not installed"
    cmd: list[str] = [QEMU_IO, "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(path))
    proc = run(cmd, cwd=cwd, check=check)
    out = (proc.stdout + proc.stderr).lower()
    if check and ("error" in out or "failed" in out):
        raise OracleError(f"qemu-io reported a failure: {proc.stdout}{proc.stderr}")
    return proc


def opts(options: dict[str, Any] | None) -> list[str]:
    """``{'cluster_size': 4096}`` -> ``['-o', 'cluster_size=4096']`` (or nothing)."""
    if not options:
        return []
    return ["-o", ",".join(f"{k}={v}" for k, v in options.items())]


def check_json(path: str | os.PathLike[str], fmt: str = "qcow2") -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: (exit code, parsed JSON or {})."""
    proc = qemu_img("check", "--output=json", "-f", fmt, path, check=False)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    return proc.returncode, data


def convert_raw(src: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                fmt: str | None = None, snapshot: str | None = None) -> Path:
    args: list[str] = ["convert"]
    if fmt:
        args += ["-f", fmt]
    if snapshot is not None:
        args += ["-l", snapshot]
    args += ["-O", "raw", str(src), str(dest)]
    qemu_img(*args)
    return Path(dest)
