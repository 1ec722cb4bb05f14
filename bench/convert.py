#!/usr/bin/env python3
"""Convert benchmark: vmforge against qemu-img on the same inputs, verified by qemu-img.

For every case both tools run the same ``convert`` command line, alternately, ``--reps``
times each (the tool that goes first swaps every repetition). Sources are read from the
page cache by both (a warm-up read precedes each case; nothing is dropped from caches).
Every vmforge output is checked with ``qemu-img compare`` against the source, and with
``qemu-img check`` where qemu-img can check the format: a wrong fast answer fails the
run (exit 1).

Reported per case: median wall time of each tool (``time.perf_counter`` around the
child process, start-up included), vmforge/qemu-img time ratio, output size ratio (host
bytes allocated), and peak RSS from ``os.wait4``. ``ru_maxrss`` of a waited child is the
largest resident set of any single process in its tree, not their sum.

Sources are generated deterministically and cached (``bench/.cache`` or
``$VMFORGE_BENCH_DIR``). To benchmark a new output format, add a ``Case`` to ``CASES``.

    .venv/bin/python bench/convert.py                       # all cases, 3 reps
    .venv/bin/python bench/convert.py --cases raw-qcow2 --reps 5 -m 4
    .venv/bin/python bench/convert.py --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from sampledata import MiB, TextPool, random_bytes  # noqa: E402
from toolpaths import ToolMissing, find_qemu_img, find_vmforge, run  # noqa: E402

GiB = 1 << 30
TiB = 1 << 40
SEED = 1
# Bump when the generators change, so cached images are rebuilt.
GENERATOR_VERSION = 1
QEMU_CHECKABLE = {"qcow2", "qed", "vmdk", "vdi", "vhdx", "parallels"}
MARK_BEGIN, MARK_END = "<!-- bench:convert -->", "<!-- /bench:convert -->"


# ------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    """An input image: a name, its format, and how to build it into a path."""

    key: str
    fmt: str
    describe: str
    build: Callable[[Path, argparse.Namespace], None]
    filename: Callable[[argparse.Namespace], str]


def build_mixed(path: Path, args: argparse.Namespace) -> None:
    """``args.size`` bytes: 40 % random, 30 % text, 30 % holes, shuffled 1 MiB chunks."""
    chunks = args.size // MiB
    n_random, n_text = round(chunks * 0.4), round(chunks * 0.3)
    kinds = ["random"] * n_random + ["text"] * n_text + ["hole"] * (chunks - n_random - n_text)
    random.Random(SEED).shuffle(kinds)
    text = TextPool(SEED)
    with _atomic(path) as fd:
        os.ftruncate(fd, args.size)
        for i, kind in enumerate(kinds):
            if kind == "random":
                os.pwrite(fd, random_bytes(SEED, i, MiB), i * MiB)
            elif kind == "text":
                os.pwrite(fd, text.chunk(i, MiB), i * MiB)


def build_sparse(path: Path, args: argparse.Namespace) -> None:
    """1 TiB virtual with 64 MiB of data (half random, half text) in scattered 1 MiB chunks."""
    slots = TiB // MiB
    rng = random.Random(SEED + 1)
    # The last slot always holds data so the end of the disk is exercised.
    chosen = sorted({*rng.sample(range(slots - 1), 63), slots - 1})
    text = TextPool(SEED)
    with _atomic(path) as fd:
        os.ftruncate(fd, TiB)
        for n, slot in enumerate(chosen):
            data = random_bytes(SEED + 1, slot, MiB) if n % 2 else text.chunk(slot, MiB)
            os.pwrite(fd, data, slot * MiB)


def derive_qcow2(base: str) -> Callable[[Path, argparse.Namespace], None]:
    """A builder that converts source ``base`` to qcow2 with qemu-img (the reference writer)."""

    def build(path: Path, args: argparse.Namespace) -> None:
        src = source_path(SOURCES[base], args)
        tmp = path.with_name(path.name + ".tmp")
        fmt = SOURCES[base].fmt
        run([args.qemu_img, "convert", "-f", fmt, "-O", "qcow2", str(src), str(tmp)], check=True)
        tmp.rename(path)

    return build


class _atomic:
    """Open ``path``.tmp for writing; rename it over ``path`` only if the block succeeds."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self) -> int:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return self.fd

    def __exit__(self, exc_type: object, *_: object) -> None:
        os.close(self.fd)
        if exc_type is None:
            self.tmp.rename(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _mixed_name(args: argparse.Namespace) -> str:
    return f"mixed-{args.size // MiB}M-s{SEED}-v{GENERATOR_VERSION}"


SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source("mixed", "raw", "raw, 40 % random / 30 % text / 30 % holes in shuffled 1 MiB chunks",
               build_mixed, lambda a: _mixed_name(a) + ".raw"),
        Source("mixed.qcow2", "qcow2", "the mixed image converted to qcow2 by qemu-img",
               derive_qcow2("mixed"), lambda a: _mixed_name(a) + ".qcow2"),
        Source("sparse", "raw", "raw, 1 TiB virtual, 64 MiB of data in scattered 1 MiB chunks",
               build_sparse, lambda a: f"sparse-1T-64M-s{SEED}-v{GENERATOR_VERSION}.raw"),
    )
}


