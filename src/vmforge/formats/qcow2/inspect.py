"""qcow2 headers for the safe inspector: validated exactly as the reader validates them,
plus every name the image uses to point elsewhere (backing file, external data file)."""

from __future__ import annotations

from ...model.inspection import FormatFacts, Reference
from ..base import ByteSource
from . import structs as S
from .header import parse_extensions, read_header


def inspect_qcow2(src: ByteSource) -> FormatFacts:
    """Facts from the header cluster only; raises what the reader's header checks raise."""
    h, head = read_header(src)
    facts = FormatFacts("qcow2", h.size, subformat="compat 1.1" if h.version >= 3 else "compat 0.10")
    backing_format = None
    for ext in parse_extensions(head, h, src.path):
        if ext.type == S.EXT_BACKING_FORMAT:
            backing_format = ext.data.decode("utf-8", "replace")
        elif ext.type == S.EXT_DATA_FILE:
            facts.references.append(Reference("data-file", "qcow2 data file header extension",
                                              ext.data.decode("utf-8", "replace")))
    if h.incompatible_features & S.INCOMPAT_DATA_FILE and not any(
            r.kind == "data-file" for r in facts.references):
        facts.hazards["data-file"] = "external data file bit set without a data file name"
    if h.backing_file_offset and h.backing_file_size:
        name = head[h.backing_file_offset:h.backing_file_offset + h.backing_file_size]
        facts.references.append(Reference("backing-file", "qcow2 header backing_file_offset",
                                          name.decode("utf-8", "replace")))
        facts.details["backing-format"] = backing_format
    if h.incompatible_features & S.INCOMPAT_CORRUPT:
        facts.hazards["corrupt"] = "the corrupt bit is set (qemu found inconsistent metadata)"
    if h.incompatible_features & S.INCOMPAT_DIRTY:
        facts.hazards["dirty"] = "the dirty bit is set (refcounts may be stale: run check -r)"
    facts.details.update({
        "cluster-size": h.cluster_size,
        "snapshots": h.nb_snapshots,
        "compression-type": S.COMPRESSION_NAMES.get(h.compression_type, "?"),
    })
    return facts
