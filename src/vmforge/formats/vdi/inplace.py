"""Resizing an existing VDI in place: cbDisk, cBlocks and the block map.

qemu-img 7.2 cannot resize VDI, so the rules are VDICore.h's and qemu's reader's:

- cbDisk is the size, cBlocks = cbDisk / cbBlock rounded up, one map entry a block.
- Growing needs a longer block map. Where the space up to offData holds it, only the
  map grows. Otherwise the data blocks in the way move to the end of the data area
  and offData advances by whole blocks, as VirtualBox's vdiResize does; every entry
  is a block index counted from offData, so all of them are renumbered.
- Shrinking drops the blocks past the end. Every entry must stay below cBlocks
  (qemu's check calls a larger one corrupt), so blocks stored in host slots past the
  new count move into free slots below it; the file is cut after the last block.
- Bytes of a partial last block past the old end are zeroed when the disk grows, so
  the new range reads zeros whatever a previous shrink left there.
- Static images get host blocks for their new blocks at once (sparse, as created).
- Differencing VDIs are resized only when nothing has to move (the map has room,
  no block sits past the new count); new blocks are BLOCK_ZERO, so they read zeros
  rather than whatever a larger parent holds there.

Data moves first and is synced before the header and map are written (finish).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from ...errors import UnsupportedFeature, UsageError
from ...util import tables
from ...util.fileio import pwrite_all, zero_range
from . import structs as S

if TYPE_CHECKING:
    from .writer import VdiWriter

BS = S.BLOCK_SIZE


def resize(w: VdiWriter, new_size: int) -> None:
    """Resize ``w``'s image to ``new_size`` bytes (a multiple of 512).

    Raises UsageError past the VDI size limit and UnsupportedFeature for differencing
    images that would need blocks moved; both before anything is written.
    """
    h = w.header
    if new_size > S.MAX_DISK_SIZE:
        raise UsageError(f"{w.path}: {new_size} bytes is too large for a VDI (at most "
                         f"{S.MAX_DISK_SIZE})")
    diff = bool(h.uuidLinkage.int)
    old = w.virtual_size
    new_blocks = -(-new_size // BS)
    need_map = S.block_map_bytes(new_blocks)
    room = h.offData - h.offBlocks
    if diff:
        high = any(new_blocks <= e < S.FIRST_UNALLOCATED for e in w.bmap[:new_blocks])
        if (new_size > old and need_map > room) or (new_size < old and high):
            raise UnsupportedFeature(
                "resizing this differencing VDI", path=w.path,
                detail="its data blocks would have to move",
                hint="convert it to a standalone VDI (naming its parent with --parent), then "
                     "resize that")
    if new_size < old:
        _shrink(w, new_size, new_blocks)
    elif new_size > old:
        _grow(w, new_size, new_blocks, need_map, room, diff)
    else:
        return
    geometry = replace(h.LegacyGeometry, cCylinders=0, cHeads=0, cSectors=0)
    # the old geometry described the old size; zero lets VirtualBox derive a new one
    w.header = replace(w.header, cbDisk=new_size, cBlocks=new_blocks,
                       LegacyGeometry=geometry, LCHSGeometry=S.DiskGeometry())
    w.virtual_size = new_size


def _zero_in_block(w: VdiWriter, index: int, start: int, end: int) -> None:
    """Zero bytes ``[start, end)`` inside block ``index`` if it is stored."""
    entry = int(w.bmap[index]) if index < len(w.bmap) else S.BLOCK_FREE
    if entry < S.FIRST_UNALLOCATED and end > start:
        zero_range(w.fd, w.header.offData + entry * BS + start, end - start)


def _move_block(w: VdiWriter, src: int, dst: int) -> None:
    """Copy host block ``src`` to host block ``dst`` (host offsets from offData)."""
    base = w.header.offData
    for pos in range(0, BS, 1 << 20):
        chunk = os.pread(w.fd, min(1 << 20, BS - pos), base + src * BS + pos)
        chunk = chunk.ljust(min(1 << 20, BS - pos), b"\0")
        if chunk.count(0) == len(chunk):
            zero_range(w.fd, base + dst * BS + pos, len(chunk))  # keep holes holes
        else:
            pwrite_all(w.fd, chunk, base + dst * BS + pos)


def _shrink(w: VdiWriter, new_size: int, new_blocks: int) -> None:
    last = new_blocks - 1
    _zero_in_block(w, last, new_size - last * BS, min(BS, w.virtual_size - last * BS))
    bmap = w.bmap[:new_blocks]  # (a copy)
    high = [i for i, e in enumerate(bmap) if new_blocks <= e < S.FIRST_UNALLOCATED]
    if high:
        in_use = bytearray(new_blocks)
        for e in bmap:
            if e < new_blocks:  # (new_blocks is below FIRST_UNALLOCATED: a stored block)
                in_use[e] = 1
        # there are enough free slots: at most new_blocks are in use
        free = (slot for slot, used in enumerate(in_use) if not used)
        for index, slot in zip(high, free, strict=False):
            _move_block(w, bmap[index], slot)
            bmap[index] = slot
        os.fsync(w.fd)
    w.bmap = bmap
    w.allocated = max((e + 1 for e in bmap if e < S.FIRST_UNALLOCATED), default=0)
    w.truncate = True


def _grow(w: VdiWriter, new_size: int, new_blocks: int, need_map: int, room: int,
          diff: bool) -> None:
    h = w.header
    old_blocks = len(w.bmap)
    if w.virtual_size % BS:
        last = old_blocks - 1
        _zero_in_block(w, last, w.virtual_size - last * BS, min(BS, new_size - last * BS))
    bmap = w.bmap[:]  # (a copy)
    if need_map > room:
        # the first k host blocks are in the map's way: copy them past the last one,
        # then count every entry from the new offData
        k = -(-(need_map - room) // BS)
        in_way = [i for i, e in enumerate(bmap) if e < k]  # (k is below FIRST_UNALLOCATED)
        target = max(w.allocated, k)
        for j, index in enumerate(in_way):
            _move_block(w, bmap[index], target + j)
        if in_way:
            os.fsync(w.fd)
        for i, e in enumerate(bmap):
            if k <= e < S.FIRST_UNALLOCATED:  # stored and not moved: counted k blocks later
                bmap[i] = e - k
        for j, index in enumerate(in_way):
            bmap[index] = target + j - k
        w.allocated = target + len(in_way) - k
        # what lay between the map and the new data area is freed old block data
        gap_at = h.offBlocks + need_map
        new_data = h.offData + k * BS
        w.release.append((gap_at, new_data - gap_at))  # freed once the map is written
        w.header = replace(h, offData=new_data)
        w.map_area = need_map
    count = new_blocks - old_blocks
    if w.header.u32Type == S.TYPE_FIXED:
        # a static image has every block in place: new ones get host blocks now
        bmap.extend(tables.series(4, w.allocated, count, 1))
        w.allocated += count
    else:
        bmap.extend(tables.filled(4, count, S.BLOCK_ZERO if diff else S.BLOCK_FREE))
    w.bmap = bmap
