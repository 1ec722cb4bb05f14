"""Commands that change qcow2 metadata in place: snapshot, amend, and check -r.

Names, options, output and exit codes follow qemu-img 7.2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import ops
from ..errors import UnsupportedFeature
from ..model import human_size
from .common import Sub, command, die, parse_o, print_json
from .images import render_check

if TYPE_CHECKING:
    from ..model.check import CheckResult
    from ..model.info import SnapshotInfo


def register(sub: Sub) -> None:
    p = command(sub, "snapshot", "list, create, apply or delete internal snapshots (qcow2)",
             "  vmforge snapshot -l disk.qcow2\n"
             "  vmforge snapshot -c before-upgrade disk.qcow2\n"
             "  vmforge snapshot -a before-upgrade disk.qcow2   revert the disk to it\n"
             "  vmforge snapshot -d before-upgrade disk.qcow2   by name, as qemu-img\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-q", action="store_true", help="quiet")
    _untrusted(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    action.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    action.add_argument("-a", dest="apply", metavar="SNAPSHOT",
                        help="apply a snapshot (id or name): the disk reverts to it")
    action.add_argument("-d", dest="delete", metavar="SNAPSHOT", help="delete a snapshot (by name)")
    p.add_argument("filename")
    p.set_defaults(func=cmd_snapshot)

    p = command(sub, "amend", "change options of an existing image in place (qcow2)",
             "  vmforge amend -o compat=0.10 disk.qcow2        downgrade to version 2\n"
             "  vmforge amend -o refcount_bits=64 disk.qcow2\n"
             "  vmforge amend -o lazy_refcounts=on disk.qcow2\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-o", dest="options", action="append", required=True,
                   help="options key=value,... (compat, lazy_refcounts, refcount_bits)")
    p.add_argument("-p", dest="progress", action="store_true", help="accepted for qemu-img "
                   "compatibility (amend shows no progress)")
    p.add_argument("-q", action="store_true", help="quiet")
    _untrusted(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_amend)


def _untrusted(p: argparse.ArgumentParser) -> None:
    p.add_argument("--untrusted", action="store_true",
                   help="refuse images that name any other file (backing, data file)")


# -- snapshot ------------------------------------------------------------------------------------


def render_snapshots(snapshots: list[SnapshotInfo]) -> str:
    """``qemu-img snapshot -l`` byte for byte (block/qapi.c bdrv_snapshot_dump); "" if none."""
    if not snapshots:
        return ""
    lines = ["Snapshot list:",
             f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs = s.vm_clock_nsec // 1_000_000_000
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s.vm_clock_nsec // 1_000_000 % 1000:03d}")
        icount = "" if s.icount is None else str(s.icount)
        lines.append(f"{s.id:<9} {s.name:<16} {human_size(s.vm_state_size):>8}{date:>20}"
                     f"{clock:>13}{icount:>11}")
    return "\n".join(lines)


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.list:
        text = render_snapshots(ops.list_snapshots(args.filename, args.fmt,
                                                   untrusted=args.untrusted))
        if text:
            print(text)
    elif args.create is not None:
        ops.create_snapshot(args.filename, args.create, args.fmt, untrusted=args.untrusted)
    elif args.apply is not None:
        ops.apply_snapshot(args.filename, args.apply, args.fmt, untrusted=args.untrusted)
    else:
        ops.delete_snapshot(args.filename, args.delete, args.fmt, untrusted=args.untrusted)
    return 0


# -- amend ---------------------------------------------------------------------------------------


def cmd_amend(args: argparse.Namespace) -> int:
    ops.amend(args.filename, parse_o(args.options), args.fmt, untrusted=args.untrusted)
    return 0


# -- check -r ------------------------------------------------------------------------------------


def cmd_check_repair(args: argparse.Namespace) -> int:
    """``check -r leaks|all``: repair, then print the check of the repaired image."""
    from ..model.check import EXIT_UNSUPPORTED

    try:
        report, after = ops.repair(args.filename, args.repair, args.fmt,
                                   untrusted=args.untrusted)
    except UnsupportedFeature as err:
        if err.feature == "checks":
            return die(f"{args.filename}: this image format does not support checks",
                       code=EXIT_UNSUPPORTED)
        raise
    if report.failed:
        for line in report.messages:
            print(line, file=sys.stderr)
        return die("Check failed: Input/output error",
                   "a referenced cluster has refcount 0: only -r all rebuilds the refcounts")
    if report.fixed:
        for line in report.messages:
            print(line, file=sys.stderr)
    for line in after.messages:
        print(line, file=sys.stderr)
    if args.output == "json":
        print_json(repaired_json(after, report.leaks_fixed, report.corruptions_fixed))
    elif not args.q:
        if report.fixed:
            print("The following inconsistencies were found and repaired:\n\n"
                  f"    {report.leaks_fixed} leaked clusters\n"
                  f"    {report.corruptions_fixed} corruptions\n\n"
                  "Double checking the fixed image now...")
        print(render_check(after))
    return after.exit_code


def repaired_json(result: CheckResult, leaks_fixed: int, corruptions_fixed: int) -> dict[str, Any]:
    """qemu-img check -r --output=json: the recheck plus the *-fixed counters (when non-zero)."""
    out: dict[str, Any] = {}
    for key, value in result.to_qemu_json().items():
        if key == "check-errors" and corruptions_fixed:
            out["corruptions-fixed"] = corruptions_fixed
        out[key] = value
        if key == "check-errors" and leaks_fixed:
            out["leaks-fixed"] = leaks_fixed
    return out
