"""Keeping just enough of a stream to parse its headers, in one pass, in bounded memory.

A format's ``inspect`` reads a file front to back through positioned reads. Over a
stream that is not possible, so the capture keeps the first ``HEAD`` bytes, the last
``TAIL`` bytes and any range a parser asked for before the stream reached it; a read
of anything else raises NeedBytes, which tells the inspector what to keep next.
"""

from __future__ import annotations

from ..errors import TruncatedImage

#: bytes kept from the start: a qcow2 header cluster is up to 2 MiB; other headers we
#: know sit in the first MiB (ranges further on are asked for as the parsers find them)
HEAD = 2 << 20
#: bytes kept from the end: fixed VHD footer, streamOptimized footer and end marker
TAIL = 64 << 10
#: cap on all ranges asked for beyond the head (VMDK descriptor, VHDX metadata...)
MAX_CAPTURE = 8 << 20


class NeedBytes(Exception):
    """A parser read a range the capture does not hold (yet)."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(f"needs {length} bytes at {offset}")
        self.offset = offset
        self.length = length


class Capture:
    """What has been kept of a stream, readable like a HostFile.

    ``size`` is the stream's length once it has ended; before that it is ``UNKNOWN``,
    so that checks against the file size pass while ranges are being discovered.
    """

    UNKNOWN = 1 << 62

    def __init__(self, name: str) -> None:
        self.path = name
        self.size = self.UNKNOWN
        self.seen = 0  # bytes of the stream consumed so far
        self.head = bytearray()
        self.tail = bytearray()
        self.tail_start = 0
        self.ranges: dict[tuple[int, int], bytearray] = {}
        self.kept = 0

    # -- filling -----------------------------------------------------------------------------

    def want(self, offset: int, length: int) -> bool:
        """Ask to keep ``[offset, offset+length)``; False if it has passed or is too big."""
        if offset + length <= HEAD or (offset, length) in self.ranges:
            return True
        if offset < self.seen or self.kept + length > MAX_CAPTURE:
            return False
        self.ranges[(offset, length)] = bytearray()
        self.kept += length
        return True

    def consume(self, block: bytes) -> None:
        start, end = self.seen, self.seen + len(block)
        if start < HEAD:
            self.head += block[:HEAD - start]
        for (off, n), buf in self.ranges.items():
            lo, hi = max(off + len(buf), start), min(off + n, end)
            if lo < hi:
                buf += block[lo - start:hi - start]
        self.tail += block
        if len(self.tail) > TAIL:
            drop = len(self.tail) - TAIL
            del self.tail[:drop]
            self.tail_start += drop
        self.seen = end

    def complete(self, offset: int, length: int) -> bool:
        buf = self.ranges.get((offset, length))
        return buf is not None and len(buf) == length

    def end(self) -> None:
        self.size = self.seen

    # -- reading (the ByteSource protocol) --------------------------------------------------------

    def pread_upto(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise NeedBytes(offset, length)
        if self.size != self.UNKNOWN:
            length = max(0, min(length, self.size - offset))
        end = offset + length
        if length == 0:
            return b""
        if end <= len(self.head) and (end <= self.seen):
            return bytes(self.head[offset:end])
        if offset >= self.tail_start and end <= self.seen:
            return bytes(self.tail[offset - self.tail_start:end - self.tail_start])
        for (off, _), buf in self.ranges.items():
            if off <= offset and end <= off + len(buf):
                return bytes(buf[offset - off:end - off])
        raise NeedBytes(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        data = self.pread_upto(offset, length)
        if len(data) != length:
            raise TruncatedImage(f"needs {length} bytes at offset {offset} but the file is "
                                 f"{self.size} bytes", path=self.path, offset=offset)
        return data
