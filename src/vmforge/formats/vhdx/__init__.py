"""vhdx: Hyper-V's VHDX disks, fixed, dynamic and differencing (.avhdx).

qemu-img 7.2 reads and writes fixed and dynamic VHDX only; vmforge also reads and
writes differencing disks, checks their parent by its DataWriteGuid, and can replay a
dirty metadata log in memory (``--replay-log``) where qemu-img refuses a read-only open.
Existing files are changed in place by :class:`VhdxEditor` (inplace.py: resize, commit,
rebase, ``convert -n``), with metadata updates written through the log (journal.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import OptionError, VmforgeError
from ...model import parse_size
from ...util.lazy import LazyModule, lazy_package
from ..base import BackingRef, Capabilities, Format
from ..options import check_create_options, parse_flag

# the reader, writer and editor (and numpy) load on first use: registering and probing
# need none of them
lazy_package(__name__, {"VhdxEditor": ".inplace", "VhdxReader": ".reader",
                        "VhdxWriter": ".writer"})

if TYPE_CHECKING:
    from ...model.inspection import FormatFacts
    from ..base import ByteSource, ImageReader, ImageWriter, OpenOptions
    from . import structs as S
    from .inplace import VhdxEditor
    from .reader import VhdxReader
    from .writer import ParentInfo, VhdxWriter
else:  # the structures (and crc32c) load with the first image opened or made:
    S = LazyModule(f"{__name__}.structs")  # probing reads FILE_SIGNATURE

#: [MS-VHDX] 2.2.1 File Type Identifier: Signature "vhdxfile" at offset 0
#: (structs.FILE_SIGNATURE, kept here so that probing does not load structs)
FILE_SIGNATURE = b"vhdxfile"

CREATE_OPTIONS = {
    "subformat": "dynamic (default) or fixed",
    "block_size": "payload block size, 1M..256M, a power of two "
                  "(default as qemu: 8M up to 1G, 16M up to 100G, 32M up to 32T, then 64M)",
    "log_size": "log size, a multiple of 1M (default 1M)",
    "block_state_zero": "on (default) | off: unwritten blocks of a dynamic disk are ZERO "
                        "rather than NOT_PRESENT",
    "backing_file": "parent VHDX: makes a differencing disk (same as -b)",
    "backing_fmt": "format of the parent: vhdx",
}


def default_block_size(size: int) -> int:
    """QEMU 7.2's automatic block size (vhdx_co_create)."""
    if size > 32 * S.TiB:
        return 64 * S.MiB
    if size > 100 * S.GiB:
        return 32 * S.MiB
    if size > 1 * S.GiB:
        return 16 * S.MiB
    return 8 * S.MiB


def _size_option(options: Mapping[str, str], key: str) -> int | None:
    if key not in options:
        return None
    try:
        return parse_size(options[key])
    except VmforgeError:
        raise OptionError(f"invalid {key} '{options[key]}'", option=key,
                          hint="give a size such as 32M") from None


def _parent_info(path: str, backing: BackingRef, size: int) -> ParentInfo:
    from .writer import parent_info

    info, parent_size = parent_info(path, backing)
    if parent_size != size:
        raise OptionError(f"a differencing VHDX has its parent's size ({parent_size} "
                          f"bytes), not {size}", option="size", hint="leave the size out")
    return info


class VhdxFormat(Format):
    name = "vhdx"
    backing_formats = ("vhdx",)
    capabilities = Capabilities(read=True, write=True, backing=True)
    create_options = CREATE_OPTIONS

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if head[:8] == FILE_SIGNATURE else 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        from .reader import VhdxReader

        return VhdxReader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from .inspect import inspect_vhdx

        return inspect_vhdx(src)

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        opts = dict(options)
        check_create_options("vhdx", opts, CREATE_OPTIONS, backing, has_backing=True)
        if backing is None and opts.get("backing_file"):
            backing = BackingRef(opts["backing_file"], opts.get("backing_fmt"))
        sub = opts.get("subformat", "dynamic")
        if sub not in ("dynamic", "fixed"):
            raise OptionError(f"invalid subformat '{sub}'", option="subformat",
                              hint="use dynamic or fixed (a backing file makes a differencing disk)")
        if sub == "fixed" and backing is not None:
            raise OptionError("a differencing VHDX cannot be fixed", option="subformat")
        size = -(-size // 512) * 512  # whole logical sectors (2.6.2.2), as qemu rounds
        if size > S.MAX_VIRTUAL_SIZE:
            raise OptionError("Image size too large; max of 64TB", option="size")
        block_size = _size_option(opts, "block_size") or default_block_size(size)
        if block_size % S.MiB or block_size & (block_size - 1) or block_size > S.BLOCK_SIZE_MAX:
            raise OptionError(f"invalid block_size {block_size}", option="block_size",
                              hint="a power of two from 1M to 256M")
        log_size = _size_option(opts, "log_size")
        log_size = S.MiB if log_size is None else log_size
        if log_size < S.MiB or log_size % S.MiB or log_size >= 1 << 32:
            raise OptionError(f"invalid log_size {log_size}", option="log_size",
                              hint="a multiple of 1M below 4G")
        zero_state = parse_flag("block_state_zero", opts.get("block_state_zero", "on"))
        parent = _parent_info(path, backing, size) if backing is not None else None
        from .writer import VhdxWriter

        return VhdxWriter(path, size, block_size=block_size, log_size=log_size,
                          fixed=sub == "fixed", zero_state=zero_state, parent=parent)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        """An editor on the existing image: convert -n, resize, commit, rebase."""
        from .inplace import VhdxEditor

        return VhdxEditor.open_existing(path)


__all__ = ["VhdxEditor", "VhdxFormat", "VhdxReader", "VhdxWriter", "default_block_size"]
