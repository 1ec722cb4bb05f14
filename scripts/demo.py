#!/usr/bin/env python3
"""vmforge in two minutes: build a sample disk, inspect it, convert it, prove the results.

Run ``make demo`` (or ``.venv/bin/python scripts/demo.py``). With no arguments it:

1. builds a sample raw disk in a temporary directory: an MBR partition table, an ext4
   filesystem made with ``mkfs.ext4 -d`` from generated files (if e2fsprogs is
   installed), then a region mixing random data, text, written zeros, holes and small
   writes at odd offsets;
2. shows ``vmforge info`` and ``vmforge map`` and checks the map against
   ``qemu-img map``;
3. converts the disk to every format vmforge can write (and to format variants such
   as qcow2 v2 and compressed qcow2), checks each result with ``qemu-img check`` and
   ``qemu-img compare``, converts it back to raw with vmforge and compares bytes;
4. prints a table;
5. boots the project's test guest (tests/data/guest.py, built once from Debian packages
   and cached) with ``vmforge run`` from its root disk converted to qcow2 by vmforge,
   shows the time to the guest's marker, the accelerator and ``vmforge vm list``, stops
   it and shows that the qcow2's checksum is unchanged (``scripts/demoboot.py``); this
   step is skipped, not failed, when the guest cannot be built (no Debian registry);
6. exits 1 if any verification failed (2 if a tool is missing).

qemu-img is only the referee here: every conversion is done by vmforge.
``VMFORGE_CMD`` overrides how vmforge is run (e.g. ``VMFORGE_CMD="python -m vmforge"``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demoboot import boot_tour  # noqa: E402
from sampledata import MiB, TextPool, generate_text, random_bytes  # noqa: E402
from toolpaths import ToolMissing, find_qemu_img, find_vmforge, run  # noqa: E402

SECTOR = 512
SEED = 20240601

# Formats qemu-img can check; for the others `qemu-img check` exits 63.
QEMU_CHECKABLE = {"qcow2", "qed", "vmdk", "vdi", "vhdx", "parallels"}

# Variants worth showing per output format: (label, extra convert arguments).
# A format vmforge writes but that is not listed here is converted with no options.
VARIANTS: dict[str, list[tuple[str, list[str]]]] = {
    "qcow2": [
        ("v3 (default)", []),
        ("v2 compat=0.10", ["-o", "compat=0.10"]),
        ("-c zlib", ["-c"]),
        ("-c zstd", ["-c", "-o", "compression_type=zstd"]),
    ],
    "vmdk": [
        ("monolithicSparse", []),
        ("streamOptimized", ["-o", "subformat=streamOptimized"]),
    ],
    "vpc": [("dynamic", []), ("fixed", ["-o", "subformat=fixed"])],
}


def writable_formats(vmforge: list[str]) -> list[str]:
    """Output formats vmforge can write, from `vmforge formats --output=json`.

    The JSON shape is read tolerantly (a list of names, a list of objects, or a mapping
    of name to capabilities); when the command is unavailable, qcow2 is assumed.
    """
    proc = run([*vmforge, "formats", "--output=json"])
    if proc.returncode != 0:
        return ["qcow2"]
    try:
        data: Any = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return ["qcow2"]
    if isinstance(data, dict) and isinstance(data.get("formats"), list | dict):
        data = data["formats"]
    entries: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        entries = [(str(name), caps) for name, caps in data.items()]
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, str):
                entries.append((item, None))
            elif isinstance(item, dict) and "name" in item:
                entries.append((str(item["name"]), item))
    names = [name for name, caps in entries if _can_write(caps)]
    if not names:
        return ["qcow2"]
    # qcow2 first (the flagship), raw last (the least interesting), others alphabetical.
    return sorted(set(names), key=lambda n: (n != "qcow2", n == "raw", n))


def _can_write(caps: Any) -> bool:
    if not isinstance(caps, dict):
        return True  # a bare name: assume it is listed because it is usable
    for holder in (caps, caps.get("capabilities")):
        if isinstance(holder, dict):
            for key in ("write", "writable", "can_write"):
                if key in holder:
                    return bool(holder[key])
        if isinstance(holder, list):
            return "write" in holder
    return True


# ------------------------------------------------------------------ sample disk


@dataclass
class Layout:
    """What the sample disk holds, for the report."""

    size: int
    filesystem: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def mbr(disk_signature: int, partitions: Sequence[tuple[int, int, int]]) -> bytes:
    """A classic MBR sector. ``partitions``: (type, first LBA, sector count), at most 4.

    Layout per the IBM PC MBR: 440 bytes of boot code, the disk signature at 0x1B8,
    2 reserved bytes, four 16-byte entries at 0x1BE (status, CHS first, type, CHS last,
    LBA first, sector count), then the boot signature 55 AA at 0x1FE.
    CHS fields hold the "beyond CHS" marker FE FF FF, as modern tools write.
    """
    # cli; hlt - then a message for whoever dumps the sector.
    code = (b"\xfa\xf4" + b"vmforge demo disk: not bootable\0").ljust(440, b"\0")
    boot = code + struct.pack("<I", disk_signature) + b"\0\0"
    entries = b""
    for ptype, first, count in partitions:
        entries += struct.pack("<B3sB3sII", 0x00, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", first, count)
    entries = entries.ljust(64, b"\0")
    sector = boot + entries + b"\x55\xaa"
    assert len(sector) == SECTOR
    return sector


def make_tree(root: Path, rng: random.Random, text: TextPool) -> int:
    """Generated files for the ext4 partition; returns the number of files."""
    count = 0
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("vmforge-demo\n")
    (root / "etc" / "motd").write_text("Built by scripts/demo.py with mkfs.ext4 -d.\n")
    for d in ("docs", "data", "logs", "empty"):
        (root / d).mkdir()
    for i in range(24):
        (root / "docs" / f"chapter-{i:02d}.txt").write_bytes(
            generate_text(rng, rng.randint(2_000, 300_000))
        )
        count += 1
    for i in range(6):
        (root / "data" / f"blob-{i}.bin").write_bytes(random_bytes(SEED, 10_000 + i, rng.randint(1, 4) * MiB))
        count += 1
    (root / "logs" / "boot.log").write_bytes(text.chunk(99, 3 * MiB))
    (root / "logs" / "empty.log").touch()
    (root / "docs" / "latest.txt").symlink_to("chapter-23.txt")
    return count + 4


def copy_sparse(src: Path, dst_fd: int, offset: int, block: int = 64 * 1024) -> None:
    """Copy ``src`` into ``dst_fd`` at ``offset``, leaving all-zero blocks as holes."""
    with src.open("rb") as f:
        pos = 0
        while chunk := f.read(block):
            if chunk.count(0) != len(chunk):
                os.pwrite(dst_fd, chunk, offset + pos)
            pos += len(chunk)


def build_sample_disk(path: Path, size: int, workdir: Path) -> Layout:
    """Write the sample raw disk at ``path`` (``size`` bytes, a multiple of 1 MiB)."""
    rng = random.Random(SEED)
    text = TextPool(SEED)
    layout = Layout(size=size)
    p1_start, p1_size = 1 * MiB, max(16 * MiB, size // 4)
    p2_start = p1_start + p1_size
    p2_size = size - p2_start
    with path.open("wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, mbr(0x564D4647, [(0x83, p1_start // SECTOR, p1_size // SECTOR),
                                       (0xDA, p2_start // SECTOR, p2_size // SECTOR)]), 0)

        # Partition 1: a real ext4 filesystem, made without mounting.
        mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
        if mkfs:
            tree, fs_img = workdir / "tree", workdir / "fs.img"
            nfiles = make_tree(tree, rng, text)
            with fs_img.open("wb") as f:
                f.truncate(p1_size)
            run([mkfs, "-q", "-F", "-b", "4096", "-L", "vmforge-demo",
                 "-U", "6d5f0a5e-9c1b-4c57-8d6e-0a1b2c3d4e5f", "-d", str(tree), str(fs_img)], check=True)
            copy_sparse(fs_img, fd, p1_start)
            fs_img.unlink()
            shutil.rmtree(tree)
            layout.filesystem = f"ext4 ({nfiles} generated files, mkfs.ext4 -d)"
        else:
            for i in range(p1_size // MiB // 2):
                os.pwrite(fd, text.chunk(i, MiB), p1_start + i * MiB)
            layout.filesystem = "plain text (mkfs.ext4 not installed, so no ext4)"

        # Partition 2: 1 MiB slots of mixed content, chosen by the seeded RNG.
        kinds = ["random", "text", "zeros", "hole", "scattered"]
        weights = [25, 25, 15, 25, 10]
        counts = dict.fromkeys(kinds, 0)
        for slot in range(p2_size // MiB):
            kind = rng.choices(kinds, weights)[0]
            counts[kind] += 1
            base = p2_start + slot * MiB
            if kind == "random":
                os.pwrite(fd, random_bytes(SEED, slot, MiB), base)
            elif kind == "text":
                os.pwrite(fd, text.chunk(slot, MiB), base)
            elif kind == "zeros":  # allocated zeros: converters should detect them
                os.pwrite(fd, bytes(MiB), base)
            elif kind == "scattered":  # small writes at odd offsets, straddling clusters
                for _ in range(rng.randint(1, 4)):
                    n = rng.randint(1, 9000)
                    os.pwrite(fd, random_bytes(SEED, slot * 100 + n, n), base + rng.randrange(MiB - n))
            # "hole": nothing written
        # The very last sector, so the end of the disk is exercised too.
        os.pwrite(fd, b"vmforge demo: last sector\n".ljust(SECTOR, b"."), size - SECTOR)
        layout.counts = counts
    finally:
        os.close(fd)
    return layout


# --------------------------------------------------------------------- checks


def same_content(a: Path, b: Path) -> tuple[bool, str]:
    """Byte comparison; a longer file passes only if its extra tail is all zeros."""
    chunk = 4 * MiB
    with a.open("rb") as fa, b.open("rb") as fb:
        pos = 0
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if not ca and not cb:
                return True, "identical"
            n = min(len(ca), len(cb))
            if ca[:n] != cb[:n]:
                first = next(i for i in range(n) if ca[i] != cb[i])
                return False, f"differ at byte {pos + first}"
            if len(ca) != len(cb):
                longer, rest = (fa, ca[n:]) if len(ca) > len(cb) else (fb, cb[n:])
                extra = len(rest)
                while rest:
                    if rest.count(0) != len(rest):
                        return False, f"sizes differ and the tail is not zero after byte {pos + n}"
                    rest = longer.read(chunk)
                    extra += len(rest)
                return True, f"identical (+{extra} zero bytes of size rounding)"
            pos += n


MAP_KEYS = ("start", "length", "depth", "zero", "data", "offset")


def normalize_map(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the fields both tools print and merge neighbours that only differ by split."""
    out: list[dict[str, Any]] = []
    for e in entries:
        cur = {k: e[k] for k in MAP_KEYS if k in e}
        if out:
            prev = out[-1]
            same = all(prev.get(k) == cur.get(k) for k in ("depth", "zero", "data"))
            contiguous = prev["start"] + prev["length"] == cur["start"]
            if "offset" in prev or "offset" in cur:
                contiguous = contiguous and "offset" in prev and "offset" in cur and (
                    prev["offset"] + prev["length"] == cur["offset"])
            if same and contiguous:
                prev["length"] += cur["length"]
                continue
        out.append(cur)
    return out


