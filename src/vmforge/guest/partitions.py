"""MBR and GPT partition tables, read defensively (SECURITY.md row 26).

# References:
#   MBR: the classic layout (IBM PC/AT; UEFI 2.10 section 5.2.1 "Legacy MBR"): 4 entries
#     of 16 bytes at 446, signature 0x55 0xAA at 510; extended partitions (types 0x05,
#     0x0F, 0x85) chain Extended Boot Records, each with a logical partition relative to
#     itself and a link relative to the extended partition's start.
#   GPT: UEFI 2.10 section 5.3 "GUID Partition Table (GPT) Disk Layout": header at LBA 1
#     ("EFI PART", CRC32 over HeaderSize bytes with the CRC field zeroed), partition entry
#     array with its own CRC32, entries of SizeOfPartitionEntry bytes (a multiple of 128).

Tables are reported, never followed blindly: every entry is checked against the disk
size and the others, the extended chain is bounded and loop-checked, GPT sizes are
capped before anything is read, and each problem found is named.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
MBR_EXTENDED = {0x05, 0x0F, 0x85}  # CHS, LBA and Linux extended partition types
MBR_PROTECTIVE = 0xEE  # the whole disk belongs to a GPT
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # up to SizeOfPartitionEntry + entries CRC
MAX_GPT_ENTRIES = 1024  # the spec's minimum array is 128 entries; 1024 is generous
MAX_GPT_ENTRY_SIZE = 4096
MAX_LOGICAL = 128  # logical partitions followed in an extended chain

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    start: int  # bytes
    length: int  # bytes
    type: str  # MBR type byte as 0xNN, or the GPT type GUID
    name: str = ""
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(slots=True)
class PartitionTable:
    scheme: str | None  # "mbr", "gpt" or None (no table)
    partitions: list[Partition] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    disk_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "disk-id": self.disk_id, "problems": self.problems,
                "partitions": [{"number": p.number, "start": p.start, "length": p.length,
                                "type": p.type, "name": p.name, "bootable": p.bootable}
                               for p in self.partitions]}


def read_partition_table(read: Reader, disk_size: int) -> PartitionTable:
    """The disk's partition table; ``read(offset, length)`` returns guest bytes."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return PartitionTable(None)
    entries = [_mbr_entry(mbr, i) for i in range(4)]
    if any(e[1] == MBR_PROTECTIVE for e in entries):
        return _gpt(read, disk_size)
    table = PartitionTable("mbr", disk_id=f"{int.from_bytes(mbr[440:444], 'little'):08x}")
    for i, (status, ptype, first, count) in enumerate(entries, start=1):
        if ptype == 0 or count == 0:
            continue
        part = Partition(i, first * SECTOR, count * SECTOR, f"0x{ptype:02x}", bootable=status == 0x80)
        table.partitions.append(part)
        if ptype in MBR_EXTENDED:
            _logical(read, disk_size, part, table)
    _check_bounds(table, disk_size, first_usable=SECTOR)
    return table


def _mbr_entry(sector: bytes, index: int) -> tuple[int, int, int, int]:
    at = 446 + 16 * index
    status, ptype = sector[at], sector[at + 4]
    first, count = struct.unpack_from("<II", sector, at + 8)
    return status, ptype, first, count


