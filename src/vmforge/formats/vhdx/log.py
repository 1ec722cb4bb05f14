"""The VHDX metadata log: finding the active sequence and replaying it on a private copy.

A VHDX whose header names a log (LogGuid not zero) may hold updates that reached the
log but not their final place: until they are replayed, the file's metadata is not
to be trusted ([MS-VHDX] 2.3.3). qemu-img refuses a read-only open then; vmforge does
too unless asked to replay, and replays into an :class:`OverlayFile`, a copy-on-write
view of the file held in memory, so the original file is never written.

The search follows QEMU 7.2 (block/vhdx-log.c): every 4 KiB log sector may start an
entry; an entry is valid when its header, checksum over the whole entry, descriptors
and data sectors agree; valid entries that follow each other with consecutive
sequence numbers form a sequence, and the sequence with the highest sequence number
is replayed in order.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass

from ...errors import CorruptImage, LimitExceeded, ReadOnlyImage, TruncatedImage
from ...util.fileio import pwrite_all, write_zeros
from ..base import HostFile
from . import structs as S

#: the log is read into memory to replay it; Hyper-V makes 1 MiB logs, qemu 1 MiB by default
MAX_LOG_LENGTH = 256 * S.MiB


@dataclass(frozen=True, slots=True)
class LogWrite:
    """One replayed descriptor: 4 KiB of ``data`` at ``file_offset``, or ``zero_length`` zeros."""

    file_offset: int
    data: bytes | None
    zero_length: int = 0


@dataclass(frozen=True, slots=True)
class LogEntry:
    header: S.LogEntryHeader
    position: int
    writes: tuple[LogWrite, ...]


class _Ring:
    """The log region as a circular buffer of 4 KiB sectors."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def get(self, pos: int, n: int) -> bytes:
        pos %= self.length
        if pos + n <= self.length:
            return self.data[pos:pos + n]
        first = self.data[pos:]
        return first + self.data[:n - len(first)]


def _parse_entry(ring: _Ring, pos: int, log_guid: bytes) -> LogEntry | None:
    """The valid entry starting at ``pos``, or None (any inconsistency makes it invalid)."""
    raw_head = ring.get(pos, S.LOG_ENTRY_HEADER.size)
    hdr = S.LogEntryHeader.unpack(raw_head)
    if hdr.signature != S.LOG_ENTRY_SIGNATURE or hdr.sequence_number == 0:
        return None
    if (hdr.entry_length == 0 or hdr.entry_length % S.LOG_SECTOR_SIZE
            or hdr.entry_length > ring.length or hdr.log_guid != log_guid):
        return None
    if hdr.descriptor_count * S.LOG_DESCRIPTOR.size > hdr.entry_length:
        return None
    total = hdr.entry_length // S.LOG_SECTOR_SIZE
    desc_sectors = S.descriptor_sectors(hdr.descriptor_count)
    if desc_sectors > total:
        return None
    entry = ring.get(pos, hdr.entry_length)
    if not S.checksum_ok(entry, 4):
        return None
    writes: list[LogWrite] = []
    data_at = desc_sectors * S.LOG_SECTOR_SIZE
    for i in range(hdr.descriptor_count):
        sig, trailing, leading, file_offset, seq = S.LOG_DESCRIPTOR.unpack_from(
            entry, S.LOG_ENTRY_HEADER.size + i * S.LOG_DESCRIPTOR.size)
        if seq != hdr.sequence_number or file_offset % S.LOG_SECTOR_SIZE:
            return None
        if sig == S.LOG_ZERO_SIGNATURE:
            zero_length = struct.unpack("<Q", leading)[0]
            if zero_length % S.LOG_SECTOR_SIZE:
                return None
            writes.append(LogWrite(file_offset, None, zero_length))
        elif sig == S.LOG_DESC_SIGNATURE:
            if data_at + S.LOG_SECTOR_SIZE > hdr.entry_length:
                return None
            sector = entry[data_at:data_at + S.LOG_SECTOR_SIZE]
            dsig, high = S.LOG_DATA_SEQ_HIGH.unpack_from(sector, 0)
            low = struct.unpack_from("<I", sector, S.LOG_SECTOR_SIZE - 4)[0]
            if dsig != S.LOG_DATA_SIGNATURE or (high << 32 | low) != seq:
                return None
            # 2.3.1.3: the first 8 and last 4 bytes of the sector live in the descriptor
            writes.append(LogWrite(file_offset, leading + sector[S.LOG_DATA_PAYLOAD] + trailing))
            data_at += S.LOG_SECTOR_SIZE
        else:
            return None
    return LogEntry(hdr, pos, tuple(writes))


