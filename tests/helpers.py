"""Shared assertions and small utilities for the vmforge test suite."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
VMFORGE = VENV_BIN / "vmforge"


def vmforge_cmd() -> list[str]:
    if VMFORGE.exists():
        return [str(VMFORGE)]
    return [sys.executable, "-m", "vmforge"]


#: VMFORGE_TEST_SUBPROCESS=1 runs every CLI call as a real process (slower, most faithful)
ALWAYS_SUBPROCESS = os.environ.get("VMFORGE_TEST_SUBPROCESS", "") not in ("", "0")


def run_vmforge(*args: Any, cwd: str | os.PathLike[str] | None = None,
                timeout: float = 300, mem_limit: int | None = None, isolated: bool = False
                ) -> subprocess.CompletedProcess[str]:
    """Run the vmforge CLI (never raises on a non-zero exit).

    By default the CLI's ``main(argv)`` runs inside the test process (the interpreter
    start-up dominates a subprocess call and the matrices make thousands of calls);
    ``isolated=True`` (hostile input: time and memory limits) uses a real process.
    ``mem_limit`` caps the address space (bytes) so that a parser that believes a
    hostile size field fails instead of swapping.
    """
    if not (isolated or mem_limit or ALWAYS_SUBPROCESS):
        return run_vmforge_inprocess(*args, cwd=cwd)
    env = dict(os.environ, LC_ALL="C", PYTHONDONTWRITEBYTECODE="1", OPENBLAS_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)

    def limit() -> None:
        if mem_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    return subprocess.run(
        [*vmforge_cmd(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, env=env, preexec_fn=limit,
    )


def run_vmforge_inprocess(*args: Any, cwd: str | os.PathLike[str] | None = None
                          ) -> subprocess.CompletedProcess[str]:
    """``vmforge.cli.main.main(argv)`` with stdout/stderr captured, like a process would.

    An exception escaping main() is rendered as the interpreter would ("Traceback ...",
    exit 1), so the same assertions apply to both runners.
    """
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from vmforge.cli.main import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - this is what a user would see
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["vmforge", *argv], int(code or 0), out.getvalue(),
                                       err.getvalue())


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    args = " ".join(map(str, proc.args))
    return (f"$ {args}\nexit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
            f"\n--- stderr ---\n{proc.stderr[-3000:]}")


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, describe(proc)
    return proc


def vmforge_ok(*args: Any, cwd: str | os.PathLike[str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return ok(run_vmforge(*args, cwd=cwd, timeout=timeout))


def vmforge_json(*args: Any, cwd: str | os.PathLike[str] | None = None,
                 ok_codes: tuple[int, ...] = (0,)) -> Any:
    """``vmforge CMD --output=json ARGS`` parsed (flag placed right after the command)."""
    cmd, *rest = map(str, args)
    proc = run_vmforge(cmd, "--output=json", *rest, cwd=cwd)
    assert proc.returncode in ok_codes, describe(proc)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise AssertionError(f"vmforge printed invalid JSON ({err})\n{describe(proc)}") from None


def assert_clean_error(proc: subprocess.CompletedProcess[str], *, contains: str | None = None,
                       codes: tuple[int, ...] | None = None) -> None:
    """A refusal the way the CLI contract wants it: non-zero, one stderr line 'vmforge: ...'."""
    assert proc.returncode != 0, "expected a failure\n" + describe(proc)
    if codes is not None:
        assert proc.returncode in codes, describe(proc)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, describe(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, "stderr must be exactly one line\n" + describe(proc)
    assert lines[0].startswith("vmforge: "), describe(proc)
    # a refusal is a typed error; "internal error" is the CLI's last-resort handler for a bug
    assert not lines[0].startswith("vmforge: internal error"), "untyped error\n" + describe(proc)
    if contains is not None:
        assert contains in lines[0], describe(proc)


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def data_ranges(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """[start, end) ranges that may hold data (SEEK_DATA/SEEK_HOLE); the rest reads zero."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    out = []
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    finally:
        os.close(fd)
    return out


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(a + b):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def first_difference(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> int | None:
    """Offset of the first differing byte (a size difference counts), or None if identical.

    Only ranges where either file has data are read: holes in both read as zeros.
    """
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in _union(data_ranges(a), data_ranges(b)):
            off = start
            while off < end:
                n = min(1 << 23, end - off)
                fa.seek(off)
                fb.seek(off)
                ca, cb = fa.read(n), fb.read(n)
                if ca != cb:
                    m = min(len(ca), len(cb))
                    for j in range(m):
                        if ca[j] != cb[j]:
                            return off + j
                    return off + m
                off += n
    if sa != sb:
        return min(sa, sb)
    return None


def assert_same_bytes(actual: str | os.PathLike[str], expected: str | os.PathLike[str]) -> None:
    sa, se = os.path.getsize(actual), os.path.getsize(expected)
    diff = first_difference(actual, expected)
    assert diff is None, (f"{actual} ({sa} bytes) differs from {expected} ({se} bytes) "
                          f"first at offset {diff} ({diff:#x})")


def decompress_sparse(src: str | os.PathLike[str], dest: str | os.PathLike[str],
                      block: int = 1 << 16) -> Path:
    """gunzip/bunzip2 ``src`` into ``dest`` leaving all-zero blocks as holes."""
    import bz2

    opener = bz2.open if str(src).endswith(".bz2") else gzip.open
    zero = bytes(block)
    size = 0
    with opener(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(block):
            if chunk == zero[:len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            size += len(chunk)
        fout.truncate(size)
    return Path(dest)


def map_classes(entries: list[dict[str, Any]]) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map JSON reduced to merged (start, end, data, zero) runs."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in entries:
        start, end = e["start"], e["start"] + e["length"]
        data, zero = bool(e["data"]), bool(e["zero"])
        if out and out[-1][1] == start and out[-1][2:] == (data, zero):
            out[-1] = (out[-1][0], end, data, zero)
        else:
            out.append((start, end, data, zero))
    return out


def map_diff(actual: list[dict[str, Any]], expected: list[dict[str, Any]], limit: int = 8) -> str:
    lines = []
    for i in range(max(len(actual), len(expected))):
        a = actual[i] if i < len(actual) else None
        e = expected[i] if i < len(expected) else None
        if a != e:
            lines.append(f"  [{i}] vmforge={a}\n       qemu   ={e}")
            if len(lines) >= limit:
                lines.append("  ...")
                break
    return f"{len(actual)} vmforge entries vs {len(expected)} qemu entries\n" + "\n".join(lines)


def copy_image(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    shutil.copyfile(src, dest)
    return Path(dest)


def poke(path: str | os.PathLike[str], offset: int, fmt: str, *values: int | bytes) -> None:
    """Overwrite ``struct.pack(fmt, *values)`` at ``offset`` (hostile-input generators)."""
    import struct

    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def tar_members(path: str | os.PathLike[str]) -> list[tuple[str, bytes]]:
    """Every member of a tar (an OVA) as (name, bytes), in archive order."""
    import tarfile

    out = []
    with tarfile.open(path) as t:
        for m in t.getmembers():
            f = t.extractfile(m)
            assert f is not None, m.name
            out.append((m.name, f.read()))
    return out


def pack_ustar(dest: Path, members: list[tuple[str, bytes]]) -> Path:
    """A USTAR tar of ``members`` in the order given (an OVA when the .ovf is first)."""
    import io
    import tarfile

    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return dest
