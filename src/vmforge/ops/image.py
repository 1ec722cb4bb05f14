"""The Image: an opened disk with its whole backing chain, the object the API hands out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..engine.chain import MAX_CHAIN_DEPTH, Chain, open_chain
from ..engine.stream import ExtentStream
from ..formats import OpenOptions, open_layer
from ..formats.base import ImageReader
from ..model import Extent
from ..model.info import ImageInfo


class Image:
    """A virtual disk opened for reading: extents, bytes and information.

    Use as a context manager; ``read`` and ``iter_extents`` see through backing files.
    """

    def __init__(self, chain: Chain[ImageReader], options: OpenOptions) -> None:
        self.chain = chain
        self.options = options
        self._stream = ExtentStream(chain)

    @property
    def top(self) -> ImageReader:
        return self.chain.top

    @property
    def path(self) -> str:
        return self.chain.top.path

    @property
    def format(self) -> str:
        return self.chain.top.format_name

    @property
    def virtual_size(self) -> int:
        return self.chain.virtual_size

    def iter_extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents through the whole chain, merged like ``qemu-img map``."""
        return self.chain.iter_extents(start, length)

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes; reads past the end of the disk raise ValueError."""
        return self._stream.read(offset, length)

    def stream(self) -> ExtentStream:
        """A new byte reader over this image (one per thread)."""
        return ExtentStream(self.chain)

    def info(self) -> ImageInfo:
        return self.top.info()

    def chain_info(self) -> list[ImageInfo]:
        return [layer.info() for layer in self.chain.layers]

    def close(self) -> None:
        self.chain.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(
    path: str,
    fmt: str | None = None,
    *,
    untrusted: bool = False,
    allow_data_file: bool = False,
    snapshot: str | None = None,
    follow_backing: bool = True,
    max_depth: int = MAX_CHAIN_DEPTH,
    parents: Sequence[str] = (),
    replay_log: bool = False,
) -> Image:
    """Open a disk image and its backing chain.

    ``fmt`` skips probing (an explicit format always wins). ``untrusted`` refuses any
    reference to another file. ``parents`` names the parents of differencing images that
    store only their parent's UUID (VDI). Raises ImageError subclasses or BackingChainError.
    """
    options = OpenOptions(untrusted=untrusted, allow_data_file=allow_data_file and not untrusted,
                          parents=tuple(parents), replay_log=replay_log)
    top_options = OpenOptions(untrusted=options.untrusted, allow_data_file=options.allow_data_file,
                              snapshot=snapshot, parents=options.parents, replay_log=replay_log)
    first = [True]

    def opener(p: str, f: str | None) -> ImageReader:
        opts = top_options if first[0] else options
        first[0] = False
        return open_layer(p, f, opts)

    chain = open_chain(path, fmt, opener, untrusted=untrusted, follow_backing=follow_backing,
                       max_depth=max_depth)
    return Image(chain, options)
