# References:
#   VirtualBox src/VBox/Storage/VDICore.h: VDIPREHEADER (szFileInfo, u32Signature,
#   u32Version), VDIHEADER1PLUS (cbHeader ... uuidParentModify, LCHSGeometry),
#   VDIDISKGEOMETRY, VDIIMAGETYPE, VDI_IMAGE_BLOCK_FREE / VDI_IMAGE_BLOCK_ZERO.
#   QEMU 7.2 block/vdi.c (VdiHeader, vdi_open checks, vdi_co_do_create layout,
#   VDI_BLOCKS_IN_IMAGE_MAX): the oracle; field names below follow VDICore.h.
"""VDI on-disk structures, named as in VDICore.h, packed and unpacked (little-endian)."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

# VDICore.h VDI_IMAGE_SIGNATURE, stored little-endian at 0x40 (VDIPREHEADER.u32Signature)
SIGNATURE = 0xBEDA107F
SIGNATURE_OFFSET = 0x40
# VDICore.h VDI_IMAGE_VERSION for header version 1.1: major in the high 16 bits
VERSION_1_1 = 0x00010001
# VDICore.h VDI_IMAGE_FILE_INFO: "for eyes only"; VirtualBox and qemu never check it
FILE_INFO_ORACLE = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

# VDIIMAGETYPE
TYPE_NORMAL = 1  # dynamically growing
TYPE_FIXED = 2  # preallocated ("static" in qemu-img)
TYPE_UNDO = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "static", TYPE_UNDO: "undo", TYPE_DIFF: "diff"}

# Block map entries (VDIIMAGEBLOCKPOINTER, u32 little-endian)
BLOCK_FREE = 0xFFFFFFFF  # VDI_IMAGE_BLOCK_FREE: not allocated (qemu: VDI_UNALLOCATED)
BLOCK_ZERO = 0xFFFFFFFE  # VDI_IMAGE_BLOCK_ZERO: not allocated, reads zeros (qemu: VDI_DISCARDED)
# IS_VDI_IMAGE_BLOCK_ALLOCATED(bp): bp < VDI_IMAGE_BLOCK_UNALLOCATED (== BLOCK_ZERO)
FIRST_UNALLOCATED = BLOCK_ZERO

SECTOR_SIZE = 512  # VDI_GEOMETRY_SECTOR_SIZE: the only sector size either tool supports
BLOCK_SIZE = 1 << 20  # VDI_IMAGE_DEFAULT_BLOCK_SIZE; qemu refuses any other cbBlock
# qemu block/vdi.c: the block map is read in one request of at most INT_MAX bytes
MAX_BLOCKS = (2**31 - SECTOR_SIZE) // 4  # VDI_BLOCKS_IN_IMAGE_MAX = 0x1fffff80
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE  # VDI_DISK_SIZE_MAX

PREHEADER_SIZE = 72  # sizeof(VDIPREHEADER)
HEADER1_SIZE = 384  # sizeof(VDIHEADER1): what qemu writes in cbHeader (0x180)
HEADER1PLUS_SIZE = 400  # sizeof(VDIHEADER1PLUS): what VirtualBox writes
HEADER_AREA = 512  # qemu reads and writes the header as one 512-byte sector
HEADER1_END = PREHEADER_SIZE + HEADER1_SIZE  # the smallest file that holds a v1.1 header

# qemu places the block map right after the header sector (vdi_co_do_create)
DEFAULT_OFF_BLOCKS = 0x200
# VirtualBox starts the data area on a 1 MiB boundary (VDI.cpp, VDI_DATA_ALIGN: "for
# performance reasons"); qemu right after the map, at a sector boundary, so that every
# block of its files straddles page-cache pages and file-system blocks
DATA_ALIGN = 1 << 20

_PRE = struct.Struct("<64sII")
# VDIHEADER1PLUS after the pre-header: cbHeader, u32Type, fFlags, szComment[256], offBlocks,
# offData, LegacyGeometry (4 x u32), u32Dummy, cbDisk (u64), cbBlock, cbBlockExtra,
# cBlocks, cBlocksAllocated, uuidCreate, uuidModify, uuidLinkage, uuidParentModify,
# LCHSGeometry (4 x u32)
_H1 = struct.Struct("<III256sII4IIQIIII16s16s16s16s4I")
assert _PRE.size == PREHEADER_SIZE and _H1.size == HEADER1PLUS_SIZE


@dataclass(frozen=True, slots=True)
class DiskGeometry:
    """VDIDISKGEOMETRY."""

    cCylinders: int = 0
    cHeads: int = 0
    cSectors: int = 0
    cbSector: int = 0


def _uuid(raw: bytes) -> uuid.UUID:
    # RTUUID is stored in the mixed-endian GUID layout (qemu swaps it: qemu_uuid_bswap)
    return uuid.UUID(bytes_le=raw)


@dataclass(frozen=True, slots=True)
class Header:
    """VDIPREHEADER followed by VDIHEADER1PLUS (LCHSGeometry zero when cbHeader is 384)."""

    szFileInfo: bytes
    u32Signature: int
    u32Version: int
    cbHeader: int
    u32Type: int
    fFlags: int
    szComment: bytes
    offBlocks: int
    offData: int
    LegacyGeometry: DiskGeometry
    u32Dummy: int
    cbDisk: int
    cbBlock: int
    cbBlockExtra: int
    cBlocks: int
    cBlocksAllocated: int
    uuidCreate: uuid.UUID
    uuidModify: uuid.UUID
    uuidLinkage: uuid.UUID
    uuidParentModify: uuid.UUID
    LCHSGeometry: DiskGeometry

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse the first ``HEADER_AREA`` bytes (shorter input is padded with zeros)."""
        data = bytes(data[:HEADER_AREA]).ljust(HEADER_AREA, b"\0")
        info, sig, ver = _PRE.unpack_from(data, 0)
        f = _H1.unpack_from(data, PREHEADER_SIZE)
        return cls(
            szFileInfo=info, u32Signature=sig, u32Version=ver,
            cbHeader=f[0], u32Type=f[1], fFlags=f[2], szComment=f[3],
            offBlocks=f[4], offData=f[5], LegacyGeometry=DiskGeometry(*f[6:10]),
            u32Dummy=f[10], cbDisk=f[11], cbBlock=f[12], cbBlockExtra=f[13],
            cBlocks=f[14], cBlocksAllocated=f[15],
            uuidCreate=_uuid(f[16]), uuidModify=_uuid(f[17]),
            uuidLinkage=_uuid(f[18]), uuidParentModify=_uuid(f[19]),
            LCHSGeometry=DiskGeometry(*f[20:24]),
        )

    def pack(self) -> bytes:
        """The 512-byte header sector (the tail after the header is zero)."""
        lg, lchs = self.LegacyGeometry, self.LCHSGeometry
        out = _PRE.pack(self.szFileInfo, self.u32Signature, self.u32Version) + _H1.pack(
            self.cbHeader, self.u32Type, self.fFlags, self.szComment,
            self.offBlocks, self.offData,
            lg.cCylinders, lg.cHeads, lg.cSectors, lg.cbSector,
            self.u32Dummy, self.cbDisk, self.cbBlock, self.cbBlockExtra,
            self.cBlocks, self.cBlocksAllocated,
            self.uuidCreate.bytes_le, self.uuidModify.bytes_le,
            self.uuidLinkage.bytes_le, self.uuidParentModify.bytes_le,
            lchs.cCylinders, lchs.cHeads, lchs.cSectors, lchs.cbSector,
        )
        return out.ljust(HEADER_AREA, b"\0")

    @property
    def version_text(self) -> str:
        return f"{self.u32Version >> 16}.{self.u32Version & 0xFFFF}"