def compare_maps(vmforge: list[str], qemu_img: str, disk: Path) -> tuple[bool, str]:
    """vmforge map --output=json against qemu-img map --output=json."""
    ours = run([*vmforge, "map", "-f", "raw", "--output=json", str(disk)])
    if ours.returncode != 0:
        return False, f"vmforge map --output=json exited {ours.returncode}: {ours.stderr.strip()[-200:]}"
    theirs = run([qemu_img, "map", "-f", "raw", "--output=json", str(disk)], check=True)
    try:
        a = normalize_map(json.loads(ours.stdout))
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        return False, f"vmforge map printed unreadable JSON ({err})"
    b = normalize_map(json.loads(theirs.stdout))
    keys = [k for k in MAP_KEYS if all(k in e for e in a) and all(k in e for e in b)]
    a = [{k: e[k] for k in keys} for e in a]
    b = [{k: e[k] for k in keys} for e in b]
    if a == b:
        return True, f"{len(a)} extents, identical to qemu-img map"
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return False, f"extent {i}: vmforge {x} vs qemu-img {y}"
    return False, f"vmforge has {len(a)} extents, qemu-img {len(b)}"


# --------------------------------------------------------------------- report


@dataclass
class Row:
    fmt: str
    variant: str
    size: int = 0
    convert_s: float = 0.0
    back_s: float = 0.0
    check: str = "-"
    compare: str = "-"
    roundtrip: str = "-"
    ok: bool = False
    note: str = ""


