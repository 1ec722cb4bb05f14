"""Every rule of every profile flagged by at least one broken file (and validate exits 1
listing all the rules a file breaks); a generated check keeps the table complete."""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img
from tests.export.common import MiB, boot_disk, mbr_sector
from tests.helpers import poke, run_vmforge, tar_members, vmforge_json, vmforge_ok
from vmforge.export import PROFILES
from vmforge.formats.vdi import structs as VDI
from vmforge.formats.vhd import structs as VHD

Build = Callable[["Kit"], Path]


class Kit:
    """Good outputs made once per test, and a place for broken ones."""

    def __init__(self, tmp: Path, pattern_file: Callable[..., Path]) -> None:
        self.tmp = tmp
        self.src = boot_disk(tmp, pattern_file, size=6 * MiB)
        self._made: dict[str, Path] = {}

    def good(self, target: str, name: str, *extra: str) -> Path:
        key = f"{target}-{name}"
        if key not in self._made:
            out = self.tmp / key
            vmforge_ok("export", self.src, "-f", "raw", "--target", target, "-o", out, *extra)
            self._made[key] = out
        return self._made[key]

    def path(self, name: str) -> Path:
        return self.tmp / name

    def copy(self, target: str, name: str) -> Path:
        dest = self.path("broken-" + name)
        shutil.copyfile(self.good(target, name), dest)
        return dest

    def qemu(self, name: str, fmt: str, opts: str, size: str | None = None,
             src: Path | None = None) -> Path:
        dest = self.path(name)
        if size is not None:
            qemu_img("create", "-f", fmt, *(["-o", opts] if opts else []), dest, size)
        else:
            qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", opts] if opts else []),
                     src or self.src, dest)
        return dest


