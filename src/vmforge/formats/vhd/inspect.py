"""VHD headers for the safe inspector: footer, dynamic header, parent locators."""

from __future__ import annotations

from ...errors import LimitExceeded
from ...model.inspection import FormatFacts, Reference
from ..base import ByteSource
from . import structs as S
from .parent import read_locators
from .reader import read_dynamic_header, read_footer

_SUBFORMAT = {S.DISK_TYPE_FIXED: "fixed", S.DISK_TYPE_DYNAMIC: "dynamic",
              S.DISK_TYPE_DIFFERENCING: "differencing"}


def inspect_vpc(src: ByteSource) -> FormatFacts:
    """Facts from the footer and, for sparse disks, the dynamic header and its locators.

    The BAT itself is not read (the reader checks each block against the file size).
    """
    footer, dynamic = read_footer(src)
    size = footer.guest_size()
    if size > S.MAX_SECTORS * S.SECTOR:
        raise LimitExceeded(f"disk size {size} is beyond 2040 GiB", path=src.path,
                            limit="VHD_MAX_SECTORS")
    facts = FormatFacts("vpc", size, subformat=_SUBFORMAT.get(footer.disk_type))
    facts.details["creator-app"] = footer.creator_application.decode("latin-1").rstrip("\0")
    if not dynamic:
        return facts
    hdr = read_dynamic_header(src, footer, size)
    facts.details["block-size"] = hdr.block_size
    if footer.disk_type == S.DISK_TYPE_DIFFERENCING:
        if hdr.parent_name:
            facts.references.append(Reference("parent", "VHD dynamic header Parent Unicode Name",
                                              hdr.parent_name))
        for loc in read_locators(src, hdr):
            if loc.text:
                facts.references.append(Reference("parent", f"VHD parent locator {loc.code}",
                                                  loc.text))
    return facts
