#!/usr/bin/env python3
"""Runtime benchmark: the project's test guest under QEMU, driven through the vmforge CLI.

Everything runs as a user would run it (``vmforge run``, ``vmforge vm ...`` as child
processes) in a private VM state directory, so no VM of the user is seen or touched.
The guest is the one the tests use (``tests/data/guest.py``: the Debian kernel, a busybox
initramfs, an ext4 root disk; built once per machine): 1 vCPU, ``--memory`` (default
128M, the smallest size it boots in reliably: 96M boots, 64M does not), no NIC, booted
directly from its kernel with a counter printing ``VMFORGE-COUNT n`` every second.

Measured, ``--reps`` times each (median, min, max):

1. **boot**: QEMU start to QMP ready and QEMU start to the guest's marker, as
   ``vmforge run --output json`` reports them (with the accelerator vmforge chose: TCG
   or KVM, labelled), the wall time of ``vmforge run --detach``, and ``vmforge vm stop``
   (ACPI power-down);
2. **live migration** on loopback (``vmforge vm migrate NAME --to tcp:127.0.0.1:PORT``):
   total time and downtime from QEMU's ``query-migrate``, RAM sent; the last booted VM
   hops ``--reps`` times. After every hop the guest's counter must go on from where it
   was, in the destination QEMU, with the source QEMU gone;
3. **linked clones in a memory budget** (``--budget``, default 1G): the migrated VM is
   the first; ``vmforge vm clone FIRST NEW --start`` adds linked clones of the same
   base until vmforge refuses the next one. The budget is handed to vmforge as its
   memory capacity (``VMFORGE_RESERVED_MEMORY`` = host memory - budget, overcommit 1),
   so vmforge's own capacity check says when the next clone would not fit (its vCPU
   limit may say so first: that is the answer too). The count must equal what the
   policy allows; every clone must be counting at the same time; then all are
   stopped and no QEMU process, QMP socket or pid file may be left.

The base image's SHA-256 must be the same at the end. A failed check exits 1 (and
BENCHMARKS.md is not written); a missing tool exits 2; when the guest cannot be built
(no Debian package registry) the benchmark says so and exits 0 without measuring. Every
VM is killed in a ``finally``, whatever happened.

    .venv/bin/python bench/runtime.py                      # 3 reps, 1G budget
    .venv/bin/python bench/runtime.py --reps 1 --budget 256M
    .venv/bin/python bench/runtime.py --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from tests.data.guest import MARKER, Guest, GuestUnavailable  # noqa: E402
from tests.data.guest import build as build_guest  # noqa: E402
from toolpaths import ToolMissing, find_vmforge  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
MARK_BEGIN, MARK_END = "<!-- bench:runtime -->", "<!-- /bench:runtime -->"
#: whole lines only: the serial log may end in a number that is still being written
COUNT = re.compile(rb"VMFORGE-COUNT (\d+)\r?\n")
#: a sanity bound on the clones one run may start (vmforge's own --count bound)
MAX_CLONES = 64


class CheckFailed(Exception):
    """A measurement's verification failed: the run exits 1."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


# ------------------------------------------------------------------ processes


