"""Fuzzing every parser: mutated headers may be refused, never crash.

For each registered format a small valid image (made by qemu-img) is mutated the way
QEMU's image-fuzzer does it: header bytes overwritten with boundary values (0, 1,
2^31±1, 2^32-1, 2^63, all ones) or random bytes, and the file cut short. Then the
reader opens it and reads every extent, and the inspector inspects it. Any exception
other than a typed vmforge error (or one from a malformed -o option, which cannot
happen here) fails the run, as does a read that takes too long.

CI runs a bounded number of examples per format. To fuzz longer:

    VMFORGE_FUZZ_EXAMPLES=20000 .venv/bin/pytest -n 2 tests/safety/test_fuzz.py
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data.qemu import qemu_img
from vmforge.errors import VmforgeError
from vmforge.formats import get_format
from vmforge.formats.base import OpenOptions
from vmforge.safety import inspect_path

EXAMPLES = int(os.environ.get("VMFORGE_FUZZ_EXAMPLES", "150"))
#: formats qemu-img can create, with options that give them interesting metadata
SEEDS = {
    "qcow2": "cluster_size=4096",
    "vpc": "subformat=dynamic",
    "vdi": "",
    "parallels": "",
    "vmdk": "",
    "vhdx": "block_size=1048576",
}
#: how far into the file mutations land: the headers and first tables
SPAN = 256 * 1024
BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32,
            2**63 - 1, 2**63, 2**64 - 1]


def _formats() -> list[str]:
    from vmforge.formats import list_formats

    registered = {f.name for f in list_formats()}
    return [f for f in SEEDS if f in registered]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bytes]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    cache: dict[str, bytes] = {}

    def get(fmt: str) -> bytes:
        if fmt not in cache:
            raw = root / f"{fmt}.raw"
            with open(raw, "wb") as f:  # some data, some holes
                f.truncate(3 << 20)
                f.seek(4096)
                f.write(os.urandom(70000))
                f.seek(2 << 20)
                f.write(b"vmforge" * 1000)
            img = root / f"seed.{fmt}"
            opts = ["-o", SEEDS[fmt]] if SEEDS[fmt] else []
            qemu_img("convert", "-f", "raw", "-O", fmt, *opts, raw, img)
            cache[fmt] = img.read_bytes()
        return cache[fmt]

    return get


mutation = st.one_of(
    st.tuples(st.just("int"), st.integers(0, SPAN), st.sampled_from(["<I", ">I", "<Q", ">Q",
                                                                      "<H", ">H"]),
              st.sampled_from(BOUNDARY)),
    st.tuples(st.just("bytes"), st.integers(0, SPAN), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("cut"), st.integers(0, 2 * SPAN)),
)


def _mutate(data: bytes, muts: list[tuple[object, ...]]) -> bytes:
    buf = bytearray(data)
    for m in muts:
        if m[0] == "cut":
            del buf[int(m[1]):]  # type: ignore[call-overload]
            continue
        at = int(m[1]) % max(1, min(len(buf), SPAN))  # type: ignore[call-overload]
        if m[0] == "int":
            fmt, value = str(m[2]), int(m[3])  # type: ignore[call-overload]
            value &= (1 << (8 * struct.calcsize(fmt))) - 1
            piece = struct.pack(fmt, value)
        else:
            piece = bytes(m[2])  # type: ignore[call-overload]
        buf[at:at + len(piece)] = piece[:max(0, len(buf) - at)]
    return bytes(buf)


def _exercise(path: Path, fmt: str) -> None:
    """Open, read every extent's bytes, check, and inspect; only typed errors may escape."""
    started = time.monotonic()
    try:
        reader = get_format(fmt).open(str(path), OpenOptions(untrusted=True))
    except VmforgeError:
        reader = None
    if reader is not None:
        try:
            with reader:
                for ext in reader.iter_extents(0, reader.virtual_size):
                    if ext.kind.value == "data" and ext.length <= (8 << 20):
                        buf = memoryview(bytearray(ext.stored_length or ext.length))
                        reader.read_host(ext, buf)
                    if time.monotonic() - started > 20:
                        pytest.fail(f"{fmt}: reading a mutated image took over 20 s")
        except VmforgeError:
            pass
    report = inspect_path(str(path), untrusted=True)
    assert report.checks  # a verdict, whatever it is


@pytest.mark.slow
@pytest.mark.parametrize("fmt", _formats())
def test_mutated_headers_never_crash(fmt: str, seeds: Callable[[str], bytes],
                                     tmp_path: Path) -> None:
    seed = seeds(fmt)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(muts=st.lists(mutation, min_size=1, max_size=4))
    def run(muts: list[tuple[object, ...]]) -> None:
        path = tmp_path / f"fuzz.{fmt}"
        path.write_bytes(_mutate(seed, muts))
        _exercise(path, fmt)

    run()
