"""Writing metadata changes through the VHDX log ([MS-VHDX] 2.3), as the spec asks.

A change to the BAT, the metadata region or the region table goes first into a log
entry (2.3.1: header, data descriptors, data sectors, CRC-32C over the whole entry),
which is flushed, then to its place, which is flushed; a crash in between leaves an
entry that the next open replays (2.3.3), so the metadata is always either the old or
the new. The log is named by a fresh LogGuid in the headers only while entries are
written, and the headers go back to LogGuid zero once every entry is in place, so a
finished file opens read-only everywhere (qemu refuses a read-only open while a log
needs replay).

Each entry is atomic on its own: a change set larger than the log is written as
several entries, the BAT pages first and the metadata and region table pages last.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ...util.fileio import pwrite_all
from . import structs as S

PAGE = S.LOG_SECTOR_SIZE


def build_entry(sequence: int, log_guid: bytes, tail: int, pages: list[tuple[int, bytes]],
                flushed: int, last: int) -> bytes:
    """One log entry writing ``pages`` (4 KiB each at 4 KiB-aligned file offsets)."""
    count = len(pages)
    desc = S.descriptor_sectors(count)
    length = (desc + count) * PAGE
    head = bytearray(desc * PAGE)
    S.LOG_ENTRY_HEADER.pack_into(head, 0, S.LOG_ENTRY_SIGNATURE, 0, length, tail, sequence,
                                 count, 0, log_guid, flushed, last)
    data = bytearray()
    for i, (offset, page) in enumerate(pages):
        assert offset % PAGE == 0 and len(page) == PAGE
        # 2.3.1.3: the first 8 and last 4 bytes of the sector ride in the descriptor, the
        # data sector carries the sequence number in their place (a torn write shows)
        S.LOG_DESCRIPTOR.pack_into(head, S.LOG_ENTRY_HEADER.size + i * S.LOG_DESCRIPTOR.size,
                                   S.LOG_DESC_SIGNATURE, page[PAGE - 4:], page[:8], offset,
                                   sequence)
        data += S.LOG_DATA_SEQ_HIGH.pack(S.LOG_DATA_SIGNATURE, sequence >> 32)
        data += page[S.LOG_DATA_PAYLOAD]
        data += struct.pack("<I", sequence & 0xFFFFFFFF)
    return S.seal(bytes(head + data))


def per_entry(log_length: int) -> int:
    """The most data sectors one entry can carry in a log of ``log_length`` bytes."""
    sectors = log_length // PAGE
    n = sectors - 1
    while n > 0 and S.descriptor_sectors(n) + n > sectors:
        n -= 1
    return n


def write_through_log(fd: int, header: S.Header, pages: dict[int, bytes], log_guid: bytes,
                      set_log_guid: Callable[[bytes], None]) -> None:
    """Write ``pages`` (file offset -> 4 KiB) to the file by way of the log.

    ``set_log_guid`` rewrites both headers with the given LogGuid (and flushes); it is
    called with ``log_guid`` before the first entry and with zero after the last.
    """
    if not pages:
        return
    order = sorted(pages.items())
    room = per_entry(header.log_length)
    assert room > 0, "the editor refuses files without a log of at least 1 MiB"
    set_log_guid(log_guid)
    sequence = max(1, header.sequence_number)
    pos = tail = 0
    size = os.fstat(fd).st_size
    for first in range(0, len(order), room):
        batch = order[first:first + room]
        entry = build_entry(sequence, log_guid, tail, batch, size, size)
        if pos + len(entry) > header.log_length:  # every earlier entry is in place already
            pos = tail = 0
            entry = build_entry(sequence, log_guid, tail, batch, size, size)
        pwrite_all(fd, entry, header.log_offset + pos)
        os.fsync(fd)
        for offset, page in batch:
            pwrite_all(fd, page, offset)
        os.fsync(fd)
        pos += len(entry)
        sequence += 1
    set_log_guid(S.ZERO_GUID)


__all__ = ["build_entry", "per_entry", "write_through_log"]
