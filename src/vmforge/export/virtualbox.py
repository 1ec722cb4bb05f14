"""VirtualBox: an OVA (as VirtualBox's own export writes it) or a VDI disk.

Sources: DMTF DSP0243 for OVAs; VirtualBox VDICore.h (header signature and version
1.1, image types, 1 MiB blocks) and the VirtualBox manual "Importing and Exporting
Virtual Machines" (OVF 1.0/2.0, VMDK disks).
"""

from __future__ import annotations

from typing import Any

from ..formats.vdi import structs as VDI
from .build import ExportRequest, copy_into, stream_ova, write_ova
from .facts import Subject
from .ova_rules import ova_rules
from .rules import Profile, Rule

MANUAL = "VirtualBox manual, 'Importing and Exporting Virtual Machines'"
VDICORE = "VirtualBox src/VBox/Storage/VDICore.h (VDIHEADER1PLUS, VDI_IMAGE_TYPE_*)"


def _format(s: Subject) -> str | None:
    if s.tar is not None:
        return None
    if s.disk is not None and s.disk.fmt != "vdi":
        return f"the file is {s.disk.fmt}: VirtualBox imports an OVA, or attaches a VDI"
    return None


def _vdi_header(s: Subject) -> str | None:
    h = s.disk.vdi_header if s.disk is not None else None
    if h is None:
        return None
    if h.u32Signature != VDI.SIGNATURE:
        return f"header signature {h.u32Signature:#x} is not {VDI.SIGNATURE:#x}"
    if h.u32Version != VDI.VERSION_1_1:
        return f"header version {h.version_text} is not 1.1"
    if h.cbBlock != VDI.BLOCK_SIZE:
        return f"block size {h.cbBlock} is not 1 MiB"
    if h.cbDisk % VDI.SECTOR_SIZE:
        return f"disk size {h.cbDisk} is not a whole number of 512-byte sectors"
    return None


def _vdi_type(s: Subject) -> str | None:
    h = s.disk.vdi_header if s.disk is not None else None
    if h is not None and h.u32Type not in (VDI.TYPE_NORMAL, VDI.TYPE_FIXED):
        return f"a {VDI.TYPE_NAMES.get(h.u32Type, h.u32Type)} VDI needs its parent; " \
            "export a standalone (normal or fixed) disk"
    return None


def _vdi_readable(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.fmt == "vdi" and d.error:
        return d.error
    return None


RULES = (
    Rule("virtualbox.format", "the file is an OVA or a VDI", MANUAL, _format),
    *ova_rules("virtualbox", skip=("vmdk-version",)),
    Rule("virtualbox.vdi-header", "a VDI has header version 1.1, 1 MiB blocks and a size in "
         "whole sectors", VDICORE, _vdi_header),
    Rule("virtualbox.vdi-type", "a VDI is standalone (normal or fixed), not a differencing "
         "or undo image", VDICORE, _vdi_type),
    Rule("virtualbox.vdi-consistent", "the VDI's block map is consistent", VDICORE,
         _vdi_readable),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    if req.output.endswith(".vdi"):
        copy_into(req, path, "vdi", {})
        return {}
    return write_ova(req, path)


PROFILE = Profile("virtualbox", "an OVA (OVF 1.0 or 2.0); a dynamic VDI when the output "
                  "ends in .vdi", RULES, build, (".ova", ".vdi"), stream=stream_ova)
