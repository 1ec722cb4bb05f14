# References:
#   Microsoft [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format" v1.0+: 2.1 "Layout"
#   (File Type Identifier, Headers, Region Table), 2.2 "Header" (2.2.1 File Type
#   Identifier, 2.2.2 Headers, 2.2.3 Region Table), 2.3 "Log" (2.3.1 Log Entry Header,
#   2.3.1.1 Zero Descriptor, 2.3.1.2 Data Descriptor, 2.3.1.3 Data Sector, 2.3.3 Log
#   Replay), 2.4 "Blocks" (2.4.1 Payload Blocks, 2.4.2 Sector Bitmap Blocks, 2.5 BAT
#   with its chunk ratio), 2.6 "Metadata Region" (2.6.1 Metadata Table, 2.6.2 Known
#   Metadata Items: File Parameters, Virtual Disk Size, Page 83 Data, Logical Sector
#   Size, Physical Sector Size, Parent Locator).
#   libyal/libvhdi "Virtual Hard Disk version 2 (VHDX) image format": the same
#   structures with their byte offsets.
#   QEMU 7.2 block/vhdx.c, vhdx.h, vhdx-log.c: the oracle's limits and choices.
"""VHDX on-disk structures, with the specification's field names, packed and unpacked.

Everything is little-endian. Checksums are CRC-32C (Castagnoli) over the whole
structure with the checksum field taken as zero.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

import google_crc32c

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# 2.1 Layout: fixed places of the header section (the first 1 MiB)
FILE_IDENTIFIER_OFFSET = 0
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION_TABLE1_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
HEADER_SECTION_SIZE = 1 * MiB
HEADER_SIZE = 4 * KiB  # 2.2.2: the checksum covers the whole 4 KiB
REGION_TABLE_SIZE = 64 * KiB  # 2.2.3: the checksum covers the whole 64 KiB
METADATA_TABLE_SIZE = 64 * KiB  # 2.6.1: the table occupies the region's first 64 KiB
ALIGNMENT = 1 * MiB  # regions, payload blocks, sector bitmaps, log: 1 MiB units

FILE_SIGNATURE = b"vhdxfile"  # 2.2.1 "Signature"
HEADER_SIGNATURE = b"head"  # 2.2.2 "Signature"
REGION_SIGNATURE = b"regi"  # 2.2.3.1 "Signature"
METADATA_SIGNATURE = b"metadata"  # 2.6.1.1 "Signature"
HEADER_VERSION = 1  # 2.2.2 "Version" must be 1
LOG_VERSION = 0  # 2.2.2 "LogVersion" must be 0
MAX_TABLE_ENTRIES = 2047  # 2.2.3.1 / 2.6.1.1 "EntryCount" must be < 2048

# 2.2.3.2 Region Table Entry "Required" (bit 0)
REGION_REQUIRED = 0x1
# 2.6.1.2 Metadata Table Entry flags
META_IS_USER = 0x1  # "IsUser"
META_IS_VIRTUAL_DISK = 0x2  # "IsVirtualDisk"
META_IS_REQUIRED = 0x4  # "IsRequired"
# 2.6.2.1 File Parameters flags
PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1  # "LeaveBlocksAllocated": fixed disk
PARAMS_HAS_PARENT = 0x2  # "HasParent": differencing disk

# 2.5.1 BAT entry: State in bits 0-2, FileOffsetMB in bits 20-63
BAT_STATE_MASK = 0x7
BAT_FILE_OFFSET_MASK = 0xFFFFFFFFFFF00000
# 2.5.1.1 Payload BAT entry states
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5  # QEMU vhdx.h: the value of pre-1.0 drafts, read as unmapped
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
# 2.5.1.2 Sector bitmap BAT entry states
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6

SECTORS_PER_CHUNK = 1 << 23  # 2.5: a sector bitmap block (1 MiB) has one bit per sector
SECTOR_BITMAP_SIZE = 1 * MiB
BLOCK_SIZE_MIN = 1 * MiB  # 2.6.2.1 "BlockSize": 1 MiB .. 256 MiB, a power of two
BLOCK_SIZE_MAX = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB  # 2.6.2.2 "VirtualDiskSize" at most 64 TB
LOGICAL_SECTOR_SIZES = (512, 4096)  # 2.6.2.4
PHYSICAL_SECTOR_SIZES = (512, 4096)  # 2.6.2.5

# 2.3 Log
LOG_SECTOR_SIZE = 4 * KiB
LOG_ENTRY_SIGNATURE = b"loge"  # 2.3.1.1 "Signature"
LOG_ZERO_SIGNATURE = b"zero"  # 2.3.1.2 Zero Descriptor "ZeroSignature"
LOG_DESC_SIGNATURE = b"desc"  # 2.3.1.3 Data Descriptor "DataSignature"
LOG_DATA_SIGNATURE = b"data"  # 2.3.1.4 Data Sector "DataSignature"


def guid(text: str) -> bytes:
    """A GUID as stored on disk (first three fields little-endian)."""
    return uuid.UUID(text).bytes_le


def guid_str(raw: bytes) -> str:
    """Stored GUID bytes in the braced form Hyper-V uses in parent locators."""
    return "{" + str(uuid.UUID(bytes_le=bytes(raw))) + "}"


def parse_guid_str(text: str) -> bytes | None:
    """A ``{xxxxxxxx-...}`` string as stored GUID bytes, or None when malformed."""
    try:
        return uuid.UUID(text.strip().strip("{}")).bytes_le
    except ValueError:
        return None


ZERO_GUID = bytes(16)
# 2.2.3.2 Known regions
BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
# 2.6.2 Known metadata items
FILE_PARAMETERS_GUID = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA_GUID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
# 2.6.2.6 "LocatorType" of a VHDX parent
VHDX_PARENT_LOCATOR_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(google_crc32c.value(bytes(data)))


def checksum_ok(data: bytes, at: int = 4) -> bool:
    """CRC-32C of ``data`` with its 4-byte checksum at ``at`` taken as zero."""
    stored = struct.unpack_from("<I", data, at)[0]
    return bool(stored == crc32c(data[:at] + bytes(4) + data[at + 4:]))


def seal(data: bytes | bytearray, at: int = 4) -> bytes:
    """``data`` with the CRC-32C written into its checksum field at ``at``."""
    raw = bytearray(data)
    raw[at:at + 4] = bytes(4)
    struct.pack_into("<I", raw, at, crc32c(raw))
    return bytes(raw)


# 2.2.2 Header: Signature, Checksum, SequenceNumber, FileWriteGuid, DataWriteGuid,
# LogGuid, LogVersion, Version, LogLength, LogOffset
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True, slots=True)
class Header:
    signature: bytes
    checksum: int
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*_HEADER.unpack_from(data, 0))

    def sealed(self) -> bytes:
        """The 4 KiB header with its checksum."""
        raw = _HEADER.pack(self.signature, 0, self.sequence_number, self.file_write_guid,
                           self.data_write_guid, self.log_guid, self.log_version, self.version,
                           self.log_length, self.log_offset)
        return seal(raw.ljust(HEADER_SIZE, b"\0"))


# 2.2.3.1 Region Table Header: Signature, Checksum, EntryCount, Reserved
_REGION_HEADER = struct.Struct("<4sIII")
# 2.2.3.2 Region Table Entry: Guid, FileOffset, Length, Required (bit 0 of a 32-bit field)
_REGION_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True, slots=True)
class RegionEntry:
    guid: bytes
    file_offset: int
    length: int
    required: int

    def pack(self) -> bytes:
        return _REGION_ENTRY.pack(self.guid, self.file_offset, self.length, self.required)


def unpack_region_table(data: bytes) -> tuple[bytes, int, list[RegionEntry]]:
    """(signature, entry_count, entries); entries only when the count is within limits."""
    sig, _crc, count, _res = _REGION_HEADER.unpack_from(data, 0)
    if count > MAX_TABLE_ENTRIES:
        return sig, count, []
    entries = [RegionEntry(*_REGION_ENTRY.unpack_from(data, _REGION_HEADER.size + i * 32))
               for i in range(count)]
    return sig, count, entries


def pack_region_table(entries: list[RegionEntry]) -> bytes:
    raw = _REGION_HEADER.pack(REGION_SIGNATURE, 0, len(entries), 0)
    raw += b"".join(e.pack() for e in entries)
    return seal(raw.ljust(REGION_TABLE_SIZE, b"\0"))


# 2.6.1.1 Metadata Table Header: Signature, Reserved, EntryCount, Reserved2[20]
_META_HEADER = struct.Struct("<8sHH20x")
# 2.6.1.2 Metadata Table Entry: ItemId, Offset, Length, flags (IsUser, IsVirtualDisk,
# IsRequired), Reserved2
_META_ENTRY = struct.Struct("<16sIIII")


@dataclass(frozen=True, slots=True)
class MetadataEntry:
    item_id: bytes
    offset: int
    length: int
    flags: int

    def pack(self) -> bytes:
        return _META_ENTRY.pack(self.item_id, self.offset, self.length, self.flags, 0)


def unpack_metadata_table(data: bytes) -> tuple[bytes, int, list[MetadataEntry]]:
    sig, _res, count = _META_HEADER.unpack_from(data, 0)
    if count > MAX_TABLE_ENTRIES:
        return sig, count, []
    entries = []
    for i in range(count):
        item, off, length, flags, _r = _META_ENTRY.unpack_from(data, _META_HEADER.size + i * 32)
        entries.append(MetadataEntry(item, off, length, flags))
    return sig, count, entries


def pack_metadata_table(entries: list[MetadataEntry]) -> bytes:
    raw = _META_HEADER.pack(METADATA_SIGNATURE, 0, len(entries))
    raw += b"".join(e.pack() for e in entries)
    return raw.ljust(METADATA_TABLE_SIZE, b"\0")


# 2.6.2.6 Parent Locator Header: LocatorType, Reserved, KeyValueCount
_LOCATOR_HEADER = struct.Struct("<16sHH")
# 2.6.2.6.1 Parent Locator Entry: KeyOffset, ValueOffset, KeyLength, ValueLength
_LOCATOR_ENTRY = struct.Struct("<IIHH")


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """The key/value pairs of a VHDX parent locator (UTF-16LE strings on disk)."""

    locator_type: bytes
    entries: dict[str, str] = field(default_factory=dict)

    @classmethod
    def unpack(cls, data: bytes) -> ParentLocator:
        """Parse an item; ValueError on anything out of bounds or malformed."""
        if len(data) < _LOCATOR_HEADER.size:
            raise ValueError("parent locator shorter than its header")
        ltype, _res, count = _LOCATOR_HEADER.unpack_from(data, 0)
        if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(data):
            raise ValueError(f"{count} parent locator entries do not fit in {len(data)} bytes")
        out: dict[str, str] = {}
        for i in range(count):
            ko, vo, kl, vl = _LOCATOR_ENTRY.unpack_from(data, _LOCATOR_HEADER.size + i * 12)
            if ko + kl > len(data) or vo + vl > len(data) or kl % 2 or vl % 2 or not kl:
                raise ValueError(f"parent locator entry {i} lies outside the item")
            try:
                key = data[ko:ko + kl].decode("utf-16-le")
                value = data[vo:vo + vl].decode("utf-16-le")
            except UnicodeDecodeError:
                raise ValueError(f"parent locator entry {i} is not UTF-16") from None
            if key in out:
                raise ValueError(f"parent locator key '{key}' appears twice")
            out[key] = value
        return cls(ltype, out)

    def pack(self) -> bytes:
        items = list(self.entries.items())
        table = _LOCATOR_HEADER.pack(self.locator_type, 0, len(items))
        strings = b""
        base = _LOCATOR_HEADER.size + len(items) * _LOCATOR_ENTRY.size
        for key, value in items:
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            ko = base + len(strings)
            strings += k
            vo = base + len(strings)
            strings += v
            table += _LOCATOR_ENTRY.pack(ko, vo, len(k), len(v))
        return table + strings


# 2.3.1.1 Log Entry Header: Signature, Checksum, EntryLength, Tail, SequenceNumber,
# DescriptorCount, Reserved, LogGuid, FlushedFileOffset, LastFileOffset
LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
# 2.3.1.2/2.3.1.3 Descriptors: Signature, TrailingBytes|Reserved, LeadingBytes|ZeroLength
# (8 raw bytes), FileOffset, SequenceNumber
LOG_DESCRIPTOR = struct.Struct("<4s4s8sQQ")
# 2.3.1.4 Data Sector: DataSignature, SequenceHigh, Data[4084], SequenceLow
LOG_DATA_SEQ_HIGH = struct.Struct("<4sI")
LOG_DATA_PAYLOAD = slice(8, 4092)


@dataclass(frozen=True, slots=True)
class LogEntryHeader:
    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    reserved: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> LogEntryHeader:
        return cls(*LOG_ENTRY_HEADER.unpack_from(data, 0))


def descriptor_sectors(count: int) -> int:
    """4 KiB sectors holding the entry header (64 bytes) and ``count`` descriptors."""
    return -(-(count + 2) // 128)  # the header takes the room of two 32-byte descriptors


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """2.5: payload blocks described by one sector bitmap block."""
    return SECTORS_PER_CHUNK * logical_sector_size // block_size


def bat_entry_count(virtual_size: int, block_size: int, logical_sector_size: int,
                    has_parent: bool) -> tuple[int, int]:
    """(payload blocks, BAT entries) as 2.5 lays them out and QEMU counts them."""
    ratio = chunk_ratio(block_size, logical_sector_size)
    blocks = -(-virtual_size // block_size)
    chunks = -(-blocks // ratio)
    if has_parent:
        return blocks, chunks * (ratio + 1)
    # a sector bitmap entry follows every full chunk of payload entries
    return blocks, blocks + max(0, blocks - 1) // ratio


def bat_index(block: int, ratio: int) -> int:
    """BAT position of payload block ``block`` (sector bitmap entries interleaved)."""
    return block + block // ratio


def sb_index(chunk: int, ratio: int) -> int:
    """BAT position of the sector bitmap entry of ``chunk``."""
    return chunk * (ratio + 1) + ratio
