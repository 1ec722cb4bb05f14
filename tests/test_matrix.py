"""The conversion matrix: every source format -> every target (sub)format -> back to raw.

The matrix is generated from the format registry, so a new format joins it by being
registered; a writable format without an entry in TARGETS fails the guard test below.
Each case is judged three ways: qemu-img reads the output as the original bytes
(``qemu-img compare``), finds nothing wrong in it (``qemu-img check``, for the formats
it checks), and vmforge reads it back to the same bytes.

The copy pipeline runs with one worker and with eight (issue 5) without doubling the
matrix: each case writes with one count and reads back with the other, and the count
that writes alternates over the grid, so every (source, target) pair and every reader
runs at both. Small patterns fit in a few copy tasks, so a reduced matrix repeats every
target and the compressed sources on an image of many tasks at ``-m 8``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import vmforge
from tests.data.generators import MiB, pattern_bytes, random_bytes
from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import data_ranges
from vmforge.formats import list_formats

#: every way of writing each format that the matrix exercises: (-o options, compress)
TARGETS: dict[str, list[tuple[str, bool]]] = {
    "raw": [("", False)],
    "qcow2": [("", False), ("compat=0.10", False), ("cluster_size=16384,extended_l2=on", False),
              ("", True)],
    "vpc": [("subformat=dynamic", False), ("subformat=fixed", False),
            ("subformat=fixed,force_size=on", False)],
    "vdi": [("", False), ("static=on", False)],
    "vmdk": [("", False), ("subformat=monolithicFlat", False),
             ("subformat=twoGbMaxExtentSparse", False), ("subformat=twoGbMaxExtentFlat", False),
             ("subformat=streamOptimized", False)],
    "vhdx": [("", False), ("subformat=fixed", False), ("block_size=1048576", False)],
}
#: formats ``qemu-img check`` can check (it says "not supported" for the others)
QEMU_CHECKS = {"qcow2", "vdi", "vhdx", "vmdk", "parallels"}
#: small images with data, zeros, holes and an unaligned end
PATTERNS = ("mixed", "odd_size")


#: worker counts of the copy pipeline under test, each mapped to the other
WORKERS = {1: 8, 8: 1}


def _workers(src_fmt: str, pattern: str) -> int:
    """The worker count that writes this case: alternates over sources and patterns, so
    for any target both counts write and both read back (the other count reads)."""
    return 8 if (_sources().index(src_fmt) + PATTERNS.index(pattern)) % 2 else 1


def _registered() -> dict[str, bool]:
    return {f.name: f.capabilities.write for f in list_formats()}


def _targets() -> list[tuple[str, str, bool]]:
    return [(fmt, o, c) for fmt, writable in _registered().items() if writable
            for o, c in TARGETS.get(fmt, [])]


def _sources() -> list[str]:
    # one source per registered format: written by vmforge where it can, else by qemu-img
    return sorted(_registered())


def _label(fmt: str, options: str, compress: bool) -> str:
    return "-".join(filter(None, [fmt, options.replace(",", "+").replace("=", "_"),
                                  "c" if compress else ""]))


def test_every_writable_format_is_in_the_matrix() -> None:
    missing = [fmt for fmt, writable in _registered().items() if writable and fmt not in TARGETS]
    assert not missing, f"add matrix targets for {missing}"


@pytest.fixture(scope="session")
def matrix_source(pattern_file: Callable[..., Path],
                  tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``matrix_source(fmt, pattern)``: the pattern as an image of ``fmt``, made once."""
    root = tmp_path_factory.mktemp("matrix-sources")
    cache: dict[tuple[str, str], Path] = {}

    def make(fmt: str, pattern: str) -> Path:
        if (fmt, pattern) not in cache:
            raw = pattern_file(pattern)
            dest = root / f"{pattern}.{fmt}"
            if _registered()[fmt]:
                vmforge.convert(str(raw), str(dest), fmt, src_fmt="raw")
            else:
                qemu_img("convert", "-f", "raw", "-O", fmt, raw, dest)
            cache[(fmt, pattern)] = dest
        return cache[(fmt, pattern)]

    return make


def _assert_reads_as(path: Path, expected: bytes) -> None:
    data = path.read_bytes()
    assert len(data) >= len(expected)
    assert data[:len(expected)] == expected, "bytes differ from the source pattern"
    tail = data[len(expected):]
    assert tail.count(0) == len(tail), "bytes past the source's end are not zero"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("target", _targets(), ids=lambda t: _label(*t))
