"""AWS VM Import/Export: an OVA, a streamOptimized VMDK, a VHD/VHDX or a raw disk,
standalone and with a partitioned boot disk.

Sources: AWS VM Import/Export User Guide, "Requirements for resources you import"
(image formats: OVA, stream-optimized ESX VMDK "as made by OVF export", VHD/VHDX fixed
or dynamic, raw; boot volumes with MBR are limited to 2 TiB, GPT with UEFI boot
supported; no differencing disks). In an OVA the boot rules judge the boot disk (see
``boot_disk``), read in place from the package.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .build import ExportRequest, copy_into, write_ova
from .facts import DiskFacts, Subject, has_gpt, has_mbr
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


def boot_disk(s: Subject) -> tuple[str, DiskFacts] | None:
    """(how to name it, facts) of the disk the boot rules judge: the file itself, or an
    OVA's boot disk. That is the disk on the first disk drive of the descriptor's
    VirtualHardwareSection (VMware's "Hard disk 1"), else the first DiskSection disk
    with a file; read in place from the package."""
    if s.disk is not None:
        return "", s.disk
    ova = s.ova
    if ova is None or ova.descriptor is None:
        return None
    desc = ova.descriptor
    disk_ids = [d.disk_id for d in desc.hardware.drives if d.kind == "disk" and d.disk_id]
    disk_ids += [d.disk_id for d in desc.disks]
    for disk_id in disk_ids:
        with contextlib.suppress(KeyError):
            ref = desc.disk(disk_id).file_ref
            if ref is None:
                continue  # a blank disk the appliance creates: nothing to boot from
            href = desc.file(ref).href
            facts = ova.disks.get(href)
            return (f"boot disk {href}: ", facts) if facts is not None else None
    return None


def _standalone(s: Subject) -> str | None:
    found = boot_disk(s)
    if found is None:
        return None
    where, d = found
    if d.references:
        return where + d.references
    if d.subformat == "differencing":
        return where + "a differencing VHD needs its parent"
    return None


def _partitioned(s: Subject) -> str | None:
    found = boot_disk(s)
    if found is None:
        return None
    where, d = found
    if d.fmt not in FORMATS or d.references or d.boot_sector is None:
        return None
    if not (has_mbr(d.boot_sector) or has_gpt(d.boot_sector)):
        return where + "the first sector holds no MBR or GPT partition table: not a boot disk"
    return None


def _mbr_size(s: Subject) -> str | None:
    found = boot_disk(s)
    if found is None:
        return None
    where, d = found
    if d.virtual_size is None or not has_mbr(d.boot_sector):
        return None
    if d.virtual_size > MBR_LIMIT:
        return (where + f"an MBR boot disk of {d.virtual_size} bytes is over 2 TiB "
                "(use GPT and UEFI)")
    return None


def _readable(s: Subject) -> str | None:
    found = boot_disk(s)
    if found is None:
        return None
    where, d = found
    if d.fmt in FORMATS and d.error:
        return where + d.error
    return None


RULES = (
    Rule("aws.format", "the file is an OVA, a VMDK, a VHD/VHDX (fixed or dynamic) or raw",
         DOC, _format),
    # AWS documents no check of the manifest or of a signature
    *ova_rules("aws", skip=("manifest", "manifest-algorithm", "signature")),
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
        return write_ova(req, path)
    if out.endswith(".vhd"):
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