def find_active_sequence(host: HostFile, header: S.Header) -> list[LogEntry]:
    """Entries of the log to replay, oldest first; empty when the log is empty.

    Raises CorruptImage for a log region that is misplaced or misshapen, as qemu does.
    """
    path = host.path
    if header.log_version != S.LOG_VERSION:
        raise CorruptImage(f"unsupported VHDX log version {header.log_version}", path=path,
                           offset=S.HEADER1_OFFSET)
    if header.log_offset < S.HEADER_SECTION_SIZE or header.log_offset % S.ALIGNMENT:
        raise CorruptImage(f"VHDX log offset {header.log_offset} is not a multiple of 1 MiB "
                           "past the header section", path=path)
    if header.log_guid == S.ZERO_GUID or header.log_length == 0:
        return []
    if header.log_length % S.ALIGNMENT:
        raise CorruptImage(f"VHDX log length {header.log_length} is not a multiple of 1 MiB",
                           path=path)
    if header.log_length > MAX_LOG_LENGTH:
        raise LimitExceeded(f"VHDX log of {header.log_length} bytes is beyond "
                            f"{MAX_LOG_LENGTH} bytes", path=path, limit="log_length")
    if header.log_offset + header.log_length > host.size:
        raise TruncatedImage(f"VHDX log ({header.log_length} bytes at {header.log_offset}) "
                             f"runs past the end of the file ({host.size} bytes)",
                             path=path, offset=header.log_offset)
    ring = _Ring(host.pread(header.log_offset, header.log_length))
    sectors = ring.length // S.LOG_SECTOR_SIZE
    entries: dict[int, LogEntry] = {}
    for i in range(sectors):
        pos = i * S.LOG_SECTOR_SIZE
        # an entry always starts with its signature: skip the parse for other sectors
        if ring.data[pos:pos + 4] != S.LOG_ENTRY_SIGNATURE:
            continue
        entry = _parse_entry(ring, pos, header.log_guid)
        if entry is not None:
            entries[pos] = entry

    def successor(e: LogEntry) -> LogEntry | None:
        nxt = entries.get((e.position + e.header.entry_length) % ring.length)
        if nxt is not None and nxt.header.sequence_number == e.header.sequence_number + 1:
            return nxt
        return None

    followers = {id(n) for e in entries.values() if (n := successor(e)) is not None}
    best: list[LogEntry] = []
    for start in entries.values():
        if id(start) in followers:
            continue  # not the first entry of its sequence
        seq = [start]
        while (n := successor(seq[-1])) is not None and len(seq) <= len(entries):
            seq.append(n)
        if not best or seq[-1].header.sequence_number > best[-1].header.sequence_number:
            best = seq
    return best


