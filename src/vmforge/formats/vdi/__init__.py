"""VDI: VirtualBox's disk format, version 1.1 with 1 MiB blocks, dynamic or static.

Differencing VDIs (a non-zero uuidLinkage) are refused with the parent's UUID named:
their parent is found through VirtualBox's media registry, not through the file, and
qemu-img refuses them as well.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...errors import OptionError
from ..base import BackingRef, Capabilities, Format, ImageReader, ImageWriter, OpenOptions
from ..options import check_create_options, parse_flag
from . import structs as S
from .reader import VdiReader
from .writer import VdiWriter

CREATE_OPTIONS = {
    "static": "on | off (default): preallocate every block (VirtualBox 'fixed' image)",
}


class VdiFormat(Format):
    name = "vdi"
    capabilities = Capabilities(read=True, write=True)
    create_options = CREATE_OPTIONS

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        # qemu's vdi_probe: the signature alone decides, so a damaged VDI is refused as
        # VDI rather than read as raw
        end = S.SIGNATURE_OFFSET + 4
        if len(head) >= end and int.from_bytes(head[S.SIGNATURE_OFFSET:end], "little") == S.SIGNATURE:
            return 100
        return 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        return VdiReader(path, options)

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        check_create_options("vdi", options, CREATE_OPTIONS, backing)
        fixed = parse_flag("static", options.get("static", "off"))
        size = -(-size // S.SECTOR_SIZE) * S.SECTOR_SIZE  # qemu rounds up to whole sectors
        if size > S.MAX_DISK_SIZE:
            raise OptionError(f"unsupported VDI image size {size} (max supported is "
                              f"{S.MAX_DISK_SIZE})", option="size")
        return VdiWriter(path, size, fixed=fixed)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        return VdiWriter.open_existing(path)


__all__ = ["VdiFormat", "VdiReader", "VdiWriter"]
