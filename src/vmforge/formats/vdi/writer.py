"""Writing VDI images, dynamic (blocks appended as they arrive) or static (preallocated).

The layout is qemu's (block/vdi.c vdi_co_do_create): a 512-byte header, the block map
at 0x200 in whole sectors, data blocks right after it. The block map stays in memory
(4 bytes per MiB of disk, an ``array.array``: no numpy) and is written with the
header by ``finish``.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ...errors import CorruptImage, OutputError, UnsupportedFeature
from ...util import tables
from ...util.fileio import Coalesced, WriteData, byte_view, pwrite_all, zero_range
from ..base import BackingRef, HostFile, ImageWriter
from . import structs as S


class VdiWriter(ImageWriter):
    accepts_spans = True  # write() only slices data and passes it to pwrite_all
    #: dynamic: whole blocks, so a block is allocated once and in full. Static images
    #: have every block in place already and, like raw files, keep zero runs as holes
    #: (qemu-img convert leaves them unwritten too)
    granularity = S.BLOCK_SIZE

    def __init__(self, path: str, size: int, *, fixed: bool) -> None:
        self.path = path
        self.virtual_size = size
        self.header = S.new_header(size, fixed=fixed)
        blocks = self.header.cBlocks
        if fixed:
            # static images map block i to host block i (vdi_co_do_create)
            self.bmap = tables.series(4, 0, blocks, 1)
        else:
            self.bmap = tables.filled(4, blocks, S.BLOCK_FREE)
        self.allocated = blocks if fixed else 0
        self.map_area = S.block_map_bytes(blocks)
        self.truncate = False
        #: (offset, length) of old data freed by a resize, zeroed after the map is written
        self.release: list[tuple[int, int]] = []
        if fixed:
            self.granularity = S.SECTOR_SIZE
        self.fd = _open(path, os.O_CREAT | os.O_TRUNC)
        if fixed:
            try:
                # sized in full but sparse, as qemu does (blk_truncate, PREALLOC_MODE_OFF)
                os.ftruncate(self.fd, self.header.offData + blocks * S.BLOCK_SIZE)
            except OSError as err:
                self.abort()
                raise OutputError(f"{path}: cannot size the file: {err.strerror}") from None

    @classmethod
    def open_existing(cls, path: str) -> VdiWriter:
        """Reopen a VDI image to write guest data into it (``convert -n``)."""
        from .reader import host_block_use, read_block_map, read_header

        host = HostFile(path)
        try:
            header = read_header(host)
            bmap = read_block_map(host, header)
        finally:
            host.close()
        self = cls.__new__(cls)
        self.path = path
        self.header = header
        self.virtual_size = -(-header.cbDisk // S.SECTOR_SIZE) * S.SECTOR_SIZE
        self.bmap = bmap
        use = host_block_use(bmap, header.cBlocks, 0)
        # new blocks go after the highest one in use, whatever cBlocksAllocated claims
        self.allocated = use.top
        # writing into a block that another entry shares would change both: refuse the
        # damage qemu's check reports (vdi_co_check) before anything is written
        if use.too_large_count or use.extra:
            raise CorruptImage("the block map has entries past the block count or blocks "
                               "used twice; refusing to write", path=path,
                               offset=header.offBlocks, hint="run 'vmforge check' on it")
        if header.u32Type == S.TYPE_FIXED:
            self.granularity = S.SECTOR_SIZE
        self.map_area = S.block_map_bytes(header.cBlocks)
        self.truncate = False
        self.release = []
        self.fd = _open(path, 0)
        return self

    def resize(self, new_size: int) -> None:
        """Change cbDisk and the block map (see inplace.py for the rules)."""
        from .inplace import resize

        resize(self, new_size)

    def make_empty(self) -> None:
        raise UnsupportedFeature("emptying VDI images", path=self.path,
                                 detail="vmforge does not rewrite differencing VDIs",
                                 hint="keep the overlay as it is (commit -d)")

    def set_backing(self, backing: BackingRef | None) -> None:
        raise UnsupportedFeature("changing the parent of a VDI image", path=self.path,
                                 detail="a differencing VDI names its parent only by UUID",
                                 hint="convert it to a standalone image instead "
                                      "(vmforge convert -O vdi --parent PARENT ...)")

    def _host_block(self, idx: int) -> int:
        """Host offset of block ``idx``, allocating it at the end of the data area."""
        entry = int(self.bmap[idx])
        if entry >= S.FIRST_UNALLOCATED:
            entry = self.allocated
            self.allocated += 1
            self.bmap[idx] = entry
        return self.header.offData + entry * S.BLOCK_SIZE

    def write(self, offset: int, data: WriteData) -> None:
        view = byte_view(data)
        bs = S.BLOCK_SIZE
        # blocks stored one after another (new ones are, in guest order) go out in one
        # call: per 1 MiB block, the calls cost raw -> vdi ~0.2 s of 0.85
        out = Coalesced(self.fd, view)
        done = 0
        try:
            while done < len(view):
                idx, inner = divmod(offset + done, bs)
                n = min(len(view) - done, bs - inner)
                out.add(done, n, self._host_block(idx) + inner)
                done += n
            out.flush()
        except OSError as err:
            raise OutputError(f"{self.path}: write failed: {err.strerror}") from None

    def write_zeroes(self, offset: int, length: int) -> None:
        # free blocks already read as zeros; only blocks holding data need zeroing
        bs = S.BLOCK_SIZE
        end = offset + length
        while offset < end:
            idx, inner = divmod(offset, bs)
            n = min(end - offset, bs - inner)
            entry = int(self.bmap[idx])
            if entry < S.FIRST_UNALLOCATED:
                zero_range(self.fd, self.header.offData + entry * bs + inner, n)
            offset += n

    def finish(self) -> None:
        h = self.header
        # every entry from FIRST_UNALLOCATED on is BLOCK_ZERO or BLOCK_FREE
        in_use = len(self.bmap) - self.bmap.count(S.BLOCK_ZERO) - self.bmap.count(S.BLOCK_FREE)
        header = replace(h, cBlocksAllocated=in_use)
        table = tables.to_bytes(self.bmap, "little")
        # whole sectors; an area the map shrank from is cleared of its old entries
        table += bytes(max(S.block_map_bytes(h.cBlocks), self.map_area) - len(table))
        try:
            pwrite_all(self.fd, header.pack(), 0)
            pwrite_all(self.fd, table, h.offBlocks)
            # the file ends with the last allocated block in full: a final partial
            # block reads zeros past the data that was written
            end = h.offData + self.allocated * S.BLOCK_SIZE
            if self.truncate or os.fstat(self.fd).st_size < end:
                os.ftruncate(self.fd, end)
            for at, length in self.release:
                zero_range(self.fd, at, length)
        except OSError as err:
            raise OutputError(f"{self.path}: cannot write the VDI header: {err.strerror}") from None
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | flags, 0o644)
    except OSError as err:
        raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None