class OverlayFile:
    """A HostFile seen through replayed log writes, kept in memory (the file is not written).

    Offers the reading half of HostFile's interface. Data writes are whole 4 KiB
    pages; zero writes are ranges. Past the end of the real file reads zeros, up to
    the size the log gave the file.
    """

    def __init__(self, host: HostFile) -> None:
        self.host = host
        self.path = host.path
        self.size = host.size
        self.allocated = host.allocated
        self.ident = host.ident
        self.pages: dict[int, bytes] = {}
        self.zeros: list[tuple[int, int]] = []

    def apply(self, entries: list[LogEntry]) -> None:
        """Replay ``entries`` in order. Raises CorruptImage when the log says the file was cut."""
        for entry in entries:
            if entry.header.flushed_file_offset > self.host.size:
                raise TruncatedImage(
                    f"the VHDX log says the file was at least {entry.header.flushed_file_offset} "
                    f"bytes long, it is {self.host.size}: it has been truncated", path=self.path)
            for w in entry.writes:
                if w.data is not None:
                    self.pages[w.file_offset // S.LOG_SECTOR_SIZE] = w.data
                    end = w.file_offset + S.LOG_SECTOR_SIZE
                else:
                    end = w.file_offset + w.zero_length
                    first, last = w.file_offset // S.LOG_SECTOR_SIZE, end // S.LOG_SECTOR_SIZE
                    for page in [p for p in self.pages if first <= p < last]:
                        del self.pages[page]
                    if end > w.file_offset:
                        self.zeros.append((w.file_offset, end))
                self.size = max(self.size, end)
            self.size = max(self.size, entry.header.last_file_offset)

    def pread_upto(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        buf = bytearray(length)
        self._fill(memoryview(buf), offset)
        return bytes(buf)

    def pread(self, offset: int, length: int) -> bytes:
        data = self.pread_upto(offset, length)
        if len(data) != length:
            raise TruncatedImage(
                f"needs {length} bytes at offset {offset} but the file is {self.size} bytes",
                path=self.path, offset=offset)
        return data

    def preadinto(self, buf: memoryview, offset: int) -> None:
        if offset + len(buf) > self.size:
            raise TruncatedImage(f"data at offset {self.size} lies past the end of the file",
                                 path=self.path, offset=self.size)
        self._fill(buf, offset)

    def _fill(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        real = max(0, min(end, self.host.size) - offset)
        if real:
            self.host.preadinto(buf[:real], offset)
        if real < len(buf):
            buf[real:] = bytes(len(buf) - real)
        for zs, ze in self.zeros:
            lo, hi = max(zs, offset), min(ze, end)
            if lo < hi:
                buf[lo - offset:hi - offset] = bytes(hi - lo)
        if not self.pages:
            return
        first, last = offset // S.LOG_SECTOR_SIZE, (end - 1) // S.LOG_SECTOR_SIZE
        pages = range(first, last + 1) if last - first < len(self.pages) else sorted(
            p for p in self.pages if first <= p <= last)
        for page in pages:
            data = self.pages.get(page)
            if data is None:
                continue
            p_start = page * S.LOG_SECTOR_SIZE
            lo, hi = max(p_start, offset), min(p_start + S.LOG_SECTOR_SIZE, end)
            buf[lo - offset:hi - offset] = data[lo - p_start:hi - p_start]

    def close(self) -> None:
        self.host.close()


def replay_in_place(path: str) -> int:
    """Replay the log into the file itself (``check -r all``); the number of entries replayed.

    The explicit repair, as ``qemu-img check -r all`` does it: the logged writes go to
    their places, the file grows to the size the log records, then both headers are
    rewritten with an empty log (LogGuid zero) and higher sequence numbers. The
    DataWriteGuid is kept: replaying changes no guest data, so differencing children
    stay valid. Nothing is written when the log is empty.
    """
    from .reader import read_headers  # the reader imports this module

    host = HostFile(path)
    try:
        header = read_headers(host)
        entries = find_active_sequence(host, header)
        if not entries:
            return 0
        check = OverlayFile(host)
        check.apply(entries)  # refuses a truncated file before anything is written
    finally:
        host.close()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise ReadOnlyImage(f"cannot open for writing: {err.strerror}", path=path) from None
    try:
        size = os.fstat(fd).st_size
        for entry in entries:
            for w in entry.writes:
                if w.data is not None:
                    pwrite_all(fd, w.data, w.file_offset)
                else:
                    write_zeros(fd, w.file_offset, w.zero_length)
            last = entry.header.last_file_offset
            if last > size:
                size = -(-last // S.ALIGNMENT) * S.ALIGNMENT
                os.ftruncate(fd, size)
        os.fsync(fd)
        # 2.2.2.1: update the non-current header first, then the other, each with a
        # sequence number above the current one and a new FileWriteGuid
        session = uuid.uuid4().bytes_le
        current = header.sequence_number
        slots = (S.HEADER1_OFFSET, S.HEADER2_OFFSET)
        with open(path, "rb") as f:
            f.seek(S.HEADER1_OFFSET)
            first_is_current = S.Header.unpack(f.read(S.HEADER_SIZE)) == header
        order = (slots[1], slots[0]) if first_is_current else slots
        for n, at in enumerate(order, start=1):
            new = S.Header(S.HEADER_SIGNATURE, 0, current + n, session, header.data_write_guid,
                           S.ZERO_GUID, S.LOG_VERSION, S.HEADER_VERSION, header.log_length,
                           header.log_offset)
            pwrite_all(fd, new.sealed(), at)
            os.fsync(fd)
    finally:
        os.close(fd)
    return len(entries)
