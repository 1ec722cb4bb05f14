"""Appliance commands: ``import`` an OVA, ``export`` an image as an OVA."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..model.hardware import parse_cpus, parse_memory
from ..packages.ova import export_ova, import_ova
from .common import Sub, command

TARGETS = ("vmware",)


def register(sub: Sub) -> None:
    p = command(sub, "import", "verify an OVA appliance and convert its disks",
                "  vmforge import appliance.ova -o vm/              qcow2 disks + hardware.json\n"
                "  vmforge import -O raw appliance.ova -o vm/\n"
                "  vmforge import --configuration 2CPU-4GB router.ova -o vm/\n")
    p.add_argument("package", help="the .ova file")
    p.add_argument("-o", dest="outdir", required=True, help="output directory (created)")
    p.add_argument("-O", dest="out_fmt", default="qcow2", help="disk format (default qcow2)")
    p.add_argument("--configuration", help="the OVF deployment option to use (default: its default)")
    p.add_argument("--no-manifest", action="store_true",
                   help="accept a package without a manifest (its files are then unverified)")
    p.add_argument("--untrusted", action="store_true",
                   help="accepted for symmetry: an import always treats the package as untrusted")
    p.add_argument("-q", action="store_true", help="quiet")
    p.set_defaults(func=cmd_import)

    p = command(sub, "export", "package an image for a hypervisor (an OVA for VMware)",
                "  vmforge export disk.qcow2 --target vmware -o vm.ova        OVF 1.0, SHA1 manifest\n"
                "  vmforge export disk.qcow2 --target vmware --ovf-version 2 -o vm.ova   SHA256\n")
    p.add_argument("image")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("-o", dest="output", required=True, help="the .ova to write")
    p.add_argument("--ovf-version", choices=("1", "2"), default="1")
    p.add_argument("--name", help="the machine's name (default: the image's file name)")
    p.add_argument("--cpus", default="1", help="vCPUs declared in the OVF (default 1)")
    p.add_argument("--memory", default="1G", help="memory declared in the OVF (default 1G)")
    p.add_argument("--untrusted", action="store_true",
                   help="refuse any reference to another file (backing, data file)")
    p.add_argument("-q", action="store_true", help="quiet")
    p.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    hw, files = import_ova(args.package, args.outdir, out_fmt=args.out_fmt,
                           configuration=args.configuration, require_manifest=not args.no_manifest)
    if not args.q:
        for name in files:
            print(name)
        print(f"{hw.cpus} vCPU, {hw.memory >> 20} MiB, {len(hw.disks)} disk(s), "
              f"{len(hw.nics)} NIC(s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not args.output.endswith(".ova"):
        raise UsageError(f"{args.output}: the vmware target writes an .ova file",
                         hint="name the output NAME.ova")
    export_ova(args.image, args.output, src_fmt=args.fmt,
               version="1.0" if args.ovf_version == "1" else "2.0", name=args.name,
               cpus=parse_cpus(args.cpus), memory=parse_memory(args.memory),
               untrusted=args.untrusted)
    if not args.q:
        print(args.output)
    return 0