def block_map_bytes(blocks: int) -> int:
    """Bytes the block map occupies on disk: whole sectors, as qemu reads and writes it."""
    return -(-blocks * 4 // SECTOR_SIZE) * SECTOR_SIZE


def new_header(size: int, *, fixed: bool, blocks_allocated: int = 0) -> Header:
    """A v1.1 header for a new image of ``size`` bytes.

    Block map at 0x200 as qemu places it (vdi_co_do_create), data from the next 1 MiB
    boundary after the map as VirtualBox places it (DATA_ALIGN); fresh random
    uuidCreate/uuidModify, no linkage (not a differencing image).
    """
    blocks = -(-size // BLOCK_SIZE)
    return Header(
        szFileInfo=FILE_INFO_ORACLE.ljust(64, b"\0"), u32Signature=SIGNATURE,
        u32Version=VERSION_1_1,
        cbHeader=HEADER1PLUS_SIZE, u32Type=TYPE_FIXED if fixed else TYPE_NORMAL, fFlags=0,
        szComment=bytes(256), offBlocks=DEFAULT_OFF_BLOCKS,
        offData=-(-(DEFAULT_OFF_BLOCKS + block_map_bytes(blocks)) // DATA_ALIGN) * DATA_ALIGN,
        LegacyGeometry=DiskGeometry(cbSector=SECTOR_SIZE), u32Dummy=0, cbDisk=size,
        cbBlock=BLOCK_SIZE, cbBlockExtra=0, cBlocks=blocks,
        cBlocksAllocated=blocks if fixed else blocks_allocated,
        uuidCreate=uuid.uuid4(), uuidModify=uuid.uuid4(),
        uuidLinkage=uuid.UUID(int=0), uuidParentModify=uuid.UUID(int=0),
        LCHSGeometry=DiskGeometry(),
    )
