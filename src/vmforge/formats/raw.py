"""RAW: the disk bytes as a plain file, holes read as zeros.

Extents come from the file system (SEEK_DATA/SEEK_HOLE), so holes are never read and
a sparse 1 TiB file with 64 MiB of data costs the time of 64 MiB.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..errors import OptionError, OutputError, UnsupportedFeature
from ..model import Extent, ExtentKind, align_up
from ..model.info import ImageInfo
from ..util.fileio import WriteData, pwrite_all, write_zeros, zero_range
from ..util.sink import AppendSink
from .base import (
    BackingRef,
    ByteSource,
    Capabilities,
    Format,
    HostFile,
    ImageReader,
    ImageWriter,
    OpenOptions,
    file_data_runs,
)
from .options import check_create_options

if TYPE_CHECKING:  # the inspector's facts load with the inspector, not with every command
    from ..model.inspection import FormatFacts


class RawReader(ImageReader):
    format_name = "raw"

    def __init__(self, path: str) -> None:
        self.host = HostFile(path)
        self.path = path
        # qemu sees a raw file in whole 512-byte sectors; the tail reads as zeros
        self.virtual_size = align_up(self.host.size, 512)

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        file_end = self.host.size
        if end > file_end:
            yield from self._extents_in_file(start, min(end, file_end))
            tail = max(start, file_end)
            yield Extent(tail, end - tail, ExtentKind.ZERO, host_offset=tail)
            return
        yield from self._extents_in_file(start, end)

    def _extents_in_file(self, start: int, end: int) -> Iterator[Extent]:
        for s, e, is_data in file_data_runs(self.host.fd, start, end):
            kind = ExtentKind.DATA if is_data else ExtentKind.ZERO
            yield Extent(s, e - s, kind, host_offset=s)

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert extent.host_offset is not None
        self.host.preadinto(buf, extent.host_offset)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        return self.host  # a raw disk's zero extents are holes of this very file

    def info(self) -> ImageInfo:
        return ImageInfo(filename=self.path, format="raw", virtual_size=self.virtual_size,
                         actual_size=self.host.allocated)

    def close(self) -> None:
        self.host.close()


PREALLOC_MODES = ("off", "falloc", "full")


class RawWriter(ImageWriter):
    granularity = 512  # holes at sector granularity; -S decides how long a hole must be
    accepts_spans = True  # write() only slices data and passes it to pwrite_all

    def __init__(self, path: str, size: int, preallocation: str = "off",
                 existing: bool = False) -> None:
        self.path = path
        self.virtual_size = size
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if existing else os.O_CREAT | os.O_TRUNC)
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as err:
            raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None
        if existing:
            # a file or a block device: its current size is the disk size
            self.virtual_size = os.lseek(self.fd, 0, os.SEEK_END)
            return
        try:
            os.ftruncate(self.fd, size)
            if preallocation == "falloc" and size:
                os.posix_fallocate(self.fd, 0, size)
            elif preallocation == "full":
                write_zeros(self.fd, 0, size)
        except OSError as err:
            os.close(self.fd)
            raise OutputError(f"{path}: cannot size the file: {err.strerror}") from None

    def write(self, offset: int, data: WriteData) -> None:
        pwrite_all(self.fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        # a hole where the file system can punch one (block devices get zero bytes)
        zero_range(self.fd, offset, length)

    def resize(self, new_size: int) -> None:
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            raise UnsupportedFeature("resizing a block device", path=self.path,
                                     hint="resize the device itself (lvresize, ...)")
        os.ftruncate(self.fd, new_size)  # grown bytes read as zeros, a hole
        self.virtual_size = new_size

    def finish(self) -> None:
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RawStreamWriter(ImageWriter):
    """The disk's bytes, in order, to a pipe, socket or file: holes become zero bytes."""

    granularity = 512
    sequential = True

    def __init__(self, fd: int, size: int) -> None:
        self.path = "-"
        self.virtual_size = size
        self.sink = AppendSink(fd)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset < self.sink.position:
            raise OutputError(f"internal error: raw stream written out of order at {offset}")
        self.sink.write_zeros(offset - self.sink.position)
        self.sink.write(data)

    def write_zeroes(self, offset: int, length: int) -> None:
        pass  # every byte not written is a zero byte already

    def finish(self) -> None:
        self.sink.write_zeros(self.virtual_size - self.sink.position)
        self.sink.close()

    def abort(self) -> None:
        self.sink.discard()  # the consumer sees a short stream


class RawFormat(Format):
    name = "raw"
    aliases = ("img", "bin", "iso")
    capabilities = Capabilities(read=True, write=True, stream_write=True)
    create_options = {"preallocation": "off | falloc | full"}

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 1  # anything is raw, as a last resort

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        return RawReader(path)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from ..model.inspection import FormatFacts

        # qemu reports raw disks rounded up to whole sectors
        return FormatFacts("raw", align_up(src.size, 512))

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        check_create_options("raw", options, cls.create_options, backing)
        prealloc = options.get("preallocation", "off")
        if prealloc not in PREALLOC_MODES:
            raise OptionError(f"invalid preallocation '{prealloc}' for raw", option="preallocation",
                              hint="choose one of: " + ", ".join(PREALLOC_MODES))
        return RawWriter(path, size, prealloc)

    @classmethod
    def create_stream(cls, fd: int, size: int, options: Mapping[str, str]) -> ImageWriter:
        check_create_options("raw", options, cls.create_options)
        if options.get("preallocation", "off") != "off":
            raise OptionError("preallocation does not apply to a raw stream",
                              option="preallocation", hint="drop -o preallocation")
        return RawStreamWriter(fd, size)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        return RawWriter(path, 0, existing=True)
