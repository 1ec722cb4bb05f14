"""Poke bytes into qemu-made qcow2 images (like QEMU's iotests 060/080 do).

Field offsets follow QEMU docs/interop/qcow2.txt ("Header" section); all fields are
big-endian. Only what the hostile-input and check tests need is here.
"""

from __future__ import annotations

import struct
from pathlib import Path

MAGIC = b"QFI\xfb"

# name -> (offset, struct format)   -- docs/interop/qcow2.txt, "Header"
FIELDS = {
    "magic": (0, ">4s"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # qcow2.txt "Cluster mapping": bits 9-55
L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1


class Qcow2File:
    """Read and patch one qcow2 file in place."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # header ------------------------------------------------------------------------------
    def get(self, field: str) -> int:
        off, fmt = FIELDS[field]
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def set(self, field: str, value: int | bytes) -> None:
        off, fmt = FIELDS[field]
        buf = bytearray(struct.calcsize(fmt))
        struct.pack_into(fmt, buf, 0, value)
        self.write_at(off, bytes(buf))

    def write_at(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read_at(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    def u64(self, offset: int) -> int:
        return struct.unpack(">Q", self.read_at(offset, 8))[0]

    def put_u64(self, offset: int, value: int) -> None:
        self.write_at(offset, struct.pack(">Q", value))

    @property
    def cluster_size(self) -> int:
        return 1 << self.get("cluster_bits")

    @property
    def refcount_bits(self) -> int:
        return 1 << self.get("refcount_order") if self.get("version") >= 3 else 16

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.get("incompatible_features") & (1 << 4) else 8  # extended L2

    # refcounts ---------------------------------------------------------------------------
    def _refcount_slot(self, cluster_index: int) -> tuple[int, int]:
        """(refcount block offset, index in it) for host cluster ``cluster_index``."""
        cs, bits = self.cluster_size, self.refcount_bits
        per_block = cs * 8 // bits
        table = self.get("refcount_table_offset")
        block = self.u64(table + 8 * (cluster_index // per_block))
        assert block, f"no refcount block covers cluster {cluster_index}"
        return block, cluster_index % per_block

    def get_refcount(self, cluster_index: int) -> int:
        block, idx = self._refcount_slot(cluster_index)
        bits = self.refcount_bits
        if bits >= 8:
            n = bits // 8
            return int.from_bytes(self.read_at(block + idx * n, n), "big")
        byte = self.read_at(block + idx * bits // 8, 1)[0]
        shift = (idx * bits) % 8
        return (byte >> shift) & ((1 << bits) - 1)

    def set_refcount(self, cluster_index: int, value: int) -> None:
        block, idx = self._refcount_slot(cluster_index)
        bits = self.refcount_bits
        if bits >= 8:
            n = bits // 8
            self.write_at(block + idx * n, value.to_bytes(n, "big"))
            return
        pos = block + idx * bits // 8
        byte = self.read_at(pos, 1)[0]
        shift = (idx * bits) % 8
        mask = ((1 << bits) - 1) << shift
        self.write_at(pos, bytes([(byte & ~mask) | ((value << shift) & mask)]))

    # L1 / L2 --------------------------------------------------------------------------------
    def l1_entry(self, index: int) -> int:
        return self.u64(self.get("l1_table_offset") + 8 * index)

    def l2_entry_offset(self, guest_offset: int) -> int:
        """Host offset of the L2 entry mapping ``guest_offset`` (its L2 table must exist)."""
        cs = self.cluster_size
        per_l2 = cs // self.l2_entry_size
        cluster = guest_offset // cs
        l1 = self.l1_entry(cluster // per_l2) & L1_OFFSET_MASK
        assert l1, f"no L2 table for guest offset {guest_offset}"
        return l1 + self.l2_entry_size * (cluster % per_l2)

    def l2_entry(self, guest_offset: int) -> int:
        return self.u64(self.l2_entry_offset(guest_offset))

    def set_l2_entry(self, guest_offset: int, value: int) -> None:
        self.put_u64(self.l2_entry_offset(guest_offset), value)

    def data_cluster_host_offset(self, guest_offset: int) -> int:
        entry = self.l2_entry(guest_offset)
        assert not entry & QCOW_OFLAG_COMPRESSED
        off = entry & L2_OFFSET_MASK
        assert off, f"guest offset {guest_offset} is not allocated"
        return off
