"""The benchmark's input images: generated deterministically, built once, cached.

Every source is a pure function of its parameters (seed, sizes, generator version),
which are all in its file name, so a cache directory can be shared between runs and a
changed generator never reuses a stale image.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import osimage
from sampledata import MiB, TextPool, random_bytes
from toolpaths import run

GiB = 1 << 30
TiB = 1 << 40
SEED = 1
# Bump when the generators change, so cached images are rebuilt.
GENERATOR_VERSION = 1


class SourceUnavailable(Exception):
    """A source cannot be built on this machine; its cases are skipped, not failed."""


@dataclass(frozen=True)
class Source:
    """An input image: a name, its format, its cached file name and how to build it."""

    key: str
    fmt: str
    describe: str
    filename: str
    build: Callable[[Path], None]


def size_label(n: int) -> str:
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n / MiB:g} MiB"


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


@functools.cache
def _text() -> TextPool:
    # generating the pool word by word takes about a second: once per process
    return TextPool(SEED)


def build_mixed(path: Path, size: int) -> None:
    """``size`` bytes: 40 % random, 30 % text, 30 % holes, shuffled 1 MiB chunks."""
    chunks = size // MiB
    n_random, n_text = round(chunks * 0.4), round(chunks * 0.3)
    kinds = ["random"] * n_random + ["text"] * n_text + ["hole"] * (chunks - n_random - n_text)
    random.Random(SEED).shuffle(kinds)
    text = _text()
    with _atomic(path) as fd:
        os.ftruncate(fd, size)
        for i, kind in enumerate(kinds):
            if kind == "random":
                os.pwrite(fd, random_bytes(SEED, i, MiB), i * MiB)
            elif kind == "text":
                os.pwrite(fd, text.chunk(i, MiB), i * MiB)


def build_sparse(path: Path, virtual: int, data: int) -> None:
    """``virtual`` bytes with ``data`` bytes (half random, half text) in scattered 1 MiB chunks.

    The chunks are drawn from the whole disk, so the data is spread over it the way
    files are spread over a big, mostly empty disk.
    """
    slots, count = virtual // MiB, data // MiB
    rng = random.Random(SEED + 1)
    # The last slot always holds data so the end of the disk is exercised.
    chosen = sorted({*rng.sample(range(slots - 1), count - 1), slots - 1})
    text = _text()
    with _atomic(path) as fd:
        os.ftruncate(fd, virtual)
        for n, slot in enumerate(chosen):
            chunk = random_bytes(SEED + 1, slot, MiB) if n % 2 else text.chunk(slot, MiB)
            os.pwrite(fd, chunk, slot * MiB)


def _derive(sources: dict[str, Source], base: str, qemu_img: str, out_fmt: str,
            options: tuple[str, ...]) -> Callable[[Path], None]:
    """A builder: source ``base`` converted by qemu-img (the reference writer)."""

    def build(path: Path) -> None:
        src_def = sources[base]
        src = source_path(src_def, path.parent)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        run([qemu_img, "convert", "-f", src_def.fmt, "-O", out_fmt, *options, str(src), str(tmp)],
            check=True)
        tmp.rename(path)

    return build


def _build_os(path: Path) -> None:
    try:
        osimage.build(path)
    except osimage.OSImageUnavailable as err:
        raise SourceUnavailable(f"the Debian OS image cannot be built: {err}") from None


#: derived sources: key suffix -> (qemu-img output format, options, description)
DERIVED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "qcow2": ("qcow2", (), "qcow2"),
    "qcow2-zlib": ("qcow2", ("-c",), "compressed qcow2 (zlib)"),
    "qcow2-zstd": ("qcow2", ("-c", "-o", "compression_type=zstd"), "compressed qcow2 (zstd)"),
    "vmdk-stream": ("vmdk", ("-o", "subformat=streamOptimized"), "streamOptimized VMDK"),
}


def sparse_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """key -> (virtual size, data size) of the sparse sources."""
    d = args.sparse_data
    return {"sparse-1t": (TiB, d), "sparse-1t-2x": (TiB, 2 * d), "sparse-16g": (16 * GiB, d)}


def make_sources(args: argparse.Namespace) -> dict[str, Source]:
    """Every source, named and parametrised by ``args`` (sizes, the qemu-img to derive with)."""
    out: dict[str, Source] = {}
    mixed = f"mixed-{args.size // MiB}M-s{SEED}-v{GENERATOR_VERSION}"
    out["mixed"] = Source(
        "mixed", "raw", "raw, 40 % random / 30 % text / 30 % holes in shuffled 1 MiB chunks, "
        f"{size_label(args.size)}", mixed + ".raw", lambda p: build_mixed(p, args.size))
    for suffix, (fmt, options, what) in DERIVED.items():
        # the plain qcow2 keeps the name it had before the others existed (cache reuse)
        name = f"{mixed}.qcow2" if suffix == "qcow2" else f"{mixed}.{suffix}.{fmt}"
        out[f"mixed.{suffix}"] = Source(
            f"mixed.{suffix}", fmt, f"the mixed image as {what}, written by qemu-img", name,
            _derive(out, "mixed", args.qemu_img, fmt, options))
    for key, (virtual, data) in sparse_shapes(args).items():
        out[key] = Source(
            key, "raw", f"raw, {size_label(virtual)} virtual, {size_label(data)} of data in "
            "scattered 1 MiB chunks",
            f"sparse-{virtual // MiB}M-{data // MiB}M-s{SEED}-v{GENERATOR_VERSION}.raw",
            functools.partial(build_sparse, virtual=virtual, data=data))
    os_name = osimage.image_name(osimage.ROOT_PACKAGES, GENERATOR_VERSION)
    out["os"] = Source("os", "raw", osimage.describe(args.cache_dir / os_name), os_name, _build_os)
    return out


#: sources that could not be built in this process, and why (not retried for every case)
_UNAVAILABLE: dict[Path, str] = {}


def source_path(src: Source, cache_dir: Path) -> Path:
    """The cached image for ``src``, built first if missing (SourceUnavailable if it can't be)."""
    path = cache_dir / src.filename
    if path in _UNAVAILABLE:
        raise SourceUnavailable(_UNAVAILABLE[path])
    if not path.exists():
        print(f"building {path.name} ({src.describe}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            src.build(path)
        except SourceUnavailable as err:
            _UNAVAILABLE[path] = str(err)
            raise
        print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return path
