"""Commands that change images in place or make new ones from them.

resize, commit, rebase, dd, clone, overlay (snapshot and amend live in snapshots.py).
"""

from __future__ import annotations

import argparse

from .. import ops
from ..errors import UsageError
from .common import Sub, command, parse_o, size_arg
from .progress import progress_bar


def register(sub: Sub) -> None:
    p = command(sub, "resize", "grow or shrink an image's virtual disk in place",
             "  vmforge resize disk.qcow2 +10G\n  vmforge resize disk.raw 20G\n"
             "  vmforge resize --shrink disk.qcow2 8G     refused if data lies past 8G\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("--shrink", action="store_true", help="allow the image to get smaller")
    p.add_argument("--force", action="store_true",
                   help="with --shrink: drop data stored past the new end")
    p.add_argument("-q", action="store_true", help="quiet")
    _untrusted(p)
    p.add_argument("filename")
    p.add_argument("size", help="new size (10G) or a change (+1G, -512M)")
    p.set_defaults(func=cmd_resize)

    p = command(sub, "commit", "write an overlay's changes into its backing file",
             "  vmforge commit vm1.qcow2               into the backing file, then empty vm1\n"
             "  vmforge commit -d vm1.qcow2            keep vm1's data as it is\n"
             "  vmforge commit -b base.qcow2 top.qcow2 into a deeper image of the chain\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-b", dest="base", help="commit into this image of the chain (implies -d)")
    p.add_argument("-d", dest="keep", action="store_true", help="do not empty the image afterwards")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", action="store_true", help="quiet")
    _untrusted(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_commit)

    p = command(sub, "rebase", "change an overlay's backing file, keeping what the guest sees",
             "  vmforge rebase -b new-base.qcow2 -F qcow2 vm1.qcow2\n"
             "  vmforge rebase -u -b moved/base.qcow2 -F qcow2 vm1.qcow2   rename only\n"
             "  vmforge rebase -b '' vm1.qcow2          flatten: no backing file left\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-b", dest="backing", required=True, help="new backing file ('' for none)")
    p.add_argument("-F", dest="backing_fmt", help="format of the new backing file")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="only rewrite the reference (the data is already the same)")
    p.add_argument("-q", action="store_true", help="quiet")
    _untrusted(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_rebase)

    p = command(sub, "dd", "copy part of an image into a new image (qemu-img dd)",
             "  vmforge dd if=disk.qcow2 of=mbr.raw bs=512 count=1\n"
             "  vmforge dd -O qcow2 if=disk.raw of=tail.qcow2 bs=1M skip=100\n")
    p.add_argument("-f", dest="fmt", help="input format (probed when omitted)")
    p.add_argument("-O", dest="out_fmt", default="raw", help="output format (default raw)")
    _untrusted(p)
    p.add_argument("operands", nargs="+", metavar="KEY=VALUE", help="if=, of=, bs=, count=, skip=")
    p.set_defaults(func=cmd_dd)

    for linked_only in (False, True):
        if linked_only:
            p = command(sub, "overlay", "create an overlay (differencing disk) on a base image",
                     "  vmforge overlay golden.qcow2 vm1.qcow2\n"
                     "  vmforge overlay -O vpc golden.vhd vm1.vhd\n")
        else:
            p = command(sub, "clone", "a new VM disk from a golden image: linked or full copy",
                     "  vmforge clone --linked golden.qcow2 vm1.qcow2   an overlay, nothing copied\n"
                     "  vmforge clone --full golden.qcow2 vm2.qcow2     an independent copy\n")
            mode = p.add_mutually_exclusive_group(required=True)
            mode.add_argument("--linked", action="store_true", help="an overlay backed by BASE")
            mode.add_argument("--full", action="store_true", help="a flat, independent copy")
            p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("-f", dest="fmt", help="format of BASE (probed when omitted)")
        p.add_argument("-O", dest="out_fmt", help="format of the new image")
        p.add_argument("-o", dest="options", action="append", help="options key=value,...")
        p.add_argument("--absolute", action="store_true",
                       help="store BASE's absolute path (default: relative to the new image)")
        p.add_argument("-q", action="store_true", help="quiet")
        _untrusted(p)
        p.add_argument("base")
        p.add_argument("new")
        p.set_defaults(func=cmd_clone, linked_only=linked_only)


def _untrusted(p: argparse.ArgumentParser) -> None:
    p.add_argument("--untrusted", action="store_true",
                   help="refuse images that name any other file (backing, data file, extent)")


def cmd_resize(args: argparse.Namespace) -> int:
    ops.resize(args.filename, args.size, args.fmt, shrink=args.shrink, force=args.force,
               untrusted=args.untrusted)
    if not args.q:
        print("Image resized.")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    with progress_bar(enabled=args.progress and not args.q, label="commit") as bar:
        ops.commit(args.filename, args.fmt, base=args.base, keep=args.keep, progress=bar,
                   untrusted=args.untrusted)
    if not args.q:
        print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    ops.rebase(args.filename, args.backing, args.backing_fmt, args.fmt, unsafe=args.unsafe,
               untrusted=args.untrusted)
    return 0


_DD_KEYS = ("if", "of", "bs", "count", "skip")


def cmd_dd(args: argparse.Namespace) -> int:
    values: dict[str, str] = {}
    for op in args.operands:
        key, sep, value = op.partition("=")
        if not sep or key not in _DD_KEYS:
            raise UsageError(f"unrecognised operand '{op}'", hint="use if=, of=, bs=, count=, skip=")
        values[key] = value
    if "if" not in values or "of" not in values:
        raise UsageError("dd needs if=INPUT and of=OUTPUT")
    bs = size_arg(values.get("bs", "512"))
    ops.dd(values["if"], values["of"], bs=bs,
           count=_count(values, "count"), skip=_count(values, "skip") or 0,
           src_fmt=args.fmt, out_fmt=args.out_fmt, untrusted=args.untrusted)
    return 0


def _count(values: dict[str, str], key: str) -> int | None:
    if key not in values:
        return None
    try:
        return size_arg(values[key])
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"invalid {key}: {err}") from None


def cmd_clone(args: argparse.Namespace) -> int:
    options = parse_o(args.options)
    if args.linked_only or args.linked:
        name = ops.linked_clone(args.base, args.new, args.out_fmt or "qcow2", base_fmt=args.fmt,
                                options=options, absolute=args.absolute,
                                untrusted=args.untrusted)
        if not args.q:
            print(f"{args.new}: overlay on {name}")
        return 0
    with progress_bar(enabled=args.progress and not args.q, label=f"→ {args.new}") as bar:
        ops.full_clone(args.base, args.new, args.out_fmt, base_fmt=args.fmt, options=options,
                       progress=bar, untrusted=args.untrusted)
    if not args.q:
        print(f"{args.new}: full copy of {args.base}")
    return 0
