"""OpenStack Glance: an image in a disk_format Glance knows, in a bare or ova container.

Sources: OpenStack Glance documentation, "Disk and container formats", and the
image format inspector Glance and Nova use since OSSA-2024-001/-002 (no backing
files, no external data files, VMDK only monolithicSparse or streamOptimized).
"""

from __future__ import annotations

from typing import Any

from .build import ExportRequest, copy_into
from .facts import Subject
from .rules import Profile, Rule

DOC = "OpenStack Glance, 'Disk and container formats'"
INSPECTOR = "OpenStack OSSA-2024-001 / OSSA-2024-002 (Glance format inspector)"
#: qemu-img's format name -> Glance disk_format
GLANCE = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx",
          "vdi": "vdi", "parallels": "ploop"}
VMDK_OK = ("monolithicSparse", "streamOptimized")


def formats(s: Subject) -> dict[str, Any]:
    """The ``disk_format``/``container_format`` to give Glance for this file."""
    if s.ova is not None:
        return {"disk_format": "vmdk", "container_format": "ova"}
    fmt = s.disk.fmt if s.disk is not None else None
    return {"disk_format": GLANCE.get(fmt or ""), "container_format": "bare"}


def _format(s: Subject) -> str | None:
    if s.tar is not None:
        return None if s.ova is not None else "a tar that is not an OVA has no Glance container"
    d = s.disk
    if d is not None and d.fmt not in GLANCE:
        return f"{d.fmt} is not a Glance disk_format (raw, qcow2, vmdk, vhd, vhdx, vdi, ploop)"
    return None


def _vmdk(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.fmt == "vmdk" and d.subformat not in VMDK_OK:
        return f"a {d.subformat} VMDK is refused; Glance takes monolithicSparse or streamOptimized"
    return None


def _standalone(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.references:
        return d.references
    return None


def _consistent(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.error and d.fmt in GLANCE:
        return d.error
    return None


RULES = (
    Rule("openstack.disk-format", "the file is in a Glance disk_format (raw, qcow2, vmdk, "
         "vhd, vhdx, vdi, ploop) or an OVA (container_format ova)", DOC, _format),
    Rule("openstack.vmdk-subformat", "a VMDK is monolithicSparse or streamOptimized",
         INSPECTOR, _vmdk),
    Rule("openstack.standalone", "the image names no other file (backing file, data file, "
         "extent files)", INSPECTOR, _standalone),
    Rule("openstack.consistent", "the image's metadata is valid (the inspector refuses "
         "damaged images)", INSPECTOR, _consistent),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    copy_into(req, path, "qcow2", {"compat": "1.1"})
    return {"disk_format": "qcow2", "container_format": "bare"}


PROFILE = Profile("openstack", "a qcow2 (v3) image; prints the Glance disk_format and "
                  "container_format", RULES, build, (".qcow2", ".img"), notes=formats)
