#!/usr/bin/env python3
"""The copy alone: vmforge's convert against floor.py's loop, inside one process.

bench/convert.py times whole processes, start-up included. This times only the copy:
``vmforge.convert()`` and ``floor.copy()`` run in this one process after their imports,
alternating, with the source read back into the page cache before each run (and the
cache emptied first when run as root, as ``convert.py --drop-caches`` does). What is
left between the two is what vmforge's pipeline costs over a plain kernel copy: zero
probes, worker hand-offs, per-chunk Python, format metadata. The last vmforge output
of each source is checked with ``qemu-img compare`` (and ``check``).

    .venv/bin/python bench/copy_phase.py                    # the cached sources, -O qcow2
    .venv/bin/python bench/copy_phase.py -O vhdx --reps 9 bench/.cache/os-*.raw

Without SOURCE arguments it takes the raw images convert.py caches in bench/.cache
(the mixed image and the OS image), those that are there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "src"))
import floor  # noqa: E402
from measure import verify, warm_up  # noqa: E402
from toolpaths import ToolMissing, find_qemu_img  # noqa: E402

import vmforge  # noqa: E402

CACHED = ("mixed-*.raw", "os-*.raw")


def empty_page_cache() -> bool:
    """Drop the page cache when allowed (root); False where it is not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def time_one(tool: str, src: Path, out: Path, fmt: str) -> float:
    out.unlink(missing_ok=True)
    dropped = empty_page_cache()
    warm_up(src)
    start = time.perf_counter()
    if tool == "floor":
        floor.copy(str(src), str(out))
    else:
        vmforge.convert(str(src), str(out), fmt, src_fmt="raw")
    seconds = time.perf_counter() - start
    if not dropped:
        os.sync()  # at least keep this run's writeback out of the next one
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="*", type=Path, help="raw images (default: the cached ones)")
    ap.add_argument("-O", dest="fmt", default="qcow2", help="vmforge's output format")
    ap.add_argument("--reps", type=int, default=7, help="runs per tool per source")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("VMFORGE_BENCH_DIR", REPO / "bench" / ".cache")))
    args = ap.parse_args()
    sources = args.sources or sorted(p for pattern in CACHED for p in args.cache_dir.glob(pattern))
    if not sources:
        print(f"copy_phase: no sources given and none cached in {args.cache_dir} "
              "(bench/convert.py builds them)", file=sys.stderr)
        return 2
    try:
        qemu_img = find_qemu_img()
    except ToolMissing as err:
        print(f"copy_phase: {err}", file=sys.stderr)
        return 2
    out_dir = args.cache_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for src in sources:
        out = {tool: out_dir / f"copy-phase.{tool}" for tool in ("floor", "vmforge")}
        times: dict[str, list[float]] = {"floor": [], "vmforge": []}
        for rep in range(args.reps):
            order = ("floor", "vmforge") if rep % 2 == 0 else ("vmforge", "floor")
            for tool in order:
                times[tool].append(time_one(tool, src, out[tool], args.fmt))
        error = verify(qemu_img, src, "raw", out["vmforge"], args.fmt)
        failed = failed or bool(error)
        for path in out.values():
            path.unlink(missing_ok=True)
        med = {tool: statistics.median(t) for tool, t in times.items()}
        print(f"{src.name} -> {args.fmt}, {args.reps} runs each, copy only (no start-up):")
        for tool, t in times.items():
            runs = " ".join(f"{x:.2f}" for x in t)
            print(f"  {tool:8} median {med[tool]:.3f} s  best {min(t):.3f} s   ({runs})")
        print(f"  vmforge - floor: {med['vmforge'] - med['floor']:+.3f} s (median), "
              f"{min(times['vmforge']) - min(times['floor']):+.3f} s (best)")
        print(f"  vmforge output: {'FAILED: ' + error if error else 'verified by qemu-img'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
