"""Image commands with qemu-img's names, options and exit codes.

info, create, convert, compare, map, check, measure, formats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import ops
from ..errors import CompareError, UnsupportedFeature, VmforgeError
from ..model import human_size
from .common import CommandFailed, Sub, add_output, add_safety, command, die, parse_o, print_json, size_arg
from .progress import progress_bar

if TYPE_CHECKING:
    from ..model.check import CheckResult
    from ..model.info import ImageInfo


def register(sub: Sub) -> None:
    p = command(sub, "info", "show what an image is: format, sizes, backing file, snapshots",
             "  vmforge info disk.qcow2\n  vmforge info --output=json --backing-chain vm1.qcow2\n")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    add_output(p)
    p.add_argument("--backing-chain", action="store_true", help="show every image in the chain")
    add_safety(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_info)

    p = command(sub, "create", "create a new image (empty, or an overlay on a backing file)",
             "  vmforge create -f qcow2 disk.qcow2 20G\n"
             "  vmforge create -f qcow2 -o cluster_size=2M,lazy_refcounts=on big.qcow2 1T\n"
             "  vmforge create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2\n"
             "  vmforge create -f raw -o preallocation=falloc disk.img 1G\n")
    p.add_argument("-f", dest="fmt", default="raw", help="format of the new image (default raw)")
    p.add_argument("-o", dest="options", action="append", help="format options key=value,...")
    p.add_argument("-b", dest="backing", help="backing file (the new image is an overlay on it)")
    p.add_argument("-F", dest="backing_fmt", help="format of the backing file")
    p.add_argument("-q", action="store_true", help="quiet")
    p.add_argument("filename")
    p.add_argument("size", nargs="?", type=size_arg, help="virtual size: 10G, 512M, 1T, bytes")
    p.set_defaults(func=cmd_create)

    p = command(sub, "convert", "convert one or more images into a new image of any format",
             "  vmforge convert -p -O qcow2 disk.raw disk.qcow2\n"
             "  vmforge convert -O raw disk.qcow2 disk.raw\n"
             "  vmforge convert -c -O qcow2 -o compression_type=zstd disk.raw small.qcow2\n"
             "  vmforge convert -O qcow2 -B base.qcow2 vm.qcow2 delta.qcow2\n"
             "  vmforge convert -l snap1 -O raw disk.qcow2 at-snap1.raw\n"
             "  vmforge convert -O vmdk -o subformat=streamOptimized disk.qcow2 - | ssh h 'cat > d.vmdk'\n"
             "  vmforge convert -O raw disk.qcow2 - | gzip > disk.raw.gz\n")
    p.add_argument("-f", dest="fmt", help="source format (probed when omitted)")
    p.add_argument("-O", dest="out_fmt", default="raw", help="output format (default raw)")
    p.add_argument("-o", dest="options", action="append", help="output options key=value,...")
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-S", dest="sparse", type=size_arg, default=4096,
                   help="zero run that becomes a hole (default 4k; 0 = fully allocated)")
    p.add_argument("-B", dest="backing", help="make the output an overlay on this backing file")
    p.add_argument("-F", dest="backing_fmt", help="format of the -B backing file")
    p.add_argument("-l", dest="snapshot", help="read this internal snapshot (id or name)")
    p.add_argument("-n", dest="skip_create", action="store_true",
                   help="write into an existing destination instead of creating it")
    p.add_argument("-m", dest="workers", type=int, help="parallel workers (default: CPUs)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="write ranges in the order they finish (output layout may vary)")
    p.add_argument("--compression-level", type=int, metavar="N",
                   help="compression level (zlib 1-9, zstd 1-19; default: the format's)")
    p.add_argument("--max-virtual-size", type=size_arg, metavar="SIZE",
                   help="refuse sources whose virtual disk is larger (a quota)")
    p.add_argument("-q", action="store_true", help="quiet")
    add_safety(p)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="sources, then the destination ('-': standard output, raw or "
                        "streamOptimized VMDK only)")
    p.set_defaults(func=cmd_convert)

    p = command(sub, "compare", "compare what two images show a guest (exit 0 same, 1 differ, 2 error)",
             "  vmforge compare disk.raw disk.qcow2\n  vmforge compare -s a.qcow2 b.qcow2\n")
    p.add_argument("-f", dest="fmt_a", help="format of the first image")
    p.add_argument("-F", dest="fmt_b", help="format of the second image")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: sizes and allocation must match too")
    p.add_argument("-q", action="store_true", help="quiet")
    add_safety(p)
    p.add_argument("first")
    p.add_argument("second")
    p.set_defaults(func=cmd_compare)

    p = command(sub, "map", "show where the guest's data lives (qemu-img map)",
             "  vmforge map disk.qcow2\n  vmforge map --output=json vm1.qcow2\n")
    p.add_argument("-f", dest="fmt", help="image format")
    add_output(p)
    add_safety(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_map)

    p = command(sub, "check", "check image metadata (exit 0 clean, 1 incomplete, 2 corrupt, 3 leaks)",
             "  vmforge check disk.qcow2\n  vmforge check --output=json disk.qcow2\n")
    p.add_argument("-f", dest="fmt", help="image format")
    add_output(p)
    p.add_argument("-q", action="store_true", help="quiet")
    p.add_argument("--untrusted", action="store_true", help="refuse references to other files")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"),
                   help="repair leaks, or all refcount errors (qcow2; see snapshots.py)")
    p.add_argument("filename")
    p.set_defaults(func=cmd_check)

    p = command(sub, "measure", "how large an image would be in another format",
             "  vmforge measure -O qcow2 --size 100G\n  vmforge measure -O qcow2 disk.raw\n")
    p.add_argument("-f", dest="fmt", help="source format")
    p.add_argument("-O", dest="out_fmt", default="raw", help="target format (default raw)")
    p.add_argument("-o", dest="options", action="append", help="target options key=value,...")
    p.add_argument("--size", type=size_arg, help="measure a new image of this size")
    p.add_argument("-l", dest="snapshot", help="measure this internal snapshot")
    add_output(p)
    add_safety(p)
    p.add_argument("filename", nargs="?")
    p.set_defaults(func=cmd_measure)

    p = command(sub, "formats", "list the formats vmforge reads and writes, with their options",
             "  vmforge formats\n  vmforge formats --output=json\n")
    add_output(p)
    p.set_defaults(func=cmd_formats)


# -- info ----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    with ops.open_image(args.filename, args.fmt, untrusted=args.untrusted,
                        allow_data_file=args.allow_data_file, parents=args.parent,
                        follow_backing=args.backing_chain, replay_log=args.replay_log) as img:
        infos = img.chain_info() if args.backing_chain else [img.info()]
    if args.output == "json":
        data = [ops.info_to_qemu_json(i) for i in infos]
        print_json(data if args.backing_chain else data[0])
    else:
        print("\n\n".join(render_info(i) for i in infos))
    return 0


def render_info(info: ImageInfo) -> str:
    lines = [
        f"image: {info.filename}",
        f"file format: {info.format}",
        f"virtual size: {human_size(info.virtual_size)} ({info.virtual_size} bytes)",
        f"disk size: {human_size(info.actual_size)}",
    ]
    if info.cluster_size is not None:
        lines.append(f"cluster_size: {info.cluster_size}")
    if info.backing_filename:
        line = f"backing file: {info.backing_filename}"
        if info.full_backing_filename and info.full_backing_filename != info.backing_filename:
            line += f" (actual path: {info.full_backing_filename})"
        lines.append(line)
        if info.backing_format:
            lines.append(f"backing file format: {info.backing_format}")
    if info.dirty:
        lines.append("cleanly shut down: no")
    if info.snapshots:
        from .snapshots import render_snapshots  # the same table as 'snapshot -l'

        lines.append(render_snapshots(info.snapshots))
    specific = info.format_specific.get("data") if info.format_specific else None
    if specific:
        lines.append("Format specific information:")
        for key, value in specific.items():
            if isinstance(value, list) and all(isinstance(v, dict) for v in value):
                # a list of records (VMDK extents), laid out as qemu-img prints it
                lines.append(f"    {key.replace('-', ' ')}:")
                for i, record in enumerate(value):
                    lines.append(f"        [{i}]:")
                    for k, v in record.items():
                        v = str(v).lower() if isinstance(v, bool) else v
                        lines.append(f"            {k.replace('-', ' ')}: {v}")
                continue
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    {key.replace('-', ' ')}: {shown}")
    return "\n".join(lines)


# -- create / convert -------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    options = parse_o(args.options)
    ops.create(args.filename, args.fmt, args.size, options, args.backing, args.backing_fmt)
    if not args.q:
        size = f"{args.size}" if args.size is not None else "(from backing file)"
        print(f"Formatting '{args.filename}', fmt={args.fmt} size={size}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if len(args.files) < 2:
        return die("convert needs a source and a destination",
                   "vmforge convert [-O FORMAT] SOURCE... DESTINATION", code=1)
    *sources, dest = args.files
    options = parse_o(args.options)
    stream_fd = _stdout_for_stream() if dest == "-" else None
    shown = "standard output" if dest == "-" else dest
    started = time.perf_counter()
    # the bar draws on stderr, so it never mixes with an image streamed to stdout
    with progress_bar(enabled=args.progress and not args.q, label=f"→ {shown}") as bar:
        stats = ops.convert(
            sources, dest, args.out_fmt, src_fmt=args.fmt, options=options,
            compress=args.compress, backing=args.backing, backing_fmt=args.backing_fmt,
            sparse_size=args.sparse, progress=bar, workers=args.workers,
            out_of_order=args.out_of_order, compression_level=args.compression_level,
            snapshot=args.snapshot,
            untrusted=args.untrusted, allow_data_file=args.allow_data_file,
            skip_create=args.skip_create, stream_fd=stream_fd, parents=args.parent,
            replay_log=args.replay_log, max_virtual_size=args.max_virtual_size)
    if args.progress and not args.q:
        took = time.perf_counter() - started
        print(f"{shown}: {human_size(stats.written_bytes)} written from "
              f"{human_size(stats.read_bytes)} read in {took:.2f} s", file=sys.stderr)
    return 0


def _stdout_for_stream() -> int:
    """The descriptor behind standard output, for ``convert ... -``; refuses a terminal."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        raise CommandFailed(die("standard output is not a file, pipe or socket",
                                "name an output file instead of '-'")) from None
    if os.isatty(fd):
        raise CommandFailed(die("refusing to write a disk image to a terminal",
                                "pipe or redirect standard output (... - | ssh host 'cat > disk')"))
    sys.stdout.flush()  # nothing printed may land inside the image
    return fd