def qemu_pids(root: Path) -> list[int]:
    """Live (non-zombie) processes whose command line names ``root`` (only ours can)."""
    from vmforge.runtime.state import vm_processes

    return vm_processes(root)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Cli:
    """The vmforge CLI with a private state directory."""

    def __init__(self, cmd: list[str], state_root: Path, verbose: bool) -> None:
        self.cmd, self.state_root, self.verbose = cmd, state_root, verbose
        self.env = dict(os.environ, VMFORGE_STATE_DIR=str(state_root))

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
            ok: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
        argv = [*self.cmd, *args]
        if self.verbose:
            print(f"  $ {shlex.join(argv)}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  env=dict(self.env, **(env or {})), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"`vmforge {shlex.join(args)}` did not finish within {timeout:g} s") from None
        wall = time.perf_counter() - t0
        if ok and proc.returncode != 0:
            raise CheckFailed(f"`vmforge {shlex.join(args)}` exited {proc.returncode}: "
                              f"{proc.stderr.strip()[-400:]}")
        return proc, wall

    def json(self, *args: str, env: dict[str, str] | None = None,
             timeout: float = 300) -> tuple[Any, float]:
        proc, wall = self.run(*args, "--output", "json", env=env, timeout=timeout)
        try:
            return json.loads(proc.stdout), wall
        except json.JSONDecodeError:
            raise CheckFailed(f"`vmforge {shlex.join(args)}` printed no JSON: "
                              f"{proc.stdout[-200:]!r}") from None

    def show(self, name: str) -> dict[str, Any]:
        data, _ = self.json("vm", "show", name)
        return dict(data)

    def serial(self, name: str) -> bytes:
        try:
            return (self.state_root / name / "serial.log").read_bytes()
        except FileNotFoundError:
            return b""

    def counts(self, name: str) -> list[int]:
        return [int(n) for n in COUNT.findall(self.serial(name))]

    def wait_counts(self, name: str, n: int, timeout: float = 90) -> list[int]:
        """The guest's counter values once there are at least ``n`` (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.counts(name)) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.counts(name)

    def kill_everything(self) -> list[int]:
        """``vmforge vm kill`` every VM, then SIGKILL any QEMU still naming our state root."""
        if self.state_root.is_dir():
            for entry in sorted(self.state_root.iterdir()):
                if entry.is_dir():
                    with contextlib.suppress(CheckFailed):
                        self.run("vm", "kill", entry.name, ok=False, timeout=60)
        left = qemu_pids(self.state_root)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


# ---------------------------------------------------------------------- phases


def hardware_args(args: argparse.Namespace, guest: Guest) -> list[str]:
    hw = ["--cpus", "1", "--memory", f"{args.memory // MiB}M", "--net", "none",
          "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
          "--append", guest.append("vmforge.counter=1"), "--timeout", f"{args.boot_timeout:g}"]
    return hw + (["--accel", args.accel] if args.accel else [])


def stop_and_check(cli: Cli, name: str, res: Results, key: str) -> None:
    pid = cli.show(name)["pid"]
    proc, wall = cli.run("vm", "stop", name, timeout=120)
    res.add(key, wall)
    check("stopped by" in proc.stdout, f"vm stop {name}: {proc.stdout.strip()}")
    if "stopped by powerdown" not in proc.stdout:  # quit or kill: the guest ignored ACPI
        res.facts.setdefault("hard_stops", []).append(f"{name}: {proc.stdout.strip()}")
    check(pid not in qemu_pids(cli.state_root), f"QEMU {pid} of {name} still runs after vm stop")
    d = cli.state_root / name
    check(not (d / "qmp.sock").exists() and not (d / "qemu.pid").exists(),
          f"{name}: the QMP socket or pid file is left after vm stop")


def phase_boot(cli: Cli, args: argparse.Namespace, guest: Guest, base: Path,
               res: Results) -> str:
    """Boot ``--reps`` times; every VM but the last is stopped and removed."""
    name = ""
    for rep in range(1, args.reps + 1):
        name = f"boot-{rep}"
        out, wall = cli.json("run", "--detach", "--untrusted", "-f", "raw", "--name", name,
                             *hardware_args(args, guest), str(base),
                             timeout=args.boot_timeout + 120)
        check(out.get("marker") == MARKER, f"{name}: the guest printed {out.get('marker')!r}")
        check(out.get("accel") in ("kvm", "tcg") and bool(out.get("accel_reason")),
              f"{name}: no accelerator reported ({out.get('accel')!r})")
        accel = res.facts.setdefault("accel", out["accel"])
        res.facts.setdefault("accel_reason", out["accel_reason"])
        check(out["accel"] == accel, f"{name}: accelerator changed from {accel} to {out['accel']}")
        qmp, up = float(out["qmp_ready_seconds"]), float(out["guest_up_seconds"])
        check(0 < qmp <= up <= wall + 1, f"{name}: implausible times qmp={qmp} up={up} wall={wall}")
        shown = cli.show(name)
        check(shown["status"] == "running" and shown["pid"] in qemu_pids(cli.state_root),
              f"{name}: not running after vmforge run --detach ({shown['status']})")
        res.add("qmp_s", qmp)
        res.add("marker_s", up)
        res.add("run_wall_s", wall)
        print(f"  boot {rep}: QMP ready {qmp:.2f} s, marker {up:.2f} s, vmforge run {wall:.2f} s "
              f"({accel.upper()})", flush=True)
        if rep < args.reps:
            stop_and_check(cli, name, res, "stop_s")
            cli.run("vm", "rm", name)
    return name


def check_counter_continues(counts: list[int], last: int, what: str) -> None:
    """The values from ``last`` on must be consecutive: the guest did not restart."""
    check(last in counts, f"{what}: the counter value {last} vanished from the log")
    at = len(counts) - 1 - counts[::-1].index(last)
    after = counts[at:]
    check(after == list(range(last, last + len(after))) and len(after) >= 3,
          f"{what}: the counter did not go on from {last}: {after[:12]}")


def phase_migrate(cli: Cli, args: argparse.Namespace, name: str, res: Results) -> None:
    check(len(cli.wait_counts(name, 2)) >= 2, f"{name}: the guest's counter does not run")
    for hop in range(1, args.reps + 1):
        src = cli.show(name)["pid"]
        last = cli.counts(name)[-1]
        out, wall = cli.json("vm", "migrate", name, "--to", f"tcp:127.0.0.1:{free_port()}",
                             timeout=args.boot_timeout + 120)
        total, down = int(out["total_ms"]), int(out["downtime_ms"])
        check(out["source_pid"] == src and out["destination_pid"] != src,
              f"migration {hop}: pids {out['source_pid']} -> {out['destination_pid']}, "
              f"VM ran in {src}")
        check(total > 0 and 0 <= down <= total, f"migration {hop}: total {total} ms, "
                                                f"downtime {down} ms")
        counts = cli.wait_counts(name, len(cli.counts(name)) + 2, timeout=60)
        check_counter_continues(counts, last, f"migration {hop}")
        shown = cli.show(name)
        check(shown["status"] == "running" and shown["pid"] == out["destination_pid"],
              f"migration {hop}: the VM is {shown['status']} in pid {shown['pid']}")
        check(qemu_pids(cli.state_root) == [out["destination_pid"]],
              f"migration {hop}: QEMU processes {qemu_pids(cli.state_root)}, expected only the "
              f"destination {out['destination_pid']}")
        res.add("mig_total_ms", total)
        res.add("mig_down_ms", down)
        res.add("mig_wall_s", wall)
        if out.get("transferred_bytes"):
            res.add("mig_sent_mib", out["transferred_bytes"] / MiB)
        print(f"  migration {hop}: total {total} ms, downtime {down} ms, vmforge vm migrate "
              f"{wall:.2f} s; counter went on from {last}", flush=True)


def phase_clones(cli: Cli, args: argparse.Namespace, first: str, res: Results) -> None:
    host, _ = cli.json("host")  # this host's real policy; ``first`` is the only VM held
    check([v["name"] for v in host["vms"]] == [first], f"unexpected VMs held: {host['vms']}")
    env: dict[str, str] = {}
    mem_capacity = int(host["memory_capacity"])
    if args.budget <= mem_capacity:
        # the budget becomes vmforge's memory capacity, so its own check refuses the next VM
        env = {"VMFORGE_RESERVED_MEMORY": str(int(host["memory"]) - args.budget),
               "VMFORGE_MEMORY_OVERCOMMIT": "1"}
        mem_capacity = args.budget
    else:
        res.facts["budget_note"] = (f"the budget is above what vmforge allows on this host "
                                    f"({mem_capacity / MiB:.0f} MiB): its own limit applied")
    expected = min(mem_capacity // args.memory, int(host["cpu_capacity"]), MAX_CLONES)
    members = [first]
    disk = [int(cli.show(first)["disks"][0]["bytes_on_disk"])]
    refusal = ""
    for k in range(2, MAX_CLONES + 2):
        new = f"clone-{k}"
        proc, wall = cli.run("vm", "clone", first, new, "--start", "--output", "json", env=env,
                             ok=False, timeout=args.boot_timeout + 120)
        if proc.returncode != 0:
            refusal = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
            # one line: what was refused and why; the hint is vmforge's advice, not a result
            refusal = refusal.removeprefix("vmforge: ").split(" (hint: ")[0]
            check("would exceed the host's" in refusal,
                  f"{new}: vm clone --start failed, but not by the capacity check: {refusal}")
            # the clone was made before its start was refused: stopped, nothing running
            check(cli.show(new)["status"] == "stopped", f"{new}: runs although refused")
            cli.run("vm", "rm", new)
            break
        out = json.loads(proc.stdout)
        started = out.get("started") or {}
        check(started.get("marker") == MARKER, f"{new}: the guest printed {started.get('marker')!r}")
        members.append(new)
        disk.append(int(out["bytes_on_disk"]))
        res.add("clone_up_s", float(started["guest_up_seconds"]))
        print(f"  {new}: {out['bytes_on_disk'] / 1024:.0f} KiB on disk, guest up after "
              f"{started['guest_up_seconds']:.1f} s ({len(members)} running)", flush=True)
    check(bool(refusal), f"vmforge started {len(members)} VMs without refusing one")
    check(len(members) == expected, f"{len(members)} VMs ran in the budget; vmforge's policy "
                                    f"allows {expected}")

    # all at once: every guest's counter moves while all are up
    listed, _ = cli.json("vm", "list")
    running = {r["name"]: r["pid"] for r in listed if r["status"] == "running"}
    check(set(running) == set(members), f"running {sorted(running)}, expected {members}")
    check(len(set(running.values())) == len(members), "two VMs share a QEMU process")
    before = {m: len(cli.counts(m)) for m in members}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(len(cli.counts(m)) < before[m] + 2 for m in members):
        time.sleep(0.3)
    stuck = [m for m in members if len(cli.counts(m)) < before[m] + 2]
    check(not stuck, f"these guests stopped counting while all ran: {stuck}")
    rss = [rss_bytes(running[m]) for m in members]
    overlays = [int(cli.show(m)["disks"][0]["bytes_on_disk"]) for m in members]

    for m in members:
        stop_and_check(cli, m, res, "clone_stop_s")
    check(not qemu_pids(cli.state_root), f"QEMU left running: {qemu_pids(cli.state_root)}")
    leftovers = [p.name for p in cli.state_root.rglob("*") if p.suffix in (".sock", ".pid")]
    check(not leftovers, f"sockets or pid files left: {leftovers}")
    for m in members:
        cli.run("vm", "rm", m)
    res.facts.update(clones=len(members), expected=expected, refusal=refusal,
                     clone_disk=disk, clone_overlay=overlays, clone_rss=rss)


# ---------------------------------------------------------------------- report


def machine_facts() -> dict[str, str]:
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    proc = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    try:
        version = metadata.version("vmforge")
    except metadata.PackageNotFoundError:
        version = "?"
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if rev.returncode == 0:
        version += f" (git {rev.stdout.strip()})"
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return {"cpus": str(len(os.sched_getaffinity(0))), "memory": f"{total / GiB:.1f} GiB",
            "kernel": f"{platform.system()} {platform.release()}",
            "qemu": (proc.stdout.splitlines() or ["?"])[0], "vmforge": version,
            "kvm": "present" if os.path.exists("/dev/kvm") else "absent"}


def stat_row(label: str, values: list[float], unit: str, digits: int) -> str | None:
    if not values:
        return None  # e.g. no boot VM is stopped with --reps 1
    f = f"{{:.{digits}f}} {unit}"
    return (f"| {label} | {f.format(statistics.median(values))} | {f.format(min(values))} | "
            f"{f.format(max(values))} | {len(values)} |")


def report(args: argparse.Namespace, facts: dict[str, str], res: Results, guest: Guest,
           load_start: float) -> str:
    s, fx = res.samples, res.facts
    accel = str(fx.get("accel", "?")).upper()
    lines = [
        "## Runtime: the test guest under QEMU",
        "",
        f"Measured {dt.date.today().isoformat()} on {facts['cpus']} CPUs, {facts['memory']}, "
        f"{facts['kernel']}; {facts['qemu']}; vmforge {facts['vmforge']}; load average "
        f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end.",
        f"Accelerator: **{accel}** ({fx.get('accel_reason', '?')}).",
        f"Guest: Debian kernel {guest.kernel_version} + busybox initramfs (tests/data/guest.py), "
        f"1 vCPU, {args.memory // MiB} MiB, no NIC, direct kernel boot, the raw root disk as "
        f"base (`--untrusted -f raw`). Median of {args.reps} run{'s' if args.reps > 1 else ''}; "
        "every command goes through the vmforge CLI.",
        "",
        "| measurement | median | min | max | runs |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        stat_row(f"QEMU start → QMP ready ({accel})", s.get("qmp_s", []), "s", 2),
        stat_row(f"QEMU start → guest marker `{MARKER}` ({accel})", s.get("marker_s", []), "s", 2),
        stat_row("`vmforge run --detach` wall time (overlay, QEMU, wait for the marker)",
                 s.get("run_wall_s", []), "s", 2),
        stat_row("`vmforge vm stop` (ACPI power-down)", s.get("stop_s", []), "s", 2),
        stat_row("live migration on loopback: total time (query-migrate)",
                 s.get("mig_total_ms", []), "ms", 0),
        stat_row("live migration: downtime (query-migrate)", s.get("mig_down_ms", []), "ms", 0),
        stat_row("live migration: RAM sent", s.get("mig_sent_mib", []), "MiB", 1),
        stat_row("`vmforge vm migrate` wall time", s.get("mig_wall_s", []), "s", 2),
        stat_row("linked clone (`vm clone --start`): QEMU start → marker, the others running",
                 s.get("clone_up_s", []), "s", 2),
        stat_row("`vmforge vm stop` of a clone, the others running", s.get("clone_stop_s", []),
                 "s", 2),
    ]
    lines += [r for r in rows if r is not None] + [""]
    disk, over, rss = fx.get("clone_disk", []), fx.get("clone_overlay", []), fx.get("clone_rss", [])
    lines += [
        f"**Linked clones in a {args.budget / MiB:.0f} MiB budget, {args.memory // MiB} MiB each: "
        f"{fx.get('clones', 0)} ran at once** (what vmforge's policy allows: {fx.get('expected')}; "
        "the first is the migrated VM, the others came from `vmforge vm clone FIRST NEW --start`). "
        f"vmforge refused the next one: \"{fx.get('refusal', '')}\".",
        "",
        "| per clone | median | min | max |",
        "|---|---:|---:|---:|",
    ]
    for label, values, unit in (("disk used at creation (`vm clone`; the first: `vm show`)", disk,
                                 1024),
                                ("overlay on disk while running (`vm show`)", over, 1024),
                                ("QEMU resident memory while all ran", rss, MiB)):
        if values:
            u = "KiB" if unit == 1024 else "MiB"
            lines.append(f"| {label} | {statistics.median(values) / unit:.0f} {u} | "
                         f"{min(values) / unit:.0f} {u} | {max(values) / unit:.0f} {u} |")
    if rss:
        lines.append("")
        lines.append(f"All QEMU processes together held {sum(rss) / MiB:.0f} MiB resident for "
                     f"{len(rss) * args.memory / MiB:.0f} MiB of guest memory; stopping all "
                     f"{len(rss)} one after the other took {sum(s.get('clone_stop_s', [])):.1f} s.")
    if fx.get("budget_note"):
        lines.append(f"Note: {fx['budget_note']}.")
    if fx.get("hard_stops"):
        lines.append(f"Not stopped by ACPI power-down: {'; '.join(fx['hard_stops'])}.")
    lines += [
        "",
        "Verified in this run: every boot printed the marker and ran until stopped; after each "
        "migration the source QEMU had exited and the guest's counter went on without restarting "
        "in the destination; every clone counted while all ran; after the stops no QEMU process, "
        "QMP socket or pid file was left; the base image's SHA-256 was unchanged.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, body: str) -> None:
    """Replace the section between the bench:runtime markers in ``path`` (or append it)."""
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
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="vmforge runtime benchmark on the test guest",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="boots and migration hops (default 3)")
    ap.add_argument("--memory", type=parse_size, default=128 * MiB,
                    help="guest memory of every VM (default 128M)")
    ap.add_argument("--budget", type=parse_size, default=GiB,
                    help="memory budget for the linked clones (default 1G)")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                    help="passed to vmforge run (default: vmforge's choice)")
    ap.add_argument("--boot-timeout", type=float, default=180,
                    help="seconds a guest may take to print its marker (default 180)")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help=f"write the report between {MARK_BEGIN} and {MARK_END} in FILE")
    ap.add_argument("--work-dir", type=Path,
                    help="where the base image and VM state go (default: a new temporary "
                         "directory, removed at the end)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each vmforge command")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.memory % MiB or args.memory < 16 * MiB:
        ap.error("--memory must be a whole number of MiB, at least 16M")
    if not args.memory <= args.budget <= MAX_CLONES * args.memory:
        ap.error(f"--budget must hold 1 to {MAX_CLONES} VMs of --memory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cmd = find_vmforge()
        if shutil.which("qemu-system-x86_64") is None:
            raise ToolMissing("qemu-system-x86_64 is not installed (make setup)")
    except ToolMissing as err:
        print(f"bench: cannot run the runtime benchmark: {err}", file=sys.stderr)
        return 2
    try:
        guest = build_guest()
    except GuestUnavailable as err:
        # like the convert suite's OS image: no Debian registry here means no rows, not a failure
        print(f"bench: runtime benchmark skipped: the test guest cannot be built here ({err})",
              file=sys.stderr)
        return 0
    load_start = os.getloadavg()[0]
    facts = machine_facts()
    print(f"machine: {facts['cpus']} CPUs, {facts['memory']}, {facts['kernel']}, /dev/kvm "
          f"{facts['kvm']}; {facts['qemu']}; vmforge {facts['vmforge']}; load average "
          f"{load_start:.2f}", flush=True)
    if load_start > 0.5:
        print(f"bench: warning: load average is {load_start:.1f}; other work on this machine "
              "will skew the timings", file=sys.stderr)

    made_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="vmforge-rtbench-")) if made_work else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cli = Cli(cmd, work / "vms", args.verbose)
    res = Results()
    failure = ""
    try:
        base = work / "base.raw"
        shutil.copyfile(guest.rootfs, base)
        digest = sha256(base)
        cli.run("host")  # probes the accelerator once (cached in the state root), untimed
        print(f"boot ({args.reps}x):", flush=True)
        vm = phase_boot(cli, args, guest, base, res)
        print(f"live migration on loopback ({args.reps} hops):", flush=True)
        phase_migrate(cli, args, vm, res)
        print(f"linked clones in {args.budget // MiB} MiB:", flush=True)
        phase_clones(cli, args, vm, res)
        check(sha256(base) == digest, "the base image changed")
    except CheckFailed as err:
        failure = str(err)
    finally:
        left = cli.kill_everything()
        if left and not failure:
            failure = f"QEMU processes were still running at the end: {left}"
        if made_work:
            shutil.rmtree(work, ignore_errors=True)
    if failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    body = report(args, facts, res, guest, load_start)
    print()
    print(body)
    if args.markdown:
        write_markdown(args.markdown, body)
        print(f"updated {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
