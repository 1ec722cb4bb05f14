"""Writing VMDK disks as qemu-img 7.2 lays them out: monolithicSparse (default),
monolithicFlat, twoGbMaxExtentSparse and twoGbMaxExtentFlat; streamOptimized is
stream_writer.py's.

Sparse extents follow qemu's vmdk_init_extent: header, embedded descriptor (sector 1,
20 sectors, only in a monolithic file), redundant grain directory and tables, grain
directory and tables, then grains from the first grain-aligned sector on, appended in
the order they are written. Grain tables stay in memory and are written, both copies,
by ``finish``.

Multi-file outputs name their extents by the final destination's name (out-flat.vmdk,
out-s001.vmdk, out-f001.vmdk, as qemu does) but are written under temporary names
registered with util.companions, so nothing appears under a final name half-written.

Grain tables are an ``array.array`` (util.tables), written little-endian straight from
memory: writing a VMDK needs no numpy.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from ...engine.chain import resolve_backing_path
from ...errors import ImageError, OptionError, OutputError, UnsupportedFeature
from ...util import tables
from ...util.companions import pending_output
from ...util.fileio import Coalesced, FileSpan, WriteData, byte_view, pwrite_all, zero_range
from ..base import BackingRef, ImageWriter, OpenOptions
from ..options import check_create_options, parse_flag
from . import structs as S
from .descriptor import NO_PARENT_CID, Descriptor, ExtentLine, qemu_ddb

SECTOR = S.SECTOR_SIZE
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")


@dataclass(frozen=True, slots=True)
class VmdkOptions:
    subformat: str
    adapter_type: str
    hwversion: str
    toolsversion: str
    zeroed_grain: bool

    @property
    def flat(self) -> bool:
        return self.subformat in ("monolithicFlat", "twoGbMaxExtentFlat")

    @property
    def split(self) -> bool:
        return self.subformat.startswith("twoGbMaxExtent")


def parse_options(options: Mapping[str, str], known: Mapping[str, str],
                  backing: BackingRef | None) -> VmdkOptions:
    """Validate -o options as qemu's vmdk_co_create_opts does. Raises OptionError."""
    check_create_options("vmdk", options, known, backing, has_backing=True)
    subformat = options.get("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise OptionError(f"invalid subformat '{subformat}'", option="subformat",
                          hint="one of " + ", ".join(SUBFORMATS))
    adapter = options.get("adapter_type", "ide")
    if adapter not in ADAPTER_TYPES:
        raise OptionError(f"invalid adapter_type '{adapter}'", option="adapter_type",
                          hint="one of " + ", ".join(ADAPTER_TYPES))
    compat6 = parse_flag("compat6", options.get("compat6", "off"))
    hwversion = options.get("hwversion", "undefined")
    if hwversion == "undefined":
        hwversion = "6" if compat6 else "4"
    elif compat6:
        raise OptionError("compat6 cannot be enabled with hwversion set", option="compat6")
    zeroed = parse_flag("zeroed_grain", options.get("zeroed_grain", "off"))
    backing_fmt = options.get("backing_fmt")
    if backing_fmt is not None and backing_fmt != "vmdk":
        raise OptionError("backing_file must be a vmdk image", option="backing_fmt")
    if backing is not None and backing.format not in (None, "vmdk"):
        raise OptionError("backing_file must be a vmdk image", option="backing_fmt")
    opts = VmdkOptions(subformat, adapter, hwversion, options.get("toolsversion", "2147483647"),
                       zeroed)
    if opts.flat and backing is not None:
        raise OptionError("Flat image can't have backing file", option="backing_file")
    if opts.flat and zeroed:
        raise OptionError("Flat image can't enable zeroed grain", option="zeroed_grain")
    return opts


