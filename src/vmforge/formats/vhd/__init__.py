"""vpc (VHD): Microsoft Virtual PC / Hyper-V disks, fixed, dynamic and differencing.

qemu-img calls the format "vpc"; "vhd" is accepted as an alias. Unlike qemu, vmforge
recognises a fixed VHD by its footer at the end of the file (``probe_tail``), and
reads and writes differencing disks (a backing file, in qemu-img's words), whose
parent must be a VHD of the same size. Existing disks are changed in place (resize,
commit, rebase) by the writers in inplace.py, which qemu-img cannot do for vpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from ...errors import OptionError
from ...util.lazy import LazyModule, lazy_package
from ..base import Capabilities, Format
from ..options import check_create_options, parse_flag

# the reader, writers and in-place editor (and the editor's numpy) load on first use:
# registering and probing need none of them
lazy_package(__name__, {"VpcReader": ".reader", "DifferencingWriter": ".writer",
                        "DynamicWriter": ".writer", "FixedWriter": ".writer"})

if TYPE_CHECKING:
    from ...model.inspection import FormatFacts
    from ..base import BackingRef, ByteSource, ImageReader, ImageWriter, OpenOptions
    from . import structs as S
    from .reader import VpcReader
    from .writer import DifferencingWriter, DynamicWriter, FixedWriter
else:  # the structures load with the first image opened or made, or a file that ends
    S = LazyModule(f"{__name__}.structs")  # in a footer cookie: probing reads COOKIE

#: "Hard Disk Footer Format": Cookie, "conectix", at the start of the footer (and of
#: the copy that starts a dynamic disk); structs.COOKIE, kept here for probing
COOKIE = b"conectix"

CREATE_OPTIONS = {
    "subformat": "dynamic (default) or fixed",
    "force_size": "on | off: keep the size exactly instead of rounding it up to a CHS geometry",
}


def plan_size(size: int, force_size: bool) -> tuple[int, tuple[int, int, int]]:
    """(disk size, CHS) that qemu-img 7.2 would create for a requested ``size``.

    Raises OptionError past 2040 GiB, with qemu-img's wording.
    """
    too_large = OptionError("The image size is too large for file format 'vpc'",
                            option="size", hint="VHD disks hold at most 2040 GiB")
    if force_size:
        if size // S.SECTOR > S.MAX_SECTORS:
            raise too_large
        return size, S.CHS_MAX
    try:
        return S.geometry_for_size(size)
    except ValueError:
        raise too_large from None


class VpcFormat(Format):
    name = "vpc"
    aliases = ("vhd",)
    backing_formats = ("vpc",)
    capabilities = Capabilities(read=True, write=True, backing=True)
    create_options = CREATE_OPTIONS

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        # A dynamic disk starts with a copy of its footer; fixed ones: see probe_tail.
        return 100 if head[:8] == COOKIE else 0

    @classmethod
    def probe_tail(cls, tail: bytes, file_size: int) -> int:
        """Score a fixed VHD from the last 512 bytes of the file.

        Raw disks can end in anything, so only a footer that is entirely consistent
        counts: cookie, checksum, fixed disk type, and a size that matches the file.
        """
        if tail[:8] != COOKIE or len(tail) != S.FOOTER_SIZE:
            return 0
        if not S.footer_checksum_ok(tail):
            return 0
        footer = S.Footer.unpack(tail)
        if footer.disk_type != S.DISK_TYPE_FIXED:
            return 0
        if footer.current_size + S.FOOTER_SIZE != file_size and \
                footer.original_size + S.FOOTER_SIZE != file_size:
            return 0
        return 90

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        from .reader import VpcReader

        return VpcReader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from .inspect import inspect_vpc

        return inspect_vpc(src)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        """A writer on an existing fixed, dynamic or differencing disk (see inplace.py)."""
        from .inplace import open_existing

        return open_existing(path)

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        check_create_options("vpc", options, CREATE_OPTIONS, backing, has_backing=True)
        if backing is not None:
            return _create_differencing(path, size, options, backing)
        sub = options.get("subformat", "dynamic")
        if sub not in ("dynamic", "fixed"):
            raise OptionError(f"invalid subformat '{sub}'", option="subformat",
                              hint="use dynamic or fixed")
        force = parse_flag("force_size", options.get("force_size", "off"))
        disk_size, chs = plan_size(size, force)
        from .writer import DynamicWriter, FixedWriter, make_footer

        if sub == "fixed":
            return FixedWriter(path, disk_size,
                               make_footer(disk_size, chs, S.DISK_TYPE_FIXED, force))
        return DynamicWriter(path, disk_size,
                             make_footer(disk_size, chs, S.DISK_TYPE_DYNAMIC, force))


def _create_differencing(path: str, size: int, options: Mapping[str, str],
                         backing: BackingRef) -> ImageWriter:
    """A differencing disk on ``backing`` (named relative to ``path``'s directory).

    The child takes the parent's size, geometry and sizing rule; a requested size is
    accepted only when it is the parent's or rounds up to it (a CHS-rounded parent made
    from the same source). Raises OptionError otherwise, or when the parent is no VHD.
    """
    if backing.format not in ("vpc", "vhd"):
        raise OptionError(f"a VHD differencing disk needs a VHD parent, not {backing.format}",
                          option="backing_fmt", hint="convert the parent to vpc first")
    if options.get("subformat", "dynamic") != "dynamic" or "force_size" in options:
        raise OptionError("a VHD with a backing file is a differencing disk: subformat and "
                          "force_size do not apply", option="subformat")
    from ...engine.chain import resolve_backing_path
    from .parent import link_to
    from .reader import VpcReader
    from .writer import DifferencingWriter, make_footer

    parent = VpcReader(resolve_backing_path(path, backing.filename))
    try:
        pfooter, psize = parent.footer, parent.virtual_size
    finally:
        parent.close()
    rounded = plan_size(size, False)[0] if size <= S.MAX_SECTORS * S.SECTOR else -1
    if size != psize and rounded != psize:
        raise OptionError(f"a VHD differencing disk has the size of its parent ({psize} "
                          f"bytes), not {size}", option="size",
                          hint="leave the size out to take the parent's")
    link = link_to(path, backing.filename, pfooter)
    footer = make_footer(psize, (pfooter.cylinders, pfooter.heads, pfooter.sectors_per_track),
                         S.DISK_TYPE_DIFFERENCING, False)
    # the child must show the parent's size: keep the parent's sizing rule (geometry for
    # "qemu"/"vpc " creators, current_size for Hyper-V and the others)
    by_current = pfooter.creator_application in S.CURRENT_SIZE_CREATORS or \
        pfooter.chs_sectors == S.MAX_GEOMETRY
    footer = replace(footer, creator_application=b"qem2" if by_current else b"qemu",
                     original_size=psize, current_size=psize)
    return DifferencingWriter(path, psize, footer, link)


__all__ = ["VpcFormat", "VpcReader", "DifferencingWriter", "DynamicWriter", "FixedWriter",
           "plan_size"]
