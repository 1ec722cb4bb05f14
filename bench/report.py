"""The markdown the convert benchmark writes: grouped tables, scaling, and how it was measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from measure import Result
from sampledata import MiB

MARK_BEGIN, MARK_END = "<!-- bench:convert -->", "<!-- /bench:convert -->"


@dataclass(frozen=True)
class Row:
    """What the report needs of a case: its title, group, target and its result."""

    id: str
    title: str
    group: str
    target: float | None  # the vmforge/qemu-img time target, if it sets one
    size_target: float | None  # the output size target (vmforge/qemu-img), if any
    result: Result


def fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def fmt_cores(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} cores"


def _time_cell(r: Result, tool: str, reps: int) -> str:
    runs = r.runs.get(tool, [])
    if not runs:
        return "—"
    if any(not x.ok for x in runs):
        return "FAILED"
    n = len(runs)
    return fmt_s(r.median(tool)) + (f" (n={n})" if n < reps else "")


def ratios(r: Result) -> tuple[float | None, float | None]:
    """(time ratio, size ratio) vmforge / qemu-img, None where a side is missing."""
    q, v = r.median("qemu-img"), r.median("vmforge")
    qr, vr = r.last_ok("qemu-img"), r.last_ok("vmforge")
    time_ratio = v / q if q and v else None
    size_ratio = vr.out_bytes / qr.out_bytes if qr and vr and qr.out_bytes else None
    return time_ratio, size_ratio


def best_ratio(r: Result) -> float | None:
    """vmforge's fastest run over qemu-img's: the ratio with the machine's noise left out
    (the slowest runs are the noisy ones; nothing makes a run faster than it can be)."""
    q, v = r.best("qemu-img"), r.best("vmforge")
    return v / q if q and v else None


def target_cell(row: Row) -> str:
    """The issue's target for this row and whether this run met it."""
    if row.target is None:
        return "—"
    want = f"≤ {row.target:.2f}×" + (f", size ≤ {row.size_target:.2f}" if row.size_target else "")
    t, s = ratios(row.result)
    if t is None:
        return want
    met = t <= row.target and (row.size_target is None or (s is not None and s <= row.size_target))
    return f"{want}: {'met' if met else '**missed**'}"


def group_table(rows: Sequence[Row], reps: int) -> str:
    lines = [
        "| case | qemu-img s | vmforge s | vmforge / qemu-img | target | best runs vmforge / "
        "qemu-img | size vmforge / qemu-img | qemu-img CPU | vmforge CPU | qemu-img RSS MiB "
        "| vmforge RSS MiB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row.result
        t, s = ratios(r)
        b = best_ratio(r)
        lines.append(
            f"| {row.title} | {_time_cell(r, 'qemu-img', reps)} | {_time_cell(r, 'vmforge', reps)} "
            f"| {'—' if t is None else f'{t:.2f}×'} | {target_cell(row)} "
            f"| {'—' if b is None else f'{b:.2f}×'} "
            f"| {'—' if s is None else f'{s:.3f}'} "
            f"| {fmt_cores(r.cores('qemu-img'))} | {fmt_cores(r.cores('vmforge'))} "
            f"| {r.peak_rss('qemu-img') / MiB:.0f} | {r.peak_rss('vmforge') / MiB:.0f} |"
        )
    return "\n".join(lines)


def floor_table(rows: Sequence[Row]) -> str:
    """Each tool's time above the kernel copy floor (medians, and best runs' ratios)."""
    lines = ["| case | kernel copy floor s | qemu-img − floor s | vmforge − floor s "
             "| best runs qemu-img / floor | best runs vmforge / floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        r = row.result
        floor = r.median("floor")
        cells = []
        for tool in ("qemu-img", "vmforge"):
            t = r.median(tool)
            cells.append("—" if t is None or floor is None else f"{t - floor:+.2f}")
        bests = []
        for tool in ("qemu-img", "vmforge"):
            t, f = r.best(tool), r.best("floor")
            bests.append("—" if t is None or not f else f"{t / f:.2f}×")
        lines.append(f"| {row.title} | {fmt_s(floor)} | {' | '.join(cells)} | {' | '.join(bests)} |")
    return "\n".join(lines)


def scaling_table(scaling: dict[str, tuple[str, dict[int, Result]]], reused: int | None) -> str:
    """vmforge's time and CPU use per worker count, for each scaled case."""
    counts = sorted({n for _, per in scaling.values() for n in per})
    head = " | ".join(f"-m {n}{' (default)' if n == reused else ''}" for n in counts)
    lines = [f"| case | {head} | fastest vs -m 1 |",
             "|---|" + "---:|" * len(counts) + "---:|"]
    for title, per in scaling.values():
        cells = []
        for n in counts:
            r = per.get(n)
            if r is None:
                cells.append("—")
            elif r.failed():
                cells.append("FAILED")
            else:
                cells.append(f"{fmt_s(r.median('vmforge'))} s, {fmt_cores(r.cores('vmforge'))}")
        times = {n: t for n, r in per.items() if not r.failed() and (t := r.median("vmforge"))}
        speedup = "—"
        if 1 in times:
            best = min(times, key=lambda n: times[n])
            speedup = f"{times[1] / times[best]:.2f}× (-m {best})"
        lines.append(f"| {title} | {' | '.join(cells)} | {speedup} |")
    return "\n".join(lines)


def proportionality(rows: dict[str, Row], pairs: Sequence[tuple[str, str, str]]) -> str:
    """Sentences comparing sparse rows: does time follow the data, not the virtual size?"""
    out = []
    for a, b, what in pairs:
        if a not in rows or b not in rows:
            continue
        parts = []
        for tool in ("vmforge", "qemu-img"):
            ta, tb = rows[a].result.median(tool), rows[b].result.median(tool)
            if ta and tb:
                parts.append(f"{tool} {ta / tb:.2f}×")
        if parts:
            out.append(f"{rows[a].title} against {rows[b].title} ({what}): " + ", ".join(parts)
                       + " the time.")
    return "\n".join(f"- {s}" for s in out)


def body(groups: Sequence[tuple[str, str]], rows: Sequence[Row], reps: int, context: str,
         skipped: dict[str, str], extra: dict[str, Callable[[], str]]) -> str:
    """The whole section: context, then one table per group, then the extra sections."""
    parts = ["## Convert: vmforge vs qemu-img", "", context.rstrip(), ""]
    for key, title in groups:
        members = [r for r in rows if r.group == key]
        if key in skipped:
            parts += [f"### {title}", "", f"_Skipped: {skipped[key]}_", ""]
            continue
        text = extra[key]() if key in extra else ""
        if not members and not text:
            continue
        parts += [f"### {title}", ""]
        if members:
            parts += [group_table(members, reps), ""]
        if text:
            parts += [text, ""]
    return "\n".join(parts)


def write_markdown(path: Path, text: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the section between the markers in ``path`` (or append it)."""
    section = f"{begin}\n{text.rstrip()}\n{end}"
    doc = path.read_text() if path.exists() else "# Benchmarks\n\nRegenerate with `make bench`.\n"
    b, e = doc.find(begin), doc.find(end)
    if b != -1 and e > b:
        doc = doc[:b] + section + doc[e + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + section + "\n"
    path.write_text(doc)