def create_vmdk(path: str, size: int, options: Mapping[str, str],
                backing: BackingRef | None, known: Mapping[str, str]) -> ImageWriter:
    """The writer for ``-O vmdk`` with ``options`` (size already rounded to sectors)."""
    opts = parse_options(options, known, backing)
    if opts.subformat == "streamOptimized":
        if backing is not None:
            raise UnsupportedFeature("streamOptimized VMDK with a backing file", path=path,
                                     hint="use subformat=monolithicSparse for a delta")
        from .stream_writer import create_stream_optimized

        writer: ImageWriter = create_stream_optimized(path, size, options)
        return writer
    parent_cid = NO_PARENT_CID
    if backing is not None:
        parent_cid = _parent_cid(path, backing)
    return VmdkWriter(path, size, opts, backing, parent_cid)


def create_vmdk_stream(fd: int, size: int, options: Mapping[str, str],
                       known: Mapping[str, str]) -> ImageWriter:
    opts = parse_options(options, known, None)
    if opts.subformat != "streamOptimized":
        raise UnsupportedFeature(
            f"writing {opts.subformat} VMDK images to standard output",
            detail="only streamOptimized is written in order",
            hint="add -o subformat=streamOptimized or give an output file name")
    from .stream_writer import create_stream_optimized

    writer: ImageWriter = create_stream_optimized(fd, size, options)
    return writer


def _parent_cid(path: str, backing: BackingRef) -> int:
    """The parent's CID, read from the parent the delta will name (qemu reads it too)."""
    from .reader import VmdkReader

    target = resolve_backing_path(path, backing.filename)
    try:
        parent = VmdkReader(target, OpenOptions())
        try:
            return parent.descriptor.cid
        finally:
            parent.close()
    except ImageError as err:
        raise OptionError(f"Invalid backing file {backing.filename}: must be a readable vmdk "
                          f"image ({err.message})", option="backing_file") from None


def extent_names(dest: str, subformat: str, count: int) -> list[str]:
    """qemu's names for the extent files of ``dest`` (filename_decompose + the -flat,
    -sNNN, -fNNN suffixes before the last extension)."""
    base = os.path.basename(dest)
    dot = base.rfind(".")
    prefix, postfix = (base[:dot], base[dot:]) if dot >= 0 else (base, "")
    if subformat == "monolithicFlat":
        return [f"{prefix}-flat{postfix}"]
    letter = "f" if subformat == "twoGbMaxExtentFlat" else "s"
    return [f"{prefix}-{letter}{i:03d}{postfix}" for i in range(1, count + 1)]


