"""Hyper-V: a VHDX disk, standalone, with a clean log.

Sources: Microsoft "VHDX Format Specification" 1.0 (2.2.2 header log GUID: a log to
replay; 2.6.2.6 parent locator), Microsoft Learn "Generation 2 virtual machine overview" (generation 2 VMs
boot only from VHDX).
"""

from __future__ import annotations

from typing import Any

from .build import ExportRequest, copy_into
from .facts import Subject
from .rules import Profile, Rule

SPEC = "Microsoft VHDX Format Specification 1.0"
GEN2 = "Microsoft Learn, 'Generation 2 virtual machine overview' (boot disks are VHDX)"


def _format(s: Subject) -> str | None:
    if s.disk is None:
        return f"the file is a {s.kind}, not a VHDX"
    if s.disk.fmt != "vhdx":
        return f"the file is {s.disk.fmt}, not a VHDX"
    return None


def _standalone(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.fmt == "vhdx" and d.references:
        return f"a differencing VHDX (.avhdx) needs its parent: {d.references}"
    return None


def _clean(s: Subject) -> str | None:
    d = s.disk
    if d is not None and d.fmt == "vhdx" and d.error:
        return d.error
    return None


RULES = (
    Rule("hyperv.format", "the file is a VHDX", GEN2, _format),
    Rule("hyperv.standalone", "the disk has no parent (not a differencing .avhdx)",
         f"{SPEC} 2.6.2.6 (parent locator)", _standalone),
    Rule("hyperv.consistent", "headers, regions and metadata are valid and no log waits "
         "to be replayed", f"{SPEC} 2.2-2.6, 2.3 (log)", _clean),
)


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    copy_into(req, path, "vhdx", {})
    return {}


PROFILE = Profile("hyperv", "a dynamic VHDX", RULES, build, (".vhdx",))
