"""The conversion matrix: every source format -> every target (sub)format -> back to raw.

The matrix is generated from the format registry, so a new format joins it by being
registered; a writable format without an entry in TARGETS fails the guard test below.
Each case is judged three ways: qemu-img reads the output as the original bytes
(``qemu-img compare``), finds nothing wrong in it (``qemu-img check``, for the formats
it checks), and vmforge reads it back to the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import vmforge
from tests.data.generators import pattern_bytes
from tests.data.qemu import qemu_img
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
    vmforge.convert(str(src), str(out), fmt, src_fmt=src_fmt, options=opts, compress=compress)

    # the oracle reads what vmforge wrote as the original bytes (zeros past a rounded end)
    proc = qemu_img("compare", "-f", "raw", "-F", fmt, pattern_file(pattern), out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt in QEMU_CHECKS:
        proc = qemu_img("check", "-f", fmt, out, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    back = tmp_path / "back.raw"
    vmforge.convert(str(out), str(back), "raw", src_fmt=fmt)
    _assert_reads_as(back, pattern_bytes(pattern))
    os.unlink(back)
