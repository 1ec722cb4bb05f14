"""An append-only output: writes go to the end, in order, never seeking.

Streamed outputs (a VMDK stream, raw bytes to standard output) must work on pipes and
sockets, where there is no position to seek to. ``AppendSink`` gathers small pieces
(a grain marker, its compressed data, its padding) and hands them to the kernel in
one ``writev`` of about WRITE_PIECE bytes, so a 2 GiB stream is a few thousand system
calls rather than a few hundred thousand.
"""

from __future__ import annotations

import os
import select

from .fileio import WRITE_PIECE

#: zeros shared by every sink for padding and for holes in raw streams
_ZEROS = bytes(1 << 20)
#: Linux's IOV_MAX; writev refuses more pieces than this in one call
_IOV_MAX = 1024


class AppendSink:
    """Buffered, strictly sequential writes to ``fd``; ``position`` counts bytes accepted.

    ``owns_fd``: close ``fd`` in ``close()`` (a file the sink opened itself); a
    caller's descriptor (standard output) is only flushed, never closed.
    """

    def __init__(self, fd: int, *, owns_fd: bool = False, flush_at: int = WRITE_PIECE) -> None:
        self.fd = fd
        self.owns_fd = owns_fd
        self.flush_at = flush_at
        self.position = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; the caller may reuse a buffer it passed once this returns."""
        n = len(data)
        if not n:
            return
        self.position += n
        if not isinstance(data, bytes):
            if n >= self.flush_at:
                # large borrowed buffers (the engine's chunks) go out now, uncopied, in
                # WRITE_PIECE slices (see fileio: large single writes are slower)
                self.flush()
                view = memoryview(data).cast("B")
                for start in range(0, n, self.flush_at):
                    self._pending.append(view[start:start + self.flush_at])
                    self.flush()
                return
            data = bytes(data)
        self._pending.append(data)
        self._pending_bytes += n
        if self._pending_bytes >= self.flush_at or len(self._pending) >= _IOV_MAX:
            self.flush()

    def write_zeros(self, length: int) -> None:
        """Append ``length`` zero bytes."""
        while length > 0:
            n = min(length, len(_ZEROS))
            # slices of an immutable bytes object are safe to keep until the flush
            self.position += n
            self._pending.append(memoryview(_ZEROS)[:n])
            self._pending_bytes += n
            if self._pending_bytes >= self.flush_at or len(self._pending) >= _IOV_MAX:
                self.flush()
            length -= n

    def pad_to(self, multiple: int) -> None:
        """Append zeros up to the next multiple of ``multiple`` bytes."""
        self.write_zeros(-self.position % multiple)

    def flush(self) -> None:
        """Hand everything pending to the kernel (a short write is continued)."""
        pieces, self._pending, self._pending_bytes = self._pending, [], 0
        first = 0
        while first < len(pieces):
            try:
                done = os.writev(self.fd, pieces[first:first + _IOV_MAX])
            except BlockingIOError:
                # a descriptor someone else made non-blocking (ssh does, on its pipes):
                # wait until it takes more rather than fail or spin
                select.select([], [self.fd], [])
                continue
            # skip what went out; a short write (pipe full, signal) leaves a tail to retry
            while first < len(pieces) and done >= len(pieces[first]):
                done -= len(pieces[first])
                first += 1
            if done:
                pieces[first] = memoryview(pieces[first])[done:]

    def close(self) -> None:
        """Flush and, if the sink owns it, close the descriptor."""
        try:
            self.flush()
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop what is pending without writing it (the stream stays visibly incomplete)."""
        self._pending, self._pending_bytes = [], 0
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
