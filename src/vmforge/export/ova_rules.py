"""Rules every OVA importer applies (VMware, VirtualBox, AWS VM Import), as data.

Sources: DMTF DSP0243 2.1.1 section 5.3 (member order, USTAR), 5.1 (manifest), 9.1
(DiskSection format URI); the VMDK specification ("Stream-Optimized Compressed Sparse
Extents": header version 3 for VMware products).
"""

from __future__ import annotations

from ..errors import VmforgeError
from .facts import USTAR_MAGIC, DiskFacts, Subject
from .rules import Rule

DSP0243 = "DMTF DSP0243 2.1.1 section 5.3 (OVF packages)"
DSP0243_MF = "DMTF DSP0243 2.1.1 section 5.1 (manifest)"
DSP0243_DISK = "DMTF DSP0243 2.1.1 section 9.1 (DiskSection format URI)"
DSP0243_CERT = ("DMTF DSP0243 2.1.1 section 5.2 (certificate); VMware OVF Tool User's Guide, "
                "'OVF Package Signing'")
VMDK_SPEC = "VMware Virtual Disk Format 5.0, 'Stream-Optimized Compressed Sparse Extents'"


def vmdk_disks(s: Subject) -> list[tuple[str, DiskFacts | None]]:
    """The VMDK disks to judge: a bare file, or every disk an OVA's descriptor lists."""
    if s.disk is not None:
        return [(s.path, s.disk)] if s.disk.fmt == "vmdk" else []
    if s.ova is None:
        return []
    return list(s.ova.disks.items())


def _ovf_first(s: Subject) -> str | None:
    tar = s.tar
    if tar is None:
        return None
    if tar.error:
        return tar.error
    if not tar.members:
        return "the package is empty"
    if s.ova is None:
        return f"the first member is {tar.members[0].name!r}, not the .ovf descriptor"
    return None


def _ustar(s: Subject) -> str | None:
    if s.tar is None or not s.tar.members:
        return None
    bad = [m.name for m in s.tar.members if m.magic != USTAR_MAGIC]
    if bad:
        return f"member {bad[0]!r} is not in USTAR format (GNU or PAX header)"
    odd = [m.name for m in s.tar.members if not m.info.isfile() or "/" in m.name]
    if odd:
        return f"member {odd[0]!r} is not a plain regular file"
    if s.tar.gzip:
        return "the package is compressed (an OVA is a plain tar)"
    return None


def _ovf_parses(s: Subject) -> str | None:
    if s.ova is None:
        return None
    if s.ova.ovf_error:
        return f"the descriptor is not valid OVF 1.x/2.x: {s.ova.ovf_error}"
    return None


def _manifest(s: Subject) -> str | None:
    ova = s.ova
    if ova is None:
        return None
    if ova.manifest_member is None:
        return "the package has no manifest (.mf)"
    if ova.manifest_error:
        return ova.manifest_error
    assert ova.manifest is not None
    for name, got in ova.digests.items():
        if name not in ova.manifest:
            return f"the manifest has no digest for {name}"
        algo, want = ova.manifest[name]
        if got is None or got.get(algo) != want:
            return f"the {algo} digest of {name} does not match the manifest"
    for name in ova.manifest:
        if name not in ova.digests:
            return f"the manifest names {name}, which the package lacks"
    # VMware's parser wants exactly "ALGO(name)= hex": one space, after '=' only
    for line in (ova.manifest_text or b"").decode("ascii", "replace").splitlines():
        if line.strip() and (")= " not in line or "  " in line or line.endswith(" ")):
            return f"manifest line {line[:60]!r} is not spelt 'SHA256(name)= hex'"
    return None


def _manifest_algo(s: Subject) -> str | None:
    ova = s.ova
    if ova is None or ova.descriptor is None or not ova.manifest:
        return None
    want = "SHA1" if ova.descriptor.version.startswith("1") else "SHA256"
    algos = {a for a, _ in ova.manifest.values()}
    if algos != {want}:
        return (f"an OVF {ova.descriptor.version} manifest uses {want}, this one "
                f"{', '.join(sorted(algos))}")
    return None


