"""SECURITY.md rows not owned by one format's tests: 19 (an output that would probe as
another format) and 27 (a guest that wrote an image header into its own raw disk).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import assert_clean_error, run_vmforge, vmforge_ok


@pytest.fixture
def raw_disk_with_qcow2_header(tmp_path: Path) -> Path:
    """A raw disk whose guest wrote a qcow2 header naming /etc/passwd at its start."""
    header = tmp_path / "header.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", "-u", header, "1M")
    disk = tmp_path / "guest.raw"
    disk.write_bytes(header.read_bytes())
    os.truncate(disk, 4 << 20)
    return disk


def test_row19_raw_output_that_would_probe_as_qcow2_is_refused(
        raw_disk_with_qcow2_header: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    proc = run_vmforge("convert", "-f", "raw", "-O", "raw", raw_disk_with_qcow2_header, out)
    assert_clean_error(proc, contains="would be probed as qcow2")
    assert not out.exists() and not list(tmp_path.glob(".out.raw*"))
    # the same disk in a format with its own header is fine, and reads back as raw bytes
    vmforge_ok("convert", "-f", "raw", "-O", "qcow2", raw_disk_with_qcow2_header,
               tmp_path / "out.qcow2")
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", tmp_path / "out.qcow2", back)
    assert back.read_bytes() == raw_disk_with_qcow2_header.read_bytes()


def test_row27_recorded_raw_backing_is_never_reprobed(raw_disk_with_qcow2_header: Path,
                                                      tmp_path: Path, opened_files: list[str]) -> None:
    overlay = tmp_path / "vm.qcow2"
    vmforge_ok("create", "-q", "-f", "qcow2", "-b", raw_disk_with_qcow2_header.name, "-F", "raw",
               overlay, cwd=tmp_path)
    out = tmp_path / "flat.qcow2"
    opened_files.clear()
    vmforge_ok("convert", "-O", "qcow2", overlay, out)
    assert "/etc/passwd" not in opened_files, "the guest's fake header was followed"
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", out, back)
    assert back.read_bytes() == raw_disk_with_qcow2_header.read_bytes()
    # untrusted mode goes further: a file named raw that carries a header is refused
    proc = run_vmforge("convert", "--untrusted", "-f", "raw", "-O", "qcow2",
                       raw_disk_with_qcow2_header, tmp_path / "x.qcow2")
    assert_clean_error(proc, contains="named raw but the file is qcow2")


def test_row9_quota_refuses_before_writing_even_a_compressed_bomb(tmp_path: Path) -> None:
    """A qcow2 claiming 64 TiB (every cluster could map one shared compressed cluster):
    refused by the quota before any output exists."""
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, "64T")
    out = tmp_path / "out.raw"
    proc = run_vmforge("convert", "--untrusted", "--max-virtual-size", "100G", "-O", "raw",
                       big, out)
    assert_clean_error(proc, contains="exceeds the quota")
    assert list(tmp_path.iterdir()) == [big]
    small = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", small, "1G")
    vmforge_ok("convert", "--max-virtual-size", "1G", "-O", "qcow2", small, tmp_path / "ok.qcow2")
