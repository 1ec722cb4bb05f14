"""The contract every on-disk format fulfils, and the registry that finds them.

A format subclass registers itself by being defined (``__init_subclass__``), declares
what it can do, recognises its own header (``probe``), opens readers and creates
writers. Readers describe one layer as extents; writers consume data and zeros.
"""

from __future__ import annotations

import abc
import errno
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import ImageNotFound, TruncatedImage, UnsupportedFeature
from ..model import Extent
from ..model.info import BackingRef, ImageInfo

if TYPE_CHECKING:  # annotations only: neither is needed to open an image or probe a file
    from pathlib import Path

    from ..model.check import CheckResult
    from ..model.inspection import FormatFacts


@dataclass(frozen=True, slots=True)
class Capabilities:
    read: bool = True
    write: bool = False
    backing: bool = False
    snapshots: bool = False
    compression: bool = False
    stream_write: bool = False


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How carefully to open. ``untrusted`` refuses every reference to another file."""

    untrusted: bool = False
    allow_data_file: bool = False
    snapshot: str | None = None
    #: replay a VHDX metadata log in memory instead of refusing the image (file untouched)
    replay_log: bool = False
    #: files the user named as parents of differencing images that identify their parent
    #: only by UUID (VDI); each is matched by UUID, never searched for
    parents: tuple[str, ...] = ()


__all__ = ["BackingRef", "ByteSource", "Capabilities", "Format", "HostFile", "ImageReader", "ImageWriter",
           "OpenOptions", "file_data_runs"]


class ByteSource(Protocol):
    """Positioned reads of one file: HostFile, or a capture of a stream (safety.stream)."""

    path: str
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pread_upto(self, offset: int, length: int) -> bytes: ...


class HostFile:
    """A read-only handle on a regular file with positioned reads that never go short silently."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ImageNotFound("no such file", path=self.path) from None
        except IsADirectoryError:
            raise ImageNotFound("is a directory, not an image file", path=self.path) from None
        except OSError as err:
            raise ImageNotFound(f"cannot open: {err.strerror}", path=self.path) from None
        st = os.fstat(self.fd)
        import stat as _stat

        if not _stat.S_ISREG(st.st_mode) and not _stat.S_ISBLK(st.st_mode):
            os.close(self.fd)
            raise ImageNotFound("not a regular file or block device", path=self.path)
        os.set_blocking(self.fd, True)
        self.size = st.st_size if _stat.S_ISREG(st.st_mode) else _blockdev_size(self.fd)
        self.allocated = st.st_blocks * 512
        self.ident = (st.st_dev, st.st_ino)

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; TruncatedImage if the file ends first."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise TruncatedImage(
                f"needs {length} bytes at offset {offset} but the file is {self.size} bytes",
                path=self.path, offset=offset,
            )
        return data

    def pread_upto(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at end of file)."""
        return os.pread(self.fd, length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; TruncatedImage if the file ends first."""
        got = os.preadv(self.fd, [buf], offset)
        while got < len(buf):
            more = os.preadv(self.fd, [buf[got:]], offset + got)
            if more <= 0:
                raise TruncatedImage(
                    f"data at offset {offset + got} lies past the end of the file",
                    path=self.path, offset=offset + got,
                )
            got += more

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def file_data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` runs of a host file from SEEK_DATA/SEEK_HOLE.

    Past the end of the file is a hole. File systems without SEEK_DATA report all data.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but hole from here on
                yield pos, end, False
                return
            yield pos, end, True  # no SEEK_DATA support: treat as data
            return
        data = min(data, end)
        if data > pos:
            yield pos, data, False
            pos = data
            if pos >= end:
                return
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        hole = min(hole, end)
        if hole <= pos:  # a racing writer; report the rest as data rather than loop
            hole = end
        yield pos, hole, True
        pos = hole


def _blockdev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class ImageReader(abc.ABC):
    """One layer of a disk: extents and the host bytes behind them."""

    format_name: ClassVar[str]
    path: str
    virtual_size: int
    #: codec name for compressed extents ("deflate", "zlib", "zstd"), see engine.codec
    codec: str | None = None
    backing: BackingRef | None = None

    @abc.abstractmethod
    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        """Extents of this layer alone covering ``[start, start+length)``, in order, depth 0."""

    @abc.abstractmethod
    def read_host(self, extent: Extent, buf: memoryview) -> None:
        """Fill ``buf`` with the stored bytes of a DATA extent (compressed: the stored unit)."""

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        """The file holding a DATA extent's bytes verbatim at ``extent.host_offset``.

        None when they are not stored plainly (compressed, or checked as they are read):
        the copy engine then reads through ``read_host``. Where a file is returned, the
        engine may map it and copy from it in the kernel, so only say so when a read
        would be exactly ``preadinto(buf, extent.host_offset)``. An extent that reads
        zero qualifies only when the file reads zero there too (a hole in the file).
        """
        return None

    @abc.abstractmethod
    def info(self) -> ImageInfo:
        """What ``vmforge info`` shows about this layer."""

    def check(self) -> CheckResult:
        """Metadata consistency, like ``qemu-img check``; formats without metadata refuse."""
        raise UnsupportedFeature("checks", path=self.path,
                                 detail=f"the {self.format_name} format has no metadata to check")

    def close(self) -> None:  # noqa: B027 - optional hook, most readers override it
        """Release file handles."""

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageWriter(abc.ABC):
    """Builds a new image. Ranges never written read as unallocated (backing or zeros).

    ``write`` receives data aligned to ``granularity`` (except at the end of the disk);
    the engine has already removed zero runs, so writers never scan for zeros.
    """

    path: str
    virtual_size: int
    granularity: int = 4096
    #: True when the writer wants every range in order (streamed formats)
    sequential: bool = False
    #: True when every unit must be stored compressed, even one that does not shrink
    #: (streamOptimized VMDK has no uncompressed grains); the engine then always compresses
    compress_always: bool = False
    #: True when ``write`` also takes a ``util.fileio.FileSpan`` (bytes still in a source
    #: file) and only slices it and hands it to ``pwrite_all``; the engine then copies
    #: verbatim source data with copy_file_range instead of through a buffer
    accepts_spans: bool = False

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Store ``data`` at guest ``offset``."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Mark a range as reading zero even if a backing file has data there."""
        self.write(offset, bytes(length))

    def compressor(self, level: int | None = None) -> Any:
        """A thread-safe callable ``bytes -> bytes | None`` for one unit, or None if not
        compressing; ``level`` overrides the format's default compression level."""
        return None

    def write_compressed(self, offset: int, stored: bytes) -> None:
        """Store one unit that ``compressor()`` produced."""
        raise TypeError(f"{type(self).__name__} does not store compressed data")

    def flush_before(self, offset: int) -> None:  # noqa: B027 - optional hook
        """Hint: nothing below guest ``offset`` will be written again (lets tables go to disk)."""

    def resize(self, new_size: int) -> None:
        """Change the virtual size of an existing image (``open_for_write``) before finish.

        Shrinking drops everything past ``new_size``; callers check for data first.
        """
        raise UnsupportedFeature(f"resizing {type(self).__name__.removesuffix('Writer')} images",
                                 path=self.path)

    def make_empty(self) -> None:
        """Drop everything this image stores, so every read falls through to its backing."""
        raise UnsupportedFeature(
            f"emptying {type(self).__name__.removesuffix('Writer')} images", path=self.path,
            hint="keep the overlay as it is (commit -d)")

    def set_backing(self, backing: BackingRef | None) -> None:
        """Point an existing image at another backing file (None: no backing file)."""
        raise UnsupportedFeature(
            f"changing the backing file of {type(self).__name__.removesuffix('Writer')} images",
            path=self.path)

    @abc.abstractmethod
    def finish(self) -> None:
        """Write remaining metadata and make the file complete."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close without completing; the caller removes the file."""


class Format(abc.ABC):
    """A disk format: recognises, opens and creates its files."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: formats a backing file of this format may have (None: any; differencing formats
    #: name their parent by an identity only a parent of the same format carries)
    backing_formats: ClassVar[tuple[str, ...] | None] = None
    #: -o options accepted by create, with a one-line description each
    create_options: ClassVar[Mapping[str, str]] = {}
    registry: ClassVar[dict[str, type[Format]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and "name" in cls.__dict__:
            Format.registry[cls.name] = cls

    @classmethod
    @abc.abstractmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        """Score 0..100 for how surely ``head`` (the first bytes of the file) is this format."""

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        """Read and validate only the headers (never guest data, never another file).

        ``src`` may be a capture of a stream that raises NeedBytes for ranges not seen
        (see vmforge.safety); implementations just read what they need, front to back.
        """
        raise UnsupportedFeature(f"inspecting {cls.name} images")

    @classmethod
    def probe_tail(cls, tail: bytes, file_size: int) -> int:
        """Score from the last 512 bytes, for formats recognised by a footer (fixed VHD)."""
        return 0

    @classmethod
    @abc.abstractmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        """Open one layer for reading."""

    @classmethod
    def create(
        cls,
        path: str,
        size: int,
        options: Mapping[str, str],
        backing: BackingRef | None = None,
        backing_size: int | None = None,
    ) -> ImageWriter:
        """Start a new image file at ``path``."""
        raise UnsupportedFeature(f"writing {cls.name} images")

    @classmethod
    def create_stream(cls, fd: int, size: int, options: Mapping[str, str]) -> ImageWriter:
        """Start a new image written strictly in order to ``fd`` (a pipe, socket or file).

        Only formats with ``capabilities.stream_write`` override this; the writer never
        seeks and leaves ``fd`` open.
        """
        raise UnsupportedFeature(
            f"writing {cls.name} images to standard output", detail="the format needs seeks",
            hint="give an output file name, or use -O raw or -O vmdk -o subformat=streamOptimized")

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        """Reopen an existing image to write guest data into it (``convert -n``)."""
        raise UnsupportedFeature(f"writing into an existing {cls.name} image",
                                 hint="convert into a new file instead of using -n")
