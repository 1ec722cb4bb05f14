# References:
#   VMware "Virtual Disk Format 5.0" technical note (VMDK): "Hosted Sparse Extent
#   Header" (SparseExtentHeader, field names used below), "Grain Directory and Grain
#   Table", "Stream-Optimized Compressed Sparse Extents" (Marker, GrainMarker,
#   MARKER_EOS/GT/GD/FOOTER, the footer and end-of-stream layout), "ESX Server Sparse
#   Extent Header" (COWDisk_Header).
#   libyal/libvmdk "VMWare Virtual Disk Format (VMDK)": "VMDK sparse extent header",
#   "COWD sparse extent header", "Markers", "Grain directory", "Grain table".
#   QEMU 7.2 block/vmdk.c (VMDK4Header, VMDK3Header, VMDKSESparseConstHeader, the
#   checks of vmdk_open_vmdk4/vmdk_add_extent, vmdk_init_extent's layout): the oracle.
"""VMDK on-disk binary structures, named as in VMware's specification.

The text descriptor lives in descriptor.py. Everything here is little-endian except
the four magic bytes, which the spec stores as the characters "KDMV" / "COWD".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR_SIZE = 512

# "magicNumber": 0x564d444b read little-endian, i.e. the bytes "KDMV" (VMDK 5.0, hosted
# sparse extent header); "COWD" starts an ESX (vmfsSparse) extent (COWDisk_Header).
SPARSE_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
# seSparse const header magic (QEMU block/vmdk.c SESPARSE_CONST_HEADER_MAGIC, 8 bytes LE)
SESPARSE_MAGIC = 0x00000000CAFEBABE
SESPARSE_VOLATILE_MAGIC = 0x00000000CAFECAFE  # SESPARSE_VOLATILE_HEADER_MAGIC
SESPARSE_VERSION = 0x0000000200000001  # the only version qemu 7.2 reads

# "flags" of SparseExtentHeader (VMDK 5.0 "Hosted Sparse Extent Header")
FLAG_VALID_NEWLINE_DETECTION = 1 << 0  # bit 0: the newline check characters are valid
FLAG_REDUNDANT_GRAIN_TABLE = 1 << 1  # bit 1: rgdOffset points at a redundant GD/GTs
FLAG_ZEROED_GRAIN_GTE = 1 << 2  # bit 2: a GTE of 1 means "grain reads zero" (qemu ZERO_GRAIN)
FLAG_COMPRESSED = 1 << 16  # bit 16: grains are compressed
FLAG_MARKERS = 1 << 17  # bit 17: the extent holds markers (stream-optimized)

# "compressAlgorithm"
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1  # RFC 1950 zlib streams, as VMware and qemu write them

# "gdOffset" of a stream-optimized header whose grain directory is known only at the
# end: the footer's copy of the header is authoritative (VMDK 5.0 "The Footer")
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# Grain table entry values (VMDK 5.0 "Grain Table Entry"; qemu VMDK_GTE_ZEROED)
GTE_UNALLOCATED = 0
GTE_ZEROED = 1  # only with FLAG_ZEROED_GRAIN_GTE

# Marker "type" of metadata markers (VMDK 5.0 "Stream-Optimized Compressed Sparse
# Extents"): a marker whose "size" is 0 is a metadata marker, otherwise a grain marker
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

# The newline detection characters stored after uncleanShutdown (VMDK 5.0)
SINGLE_END_LINE_CHAR = b"\n"
NON_END_LINE_CHAR = b" "
DOUBLE_END_LINE_CHARS = b"\r\n"
NEWLINE_CHECK = SINGLE_END_LINE_CHAR + NON_END_LINE_CHAR + DOUBLE_END_LINE_CHARS

# What VMware and qemu write (vmdk_init_extent): 64 KiB grains, 512 GTEs per GT,
# the embedded descriptor at sector 1, 20 sectors long.
DEFAULT_GRAIN_SECTORS = 128
DEFAULT_NUM_GTES_PER_GT = 512
DEFAULT_DESCRIPTOR_OFFSET = 1
DEFAULT_DESCRIPTOR_SIZE = 20
GTE_SIZE = 4

# QEMU block/vmdk.c limits (vmdk_add_extent, vmdk_open_vmdk4)
MAX_GRAIN_SECTORS = 0x200000  # "Invalid granularity, image may be corrupt"
MAX_L1_ENTRIES = 32 * 1024 * 1024  # "L1 size too big"
MAX_GTES_PER_GT = 512  # "L2 table size too big"
MAX_EXTENT_SECTORS = 1 << 32  # VMDK_EXTENT_MAX_SECTORS: grain offsets are 32-bit sectors
SPLIT_EXTENT_BYTES = 0x80000000  # twoGbMaxExtent*: every extent but the last is 2 GiB

# SparseExtentHeader after its 4-byte magicNumber ... up to compressAlgorithm; the rest of
# the 512-byte sector is pad.
_SPARSE = struct.Struct("<4sIIQQQQIQQQB4sH")
_COWD = struct.Struct("<4sIIIIIIIIII")
_MARKER = struct.Struct("<QII")
GRAIN_MARKER_SIZE = 12  # GrainMarker: lba (uint64) + size (uint32), then the data


@dataclass(frozen=True, slots=True)
class SparseExtentHeader:
    """The 512-byte header of a hosted sparse extent (monolithicSparse,
    twoGbMaxExtentSparse, streamOptimized). Sector counts are in 512-byte sectors."""

    magicNumber: bytes
    version: int
    flags: int
    capacity: int
    grainSize: int
    descriptorOffset: int
    descriptorSize: int
    numGTEsPerGT: int
    rgdOffset: int
    gdOffset: int
    overHead: int
    uncleanShutdown: int
    newlineChars: bytes  # singleEndLineChar, nonEndLineChar, doubleEndLineChar1/2
    compressAlgorithm: int

    SIZE = SECTOR_SIZE

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> SparseExtentHeader:
        """Parse the fields (no validation); ``data`` holds at least 79 bytes from ``offset``."""
        return cls(*_SPARSE.unpack_from(data, offset))

    def pack(self) -> bytes:
        """The full 512-byte sector."""
        head = _SPARSE.pack(
            self.magicNumber, self.version, self.flags, self.capacity, self.grainSize,
            self.descriptorOffset, self.descriptorSize, self.numGTEsPerGT, self.rgdOffset,
            self.gdOffset, self.overHead, self.uncleanShutdown, self.newlineChars,
            self.compressAlgorithm)
        return head + bytes(SECTOR_SIZE - len(head))

    @property
    def compressed(self) -> bool:
        return self.compressAlgorithm == COMPRESSION_DEFLATE

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def has_zeroed_grain(self) -> bool:
        return bool(self.flags & FLAG_ZEROED_GRAIN_GTE)

    @property
    def grain_bytes(self) -> int:
        return self.grainSize * SECTOR_SIZE

    @property
    def sectors_per_gt(self) -> int:
        """Guest sectors one grain table covers (qemu's l1_entry_sectors)."""
        return self.numGTEsPerGT * self.grainSize

    @property
    def gd_entries(self) -> int:
        """Entries of the grain directory (qemu's l1_size); 0 if the geometry is invalid."""
        span = self.sectors_per_gt
        return -(-self.capacity // span) if span else 0


def new_sparse_header(capacity: int, *, grain_sectors: int = DEFAULT_GRAIN_SECTORS,
                      version: int = 1, flags: int = 0, compress: bool = False,
                      descriptor_offset: int = 0, descriptor_size: int = 0,
                      rgd_offset: int = 0, gd_offset: int = 0,
                      over_head: int = 0) -> SparseExtentHeader:
    """A header with the newline check characters and qemu's GT size filled in."""
    return SparseExtentHeader(
        magicNumber=SPARSE_MAGIC, version=version,
        flags=flags | FLAG_VALID_NEWLINE_DETECTION | (
            FLAG_COMPRESSED | FLAG_MARKERS if compress else 0),
        capacity=capacity, grainSize=grain_sectors, descriptorOffset=descriptor_offset,
        descriptorSize=descriptor_size, numGTEsPerGT=DEFAULT_NUM_GTES_PER_GT,
        rgdOffset=rgd_offset, gdOffset=gd_offset, overHead=over_head, uncleanShutdown=0,
        newlineChars=NEWLINE_CHECK,
        compressAlgorithm=COMPRESSION_DEFLATE if compress else COMPRESSION_NONE)


@dataclass(frozen=True, slots=True)
class COWDHeader:
    """The ESX Server sparse extent header ("COWD", vmfsSparse), as qemu reads it
    (VMDK3Header): all counts in 512-byte sectors, 4096 GTEs per grain table."""

    magicNumber: bytes
    version: int
    flags: int
    numSectors: int  # capacity (qemu disk_sectors)
    grainSize: int  # qemu granularity
    gdOffset: int  # qemu l1dir_offset
    numGDEntries: int  # qemu l1dir_size
    freeSector: int  # qemu file_sectors
    cylinders: int
    heads: int
    sectors: int

    NUM_GTES_PER_GT = 4096

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> COWDHeader:
        return cls(*_COWD.unpack_from(data, offset))

    def pack(self) -> bytes:
        head = _COWD.pack(self.magicNumber, self.version, self.flags, self.numSectors,
                          self.grainSize, self.gdOffset, self.numGDEntries, self.freeSector,
                          self.cylinders, self.heads, self.sectors)
        return head + bytes(SECTOR_SIZE - len(head))


# seSparse const header (QEMU VMDKSESparseConstHeader): 26 uint64 then 304 pad bytes
_SESPARSE_FIELDS = (
    "magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
    "reserved1", "reserved2", "reserved3", "reserved4",
    "volatile_header_offset", "volatile_header_size", "journal_header_offset",
    "journal_header_size", "journal_offset", "journal_size", "grain_dir_offset",
    "grain_dir_size", "grain_tables_offset", "grain_tables_size", "free_bitmap_offset",
    "free_bitmap_size", "backmap_offset", "backmap_size", "grains_offset", "grains_size")
_SESPARSE = struct.Struct("<26Q")


@dataclass(frozen=True, slots=True)
class SESparseConstHeader:
    """ESXi's seSparse const header (not documented by VMware; QEMU's field names)."""

    magic: int
    version: int
    capacity: int
    grain_size: int
    grain_table_size: int
    flags: int
    reserved1: int
    reserved2: int
    reserved3: int
    reserved4: int
    volatile_header_offset: int
    volatile_header_size: int
    journal_header_offset: int
    journal_header_size: int
    journal_offset: int
    journal_size: int
    grain_dir_offset: int
    grain_dir_size: int
    grain_tables_offset: int
    grain_tables_size: int
    free_bitmap_offset: int
    free_bitmap_size: int
    backmap_offset: int
    backmap_size: int
    grains_offset: int
    grains_size: int
    pad_is_zero: bool = True

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> SESparseConstHeader:
        fields = dict(zip(_SESPARSE_FIELDS, _SESPARSE.unpack_from(data, 0), strict=True))
        pad = bytes(data[_SESPARSE.size:SECTOR_SIZE])
        return cls(**fields, pad_is_zero=not any(pad))


def is_sesparse(head: bytes | memoryview) -> bool:
    return len(head) >= 8 and int.from_bytes(head[:8], "little") == SESPARSE_MAGIC


@dataclass(frozen=True, slots=True)
class Marker:
    """A stream-optimized marker: ``val`` is the grain's LBA (grain marker, ``size`` > 0
    bytes of compressed data follow) or the metadata's sector count (``size`` 0, then
    ``type`` says EOS/GT/GD/FOOTER and the metadata starts in the next sector)."""

    val: int
    size: int
    type: int

    SIZE = 16

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> Marker:
        return cls(*_MARKER.unpack_from(data, offset))

    @property
    def is_metadata(self) -> bool:
        return self.size == 0


def grain_marker(lba: int, compressed: bytes | memoryview) -> bytes:
    """GrainMarker header (lba, size) followed by the data, padded to whole sectors."""
    body = struct.pack("<QI", lba, len(compressed)) + bytes(compressed)
    return body + bytes(-len(body) % SECTOR_SIZE)


def metadata_marker(num_sectors: int, marker_type: int) -> bytes:
    """A metadata marker sector (EOS, GT, GD or footer), padded to 512 bytes."""
    return _MARKER.pack(num_sectors, 0, marker_type) + bytes(SECTOR_SIZE - _MARKER.size)


def footer_sectors(header: SparseExtentHeader) -> bytes:
    """The last three sectors of a stream-optimized extent: footer marker, the footer
    (a copy of the header with the real gdOffset) and the end-of-stream marker."""
    return metadata_marker(1, MARKER_FOOTER) + header.pack() + metadata_marker(0, MARKER_EOS)


def sparse_layout(capacity: int, grain_sectors: int = DEFAULT_GRAIN_SECTORS,
                  gtes_per_gt: int = DEFAULT_NUM_GTES_PER_GT) -> tuple[int, int, int]:
    """(gd_sectors, gt_sectors, gt_count) of a sparse extent of ``capacity`` sectors,
    computed as qemu's vmdk_init_extent does."""
    grains = -(-capacity // grain_sectors)
    gt_sectors = -(-(gtes_per_gt * GTE_SIZE) // SECTOR_SIZE)
    gt_count = -(-grains // gtes_per_gt)
    gd_sectors = -(-(gt_count * GTE_SIZE) // SECTOR_SIZE)
    return gd_sectors, gt_sectors, gt_count