def _order(s: Subject) -> str | None:
    ova, tar = s.ova, s.tar
    if ova is None or tar is None or ova.descriptor is None:
        return None
    names = [m.name for m in tar.members]
    if ova.manifest_member is not None and names.index(ova.manifest_member.name) != 1:
        return "the manifest does not immediately follow the descriptor"
    if ova.cert_member is not None and ova.manifest_member is not None and \
            names.index(ova.cert_member.name) != 2:
        return "the certificate file does not immediately follow the manifest"
    rest = [n for n in names[1:] if not n.lower().endswith((".mf", ".cert"))]
    hrefs = [f.href for f in ova.descriptor.files]
    missing = [h for h in hrefs if h not in rest]
    if missing:
        return f"the descriptor references {missing[0]}, which the package lacks"
    extra = [n for n in rest if n not in hrefs]
    if extra:
        return f"member {extra[0]} is not referenced by the descriptor"
    if rest != hrefs:
        return f"files are in the order {rest}, the References section says {hrefs}"
    for f in ova.descriptor.files:
        member = tar.find(f.href)
        if member is not None and f.size is not None and f.size != member.info.size:
            return f"{f.href} is {member.info.size} bytes, the descriptor says {f.size}"
    return None


def _stream_optimized(s: Subject) -> str | None:
    if s.ova is not None and s.ova.descriptor is not None:
        for d in s.ova.descriptor.disks:
            if d.file_ref is not None and d.vmdk_subformat != "streamOptimized":
                return f"disk {d.disk_id} has format {d.format!r}, not the streamOptimized URI"
    for name, disk in vmdk_disks(s):
        if disk is None:
            continue
        if disk.fmt != "vmdk":
            return f"{name} is {disk.fmt}, not a VMDK"
        if disk.subformat != "streamOptimized":
            return f"{name} is a {disk.subformat} VMDK, not streamOptimized"
    return None


def _signature(s: Subject) -> str | None:
    ova = s.ova
    if ova is None or ova.cert_member is None:
        return None  # an unsigned package is valid
    if ova.manifest_member is None or ova.manifest_text is None:
        return "the package has a certificate file but no manifest for it to sign"
    if ova.cert_text is None:
        return "the certificate file is unreadable or too large"
    from ..packages.signing import verify_cert_file  # on use: cryptography is heavy

    try:
        verify_cert_file(ova.cert_text, ova.manifest_member.name, ova.manifest_text,
                         ova.cert_member.name)
    except VmforgeError as err:
        return str(err)
    return None


def _version3(s: Subject) -> str | None:
    for name, disk in vmdk_disks(s):
        h = disk.vmdk_header if disk else None
        if h is not None and disk is not None and disk.subformat == "streamOptimized" \
                and h.version != 3:
            return f"{name} has sparse header version {h.version}, not 3"
    return None


def ova_rules(target: str, skip: tuple[str, ...] = ()) -> tuple[Rule, ...]:
    """The package rules, with ids under ``target`` (``skip``: rule names left out)."""
    rules = (
        Rule(f"{target}.ova-ovf-first", "an OVA is a tar whose first member is the .ovf "
             "descriptor", DSP0243, _ovf_first),
        Rule(f"{target}.ova-ustar", "OVA members are plain regular files in USTAR format, "
             "the tar uncompressed", DSP0243, _ustar),
        Rule(f"{target}.ovf-valid", "the descriptor is well-formed OVF 1.x or 2.x",
             "DMTF DSP0243 1.1.0 / 2.1.1", _ovf_parses),
        Rule(f"{target}.ova-order", "the manifest follows the descriptor (and a certificate "
             "the manifest), then the files in References order, sizes as declared, nothing "
             "else", DSP0243, _order),
        Rule(f"{target}.manifest", "a manifest lists a digest of every file, each matches, "
             "spelt 'SHA256(name)= hex'", DSP0243_MF, _manifest),
        Rule(f"{target}.manifest-algorithm", "SHA1 digests for OVF 1.x, SHA256 for OVF 2.x",
             DSP0243_MF, _manifest_algo),
        Rule(f"{target}.signature", "a certificate file, when present, holds a signature of "
             "the manifest that its certificate verifies", DSP0243_CERT, _signature),
        Rule(f"{target}.vmdk-stream", "disks are streamOptimized VMDKs, declared with the "
             "#streamOptimized format URI", f"{DSP0243_DISK}; {VMDK_SPEC}", _stream_optimized),
        Rule(f"{target}.vmdk-version", "a streamOptimized VMDK has sparse header version 3",
             f"{VMDK_SPEC}; qemu block/vmdk.c writes version 3 because VMware products accept "
             "only that", _version3),
    )
    return tuple(r for r in rules if r.id.split(".", 1)[1] not in skip)
