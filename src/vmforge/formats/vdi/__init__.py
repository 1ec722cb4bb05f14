"""VDI: VirtualBox's disk format, version 1.1 with 1 MiB blocks, dynamic or static.

Differencing VDIs (a non-zero uuidLinkage) are read, which qemu-img cannot do. Their
parent is known only by UUID (VirtualBox finds it in its media registry), so vmforge
never searches for it: the user names candidate parents (``--parent FILE``, the
``parents`` argument of open_image), each is matched by its uuidCreate, and without a
match reading fails naming the UUID. Untrusted mode refuses them like any reference.
Existing images are resized in place (inplace.py; qemu-img cannot), differencing ones
only when no data block has to move.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import OptionError
from ...util.lazy import LazyModule, lazy_package
from ..base import Capabilities, Format
from ..options import check_create_options, parse_flag

# the reader and writer load on first use: registering and probing need neither
lazy_package(__name__, {"VdiReader": ".reader", "VdiWriter": ".writer"})

if TYPE_CHECKING:
    from ...model.inspection import FormatFacts
    from ..base import BackingRef, ByteSource, ImageReader, ImageWriter, OpenOptions
    from . import structs as S
    from .reader import VdiReader
    from .writer import VdiWriter
else:  # the structures load with the first image opened or made: probing reads the
    S = LazyModule(f"{__name__}.structs")  # signature below

#: VDICore.h VDI_IMAGE_SIGNATURE, little-endian at VDIPREHEADER.u32Signature (0x40)
#: (structs.SIGNATURE/SIGNATURE_OFFSET, kept here so that probing does not load structs)
SIGNATURE = 0xBEDA107F
SIGNATURE_OFFSET = 0x40

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
        end = SIGNATURE_OFFSET + 4
        if len(head) >= end and int.from_bytes(head[SIGNATURE_OFFSET:end], "little") == SIGNATURE:
            return 100
        return 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        from .reader import VdiReader

        return VdiReader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from ...model.inspection import FormatFacts, Reference
        from .reader import read_header

        h = read_header(src)
        facts = FormatFacts("vdi", h.cbDisk, subformat=S.TYPE_NAMES.get(h.u32Type, "unknown"),
                            details={"uuid": str(h.uuidCreate)})
        if h.uuidLinkage.int:
            # a UUID, not a name: VirtualBox finds the parent in its media registry
            facts.references.append(Reference("parent", "VDI header uuidLinkage",
                                              str(h.uuidLinkage)))
        return facts

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        check_create_options("vdi", options, CREATE_OPTIONS, backing)
        fixed = parse_flag("static", options.get("static", "off"))
        size = -(-size // S.SECTOR_SIZE) * S.SECTOR_SIZE  # qemu rounds up to whole sectors
        if size > S.MAX_DISK_SIZE:
            raise OptionError(f"unsupported VDI image size {size} (max supported is "
                              f"{S.MAX_DISK_SIZE})", option="size")
        from .writer import VdiWriter

        return VdiWriter(path, size, fixed=fixed)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        from .writer import VdiWriter

        return VdiWriter.open_existing(path)


__all__ = ["VdiFormat", "VdiReader", "VdiWriter"]
