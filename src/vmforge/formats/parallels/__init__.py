"""Parallels / ploop expandable images ("WithoutFreeSpace" and "WithouFreSpacExt"), read only.

A Parallels bundle (``disk.hdd/``) holds a DiskDescriptor.xml and ``*.hds`` data files;
each expanding ``.hds`` file is one of these images and is opened on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...util.lazy import LazyModule, lazy_package
from ..base import Capabilities, Format

# the reader loads on first use: registering and probing do not need it
lazy_package(__name__, {"ParallelsReader": ".reader"})

if TYPE_CHECKING:
    from ...model.inspection import FormatFacts
    from ..base import ByteSource, ImageReader, OpenOptions
    from . import structs as S
    from .reader import ParallelsReader
else:  # the header structure loads with the first image opened, or a file that
    S = LazyModule(f"{__name__}.structs")  # starts with a magic below

#: block/parallels.c HEADER_MAGIC and HEADER_MAGIC2 (structs.MAGIC_V1/V2, kept here
#: so that probing a file does not load structs)
MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")


class ParallelsFormat(Format):
    name = "parallels"
    capabilities = Capabilities(read=True, write=False)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        # qemu's parallels_probe: a full header with either magic and version 2
        return 100 if head[:16] in MAGICS and S.is_parallels(head) else 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        from .reader import ParallelsReader

        return ParallelsReader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from ...model.inspection import FormatFacts
        from .reader import read_header

        h = read_header(src)
        return FormatFacts("parallels", h.total_sectors * S.SECTOR_SIZE,
                           subformat="v2" if h.is_v2 else "v1",
                           details={"cluster-size": h.tracks * S.SECTOR_SIZE})


__all__ = ["ParallelsFormat", "ParallelsReader"]
