"""Writing one sparse file into a gzip'd tar in GNU tar's "oldgnu" format, as GCE wants.

References: GNU tar manual, "Basic Tar Format" (struct posix_header and the GNU
extensions: magic "ustar " + version " \\0", typeflag 'S' GNUTYPE_SPARSE, the four
sparse entries in the header at offset 386, isextended at 482, realsize at 483, and
extension blocks of 21 entries with isextended at 504) and "Storing Sparse Files"
(old GNU format: the map lists data regions; a file that ends in a hole has a last
entry of zero length at the real size, which makes GNU tar truncate the extracted
file to that size). Numeric fields are octal, or base-256 (first byte 0x80) when a
value does not fit, as GNU tar writes sizes of 8 GiB and more.

Why our own writer: Python's ``tarfile`` reads old GNU sparse members but cannot
write them, and running GNU tar would need a full raw copy of the disk on the host
first. Here the sparse map comes straight from the image's extents, and the data is
streamed from the image into the gzip stream: no temporary copy at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from ..errors import OutputError, UsageError

BLOCK = 512
GNU_MAGIC = b"ustar  \x00"  # magic "ustar " then version " \0" (oldgnu_header)
GNUTYPE_SPARSE = b"S"
HEADER_SPARSE_ENTRIES = 4  # struct oldgnu_header sp[SPARSES_IN_OLDGNU_HEADER]
EXTENSION_SPARSE_ENTRIES = 21  # struct sparse_header sp[SPARSES_IN_SPARSE_HEADER]
_SPARSE_AT = 386
_ISEXTENDED_AT = 482
_REALSIZE_AT = 483
_EXT_ISEXTENDED_AT = 504
_CHUNK = 1 << 20

Region = tuple[int, int]  # (offset, numbytes) of a data region


def number(value: int, width: int) -> bytes:
    """A numeric field: octal digits and a NUL, or base-256 when too large for octal."""
    if value < 0:
        raise UsageError(f"a tar field cannot hold the negative value {value}")
    if value < 8 ** (width - 1):
        return f"{value:0{width - 1}o}".encode() + b"\0"
    if value >= 1 << (8 * (width - 1)):
        raise UsageError(f"tar field {value} does not fit in {width} bytes")
    return b"\x80" + value.to_bytes(width - 1, "big")


def _entries(regions: list[Region]) -> bytes:
    return b"".join(number(off, 12) + number(n, 12) for off, n in regions)


def sparse_headers(name: str, realsize: int, regions: list[Region], *, mtime: int | None = None,
                   mode: int = 0o644) -> bytes:
    """The member header and its extension blocks for a sparse file.

    ``regions`` are the data regions in order; a final zero-length region at
    ``realsize`` is added when the file ends in a hole (or has no data at all).
    """
    regions = list(regions)
    if not regions or regions[-1][0] + regions[-1][1] < realsize:
        regions.append((realsize, 0))
    stored = sum(n for _, n in regions)
    raw = name.encode()
    if len(raw) > 100:
        raise UsageError(f"tar member name {name!r} is over 100 bytes")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = number(mode, 8)
    h[108:116] = number(0, 8)
    h[116:124] = number(0, 8)
    h[124:136] = number(stored, 12)
    h[136:148] = number(int(time.time()) if mtime is None else mtime, 12)
    h[156:157] = GNUTYPE_SPARSE
    h[257:265] = GNU_MAGIC
    h[265:269] = b"root"
    h[297:301] = b"root"
    first, rest = regions[:HEADER_SPARSE_ENTRIES], regions[HEADER_SPARSE_ENTRIES:]
    h[_SPARSE_AT:_SPARSE_AT + 24 * len(first)] = _entries(first)
    h[_ISEXTENDED_AT] = 1 if rest else 0
    h[_REALSIZE_AT:_REALSIZE_AT + 12] = number(realsize, 12)
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    out = [bytes(h)]
    while rest:
        part, rest = rest[:EXTENSION_SPARSE_ENTRIES], rest[EXTENSION_SPARSE_ENTRIES:]
        ext = bytearray(BLOCK)
        ext[0:24 * len(part)] = _entries(part)
        ext[_EXT_ISEXTENDED_AT] = 1 if rest else 0
        out.append(bytes(ext))
    return b"".join(out)


def merge(regions: Iterable[Region]) -> list[Region]:
    """Adjacent data regions joined into one (fewer map entries)."""
    out: list[Region] = []
    for off, n in regions:
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


class _Sink:
    """Counts what goes into the (compressed) stream, for padding to whole blocks."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.count += len(data)


def write_sparse_member(out: BinaryIO, name: str, realsize: int, regions: list[Region],
                        chunks: Iterator[bytes]) -> None:
    """One sparse member: header, the data of ``regions`` (``chunks`` yields exactly
    those bytes, in order), padded to a whole block."""
    sink = _Sink(out)
    sink.write(sparse_headers(name, realsize, regions))
    start = sink.count
    for chunk in chunks:
        sink.write(chunk)
    stored = sink.count - start
    want = sum(n for _, n in regions)
    if stored != want:
        raise OutputError(f"sparse member {name} has {stored} bytes of data, its map says {want}")
    sink.write(bytes(-stored % BLOCK))


def end_of_archive(out: BinaryIO) -> None:
    """Two zero blocks end a tar."""
    out.write(bytes(2 * BLOCK))
