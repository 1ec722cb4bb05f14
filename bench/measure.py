"""Timing one command (wall time, CPU time, peak RSS) and verifying what it wrote.

Kept apart from the case list so that other benchmarks can time commands the same way.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sampledata import MiB
from toolpaths import run

#: formats ``qemu-img check`` checks (it reports "not supported" for the others)
QEMU_CHECKABLE = {"qcow2", "qed", "vmdk", "vdi", "vhdx", "parallels"}

# Peak RSS needs a middleman. Linux folds the memory of the process that execs into the
# exec'd program's ru_maxrss, and Python spawns children with vfork, whose "old" memory
# is this whole benchmark (hundreds of MiB after building images). So a small, fresh
# interpreter forks and execs the tool, times it, reaps it with wait4 and prints
# "exit seconds maxrss_kib cpu_seconds". Its own ~8 MiB is the floor of every RSS
# reported. wait4's rusage covers the child and every descendant it waited for (a
# shell pipeline's members too), so CPU time is the whole tree's.
_RUNNER = r"""
import os, select, signal, sys, time
timeout, cmd = float(sys.argv[1]), sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        fd = os.open(os.devnull, os.O_RDWR)
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        os.execvp(cmd[0], cmd)
    except OSError as err:
        os.write(2, f"cannot run {cmd[0]}: {err.strerror}\n".encode())
    os._exit(127)
pidfd = os.pidfd_open(pid)
if not select.select([pidfd], [], [], timeout)[0]:
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss,
      usage.ru_utime + usage.ru_stime)
"""


@dataclass
class Timing:
    code: int
    seconds: float
    maxrss: int  # bytes
    cpu: float  # user + system seconds of the whole process tree
    error: str


def timed(cmd: Sequence[str], timeout: float) -> Timing:
    """Run ``cmd`` with stdin and stdout on /dev/null; how long, how much CPU and memory.

    Wall time is measured by the middleman around fork..wait4, so its own start-up is
    not counted; the tool's start-up is.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _RUNNER, str(timeout), *cmd],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    if proc.returncode != 0:
        return Timing(255, 0.0, 0, 0.0,
                      " | ".join([*tail, f"benchmark runner exited {proc.returncode}"]))
    code_s, seconds_s, rss_s, cpu_s = proc.stdout.split()
    code, seconds = int(code_s), float(seconds_s)
    if code < 0 and seconds >= timeout:
        tail.append(f"killed after the {timeout:.0f} s timeout")
    return Timing(code, seconds, int(rss_s) * 1024, float(cpu_s), " | ".join(tail))


@dataclass
class Run:
    seconds: float
    maxrss: int  # bytes
    cpu: float  # seconds of CPU (user + system)
    out_bytes: int  # host bytes allocated by the output
    ok: bool
    error: str = ""


@dataclass
class Result:
    """The runs of one case, per tool (or per vmforge worker count in the scaling rows)."""

    runs: dict[str, list[Run]] = field(default_factory=dict)
    skipped: str = ""  # why the case did not run (its source could not be built)
    reused: bool = False  # these runs belong to another result too (counted there)

    def ok_runs(self, tool: str) -> list[Run]:
        return [r for r in self.runs.get(tool, []) if r.ok]

    def median(self, tool: str) -> float | None:
        runs = self.ok_runs(tool)
        return statistics.median(r.seconds for r in runs) if runs else None

    def best(self, tool: str) -> float | None:
        """The fastest successful run: what the tool does when the machine does not interfere."""
        runs = self.ok_runs(tool)
        return min(r.seconds for r in runs) if runs else None

    def cores(self, tool: str) -> float | None:
        """CPU seconds per wall second over the successful runs: 2.0 = two busy cores."""
        runs = self.ok_runs(tool)
        wall = sum(r.seconds for r in runs)
        return sum(r.cpu for r in runs) / wall if runs and wall > 0 else None

    def last_ok(self, tool: str) -> Run | None:
        runs = self.ok_runs(tool)
        return runs[-1] if runs else None

    def peak_rss(self, tool: str) -> int:
        return max((r.maxrss for r in self.runs.get(tool, [])), default=0)

    def failed(self) -> list[str]:
        return [f"{tool}: {r.error}" for tool, runs in self.runs.items() for r in runs if not r.ok]


def verify(qemu_img: str, src: Path, src_fmt: str, out: Path, out_fmt: str) -> str:
    """'' if ``out`` has the same guest content as ``src`` (and checks clean), else why not."""
    if out_fmt in QEMU_CHECKABLE:
        chk = run([qemu_img, "check", "-q", "-f", out_fmt, str(out)])
        if chk.returncode != 0:
            return f"qemu-img check exit {chk.returncode}: {(chk.stdout + chk.stderr).strip()[-200:]}"
    cmp = run([qemu_img, "compare", "-f", src_fmt, "-F", out_fmt, str(src), str(out)])
    if cmp.returncode != 0:
        return f"qemu-img compare exit {cmp.returncode}: {(cmp.stdout + cmp.stderr).strip()[-200:]}"
    return ""


def verify_ova(qemu_img: str, src: Path, src_fmt: str, ova: Path) -> str:
    """'' if the OVA holds an OVF descriptor and one VMDK equal to ``src``, else why not."""
    try:
        with tarfile.open(ova, "r:") as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            disks = [m for m in members if m.isfile() and m.name.endswith(".vmdk")]
            if not names or not names[0].endswith(".ovf"):
                return f"the OVA does not start with an OVF descriptor: {names[:4]}"
            if len(disks) != 1:
                return f"the OVA holds {len(disks)} VMDK disks, expected 1: {names}"
            extracted = ova.with_name(ova.name + ".disk.vmdk")
            reader = tar.extractfile(disks[0])
            assert reader is not None
            with reader, open(extracted, "wb") as f:
                while chunk := reader.read(8 * MiB):
                    f.write(chunk)
    except (OSError, tarfile.TarError) as err:
        return f"the OVA is not a readable tar: {err}"
    try:
        return verify(qemu_img, src, src_fmt, extracted, "vmdk")
    finally:
        extracted.unlink(missing_ok=True)


def warm_up(path: Path) -> None:
    """Read the data regions of ``path`` into the page cache, skipping holes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end:
                pos += len(os.pread(fd, min(16 * MiB, end - pos), pos))
    finally:
        os.close(fd)
