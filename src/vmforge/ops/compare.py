"""``compare``: are two disks the same to a guest? Exit codes as qemu-img: 0 same, 1 differ."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.stream import ExtentStream
from .image import Image

CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class CompareResult:
    identical: bool
    offset: int | None = None  # first differing guest offset
    size_mismatch: bool = False
    reason: str = ""


def _sector(offset: int) -> int:
    """qemu-img reports mismatches at the start of the 512-byte sector holding them."""
    return offset - offset % 512


def _first_difference(a: bytes, b: bytes) -> int:
    """The index of the first byte where two different, equally long buffers differ: the
    highest set bit of their XOR read as big-endian numbers (C-level, no numpy import)."""
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) - (x.bit_length() + 7) // 8


def _zero_runs(image: Image, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(start, end, reads_zero) for the image over [start, end)."""
    return [(e.start, e.end, e.reads_zero)
            for e in image.iter_extents(start, end - start)]


def compare(a: Image, b: Image, *, strict: bool = False) -> CompareResult:
    """Compare guest-visible content; with ``strict`` sizes and allocation must match too.

    A larger image is identical to a smaller one when everything past the smaller
    one's end reads as zeros (qemu-img's rule without -s).
    """
    size_a, size_b = a.virtual_size, b.virtual_size
    if strict and size_a != size_b:
        return CompareResult(False, None, True, "Strict mode: Image size mismatch!")
    common = min(size_a, size_b)
    sa, sb = ExtentStream(a.chain), ExtentStream(b.chain)
    runs_a = _zero_runs(a, 0, common)
    runs_b = _zero_runs(b, 0, common)
    if strict:
        pa = [(e.start, e.end, e.present) for e in a.iter_extents(0, common)]
        pb = [(e.start, e.end, e.present) for e in b.iter_extents(0, common)]
        off = _first_status_mismatch(pa, pb)
        if off is not None:
            return CompareResult(False, off, False, f"Strict mode: Offset {off} block status mismatch!")
    # sweep the union of boundaries; skip where both read zero
    ia = ib = 0
    pos = 0
    while pos < common:
        while runs_a[ia][1] <= pos:
            ia += 1
        while runs_b[ib][1] <= pos:
            ib += 1
        end = min(runs_a[ia][1], runs_b[ib][1])
        za, zb = runs_a[ia][2], runs_b[ib][2]
        if not (za and zb):
            p = pos
            while p < end:
                n = min(CHUNK, end - p)
                da = bytes(n) if za else sa.read(p, n)
                db = bytes(n) if zb else sb.read(p, n)
                if da != db:
                    off = _sector(p + _first_difference(da, db))
                    return CompareResult(False, off, size_a != size_b,
                                         f"Content mismatch at offset {off}!")
                p += n
        pos = end
    if size_a != size_b:
        bigger, stream = (a, sa) if size_a > size_b else (b, sb)
        for start, end, zero in _zero_runs(bigger, common, max(size_a, size_b)):
            if zero:
                continue
            p = start
            while p < end:
                n = min(CHUNK, end - p)
                data = stream.read(p, n)
                if data.count(0) != n:
                    off = _sector(p + n - len(data.lstrip(b"\0")))
                    return CompareResult(False, off, True, f"Content mismatch at offset {off}!")
                p += n
        return CompareResult(True, None, True, "Images are identical.")
    return CompareResult(True, None, False, "Images are identical.")


def _first_status_mismatch(pa: list[tuple[int, int, bool]],
                           pb: list[tuple[int, int, bool]]) -> int | None:
    ia = ib = 0
    pos = 0
    end_all = pa[-1][1] if pa else 0
    while pos < end_all:
        while pa[ia][1] <= pos:
            ia += 1
        while pb[ib][1] <= pos:
            ib += 1
        if pa[ia][2] != pb[ib][2]:
            return pos
        pos = min(pa[ia][1], pb[ib][1])
    return None