class _SparseFile:
    """One hosted sparse extent being written (qemu's vmdk_init_extent layout)."""

    def __init__(self, fd: int, path: str, capacity: int, *, zeroed_grain: bool) -> None:
        self.fd = fd
        self.path = path
        self.capacity = capacity
        gd_sectors, gt_sectors, gt_count = S.sparse_layout(capacity)
        self.gd_sectors, self.gt_sectors, self.gt_count = gd_sectors, gt_sectors, gt_count
        rgd = S.DEFAULT_DESCRIPTOR_OFFSET + S.DEFAULT_DESCRIPTOR_SIZE
        gd = rgd + gd_sectors + gt_sectors * gt_count
        over_head = -(-(gd + gd_sectors + gt_sectors * gt_count) // S.DEFAULT_GRAIN_SECTORS) \
            * S.DEFAULT_GRAIN_SECTORS
        # qemu sets the descriptor fields in split extents too (the sectors stay zero)
        self.header = S.new_sparse_header(
            capacity, version=2 if zeroed_grain else 1,
            flags=S.FLAG_REDUNDANT_GRAIN_TABLE | (S.FLAG_ZEROED_GRAIN_GTE if zeroed_grain else 0),
            descriptor_offset=S.DEFAULT_DESCRIPTOR_OFFSET,
            descriptor_size=S.DEFAULT_DESCRIPTOR_SIZE, rgd_offset=rgd, gd_offset=gd,
            over_head=over_head)
        self.zeroed_grain = zeroed_grain
        self.gte = tables.zeros(4, gt_count * S.DEFAULT_NUM_GTES_PER_GT)
        self.next_sector = over_head
        self.grain = S.DEFAULT_GRAIN_SECTORS * SECTOR

    def _allocate(self, index: int) -> int:
        """Sector of a new grain for table entry ``index``, appended at the end."""
        if self.next_sector + S.DEFAULT_GRAIN_SECTORS > S.MAX_EXTENT_SECTORS:
            raise OutputError(f"{self.path}: the VMDK extent is full (grain offsets are "
                              "32-bit sector numbers)")
        sector = self.next_sector
        self.next_sector += S.DEFAULT_GRAIN_SECTORS
        self.gte[index] = sector
        return sector

    def write(self, offset: int, data: memoryview | FileSpan) -> None:
        # grains stored one after another (new ones are, in guest order) go out in one
        # call: per 64 KiB grain, the calls cost raw -> vmdk ~0.4 s of 1.1
        out = Coalesced(self.fd, data)
        done = 0
        while done < len(data):
            index, inner = divmod(offset + done, self.grain)
            n = min(len(data) - done, self.grain - inner)
            sector = self.gte[index]
            if sector in (S.GTE_UNALLOCATED, S.GTE_ZEROED):
                sector = self._allocate(index)
                if inner or n < self.grain:
                    # a new grain is written whole, zeros around the data (qemu's
                    # get_whole_cluster without a parent; the engine sends whole grains
                    # except the disk's last, so a delta never hides its parent here)
                    piece = bytearray(self.grain)
                    head = data[done:done + n]
                    piece[inner:inner + n] = head.tobytes() if isinstance(head, FileSpan) \
                        else head
                    pwrite_all(self.fd, piece, sector * SECTOR)
                    done += n
                    continue
            out.add(done, n, sector * SECTOR + inner)
            done += n
        out.flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: zeroed-grain GTEs for whole grains when enabled, else zero data."""
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, self.grain)
            n = min(end - offset, self.grain - inner)
            entry = self.gte[index]
            if self.zeroed_grain and inner == 0 and n == self.grain:
                if entry not in (S.GTE_UNALLOCATED, S.GTE_ZEROED):
                    zero_range(self.fd, entry * SECTOR, self.grain)
                self.gte[index] = S.GTE_ZEROED
            elif entry == S.GTE_ZEROED and self.zeroed_grain:
                pass  # already reads zero
            else:
                self.write(offset, memoryview(bytes(n)))
            offset += n

    def finish(self, descriptor: bytes | None) -> None:
        h = self.header
        gd_bytes = self.gd_sectors * SECTOR
        gts = tables.stored_view(self.gte, "little")
        gts_bytes = self.gt_count * self.gt_sectors * SECTOR
        for gd_at in (h.rgdOffset, h.gdOffset):
            first_gt = gd_at + self.gd_sectors
            gd = tables.series(4, first_gt, self.gt_count, self.gt_sectors)
            raw = tables.to_bytes(gd, "little")
            pwrite_all(self.fd, raw + bytes(gd_bytes - len(raw)), gd_at * SECTOR)
            if len(gts):
                pwrite_all(self.fd, gts, first_gt * SECTOR)
            if gts_bytes > len(gts):  # zeros to the end of the last table's sectors
                pwrite_all(self.fd, bytes(gts_bytes - len(gts)), first_gt * SECTOR + len(gts))
        pwrite_all(self.fd, h.pack(), 0)
        if descriptor is not None:
            pwrite_all(self.fd, descriptor, h.descriptorOffset * SECTOR)
        end = max(self.next_sector, h.overHead) * SECTOR
        if os.fstat(self.fd).st_size < end:
            os.ftruncate(self.fd, end)


class VmdkWriter(ImageWriter):
    """monolithicSparse, monolithicFlat, twoGbMaxExtentSparse or twoGbMaxExtentFlat."""
    accepts_spans = True  # write() only slices data and passes it to pwrite_all

    def __init__(self, path: str, size: int, opts: VmdkOptions, backing: BackingRef | None,
                 parent_cid: int) -> None:
        self.path = path
        self.virtual_size = size
        self.opts = opts
        self.fds: list[int] = []
        pending = pending_output(path)
        final = pending.dest if pending is not None else path
        # extent sizes: 2 GiB each but the last for twoGb*, one extent otherwise (none
        # for an empty flat or split disk, as qemu)
        self.split_bytes = S.SPLIT_EXTENT_BYTES if opts.split else max(size, 1)
        sizes = [min(self.split_bytes, size - start)
                 for start in range(0, size, self.split_bytes)]
        self.sparse: list[_SparseFile] = []
        self.flat_fds: list[int] = []
        lines: list[ExtentLine] = []
        try:
            if opts.subformat == "monolithicSparse":
                fd = self._open(path)
                self.sparse.append(_SparseFile(fd, path, size // SECTOR,
                                               zeroed_grain=opts.zeroed_grain))
                lines.append(ExtentLine("RW", size // SECTOR, "SPARSE", os.path.basename(final)))
                self.granularity = S.DEFAULT_GRAIN_SECTORS * SECTOR
            else:
                names = extent_names(final, opts.subformat, len(sizes))
                self.desc_fd = self._open(path)
                for name, ext_size in zip(names, sizes, strict=False):
                    tmp = pending.companion(name) if pending is not None else \
                        os.path.join(os.path.dirname(path), name)
                    fd = self._open(tmp)
                    if opts.flat:
                        os.ftruncate(fd, ext_size)
                        self.flat_fds.append(fd)
                        lines.append(ExtentLine("RW", ext_size // SECTOR, "FLAT", name, 0))
                    else:
                        self.sparse.append(_SparseFile(fd, tmp, ext_size // SECTOR,
                                                       zeroed_grain=opts.zeroed_grain))
                        lines.append(ExtentLine("RW", ext_size // SECTOR, "SPARSE", name))
                self.granularity = SECTOR if opts.flat else S.DEFAULT_GRAIN_SECTORS * SECTOR
        except OSError as err:
            self.abort()
            raise OutputError(f"{path}: cannot create the VMDK: {err.strerror}") from None
        except BaseException:
            self.abort()
            raise
        self.descriptor = Descriptor(
            create_type=opts.subformat, cid=secrets.randbits(32), parent_cid=parent_cid,
            parent_filename_hint=backing.filename if backing is not None else None,
            extents=lines, ddb=qemu_ddb(size, opts.adapter_type, opts.hwversion,
                                        opts.toolsversion))

    def _open(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None
        self.fds.append(fd)
        return fd

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(extent index, offset inside it, length) pieces of a guest range."""
        out = []
        end = offset + length
        while offset < end:
            idx = offset // self.split_bytes if self.opts.split else 0
            inner = offset - idx * self.split_bytes if self.opts.split else offset
            n = min(end - offset, (self.split_bytes - inner) if self.opts.split else end - offset)
            out.append((idx, inner, n))
            offset += n
        return out

    def write(self, offset: int, data: WriteData) -> None:
        view = byte_view(data)
        done = 0
        for idx, inner, n in self._pieces(offset, len(view)):
            piece = view[done:done + n]
            if self.opts.flat:
                pwrite_all(self.flat_fds[idx], piece, inner)
            else:
                self.sparse[idx].write(inner, piece)
            done += n

    def write_zeroes(self, offset: int, length: int) -> None:
        for idx, inner, n in self._pieces(offset, length):
            if self.opts.flat:
                zero_range(self.flat_fds[idx], inner, n)
            else:
                self.sparse[idx].write_zeroes(inner, n)

    def finish(self) -> None:
        text = self.descriptor.render().encode()
        try:
            if self.opts.subformat == "monolithicSparse":
                if len(text) > S.DEFAULT_DESCRIPTOR_SIZE * SECTOR:
                    raise OutputError(f"{self.path}: the descriptor does not fit in "
                                      f"{S.DEFAULT_DESCRIPTOR_SIZE} sectors")
                self.sparse[0].finish(text)
            else:
                for sp in self.sparse:
                    sp.finish(None)
                pwrite_all(self.desc_fd, text, 0)
                os.ftruncate(self.desc_fd, len(text))
        except OSError as err:
            raise OutputError(f"{self.path}: cannot write the VMDK: {err.strerror}") from None
        finally:
            self.abort()

    def abort(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)
        self.fds = []


__all__ = ["ADAPTER_TYPES", "SUBFORMATS", "VmdkWriter", "create_vmdk", "create_vmdk_stream",
           "extent_names"]
