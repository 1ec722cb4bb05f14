"""Streamed OVA export: no temporary copy of the disk, to a file (one pass, reserved
header space) and to a pipe (two passes); checked with tar, sha*sum and qemu-img."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.data.qemu import check_json, qemu_img
from tests.helpers import assert_clean_error, run_vmforge_inprocess, vmforge_cmd, vmforge_ok
from vmforge.errors import OutputError
from vmforge.packages import ova_write
from vmforge.packages.ovf import parse_ovf

MiB = 1 << 20
ALGO = {"1": ("SHA1", "sha1sum"), "2": ("SHA256", "sha256sum")}


def export_to_pipe(*args: Any, cwd: Path | None = None) -> bytes:
    """``vmforge export ... -o -`` as a real process whose standard output is a pipe."""
    proc = subprocess.run([*vmforge_cmd(), "export", *map(str, args), "-o", "-"],
                          capture_output=True, timeout=300, stdin=subprocess.DEVNULL, cwd=cwd)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b"", proc.stderr.decode()
    return proc.stdout


def tar_listing(ova: Path) -> list[tuple[str, int]]:
    """(name, size) of each member, as GNU tar lists them."""
    out = subprocess.run(["tar", "tvf", ova], capture_output=True, text=True, check=True).stdout
    return [(line.split()[5], int(line.split()[2])) for line in out.splitlines()]


def check_package(ova: Path, src: Path, version: str, dest: Path) -> dict[str, bytes]:
    """Every peer check of an unsigned single-disk package; returns the members."""
    algo, tool = ALGO[version]
    listing = tar_listing(ova)
    assert [n for n, _ in listing] == ["vm.ovf", "vm.mf", "vm-disk1.vmdk"]
    dest.mkdir()
    subprocess.run(["tar", "xf", ova, "-C", dest], check=True)
    assert [(n, (dest / n).stat().st_size) for n, _ in listing] == listing
    mf = (dest / "vm.mf").read_text()
    lines = [ln.split("= ") for ln in mf.splitlines()]
    assert [n for n, _ in lines] == [f"{algo}(vm.ovf)", f"{algo}(vm-disk1.vmdk)"]
    check = "".join(f"{d}  {n[len(algo) + 1:-1]}\n" for n, d in lines)
    subprocess.run([tool, "--strict", "-c", "-"], input=check, text=True, cwd=dest, check=True,
                   capture_output=True)
    vmdk = dest / "vm-disk1.vmdk"
    assert check_json(vmdk, "vmdk")[0] == 0
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", vmdk, src, check=False).returncode == 0
    desc = parse_ovf((dest / "vm.ovf").read_bytes())
    assert desc.files[0].size == vmdk.stat().st_size
    assert desc.disks[0].capacity == -(-src.stat().st_size // 512) * 512
    return {n: (dest / n).read_bytes() for n, _ in listing}


@pytest.mark.parametrize("pattern,version", [("mixed", "1"), ("odd_size", "2")])
def test_file_and_pipe_exports(tmp_path: Path, pattern_file: Callable[..., Path], pattern: str,
                               version: str) -> None:
    src = pattern_file(pattern, size=6 * MiB)
    args = (src, "-f", "raw", "--target", "vmware", "--ovf-version", version, "--name", "vm")
    out = tmp_path / "out"
    out.mkdir()
    vmforge_ok("export", *args, "-o", out / "vm.ova")
    assert sorted(p.name for p in out.iterdir()) == ["vm.ova"]  # no temporary file left
    by_file = check_package(out / "vm.ova", src, version, tmp_path / "x-file")

    piped = tmp_path / "piped.ova"
    piped.write_bytes(export_to_pipe(*args))
    by_pipe = check_package(piped, src, version, tmp_path / "x-pipe")
    # the same descriptor either way; the disks differ only by the descriptor's random CID
    assert by_pipe["vm.ovf"] == by_file["vm.ovf"]
    assert len(by_pipe["vm-disk1.vmdk"]) == len(by_file["vm-disk1.vmdk"])
    assert piped.stat().st_size == (out / "vm.ova").stat().st_size
    assert piped.stat().st_size % ova_write.RECORD == 0
    assert vmforge_ok("validate", "--target", "vmware", piped).returncode == 0


def test_failure_leaves_nothing(tmp_path: Path, pattern_file: Callable[..., Path],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failure half-way through the disk (a full disk): no .ova, no temp file."""
    src = pattern_file("mixed", size=6 * MiB)
    real = ova_write.copy

    def failing(source: Any, writer: Any, **kw: Any) -> Any:
        real_write = writer.write_compressed
        seen = [0]

        def write_compressed(offset: int, data: bytes) -> None:
            seen[0] += 1
            if seen[0] > 8:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(offset, data)

        writer.write_compressed = write_compressed
        return real(source, writer, **kw)

    monkeypatch.setattr(ova_write, "copy", failing)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_vmforge_inprocess("export", src, "-f", "raw", "--target", "vmware",
                                 "-o", out / "vm.ova")
    assert_clean_error(proc, contains="No space left on device")
    assert list(out.iterdir()) == []