def convert_and_verify(vmforge: list[str], qemu_img: str, disk: Path, out_dir: Path,
                       fmt: str, label: str, extra: list[str]) -> Row:
    """One output: vmforge convert, qemu-img check + compare, vmforge convert back, cmp."""
    row = Row(fmt, label)
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    out = out_dir / f"sample-{slug}.{fmt}"
    t0 = time.perf_counter()
    proc = run([*vmforge, "convert", "-f", "raw", "-O", fmt, *extra, str(disk), str(out)])
    row.convert_s = time.perf_counter() - t0
    if proc.returncode != 0:
        row.note = f"vmforge convert exited {proc.returncode}: {_tail(proc.stderr)}"
        return row
    row.size = out.stat().st_blocks * 512

    checks_ok = True
    if fmt in QEMU_CHECKABLE:
        chk = run([qemu_img, "check", "-f", fmt, str(out)])
        row.check = "clean" if chk.returncode == 0 else f"exit {chk.returncode}"
        if chk.returncode != 0:
            checks_ok = False
            row.note = _tail(chk.stdout + chk.stderr)
    else:
        row.check = "n/a"
    cmp = run([qemu_img, "compare", "-f", "raw", "-F", fmt, str(disk), str(out)])
    row.compare = "identical" if cmp.returncode == 0 else f"exit {cmp.returncode}"
    if cmp.returncode != 0:
        checks_ok = False
        row.note = row.note or _tail(cmp.stdout + cmp.stderr)

    back = out.with_suffix(".back.raw")
    t0 = time.perf_counter()
    proc = run([*vmforge, "convert", "-f", fmt, "-O", "raw", str(out), str(back)])
    row.back_s = time.perf_counter() - t0
    if proc.returncode != 0:
        row.roundtrip = f"exit {proc.returncode}"
        row.note = row.note or f"vmforge convert back exited {proc.returncode}: {_tail(proc.stderr)}"
        return row
    same, why = same_content(disk, back)
    row.roundtrip = "identical" if same and why == "identical" else ("identical*" if same else "DIFFERS")
    if not same or why != "identical":
        row.note = row.note or why
    back.unlink()
    out.unlink()
    row.ok = checks_ok and same
    return row