# -- compare / map / check / measure -------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        with ops.open_image(args.first, args.fmt_a, untrusted=args.untrusted,
                            allow_data_file=args.allow_data_file,
                            replay_log=args.replay_log) as a, \
                ops.open_image(args.second, args.fmt_b, untrusted=args.untrusted,
                               allow_data_file=args.allow_data_file,
                               replay_log=args.replay_log) as b:
            result = ops.compare(a, b, strict=args.strict)
    except (VmforgeError, OSError) as err:
        hint = err.hint if isinstance(err, VmforgeError) else None
        raise CommandFailed(die(str(err), hint, code=2)) from err
    if not args.q:
        if result.size_mismatch and not args.strict:
            print("Warning: Image size mismatch!")
        print(result.reason)
    return 0 if result.identical else 1


def cmd_map(args: argparse.Namespace) -> int:
    with ops.open_image(args.filename, args.fmt, untrusted=args.untrusted,
                        allow_data_file=args.allow_data_file, parents=args.parent,
                        replay_log=args.replay_log) as img:
        entries = ops.map_entries(img)
        names = [layer.path for layer in img.chain.layers]
    if args.output == "json":
        print("[" + ",\n".join(_map_json_line(e) for e in entries) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in entries:
        if not e["data"]:
            continue
        if "offset" not in e:
            return die("File contains external, encrypted or compressed clusters.",
                       "use --output=json to see them")
        print(f"{_c_hex(e['start']):<16}{_c_hex(e['length']):<16}{_c_hex(e['offset']):<16}"
              f"{names[e['depth']]}")
    return 0


def _c_hex(n: int) -> str:
    """C's %#x, as qemu-img prints offsets: 0 stays '0', others get '0x'."""
    return f"{n:#x}" if n else "0"


def _map_json_line(e: dict[str, Any]) -> str:
    fields = [f'"start": {e["start"]}', f'"length": {e["length"]}', f'"depth": {e["depth"]}',
              f'"present": {str(e["present"]).lower()}', f'"zero": {str(e["zero"]).lower()}',
              f'"data": {str(e["data"]).lower()}']
    if "offset" in e:
        fields.append(f'"offset": {e["offset"]}')
    return "{ " + ", ".join(fields) + "}"


def cmd_check(args: argparse.Namespace) -> int:
    from ..model.check import EXIT_UNSUPPORTED

    if args.repair:
        from .snapshots import cmd_check_repair

        return cmd_check_repair(args)
    try:
        result = ops.check(args.filename, args.fmt, untrusted=args.untrusted)
    except UnsupportedFeature as err:
        if err.feature == "checks":
            return die(f"{args.filename}: this image format does not support checks",
                       code=EXIT_UNSUPPORTED)
        raise
    for line in result.messages:
        print(line, file=sys.stderr)
    if args.output == "json":
        print_json(result.to_qemu_json())
    elif not args.q:
        print(render_check(result))
    return result.exit_code


def render_check(r: CheckResult) -> str:
    lines: list[str] = []
    if not (r.corruptions or r.leaks or r.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if r.corruptions:
            lines.append(f"\n{r.corruptions} errors were found on the image.\n"
                         "Data may be corrupted, or further writes to the image may corrupt it.")
        if r.leaks:
            lines.append(f"\n{r.leaks} leaked clusters were found on the image.\n"
                         "This means waste of disk space, but no harm to data.")
        if r.check_errors:
            lines.append(f"\n{r.check_errors} internal errors have occurred during the check.")
    if r.total_clusters and r.allocated_clusters:
        t = r.total_clusters
        lines.append(
            f"{r.allocated_clusters}/{t} = {100 * r.allocated_clusters / t:.2f}% allocated, "
            f"{100 * r.fragmented_clusters / r.allocated_clusters:.2f}% fragmented, "
            f"{100 * r.compressed_clusters / r.allocated_clusters:.2f}% compressed clusters")
    if r.image_end_offset:
        lines.append(f"Image end offset: {r.image_end_offset}")
    return "\n".join(lines)


def cmd_measure(args: argparse.Namespace) -> int:
    options = parse_o(args.options)
    if args.filename and args.size is not None:
        return die("give either --size or a file, not both")
    if args.filename:
        with ops.open_image(args.filename, args.fmt, untrusted=args.untrusted,
                            allow_data_file=args.allow_data_file, snapshot=args.snapshot,
                            replay_log=args.replay_log) as img:
            result = ops.measure(args.out_fmt, image=img, options=options)
    else:
        result = ops.measure(args.out_fmt, size=args.size, options=options)
    if args.output == "json":
        print_json(result)
    else:
        print(f"required size: {result['required']}")
        print(f"fully allocated size: {result['fully-allocated']}")
        if "bitmaps" in result:
            print(f"bitmaps size: {result['bitmaps']}")
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    from ..formats import list_formats

    rows: list[dict[str, Any]] = []
    for fmt in list_formats():
        caps = fmt.capabilities
        rows.append({
            "name": fmt.name, "aliases": list(fmt.aliases), "read": caps.read, "write": caps.write,
            "backing": caps.backing, "snapshots": caps.snapshots, "compression": caps.compression,
            "stream": caps.stream_write, "options": dict(fmt.create_options),
        })
    if args.output == "json":
        print_json(rows)
        return 0
    for row in rows:
        can = [k for k in ("read", "write", "backing", "snapshots", "compression") if row[k]]
        if row["stream"]:
            can.append("stream to stdout")
        alias = f" (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"{row['name']}{alias}: {', '.join(can)}")
        for key, text in row["options"].items():
            print(f"    -o {key}: {text}")
    return 0


__all__ = ["register", "CompareError"]
