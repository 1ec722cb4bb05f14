"""Export profiles: what each hypervisor and cloud accepts, as rules, and exports that
keep them.

``validate(target, path)`` runs every rule of the target and reports every rule the
file breaks. ``export(target, request)`` writes the target's output under a private
name, validates it with the same rules, and only then renames it into place.
"""

from __future__ import annotations

from ..errors import OutputError, UsageError
from . import aws, azure, gcp, hyperv, kubevirt, openstack, vagrant, virtualbox, vmware
from .build import ExportRequest
from .facts import Subject
from .rules import Finding, Profile, Report, Rule, run_rules

PROFILES: dict[str, Profile] = {p.name: p for p in (
    aws.PROFILE, azure.PROFILE, gcp.PROFILE, hyperv.PROFILE, kubevirt.PROFILE,
    openstack.PROFILE, vagrant.PROFILE, virtualbox.PROFILE, vmware.PROFILE)}


def get_profile(target: str) -> Profile:
    try:
        return PROFILES[target]
    except KeyError:
        raise UsageError(f"unknown target '{target}'",
                         hint=f"targets: {', '.join(sorted(PROFILES))}") from None


def validate(target: str, path: str) -> Report:
    """Every rule of ``target`` against the file ``path`` (never changed, never followed).
    Raises ImageNotFound when ``path`` is no readable regular file."""
    profile = get_profile(target)
    with Subject(path) as subject:
        report = run_rules(profile.name, profile.rules, subject)
        if profile.notes is not None:
            report.notes.update(profile.notes(subject))
    return report


def export(target: str, request: ExportRequest) -> tuple[Report, dict[str, object]]:
    """Write ``request.output`` for ``target``; it appears only once it validates.

    Raises OutputError naming the broken rules when the output would not be accepted
    (a vmforge bug, or a source the target cannot take such as a disk without a
    partition table for AWS), and the errors of opening or converting the source.
    """
    profile = get_profile(target)
    if request.private_key is not None and not request.output.lower().endswith(".ova"):
        raise UsageError("--private-key signs OVA packages", hint="name the output NAME.ova")
    if profile.extensions and not request.output.lower().endswith(profile.extensions):
        raise UsageError(f"{request.output}: the {target} target writes "
                         f"{' or '.join(profile.extensions)} files",
                         hint=f"name the output NAME{profile.extensions[0]}")
    from ..ops.output import atomic_output

    with atomic_output(request.output) as tmp:
        notes = profile.build(request, tmp)
        report = validate(target, tmp)
        if not report.ok:
            broken = "; ".join(f"{f.rule.id}: {f.detail}" for f in report.findings)
            raise OutputError(f"{request.output}: the {target} output breaks {broken}",
                              hint="nothing was written; 'vmforge validate' explains each rule")
    report.path = request.output
    return report, notes


def export_stream(target: str, request: ExportRequest, fd: int) -> dict[str, object]:
    """Write ``target``'s output to ``fd`` (a pipe or socket: ``export -o -``), in order.

    Only targets whose output is a stream offer this (an OVA: vmware, virtualbox). The
    output cannot be validated after the fact as a file is; it is made by the same code
    as the file the tests validate. A failure leaves the stream short.
    """
    profile = get_profile(target)
    if profile.stream is None:
        raise UsageError(f"the {target} target cannot write to standard output",
                         hint="name an output file")
    return profile.stream(request, fd)


__all__ = ["ExportRequest", "Finding", "PROFILES", "Profile", "Report", "Rule", "export",
           "export_stream", "get_profile", "validate"]
