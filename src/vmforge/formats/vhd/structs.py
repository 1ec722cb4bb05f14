# References:
#   Microsoft "Virtual Hard Disk Image Format Specification" 1.0 (2006), "Hard Disk
#   Footer Format", "Dynamic Disk Header Format", "Block Allocation Table and Data
#   Blocks", "Appendix: CHS Calculation"; field names follow it.
#   libyal/libvhdi "Virtual Hard Disk (VHD) image format": "Footer", "Dynamic disk
#   header", "Parent locator entry", "Block table", "Data blocks", "Data block sector
#   bitmap".
#   QEMU 7.2 block/vpc.c (vpc_open size rule, calculate_geometry, limits): the oracle.
"""VHD on-disk structures, named as in the specification, packed and unpacked."""

from __future__ import annotations

import struct
from dataclasses import dataclass

COOKIE = b"conectix"  # footer "Cookie"
DYNAMIC_COOKIE = b"cxsparse"  # dynamic disk header "Cookie"
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
SECTOR = 512

# "Disk Type"
DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4

FEATURES_RESERVED = 0x00000002  # "Features": bit 1 is reserved and must always be set
FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
NO_OFFSET = 0xFFFFFFFFFFFFFFFF  # "Data Offset" of a fixed disk; "Data Offset" of the header
BAT_UNUSED = 0xFFFFFFFF  # "Block Allocation Table": entry of a block not yet allocated
TIMESTAMP_BASE = 946684800  # "Time Stamp" counts seconds from 2000-01-01 00:00:00 UTC

# "Parent Locator Entries": "Platform Code" values (four ASCII characters, big-endian)
PLATFORM_NONE = 0x00000000
PLATFORM_WI2R = 0x57693272  # "Wi2r": deprecated relative Windows path
PLATFORM_WI2K = 0x5769326B  # "Wi2k": deprecated absolute Windows path
PLATFORM_W2RU = 0x57327275  # "W2ru": Windows path relative to the child, UTF-16 little-endian
PLATFORM_W2KU = 0x57326B75  # "W2ku": absolute Windows path, UTF-16 little-endian
PLATFORM_MAC = 0x4D616320  # "Mac ": Mac OS alias stored as a blob
PLATFORM_MACX = 0x4D616358  # "MacX": file URL, UTF-8 (RFC 2396)
LOCATOR_COUNT = 8  # the header holds eight "Parent Locator Entries" of 24 bytes
PARENT_NAME_SIZE = 512  # "Parent Unicode Name": 256 UTF-16 big-endian code units

DEFAULT_BLOCK_SIZE = 2 << 20  # the spec's default and what qemu writes

# QEMU block/vpc.c limits, checked on open and create.
MAX_GEOMETRY = 65535 * 16 * 255  # VHD_MAX_GEOMETRY: sectors of the largest CHS geometry
MAX_SECTORS = 0xFF000000  # VHD_MAX_SECTORS: 2040 GiB
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4  # INT_MAX / 4, beyond which qemu refuses the BAT
CHS_MAX = (65535, 16, 255)  # geometry written with force_size (qemu VHD_CHS_MAX_*)

# Creator applications whose disks are sized by "Current Size", not by the geometry
# (QEMU 7.2 vpc_open): Hyper-V, qemu with force_size, Disk2vhd, XenServer, XenConverter.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"tap\x00", b"CTXS")

# Footer ("Hard Disk Footer Format"), 85 bytes of fields then 427 reserved, big-endian.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_CHECKSUM_AT = 64
# Dynamic disk header, fields up to "Parent Unicode Name" (the locators follow).
_DYN = struct.Struct(">8sQQIIII16sII")
_DYN_CHECKSUM_AT = 36
_PARENT_NAME_AT = 64
_LOCATORS_AT = 576
# "Parent Locator Entry": Platform Code, Platform Data Space, Platform Data Length,
# Reserved, Platform Data Offset
_LOCATOR = struct.Struct(">IIIIQ")


def checksum(data: bytes, at: int) -> int:
    """One's complement of the byte sum of ``data`` without the 4-byte field at ``at``."""
    total = sum(data) - sum(data[at:at + 4])
    return ~total & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Footer:
    """The 512-byte "Hard Disk Footer" (also copied at offset 0 of dynamic disks)."""

    cookie: bytes
    features: int
    file_format_version: int
    data_offset: int
    time_stamp: int
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int

    @classmethod
    def unpack(cls, data: bytes) -> Footer:
        """Parse 512 bytes (the caller checks length; fields are not validated here)."""
        return cls(*_FOOTER.unpack_from(data, 0))

    def pack(self) -> bytes:
        """512 bytes with the checksum field as stored in ``self.checksum``."""
        head = _FOOTER.pack(
            self.cookie, self.features, self.file_format_version, self.data_offset,
            self.time_stamp, self.creator_application, self.creator_version,
            self.creator_host_os, self.original_size, self.current_size, self.cylinders,
            self.heads, self.sectors_per_track, self.disk_type, self.checksum,
            self.unique_id, self.saved_state)
        return head + bytes(FOOTER_SIZE - len(head))

    def sealed(self) -> bytes:
        """512 bytes with a freshly computed checksum."""
        raw = bytearray(self.pack())
        struct.pack_into(">I", raw, _CHECKSUM_AT, checksum(bytes(raw), _CHECKSUM_AT))
        return bytes(raw)

    @property
    def chs_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track

    def guest_size(self) -> int:
        """The disk size qemu 7.2 shows: by CHS geometry or by current_size (see above).

        Unknown creators are sized by geometry like Virtual PC; a disk at the largest
        geometry is sized by current_size whatever its creator, so it is not truncated.
        """
        sectors = self.chs_sectors
        if self.creator_application in CURRENT_SIZE_CREATORS or sectors == MAX_GEOMETRY:
            sectors = self.current_size // SECTOR
        return sectors * SECTOR


