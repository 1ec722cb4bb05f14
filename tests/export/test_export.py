"""Each target: export a small generated disk, validate passes, and the peers (qemu-img,
GNU tar, sha256sum, Python json) read what was written."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.qemu import check_json, qemu_img, qemu_img_json
from tests.export.common import MiB, boot_disk
from tests.helpers import assert_clean_error, run_vmforge, vmforge_json, vmforge_ok

GiB = 1 << 30


@pytest.fixture()
def src(tmp_path: Path, pattern_file: Callable[..., Path]) -> Path:
    return boot_disk(tmp_path, pattern_file)


def export(src: Path, target: str, out: Path, *extra: str) -> Path:
    vmforge_ok("export", src, "-f", "raw", "--target", target, "-o", out, *extra)
    report = vmforge_json("validate", "--target", target, out)
    assert report["valid"] and report["violations"] == [], report
    assert report["checked"], "no rule was checked"
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")], "temporary files left"
    return out


def same_disk(disk: Path, fmt: str, src: Path, *, checkable: bool = True) -> None:
    proc = qemu_img("compare", "-f", fmt, "-F", "raw", disk, src, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if checkable:
        assert check_json(disk, fmt)[0] == 0


def untar(archive: Path, dest: Path, *flags: str) -> Path:
    dest.mkdir()
    subprocess.run(["tar", *flags, "-xf", archive, "-C", dest], check=True, capture_output=True)
    return dest


def test_azure_footer_byte_by_byte(tmp_path: Path, src: Path) -> None:
    vhd = export(src, "azure", tmp_path / "disk.vhd")
    size = 6 * MiB  # 5 MiB + 4 KiB rounded up to a whole MiB
    assert vhd.stat().st_size == size + 512
    footer = vhd.read_bytes()[-512:]
    assert footer[0:8] == b"conectix"
    assert struct.unpack(">I", footer[8:12])[0] == 2  # features: reserved bit
    assert struct.unpack(">I", footer[12:16])[0] == 0x00010000  # file format version
    assert footer[16:24] == b"\xff" * 8  # data offset of a fixed disk
    assert struct.unpack(">Q", footer[40:48])[0] == size  # original size
    assert struct.unpack(">Q", footer[48:56])[0] == size  # current size: exact, no CHS
    assert struct.unpack(">I", footer[60:64])[0] == 2  # disk type: fixed
    stored = struct.unpack(">I", footer[64:68])[0]
    assert stored == ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF
    info = qemu_img_json("info", "-f", "vpc", vhd)
    assert info["virtual-size"] == size
    same_disk(vhd, "vpc", src, checkable=False)  # qemu-img cannot check vpc


def test_gcp_sparse_oldgnu_tar(tmp_path: Path, src: Path) -> None:
    tgz = export(src, "gcp", tmp_path / "disk.tar.gz")
    listing = subprocess.run(["tar", "-tvzf", tgz], check=True, capture_output=True, text=True)
    assert listing.stdout.split()[-1] == "disk.raw"
    with open(tgz, "rb") as f:
        import gzip

        head = gzip.GzipFile(fileobj=f).read(512)
    assert head[257:265] == b"ustar  \x00" and head[156:157] == b"S"  # oldgnu, sparse
    x = untar(tgz, tmp_path / "x", "-z")
    raw = x / "disk.raw"
    assert raw.stat().st_size == GiB  # a whole GiB
    assert raw.stat().st_blocks * 512 <= src.stat().st_blocks * 512 + MiB  # extracted sparse
    same_disk(raw, "raw", src, checkable=False)


def test_gcp_many_regions_use_extension_blocks(tmp_path: Path) -> None:
    """More data regions than the header's 4 slots, and an image bigger than 8 GiB
    (base-256 size fields): GNU tar still extracts the right bytes and size."""
    src = tmp_path / "frag.raw"
    with open(src, "wb") as f:
        f.truncate(9 * GiB)
        for i in range(30):
            f.seek(i * 3 * MiB + 4096 * i)
            f.write(bytes([i + 1]) * 5000)
    tgz = export(src, "gcp", tmp_path / "disk.tar.gz")
    x = untar(tgz, tmp_path / "x", "-z")
    assert (x / "disk.raw").stat().st_size == 9 * GiB
    same_disk(x / "disk.raw", "raw", src, checkable=False)


@pytest.mark.parametrize("target,version", [("vmware", "1"), ("vmware", "2"),
                                            ("virtualbox", "2"), ("aws", "1")])
def test_ova_targets(tmp_path: Path, src: Path, target: str, version: str) -> None:
    ova = export(src, target, tmp_path / "vm.ova", "--ovf-version", version, "--name", "vm")
    names = subprocess.run(["tar", "tf", ova], check=True, capture_output=True, text=True)
    assert names.stdout.split() == ["vm.ovf", "vm.mf", "vm-disk1.vmdk"]
    x = untar(ova, tmp_path / "x")
    algo, tool = ("SHA1", "sha1sum") if version == "1" else ("SHA256", "sha256sum")
    lines = [ln.split("= ") for ln in (x / "vm.mf").read_text().splitlines()]
    check = "".join(f"{d}  {n[len(algo) + 1:-1]}\n" for n, d in lines)
    subprocess.run([tool, "-c", "-"], input=check, text=True, cwd=x, check=True,
                   capture_output=True)
    same_disk(x / "vm-disk1.vmdk", "vmdk", src)
    assert (x / "vm-disk1.vmdk").read_bytes()[4:8] == b"\x03\x00\x00\x00"  # version 3


@pytest.mark.parametrize("target,name,fmt,create_type", [
    ("vmware", "d.vmdk", "vmdk", "streamOptimized"),
    ("aws", "d.vmdk", "vmdk", "streamOptimized"),
    ("aws", "d.vhd", "vpc", None),
    ("aws", "d.vhdx", "vhdx", None),
    ("aws", "d.raw", "raw", None),
    ("virtualbox", "d.vdi", "vdi", None),
    ("hyperv", "d.vhdx", "vhdx", None),
    ("openstack", "d.qcow2", "qcow2", None),
])
def test_disk_targets(tmp_path: Path, src: Path, target: str, name: str, fmt: str,
                      create_type: str | None) -> None:
    out = export(src, target, tmp_path / name)
    info = qemu_img_json("info", "-f", fmt, out)
    if create_type:
        assert info["format-specific"]["data"]["create-type"] == create_type
    same_disk(out, fmt, src, checkable=fmt not in ("vpc", "raw"))


def test_openstack_prints_glance_formats(tmp_path: Path, src: Path) -> None:
    proc = vmforge_ok("export", src, "-f", "raw", "--target", "openstack", "-o",
                      tmp_path / "d.qcow2")
    assert "disk_format=qcow2" in proc.stdout.split()
    assert "container_format=bare" in proc.stdout.split()
    report = vmforge_json("validate", "--target", "openstack", tmp_path / "d.qcow2")
    assert (report["disk_format"], report["container_format"]) == ("qcow2", "bare")
    assert qemu_img_json("info", tmp_path / "d.qcow2")["format-specific"]["data"]["compat"] \
        == "1.1"


def test_vagrant_box(tmp_path: Path, src: Path) -> None:
    box = export(src, "vagrant", tmp_path / "vm.box", "--cpus", "2", "--memory", "512M")
    x = untar(box, tmp_path / "x", "-z")
    assert sorted(os.listdir(x)) == ["Vagrantfile", "box.img", "metadata.json"]
    meta = json.loads((x / "metadata.json").read_text())
    assert meta == {"provider": "libvirt", "format": "qcow2", "virtual_size": 1}
    assert "libvirt.cpus = 2" in (x / "Vagrantfile").read_text()
    assert "libvirt.memory = 512" in (x / "Vagrantfile").read_text()
    same_disk(x / "box.img", "qcow2", src)


def test_kubevirt_oci_layout(tmp_path: Path, src: Path) -> None:
    image = export(src, "kubevirt", tmp_path / "disk.tar")
    x = untar(image, tmp_path / "x")
    assert json.loads((x / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"

    def blob(desc: dict[str, object]) -> bytes:
        digest = str(desc["digest"])
        data = (x / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert len(data) == desc["size"]
        return data

    index = json.loads((x / "index.json").read_text())
    assert index["schemaVersion"] == 2
    manifest = json.loads(blob(index["manifests"][0]))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = json.loads(blob(manifest["config"]))
    layer = blob(manifest["layers"][0])
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    layer_path = tmp_path / "layer.tar"
    layer_path.write_bytes(layer)
    listing = subprocess.run(["tar", "--numeric-owner", "-tvf", layer_path], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    owners = {ln.split()[-1]: ln.split()[1] for ln in listing}
    assert owners == {"disk/": "107/107", "disk/disk.img": "107/107"}
    with tarfile.open(layer_path) as t:
        member = t.getmember("disk/disk.img")
        disk = tmp_path / "disk.img"
        f = t.extractfile(member)
        assert f is not None
        disk.write_bytes(f.read())
    same_disk(disk, "qcow2", src)


def test_export_refuses_what_the_target_would_reject(tmp_path: Path,
                                                     pattern_file: Callable[..., Path]) -> None:
    """AWS needs a partitioned boot disk: the output is validated before it is renamed."""
    src = pattern_file("mixed", size=4 * MiB)
    out = tmp_path / "d.vmdk"
    proc = run_vmforge("export", src, "-f", "raw", "--target", "aws", "-o", out)
    assert_clean_error(proc, contains="aws.boot-partition")
    assert os.listdir(tmp_path) == []


def test_unknown_target_is_a_usage_error(tmp_path: Path, src: Path) -> None:
    assert_clean_error(run_vmforge("validate", "--target", "nope", src), codes=(2,))
