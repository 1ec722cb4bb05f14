"""Appliance commands: ``import`` an OVA (``export`` lives in cli/export.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import Lazy, Sub, command

if TYPE_CHECKING:
    from ..packages import ova
else:
    ova = Lazy("vmforge.packages.ova")


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


def cmd_import(args: argparse.Namespace) -> int:
    done = ova.import_ova(args.package, args.outdir, out_fmt=args.out_fmt,
                          configuration=args.configuration, require_manifest=not args.no_manifest)
    hw, sig = done.hardware, done.signature
    if not args.q:
        for name in done.files:
            print(name)
        print(f"{hw.cpus} vCPU, {hw.memory >> 20} MiB, {len(hw.disks)} disk(s), "
              f"{len(hw.nics)} NIC(s)")
        if sig is None:
            print("unsigned (no certificate file); the manifest verified every file")
        else:
            # the signature is checked; whether to trust the signer is the user's call
            kind = "self-signed" if sig.self_signed else f"issued by {sig.issuer}"
            expired = ", EXPIRED" if sig.expired else ""
            print(f"signed by {sig.subject} ({kind}, valid until {sig.not_after}{expired}); "
                  f"{sig.algorithm} signature verified, signer not checked against a trust store")
    return 0
