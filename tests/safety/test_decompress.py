"""SECURITY.md row 25: compressed uploads expand up to the cap and no further; the
partial output is removed. The real compressors make the bombs (gzip, xz, zstd CLIs
where installed, else the Python modules)."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import resource
from pathlib import Path

import pytest
import zstandard

from vmforge.errors import CorruptImage, LimitExceeded
from vmforge.safety.decompress import expand, expand_to_file

MiB = 1 << 20


def _bomb(codec: str, size: int) -> bytes:
    zeros = bytes(size)
    if codec == "gzip":
        return gzip.compress(zeros, 9)
    if codec == "xz":
        return lzma.compress(zeros)
    return zstandard.ZstdCompressor(level=19).compress(zeros)


@pytest.mark.parametrize("codec", ["gzip", "xz", "zstd"])
def test_bomb_stops_at_the_cap_and_leaves_nothing(tmp_path: Path, codec: str) -> None:
    data = _bomb(codec, 512 * MiB)
    assert len(data) < 2 * MiB  # it is a bomb
    dest = tmp_path / "disk.raw"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LimitExceeded, match="expands past"):
        expand_to_file(io.BytesIO(data), str(dest), cap=64 * MiB, name="upload")
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 64 * 1024, f"memory grew by {grew_kib} KiB"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("codec", ["gzip", "xz", "zstd"])
def test_within_the_cap_expands_exactly(tmp_path: Path, codec: str) -> None:
    payload = os.urandom(3 * MiB) + bytes(5 * MiB) + b"end"
    packed = {"gzip": gzip.compress, "xz": lzma.compress,
              "zstd": zstandard.ZstdCompressor().compress}[codec](payload)
    dest = tmp_path / "disk.raw"
    assert expand_to_file(io.BytesIO(packed), str(dest), cap=len(payload)) == len(payload)
    assert dest.read_bytes() == payload
    assert os.stat(dest).st_blocks * 512 < len(payload)  # the zeros stayed a hole


def test_concatenated_gzip_members_and_corruption(tmp_path: Path) -> None:
    two = gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 1000)
    assert b"".join(expand(io.BytesIO(two), cap=10_000)) == b"a" * 1000 + b"b" * 1000
    broken = bytearray(gzip.compress(os.urandom(100_000)))
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(CorruptImage):
        expand_to_file(io.BytesIO(bytes(broken)), str(tmp_path / "x"), cap=1 << 30)
    with pytest.raises(CorruptImage, match="not gzip"):
        list(expand(io.BytesIO(b"plain bytes"), cap=100))
    assert list(tmp_path.iterdir()) == []
