"""``export`` an image for a hypervisor or cloud, and ``validate`` a file against the
rules of one (every broken rule is listed)."""

from __future__ import annotations

import argparse

from ..export import PROFILES, ExportRequest, Report, export, validate
from ..model.hardware import parse_cpus, parse_memory
from .common import Sub, add_output, command, print_json

TARGETS = tuple(sorted(PROFILES))


def register(sub: Sub) -> None:
    targets = "\n".join(f"  {name:<11} {p.summary}" for name, p in sorted(PROFILES.items()))
    p = command(sub, "export", "make what a hypervisor or cloud imports, checked by its rules",
                "  vmforge export disk.qcow2 --target azure -o disk.vhd\n"
                "  vmforge export disk.qcow2 --target gcp -o disk.tar.gz\n"
                "  vmforge export disk.qcow2 --target vmware --ovf-version 2 -o vm.ova\n"
                "  vmforge export disk.raw --target aws -o disk.vmdk\n"
                "  vmforge export disk.raw --target openstack -o disk.qcow2   "
                "prints the Glance formats\n\ntargets:\n" + targets + "\n")
    p.add_argument("image")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("-o", dest="output", required=True, help="the file to write")
    p.add_argument("--ovf-version", choices=("1", "2"), default="1",
                   help="OVF version of an OVA (default 1: SHA1 manifest; 2: SHA256)")
    p.add_argument("--name", help="the machine's name (default: the image's file name)")
    p.add_argument("--cpus", default="1", help="vCPUs declared in an OVF or Vagrantfile")
    p.add_argument("--memory", default="1G", help="memory declared in an OVF or Vagrantfile")
    p.add_argument("--untrusted", action="store_true",
                   help="refuse any reference to another file (backing, data file)")
    p.add_argument("-q", action="store_true", help="quiet")
    add_output(p)
    p.set_defaults(func=cmd_export)

    p = command(sub, "validate", "check a file against a target's import rules; list every "
                "rule it breaks (exit 0 none, 1 some)",
                "  vmforge validate --target azure disk.vhd\n"
                "  vmforge validate --target gcp --output=json disk.tar.gz\n")
    p.add_argument("file")
    p.add_argument("--target", required=True, choices=TARGETS)
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
    report = validate(args.target, args.file)
    if args.output == "json":
        print_json(report.to_dict())
    else:
        _print_report(report)
        for key, value in report.notes.items():
            print(f"{key}={value}")
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    req = ExportRequest(image=args.image, output=args.output, fmt=args.fmt,
                        untrusted=args.untrusted,
                        ovf_version="1.0" if args.ovf_version == "1" else "2.0",
                        name=args.name, cpus=parse_cpus(args.cpus),
                        memory=parse_memory(args.memory))
    report, notes = export(args.target, req)
    if args.output == "json":
        print_json({**report.to_dict(), **notes})
    elif not args.q:
        print(args.output)
        for key, value in notes.items():
            print(f"{key}={value}")
    return 0
