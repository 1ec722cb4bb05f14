"""``measure``: how big an output file would be, computed as qemu-img computes it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from ..formats import get_format
from ..formats.qcow2 import check_size, parse_options
from ..model import ExtentKind, align_up
from .image import Image


def qcow2_refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount blocks + table needed to count ``clusters`` and themselves (fixed point)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    last = -1
    n = 0
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def qcow2_prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """Size of a fully allocated qcow2 of ``total`` bytes (header, tables, refcounts, data)."""
    aligned = align_up(total, cluster_size)
    entry = 16 if extended_l2 else 8
    meta = cluster_size  # header
    nl2e = align_up(aligned // cluster_size, cluster_size // entry)
    meta += nl2e * entry
    nl1e = align_up(nl2e * entry // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += qcow2_refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                         refcount_order)
    return meta + aligned


def _data_bytes(image: Image, cluster_size: int) -> int:
    """Bytes of guest data as qemu's qcow2_measure counts them.

    Walking block status, each data run is widened to the end of its cluster and the
    walk resumes there, so data later in an already counted cluster is not counted twice.
    """
    required = 0
    cursor = 0
    for ext in image.iter_extents():
        if ext.end <= cursor or ext.kind is not ExtentKind.DATA or ext.hole:
            continue
        start = max(ext.start, cursor)
        end = align_up(ext.end, cluster_size)
        required += start % cluster_size + (end - start)
        cursor = end
    return required


def measure(out_fmt: str, *, size: int | None = None, image: Image | None = None,
            options: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{"required": N, "fully-allocated": M}`` (and ``bitmaps`` where qemu shows it)."""
    if (size is None) == (image is None):
        raise UsageError("measure needs either --size or a source image")
    opts = dict(options or {})
    fmt = get_format(out_fmt)
    if fmt.name == "raw":
        required = image.virtual_size if image is not None else align_up(size or 0, 512)
        return {"required": required, "fully-allocated": required}
    if fmt.name != "qcow2":
        raise UsageError(f"measure does not know the {fmt.name} format yet")
    backing = opts.pop("backing_file", None)
    opts.pop("backing_fmt", None)
    q = parse_options(opts)
    cs = 1 << q.cluster_bits
    check_size(image.virtual_size if image is not None else size or 0, q, creating=False)
    if image is not None:
        virtual = align_up(image.virtual_size, cs)
        required = virtual if backing else _data_bytes(image, cs)
    else:
        virtual = align_up(size or 0, cs)
        required = 0
    if q.preallocation in ("full", "falloc"):
        required = virtual
    full = qcow2_prealloc_size(virtual, cs, q.refcount_order, q.extended_l2)
    out: dict[str, Any] = {}
    # qemu shows bitmaps when both sides can hold persistent bitmaps (qcow2 v3)
    if q.version >= 3 and image is not None and image.format == "qcow2" and (
            image.info().format_specific.get("data", {}).get("compat") == "1.1"):
        out["bitmaps"] = 0
    out["required"] = full - virtual + required
    out["fully-allocated"] = full
    return out