def tar_of(dest: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT,
           gz: bool = False, owner: tuple[int, int] = (0, 0)) -> Path:
    with tarfile.open(dest, "w:gz" if gz else "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, (info.uid, info.gid) = len(data), owner
            t.addfile(info, io.BytesIO(data))
    return dest


# --- OVA surgery ---------------------------------------------------------------------

def ova_members(kit: Kit, target: str, version: str = "1") -> list[tuple[str, bytes]]:
    ova = kit.good(target, f"v{version}.ova", "--ovf-version", version, "--name", "vm")
    return tar_members(ova)


def manifest(members: list[tuple[str, bytes]], algo: str) -> bytes:
    return "".join(f"{algo}({n})= {hashlib.new(algo.lower(), d).hexdigest()}\n"
                   for n, d in members).encode()


def ova_broken(kind: str, target: str) -> Build:
    def build(kit: Kit) -> Path:
        ovf, mf, disk = ova_members(kit, target)
        dest = kit.path(f"{kind}.ova")
        if kind == "ovf-first":
            return tar_of(dest, [mf, ovf, disk])
        if kind == "ustar":
            return tar_of(dest, [ovf, mf, disk], fmt=tarfile.GNU_FORMAT)
        if kind == "order":
            return tar_of(dest, [ovf, disk, mf])
        if kind == "manifest":
            return tar_of(dest, [ovf, disk])
        if kind == "algorithm":  # OVF 1.0 with a SHA256 manifest
            return tar_of(dest, [ovf, ("vm.mf", manifest([ovf, disk], "SHA256")), disk])
        if kind == "ovf-valid":
            bad = ("vm.ovf", b"<Envelope/>")
            return tar_of(dest, [bad, ("vm.mf", manifest([bad, disk], "SHA1")), disk])
        if kind == "signature":  # a well-formed certificate file whose signature is wrong
            return tar_of(dest, [ovf, mf, ("vm.cert", bogus_cert("vm.mf")), disk])
        data = bytearray(disk[1])
        if kind == "version":  # streamOptimized header version 1
            data[4:8] = struct.pack("<I", 1)
        else:  # "stream": a monolithicSparse VMDK under the streamOptimized name
            sparse = kit.qemu("sparse.vmdk", "vmdk", "")
            data = bytearray(sparse.read_bytes())
        bad_disk = (disk[0], bytes(data))
        text = ovf[1].replace(str(len(disk[1])).encode(), str(len(data)).encode())
        new_ovf = (ovf[0], text)
        return tar_of(dest, [new_ovf, ("vm.mf", manifest([new_ovf, bad_disk], "SHA1")),
                             bad_disk])
    return build


OVA_CASES = {"ova-ovf-first": "ovf-first", "ova-ustar": "ustar", "ova-order": "order",
             "manifest": "manifest", "manifest-algorithm": "algorithm",
             "ovf-valid": "ovf-valid", "vmdk-stream": "stream", "vmdk-version": "version",
             "signature": "signature"}


def bogus_cert(mf_name: str) -> bytes:
    """A certificate file with a real self-signed certificate and a zero signature."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rules test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return (f"SHA1({mf_name})= {'00' * 256}\n".encode()
            + cert.public_bytes(serialization.Encoding.PEM))


# --- VHD footer surgery ----------------------------------------------------------------

def footer_edit(kit: Kit, **fields: object) -> Path:
    vhd = kit.copy("azure", "disk.vhd")
    size = vhd.stat().st_size
    with open(vhd, "r+b") as f:
        f.seek(size - 512)
        footer = VHD.Footer.unpack(f.read(512))
        f.seek(size - 512)
        f.write(dataclasses.replace(footer, **fields).sealed())  # type: ignore[arg-type]
    return vhd


def bad_checksum(kit: Kit) -> Path:
    vhd = kit.copy("azure", "disk.vhd")
    poke(vhd, vhd.stat().st_size - 512 + 100, "B", 1)  # a reserved byte, checksum unchanged
    return vhd


def vdi_edit(kit: Kit, **fields: object) -> Path:
    vdi = kit.copy("virtualbox", "d.vdi")
    h = VDI.Header.unpack(vdi.read_bytes()[:512])
    poke(vdi, 0, "512s", dataclasses.replace(h, **fields).pack())  # type: ignore[arg-type]
    return vdi


def vdi_bad_map(kit: Kit) -> Path:
    vdi = kit.copy("virtualbox", "d.vdi")
    h = VDI.Header.unpack(vdi.read_bytes()[:512])
    poke(vdi, h.offBlocks, "<I", 0x7FFFFF)  # block 0 stored far past the end of the file
    return vdi


def odd_size_vhd(kit: Kit) -> Path:
    """A fixed VHD of 1 MiB + 512 bytes, exact footer (force_size) but not whole MiB."""
    raw = kit.path("odd.raw")
    raw.write_bytes(b"x" * (MiB + 512))
    return kit.qemu("odd.vhd", "vpc", "subformat=fixed,force_size=on", src=raw)


def gnu_tar(kit: Kit, name: str, src: Path, *flags: str) -> Path:
    work = kit.path("gnutar-" + name)
    work.mkdir()
    shutil.copyfile(src, work / name)
    dest = kit.path(f"{name}.tar.gz")
    subprocess.run(["tar", *flags, "-czf", dest, "-C", work, name], check=True)
    return dest


def gunzipped(kit: Kit) -> Path:
    dest = kit.path("plain.tar")
    dest.write_bytes(gzip.decompress(kit.good("gcp", "disk.tar.gz").read_bytes()))
    return dest


def child(kit: Kit, fmt: str, ext: str) -> Path:
    base = kit.good("hyperv" if fmt == "vhdx" else "aws", f"d.{ext}")
    dest = kit.path(f"child.{ext}")
    vmforge_ok("create", "-f", fmt, "-b", base.name, "-F", fmt, dest)
    return dest


def three_tib_mbr(kit: Kit) -> Path:
    dest = kit.path("big.raw")
    with open(dest, "wb") as f:
        f.write(mbr_sector())
        f.truncate(3 << 40)
    return dest


def qcow2_bad_l1(kit: Kit) -> Path:
    q = kit.copy("openstack", "d.qcow2")
    poke(q, 40, ">Q", 1 << 50)  # l1_table_offset far past the end of the file
    return q


def truncated_vmdk(kit: Kit) -> Path:
    v = kit.copy("aws", "d.vmdk")
    with open(v, "r+b") as f:
        f.truncate(v.stat().st_size // 2)
    return v


def vhdx_bad_headers(kit: Kit) -> Path:
    v = kit.copy("hyperv", "d.vhdx")
    for at in (64 << 10, 128 << 10):  # both headers: checksum no longer matches
        poke(v, at + 100, "B", 0x5A)
    return v


# --- Vagrant and OCI builders ----------------------------------------------------------

def box(kit: Kit, name: str, *, meta: dict[str, object] | None = None, img: Path | None = None,
        drop: str | None = None) -> Path:
    x = kit.path("box-" + name)
    x.mkdir()
    subprocess.run(["tar", "-xzf", kit.good("vagrant", "v.box"), "-C", x], check=True)
    if meta is not None:
        (x / "metadata.json").write_text(json.dumps(meta))
    if img is not None:
        shutil.copyfile(img, x / "box.img")
    members = [(n, (x / n).read_bytes()) for n in ("metadata.json", "Vagrantfile", "box.img")
               if n != drop]
    return tar_of(kit.path(f"{name}.box"), members, gz=True)


def oci(kit: Kit, name: str, *, disk: Path | None = None, disk_name: str = "disk/disk.img",
        owner: tuple[int, int] = (107, 107), layout: bool = True, schema: int = 2,
        config_type: str = "application/vnd.oci.image.config.v1+json",
        diff_id: str | None = None, tamper_blob: bool = False) -> Path:
    """An OCI image-layout tar made here, independently of vmforge's writer."""
    disk = disk or kit.good("openstack", "d.qcow2")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        data = disk.read_bytes()
        info = tarfile.TarInfo(disk_name)
        info.size, (info.uid, info.gid) = len(data), owner
        t.addfile(info, io.BytesIO(data))
    lb = layer.getvalue()

    def d(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id or d(lb)]}}).encode()
    man = json.dumps({"schemaVersion": 2,
                      "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": config_type, "digest": d(config),
                                 "size": len(config)},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                  "digest": d(lb), "size": len(lb)}]}).encode()
    index = json.dumps({"schemaVersion": schema, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d(man),
         "size": len(man)}]}).encode()
    blobs = [(f"blobs/sha256/{d(b)[7:]}", b) for b in (config, man, lb)]
    if tamper_blob:
        blobs[0] = (blobs[0][0], blobs[0][1].replace(b"amd64", b"arm64"))
    members = ([("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')] if layout else []) + \
        [("index.json", index), *blobs]
    return tar_of(kit.path(f"{name}.tar"), members, fmt=tarfile.PAX_FORMAT)


CASES: dict[str, Build] = {
    "azure.format": lambda k: k.good("hyperv", "d.vhdx"),
    "azure.fixed": lambda k: k.qemu("dyn.vhd", "vpc", "subformat=dynamic,force_size=on"),
    "azure.size-mib": odd_size_vhd,
    "azure.footer-size": lambda k: footer_edit(k, original_size=5 * MiB),
    "azure.footer-checksum": bad_checksum,
    "azure.footer-geometry": lambda k: footer_edit(k, creator_application=b"vpc ",
                                                   cylinders=100, heads=4, sectors_per_track=17),
    "azure.os-disk-size": lambda k: k.qemu("huge.vhd", "vpc", "subformat=fixed,force_size=on",
                                           size="1024G"),
    "gcp.archive": gunzipped,
    "gcp.tar-format": lambda k: tar_of(k.path("pax.tar.gz"), [("disk.raw", b"\0" * 512)],
                                       fmt=tarfile.PAX_FORMAT, gz=True),
    "gcp.disk-name": lambda k: gnu_tar(k, "disk.img", k.src, "--format=oldgnu", "-S"),
    "gcp.sparse": lambda k: gnu_tar(k, "disk.raw", k.src, "--format=oldgnu"),
    "gcp.size-gib": lambda k: gnu_tar(k, "disk.raw", k.src, "--format=oldgnu", "-S"),
    "gcp.raw": lambda k: gnu_tar(k, "disk.raw", k.good("openstack", "d.qcow2"),
                                 "--format=oldgnu", "-S"),
    "vmware.format": lambda k: k.good("openstack", "d.qcow2"),
    "virtualbox.format": lambda k: k.good("hyperv", "d.vhdx"),
    "virtualbox.vdi-header": lambda k: vdi_edit(k, cbBlock=2 * MiB),
    "virtualbox.vdi-type": lambda k: vdi_edit(k, u32Type=VDI.TYPE_UNDO),
    "virtualbox.vdi-consistent": vdi_bad_map,
    "hyperv.format": lambda k: k.good("aws", "d.vhd"),
    "hyperv.standalone": lambda k: child(k, "vhdx", "vhdx"),
    "hyperv.consistent": vhdx_bad_headers,
    "openstack.disk-format": lambda k: k.good("gcp", "disk.tar.gz"),
    "openstack.vmdk-subformat": lambda k: k.qemu("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
    "openstack.standalone": lambda k: k.qemu("overlay.qcow2", "qcow2",
                                             f"backing_file={k.src},backing_fmt=raw", size="6M"),
    "openstack.consistent": qcow2_bad_l1,
    "aws.format": lambda k: k.good("openstack", "d.qcow2"),
    "aws.standalone": lambda k: child(k, "vpc", "vhd"),
    "aws.consistent": truncated_vmdk,
    "aws.boot-partition": lambda k: k.qemu("blank.vhd", "vpc", "", size="8M"),
    "aws.mbr-2tib": three_tib_mbr,
    "vagrant.archive": lambda k: k.good("openstack", "d.qcow2"),
    "vagrant.members": lambda k: box(k, "novf", drop="Vagrantfile"),
    "vagrant.metadata": lambda k: box(k, "vbox", meta={"provider": "virtualbox",
                                                       "format": "qcow2", "virtual_size": 1}),
    "vagrant.box-format": lambda k: box(k, "rawimg", img=k.src),
    "vagrant.virtual-size": lambda k: box(k, "small", img=k.qemu("2g.qcow2", "qcow2", "",
                                                                  size="2G")),
    "kubevirt.archive": lambda k: k.good("openstack", "d.qcow2"),
    "kubevirt.oci-layout": lambda k: oci(k, "nolayout", layout=False),
    "kubevirt.index": lambda k: oci(k, "schema1", schema=1),
    "kubevirt.digests": lambda k: oci(k, "tampered", tamper_blob=True),
    "kubevirt.manifest": lambda k: oci(k, "dockercfg", config_type="application/json"),
    "kubevirt.config": lambda k: oci(k, "diffid", diff_id="sha256:" + "0" * 64),
    "kubevirt.disk-path": lambda k: oci(k, "rootdisk", disk_name="root/disk.img"),
    "kubevirt.disk-owner": lambda k: oci(k, "rootowned", owner=(0, 0)),
    "kubevirt.disk-format": lambda k: oci(k, "vmdkdisk", disk=k.good("aws", "d.vmdk")),
}
for _target in ("vmware", "virtualbox", "aws"):
    for _rule, _kind in OVA_CASES.items():
        if f"{_target}.{_rule}" in {r.id for r in PROFILES[_target].rules}:
            CASES[f"{_target}.{_rule}"] = ova_broken(_kind, _target)


def test_every_rule_has_a_broken_file() -> None:
    ids = {r.id for p in PROFILES.values() for r in p.rules}
    assert ids - set(CASES) == set(), "rules without a broken file"
    assert set(CASES) - ids == set(), "broken files for rules that do not exist"


def test_every_rule_has_its_source() -> None:
    for p in PROFILES.values():
        for r in p.rules:
            assert r.id.startswith(p.name + ".") and r.description and r.source, r


@pytest.mark.parametrize("rule", sorted(CASES))
def test_broken_file_is_flagged(rule: str, tmp_path: Path,
                                pattern_file: Callable[..., Path]) -> None:
    kit = Kit(tmp_path, pattern_file)
    target = rule.split(".")[0]
    broken = CASES[rule](kit)
    before = broken.read_bytes()[:4096] if broken.stat().st_size < (1 << 30) else None
    report = vmforge_json("validate", "--target", target, broken, ok_codes=(1,))
    assert not report["valid"]
    flagged = [v["rule"] for v in report["violations"]]
    assert rule in flagged, report
    assert all(v["detail"] and v["source"] for v in report["violations"])
    if before is not None:
        assert broken.read_bytes()[:4096] == before  # validate never writes


def test_human_output_lists_every_broken_rule(tmp_path: Path,
                                              pattern_file: Callable[..., Path]) -> None:
    kit = Kit(tmp_path, pattern_file)
    dyn = kit.qemu("odd-dyn.vhd", "vpc", "subformat=dynamic", size="5000K")
    out = run_vmforge("validate", "--target", "azure", dyn)
    assert out.returncode == 1
    assert "azure.fixed:" in out.stdout and "azure.size-mib:" in out.stdout
