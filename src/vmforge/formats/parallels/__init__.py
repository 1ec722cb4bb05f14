"""Parallels / ploop expandable images ("WithoutFreeSpace" and "WithouFreSpacExt"), read only.

A Parallels bundle (``disk.hdd/``) holds a DiskDescriptor.xml and ``*.hds`` data files;
each expanding ``.hds`` file is one of these images and is opened on its own.
"""

from __future__ import annotations

from ...model.inspection import FormatFacts
from ..base import ByteSource, Capabilities, Format, ImageReader, OpenOptions
from . import structs as S
from .reader import ParallelsReader, read_header


class ParallelsFormat(Format):
    name = "parallels"
    capabilities = Capabilities(read=True, write=False)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        # qemu's parallels_probe: a full header with either magic and version 2
        return 100 if S.is_parallels(head) else 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        return ParallelsReader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        h = read_header(src)
        return FormatFacts("parallels", h.total_sectors * S.SECTOR_SIZE,
                           subformat="v2" if h.is_v2 else "v1",
                           details={"cluster-size": h.tracks * S.SECTOR_SIZE})


__all__ = ["ParallelsFormat", "ParallelsReader"]
