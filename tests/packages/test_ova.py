"""OVA packages: import of a real VirtualBox appliance, export checked by the real tools,
and hostile packages (SECURITY.md rows 22-24) refused without writing anything."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.qemu import check_json, qemu_img, qemu_img_json
from tests.helpers import assert_clean_error, run_vmforge, vmforge_ok
from vmforge.model.hardware import VirtualHardware
from vmforge.packages.ovf import parse_ovf

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "ovf"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus/ovf")
OVF, MF, VMDK = "ubuntu.2.0.ovf", "ubuntu.2.0.mf", "ubuntu.2.0-disk1.vmdk"
Member = tuple[str, bytes] | tarfile.TarInfo


def pack(dest: Path, members: list[Member]) -> Path:
    """A tar of (name, data) regular files and raw TarInfo entries, in that order."""
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return dest


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def appliance() -> list[Member]:
    return [(OVF, corpus(OVF)), (MF, corpus(MF)), (VMDK, corpus(VMDK))]


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_virtualbox_appliance_imports(tmp_path: Path) -> None:
    ova = pack(tmp_path / "ubuntu.ova", appliance())
    out = tmp_path / "vm"
    vmforge_ok("import", ova, "-o", out, "-O", "qcow2")
    assert tree(out) == {"ubuntu.2.0-disk1.qcow2", "hardware.json", OVF}
    disk = out / "ubuntu.2.0-disk1.qcow2"
    assert qemu_img("compare", "-f", "qcow2", "-F", "vmdk", disk, CORPUS / VMDK,
                    check=False).returncode == 0
    assert check_json(disk)[0] == 0
    hw = VirtualHardware.from_dict(json.loads((out / "hardware.json").read_text()))
    assert (hw.cpus, hw.memory, len(hw.nics)) == (1, 512 << 20, 1)
    assert [(d.path, d.format, d.bus.value) for d in hw.disks] == \
        [("ubuntu.2.0-disk1.qcow2", "qcow2", "sata")]


@pytest.mark.parametrize("version,algo,tool", [("1", "SHA1", "sha1sum"), ("2", "SHA256", "sha256sum")])
def test_export_checked_by_real_tools(tmp_path: Path, version: str, algo: str, tool: str,
                                      pattern_file: Callable[..., Path]) -> None:
    src = pattern_file("mixed", size=4 << 20)
    ova = tmp_path / "vm.ova"
    vmforge_ok("export", src, "-f", "raw", "--target", "vmware", "--ovf-version", version,
               "--name", "vm", "--cpus", "2", "--memory", "2G", "-o", ova)
    names = subprocess.run(["tar", "tf", ova], capture_output=True, text=True, check=True)
    assert names.stdout.split() == ["vm.ovf", "vm.mf", "vm-disk1.vmdk"]
    with tarfile.open(ova) as tar:
        assert all(m.isreg() for m in tar.getmembers())
        x = tmp_path / "x"
        x.mkdir()
        subprocess.run(["tar", "xf", ova, "-C", x], check=True)
    mf = (x / "vm.mf").read_text()
    assert mf.startswith(f"{algo}(vm.ovf)= ") and f"{algo}(vm-disk1.vmdk)= " in mf
    # sha*sum -c wants "digest  name": the manifest's lines rewritten, digests unchanged
    lines = [ln.split("= ") for ln in mf.splitlines()]
    check = "".join(f"{d}  {n[len(algo) + 1:-1]}\n" for n, d in lines)
    subprocess.run([tool, "-c", "-"], input=check, text=True, cwd=x, check=True,
                   capture_output=True)
    vmdk = x / "vm-disk1.vmdk"
    assert check_json(vmdk, "vmdk")[0] == 0
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", vmdk, src, check=False).returncode == 0
    info = qemu_img_json("info", "--output=json", "-f", "vmdk", vmdk)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    desc = parse_ovf((x / "vm.ovf").read_bytes())
    assert desc.version == ("1.0" if version == "1" else "2.0")
    assert (desc.hardware.cpus, desc.hardware.memory) == (2, 2 << 30)
    assert desc.disks[0].capacity == info["virtual-size"] == os.path.getsize(src)
    assert desc.files[0].size == vmdk.stat().st_size
    # and vmforge imports what it exported: same bytes, same hardware
    out = tmp_path / "back"
    vmforge_ok("import", ova, "-o", out, "-O", "raw")
    assert qemu_img("compare", "-f", "raw", "-F", "raw", out / "vm-disk1.img", src,
                    check=False).returncode == 0


def _bad_digest() -> list[Member]:
    data = bytearray(corpus(VMDK))
    data[-600] ^= 1
    return [(OVF, corpus(OVF)), (MF, corpus(MF)), (VMDK, bytes(data))]


LAUGHS = b"""<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">
<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&c;</Envelope>"""
HOSTILE: dict[str, tuple[Callable[[], list[Member]], str]] = {
    "symlink": (lambda: [*appliance(), special("evil.vmdk", tarfile.SYMTYPE, "/etc/passwd")],
                "symbolic link"),
    "hardlink": (lambda: [*appliance(), special("evil.vmdk", tarfile.LNKTYPE, OVF)], "hard link"),
    "device": (lambda: [*appliance(), special("sda", tarfile.BLKTYPE)], "device"),
    "chardev": (lambda: [*appliance(), special("null", tarfile.CHRTYPE)], "device"),
    "fifo": (lambda: [*appliance(), special("pipe", tarfile.FIFOTYPE)], "FIFO"),
    "dotdot": (lambda: [(OVF, corpus(OVF)), (MF, corpus(MF)), ("../" + VMDK, corpus(VMDK))],
               "escapes"),
    "absolute": (lambda: [(OVF, corpus(OVF)), (MF, corpus(MF)), ("/tmp/" + VMDK, corpus(VMDK))],
                 "escapes"),
    "subdir": (lambda: [(OVF, corpus(OVF)), (MF, corpus(MF)), ("d/" + VMDK, corpus(VMDK))],
               "directory part"),
    "duplicate": (lambda: [*appliance(), (VMDK, corpus(VMDK))], "twice"),
    "no-ovf": (lambda: [(MF, corpus(MF)), (VMDK, corpus(VMDK))], "not the .ovf"),
    "ovf-not-first": (lambda: [(MF, corpus(MF)), (OVF, corpus(OVF)), (VMDK, corpus(VMDK))],
                      "not the .ovf"),
    "empty": (lambda: [], "no .ovf"),
    "missing-href": (lambda: [(OVF, corpus(OVF)), (MF, corpus(MF))], "lacks"),
    "digest-mismatch": (_bad_digest, "digest mismatch"),
    "no-manifest": (lambda: [(OVF, corpus(OVF)), (VMDK, corpus(VMDK))], "no manifest"),
    "unreferenced": (lambda: [*appliance(), ("extra.bin", b"x")], "not referenced"),
    "billion-laughs": (lambda: [("a.ovf", LAUGHS)], "entities"),
    "href-outside": (lambda: [("a.ovf", corpus(OVF).replace(b'href="ubuntu', b'href="../ubuntu'))],
                     "not a file of the package"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_packages_refused(tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    work = tmp_path / "w" / "inner"
    work.mkdir(parents=True)
    ova = pack(tmp_path / "w" / "bad.ova", make())
    before = tree(tmp_path)
    proc = run_vmforge("import", ova, "-o", work / "out", cwd=work)
    assert_clean_error(proc, contains=message)
    assert tree(tmp_path) == before  # no output dir, no staging leftovers, nothing outside


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "x.ova"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    assert_clean_error(run_vmforge("import", bad, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_import_refuses_existing_outputs(tmp_path: Path) -> None:
    ova = pack(tmp_path / "u.ova", appliance())
    out = tmp_path / "vm"
    out.mkdir()
    (out / "hardware.json").write_text("mine")
    assert_clean_error(run_vmforge("import", ova, "-o", out), contains="already exists")
    assert tree(out) == {"hardware.json"} and (out / "hardware.json").read_text() == "mine"


def test_no_manifest_accepted_when_asked(tmp_path: Path) -> None:
    ova = pack(tmp_path / "u.ova", [(OVF, corpus(OVF)), (VMDK, corpus(VMDK))])
    vmforge_ok("import", "--no-manifest", ova, "-o", tmp_path / "vm", "-O", "raw")
    assert (tmp_path / "vm" / "ubuntu.2.0-disk1.img").stat().st_size == 8 << 30


def test_export_leaves_nothing_on_failure(tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(b"\1" * 1024)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    proc = run_vmforge("export", src, "--target", "vmware", "-o", tmp_path / "x.tar")
    assert_clean_error(proc, contains=".ova")
    proc = run_vmforge("export", tmp_path / "missing.raw", "--target", "vmware",
                       "-o", tmp_path / "x.ova")
    assert_clean_error(proc)
    assert tree(tmp_path) == {"d.raw"}  # no .ova, no work directory left behind
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
