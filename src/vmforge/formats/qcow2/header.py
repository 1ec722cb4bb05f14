"""qcow2 header parsing and validation (qcow2.txt "Header", "Header extensions").

Every field is checked against fixed caps and the file size before any table is
allocated (../SECURITY.md rows 3-7).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import (
    CorruptImage,
    FormatMismatch,
    LimitExceeded,
    TruncatedImage,
    UnsupportedFeature,
)
from ..base import ByteSource
from . import structs as S


@dataclass(frozen=True, slots=True)
class Geometry:
    """Derived sizes of one image (cluster, L2 entry size, subclusters)."""

    cluster_bits: int
    extended_l2: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def l2_span(self) -> int:
        """Guest bytes mapped by one L2 table."""
        return self.l2_entries * self.cluster_size

    @property
    def units_per_cluster(self) -> int:
        return S.EXTL2_SUBCLUSTERS if self.extended_l2 else 1


def read_header(host: ByteSource) -> tuple[S.Header, bytes]:
    """Parse and validate the header; returns it and the first cluster's bytes.

    Raises TruncatedImage, FormatMismatch, UnsupportedFeature, CorruptImage or LimitExceeded.
    """
    path = host.path
    head = host.pread_upto(0, 4096)
    if len(head) < S.V2_HEADER_LENGTH:
        raise TruncatedImage(f"file is {len(head)} bytes, too short for a qcow2 header", path=path)
    if head[:4] != S.MAGIC:
        raise FormatMismatch("not a qcow2 image (bad magic)", path=path)
    version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise UnsupportedFeature(f"qcow2 version {version}", path=path,
                                 hint="only qcow2 versions 2 and 3 exist")
    if version == 3 and len(head) < S.V3_HEADER_LENGTH:
        raise TruncatedImage("qcow2 v3 header is cut short", path=path)
    h = S.Header.unpack(head)
    if not S.MIN_CLUSTER_BITS <= h.cluster_bits <= S.MAX_CLUSTER_BITS:
        raise CorruptImage(f"cluster_bits {h.cluster_bits} is outside 9..21", path=path, offset=20)
    cs = h.cluster_size
    if cs > len(head):
        head = host.pread_upto(0, cs)
    if version == 3:
        if h.header_length < S.V3_HEADER_LENGTH:
            raise CorruptImage(f"header_length {h.header_length} is below 104", path=path, offset=100)
        if h.header_length > cs:
            raise CorruptImage(f"header_length {h.header_length} exceeds the cluster size",
                               path=path, offset=100)
        if len(head) < h.header_length:
            raise TruncatedImage("header is cut short", path=path)
        if h.refcount_order > 6:
            raise UnsupportedFeature(f"refcount_order {h.refcount_order}", path=path,
                                     detail="refcounts wider than 64 bits")
        unknown = h.incompatible_features & ~S.INCOMPAT_KNOWN
        if unknown:
            names = _feature_names(head, h, "incompatible", unknown)
            raise UnsupportedFeature(f"incompatible feature {names}", path=path,
                                     hint="this image needs a newer qcow2 implementation")
        if h.incompatible_features & S.INCOMPAT_COMPRESSION and h.header_length <= 104:
            raise CorruptImage("compression type bit set but the header has no compression_type",
                               path=path, offset=72)
        if h.compression_type not in S.COMPRESSION_NAMES:
            raise UnsupportedFeature(f"compression type {h.compression_type}", path=path)
        if h.compression_type != S.COMPRESSION_ZLIB and not (
                h.incompatible_features & S.INCOMPAT_COMPRESSION):
            raise CorruptImage("compression_type is set but the compression incompatible bit is not",
                               path=path, offset=104)
        if h.incompatible_features & S.INCOMPAT_EXTL2 and h.cluster_bits < 14:
            raise CorruptImage("extended L2 entries need clusters of 16 KiB or more", path=path)
    if h.crypt_method != 0:
        raise UnsupportedFeature("encryption", path=path, detail=f"crypt_method {h.crypt_method}",
                                 hint="decrypt it with the tool that encrypted it first")
    if h.size > (1 << 63) - 1:
        raise LimitExceeded(f"virtual size {h.size} does not fit a signed 64-bit offset", path=path)
    file_size = host.size
    geo = Geometry(h.cluster_bits, bool(h.incompatible_features & S.INCOMPAT_EXTL2))
    needed_l1 = -(-h.size // geo.l2_span)
    if h.l1_size * 8 > S.MAX_L1_BYTES:
        raise LimitExceeded(f"L1 table of {h.l1_size} entries is larger than 32 MiB", path=path,
                            limit="l1_size")
    if h.l1_size < needed_l1:
        raise CorruptImage(f"L1 table has {h.l1_size} entries, the virtual size needs {needed_l1}",
                           path=path, offset=36)
    check_table(host, "L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    rt_bytes = h.refcount_table_clusters * cs
    if rt_bytes > S.MAX_REFTABLE_BYTES:
        raise LimitExceeded(f"refcount table of {h.refcount_table_clusters} clusters is too large",
                            path=path, limit="refcount_table_clusters")
    check_table(host, "refcount table", h.refcount_table_offset, rt_bytes, cs, file_size)
    if h.nb_snapshots > S.MAX_SNAPSHOTS:
        raise LimitExceeded(f"{h.nb_snapshots} snapshots is more than {S.MAX_SNAPSHOTS}", path=path,
                            limit="nb_snapshots")
    if h.nb_snapshots:
        check_table(host, "snapshot table", h.snapshots_offset,
                    h.nb_snapshots * S.SnapshotEntry.fixed_size(), cs, file_size)
    if h.backing_file_offset:
        if h.backing_file_size > S.MAX_BACKING_NAME:
            raise LimitExceeded(f"backing file name of {h.backing_file_size} bytes is too long",
                                path=path, limit="backing_file_size")
        if h.backing_file_offset + h.backing_file_size > cs:
            raise CorruptImage("backing file name lies outside the first cluster", path=path,
                               offset=8)
    return h, head


def check_table(host: ByteSource, what: str, offset: int, length: int, cluster_size: int,
                file_size: int) -> None:
    """A table must start on a cluster boundary and lie inside the file."""
    if length == 0:
        return
    if offset % cluster_size:
        raise CorruptImage(f"{what} offset {offset:#x} is not cluster aligned", path=host.path,
                           offset=offset)
    if offset + length > file_size or offset + length > (1 << 63) - 1:
        raise TruncatedImage(f"{what} at {offset:#x} (+{length} bytes) runs past the end of the file",
                             path=host.path, offset=offset)


def parse_extensions(head: bytes, h: S.Header, path: str) -> list[S.HeaderExtension]:
    """Header extensions between the header and the backing name (or the cluster end)."""
    pos = h.header_length if h.version >= 3 else S.V2_HEADER_LENGTH
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    end = min(end, len(head))
    out: list[S.HeaderExtension] = []
    while pos + 8 <= end:
        etype = int.from_bytes(head[pos:pos + 4], "big")
        elen = int.from_bytes(head[pos + 4:pos + 8], "big")
        if etype == S.EXT_END:
            break
        if pos + 8 + elen > end:
            raise CorruptImage(f"header extension {etype:#x} runs past its area", path=path,
                               offset=pos)
        out.append(S.HeaderExtension(etype, bytes(head[pos + 8:pos + 8 + elen])))
        pos += 8 + elen + (-elen % 8)
    return out


def _feature_names(head: bytes, h: S.Header, kind: str, bits: int) -> str:
    """Name unknown feature bits from the image's own feature name table when it has one."""
    kind_code = {"incompatible": 0, "compatible": 1, "autoclear": 2}[kind]
    names: dict[int, str] = {}
    try:
        exts = parse_extensions(head, h, "")
    except CorruptImage:
        exts = []
    for ext in exts:
        if ext.type == S.EXT_FEATURE_TABLE:
            for i in range(0, len(ext.data) - 47, 48):
                if ext.data[i] == kind_code:
                    names[ext.data[i + 1]] = ext.data[i + 2:i + 48].rstrip(b"\0").decode(
                        "utf-8", "replace")
    parts = [names.get(b, f"bit {b}") for b in range(64) if bits >> b & 1]
    return ", ".join(parts)
