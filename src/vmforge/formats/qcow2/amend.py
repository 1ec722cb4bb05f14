"""``amend`` for qcow2: compat, lazy_refcounts and refcount_bits changed in place.

Follows qemu-img 7.2 (block/qcow2.c qcow2_amend_options, qcow2_downgrade,
qcow2_expand_zero_clusters), messages included:

* compat=1.1 -> 0.10 needs refcount_bits=16 and no incompatible feature (extended L2
  is refused), no zstd-compressed cluster; zero clusters (version 2 has no zero flag)
  are expanded in the active state and in every snapshot: a preallocated zero cluster
  gets real zeros, an unallocated one is dropped when there is no backing file and
  gets a new zeroed cluster when there is one (it must keep hiding the backing data).
* Where vmforge refuses more than qemu: an image with persistent bitmaps is not
  downgraded (qemu drops them as inconsistent and leaks their clusters), and COPIED
  flags are judged against the real refcounts (qemu 7.2 sets them on data clusters
  of shared L2 tables, which its own check then reports).
* refcount_bits rewrites the refcount structures at the new width.

Everything goes through update.Qcow2Update: new structures to free space, one header
write to switch; zero-filling of clusters that read as zeros anyway happens before
the switch, new clusters for zero entries of backed images are linked after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ...errors import OptionError, UnsupportedFeature
from ..options import parse_flag
from . import structs as S
from .update import Qcow2Update
from .writer import _feature_table

AMENDABLE = ("compat", "lazy_refcounts", "refcount_bits")
_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def amend_qcow2(path: str, options: Mapping[str, str]) -> bool:
    """Apply ``options``; returns False when nothing needed to change.

    Raises OptionError for options qemu-img would refuse, UnsupportedFeature for
    downgrades that would lose something, and what Qcow2Update refuses.
    """
    for key in options:
        if key not in AMENDABLE:
            raise OptionError(f"amending '{key}' is not supported", option=key,
                              hint="amend changes " + ", ".join(AMENDABLE))
    with Qcow2Update(path, "amend") as up:
        h = up.header
        version = h.version
        if "compat" in options:
            if options["compat"] not in _VERSIONS:
                raise OptionError(f"Invalid compatibility level: '{options['compat']}'",
                                  option="compat", hint="use 0.10 or 1.1")
            version = _VERSIONS[options["compat"]]
        bits = 1 << h.refcount_order
        if "refcount_bits" in options:
            try:
                bits = int(options["refcount_bits"])
            except ValueError:
                raise OptionError("refcount_bits must be a number", option="refcount_bits") from None
            if bits not in (1, 2, 4, 8, 16, 32, 64):
                raise OptionError("Refcount width must be a power of two and may not exceed 64 "
                                  "bits", option="refcount_bits")
        if bits != 16 and version < 3 and "refcount_bits" in options:
            raise OptionError("Refcount widths other than 16 bits require compatibility level "
                              "1.1 or above (use compat=1.1 or greater)", option="refcount_bits")
        # qemu only acts on lazy_refcounts when it differs from the image (so "on" for an
        # image that has them passes even with compat=0.10), and a downgrade then drops
        # them with the other compatible features
        had_lazy = bool(h.compatible_features & S.COMPAT_LAZY_REFCOUNTS)
        lazy = had_lazy
        if "lazy_refcounts" in options:
            lazy = parse_flag("lazy_refcounts", options["lazy_refcounts"])
        if lazy and not had_lazy and version < 3:
            raise OptionError("Lazy refcounts only supported with compatibility level 1.1 and "
                              "above (use compat=1.1 or greater)", option="lazy_refcounts")
        if version < 3:
            lazy = False
        if version < h.version:
            _check_downgrade(up, path, bits)
        if bits < up.bits:
            top = np.flatnonzero(up.refs >= (1 << bits))
            if len(top):
                c = int(top[0])
                raise OptionError(f"Cannot decrease refcount entry width to {bits} bits: Cluster "
                                  f"at offset {c * up.cs:#x} has a refcount of {int(up.refs[c])}",
                                  option="refcount_bits")
        unchanged = version == h.version and bits == up.bits and lazy == had_lazy
        if unchanged:
            return False
        up.bits = bits
        if version < h.version:
            _expand_zero_clusters(up)
        up.new_header, up.new_extensions = _new_header(up, version, bits, lazy)
        up.commit()
        return True


def _check_downgrade(up: Qcow2Update, path: str, bits: int) -> None:
    h = up.header
    if bits != 16:
        raise OptionError("compat=0.10 requires refcount_bits=16", option="compat")
    incompat = h.incompatible_features & ~S.INCOMPAT_COMPRESSION
    if incompat:
        raise UnsupportedFeature(f"Cannot downgrade an image with incompatible features "
                                 f"{incompat:#x} set", path=path)
    if h.autoclear_features & S.AUTOCLEAR_BITMAPS:
        raise UnsupportedFeature("downgrading an image with persistent bitmaps", path=path,
                                 hint="qemu would drop them as inconsistent; remove them first "
                                      "(qemu-img bitmap --remove)")
    if h.compression_type != S.COMPRESSION_ZLIB and _has_compressed(up):
        raise UnsupportedFeature("Cannot downgrade an image with zstd compression type and "
                                 "existing compressed clusters", path=path)


def _all_l1s(up: Qcow2Update) -> list[np.ndarray[Any, Any]]:
    return [up.l1] + [up.read_l1(s.l1_table_offset, s.l1_size) for s in up.snapshots]


def _tables(up: Qcow2Update) -> dict[int, int]:
    """Every L2 table of the active state and the snapshots -> how many L1s point at it."""
    counts: dict[int, int] = {}
    for l1 in _all_l1s(up):
        for l1e in l1.tolist():
            off = l1e & S.L1E_OFFSET_MASK
            if off:
                counts[off] = counts.get(off, 0) + 1
    return counts


def _has_compressed(up: Qcow2Update) -> bool:
    return any(bool(((up.l2_table(off) & np.uint64(S.OFLAG_COMPRESSED)) != 0).any())
               for off in _tables(up))


def _expand_zero_clusters(up: Qcow2Update) -> None:
    """Version 2 has no zero flag: give every zero entry real zeros (qcow2_expand_zero_clusters)."""
    cs = up.cs
    zero_cluster = bytes(cs)
    backed = bool(up.backing_name)
    for off, refs in _tables(up).items():
        table = up.l2_table(off)
        entries = table  # downgrade refuses extended L2: one word per entry
        zero = ((entries & np.uint64(S.OFLAG_ZERO)) != 0) & (
            (entries & np.uint64(S.OFLAG_COMPRESSED)) == 0)
        if not zero.any():
            continue
        early = up.l2_orig[off].copy()
        for slot in np.flatnonzero(zero).tolist():
            entry = int(entries[slot])
            host = entry & S.L2E_OFFSET_MASK
            if host:  # preallocated: the cluster reads as zeros once it holds zeros
                up.write_new(host, zero_cluster)
                value = entry & ~S.OFLAG_ZERO
                early[slot] = np.uint64(value)
            elif not backed:  # nothing below: unallocated reads as zeros too
                value = 0
                early[slot] = np.uint64(0)
            else:  # must keep hiding the backing file: a new zeroed cluster, linked late
                host = up.alloc(cs)
                up.add_range(host, cs, refs - 1)  # one reference per L1 reaching the table
                up.write_new(host, zero_cluster)
                value = host
            table[slot] = np.uint64(value)
        up.l2_early[off] = early


def _new_header(up: Qcow2Update, version: int, bits: int, lazy: bool,
                ) -> tuple[S.Header, list[S.HeaderExtension]]:
    h = up.header
    exts = [e for e in up.extensions if e.type != S.EXT_FEATURE_TABLE]
    if version >= 3:
        exts.append(S.HeaderExtension(S.EXT_FEATURE_TABLE, _feature_table()))
        length = max(h.header_length, S.V3_HEADER_LENGTH_COMPRESSION) if h.version >= 3 \
            else S.V3_HEADER_LENGTH_COMPRESSION
        header = replace(h, version=3, header_length=length, refcount_order=bits.bit_length() - 1,
                         compatible_features=(h.compatible_features & ~S.COMPAT_LAZY_REFCOUNTS)
                         | (S.COMPAT_LAZY_REFCOUNTS if lazy else 0))
        if h.version < 3:
            header = replace(header, incompatible_features=0, autoclear_features=0,
                             compression_type=S.COMPRESSION_ZLIB)
        return header, exts
    header = replace(h, version=2, header_length=S.V2_HEADER_LENGTH, incompatible_features=0,
                     compatible_features=0, autoclear_features=0, refcount_order=4,
                     compression_type=S.COMPRESSION_ZLIB)
    return header, exts
