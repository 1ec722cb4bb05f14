"""streamOptimized VMDK written as a true stream: append-only, so it can go to a pipe.

Layout, in the order the bytes leave (every piece a whole number of 512-byte sectors)::

    sparse extent header (version 3, gdOffset = GD_AT_END)
    embedded descriptor, zero padding up to overHead (one grain)
    for each stored grain, in increasing LBA order:
        grain marker (lba, size) + zlib stream, padded to a sector
        ... and each grain table, behind a GT marker, as soon as the copy has moved
        past its 512 grains (flush_before), if it holds any grain
    GD marker + grain directory
    footer marker + a copy of the header with the real gdOffset
    end-of-stream marker

qemu-img cannot do this: its streamOptimized writer preallocates the tables at the
front of the file and writes no footer, so it needs a seekable file. All-zero grains
are not stored (their GT entry stays 0) and a grain table with no grain is not
written (its GD entry stays 0), as VirtualBox does; readers see zeros there.

Compression runs in the copy engine's worker threads (``compressor()`` and
``write_compressed()``); ``write()`` compresses in the calling thread and is only the
path for other callers. A failure before ``finish()`` leaves no end-of-stream marker,
so whoever reads the stream sees it is incomplete.
"""

from __future__ import annotations

import os
import secrets
import struct
from array import array
from collections.abc import Callable, Mapping

from ...engine.codec import compressor as codec_compressor
from ...errors import LimitExceeded, OptionError, OutputError
from ...util.companions import pending_output
from ...util.sink import AppendSink
from ..base import ImageWriter
from .descriptor import Descriptor, ExtentLine, qemu_ddb
from .structs import (
    DEFAULT_DESCRIPTOR_OFFSET,
    DEFAULT_GRAIN_SECTORS,
    DEFAULT_NUM_GTES_PER_GT,
    GD_AT_END,
    GRAIN_MARKER_SIZE,
    GTE_SIZE,
    MARKER_GD,
    MARKER_GT,
    MAX_EXTENT_SECTORS,
    MAX_L1_ENTRIES,
    SECTOR_SIZE,
    SparseExtentHeader,
    footer_sectors,
    metadata_marker,
    new_sparse_header,
)

# The stream layout is VMware's "Virtual Disk Format 5.0", "Stream-Optimized Compressed
# Sparse Extents"; the geometry is what VMware, VirtualBox and qemu all write.
SECTOR = SECTOR_SIZE
GRAIN_SECTORS = DEFAULT_GRAIN_SECTORS  # 64 KiB grains
GRAIN = GRAIN_SECTORS * SECTOR
NUM_GTES_PER_GT = DEFAULT_NUM_GTES_PER_GT
GT_SPAN = GRAIN * NUM_GTES_PER_GT  # guest bytes covered by one grain table (32 MiB)
GT_SECTORS = NUM_GTES_PER_GT * GTE_SIZE // SECTOR
#: GT and GD entries are 32-bit sector numbers: the stream cannot grow past them
MAX_FILE_SECTORS = MAX_EXTENT_SECTORS - 1
#: qemu refuses to open a grain directory longer than this ("L1 size too big"), 1 PiB
MAX_GT_COUNT = MAX_L1_ENTRIES
#: grain directory entries written per piece (the GD is kept sparse in memory)
_GD_PIECE = 1 << 16
# GrainMarker: lba, size, then the data. Packed here rather than with structs.grain_marker
# so the compressed data goes to the sink uncopied (one 64 KiB copy less per grain).
_GRAIN_MARKER = struct.Struct("<QI")
assert _GRAIN_MARKER.size == GRAIN_MARKER_SIZE


