# References:
#   QEMU docs/interop/parallels.txt: "Parallels Expandable Image File Format" (header
#   fields, BAT units, data_off, ext_off, the Format Extension cluster).
#   QEMU 7.2 block/parallels.c (ParallelsHeader, parallels_probe, parallels_open,
#   seek_to_sector / bat2sect, block_status): the oracle; field names follow it.
"""Parallels (ploop) expandable image header, unpacked (little-endian)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC_V1 = b"WithoutFreeSpace"  # HEADER_MAGIC: BAT entries in sectors
MAGIC_V2 = b"WithouFreSpacExt"  # HEADER_MAGIC2: BAT entries in clusters
VERSION = 2  # HEADER_VERSION: the only version either magic uses
INUSE_MAGIC = 0x746F6E59  # HEADER_INUSE_MAGIC: opened read-write, not closed cleanly

SECTOR_SIZE = 512
HEADER_SIZE = 64  # sizeof(ParallelsHeader); the BAT follows immediately

# qemu parallels_open: tracks > INT32_MAX / 513 is "Too big cluster" (about 2 GiB)
MAX_TRACKS = (2**31 - 1) // 513
# qemu parallels_open: bat_entries > INT_MAX / 4 is "Catalog too large"
MAX_BAT_ENTRIES = (2**31 - 1) // 4
# bdrv_getlength is a signed 64-bit byte count
MAX_VIRTUAL_SIZE = (1 << 63) - 1

# magic[16], version, heads, cylinders, tracks, bat_entries, nb_sectors (u64), inuse,
# data_off, flags, ext_off (u64)
_HEADER = struct.Struct("<16sIIIIIQIIIQ")
assert _HEADER.size == HEADER_SIZE


@dataclass(frozen=True, slots=True)
class Header:
    """ParallelsHeader as stored."""

    magic: bytes
    version: int
    heads: int
    cylinders: int
    tracks: int
    bat_entries: int
    nb_sectors: int
    inuse: int
    data_off: int
    flags: int
    ext_off: int

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse the first ``HEADER_SIZE`` bytes (shorter input is padded with zeros)."""
        return cls(*_HEADER.unpack(bytes(data[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")))

    def pack(self) -> bytes:
        return _HEADER.pack(self.magic, self.version, self.heads, self.cylinders, self.tracks,
                            self.bat_entries, self.nb_sectors, self.inuse, self.data_off,
                            self.flags, self.ext_off)

    @property
    def is_v2(self) -> bool:
        return self.magic == MAGIC_V2

    @property
    def total_sectors(self) -> int:
        """Disk size in sectors: "WithoutFreeSpace" uses only the low 32 bits."""
        return self.nb_sectors if self.is_v2 else self.nb_sectors & 0xFFFFFFFF

    @property
    def entry_unit(self) -> int:
        """Bytes one BAT entry counts: a sector (v1) or a cluster (v2) (bat2sect)."""
        return SECTOR_SIZE * (self.tracks if self.is_v2 else 1)


def is_parallels(head: bytes) -> bool:
    """parallels_probe: either magic and version 2 in a full 64-byte header."""
    return (len(head) >= HEADER_SIZE and head[:16] in (MAGIC_V1, MAGIC_V2)
            and int.from_bytes(head[16:20], "little") == VERSION)
