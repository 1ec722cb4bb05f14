"""VMDK headers for the safe inspector: the sparse header (or footer), the descriptor,
and every file it names (extents, parent) - none of them opened."""

from __future__ import annotations

from ...errors import LimitExceeded, UnsupportedFeature
from ...model.inspection import FormatFacts, Reference
from ..base import ByteSource
from . import structs as S
from .descriptor import MAX_DESCRIPTOR_BYTES, check_extent_name, parse_descriptor
from .extents import read_sparse_header
from .reader import TEXT_CREATE_TYPES, read_embedded_descriptor

SECTOR = S.SECTOR_SIZE


def inspect_vmdk(src: ByteSource) -> FormatFacts:
    """Facts from the headers only; the grain directory and tables are not read."""
    head = src.pread_upto(0, SECTOR)
    if head[:4] == S.SPARSE_MAGIC:
        h = read_sparse_header(src, head)
        desc = read_embedded_descriptor(src, h)
        sub = "streamOptimized" if h.compressed else "monolithicSparse"
        facts = FormatFacts("vmdk", h.capacity * SECTOR, subformat=sub,
                            details={"cluster-size": h.grainSize * SECTOR, "cid": desc.cid})
    elif head[:4] == S.COWD_MAGIC:
        raise UnsupportedFeature("bare ESX sparse extent (COWD)", path=src.path,
                                 hint="inspect the vmfsSparse descriptor file that names it")
    elif S.is_sesparse(head):
        se = S.SESparseConstHeader.unpack(head)
        return FormatFacts("vmdk", se.capacity * SECTOR, subformat="seSparse")
    else:
        if src.size > MAX_DESCRIPTOR_BYTES:
            raise LimitExceeded(f"VMDK descriptor file of {src.size} bytes is larger than "
                                f"{MAX_DESCRIPTOR_BYTES}", path=src.path, limit="descriptor size")
        desc = parse_descriptor(src.pread(0, src.size), src.path)
        if desc.create_type not in TEXT_CREATE_TYPES:
            raise UnsupportedFeature(f"VMDK createType '{desc.create_type}' in a descriptor "
                                     "file", path=src.path)
        facts = FormatFacts("vmdk", desc.virtual_sectors * SECTOR, subformat=desc.create_type,
                            details={"cid": desc.cid})
        # a descriptor file holds no data: every extent it names is another file
        for i, line in enumerate(desc.extents, start=1):
            if line.filename is not None:
                check_extent_name(line.filename, src.path)
                facts.references.append(Reference("extent", f"VMDK descriptor extent {i}",
                                                  line.filename))
    if desc.parent_filename_hint is not None:
        facts.references.append(Reference("backing-file", "VMDK descriptor parentFileNameHint",
                                          desc.parent_filename_hint))
    return facts