def _logical(read: Reader, disk_size: int, ext: Partition, table: PartitionTable) -> None:
    """Follow the EBR chain inside ``ext``, bounded, refusing loops and escapes."""
    seen: set[int] = set()
    ebr = ext.start
    number = 5
    while True:
        if ebr in seen:
            table.problems.append(f"extended partition chain loops back to offset {ebr}")
            return
        if not ext.start <= ebr < ext.end or ebr + SECTOR > disk_size:
            table.problems.append(f"extended boot record at offset {ebr} lies outside "
                                  "the extended partition or the disk")
            return
        if len(seen) >= MAX_LOGICAL:
            table.problems.append(f"more than {MAX_LOGICAL} logical partitions")
            return
        seen.add(ebr)
        sector = read(ebr, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
            table.problems.append(f"extended boot record at offset {ebr} has no signature")
            return
        _, ptype, first, count = _mbr_entry(sector, 0)
        if ptype and count:
            table.partitions.append(Partition(number, ebr + first * SECTOR, count * SECTOR,
                                              f"0x{ptype:02x}"))
            number += 1
        _, ntype, nfirst, ncount = _mbr_entry(sector, 1)
        if ntype not in MBR_EXTENDED or ncount == 0:
            return
        ebr = ext.start + nfirst * SECTOR


def _gpt(read: Reader, disk_size: int) -> PartitionTable:
    table = PartitionTable("gpt")
    raw = read(SECTOR, SECTOR)
    if len(raw) < GPT_HEADER.size or raw[:8] != GPT_SIGNATURE:
        table.problems.append("protective MBR but no GPT header at LBA 1")
        return table
    (_, _, header_size, header_crc, _, my_lba, alt_lba, first_usable, last_usable, disk_guid,
     entries_lba, n_entries, entry_size, entries_crc) = GPT_HEADER.unpack_from(raw)
    table.disk_id = str(uuid.UUID(bytes_le=disk_guid))
    if not 92 <= header_size <= SECTOR:
        table.problems.append(f"GPT header size {header_size} is outside 92..{SECTOR}")
        return table
    check = bytearray(raw[:header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header_crc:
        table.problems.append("GPT header CRC32 does not match")
    if my_lba != 1:
        table.problems.append(f"GPT header says it is at LBA {my_lba}, not 1")
    if n_entries > MAX_GPT_ENTRIES or entry_size < 128 or entry_size % 128 or \
            entry_size > MAX_GPT_ENTRY_SIZE:
        table.problems.append(f"GPT entry array of {n_entries} x {entry_size} bytes refused")
        return table
    array_at, array_len = entries_lba * SECTOR, n_entries * entry_size
    if entries_lba < 2 or array_at + array_len > disk_size:
        table.problems.append(f"GPT entry array at LBA {entries_lba} lies outside the disk")
        return table
    array = read(array_at, array_len)
    if zlib.crc32(array) != entries_crc:
        table.problems.append("GPT partition entry array CRC32 does not match")
    last_lba = disk_size // SECTOR - 1
    if alt_lba > last_lba:
        table.problems.append(f"GPT backup header LBA {alt_lba} is past the end of the disk")
    if last_usable > last_lba or first_usable > last_usable:
        table.problems.append(f"GPT usable range {first_usable}..{last_usable} does not fit "
                              "the disk")
    for i in range(n_entries):
        e = array[i * entry_size:(i + 1) * entry_size]
        type_guid = e[:16]
        if type_guid == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        if last < first:
            table.problems.append(f"GPT entry {i + 1} ends (LBA {last}) before it starts "
                                  f"(LBA {first})")
            continue
        table.partitions.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR,
                                          str(uuid.UUID(bytes_le=type_guid)), name))
    _check_bounds(table, disk_size, first_usable=first_usable * SECTOR,
                  last_usable_end=(last_usable + 1) * SECTOR)
    return table


def _check_bounds(table: PartitionTable, disk_size: int, *, first_usable: int,
                  last_usable_end: int | None = None) -> None:
    """Entries past the disk end or the usable range, and overlapping entries."""
    limit = disk_size if last_usable_end is None else min(disk_size, last_usable_end)
    for p in table.partitions:
        if p.end > disk_size:
            table.problems.append(f"partition {p.number} ends at {p.end}, past the end of the "
                                  f"disk ({disk_size} bytes)")
        elif p.end > limit or p.start < first_usable:
            table.problems.append(f"partition {p.number} lies outside the usable area")
    primary_ext = {p.number for p in table.partitions
                   if table.scheme == "mbr" and int(p.type, 16) in MBR_EXTENDED}
    flat = sorted((p for p in table.partitions if p.number not in primary_ext),
                  key=lambda p: p.start)
    for a, b in zip(flat, flat[1:], strict=False):
        if b.start < a.end:
            table.problems.append(f"partitions {a.number} and {b.number} overlap")
