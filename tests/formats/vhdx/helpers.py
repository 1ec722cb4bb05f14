"""Shared checks for the VHDX tests: map consistency and metadata pokes that keep CRCs valid."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from tests.conftest import CORPUS
from tests.helpers import decompress_sparse, vmforge_json
from vmforge.formats.vhdx import structs as S

CHUNK = 4 << 20


def _read(f: Any, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    return data + bytes(n - len(data))


def assert_map_consistent(image: Path, expected_raw: Path, *extra: str) -> list[dict[str, Any]]:
    """vmforge's map of ``image`` tiles the disk, and says the truth about qemu's bytes.

    qemu-img 7.2 has no block status for vhdx (its map is one data entry without an
    offset), so vmforge's finer map is judged against qemu's raw output instead: every
    data entry's host bytes equal qemu's guest bytes there, every zero entry reads zero.
    """
    entries: list[dict[str, Any]] = vmforge_json("map", "-f", "vhdx", *extra, image)
    size = os.path.getsize(expected_raw)
    pos = 0
    with open(image, "rb") as img, open(expected_raw, "rb") as raw:
        for e in entries:
            assert e["start"] == pos, e
            assert e["depth"] == 0 and e["present"], e
            for off in range(e["start"], e["start"] + e["length"], CHUNK):
                n = min(CHUNK, e["start"] + e["length"] - off)
                want = _read(raw, off, n)
                if e["data"]:
                    got = _read(img, e["offset"] + off - e["start"], n)
                    assert got == want, f"host bytes of {e} differ at guest {off}"
                else:
                    assert e["zero"] and want.count(0) == n, f"{e} is not zero in qemu's raw"
            pos += e["length"]
    assert pos == size or (pos < size and _tail_zero(expected_raw, pos)), (pos, size)
    return entries


def _tail_zero(path: Path, start: int) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().count(0) == os.path.getsize(path) - start


def poke_sealed(path: Path, table: int, size: int, at: int, fmt: str, *values: Any) -> None:
    """Write ``struct.pack(fmt, values)`` at ``table + at`` and fix the table's CRC-32C."""
    with open(path, "r+b") as f:
        f.seek(table)
        raw = bytearray(f.read(size))
        struct.pack_into(fmt, raw, at, *values)
        f.seek(table)
        f.write(S.seal(raw))


def poke_both_region_tables(path: Path, at: int, fmt: str, *values: Any) -> None:
    for table in (S.REGION_TABLE1_OFFSET, S.REGION_TABLE2_OFFSET):
        poke_sealed(path, table, S.REGION_TABLE_SIZE, at, fmt, *values)


def region(path: Path, which: bytes) -> tuple[int, int]:
    """(file offset, length) of the BAT or metadata region of a file."""
    with open(path, "rb") as f:
        f.seek(S.REGION_TABLE1_OFFSET)
        _sig, _n, entries = S.unpack_region_table(f.read(S.REGION_TABLE_SIZE))
    e = next(e for e in entries if e.guid == which)
    return e.file_offset, e.length


def corpus_file(dest: Path, rel: str) -> Path:
    src = CORPUS / rel
    assert src.exists(), f"corpus missing: {src}"
    name = Path(rel).name.removesuffix(".bz2").removesuffix(".gz")
    out = dest / name
    if not out.exists():
        decompress_sparse(src, out)
        os.chmod(out, 0o444)
    return out
