"""VMware (vSphere, Workstation, Fusion, ovftool): an OVA with OVF 1.0 or 2.0 and
streamOptimized VMDK disks of header version 3, or such a VMDK on its own.

Sources: DMTF DSP0243 (packages, manifest); VMware "Virtual Disk Format 5.0"
(stream-optimized extents); VMware ovftool's strict manifest spelling.
"""

from __future__ import annotations

from typing import Any

from .build import ExportRequest, copy_into, stream_ova, write_ova
from .facts import Subject
from .ova_rules import DSP0243, ova_rules
from .rules import Profile, Rule


def _format(s: Subject) -> str | None:
    if s.tar is not None:
        return None  # the package rules judge it
    if s.disk is not None and s.disk.fmt != "vmdk":
        return f"the file is {s.disk.fmt}: VMware imports an OVA or a streamOptimized VMDK"
    return None


RULES = (
    Rule("vmware.format", "the file is an OVA or a VMDK", DSP0243, _format),
    *ova_rules("vmware"),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    if req.output.endswith(".vmdk"):
        copy_into(req, path, "vmdk", {"subformat": "streamOptimized", "adapter_type": "lsilogic"})
        return {}
    return write_ova(req, path)


PROFILE = Profile("vmware", "an OVA (OVF 1.0 or 2.0, streamOptimized VMDK version 3); "
                  "a bare streamOptimized VMDK when the output ends in .vmdk", RULES, build,
                  (".ova", ".vmdk"), stream=stream_ova)