def _tail(text: str, limit: int = 160) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[:limit]


def print_table(rows: list[Row], source_alloc: int) -> None:
    """The summary table: rich when available, aligned plain text otherwise."""
    headers = ["format", "variant", "MiB", "vs src", "conv s", "back s",
               "check", "compare", "round-trip", "verified"]
    cells = [[r.fmt, r.variant, f"{r.size / MiB:.1f}" if r.size else "-",
              f"{100 * r.size / source_alloc:.0f}%" if r.size else "-",
              f"{r.convert_s:.2f}", f"{r.back_s:.2f}" if r.back_s else "-",
              r.check, r.compare, r.roundtrip, "yes" if r.ok else "NO"] for r in rows]
    print("MiB = host bytes allocated by the output; vs src = that over the source's allocation;")
    print("check/compare = qemu-img check/compare; round-trip = vmforge back to raw, byte compare.")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    else:
        table = Table()
        for h in headers:
            table.add_column(h, justify="right" if h in ("MiB", "vs src", "conv s", "back s") else "left",
                             no_wrap=True)
        for r, c in zip(rows, cells, strict=True):
            table.add_row(*c, style=None if r.ok else "bold red")
        # Rich assumes 80 columns when output is not a terminal (make, CI logs): give it room.
        console = Console() if sys.stdout.isatty() else Console(width=120)
        console.print(table)
    for r in rows:
        if r.note:
            print(f"  note: {r.fmt} {r.variant}: {r.note}")


