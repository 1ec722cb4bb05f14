"""``inspect``: the one-pass safety inspector for files from strangers."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..model import human_size
from .common import Sub, add_output, command, die, print_json, size_arg

if TYPE_CHECKING:
    from ..model.inspection import InspectReport


def register(sub: Sub) -> None:
    p = sub.add_parser(
        "inspect", help="check an untrusted image in one pass: format, size, references, safety",
        description="Read a file (or '-' for standard input) once, in bounded memory, and "
                    "report its format, virtual size and every reference to another file. "
                    "Exit 0 when every check passes, 1 when one fails.",
        epilog="examples:\n  vmforge inspect --untrusted upload.qcow2\n"
               "  curl -s https://example.org/disk.vmdk | vmforge inspect --untrusted -\n"
               "  vmforge inspect --expect-format raw --max-virtual-size 100G disk.img\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--untrusted", action="store_true",
                   help="fail when the image names any other file (backing, data file, extent)")
    p.add_argument("--expect-format", metavar="FORMAT",
                   help="fail unless the file is this format (e.g. it was uploaded as raw)")
    p.add_argument("--max-virtual-size", type=size_arg, metavar="SIZE",
                   help="fail when the virtual disk is larger (a quota)")
    p.add_argument("--chunk-size", type=size_arg, default=1 << 20, help=argparse.SUPPRESS)
    add_output(p)
    p.add_argument("filename", help="image file, or - for standard input")
    p.set_defaults(func=cmd_inspect)
    register_partitions(sub)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..safety import inspect, inspect_path

    chunk = max(1, args.chunk_size)
    if args.filename == "-":
        report = inspect(sys.stdin.buffer, "-", expect_format=args.expect_format,
                         untrusted=args.untrusted, max_virtual_size=args.max_virtual_size,
                         chunk_size=chunk)
    else:
        report = inspect_path(args.filename, expect_format=args.expect_format,
                              untrusted=args.untrusted, max_virtual_size=args.max_virtual_size,
                              chunk_size=chunk)
    if args.output == "json":
        print_json(report.to_json())
    else:
        print(render(report), end="")
    if report.safe:
        return 0
    first = report.failures[0]
    return die(f"{report.name}: refused: {first.name}: {first.detail}",
               "see the checks above; nothing was opened besides this file")


def render(r: InspectReport) -> str:
    lines = [f"image: {r.name}"]
    if r.format is not None:
        sub = f" ({r.subformat})" if r.subformat else ""
        lines.append(f"file format: {r.format}{sub}")
    if r.virtual_size is not None:
        lines.append(f"virtual size: {human_size(r.virtual_size)} ({r.virtual_size} bytes)")
    lines.append(f"file size: {human_size(r.file_size)} ({r.file_size} bytes)")
    if r.references:
        lines.append("references:")
        lines += [f"    {ref.kind}: {ref.value!r} ({ref.field})" for ref in r.references]
    lines.append("checks:")
    width = max(len(c.name) for c in r.checks)
    lines += [f"    {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in r.checks]
    lines.append(f"verdict: {'safe' if r.safe else 'refused'}")
    return "\n".join(lines) + "\n"


def register_partitions(sub: Sub) -> None:
    p = command(sub, "partitions", "list the partition table inside a disk image (MBR or GPT)",
                "  vmforge partitions disk.qcow2\n  vmforge partitions --output=json disk.vmdk\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    add_output(p)
    p.add_argument("--untrusted", action="store_true",
                   help="refuse images that name any other file (backing, data file, extent)")
    p.add_argument("filename")
    p.set_defaults(func=cmd_partitions)


def cmd_partitions(args: argparse.Namespace) -> int:
    from ..guest.partitions import read_partition_table
    from ..ops import open_image

    with open_image(args.filename, args.fmt, untrusted=args.untrusted) as img:
        size = img.virtual_size

        def read(offset: int, length: int) -> bytes:
            length = max(0, min(length, size - offset))
            return img.read(offset, length) if length else b""

        table = read_partition_table(read, size)
    if args.output == "json":
        print_json(table.to_json())
    else:
        print(f"scheme: {table.scheme or 'none'}" +
              (f"  (disk id {table.disk_id})" if table.disk_id else ""))
        for p in table.partitions:
            boot = " boot" if p.bootable else ""
            name = f" {p.name!r}" if p.name else ""
            print(f"  {p.number:>3}  start {p.start:>14}  size {human_size(p.length):>10}  "
                  f"type {p.type}{name}{boot}")
        for problem in table.problems:
            print(f"  problem: {problem}")
    if table.problems:
        return die(f"{args.filename}: partition table: {table.problems[0]}",
                   "the table was reported, not followed")
    return 0
