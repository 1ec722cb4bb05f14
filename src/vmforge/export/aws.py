"""AWS VM Import/Export: an OVA, a streamOptimized VMDK, a VHD/VHDX or a raw disk,
standalone and with a partitioned boot disk.

Sources: AWS VM Import/Export User Guide, "Requirements for resources you import"
(image formats: OVA, stream-optimized ESX VMDK "as made by OVF export", VHD/VHDX fixed
or dynamic, raw; boot volumes with MBR are limited to 2 TiB, GPT with UEFI boot
supported; no differencing disks).
"""

from __future__ import annotations

from typing import Any

from ..packages.ova import export_ova
from .build import ExportRequest, copy_into
from .facts import Subject, has_gpt, has_mbr
from .ova_rules import ova_rules
from .rules import Profile, Rule

DOC = "AWS VM Import/Export User Guide, 'Requirements for resources you import'"
FORMATS = ("vmdk", "vpc", "vhdx", "raw")
MBR_LIMIT = 2 << 40


def _format(s: Subject) -> str | None:
    if s.tar is not None:
        return None
    if s.disk is not None and s.disk.fmt not in FORMATS:
        return f"{s.disk.fmt} is not an importable format (OVA, VMDK, VHD, VHDX, raw)"
    return None


def _standalone(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.references:
        return d.references
    if d is not None and d.subformat == "differencing":
        return "a differencing VHD needs its parent"
    return None


def _partitioned(s: Subject) -> str | None:
    d = s.disk
    if d is None or d.fmt not in FORMATS or d.references or d.boot_sector is None:
        return None
    if not (has_mbr(d.boot_sector) or has_gpt(d.boot_sector)):
        return "the first sector holds no MBR or GPT partition table: not a boot disk"
    return None


def _mbr_size(s: Subject) -> str | None:
    d = s.disk
    if d is None or d.virtual_size is None or not has_mbr(d.boot_sector):
        return None
    if d.virtual_size > MBR_LIMIT:
        return f"an MBR boot disk of {d.virtual_size} bytes is over 2 TiB (use GPT and UEFI)"
    return None


def _readable(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.fmt in FORMATS and d.error:
        return d.error
    return None


RULES = (
    Rule("aws.format", "the file is an OVA, a VMDK, a VHD/VHDX (fixed or dynamic) or raw",
         DOC, _format),
    *ova_rules("aws", skip=("manifest", "manifest-algorithm")),
    Rule("aws.standalone", "the disk names no other file (no differencing disk, no backing)",
         DOC, _standalone),
    Rule("aws.consistent", "the disk's metadata is valid", DOC, _readable),
    Rule("aws.boot-partition", "the boot disk has an MBR or GPT partition table", DOC,
         _partitioned),
    Rule("aws.mbr-2tib", "an MBR-partitioned boot disk is at most 2 TiB", DOC, _mbr_size),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    out = req.output.lower()
    if out.endswith(".ova"):
        export_ova(req.image, path, src_fmt=req.fmt, version=req.ovf_version, name=req.base,
                   cpus=req.cpus, memory=req.memory, untrusted=req.untrusted)
    elif out.endswith(".vhd"):
        copy_into(req, path, "vpc", {"subformat": "dynamic", "force_size": "on"})
    elif out.endswith(".vhdx"):
        copy_into(req, path, "vhdx", {})
    elif out.endswith((".raw", ".img")):
        copy_into(req, path, "raw", {})
    else:
        copy_into(req, path, "vmdk", {"subformat": "streamOptimized", "adapter_type": "lsilogic"})
    return {}


PROFILE = Profile("aws", "a streamOptimized VMDK; an OVA, dynamic VHD, VHDX or raw disk "
                  "by the output's extension (.ova, .vhd, .vhdx, .raw/.img)", RULES, build,
                  (".vmdk", ".ova", ".vhd", ".vhdx", ".raw", ".img"))
