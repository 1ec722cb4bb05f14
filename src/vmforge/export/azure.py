"""Azure: a fixed VHD whose size is a whole number of MiB and whose footer is exact.

Sources: Microsoft Learn "Prepare Linux for imaging in Azure" (general Linux
installation notes: VHDX is not supported, only fixed VHD; the virtual size must be
aligned to 1 MiB; qemu-img convert needs force_size so the footer keeps the exact size)
and "Azure managed disks: OS disk size" (1023 GiB for an OS disk from a VHD); the VHD
specification for the footer fields.
"""

from __future__ import annotations

from typing import Any

from ..formats.vhd import structs as VHD
from ..model import align_up
from .build import ExportRequest, GiB, MiB, copy_into
from .facts import DiskFacts, Subject
from .rules import Profile, Rule

DOC = "Microsoft Learn, 'Prepare Linux for imaging in Azure' (general Linux installation notes)"
VHD_SPEC = "Microsoft Virtual Hard Disk Image Format Specification, 'Hard Disk Footer Format'"
MAX_OS_DISK = 1023 * GiB


def _vhd(s: Subject) -> DiskFacts | None:
    d = s.disk
    return d if d is not None and d.fmt == "vpc" and d.vhd_footer is not None else None


def _format(s: Subject) -> str | None:
    if s.disk is None:
        return f"the file is a {s.kind}, not a VHD"
    if s.disk.fmt != "vpc":
        return f"the file is {s.disk.fmt}, not a VHD (vpc)"
    return None


def _fixed(s: Subject) -> str | None:
    d = _vhd(s)
    if d is not None and d.vhd_footer is not None and d.subformat != "fixed":
        return f"the VHD is {d.subformat} (footer disk type {d.vhd_footer.disk_type}), not fixed (2)"
    return None


def _size_mib(s: Subject) -> str | None:
    d = _vhd(s)
    if d is not None and d.vhd_footer is not None and d.vhd_footer.current_size % MiB:
        size = d.vhd_footer.current_size
        return f"current_size {size} is not a whole number of MiB (next: {align_up(size, MiB)})"
    return None


def _layout(s: Subject) -> str | None:
    d = _vhd(s)
    if d is None or d.vhd_footer is None or d.subformat != "fixed":
        return None
    if d.file_size != d.vhd_footer.current_size + VHD.FOOTER_SIZE:
        return (f"the file is {d.file_size} bytes; a fixed VHD of current_size "
                f"{d.vhd_footer.current_size} is that plus the 512-byte footer")
    if d.vhd_footer.original_size != d.vhd_footer.current_size:
        return f"original_size {d.vhd_footer.original_size} differs from current_size " \
            f"{d.vhd_footer.current_size}"
    return None


def _checksum(s: Subject) -> str | None:
    d = _vhd(s)
    if d is None or d.vhd_footer_raw is None:
        return None
    if not VHD.footer_checksum_ok(d.vhd_footer_raw):
        return "the footer checksum does not match its fields"
    return None


def _geometry(s: Subject) -> str | None:
    d = _vhd(s)
    if d is None or d.vhd_footer is None:
        return None
    f = d.vhd_footer
    if f.guest_size() != f.current_size:
        return (f"readers that size by CHS geometry (creator {f.creator_application!r}) see "
                f"{f.guest_size()} bytes, not current_size {f.current_size}")
    return None


def _os_disk(s: Subject) -> str | None:
    d = _vhd(s)
    if d is not None and d.vhd_footer is not None and d.vhd_footer.current_size > MAX_OS_DISK:
        return f"{d.vhd_footer.current_size} bytes is over 1023 GiB, the OS disk limit"
    return None


RULES = (
    Rule("azure.format", "the file is a VHD; VHDX and other formats are not accepted", DOC,
         _format),
    Rule("azure.fixed", "the VHD is fixed (footer disk type 2), not dynamic or differencing",
         DOC, _fixed),
    Rule("azure.size-mib", "the virtual size (footer current_size) is a whole number of MiB",
         DOC, _size_mib),
    Rule("azure.footer-size", "the file is exactly current_size bytes of data plus the "
         "512-byte footer; original_size equals current_size", f"{DOC}; {VHD_SPEC}", _layout),
    Rule("azure.footer-checksum", "the footer checksum (one's complement of the byte sum) "
         "is correct", VHD_SPEC, _checksum),
    Rule("azure.footer-geometry", "the CHS geometry does not round the size: a reader sizing "
         "by geometry sees current_size (qemu-img -o force_size)", f"{DOC}; QEMU block/vpc.c",
         _geometry),
    Rule("azure.os-disk-size", "an OS disk is at most 1023 GiB",
         "Microsoft Learn, 'Prepare Linux for imaging in Azure' (VHD size)", _os_disk),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    with req.open() as img:
        size = align_up(img.virtual_size, MiB)
    copy_into(req, path, "vpc", {"subformat": "fixed", "force_size": "on"}, size)
    return {"virtual_size": size}


PROFILE = Profile("azure", "a fixed VHD, size rounded up to a whole MiB, exact footer",
                  RULES, build, (".vhd",))