class StreamOptimizedWriter(ImageWriter):
    """Writes grains strictly in order to an append-only sink (file, pipe or socket)."""

    granularity = GRAIN
    sequential = True
    compress_always = True  # a streamOptimized extent has no uncompressed grains

    def __init__(self, sink: AppendSink, path: str, size: int, descriptor: bytes) -> None:
        self.sink = sink
        self.path = path
        self.virtual_size = size
        self.capacity = -(-size // SECTOR)
        grains = -(-self.capacity // GRAIN_SECTORS)
        self.gt_count = -(-grains // NUM_GTES_PER_GT)
        if self.gt_count > MAX_GT_COUNT:
            raise LimitExceeded(f"a streamOptimized VMDK of {size} bytes is too large",
                                limit=f"{MAX_GT_COUNT * GT_SPAN} bytes",
                                hint="split the disk or choose another format")
        desc_sectors = -(-len(descriptor) // SECTOR)
        # grains start on a grain boundary after the header and descriptor, as
        # VMware's and VirtualBox's streams do (overHead 128)
        self.overhead = -(-(1 + desc_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS
        self.desc_sectors = desc_sectors
        self.gd: dict[int, int] = {}  # only the tables written: memory follows the data
        self.gt = array("I", bytes(4 * NUM_GTES_PER_GT))
        self.gt_index = 0
        self.gt_used = False
        self.next_grain = 0  # no grain below this may be written any more
        self.partial: bytearray | None = None  # a grain being filled by write()
        self.partial_index = -1
        self._deflate = self.compressor()
        self.sink.write(self._header(GD_AT_END).pack())
        self.sink.write(descriptor)
        self.sink.write_zeros(self.overhead * SECTOR - self.sink.position)

    # -- the engine's interface -------------------------------------------------------------

    def compressor(self, level: int | None = None) -> Callable[[bytes | memoryview], bytes]:
        # zlib format (RFC 1950), as VMware and qemu's uncompress() expect; None is
        # the codec's measured default (within 3 % of qemu's zlib level 6 in size)
        return codec_compressor("zlib", level)

    def write_compressed(self, offset: int, stored: bytes) -> None:
        if offset % GRAIN:
            raise OutputError(f"internal error: compressed grain at unaligned offset {offset}")
        self._finish_partial_before(offset // GRAIN)
        self._emit_grain(offset // GRAIN, stored)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if end > self.virtual_size:
            raise OutputError(f"internal error: write past the end of the disk at {offset}")
        pos = offset
        while pos < end:
            index, within = divmod(pos, GRAIN)
            n = min(GRAIN - within, end - pos)
            piece = view[pos - offset:pos - offset + n]
            self._finish_partial_before(index)
            if n == GRAIN:
                self._emit_grain(index, self._compress(piece))
            else:
                self._fill_partial(index, within, piece)
            pos += n

    def write_zeroes(self, offset: int, length: int) -> None:
        # a stream has no backing file: a grain never written already reads as zeros
        pass

    def flush_before(self, offset: int) -> None:
        """Everything below ``offset`` is final: finish its grain and grain table."""
        if offset >= self.virtual_size:
            offset = self.gt_count * GT_SPAN
        self._finish_partial_before(offset // GRAIN)
        if offset >= (self.gt_index + 1) * GT_SPAN:
            self._emit_gt()
            self.gt_index = offset // GT_SPAN
        self.next_grain = max(self.next_grain, offset // GRAIN)

    def finish(self) -> None:
        self._finish_partial_before(self.gt_count * NUM_GTES_PER_GT)
        self._emit_gt()
        gd_sectors = -(-self.gt_count * GTE_SIZE // SECTOR)
        self.sink.write(metadata_marker(gd_sectors, MARKER_GD))
        gd_offset = self._sector_here()
        used = sorted(self.gd.items())  # tables are noted in order; sorted to be sure
        k = 0
        for first in range(0, self.gt_count, _GD_PIECE):
            piece = array("I", bytes(GTE_SIZE * min(_GD_PIECE, self.gt_count - first)))
            while k < len(used) and used[k][0] < first + len(piece):
                piece[used[k][0] - first] = used[k][1]
                k += 1
            self.sink.write(piece.tobytes())
        self.sink.pad_to(SECTOR)
        # footer marker, the header again with the real gdOffset, end-of-stream marker
        self.sink.write(footer_sectors(self._header(gd_offset)))
        self.sink.close()

    def abort(self) -> None:
        self.sink.discard()  # no footer, no end-of-stream marker: visibly incomplete

    # -- internals --------------------------------------------------------------------------

    def _compress(self, grain: bytes | bytearray | memoryview) -> bytes:
        return self._deflate(memoryview(grain))

    def _fill_partial(self, index: int, within: int, piece: memoryview) -> None:
        if index < self.next_grain:
            raise OutputError(f"internal error: grain {index} written out of order")
        if self.partial is None:
            self.partial = bytearray(GRAIN)  # zeros where nothing is written
            self.partial_index = index
        self.partial[within:within + len(piece)] = piece

    def _finish_partial_before(self, index: int) -> None:
        """Store the grain being filled if it lies below grain ``index``."""
        if self.partial is not None and self.partial_index < index:
            data, self.partial = self.partial, None
            self._emit_grain(self.partial_index, self._compress(data))

    def _emit_grain(self, index: int, stored: bytes) -> None:
        if index < self.next_grain:
            raise OutputError(f"internal error: grain {index} written out of order")
        gt_index = index // NUM_GTES_PER_GT
        if gt_index != self.gt_index:
            self._emit_gt()
            self.gt_index = gt_index
        sector = self._sector_here()
        self.gt[index % NUM_GTES_PER_GT] = sector
        self.gt_used = True
        self.sink.write(_GRAIN_MARKER.pack(index * GRAIN_SECTORS, len(stored)))
        self.sink.write(stored)  # not copied: a marker+data concatenation costs a copy
        self.sink.pad_to(SECTOR)
        self.next_grain = index + 1

    def _emit_gt(self) -> None:
        """Write the current grain table (if it holds a grain) and note it in the GD."""
        if not self.gt_used:
            return
        self.sink.write(metadata_marker(GT_SECTORS, MARKER_GT))
        self.gd[self.gt_index] = self._sector_here()
        self.sink.write(self.gt.tobytes())
        self.gt = array("I", bytes(4 * NUM_GTES_PER_GT))
        self.gt_used = False

    def _sector_here(self) -> int:
        sector = self.sink.position // SECTOR
        if sector > MAX_FILE_SECTORS:
            raise LimitExceeded("the stream passed 2 TiB, the most a VMDK sparse extent can address",
                                limit="2 TiB", hint="use -O qcow2 or split the disk")
        return sector

    def _header(self, gd_offset: int) -> SparseExtentHeader:
        # version 3: the only version VMware products accept for streamOptimized; the
        # flags are newline detection, compressed grains and markers (0x30001), no
        # redundant GD (a stream has none), as VMware's and VirtualBox's streams
        return new_sparse_header(
            self.capacity, version=3, compress=True,
            descriptor_offset=DEFAULT_DESCRIPTOR_OFFSET, descriptor_size=self.desc_sectors,
            gd_offset=gd_offset, over_head=self.overhead)


def create_stream_optimized(target: str | int, size: int, options: Mapping[str, str]
                            ) -> StreamOptimizedWriter:
    """A streamOptimized writer to ``target``: a new file's path, or an open descriptor.

    A descriptor (standard output: pipe, socket or file) is written in order and left
    open; a path is created (the caller's atomic-output temp name) and closed at the end.
    """
    capacity = -(-size // SECTOR)
    descriptor = _descriptor(capacity, _extent_name(target), options)
    if isinstance(target, int):
        sink = AppendSink(target)
        path = "-"
    else:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"{target}: cannot open for writing: {err.strerror}") from None
        sink = AppendSink(fd, owns_fd=True)
        path = target
    try:
        return StreamOptimizedWriter(sink, path, size, descriptor)
    except BaseException:
        sink.discard()
        raise


def stream_descriptor(size: int, extent_name: str, options: Mapping[str, str]) -> bytes:
    """The embedded descriptor of a stream of ``size`` bytes naming ``extent_name``.

    A caller that writes the same stream twice (an OVA to a pipe: one pass to learn the
    stream's size and digest, one to send it) passes these bytes to both writers, so the
    random CID, and with it every byte of the stream, is the same in both.
    """
    return _descriptor(-(-size // SECTOR), extent_name, options)


def _descriptor(capacity: int, name: str, options: Mapping[str, str]) -> bytes:
    """The embedded descriptor, laid out as qemu-img writes it, createType streamOptimized."""
    from . import CREATE_OPTIONS
    from .writer import parse_options

    # the same checks as every VMDK; the subformat is implied when the caller omits it
    opts = parse_options({"subformat": "streamOptimized", **options}, CREATE_OPTIONS, None)
    if opts.subformat != "streamOptimized":
        raise OptionError(f"subformat {opts.subformat} is not a stream", option="subformat",
                          hint="use subformat=streamOptimized")
    if opts.zeroed_grain:
        raise OptionError("zeroed_grain does not apply to streamOptimized",
                          option="zeroed_grain", hint="zero grains are simply not stored")
    ddb = qemu_ddb(capacity * SECTOR, opts.adapter_type, opts.hwversion, opts.toolsversion)
    desc = Descriptor(create_type="streamOptimized", cid=secrets.randbits(32),
                      extents=[ExtentLine("RW", capacity, "SPARSE", name)], ddb=ddb)
    return desc.render().encode()


def _extent_name(target: str | int) -> str:
    """The file name the descriptor gives its own extent: the final name of the file
    (the writer is handed atomic output's temporary name), as qemu-img writes the
    basename of the file it creates; a stream has no name, so a neutral one."""
    if isinstance(target, int):
        return "stream.vmdk"
    pending = pending_output(target)
    return os.path.basename(pending.dest if pending is not None else target)
