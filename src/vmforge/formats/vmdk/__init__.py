"""VMDK: VMware's virtual disk, every subformat qemu-img reads.

Read: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized,
vmfs/vmfsSparse, seSparse (through its descriptor) and deltas with a parent
(parentFileNameHint + parentCID). Write: monolithicSparse (default), monolithicFlat
and twoGbMaxExtent* here; streamOptimized in stream_writer.py. In place (resize,
commit, rebase): the same four subformats, in inplace.py and sparse_edit.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...util.lazy import LazyModule, lazy_package
from ..base import Capabilities, Format

# the reader and writers (and numpy) load on first use: registering and probing need none
lazy_package(__name__, {"VmdkReader": ".reader"})

if TYPE_CHECKING:
    from ...model.inspection import FormatFacts
    from ..base import BackingRef, ByteSource, ImageReader, ImageWriter, OpenOptions
    from . import structs as S
    from .reader import VmdkReader
else:  # the structures and the descriptor parser load when a file may be a VMDK:
    S = LazyModule(f"{__name__}.structs")  # probing first looks at the magics below

#: "KDMV" (magicNumber 0x564d444b, "Hosted Sparse Extent Header") and "COWD" (ESX
#: COWDisk_Header) start a sparse extent: structs.SPARSE_MAGIC and COWD_MAGIC
SPARSE_MAGICS = (b"KDMV", b"COWD")
#: the low half of QEMU's SESPARSE_CONST_HEADER_MAGIC 0xCAFEBABE, little-endian
SESPARSE_PREFIX = b"\xbe\xba\xfe\xca"
#: how a text descriptor can start: a comment, a line of spaces, or "version=" (the
#: parser, descriptor.looks_like_text_descriptor, loads and decides only then)
DESCRIPTOR_STARTS = (b"#", b" ", b"version=")

CREATE_OPTIONS = {
    "subformat": "monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | "
                 "twoGbMaxExtentFlat | streamOptimized",
    "adapter_type": "ide (default) | lsilogic | buslogic | legacyESX",
    "hwversion": "VMDK hardware version (ddb.virtualHWVersion, default 4)",
    "toolsversion": "VMware guest tools version (default 2147483647)",
    "compat6": "on | off: hardware version 6",
    "zeroed_grain": "on | off: store zero grains as grain table entries (sparse only)",
    "backing_file": "parent image (a VMDK); the new image is a delta",
    "backing_fmt": "must be vmdk",
}


class VmdkFormat(Format):
    name = "vmdk"
    backing_formats = ("vmdk",)
    capabilities = Capabilities(read=True, write=True, backing=True, compression=True,
                                stream_write=True)
    create_options = CREATE_OPTIONS

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        # qemu's vmdk_probe: a "KDMV"/"COWD" magic, or a text descriptor starting with
        # version=N. Unlike qemu (which calls it raw), a bare seSparse extent is
        # recognised by its 8-byte magic and read from its own header.
        if head[:4] in SPARSE_MAGICS:
            return 100
        if head[:4] == SESPARSE_PREFIX and S.is_sesparse(head):
            return 100
        if head.startswith(DESCRIPTOR_STARTS):
            from .descriptor import looks_like_text_descriptor

            return 100 if looks_like_text_descriptor(head) else 0
        return 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        from .reader import VmdkReader

        return VmdkReader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from .inspect import inspect_vmdk

        return inspect_vmdk(src)

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        from .writer import create_vmdk

        return create_vmdk(path, size, options, backing, CREATE_OPTIONS)

    @classmethod
    def create_stream(cls, fd: int, size: int, options: Mapping[str, str]) -> ImageWriter:
        from .writer import create_vmdk_stream

        return create_vmdk_stream(fd, size, options, CREATE_OPTIONS)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        """monolithicSparse, monolithicFlat or twoGbMaxExtent* opened to be changed in
        place (inplace.py); streamOptimized and the ESX types are refused."""
        from .inplace import open_vmdk_for_write

        return open_vmdk_for_write(path)


__all__ = ["VmdkFormat", "VmdkReader"]
