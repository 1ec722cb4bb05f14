"""The region table and the metadata region of a VHDX file, validated before use."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ...errors import CorruptImage, LimitExceeded, TruncatedImage, UnsupportedFeature
from . import structs as S

#: a parent locator is a few hundred bytes; 64 KiB leaves room and bounds memory
MAX_LOCATOR_BYTES = 64 * S.KiB


@dataclass(frozen=True, slots=True)
class Metadata:
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83_data: bytes
    parent_locator: S.ParentLocator | None


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _one_region_table(host: Any, at: int,
                      log_region: tuple[int, int]) -> tuple[S.RegionEntry, S.RegionEntry]:
    path = host.path
    raw = host.pread(at, S.REGION_TABLE_SIZE)
    if not S.checksum_ok(raw):
        raise CorruptImage("VHDX region table has a bad CRC-32C", path=path, offset=at)
    sig, count, entries = S.unpack_region_table(raw)
    if sig != S.REGION_SIGNATURE:
        raise CorruptImage("VHDX region table has no 'regi' signature", path=path, offset=at)
    if count > S.MAX_TABLE_ENTRIES:
        raise LimitExceeded(f"VHDX region table has {count} entries (at most 2047)",
                            path=path, limit="region_entries")
    taken = [(0, S.HEADER_SECTION_SIZE)]
    if log_region[1]:
        taken.append(log_region)
    bat = meta = None
    for e in entries:
        where = (e.file_offset, e.length)
        if e.length == 0 or e.file_offset + e.length > host.size:
            raise TruncatedImage(f"VHDX region ({e.length} bytes at {e.file_offset}) lies past "
                                 f"the end of the file ({host.size} bytes)", path=path,
                                 offset=e.file_offset)
        if any(_overlaps(where, t) for t in taken):
            raise CorruptImage(f"VHDX region at {e.file_offset} ({e.length} bytes) overlaps "
                               "another region", path=path, offset=at)
        taken.append(where)
        if e.guid == S.BAT_GUID:
            if bat is not None:
                raise CorruptImage("VHDX region table names two BATs", path=path, offset=at)
            bat = e
        elif e.guid == S.METADATA_GUID:
            if meta is not None:
                raise CorruptImage("VHDX region table names two metadata regions", path=path,
                                   offset=at)
            meta = e
        elif e.required & S.REGION_REQUIRED:
            raise UnsupportedFeature("a required VHDX region of an unknown kind", path=path,
                                     detail=S.guid_str(e.guid))
    if bat is None or meta is None:
        raise CorruptImage("VHDX region table lacks the BAT or the metadata region",
                           path=path, offset=at)
    return bat, meta


def read_region_table(host: Any,
                      log_region: tuple[int, int]) -> tuple[S.RegionEntry, S.RegionEntry]:
    """(BAT, metadata) regions from the first valid region table copy (2.2.3).

    QEMU reads only the first copy; the second is used here when the first is damaged.
    """
    try:
        return _one_region_table(host, S.REGION_TABLE1_OFFSET, log_region)
    except (LimitExceeded, UnsupportedFeature):
        raise
    except CorruptImage as first:
        try:
            return _one_region_table(host, S.REGION_TABLE2_OFFSET, log_region)
        except CorruptImage:
            raise first from None


def _item(host: Any, region: S.RegionEntry, entry: S.MetadataEntry, size: int) -> bytes:
    if entry.length < size or entry.offset < S.METADATA_TABLE_SIZE or \
            entry.offset + entry.length > region.length:
        raise CorruptImage(f"VHDX metadata item {S.guid_str(entry.item_id)} ({entry.length} "
                           f"bytes at {entry.offset}) lies outside the metadata region",
                           path=host.path, offset=region.file_offset)
    return bytes(host.pread(region.file_offset + entry.offset, size))


def read_metadata(host: Any, region: S.RegionEntry) -> Metadata:
    """The known metadata items (2.6.2), each checked against the specification's ranges."""
    path = host.path
    table = host.pread(region.file_offset, min(S.METADATA_TABLE_SIZE, region.length))
    if len(table) < 32:
        raise CorruptImage("VHDX metadata region is too small", path=path,
                           offset=region.file_offset)
    table = table.ljust(S.METADATA_TABLE_SIZE, b"\0")
    sig, count, entries = S.unpack_metadata_table(table)
    if sig != S.METADATA_SIGNATURE:
        raise CorruptImage("VHDX metadata table has no 'metadata' signature", path=path,
                           offset=region.file_offset)
    if count > S.MAX_TABLE_ENTRIES:
        raise LimitExceeded(f"VHDX metadata table has {count} entries (at most 2047)",
                            path=path, limit="metadata_entries")
    known = {S.FILE_PARAMETERS_GUID: "file parameters", S.VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
             S.PAGE83_DATA_GUID: "page 83 data", S.LOGICAL_SECTOR_SIZE_GUID: "logical sector size",
             S.PHYSICAL_SECTOR_SIZE_GUID: "physical sector size",
             S.PARENT_LOCATOR_GUID: "parent locator"}
    found: dict[bytes, S.MetadataEntry] = {}
    for e in entries:
        if e.item_id in known:
            if e.item_id in found:
                raise CorruptImage(f"VHDX metadata names the {known[e.item_id]} twice",
                                   path=path, offset=region.file_offset)
            found[e.item_id] = e
        elif e.flags & S.META_IS_REQUIRED:
            raise UnsupportedFeature("a required VHDX metadata item of an unknown kind",
                                     path=path, detail=S.guid_str(e.item_id))
    for g, name in known.items():
        if g not in found and g != S.PARENT_LOCATOR_GUID:
            raise CorruptImage(f"VHDX metadata lacks the {name}", path=path,
                               offset=region.file_offset)
    block_size, bits = struct.unpack("<II", _item(host, region, found[S.FILE_PARAMETERS_GUID], 8))
    virtual_size = struct.unpack("<Q", _item(host, region, found[S.VIRTUAL_DISK_SIZE_GUID], 8))[0]
    page83 = _item(host, region, found[S.PAGE83_DATA_GUID], 16)
    logical = struct.unpack("<I", _item(host, region, found[S.LOGICAL_SECTOR_SIZE_GUID], 4))[0]
    physical = struct.unpack("<I", _item(host, region, found[S.PHYSICAL_SECTOR_SIZE_GUID], 4))[0]
    if not S.BLOCK_SIZE_MIN <= block_size <= S.BLOCK_SIZE_MAX or block_size & (block_size - 1):
        raise CorruptImage(f"VHDX block size {block_size} is not a power of two between 1 MiB "
                           "and 256 MiB", path=path, offset=region.file_offset)
    if logical not in S.LOGICAL_SECTOR_SIZES:
        raise CorruptImage(f"VHDX logical sector size {logical} is neither 512 nor 4096",
                           path=path, offset=region.file_offset)
    if physical not in S.PHYSICAL_SECTOR_SIZES:
        raise CorruptImage(f"VHDX physical sector size {physical} is neither 512 nor 4096",
                           path=path, offset=region.file_offset)
    if virtual_size > S.MAX_VIRTUAL_SIZE:
        raise LimitExceeded(f"VHDX virtual disk size {virtual_size} is beyond 64 TiB",
                            path=path, limit="virtual_size")
    if virtual_size % logical:
        raise CorruptImage(f"VHDX virtual disk size {virtual_size} is not a multiple of the "
                           f"{logical}-byte sector", path=path, offset=region.file_offset)
    has_parent = bool(bits & S.PARAMS_HAS_PARENT)
    locator = None
    if has_parent:
        entry = found.get(S.PARENT_LOCATOR_GUID)
        if entry is None:
            raise CorruptImage("VHDX has a parent but no parent locator", path=path,
                               offset=region.file_offset)
        if entry.length > MAX_LOCATOR_BYTES:
            raise LimitExceeded(f"VHDX parent locator of {entry.length} bytes", path=path,
                                limit="parent_locator")
        raw = _item(host, region, entry, entry.length)
        try:
            locator = S.ParentLocator.unpack(raw)
        except ValueError as err:
            raise CorruptImage(f"VHDX parent locator: {err}", path=path,
                               offset=region.file_offset + entry.offset) from None
        if locator.locator_type != S.VHDX_PARENT_LOCATOR_TYPE:
            raise UnsupportedFeature("a parent that is not a VHDX file", path=path,
                                     detail=S.guid_str(locator.locator_type))
        if "parent_linkage" not in locator.entries:
            raise CorruptImage("VHDX parent locator has no parent_linkage", path=path,
                               offset=region.file_offset + entry.offset)
    return Metadata(block_size, bool(bits & S.PARAMS_LEAVE_BLOCKS_ALLOCATED), has_parent,
                    virtual_size, logical, physical, page83, locator)
