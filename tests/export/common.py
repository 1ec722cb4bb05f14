"""Shared pieces of the export tests: a small bootable-looking source disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


def mbr_sector(sectors: int = 8192) -> bytes:
    """A classic MBR with one Linux partition (type 0x83) from sector 2048."""
    s = bytearray(512)
    entry = 446
    s[entry + 4] = 0x83
    s[entry + 8:entry + 12] = (2048).to_bytes(4, "little")
    s[entry + 12:entry + 16] = sectors.to_bytes(4, "little")
    s[510:512] = b"\x55\xaa"
    return bytes(s)


def boot_disk(tmp: Path, pattern_file: Callable[..., Path], size: int = 5 * MiB + 4096) -> Path:
    """The 'mixed' pattern (data, text, holes) with an MBR in sector 0; not a whole MiB."""
    src = pattern_file("mixed", size=size)
    dest = tmp / "boot.raw"
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(1 << 20):
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), 1)
            else:
                fout.write(chunk)
        fout.truncate(size)
        fout.seek(0)
        fout.write(mbr_sector())
    return dest