@pytest.mark.parametrize("src_fmt", _sources())
def test_convert_matrix(src_fmt: str, target: tuple[str, str, bool], pattern: str,
                        matrix_source: Callable[[str, str], Path],
                        pattern_file: Callable[..., Path], tmp_path: Path) -> None:
    fmt, options, compress = target
    src = matrix_source(src_fmt, pattern)
    out = tmp_path / f"out.{fmt}"
    opts = dict(kv.split("=", 1) for kv in options.split(",")) if options else {}
    write_workers = _workers(src_fmt, pattern)
    vmforge.convert(str(src), str(out), fmt, src_fmt=src_fmt, options=opts, compress=compress,
                    workers=write_workers)

    # the oracle reads what vmforge wrote as the original bytes (zeros past a rounded end)
    proc = qemu_img("compare", "-f", "raw", "-F", fmt, pattern_file(pattern), out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt in QEMU_CHECKS:
        proc = qemu_img("check", "-f", fmt, out, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    back = tmp_path / "back.raw"
    vmforge.convert(str(out), str(back), "raw", src_fmt=fmt, workers=WORKERS[write_workers])
    _assert_reads_as(back, pattern_bytes(pattern))
    os.unlink(back)


# ---------------------------------------------------------------- -m 8 on many tasks

#: large enough that the pipeline has many tasks in flight (it reads a few MiB per task)
PARALLEL_SIZE = 32 * MiB
#: images qemu-img writes for the parallel read test: id -> (format, qemu-img options)
QEMU_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qcow2": ("qcow2", ()), "qcow2-zlib": ("qcow2", ("-c",)),
    "qcow2-zstd": ("qcow2", ("-c", "-o", "compression_type=zstd")),
    "vmdk": ("vmdk", ()), "vmdk-stream": ("vmdk", ("-o", "subformat=streamOptimized")),
    "vpc": ("vpc", ()), "vdi": ("vdi", ()), "vhdx": ("vhdx", ()), "parallels": ("parallels", ()),
}


def _compare(a: Path, a_fmt: str, b: Path, b_fmt: str) -> None:
    proc = qemu_img("compare", "-f", a_fmt, "-F", b_fmt, a, b, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("target", _targets(), ids=lambda t: _label(*t))
def test_convert_parallel(target: tuple[str, str, bool], pattern_file: Callable[..., Path],
                          tmp_path: Path) -> None:
    """Every target written and read back with eight workers, from an image of many tasks."""
    fmt, options, compress = target
    raw = pattern_file("mixed", size=PARALLEL_SIZE)
    out, back = tmp_path / f"out.{fmt}", tmp_path / "back.raw"
    opts = dict(kv.split("=", 1) for kv in options.split(",")) if options else {}
    vmforge.convert(str(raw), str(out), fmt, src_fmt="raw", options=opts, compress=compress,
                    workers=8)
    _compare(raw, "raw", out, fmt)
    if fmt in QEMU_CHECKS:
        proc = qemu_img("check", "-f", fmt, out, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    vmforge.convert(str(out), str(back), "raw", src_fmt=fmt, workers=8)
    _compare(raw, "raw", back, "raw")


@pytest.mark.parametrize("fmt,qemu_options",
                         [pytest.param(*v, id=k) for k, v in QEMU_SOURCES.items()
                          if v[0] in _registered()])
def test_read_parallel(fmt: str, qemu_options: tuple[str, ...],
                       pattern_file: Callable[..., Path], tmp_path: Path) -> None:
    """Images qemu-img wrote, compressed ones included, read with eight workers."""
    raw = pattern_file("mixed", size=PARALLEL_SIZE)
    img, back = tmp_path / f"in.{fmt}", tmp_path / "back.raw"
    qemu_img("convert", "-f", "raw", "-O", fmt, *qemu_options, raw, img)
    vmforge.convert(str(img), str(back), "raw", src_fmt=fmt, workers=8)
    _compare(raw, "raw", back, "raw")


# ------------------------------------------------ a huge virtual disk with little data

TiB = 1 << 40
#: (offset, length) of the data in the 1 TiB disk: unaligned to any cluster, far
#: apart, and the disk's last bytes
SPARSE_DATA = [(0, MiB), (3 * (1 << 30) + 12345 * 512, 3 * MiB), (700 * (1 << 30), 512 * 1024),
               (TiB - MiB, MiB)]


@pytest.mark.parametrize("workers", [1, 8])
def test_sparse_1tib_to_qcow2_and_back(workers: int, tmp_path: Path) -> None:
    """1 TiB virtual, a few MiB of data: holes stay holes both ways and are never read."""
    raw, qcow2, back = tmp_path / "big.raw", tmp_path / "big.qcow2", tmp_path / "back.raw"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, TiB)
        for i, (off, n) in enumerate(SPARSE_DATA):
            os.pwrite(fd, random_bytes(n, seed=i, name="sparse-1t"), off)
    finally:
        os.close(fd)
    data = sum(n for _, n in SPARSE_DATA)

    stats = vmforge.convert(str(raw), str(qcow2), "qcow2", src_fmt="raw", workers=workers)
    assert stats.read_bytes <= data + 2 * MiB, f"read {stats.read_bytes} bytes for {data} of data"
    proc = qemu_img("check", "-f", "qcow2", qcow2, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _compare(raw, "raw", qcow2, "qcow2")
    allocated = [(e["start"], e["start"] + e["length"])
                 for e in qemu_img_json("map", "-f", "qcow2", qcow2) if e["data"]]
    assert sum(e - s for s, e in allocated) <= data + len(SPARSE_DATA) * 2 * 65536, allocated
    for off, n in SPARSE_DATA:
        assert any(s <= off and off + n <= e for s, e in allocated), (off, n, allocated)

    stats = vmforge.convert(str(qcow2), str(back), "raw", src_fmt="qcow2", workers=workers)
    assert stats.read_bytes <= data + 2 * MiB, f"read {stats.read_bytes} bytes for {data} of data"
    assert os.path.getsize(back) == TiB
    assert os.stat(back).st_blocks * 512 <= data + 4 * MiB, "the raw output is not sparse"
    _compare(raw, "raw", back, "raw")
    with open(back, "rb") as f:
        for i, (off, n) in enumerate(SPARSE_DATA):
            f.seek(off)
            assert f.read(n) == random_bytes(n, seed=i, name="sparse-1t"), f"data at {off}"
    # host data only around the source's data (a cluster of slack each side)
    windows = [(max(0, o - 65536), o + n + 65536) for o, n in SPARSE_DATA]
    stray = [r for r in data_ranges(back) if not any(s <= r[0] and r[1] <= e for s, e in windows)]
    assert not stray, f"data written where the source has holes: {stray}"
