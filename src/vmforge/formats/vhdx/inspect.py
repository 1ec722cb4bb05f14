"""VHDX headers for the safe inspector: headers, region table, metadata, parent locator.

The BAT is not read (the reader checks every entry against the file); a log named by
the header is reported as a hazard, never replayed.
"""

from __future__ import annotations

from ...errors import CorruptImage
from ...model.inspection import FormatFacts, Reference
from ..base import ByteSource
from . import structs as S
from .meta import read_metadata, read_region_table
from .reader import read_headers

#: parent locator keys that name files (MS-VHDX 2.6.2.6.2); parent_linkage is a GUID
_PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")


def inspect_vhdx(src: ByteSource) -> FormatFacts:
    """Facts from the header section and the metadata region."""
    header = read_headers(src)
    bat, meta_region = read_region_table(src, (header.log_offset, header.log_length))
    meta = read_metadata(src, meta_region)
    _, entries = S.bat_entry_count(meta.virtual_size, meta.block_size,
                                   meta.logical_sector_size, meta.has_parent)
    if entries * 8 > bat.length:
        raise CorruptImage(f"the BAT region ({bat.length} bytes) is too small for {entries} "
                           "entries", path=src.path, offset=bat.file_offset)
    sub = "differencing" if meta.has_parent else (
        "fixed" if meta.leave_blocks_allocated else "dynamic")
    facts = FormatFacts("vhdx", meta.virtual_size, subformat=sub,
                        details={"block-size": meta.block_size,
                                 "logical-sector-size": meta.logical_sector_size})
    if any(header.log_guid):
        facts.hazards["log-replay"] = ("the header names an active log (LogGuid set): it may "
                                       "need replay; vmforge never replays it in place unasked")
    if meta.parent_locator is not None:
        for key in _PATH_KEYS:
            value = meta.parent_locator.entries.get(key)
            if value:
                facts.references.append(Reference("parent", f"VHDX parent locator {key}", value))
        if not facts.references:
            facts.hazards["parent"] = "differencing disk whose locator names no parent path"
    return facts
