"""Fixtures: oracle wrappers, generated images (built once per worker), the corpus."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data import qemu
from tests.data.generators import write_pattern
from tests.data.qcow2_builders import SPECS, Built
from tests.data.qemu import qemu_img
from tests.helpers import decompress_sparse

CORPUS = Path(os.environ.get("VMFORGE_CORPUS", "/work/shared/corpus"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if qemu.QEMU_IMG is None or qemu.QEMU_IO is None:
        skip = pytest.mark.skip(reason="qemu-img/qemu-io (the oracle) is not installed")
        for item in items:  # every test here asserts against the oracle
            item.add_marker(skip)


class ImageCache:
    """Builds each spec at most once per xdist worker, and caches oracle outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Built] = {}
        self.raw: dict[tuple[str, str | None], Path] = {}

    def get(self, name: str) -> Built:
        if name not in self.built:
            self.built[name] = SPECS[name].build(self.root / name)
        return self.built[name]

    def qemu_raw(self, name: str, snapshot: str | None = None) -> Path:
        """The oracle's ``convert -O raw`` of spec ``name`` (optionally of a snapshot)."""
        key = (name, snapshot)
        if key not in self.raw:
            b = self.get(name)
            tag = "" if snapshot is None else "-snap-" + snapshot.replace(" ", "_")
            dest = self.root / name / f"qemu{tag}.raw"
            qemu.convert_raw(b.path, dest, fmt=b.fmt,
                             snapshot=None if snapshot is None else f"snapshot.name={snapshot}")
            self.raw[key] = dest
        return self.raw[key]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    return ImageCache(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def pattern_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``pattern_file(name, size=..., seed=...)`` -> a raw file, written once per worker."""
    root = tmp_path_factory.mktemp("patterns")
    cache: dict[tuple[str, int | None, int], Path] = {}

    def make(name: str, size: int | None = None, seed: int = 0) -> Path:
        key = (name, size, seed)
        if key not in cache:
            path = root / f"{name}-{size}-{seed}.raw"
            write_pattern(path, name, *(() if size is None else (size,)), seed=seed)
            os.chmod(path, 0o444)  # sources are never written by a test
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def qemu_made(pattern_file: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """``qemu_made(fmt, options, pattern, size)`` -> (image qemu-img wrote, qemu's raw of it).

    Made once per worker; formats' reader tests compare vmforge against both files.
    """
    root = tmp_path_factory.mktemp("qemu-made")
    cache: dict[tuple[str, str, str, int], tuple[Path, Path]] = {}

    def get(fmt: str, options: str, name: str, size: int) -> tuple[Path, Path]:
        key = (fmt, options, name, size)
        if key not in cache:
            src = pattern_file(name, size=size)
            stem = f"{fmt}-{len(cache)}-{name}-{size}"
            img, raw = root / f"{stem}.img", root / f"{stem}.raw"
            qemu_img("convert", "-O", fmt, *(["-o", options] if options else []), src, img)
            qemu_img("convert", "-f", fmt, "-O", "raw", img, raw)
            cache[key] = (img, raw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def corpus_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dissect-hypervisor qcow2 samples, decompressed (sparse) into a temp dir."""
    src = CORPUS / "dissect-hypervisor" / "qcow2"
    if not src.is_dir():
        pytest.fail(f"corpus missing: {src}")
    dest = tmp_path_factory.mktemp("corpus-qcow2")
    for gz in sorted(src.glob("*.gz")):
        decompress_sparse(gz, dest / gz.name[:-3])
    return dest
