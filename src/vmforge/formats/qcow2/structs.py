# References:
#   QEMU docs/interop/qcow2.txt ("QCOW2 Image Format"): "Header", "Header extensions",
#   "Host cluster management" (refcounts), "Cluster mapping" (L1/L2, extended L2,
#   compressed cluster descriptor), "Snapshots".
"""qcow2 on-disk structures, named as in the specification, packed and unpacked."""

from __future__ import annotations

import functools
import struct
import sys
from array import array
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ...util import tables

if TYPE_CHECKING:  # numpy loads with unpack_refcounts (check, repair), not when reading
    import numpy as np

MAGIC = b"QFI\xfb"

# Header, common part (qcow2.txt "Header", bytes 0-71), big-endian.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# Version 3 additions (bytes 72-103).
_HEADER_V3 = struct.Struct(">QQQII")
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # without the optional compression_type byte + padding
V3_HEADER_LENGTH_COMPRESSION = 112  # with compression_type (byte 104) padded to 8

# incompatible_features (qcow2.txt "Header", bytes 72-79)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3  # compression_type field is valid (non-zlib)
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# compatible_features (bytes 80-87)
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features (bytes 88-95)
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Header extension types (qcow2.txt "Header extensions")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1/L2 entries (qcow2.txt "Cluster mapping")
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of a standard descriptor
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard descriptor, version 3: reads as zeros
L1E_RESERVED_MASK = 0x7F000000000001FF  # bits 0-8 and 56-62 must be zero
L2E_STD_RESERVED_MASK = 0x3F000000000001FE  # bits 1-8 and 56-61
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # refcount table entry: bits 9-63
EXTL2_SUBCLUSTERS = 32  # "Extended L2 Entries": 32 subclusters per cluster

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023  # qcow2.txt: backing_file_size must not exceed 1023
# QEMU's own caps (block/qcow2.h), used as our limits before allocating anything.
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOTS_TABLE = 64 << 20  # QCOW_MAX_SNAPSHOTS_SIZE


def compressed_fields(cluster_bits: int) -> tuple[int, int]:
    """(offset_mask, sector_shift) of a compressed cluster descriptor.

    qcow2.txt: with x = 62 - (cluster_bits - 8), bits 0..x-1 are the host byte offset
    and bits x..61 the number of additional 512-byte sectors.
    """
    x = 62 - (cluster_bits - 8)
    return (1 << x) - 1, x


@dataclass(frozen=True, slots=True)
class Header:
    """The qcow2 header (qcow2.txt "Header"); v2 fields default the v3 ones."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse the header; the caller has checked the magic and that ``data`` is long enough."""
        (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _HEADER_V2.unpack_from(data, 0)
        h = cls(version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
                nb_snap, snap_off)
        if version >= 3:
            incompat, compat, autoclear, rorder, hlen = _HEADER_V3.unpack_from(data, 72)
            ctype = data[104] if hlen > 104 and len(data) > 104 else COMPRESSION_ZLIB
            h = replace(h, incompatible_features=incompat, compatible_features=compat,
                        autoclear_features=autoclear, refcount_order=rorder, header_length=hlen,
                        compression_type=ctype)
        return h

    def pack(self) -> bytes:
        out = _HEADER_V2.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset)
        if self.version >= 3:
            out += _HEADER_V3.pack(self.incompatible_features, self.compatible_features,
                                   self.autoclear_features, self.refcount_order, self.header_length)
            if self.header_length > V3_HEADER_LENGTH:
                out += bytes([self.compression_type]) + bytes(self.header_length - 105)
        return out


@dataclass(frozen=True, slots=True)
class HeaderExtension:
    type: int
    data: bytes

    def pack(self) -> bytes:
        pad = (-len(self.data)) % 8
        return struct.pack(">II", self.type, len(self.data)) + self.data + bytes(pad)


