"""``export`` an image for a hypervisor or cloud, and ``validate`` a file against the
rules of one (every broken rule is listed)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import UsageError
from .common import LazyChoices, Sub, add_output, command, print_json

if TYPE_CHECKING:
    from ..export import Report


# The export package (its rules, and the format and package modules they read with)
# loads only when 'export' or 'validate' is parsed or its help is shown.
def _target_names() -> list[str]:
    from ..export import PROFILES

    return sorted(PROFILES)


def _targets_help() -> str:
    from ..export import PROFILES

    return "\ntargets:\n" + "".join(f"  {name:<11} {p.summary}\n"
                                    for name, p in sorted(PROFILES.items()))


TARGETS = LazyChoices(_target_names)


def register(sub: Sub) -> None:
    p = command(sub, "export", "make what a hypervisor or cloud imports, checked by its rules",
                "  vmforge export disk.qcow2 --target azure -o disk.vhd\n"
                "  vmforge export disk.qcow2 --target gcp -o disk.tar.gz\n"
                "  vmforge export disk.qcow2 --target vmware --ovf-version 2 -o vm.ova\n"
                "  vmforge export disk.raw --target aws -o disk.vmdk\n"
                "  vmforge export disk.raw --target openstack -o disk.qcow2   "
                "prints the Glance formats\n"
                "  vmforge export disk.qcow2 --target vmware --private-key signer.pem -o vm.ova\n"
                "  vmforge export disk.qcow2 --target vmware -o - | ssh host 'cat > vm.ova'\n",
                late_epilog=_targets_help)
    p.add_argument("image")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("--target", required=True, choices=TARGETS, metavar="TARGET",
                   help="what to export for (listed below)")
    # dest, not output: --output (human/json) is the report's format
    p.add_argument("-o", dest="dest", required=True,
                   help="the file to write; '-' writes an OVA (vmware, virtualbox) to standard "
                        "output")
    p.add_argument("--ovf-version", choices=("1", "2"), default="1",
                   help="OVF version of an OVA (default 1: SHA1 manifest; 2: SHA256)")
    p.add_argument("--name", help="the machine's name (default: the image's file name)")
    p.add_argument("--cpus", default="1", help="vCPUs declared in an OVF or Vagrantfile")
    p.add_argument("--memory", default="1G", help="memory declared in an OVF or Vagrantfile")
    p.add_argument("--private-key", "--sign", dest="private_key", metavar="KEY.pem",
                   help="sign an OVA with this RSA key (PEM; like ovftool's --privateKey the "
                        "file may also hold the certificate): adds NAME.cert")
    p.add_argument("--certificate", "--cert", dest="certificate", metavar="CERT.pem",
                   help="the signer's X.509 certificate (PEM), when not in the key file")
    p.add_argument("--untrusted", action="store_true",
                   help="refuse any reference to another file (backing, data file)")
    p.add_argument("-q", action="store_true", help="quiet")
    add_output(p)
    p.set_defaults(func=cmd_export)

    p = command(sub, "validate", "check a file against a target's import rules; list every "
                "rule it breaks (exit 0 none, 1 some)",
                "  vmforge validate --target azure disk.vhd\n"
                "  vmforge validate --target gcp --output=json disk.tar.gz\n",
                late_epilog=_targets_help)
    p.add_argument("file")
    p.add_argument("--target", required=True, choices=TARGETS, metavar="TARGET",
                   help="whose rules to check (listed below)")
    p.add_argument("--untrusted", action="store_true",
                   help="accepted for symmetry: validation always treats the file as untrusted")
    add_output(p)
    p.set_defaults(func=cmd_validate)


def _print_report(report: Report) -> None:
    verdict = "valid" if report.ok else f"{len(report.findings)} rule(s) broken"
    print(f"{report.path}: {report.kind}, {report.target}: {verdict} "
          f"({len(report.checked)} rules checked)")
    for f in report.findings:
        print(f"  {f.rule.id}: {f.detail}")
        print(f"    rule: {f.rule.description} [{f.rule.source}]")


def cmd_validate(args: argparse.Namespace) -> int:
    from ..export import validate

    report = validate(args.target, args.file)
    if args.output == "json":
        print_json(report.to_dict())
    else:
        _print_report(report)
        for key, value in report.notes.items():
            print(f"{key}={value}")
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import ExportRequest, export, export_stream
    from ..model.hardware import parse_cpus, parse_memory
    from .images import _stdout_for_stream

    req = ExportRequest(image=args.image, output=args.dest, fmt=args.fmt,
                        untrusted=args.untrusted,
                        ovf_version="1.0" if args.ovf_version == "1" else "2.0",
                        name=args.name, cpus=parse_cpus(args.cpus),
                        memory=parse_memory(args.memory), private_key=args.private_key,
                        certificate=args.certificate)
    if args.dest == "-":
        if args.output == "json":
            raise UsageError("--output json cannot share standard output with the package",
                             hint="drop --output json or name an output file")
        export_stream(args.target, req, _stdout_for_stream())
        return 0
    report, notes = export(args.target, req)
    if args.output == "json":
        print_json({**report.to_dict(), **notes})
    elif not args.q:
        print(args.dest)
        for key, value in notes.items():
            print(f"{key}={value}")
    return 0
