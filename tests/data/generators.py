"""Deterministic raw-image generators (no binaries are stored in the repository).

Every pattern is a pure function of (name, size, seed): the same call always writes
the same bytes and the same holes, so a failure can be reproduced from its test id.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

KiB = 1024
MiB = 1024 * KiB

#: default virtual size of generated images: a few MiB keeps the suite fast
DEFAULT_SIZE = 4 * MiB

#: every pattern name understood by :func:`write_pattern`
PATTERNS = ("random", "text", "zero_runs", "holes", "odd_size", "mixed", "all_zero", "tiny_odd")

_LOREM = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua. vmforge test pattern line "
)


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(name.encode()) * 7919 + len(name)])


def random_bytes(n: int, seed: int = 0, name: str = "r") -> bytes:
    return _rng(name, seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def text_bytes(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = seed
    while len(out) < n:
        out += b"%08d " % i + _LOREM + b"\n"
        i += 1
    return bytes(out[:n])


def _write_at(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def pattern_size(name: str, size: int = DEFAULT_SIZE) -> int:
    """The file size :func:`write_pattern` produces for ``name``."""
    if name == "odd_size":
        return size - MiB + 12345  # not a multiple of 512 nor of any cluster size
    if name == "tiny_odd":
        return 1000  # smaller than one sector
    return size


def build_pattern(name: str, size: int = DEFAULT_SIZE, seed: int = 0) -> list[tuple[int, bytes]]:
    """The writes (offset, bytes) making pattern ``name``; unwritten ranges are holes."""
    total = pattern_size(name, size)
    r = random.Random(f"{name}-{seed}-{size}")
    if name == "random":
        return [(0, random_bytes(total, seed, name))]
    if name == "text":
        return [(0, text_bytes(total, seed))]
    if name == "all_zero":
        return [(0, bytes(total))]  # zeros written as data, not holes
    if name == "tiny_odd":
        return [(0, random_bytes(total, seed, name))]
    if name == "zero_runs":
        # data runs and explicit zero runs of awkward lengths, written densely
        writes, off = [], 0
        while off < total:
            n = min(total - off, r.choice([511, 4096, 4097, 65535, 65536, 65537, 200_000]))
            data = random_bytes(n, seed + off, name) if r.random() < 0.5 else bytes(n)
            writes.append((off, data))
            off += n
        return writes
    if name == "holes":
        # a sparse file: islands of data at unaligned offsets, holes between them
        writes = []
        for k in range(12):
            off = r.randrange(0, total - 70_000)
            n = r.choice([1, 17, 512, 4095, 4096, 65536, 66000])
            writes.append((off, random_bytes(n, seed + k, name)))
        writes.append((total - 3, b"END"))  # last bytes of the disk
        return writes
    if name == "odd_size":
        return [
            (0, random_bytes(100_000, seed, name)),
            (300_000, bytes(300_000)),
            (total - 70_001, text_bytes(70_001, seed)),
        ]
    if name == "mixed":
        q = total // 8
        writes = [
            (0, random_bytes(q, seed, name)),  # incompressible
            (q, text_bytes(q, seed)),  # compressible
            (2 * q, bytes(q)),  # zeros written as data
            # 3q..4q stays a hole
            (4 * q, b"\xff" * (q // 2)),
            (5 * q + 1, random_bytes(q - 777, seed + 1, name)),  # unaligned both ends
        ]
        for _ in range(40):  # single bytes and tiny runs scattered across the tail
            off = 6 * q + r.randrange(0, 2 * q - 8)
            writes.append((off, bytes([r.randrange(1, 256)]) * r.choice([1, 3, 8])))
        writes.append((total - 512, random_bytes(512, seed + 2, name)))
        return writes
    raise ValueError(f"unknown pattern {name!r}")


def write_pattern(path: str | os.PathLike[str], name: str, size: int = DEFAULT_SIZE,
                  seed: int = 0) -> Path:
    """Write raw image ``path`` with pattern ``name``; holes stay holes (sparse file)."""
    path = Path(path)
    total = pattern_size(name, size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        for off, data in build_pattern(name, size, seed):
            _write_at(fd, off, data)
    finally:
        os.close(fd)
    return path


def pattern_bytes(name: str, size: int = DEFAULT_SIZE, seed: int = 0) -> bytes:
    """The full content of pattern ``name`` (holes as zeros)."""
    buf = bytearray(pattern_size(name, size))
    for off, data in build_pattern(name, size, seed):
        buf[off:off + len(data)] = data
    return bytes(buf)


def write_buffer(path: str | os.PathLike[str], buf: bytes, sparse: bool = True,
                 block: int = 4096) -> Path:
    """Write ``buf`` to ``path``; with ``sparse`` all-zero blocks become holes."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(buf))
        view = memoryview(buf)
        for off in range(0, len(buf), block):
            chunk = view[off:off + block]
            if sparse and chunk.tobytes() == bytes(len(chunk)):
                continue
            _write_at(fd, off, bytes(chunk))
    finally:
        os.close(fd)
    return path