def source_path(src: Source, args: argparse.Namespace) -> Path:
    """The cached image for ``src``, built first if missing."""
    path: Path = args.cache_dir / src.filename(args)
    if not path.exists():
        print(f"building {path.name} ({src.describe}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        src.build(path, args)
        print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return path


# -------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One conversion measured for both tools: ``convert -f SRC -O out_fmt *options``."""

    id: str
    title: str
    source: str  # key into SOURCES
    out_fmt: str
    options: tuple[str, ...] = ()
    #: vmforge writes to standard output piped through ``cat`` into the output file
    #: (``convert ... - | cat > out``); qemu-img cannot write to a pipe, so its row
    #: writes the file directly (say so in the title)
    vmforge_pipe: bool = False


# Add later formats here, e.g.
#   Case("raw-vhdx", "raw → vhdx", "mixed", "vhdx").
CASES: list[Case] = [
    Case("raw-qcow2", "raw → qcow2", "mixed", "qcow2"),
    Case("qcow2-raw", "qcow2 → raw", "mixed.qcow2", "raw"),
    Case("raw-qcow2-zlib", "raw → qcow2 -c (zlib)", "mixed", "qcow2", ("-c",)),
    Case("raw-qcow2-zstd", "raw → qcow2 -c zstd", "mixed", "qcow2", ("-c", "-o", "compression_type=zstd")),
    Case("sparse-raw-qcow2", "sparse 1 TiB / 64 MiB data raw → qcow2", "sparse", "qcow2"),
    Case("raw-vpc", "raw → vpc (dynamic VHD)", "mixed", "vpc"),
    Case("raw-vpc-fixed", "raw → vpc fixed", "mixed", "vpc", ("-o", "subformat=fixed")),
    Case("raw-vdi", "raw → vdi", "mixed", "vdi"),
    Case("raw-vmdk", "raw → vmdk (monolithicSparse)", "mixed", "vmdk"),
    Case("raw-vhdx", "raw → vhdx (dynamic)", "mixed", "vhdx"),
    Case("raw-vmdk-stream", "raw → vmdk streamOptimized", "mixed", "vmdk",
         ("-o", "subformat=streamOptimized")),
    Case("qcow2-vmdk-stream-pipe", "qcow2 → vmdk streamOptimized, vmforge to a pipe "
         "(qemu-img cannot: its row writes a file)", "mixed.qcow2", "vmdk",
         ("-o", "subformat=streamOptimized"), vmforge_pipe=True),
    Case("qcow2-raw-pipe", "qcow2 → raw, vmforge to a pipe (qemu-img cannot: its row writes "
         "a sparse file)", "mixed.qcow2", "raw", vmforge_pipe=True),
]


# ------------------------------------------------------------------ running


@dataclass
class Run:
    seconds: float
    maxrss: int  # bytes
    out_bytes: int  # host bytes allocated by the output
    ok: bool
    error: str = ""


@dataclass
class Result:
    case: Case
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median(self, tool: str) -> float | None:
        runs = [r for r in self.runs.get(tool, []) if r.ok]
        return statistics.median(r.seconds for r in runs) if runs else None

    def last_ok(self, tool: str) -> Run | None:
        runs = [r for r in self.runs.get(tool, []) if r.ok]
        return runs[-1] if runs else None

    def failed(self) -> list[str]:
        return [f"{tool}: {r.error}" for tool, runs in self.runs.items() for r in runs if not r.ok]


# Peak RSS needs a middleman. Linux folds the memory of the process that execs into the
# exec'd program's ru_maxrss, and Python spawns children with vfork, whose "old" memory
# is this whole benchmark (hundreds of MiB after building images). So a small, fresh
# interpreter forks and execs the tool, times it, reaps it with wait4 and prints
# "exit seconds maxrss_kib". Its own ~8 MiB is the floor of every RSS reported.
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
print(os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss)
"""


def timed(cmd: Sequence[str], timeout: float) -> tuple[int, float, int, str]:
    """Run ``cmd``; (exit code, wall seconds, peak RSS bytes, stderr tail).

    Wall time is measured by the middleman around fork..wait4, so its own start-up is
    not counted; the tool's start-up is.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _RUNNER, str(timeout), *cmd],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    if proc.returncode != 0:
        return 255, 0.0, 0, " | ".join([*tail, f"benchmark runner exited {proc.returncode}"])
    code_s, seconds_s, rss_s = proc.stdout.split()
    code, seconds = int(code_s), float(seconds_s)
    if code < 0 and seconds >= timeout:
        tail.append(f"killed after the {timeout:.0f} s timeout")
    return code, seconds, int(rss_s) * 1024, " | ".join(tail)


def verify(args: argparse.Namespace, src: Path, src_fmt: str, out: Path, out_fmt: str) -> str:
    """'' if ``out`` has the same guest content as ``src`` (and checks clean), else why not."""
    if out_fmt in QEMU_CHECKABLE:
        chk = run([args.qemu_img, "check", "-q", "-f", out_fmt, str(out)])
        if chk.returncode != 0:
            return f"qemu-img check exit {chk.returncode}: {(chk.stdout + chk.stderr).strip()[-200:]}"
    cmp = run([args.qemu_img, "compare", "-f", src_fmt, "-F", out_fmt, str(src), str(out)])
    if cmp.returncode != 0:
        return f"qemu-img compare exit {cmp.returncode}: {(cmp.stdout + cmp.stderr).strip()[-200:]}"
    return ""


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


def bench_case(case: Case, args: argparse.Namespace) -> Result:
    src_def = SOURCES[case.source]
    src = source_path(src_def, args)
    warm_up(src)
    out_dir: Path = args.cache_dir / "out"
    out_dir.mkdir(exist_ok=True)
    result = Result(case, {tool: [] for tool in args.tools})
    for rep in range(args.reps):
        order = args.tools if rep % 2 == 0 else args.tools[::-1]
        for tool in order:
            out = out_dir / f"{case.id}.{tool}.{case.out_fmt}"
            out.unlink(missing_ok=True)
            base = [args.qemu_img] if tool == "qemu-img" else [*args.vmforge]
            extra = ["-m", str(args.workers)] if tool == "vmforge" and args.workers else []
            cmd = [*base, "convert", *extra, "-f", src_def.fmt, "-O", case.out_fmt, *case.options,
                   str(src), str(out)]
            if tool == "vmforge" and case.vmforge_pipe:
                # a real pipe, consumer included in the time; pipefail keeps vmforge's exit code
                cmd[-1] = "-"
                cmd = ["bash", "-o", "pipefail", "-c",
                       f"{shlex.join(cmd)} | cat > {shlex.quote(str(out))}"]
            if args.verbose:
                print(f"  $ {shlex.join(cmd)}", file=sys.stderr)
            code, seconds, rss, err = timed(cmd, args.timeout)
            run_ = Run(seconds, rss, 0, code == 0, "" if code == 0 else f"exit {code}: {err}")
            if run_.ok and out.exists():
                run_.out_bytes = out.stat().st_blocks * 512
                if tool == "vmforge":  # a wrong fast answer is a failure
                    run_.error = verify(args, src, src_def.fmt, out, case.out_fmt)
                    run_.ok = not run_.error
            elif run_.ok:
                run_.ok, run_.error = False, "exited 0 but wrote no output"
            result.runs[tool].append(run_)
            print(f"  {case.id:18} rep {rep + 1} {tool:8} {seconds:7.2f} s  "
                  f"{rss / MiB:6.0f} MiB RSS  {'ok' if run_.ok else 'FAILED: ' + run_.error}",
                  file=sys.stderr, flush=True)
            out.unlink(missing_ok=True)
            os.sync()  # keep one run's writeback out of the next run's timing
    return result


# ------------------------------------------------------------------ report


def fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def table(results: list[Result]) -> str:
    lines = [
        "| case | qemu-img s | vmforge s | vmforge / qemu-img | size vmforge / qemu-img "
        "| qemu-img RSS MiB | vmforge RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        q, v = r.median("qemu-img"), r.median("vmforge")
        qr, vr = r.last_ok("qemu-img"), r.last_ok("vmforge")
        ratio = f"{v / q:.2f}×" if q and v else "—"
        size = f"{vr.out_bytes / qr.out_bytes:.3f}" if qr and vr and qr.out_bytes else "—"
        shown = {tool: "FAILED" if any(not x.ok for x in runs) else fmt_s(r.median(tool))
                 for tool, runs in r.runs.items()}
        lines.append(
            f"| {r.case.title} | {shown.get('qemu-img', '—')} | {shown.get('vmforge', '—')} "
            f"| {ratio} | {size} | "
            f"{max((x.maxrss for x in r.runs.get('qemu-img', [])), default=0) / MiB:.0f} | "
            f"{max((x.maxrss for x in r.runs.get('vmforge', [])), default=0) / MiB:.0f} |"
        )
    return "\n".join(lines)


def context(args: argparse.Namespace, verified: bool) -> str:
    """The paragraph that says how, where and on what the numbers were measured."""
    qemu_version = run([args.qemu_img, "--version"]).stdout.splitlines()[0]
    try:
        vmforge_version = metadata.version("vmforge")
    except metadata.PackageNotFoundError:
        vmforge_version = "?"
    rev = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if rev.returncode == 0:
        vmforge_version += f" (git {rev.stdout.strip()})"
    used = {SOURCES[c.source].key for c in args.cases}
    sources = "; ".join(
        f"`{k}`: {s.describe}" + (f", {args.size / GiB:g} GiB" if k.startswith("mixed") else "")
        for k, s in SOURCES.items() if k in used
    )
    workers = f", vmforge `-m {args.workers}`" if args.workers else ""
    return (
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; {qemu_version}; "
        f"vmforge {vmforge_version}{workers}; load average at start {args.load:.1f}.\n"
        f"Median of {args.reps} run{'s' if args.reps > 1 else ''} per tool, tools alternating; "
        f"sources read from the page cache; wall time includes process start-up. Sizes are host "
        f"bytes allocated. RSS is the peak of the largest process in each tool's tree (floor "
        f"~8 MiB: the launcher). "
        + ("Every vmforge output passed `qemu-img compare` (and `qemu-img check` where it applies).\n"
           if verified else "**Some vmforge runs FAILED verification (see stderr).**\n")
        + f"Sources: {sources}.\n"
    )


def write_markdown(path: Path, body: str) -> None:
    """Replace the section between the bench:convert markers in ``path`` (or append it)."""
    section = f"{MARK_BEGIN}\n{body.rstrip()}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nRegenerate with `make bench`.\n"
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if begin != -1 and end > begin:
        text = text[:begin] + section + text[end + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": TiB}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="vmforge convert vs qemu-img convert",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases:\n" + "\n".join(f"  {c.id:18} {c.title}" for c in CASES))
    ap.add_argument("--size", type=parse_size, default=2 * GiB,
                    help="size of the mixed source image (default 2G; whole MiB)")
    ap.add_argument("--reps", type=int, default=3, help="runs per tool per case (default 3)")
    ap.add_argument("--cases", default=",".join(c.id for c in CASES),
                    help="comma-separated case ids (default: all)")
    ap.add_argument("--tools", default="qemu-img,vmforge",
                    help="comma-separated subset of qemu-img,vmforge (default both)")
    ap.add_argument("-m", dest="workers", type=int, default=0,
                    help="pass -m N to vmforge convert (parallel workers)")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help=f"write the table between {MARK_BEGIN} and {MARK_END} in FILE")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("VMFORGE_BENCH_DIR", REPO / "bench" / ".cache")),
                    help="where source images are cached (default bench/.cache or $VMFORGE_BENCH_DIR)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each command")
    args = ap.parse_args(argv)
    if args.size < MiB or args.size % MiB:
        ap.error("--size must be a whole number of MiB")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    by_id = {c.id: c for c in CASES}
    unknown = [c for c in args.cases.split(",") if c not in by_id]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(by_id)}")
    args.cases = [by_id[c] for c in args.cases.split(",")]
    args.tools = [t for t in ("qemu-img", "vmforge") if t in args.tools.split(",")]
    if not args.tools:
        ap.error("--tools must name qemu-img and/or vmforge")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.qemu_img = find_qemu_img()  # needed for verification even when not timed
        args.vmforge = find_vmforge() if "vmforge" in args.tools else []
    except ToolMissing as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.load = os.getloadavg()[0]
    if args.load > 0.5:
        print(f"bench: warning: load average is {args.load:.1f}; other work on this machine will "
              "skew the timings", file=sys.stderr)
    # Load each tool's binary and libraries (or Python modules) into the page cache so the
    # first timed run does not pay for it.
    run([args.qemu_img, "--version"])
    if args.vmforge:
        run([*args.vmforge, "--help"])

    results = [bench_case(case, args) for case in args.cases]
    failures = [f"{r.case.id}: {f}" for r in results for f in r.failed()]
    body = ("## Convert: vmforge vs qemu-img\n\n" + context(args, verified=not failures) + "\n"
            + table(results) + "\n")
    print(body)
    if args.markdown:
        if failures:
            print(f"not writing {args.markdown}: there were failures", file=sys.stderr)
        else:
            write_markdown(args.markdown, body)
            print(f"updated {args.markdown}", file=sys.stderr)
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