def show(vmforge: list[str], args: list[str], max_lines: int = 18) -> bool:
    """Run a vmforge command and print its output (truncated); True if it succeeded."""
    print(f"\n$ vmforge {shlex.join(args)}")
    proc = run([*vmforge, *args])
    lines = (proc.stdout or "").rstrip("\n").splitlines()
    for line in lines[:max_lines]:
        print(f"  {line}")
    if len(lines) > max_lines:
        print(f"  ... ({len(lines) - max_lines} more lines)")
    if proc.returncode != 0:
        print(f"  !! exit {proc.returncode}: {_tail(proc.stderr, 400)}")
    return proc.returncode == 0


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="256M", help="virtual size of the sample disk (default 256M)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory and print its path")
    ap.add_argument("--formats", help="comma-separated output formats instead of asking vmforge")
    ap.add_argument("--no-boot", action="store_true", help="skip booting the test guest at the end")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if size < 64 * MiB or size % MiB:
        ap.error("--size must be a whole number of MiB, at least 64M")

    try:
        qemu_img = find_qemu_img()
        vmforge = find_vmforge()
    except ToolMissing as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    formats = args.formats.split(",") if args.formats else writable_formats(vmforge)

    work = Path(tempfile.mkdtemp(prefix="vmforge-demo-"))
    try:
        disk = work / "sample.raw"
        print(f"Building a {size // MiB} MiB sample disk in {work} ...")
        t0 = time.perf_counter()
        layout = build_sample_disk(disk, size, work)
        alloc = disk.stat().st_blocks * 512
        print(f"  built in {time.perf_counter() - t0:.1f} s: MBR; partition 1 = {layout.filesystem}; "
              f"partition 2 = 1 MiB slots {layout.counts}")
        print(f"  virtual {size / MiB:.0f} MiB, allocated on the host {alloc / MiB:.1f} MiB")

        failures = 0
        failures += not show(vmforge, ["info", str(disk)])
        failures += not show(vmforge, ["map", str(disk)])
        ok, why = compare_maps(vmforge, qemu_img, disk)
        print(f"  map vs qemu-img map: {'OK' if ok else 'MISMATCH'} - {why}")
        failures += not ok

        print(f"\nConverting to {', '.join(formats)} and back ...")
        rows = []
        for fmt in formats:
            for label, extra in VARIANTS.get(fmt, [("default", [])]):
                row = convert_and_verify(vmforge, qemu_img, disk, work, fmt, label, extra)
                print(f"  {fmt:6} {label:16} {'ok' if row.ok else 'FAILED'}", flush=True)
                rows.append(row)
        print()
        print_table(rows, alloc)
        failures += sum(not r.ok for r in rows)
        booted = None if args.no_boot else boot_tour(vmforge, work)
        failures += booted is False
        boot = {None: "boot skipped", True: "the guest booted from vmforge's qcow2",
                False: "the boot FAILED"}[booted]
        print(f"\n{len(rows) - sum(not r.ok for r in rows)} of {len(rows)} conversions verified; "
              f"{boot}; {'all checks passed' if failures == 0 else f'{failures} check(s) FAILED'}.")
        return 0 if failures == 0 else 1
    finally:
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