# Snapshot table entry (qcow2.txt "Snapshots"), fixed part of 40 bytes.
_SNAPSHOT = struct.Struct(">QIHHIIQII")


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data: bytes = field(default=b"")

    @property
    def vm_state_size_large(self) -> int:
        if len(self.extra_data) >= 8:
            return int.from_bytes(self.extra_data[0:8], "big")
        return self.vm_state_size

    @property
    def disk_size(self) -> int | None:
        if len(self.extra_data) >= 16:
            return int.from_bytes(self.extra_data[8:16], "big")
        return None

    @property
    def icount(self) -> int | None:
        if len(self.extra_data) >= 24:
            value = int.from_bytes(self.extra_data[16:24], "big")
            return None if value == 0xFFFFFFFFFFFFFFFF else value
        return None

    @staticmethod
    def fixed_size() -> int:
        return _SNAPSHOT.size

    @classmethod
    def unpack_fixed(cls, data: bytes) -> tuple[int, int, int, int, int, int, int, int, int]:
        """(l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vmstate, extra_len)."""
        return _SNAPSHOT.unpack_from(data, 0)

    def pack(self) -> bytes:
        ident = self.id_str.encode()
        name = self.name.encode()
        out = _SNAPSHOT.pack(self.l1_table_offset, self.l1_size, len(ident), len(name),
                             self.date_sec, self.date_nsec, self.vm_clock_nsec,
                             self.vm_state_size, len(self.extra_data))
        out += self.extra_data + ident + name
        return out + bytes((-len(out)) % 8)


def pack_refcounts(counts: array[int] | np.ndarray[Any, Any], bits: int) -> bytes:
    """Refcount block bytes for ``counts`` at width ``bits`` (qcow2.txt "Host cluster management").

    ``counts`` is any C-contiguous buffer of host-order unsigned integers (an
    ``array.array`` or a numpy array); its length a multiple of 8 // bits for widths
    under 8. Widths of 8 and more are big-endian integers; narrower ones are packed
    into bytes starting at the least significant bit, as QEMU's get_refcount_ro0..2
    read them. Raises ValueError if a count does not fit in ``bits``.

    Works on byte planes (byte m of every count), each one C-level slice of the
    buffer's bytes, so a block costs the same few slices whatever its width and no
    numpy is needed.
    """
    view = memoryview(counts) if isinstance(counts, array) else counts.data
    size, raw = view.itemsize, view.tobytes()
    n = len(raw) // size
    # plane[m]: byte m (0: least significant) of every count
    planes = [raw[m::size] for m in range(size)]
    if sys.byteorder == "big":
        planes.reverse()
    width = max(bits // 8, 1)
    if any(plane.count(0) != n for plane in planes[width:]):
        raise ValueError(f"a refcount does not fit in {bits} bits")
    if bits >= 8:
        out = bytearray(n * width)
        for m, plane in enumerate(planes[:width]):  # big-endian: significance m at width-1-m
            out[width - 1 - m::width] = plane
        return bytes(out)
    low = planes[0]
    if low.translate(None, bytes(range(1 << bits))):  # any byte left is too big a count
        raise ValueError(f"a refcount does not fit in {bits} bits")
    per_byte = 8 // bits
    packed = 0
    for i in range(per_byte):  # count k*per_byte+i goes to bits i*bits.. of byte k
        packed |= int.from_bytes(low[i::per_byte], "little") << (i * bits)
    return packed.to_bytes(n // per_byte, "little")


def count_nonzero_refcounts(data: bytes, bits: int, n: int) -> int:
    """How many of the first ``n`` refcounts in block bytes ``data`` are not zero (the
    layout of pack_refcounts), with C-level passes only: no numpy."""
    if bits >= 8:
        width = bits // 8
        counts = array(tables.typecode(width), data[:n * width])  # byte order is moot
        return n - counts.count(0)
    per_byte = 8 // bits
    whole, rest = divmod(n, per_byte)
    fields = _nonzero_fields(bits)
    found = sum(data[:whole].translate(fields))
    if rest:
        found += fields[data[whole] & ((1 << rest * bits) - 1)]
    return found


@functools.cache
def _nonzero_fields(bits: int) -> bytes:
    """Per byte value: how many of its ``bits``-wide fields are not zero."""
    field = (1 << bits) - 1
    return bytes(sum(1 for k in range(0, 8, bits) if b >> k & field) for b in range(256))


def unpack_refcounts(data: bytes, bits: int) -> np.ndarray[Any, Any]:
    """Inverse of pack_refcounts."""
    import numpy as np

    if bits >= 8:
        return np.frombuffer(data, dtype=f">u{bits // 8}").astype(np.uint64)
    per_byte = 8 // bits
    raw = np.frombuffer(data, dtype=np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    return ((raw[:, None] >> shifts) & mask).reshape(-1).astype(np.uint64)
