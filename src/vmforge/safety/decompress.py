"""Compressed uploads (SECURITY.md row 25): expanded up to a cap, never past it.

A 1 MiB gzip file can hold a terabyte of zeros. ``expand`` reads a gzip, xz or zstd
stream and yields the expanded bytes in bounded pieces, stopping with LimitExceeded
the moment the output would pass ``cap``; ``expand_to_file`` writes them under a
temporary name and removes the partial file on any failure.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO, cast

from ..errors import CorruptImage, LimitExceeded

#: magic numbers: gzip (RFC 1952), xz (tukaani xz format 2.2), zstd (RFC 8878 frame)
MAGICS = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
READ = 1 << 20  # compressed bytes read at a time
PIECE = 4 << 20  # expanded bytes produced at a time, so memory stays bounded
HOLE = 64 << 10  # zero runs of this size become holes in an expanded file


def sniff(head: bytes) -> str | None:
    """The compression of a stream from its first bytes, or None when it is not one."""
    for magic, name in MAGICS.items():
        if head.startswith(magic):
            return name
    return None


def expand(stream: BinaryIO, cap: int, name: str = "<stream>",
           codec: str | None = None) -> Iterator[bytes]:
    """Expanded pieces of ``stream`` (gzip, xz or zstd); LimitExceeded past ``cap`` bytes."""
    first = stream.read(READ)
    codec = codec or sniff(first)
    if codec is None:
        raise CorruptImage(f"{name}: not gzip, xz or zstd data")
    total = 0
    for piece in _pieces(_chain(first, stream), codec, name):
        total += len(piece)
        if total > cap:
            raise LimitExceeded(f"{name}: expands past the limit of {cap} bytes", path=name,
                                limit="expanded size",
                                hint="raise the limit if the image is really that large")
        yield piece


def _chain(first: bytes, stream: BinaryIO) -> Iterator[bytes]:
    if first:
        yield first
    while chunk := stream.read(READ):
        yield chunk


def _pieces(chunks: Iterator[bytes], codec: str, name: str) -> Iterator[bytes]:
    if codec == "zstd":
        import zstandard

        # stream_reader bounds each read's output; a decompressobj would not
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, _Prefixed(chunks)), read_across_frames=True)
        try:
            while piece := reader.read(PIECE):
                yield piece
        except zstandard.ZstdError as err:
            raise CorruptImage(f"{name}: corrupt zstd data: {err}") from None
        return
    try:
        obj: zlib._Decompress | lzma.LZMADecompressor = (
            zlib.decompressobj(16 + zlib.MAX_WBITS) if codec == "gzip" else lzma.LZMADecompressor())
        for chunk in chunks:
            data = chunk
            while data:
                if isinstance(obj, lzma.LZMADecompressor):
                    out = obj.decompress(data, max_length=PIECE)
                    data = b""
                    yield out
                    while not obj.needs_input and not obj.eof:
                        yield obj.decompress(b"", max_length=PIECE)
                else:
                    out = obj.decompress(data, PIECE)
                    data = obj.unconsumed_tail
                    yield out
                    if obj.eof and obj.unused_data:  # concatenated gzip members
                        data = obj.unused_data
                        obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except (zlib.error, lzma.LZMAError) as err:
        raise CorruptImage(f"{name}: corrupt {codec} data: {err}") from None


class _Prefixed:
    """The chunks as a readable file object (what zstandard's stream_reader wants)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            more = next(self.chunks, b"")
            if not more:
                break
            self.buf += more
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out


def expand_to_file(stream: BinaryIO, dest: str, cap: int, name: str = "<stream>") -> int:
    """Write the expanded stream to ``dest``; returns its size. Nothing is left on failure."""
    tmp = f"{dest}.vmforge-partial"
    written = 0
    try:
        with open(tmp, "xb") as out:
            for piece in expand(stream, cap, name):
                view = memoryview(piece)
                for pos in range(0, len(view), HOLE):  # zero blocks stay holes
                    block = view[pos:pos + HOLE]
                    if block.tobytes().count(0) == len(block):
                        out.seek(len(block), os.SEEK_CUR)
                    else:
                        out.write(block)
                written += len(piece)
            out.truncate(written)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return written
