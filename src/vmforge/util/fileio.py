"""Positioned writes that never go short, zero writes, and hole punching."""

from __future__ import annotations

import ctypes
import os

FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02

# the C library is already loaded in this process; find_library would run ldconfig
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


#: Buffered writes go through the page cache far faster in pieces of this size than
#: in multi-megabyte calls: 1.4 GiB took 0.43 s of kernel time in 128 KiB pwrites and
#: 2.2-5.7 s in 1-4 MiB ones on our 2-core build machines (large-folio allocation).
WRITE_PIECE = 128 << 10


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite everything, in WRITE_PIECE pieces (short writes are retried)."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    while len(view):
        n = os.pwrite(fd, view[:WRITE_PIECE], offset)
        view = view[n:]
        offset += n


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write real zero bytes (for block devices and preallocation=full)."""
    chunk = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(chunk))
        pwrite_all(fd, memoryview(chunk)[:n], offset)
        offset += n
        length -= n


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False where the file system cannot."""
    if _fallocate is None or length <= 0:
        return False
    rc = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    return bool(rc == 0)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make a range read as zeros: a hole where possible, else zero bytes."""
    if not punch_hole(fd, offset, length):
        write_zeros(fd, offset, length)
