"""qcow2: QEMU's copy-on-write format, versions 2 and 3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import OptionError, UnsupportedFeature
from ...model import parse_size
from ...util.lazy import LazyModule, lazy_package
from ..base import Capabilities, Format
from ..options import check_create_options, parse_flag

# The reader and writer load on first use: registering and probing need neither.
lazy_package(__name__, {"Qcow2Reader": ".reader", "Qcow2Writer": ".writer",
                        "Qcow2Options": ".writer"})

if TYPE_CHECKING:
    from ...model.inspection import FormatFacts
    from ..base import BackingRef, ByteSource, ImageReader, ImageWriter, OpenOptions
    from . import structs as S
    from .reader import Qcow2Reader
    from .writer import Qcow2Options, Qcow2Writer
else:  # the structures load with the first image opened or made: probing reads MAGIC
    S = LazyModule(f"{__name__}.structs")

#: docs/interop/qcow2.txt "Header": bytes 0-3, the QCOW magic string "QFI\xfb"
#: (structs.MAGIC, kept here so that probing a file does not load structs)
MAGIC = b"QFI\xfb"

PREALLOC_MODES = ("off", "metadata", "falloc", "full")

CREATE_OPTIONS = {
    "compat": "0.10 (version 2) or 1.1 (version 3, default)",
    "cluster_size": "512 B to 2 MiB, a power of two (default 64K)",
    "compression_type": "zlib (default) or zstd (needs compat=1.1)",
    "preallocation": "off | metadata | falloc | full",
    "lazy_refcounts": "on | off (needs compat=1.1)",
    "refcount_bits": "1, 2, 4, 8, 16 (default), 32 or 64; other than 16 needs compat=1.1",
    "extended_l2": "on | off: 32 subclusters per cluster (compat=1.1, cluster_size >= 16K)",
    "backing_file": "file name of the backing image",
    "backing_fmt": "format of the backing image",
    "compression_level": "deflate 1-9 or zstd 1-22 (vmforge only)",
}


def check_size(size: int, opts: Qcow2Options, *, creating: bool) -> None:
    """Refuse sizes whose L1 table would exceed QEMU's 32 MiB cap (block/qcow2.h)."""
    cs = 1 << opts.cluster_bits
    entry = 16 if opts.extended_l2 else 8
    clusters = -(-size // cs)
    l2_tables = -(-clusters // (cs // entry))
    if l2_tables * 8 > S.MAX_L1_BYTES:
        where = " for file format 'qcow2'" if creating else ""
        raise OptionError(f"The image size is too large{where}", option="cluster_size",
                          hint="try using a larger cluster size")


def parse_options(options: Mapping[str, str]) -> Qcow2Options:
    """Validate qcow2 -o options the way qemu-img does; raises OptionError."""
    for key in options:
        if key in ("encryption", "encrypt.format") or key.startswith("encrypt."):
            raise UnsupportedFeature("encryption", hint="vmforge does not write encrypted qcow2")
        if key == "data_file" or key == "data_file_raw":
            raise UnsupportedFeature("external data file", detail="vmforge does not create them",
                                     hint="keep the data inside the qcow2 file")
    check_create_options("qcow2", options, CREATE_OPTIONS, has_backing=True)
    compat = options.get("compat", "1.1")
    versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
    if compat not in versions:
        raise OptionError(f"invalid compat '{compat}'", option="compat", hint="use 0.10 or 1.1")
    version = versions[compat]
    cluster_size = parse_size(options.get("cluster_size", "64K"))
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise OptionError(f"cluster size {cluster_size} is not a power of two between 512 and 2M",
                          option="cluster_size")
    cluster_bits = cluster_size.bit_length() - 1
    ctype_name = options.get("compression_type", "zlib")
    ctypes = {v: k for k, v in S.COMPRESSION_NAMES.items()}
    if ctype_name not in ctypes:
        raise OptionError(f"invalid compression_type '{ctype_name}'", option="compression_type",
                          hint="use zlib or zstd")
    ctype = ctypes[ctype_name]
    if ctype != S.COMPRESSION_ZLIB and version < 3:
        raise OptionError("compression_type=zstd needs compat=1.1", option="compression_type")
    prealloc = options.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise OptionError(f"invalid preallocation '{prealloc}'", option="preallocation",
                          hint="choose one of: " + ", ".join(PREALLOC_MODES))
    lazy = parse_flag("lazy_refcounts", options.get("lazy_refcounts", "off"))
    if lazy and version < 3:
        raise OptionError("lazy_refcounts needs compat=1.1", option="lazy_refcounts")
    try:
        refcount_bits = int(options.get("refcount_bits", "16"))
    except ValueError:
        raise OptionError("refcount_bits must be a number", option="refcount_bits") from None
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise OptionError("refcount_bits must be a power of two up to 64", option="refcount_bits")
    if refcount_bits != 16 and version < 3:
        raise OptionError("refcount_bits other than 16 needs compat=1.1", option="refcount_bits")
    ext_l2 = parse_flag("extended_l2", options.get("extended_l2", "off"))
    if ext_l2 and version < 3:
        raise OptionError("extended_l2 needs compat=1.1", option="extended_l2")
    if ext_l2 and cluster_size < 16384:
        raise OptionError("extended_l2 needs a cluster size of at least 16K", option="extended_l2")
    from .writer import Qcow2Options

    level = options.get("compression_level")
    try:
        clevel = int(level) if level is not None else None
    except ValueError:
        raise OptionError("compression_level must be a number", option="compression_level") from None
    return Qcow2Options(version=version, cluster_bits=cluster_bits, compression_type=ctype,
                        preallocation=prealloc, lazy_refcounts=lazy,
                        refcount_order=refcount_bits.bit_length() - 1, extended_l2=ext_l2,
                        compression_level=clevel)


class Qcow2Format(Format):
    name = "qcow2"
    aliases = ("qcow",)
    capabilities = Capabilities(read=True, write=True, backing=True, snapshots=True,
                                compression=True)
    create_options = CREATE_OPTIONS

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        # The magic alone decides: a QFI\xfb file with an unknown version must be refused
        # as qcow2 (naming the version), never read as raw (OSSA-2024-002).
        return 100 if head[:4] == MAGIC else 0

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> ImageReader:
        from .reader import Qcow2Reader

        return Qcow2Reader(path, options)

    @classmethod
    def inspect(cls, src: ByteSource) -> FormatFacts:
        from .inspect import inspect_qcow2

        return inspect_qcow2(src)

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str],
               backing: BackingRef | None = None, backing_size: int | None = None) -> ImageWriter:
        opts = parse_options({k: v for k, v in options.items()
                              if k not in ("backing_file", "backing_fmt")})
        check_size(size, opts, creating=True)
        from .writer import Qcow2Writer

        return Qcow2Writer(path, size, opts, backing)

    @classmethod
    def open_for_write(cls, path: str) -> ImageWriter:
        from .writer import Qcow2Writer

        return Qcow2Writer.open_existing(path)


__all__ = ["check_size", "Qcow2Format", "Qcow2Reader", "Qcow2Writer", "Qcow2Options", "parse_options"]
