#!/usr/bin/env python3
"""Convert benchmark: vmforge against qemu-img on the same inputs, verified by qemu-img.

For every case both tools run the same ``convert`` command line, alternately, ``--reps``
times each (the tool that goes first swaps every repetition); a tool stops repeating a
case early when one more run would take its total past ``--budget`` seconds, so
qemu-img's minute-long single-threaded deflate runs once instead of three times. Sources
are read from the page cache by both (a warm-up read precedes each case). Every vmforge
output is checked with ``qemu-img compare`` against the source, and with ``qemu-img
check`` where qemu-img can check the format: a wrong fast answer fails the run (exit 1).

Groups of cases: uncompressed targets, compressed writes, compressed reads (inputs
written by qemu-img), sparse disks (1 TiB virtual with little data: time must follow
the data), a real OS disk (Debian packages in ext4, see ``osimage.py``; skipped with a
note when Debian's mirror is out of reach or with ``--no-os-image``), an OVA export,
and the scaling of vmforge's compressed conversions with ``-m`` (``--scaling``).

Reported per case: median wall time of each tool (start-up included), the ratio
vmforge/qemu-img against the issue's target, output size ratio (host bytes allocated),
CPU use (user + system CPU seconds / wall seconds: "1.9 cores") and peak RSS from
``os.wait4``.

Sources are generated deterministically and cached (``bench/.cache`` or
``$VMFORGE_BENCH_DIR``). To benchmark a new output format, add a ``Case`` in
``make_cases``.

    .venv/bin/python bench/convert.py                       # everything, 5 reps
    .venv/bin/python bench/convert.py --quick               # a subset at 256 MiB, 1 rep
    .venv/bin/python bench/convert.py --cases raw-qcow2 --reps 5 -m 4
    .venv/bin/python bench/convert.py --scaling 1,2,4,8 --cases raw-qcow2-zlib
    .venv/bin/python bench/convert.py --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import osimage  # noqa: E402
import report  # noqa: E402
from measure import Result, Run, timed, verify, verify_ova, warm_up  # noqa: E402
from sampledata import MiB  # noqa: E402
from sources import (  # noqa: E402
    GiB,
    Source,
    SourceUnavailable,
    make_sources,
    size_label,
    source_path,
    sparse_shapes,
)
from toolpaths import ToolMissing, find_qemu_img, find_vmforge, run  # noqa: E402

#: (key, heading) of the report's sections, in order
GROUPS = (
    ("uncompressed", "Uncompressed targets"),
    ("compressed-write", "Compressed writes"),
    ("compressed-read", "Reading compressed images"),
    ("sparse", "Sparse disks: time follows the data, not the virtual size"),
    ("os", "OS image: real Debian files in ext4"),
    ("export", "Export"),
    ("scaling", "Scaling: vmforge with -m workers"),
)
#: the issue's targets (vmforge time / qemu-img time)
UNCOMPRESSED, DEFLATE, ZSTD, READ = 0.9, 0.2, 0.7, 1.0
#: compressed output may be at most this much larger than qemu-img's
DEFLATE_SIZE = 1.05
#: cases whose vmforge time is also measured for every ``--scaling`` worker count
SCALING_CASES = ("raw-qcow2-zlib", "raw-vmdk-stream")
QUICK_CASES = ("raw-qcow2", "qcow2-raw", "raw-qcow2-zlib", "qcow2-zlib-raw", "sparse-1t",
               "sparse-1t-2x", "sparse-16g", "export-vmware")


@dataclass(frozen=True)
class Case:
    """One conversion measured for both tools: ``convert -f SRC -O out_fmt *options``."""

    id: str
    title: str
    group: str
    source: str  # key into the sources
    out_fmt: str
    options: tuple[str, ...] = ()
    target: float | None = None
    size_target: float | None = None
    #: vmforge writes to standard output piped through ``cat`` into the output file
    #: (``convert ... - | cat > out``); qemu-img cannot write to a pipe, so its row
    #: writes the file directly (say so in the title)
    vmforge_pipe: bool = False
    #: ``vmforge export --target EXPORT`` (an OVA) instead of convert; qemu-img's row is
    #: its nearest equivalent: a streamOptimized VMDK put in a tar (no OVF, no manifest)
    export: str = ""
    #: the id of an earlier case whose qemu-img command line is the same as this one's:
    #: its qemu-img runs are shown again instead of repeated (saves minutes of deflate)
    qemu_from: str = ""

    @property
    def floor(self) -> bool:
        """Whether the kernel copy floor (floor.py) is timed too: for uncompressed
        conversions, which write about as many bytes as the source holds."""
        return self.target == UNCOMPRESSED and not self.vmforge_pipe


STREAM = ("-o", "subformat=streamOptimized")
ZSTD_OPTS = ("-c", "-o", "compression_type=zstd")


def make_cases(sparse_data: int) -> list[Case]:
    """Every case; the sparse ones are titled with their sizes."""
    u, cw, cr = "uncompressed", "compressed-write", "compressed-read"
    cases = [
        Case("raw-qcow2", "raw → qcow2", u, "mixed", "qcow2", target=UNCOMPRESSED),
        Case("qcow2-raw", "qcow2 → raw", u, "mixed.qcow2", "raw", target=UNCOMPRESSED),
        Case("raw-vpc", "raw → vpc (dynamic VHD)", u, "mixed", "vpc", target=UNCOMPRESSED),
        Case("raw-vpc-fixed", "raw → vpc fixed", u, "mixed", "vpc", ("-o", "subformat=fixed"),
             target=UNCOMPRESSED),
        Case("raw-vdi", "raw → vdi", u, "mixed", "vdi", target=UNCOMPRESSED),
        Case("raw-vmdk", "raw → vmdk (monolithicSparse)", u, "mixed", "vmdk", target=UNCOMPRESSED),
        Case("raw-vhdx", "raw → vhdx (dynamic)", u, "mixed", "vhdx", target=UNCOMPRESSED),
        Case("qcow2-raw-pipe", "qcow2 → raw, vmforge to a pipe (qemu-img cannot: its cells are "
             "the qcow2 → raw runs, a sparse file)", u, "mixed.qcow2", "raw", vmforge_pipe=True,
             qemu_from="qcow2-raw"),
        Case("raw-qcow2-zlib", "raw → qcow2 -c (zlib)", cw, "mixed", "qcow2", ("-c",),
             target=DEFLATE, size_target=DEFLATE_SIZE),
        Case("raw-qcow2-zstd", "raw → qcow2 -c zstd", cw, "mixed", "qcow2", ZSTD_OPTS, target=ZSTD),
        Case("raw-vmdk-stream", "raw → vmdk streamOptimized", cw, "mixed", "vmdk", STREAM,
             target=DEFLATE, size_target=DEFLATE_SIZE),
        Case("raw-vmdk-stream-pipe", "raw → vmdk streamOptimized, vmforge to a pipe (qemu-img "
             "cannot: its cells are the row above's runs, writing a file)", cw, "mixed", "vmdk",
             STREAM, target=DEFLATE, size_target=DEFLATE_SIZE, vmforge_pipe=True,
             qemu_from="raw-vmdk-stream"),
        Case("qcow2-zlib-raw", "qcow2 zlib → raw", cr, "mixed.qcow2-zlib", "raw", target=READ),
        Case("qcow2-zstd-raw", "qcow2 zstd → raw", cr, "mixed.qcow2-zstd", "raw", target=READ),
        Case("vmdk-stream-raw", "vmdk streamOptimized → raw", cr, "mixed.vmdk-stream", "raw",
             target=READ),
        Case("export-vmware", "vmforge export --target vmware → OVA (OVF, manifest, "
             "streamOptimized VMDK); qemu-img: convert to streamOptimized, then tar (no OVF)",
             "export", "mixed", "vmdk", target=DEFLATE, export="vmware"),
    ]
    for key, (virtual, data) in sparse_shapes(argparse.Namespace(sparse_data=sparse_data)).items():
        cases.append(Case(key, f"raw {size_label(virtual)} virtual / {size_label(data)} data → qcow2",
                          "sparse", key, "qcow2"))
    for c in ("raw-qcow2", "raw-qcow2-zlib", "raw-qcow2-zstd", "raw-vmdk-stream", "raw-vpc",
              "raw-vdi", "raw-vhdx"):
        m = next(x for x in cases if x.id == c)
        cases.append(Case(f"os-{c}", m.title, "os", "os", m.out_fmt, m.options, m.target,
                          m.size_target))
    order = [g for g, _ in GROUPS]
    return sorted(cases, key=lambda c: order.index(c.group))


# ------------------------------------------------------------------ running


def command(case: Case, tool: str, src: Path, src_fmt: str, out: Path, args: argparse.Namespace,
            workers: int) -> list[str]:
    """The command line ``tool`` runs for ``case``, writing ``out``."""
    if tool == "floor":  # the source's data copied to a new file, and nothing else
        return [sys.executable, "-S", str(REPO / "bench" / "floor.py"), str(src), str(out)]
    if case.export and tool == "vmforge":
        return [*args.vmforge, "export", "-q", "-f", src_fmt, "--target", case.export,
                "-o", str(out), str(src)]
    if case.export:  # qemu-img's nearest equivalent: the disk, then tar (OVA is a tar)
        disk = out.with_name("disk.vmdk")
        convert = [args.qemu_img, "convert", "-f", src_fmt, "-O", "vmdk", *STREAM, str(src),
                   str(disk)]
        script = (f"{shlex.join(convert)}"
                  f" && tar -cf {shlex.quote(str(out))} -C {shlex.quote(str(disk.parent))} disk.vmdk"
                  f" && rm -f {shlex.quote(str(disk))}")
        return ["bash", "-o", "errexit", "-c", script]
    base = [args.qemu_img] if tool == "qemu-img" else [*args.vmforge]
    extra = ["-m", str(workers)] if tool == "vmforge" and workers else []
    cmd = [*base, "convert", *extra, "-f", src_fmt, "-O", case.out_fmt, *case.options,
           str(src), str(out)]
    if tool == "vmforge" and case.vmforge_pipe:
        # a real pipe, consumer included in the time; pipefail keeps vmforge's exit code
        cmd[-1] = "-"
        cmd = ["bash", "-o", "pipefail", "-c", f"{shlex.join(cmd)} | cat > {shlex.quote(str(out))}"]
    return cmd


def bench_case(case: Case, args: argparse.Namespace, tools: list[str], workers: int,
               label: str = "", shared: Result | None = None) -> Result:
    """Run ``case`` for ``tools`` (alternating), ``args.reps`` times within the budget.

    ``shared``: the result of the case named by ``case.qemu_from``, whose qemu-img runs
    this case shows instead of running the same command again.
    """
    src_def: Source = args.sources[case.source]
    try:
        src = source_path(src_def, args.cache_dir)
    except SourceUnavailable as err:
        print(f"  {case.id}: skipped: {err}", file=sys.stderr, flush=True)
        return Result({tool: [] for tool in tools}, skipped=str(err))
    if args.drop_caches:
        drop_page_cache()
    warm_up(src)
    out_dir: Path = args.cache_dir / "out"
    out_dir.mkdir(exist_ok=True)
    result = Result({tool: [] for tool in tools})
    if shared is not None and shared.runs.get("qemu-img") and "qemu-img" in tools:
        result.runs["qemu-img"] = shared.runs["qemu-img"]
        tools = [t for t in tools if t != "qemu-img"]
    for rep in range(args.reps):
        order = tools if rep % 2 == 0 else tools[::-1]
        for tool in order:
            done = result.runs[tool]
            if done and (not done[-1].ok
                         or sum(r.seconds for r in done) + done[-1].seconds > args.budget):
                continue
            out = out_dir / f"{case.id}.{tool}.{'ova' if case.export else case.out_fmt}"
            out.unlink(missing_ok=True)
            cmd = command(case, tool, src, src_def.fmt, out, args, workers)
            if args.verbose:
                print(f"  $ {shlex.join(cmd)}", file=sys.stderr)
            t = timed(cmd, args.timeout)
            run_ = Run(t.seconds, t.maxrss, t.cpu, 0, t.code == 0,
                       "" if t.code == 0 else f"exit {t.code}: {t.error}")
            if run_.ok and out.exists():
                run_.out_bytes = out.stat().st_blocks * 512
                if tool == "vmforge":  # a wrong fast answer is a failure
                    run_.error = (verify_ova(args.qemu_img, src, src_def.fmt, out) if case.export
                                  else verify(args.qemu_img, src, src_def.fmt, out, case.out_fmt))
                    run_.ok = not run_.error
                elif tool == "floor":  # a copy of the source file itself
                    run_.error = verify(args.qemu_img, src, src_def.fmt, out, src_def.fmt)
                    run_.ok = not run_.error
            elif run_.ok:
                run_.ok, run_.error = False, "exited 0 but wrote no output"
            done.append(run_)
            cores = t.cpu / t.seconds if t.seconds else 0.0
            print(f"  {case.id + label:24} rep {rep + 1} {tool:8} {t.seconds:7.2f} s "
                  f"{cores:4.1f} cores {t.maxrss / MiB:6.0f} MiB RSS  "
                  f"{'ok' if run_.ok else 'FAILED: ' + run_.error}", file=sys.stderr, flush=True)
            out.unlink(missing_ok=True)
            os.sync()  # keep one run's writeback out of the next run's timing
    return result


def drop_page_cache() -> None:
    """Empty the page cache (root only): writes then find free memory instead of
    reclaiming other files' pages first. On this VM, with the cache full, that reclaim
    made the same copy take 0.4 s or 5 s from one run to the next."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def free_memory() -> int:
    """MemFree from /proc/meminfo, in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemFree:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_workers(args: argparse.Namespace) -> int:
    """The worker count vmforge uses in the main rows (its default is the CPU count)."""
    return args.workers or os.cpu_count() or 1


def run_scaling(case: Case, main: Result, args: argparse.Namespace) -> dict[int, Result]:
    """vmforge alone at each ``--scaling`` worker count (the main rows' runs are reused)."""
    per: dict[int, Result] = {}
    for n in args.scaling:
        if n == default_workers(args) and "vmforge" in main.runs and not main.skipped:
            per[n] = Result({"vmforge": main.runs["vmforge"]}, reused=True)
        else:
            per[n] = bench_case(case, args, ["vmforge"], n, label=f" -m {n}")
    return per


# ------------------------------------------------------------------ report


def context(args: argparse.Namespace, verified: bool, used: set[str]) -> str:
    """The paragraph that says how, where and on what the numbers were measured."""
    qemu_version = run([args.qemu_img, "--version"]).stdout.splitlines()[0]
    try:
        vmforge_version = metadata.version("vmforge")
    except metadata.PackageNotFoundError:
        vmforge_version = "?"
    rev = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if rev.returncode == 0:
        vmforge_version += f" (git {rev.stdout.strip()})"
    described = []
    for key, s in args.sources.items():
        if key in used:
            what = osimage.describe(args.cache_dir / s.filename) if key == "os" else s.describe
            described.append(f"`{key}`: {what}")
    workers = f"vmforge `-m {args.workers}`" if args.workers else \
        f"vmforge's default workers ({default_workers(args)} here)"
    return (
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; {qemu_version}; "
        f"vmforge {vmforge_version}, {workers}; load average at start {args.load:.1f}; "
        + ("page cache dropped before each case (`--drop-caches`), so that writes find free "
           "memory" if args.drop_caches else
           f"{args.free / GiB:.1f} GiB of memory free at start (writes that must first "
           f"reclaim page cache are slower and noisier; `--drop-caches` avoids that)")
        + ".\n"
        f"Median of {args.reps} run{'s' if args.reps > 1 else ''} per tool, tools alternating; a "
        f"tool stops repeating a case when one more run would take it past {args.budget:.0f} s "
        f"(\"n=1\" marks such cells); \"best runs\" divides vmforge's fastest run by "
        f"qemu-img's, the ratio with this machine's run-to-run noise left out. Sources read "
        f"from the page cache; wall time includes "
        f"process start-up. Sizes are host bytes allocated. CPU is user + system CPU time of the "
        f"tool's process tree divided by wall time (2.0 cores = both cores busy throughout). RSS "
        f"is the peak of the largest process in each tool's tree (floor ~8 MiB: the launcher). "
        f"Targets are issue 5's. "
        + ("Every vmforge output passed `qemu-img compare` against its source (and `qemu-img "
           "check` where it applies; the OVA's VMDK after extraction).\n"
           if verified else "**Some vmforge runs FAILED verification (see stderr).**\n")
        + "Sources: " + "; ".join(described) + ".\n"
    )


def build_report(args: argparse.Namespace, results: dict[str, Result],
                 scaling: dict[str, dict[int, Result]], verified: bool) -> str:
    rows = [report.Row(c.id, c.title, c.group, c.target, c.size_target, results[c.id])
            for c in args.cases if not results[c.id].skipped]
    skipped = {c.group: results[c.id].skipped for c in args.cases if results[c.id].skipped}
    if args.no_os_image:
        skipped["os"] = "not run (--no-os-image)"
    by_id = {r.id: r for r in rows}

    def sparse_note() -> str:
        text = report.proportionality(by_id, [
            ("sparse-1t-2x", "sparse-1t", "twice the data, same virtual size"),
            ("sparse-1t", "sparse-16g", "same data, 64× the virtual size"),
        ])
        return ("Time ratios between rows (start-up included; proportional to data means "
                "about 2× for twice the data and about 1× for a larger empty disk):\n" + text
                ) if text else ""

    def scaling_section() -> str:
        if not scaling:
            return ""
        titled = {cid: (next(c.title for c in args.cases if c.id == cid), per)
                  for cid, per in scaling.items()}
        n = default_workers(args)
        return ("vmforge alone, same source and reps; each cell is the median time and the CPU "
                "use. The default worker count's cell reuses the main rows' runs.\n\n"
                + report.scaling_table(titled, n if n in args.scaling else None))

    def floor_note(group: str) -> Callable[[], str]:
        def note() -> str:
            members = [r for r in rows if r.group == group and r.result.runs.get("floor")]
            if not members:
                return ""
            return ("The kernel copy floor: `bench/floor.py` copies the source file's "
                    "allocated ranges to a new file with copy_file_range after fallocate, the "
                    "fastest way this machine has (see its docstring), and does nothing else; a "
                    "process that starts in ~10 ms. An uncompressed conversion writes about as "
                    "many bytes, so this time is what any converter's copy costs here; the "
                    "columns after it are each tool's time above it: start-up (qemu-img ~0.01 "
                    "s, vmforge ~0.09 s), finding zero blocks, format metadata, and how the "
                    "writes are cut up."
                    + (" On the OS image it is not a floor: both converters can finish below "
                       "it. Its file holds ~66 MB of allocated zero blocks that they skip and "
                       "floor.py copies, but that is 5 % of the data and does not explain the "
                       "rest; read it there as a reference."
                       if group == "os" else "")
                    + "\n\n"
                    + report.floor_table(members))
        return note

    used = {c.source for c in args.cases}
    return report.body(GROUPS, rows, args.reps, context(args, verified, used), skipped,
                       {"sparse": sparse_note, "scaling": scaling_section,
                        "uncompressed": floor_note("uncompressed"), "os": floor_note("os")})


# ---------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def parse_counts(text: str) -> list[int]:
    if text.strip().lower() in ("", "off", "none"):
        return []
    counts = [int(x) for x in text.split(",")]
    if any(n < 1 for n in counts):
        raise ValueError("worker counts must be at least 1")
    return sorted(set(counts))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    all_cases = make_cases(100 * MiB)
    ap = argparse.ArgumentParser(description="vmforge convert vs qemu-img convert",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases:\n" + "\n".join(f"  {c.id:22} {c.title}"
                                                               for c in all_cases))
    ap.add_argument("--quick", action="store_true",
                    help=f"a fast subset: cases {','.join(QUICK_CASES)}, 256 MiB, 1 rep, "
                         "scaling 1,2 (each can still be overridden)")
    ap.add_argument("--size", type=parse_size, default=None,
                    help="size of the mixed source image (default 2G, --quick 256M; whole MiB)")
    ap.add_argument("--sparse-data", type=parse_size, default=100 * MiB,
                    help="data in the 1 TiB / 16 GiB sparse sources (default 100M; whole MiB)")
    ap.add_argument("--reps", type=int, default=None,
                    help="runs per tool per case (default 5, --quick 1)")
    ap.add_argument("--budget", type=float, default=60,
                    help="seconds: no further run of a tool on a case once it would take the "
                         "tool's total for the case past this (default 60; at least one run)")
    ap.add_argument("--cases", default=None, help="comma-separated case ids (default: all)")
    ap.add_argument("--no-os-image", action="store_true",
                    help="skip the OS-image cases (they download about 300 MB of Debian packages "
                         "once)")
    ap.add_argument("--tools", default="qemu-img,vmforge,floor",
                    help="comma-separated subset of qemu-img,vmforge,floor (default all; floor: "
                         "the kernel copy floor, bench/floor.py, in uncompressed cases)")
    ap.add_argument("-m", dest="workers", type=int, default=0,
                    help="pass -m N to vmforge convert in the main rows (default: vmforge's own)")
    ap.add_argument("--scaling", default=None, metavar="N,N,...",
                    help=f"also time vmforge at these -m counts for {', '.join(SCALING_CASES)} "
                         "(default 1,2; 'off' for none; more on machines with more cores)")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help=f"write the report between {report.MARK_BEGIN} and {report.MARK_END} in "
                         "FILE")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("VMFORGE_BENCH_DIR", REPO / "bench" / ".cache")),
                    help="where source images are cached (default bench/.cache or $VMFORGE_BENCH_DIR)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache before each case (needs root), so that output "
                         "writes do not have to reclaim memory first")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each command")
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = 256 * MiB if args.quick else 2 * GiB
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.scaling is None:
        args.scaling = "1,2"
    try:
        args.scaling = parse_counts(args.scaling)
    except ValueError as err:
        ap.error(f"--scaling: {err}")
    for name, value in (("--size", args.size), ("--sparse-data", args.sparse_data)):
        if value < MiB or value % MiB:
            ap.error(f"{name} must be a whole number of MiB")
    if args.sparse_data * 2 > 16 * GiB:
        ap.error("--sparse-data must be at most 8G")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    by_id = {c.id: c for c in make_cases(args.sparse_data)}
    if args.cases is None:
        wanted = list(QUICK_CASES) if args.quick else list(by_id)
        if args.no_os_image:
            wanted = [c for c in wanted if by_id[c].group != "os"]
    else:
        wanted = args.cases.split(",")
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(by_id)}")
    args.cases = [by_id[c] for c in wanted]
    args.tools = [t for t in ("qemu-img", "vmforge", "floor") if t in args.tools.split(",")]
    if not [t for t in args.tools if t != "floor"]:
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
    if args.drop_caches and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("bench: --drop-caches needs root (write access to /proc/sys/vm/drop_caches)",
              file=sys.stderr)
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.sources = make_sources(args)
    args.load = os.getloadavg()[0]
    args.free = free_memory()
    if args.load > 0.5:
        print(f"bench: warning: load average is {args.load:.1f}; other work on this machine will "
              "skew the timings", file=sys.stderr)
    # Load each tool's binary and libraries (or Python modules) into the page cache so the
    # first timed run does not pay for it.
    run([args.qemu_img, "--version"])
    if args.vmforge:
        # An installed package has its bytecode compiled (pip does it); an editable
        # checkout compiles on first import, or on every run under
        # PYTHONDONTWRITEBYTECODE, which would bill vmforge ~0.1 s of compiling per run.
        run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")])
        run([*args.vmforge, "--help"])

    started = time.monotonic()
    results: dict[str, Result] = {}
    for case in args.cases:
        tools = [t for t in args.tools if t != "floor" or case.floor]
        results[case.id] = bench_case(case, args, tools, args.workers,
                                      shared=results.get(case.qemu_from))
    scaling: dict[str, dict[int, Result]] = {}
    if "vmforge" in args.tools:
        for case in args.cases:
            if case.id in SCALING_CASES and args.scaling and not results[case.id].skipped:
                scaling[case.id] = run_scaling(case, results[case.id], args)
    failures = [f"{c.id}: {f}" for c in args.cases for f in results[c.id].failed()]
    failures += [f"{cid} -m {n}: {f}" for cid, per in scaling.items() for n, r in per.items()
                 if not r.reused for f in r.failed()]
    text = build_report(args, results, scaling, verified=not failures)
    print(text)
    if args.markdown:
        if failures:
            print(f"not writing {args.markdown}: there were failures", file=sys.stderr)
        else:
            report.write_markdown(args.markdown, text)
            print(f"updated {args.markdown}", file=sys.stderr)
    print(f"bench: {len(args.cases)} cases in {(time.monotonic() - started) / 60:.1f} min",
          file=sys.stderr)
    for f in sorted(set(failures)):
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