def footer_checksum_ok(data: bytes) -> bool:
    stored = struct.unpack_from(">I", data, _CHECKSUM_AT)[0]
    return bool(stored == checksum(data, _CHECKSUM_AT))


def dynamic_checksum_ok(data: bytes) -> bool:
    stored = struct.unpack_from(">I", data, _DYN_CHECKSUM_AT)[0]
    return bool(stored == checksum(data, _DYN_CHECKSUM_AT))


def platform_name(code: int) -> str:
    """A "Platform Code" as its four characters ("W2ru"), or hex when not printable."""
    raw = code.to_bytes(4, "big")
    text = raw.decode("ascii", "replace")
    return text if text.isprintable() else f"{code:#010x}"


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """One 24-byte "Parent Locator Entry" (differencing disks; all zero otherwise).

    "Platform Data Space" is sectors in the specification, but Virtual PC and Hyper-V
    store bytes there (VirtualBox VHD.cpp says so and writes bytes too).
    """

    platform_code: int = PLATFORM_NONE
    platform_data_space: int = 0
    platform_data_length: int = 0
    reserved: int = 0
    platform_data_offset: int = 0

    @classmethod
    def unpack(cls, data: bytes, at: int = 0) -> ParentLocator:
        return cls(*_LOCATOR.unpack_from(data, at))

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform_code, self.platform_data_space,
                             self.platform_data_length, self.reserved, self.platform_data_offset)


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """The 1024-byte "Dynamic Disk Header" (the parent fields are used by differencing disks)."""

    cookie: bytes
    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes = bytes(16)
    parent_time_stamp: int = 0
    reserved: int = 0
    parent_unicode_name: bytes = bytes(PARENT_NAME_SIZE)
    parent_locator_entries: tuple[ParentLocator, ...] = (ParentLocator(),) * LOCATOR_COUNT

    #: bytes of the header needed to read the fields checked before anything else
    LEADING = _DYN_CHECKSUM_AT

    @classmethod
    def unpack(cls, data: bytes) -> DynamicHeader:
        """Parse 1024 bytes (or at least LEADING bytes: missing fields read as zero)."""
        padded = bytes(data[:DYNAMIC_HEADER_SIZE]).ljust(DYNAMIC_HEADER_SIZE, b"\0")
        locators = tuple(ParentLocator.unpack(padded, _LOCATORS_AT + i * _LOCATOR.size)
                         for i in range(LOCATOR_COUNT))
        (cookie, data_offset, table_offset, header_version, max_table_entries, block_size,
         checksum, parent_unique_id, parent_time_stamp, reserved) = _DYN.unpack_from(padded, 0)
        return cls(cookie, data_offset, table_offset, header_version, max_table_entries,
                   block_size, checksum, parent_unique_id, parent_time_stamp, reserved,
                   padded[_PARENT_NAME_AT:_PARENT_NAME_AT + PARENT_NAME_SIZE], locators)

    def pack(self) -> bytes:
        head = _DYN.pack(self.cookie, self.data_offset, self.table_offset, self.header_version,
                         self.max_table_entries, self.block_size, self.checksum,
                         self.parent_unique_id, self.parent_time_stamp, self.reserved)
        name = self.parent_unicode_name[:PARENT_NAME_SIZE].ljust(PARENT_NAME_SIZE, b"\0")
        entries = list(self.parent_locator_entries[:LOCATOR_COUNT])
        entries += [ParentLocator()] * (LOCATOR_COUNT - len(entries))
        out = head + name + b"".join(e.pack() for e in entries)
        return out + bytes(DYNAMIC_HEADER_SIZE - len(out))

    @property
    def parent_name(self) -> str:
        """"Parent Unicode Name" decoded (UTF-16 big-endian, up to the first NUL)."""
        raw = self.parent_unicode_name
        end = next((i for i in range(0, len(raw) - 1, 2) if raw[i] == 0 and raw[i + 1] == 0),
                   len(raw) - len(raw) % 2)
        return raw[:end].decode("utf-16-be", "replace")

    def sealed(self) -> bytes:
        raw = bytearray(self.pack())
        struct.pack_into(">I", raw, _DYN_CHECKSUM_AT, checksum(bytes(raw), _DYN_CHECKSUM_AT))
        return bytes(raw)

    @property
    def bitmap_size(self) -> int:
        """Bytes of the sector bitmap in front of each block: one bit a sector, padded to 512."""
        return -(-(self.block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors_per_track) for ``total_sectors``, rounding down.

    The specification's "CHS Calculation" as QEMU 7.2 implements it (the bound is
    clamped first, and >= selects 255 sectors per track).
    """
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def geometry_for_size(size: int) -> tuple[int, tuple[int, int, int]]:
    """The disk size qemu-img creates for a requested ``size`` without force_size, and its CHS.

    The sector count grows until a geometry holds it (so 4 GiB becomes 4,295,467,008
    bytes); at the largest geometry the size is kept as asked. Raises ValueError past
    2040 GiB.
    """
    total = min(MAX_GEOMETRY, size // SECTOR)
    chs = (0, 0, 0)
    i = 0
    while total > chs[0] * chs[1] * chs[2]:
        chs = calculate_geometry(total + i)
        i += 1
    if chs[0] * chs[1] * chs[2] == MAX_GEOMETRY:
        sectors = size // SECTOR
        if sectors > MAX_SECTORS:
            raise ValueError("size beyond 2040 GiB")
    else:
        sectors = chs[0] * chs[1] * chs[2]
    return sectors * SECTOR, chs
