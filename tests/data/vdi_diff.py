"""Hand-built differencing VDIs, laid out as VirtualBox writes them (VDICore.h).

Neither qemu-img nor vmforge writes differencing VDIs, so the tests make them here:
the parent's header with u32Type VDI_IMAGE_TYPE_DIFF, fresh uuidCreate/uuidModify,
uuidLinkage = the parent's uuidCreate and uuidParentModify = its uuidModify; a block
map where VDI_IMAGE_BLOCK_FREE falls through to the parent, VDI_IMAGE_BLOCK_ZERO reads
zeros, and allocated blocks are stored one after another after the map.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import numpy as np

from vmforge.formats.vdi import structs as S


def read_vdi_header(path: str | os.PathLike[str]) -> S.Header:
    with open(path, "rb") as f:
        return S.Header.unpack(f.read(S.HEADER_AREA))


def write_diff_vdi(path: str | os.PathLike[str], parent: S.Header, data: dict[int, bytes],
                   zero: frozenset[int] | set[int] = frozenset()) -> S.Header:
    """A differencing VDI on ``parent``: ``data`` maps block index -> 1 MiB of bytes."""
    blocks = parent.cBlocks
    bmap = np.full(blocks, S.BLOCK_FREE, dtype="<u4")
    for idx in zero:
        bmap[idx] = S.BLOCK_ZERO
    order = sorted(data)
    for host, idx in enumerate(order):
        bmap[idx] = host
    off_data = S.DEFAULT_OFF_BLOCKS + S.block_map_bytes(blocks)
    h = replace(parent, u32Type=S.TYPE_DIFF, cbHeader=S.HEADER1PLUS_SIZE,
                szComment=b"vmforge test differencing image".ljust(256, b"\0"),
                offBlocks=S.DEFAULT_OFF_BLOCKS, offData=off_data,
                cBlocksAllocated=len(order), uuidCreate=uuid.uuid4(), uuidModify=uuid.uuid4(),
                uuidLinkage=parent.uuidCreate, uuidParentModify=parent.uuidModify)
    with open(path, "wb") as f:
        f.write(h.pack())
        f.seek(h.offBlocks)
        f.write(bmap.tobytes())
        for host, idx in enumerate(order):
            assert len(data[idx]) == S.BLOCK_SIZE
            f.seek(off_data + host * S.BLOCK_SIZE)
            f.write(data[idx])
        f.truncate(off_data + len(order) * S.BLOCK_SIZE)
    return h