def test_reader_closing_the_pipe_is_a_clean_error(pattern_file: Callable[..., Path]) -> None:
    src = pattern_file("random", size=6 * MiB)
    proc = subprocess.Popen([*vmforge_cmd(), "export", src, "-f", "raw", "--target", "vmware",
                             "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(4096)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert tarfile.TarInfo.frombuf(head[:512], "utf-8", "strict").name.endswith(".ovf")
    completed = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_clean_error(completed, contains="standard output")


def test_source_changing_between_pipe_passes_fails(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(os.urandom(MiB))
    real = ova_write.copy
    calls = [0]

    def changing(source: Any, writer: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # between the counting pass and the sending pass
            with open(src, "r+b") as f:
                f.write(b"changed")
        return real(source, writer, **kw)

    monkeypatch.setattr(ova_write, "copy", changing)
    r, w = os.pipe()
    got: list[bytes] = []
    drain = threading.Thread(target=lambda: got.append(_read_all(r)))
    drain.start()
    try:
        with pytest.raises(OutputError, match="source changed"):
            ova_write.export_ova(str(src), "-", src_fmt="raw", stream_fd=w)
    finally:
        os.close(w)
        drain.join()
        os.close(r)
    assert calls[0] == 2 and got[0]  # the headers went out before the change was found


@pytest.mark.parametrize("kind,passes", [("file", 1), ("append", 2), ("pipe", 2)])
def test_standard_output_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               pattern_file: Callable[..., Path], kind: str, passes: int) -> None:
    """``-o -`` redirected to a regular file is written in place (one pass, from the
    file's current offset); a pipe or an O_APPEND file (``>>``) gets the two passes."""
    src = pattern_file("mixed", size=4 * MiB)
    real = ova_write.copy
    calls = [0]

    def counting(source: Any, writer: Any, **kw: Any) -> Any:
        calls[0] += 1
        return real(source, writer, **kw)

    monkeypatch.setattr(ova_write, "copy", counting)
    prefix = b"earlier output\n"
    out = tmp_path / "out.bin"
    out.write_bytes(prefix)
    if kind == "pipe":
        r, w = os.pipe()
        got: list[bytes] = []
        drain = threading.Thread(target=lambda: got.append(_read_all(r)))
        drain.start()
        try:
            ova_write.export_ova(str(src), "-", src_fmt="raw", name="vm", stream_fd=w)
        finally:
            os.close(w)
            drain.join()
            os.close(r)
        out.write_bytes(prefix + got[0])
    else:
        fd = os.open(out, os.O_WRONLY | (os.O_APPEND if kind == "append" else 0))
        try:
            os.lseek(fd, len(prefix), os.SEEK_SET)
            ova_write.export_ova(str(src), "-", src_fmt="raw", name="vm", stream_fd=fd)
            assert os.lseek(fd, 0, os.SEEK_CUR) == out.stat().st_size  # left at the end
        finally:
            os.close(fd)
    assert calls[0] == passes
    data = out.read_bytes()
    assert data.startswith(prefix)
    ova = tmp_path / "vm.ova"
    ova.write_bytes(data[len(prefix):])
    assert ova.stat().st_size % ova_write.RECORD == 0
    check_package(ova, src, "1", tmp_path / "x")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("size", [0, 1, 511, 8**11 - 1, 8**11, 3 << 40, (1 << 63) - 1])
def test_ustar_header_sizes(size: int) -> None:
    """Sizes of 8 GiB and more use the base-256 field; the header stays ustar and sums."""
    block = ova_write.ustar_header("vm-disk1.vmdk", size, 1_700_000_000)
    assert len(block) == 512 and block[257:265] == b"ustar\x0000"
    info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")  # checks the checksum too
    assert (info.name, info.size, info.mode, info.uid, info.mtime) == \
        ("vm-disk1.vmdk", size, 0o644, 0, 1_700_000_000)
    assert (block[124] & 0x80 != 0) == (size >= 8**11)


def _package(base: str, version: str, nics: int = 1) -> Any:
    from vmforge.model.hardware import Bus, Disk, Nic, NicModel, VirtualHardware

    hw = VirtualHardware(cpus=2, memory=1 << 30, serial=False,
                         disks=(Disk(f"{base}-disk1.vmdk", "vmdk", Bus.SCSI),),
                         nics=(Nic(NicModel.E1000),) * nics)
    algo = "SHA1" if version == "1.0" else "SHA256"
    return ova_write._Package(base, version, hw, 4 * MiB, algo, None, 0)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_reserved_header_space_fits_every_disk_size(version: str) -> None:
    """The one-pass layout's promise: whatever the disk's size, the members before it
    take exactly the reserved space, and a padded descriptor is still the same OVF."""
    padded = 0
    # descriptors from 3.3 to 4.4 KiB: some cross a 512-byte boundary with the size digits
    for n, nics in ((n, nics) for n in range(1, 49, 3) for nics in (1, 2, 3, 4)):
        pkg = _package("v" * n, version, nics)
        reserved = pkg.head_size()
        for disk_size in (512, 65536 * 7, 10**6 + 512, 10**9, 10**12, ova_write.MAX_DISK_FILE):
            head = pkg.head(disk_size, hashlib.new(pkg.algo.lower(), b"").hexdigest())
            assert len(head) == reserved, (n, disk_size)
            (ovf_name, ovf), _ = pkg.members(disk_size, "0" * 64)[:2]
            text = ovf.rstrip(b"\n")
            padded += len(ovf) - len(text) > 1
            desc = parse_ovf(ovf)
            assert desc.files[0].size == disk_size and desc.version == version
            assert ovf_name == f"{pkg.base}.ovf"
    assert padded  # the rule was exercised, not only the lucky case
