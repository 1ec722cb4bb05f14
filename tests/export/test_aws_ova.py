"""AWS boot-disk rules on OVAs: the boot disk inside the package is read in place and
judged as a single disk is (partition table, MBR size limit, standalone, readable)."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.export.common import MiB, boot_disk, mbr_sector
from tests.helpers import assert_clean_error, run_vmforge, vmforge_json, vmforge_ok
from vmforge.model.hardware import Bus, Disk, Nic, VirtualHardware
from vmforge.packages.ovf_write import descriptor_from_hardware, write_ovf

BOOT_RULES = {"aws.boot-partition", "aws.mbr-2tib", "aws.standalone", "aws.consistent"}


def violations(ova: Path) -> dict[str, str]:
    report = vmforge_json("validate", "--target", "aws", ova, ok_codes=(0, 1))
    assert set(report["checked"]) >= BOOT_RULES
    return {v["rule"]: v["detail"] for v in report["violations"]}


def stream_vmdk(src: Path, dest: Path) -> Path:
    vmforge_ok("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, dest)
    return dest


def package(dest: Path, disks: list[tuple[str, Path, int]]) -> Path:
    """An OVA of streamOptimized VMDKs (name, file, capacity), the first drive first."""
    hw = VirtualHardware(disks=tuple(Disk(n, "vmdk", Bus.SCSI) for n, _, _ in disks),
                         nics=(Nic(),))
    ovf = write_ovf(descriptor_from_hardware(
        hw, name="vm", capacities={n: c for n, _, c in disks},
        file_sizes={n: p.stat().st_size for n, p, _ in disks}))
    files = [("vm.ovf", ovf)] + [(n, p.read_bytes()) for n, p, _ in disks]
    mf = "".join(f"SHA1({n})= {hashlib.sha1(d).hexdigest()}\n" for n, d in files).encode()
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in [files[0], ("vm.mf", mf), *files[1:]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return dest


def test_partitioned_boot_disk_passes(tmp_path: Path, pattern_file: Callable[..., Path]) -> None:
    src = boot_disk(tmp_path, pattern_file)
    ova = tmp_path / "vm.ova"
    vmforge_ok("export", src, "-f", "raw", "--target", "aws", "-o", ova)
    assert violations(ova) == {}


def test_unpartitioned_disk_flagged_and_not_exported(tmp_path: Path,
                                                     pattern_file: Callable[..., Path]) -> None:
    src = pattern_file("random", size=4 * MiB)  # random bytes: no partition table
    ova = tmp_path / "vm.ova"
    vmforge_ok("export", src, "-f", "raw", "--target", "vmware", "--name", "vm", "-o", ova)
    found = violations(ova)
    assert set(found) == {"aws.boot-partition"}
    assert found["aws.boot-partition"].startswith("boot disk vm-disk1.vmdk: the first sector "
                                                  "holds no MBR or GPT")
    # the aws export keeps its own rules: no such OVA is written
    proc = run_vmforge("export", src, "-f", "raw", "--target", "aws", "-o", tmp_path / "a.ova")
    assert_clean_error(proc, contains="aws.boot-partition")
    assert not (tmp_path / "a.ova").exists()


def test_mbr_boot_disk_over_2tib(tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.write(mbr_sector())
        f.truncate(3 << 40)
    ova = tmp_path / "big.ova"
    vmforge_ok("export", big, "-f", "raw", "--target", "vmware", "--name", "big", "-o", ova)
    found = violations(ova)
    assert set(found) == {"aws.mbr-2tib"}
    assert found["aws.mbr-2tib"] == (f"boot disk big-disk1.vmdk: an MBR boot disk of {3 << 40} "
                                     "bytes is over 2 TiB (use GPT and UEFI)")


@pytest.mark.parametrize("boot_first", [True, False])
def test_boot_disk_is_the_first_drive(tmp_path: Path, pattern_file: Callable[..., Path],
                                      boot_first: bool) -> None:
    """Only the boot disk needs a partition table: a data disk without one is fine."""
    boot = stream_vmdk(boot_disk(tmp_path, pattern_file), tmp_path / "b.vmdk")
    data = stream_vmdk(pattern_file("random", size=2 * MiB), tmp_path / "d.vmdk")
    disks = [("boot.vmdk", boot, 5 * MiB + 4096), ("data.vmdk", data, 2 * MiB)]
    ova = package(tmp_path / "two.ova", disks if boot_first else disks[::-1])
    found = violations(ova)
    if boot_first:
        assert found == {}
    else:
        assert set(found) == {"aws.boot-partition"}
        assert found["aws.boot-partition"].startswith("boot disk data.vmdk: ")


def test_boot_disk_naming_a_parent(tmp_path: Path, pattern_file: Callable[..., Path]) -> None:
    vmdk = stream_vmdk(boot_disk(tmp_path, pattern_file), tmp_path / "b.vmdk")
    data = bytearray(vmdk.read_bytes())
    desc_at = struct.unpack_from("<Q", data, 28)[0] * 512
    text = bytes(data[desc_at:desc_at + 512])
    line = b'parentCID=ffffffff\n'
    assert line in text
    grown = text.replace(line, b'parentCID=12345678\nparentFileNameHint="base.vmdk"\n')
    assert grown[512:].strip(b"\0") == b""  # still inside the descriptor's sector
    data[desc_at:desc_at + 512] = grown[:512]
    vmdk.write_bytes(bytes(data))
    ova = package(tmp_path / "child.ova", [("vm-disk1.vmdk", vmdk, 5 * MiB + 4096)])
    found = violations(ova)
    assert set(found) == {"aws.standalone"}
    assert found["aws.standalone"] == "boot disk vm-disk1.vmdk: it names a parent disk (base.vmdk)"


def test_unreadable_boot_disk(tmp_path: Path, pattern_file: Callable[..., Path]) -> None:
    vmdk = stream_vmdk(boot_disk(tmp_path, pattern_file), tmp_path / "b.vmdk")
    size = vmdk.stat().st_size
    # the footer's copy of the header (the last 3 sectors: footer marker, footer,
    # end-of-stream) points its grain directory past the end of the file
    data = bytearray(vmdk.read_bytes())
    footer = size - 2 * 512
    assert data[footer:footer + 4] == b"KDMV"
    struct.pack_into("<Q", data, footer + 56, (size // 512) + 1000)
    vmdk.write_bytes(bytes(data))
    ova = package(tmp_path / "bad.ova", [("vm-disk1.vmdk", vmdk, 5 * MiB + 4096)])
    found = violations(ova)
    assert "aws.consistent" in found, found
    assert found["aws.consistent"].startswith("boot disk vm-disk1.vmdk: ")
