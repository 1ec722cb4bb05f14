"""SECURITY.md row 26: partition tables are read as sfdisk (util-linux) reads them, and
overlapping or out-of-disk entries are reported, never followed blindly."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import assert_clean_error, run_vmforge, vmforge_json
from vmforge.guest.partitions import read_partition_table
from vmforge.safety import inspect, inspect_path

MiB = 1 << 20
pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None,
                                reason="sfdisk (the fdisk package) is not installed")

LAYOUTS = {
    "mbr": "label: dos\n,4M,83,*\n,8M,82\n,,5\n,3M,83\n,,83\n",
    "gpt": "label: gpt\nsize=4M, type=L, name=root\nsize=8M, type=S\ntype=U\n",
}


def _disk(tmp_path: Path, layout: str, size: int = 32 * MiB) -> Path:
    disk = tmp_path / f"{layout}.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", disk], input=LAYOUTS[layout], text=True, check=True,
                   capture_output=True)
    return disk


def _sfdisk(disk: Path) -> list[tuple[int, int]]:
    out = json.loads(subprocess.run(["sfdisk", "--json", disk], capture_output=True,
                                    text=True, check=True).stdout)
    return [(p["start"] * 512, p["size"] * 512) for p in out["partitiontable"]["partitions"]]


def _read(path: Path):
    data = path.read_bytes()
    return (lambda off, n: data[off:off + n]), len(data)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reads_what_sfdisk_wrote(tmp_path: Path, layout: str) -> None:
    disk = _disk(tmp_path, layout)
    table = read_partition_table(*_read(disk))
    assert table.scheme == ("mbr" if layout == "mbr" else "gpt")
    assert table.problems == []
    assert [(p.start, p.length) for p in table.partitions] == _sfdisk(disk)
    # through an image format too, and in the inspector for the raw disk
    qcow = tmp_path / "disk.qcow2"
    qemu_img("convert", "-O", "qcow2", disk, qcow)
    listed = vmforge_json("partitions", "--output=json", qcow)
    assert [(p["start"], p["length"]) for p in listed["partitions"]] == _sfdisk(disk)
    report = inspect_path(str(disk))
    assert report.safe and any(c.name == "partition-table" and c.ok for c in report.checks)
    data = disk.read_bytes()  # the logical partitions' boot records are kept in one pass
    for step in (4099, 1 << 22):
        chunks = (data[i:i + step] for i in range(0, len(data), step))
        assert inspect(chunks, str(disk)).to_json() == report.to_json()


def _mbr_entry(disk: Path, index: int, ptype: int, first: int, count: int) -> None:
    with open(disk, "r+b") as f:
        f.seek(446 + 16 * index)
        f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype, b"\0\0\0", first, count))


def test_mbr_overlap_and_past_the_end_are_reported(tmp_path: Path) -> None:
    disk = _disk(tmp_path, "mbr")
    _mbr_entry(disk, 1, 0x83, 4096, 4096)  # starts inside partition 1 (sectors 2048..10239)
    _mbr_entry(disk, 3, 0x83, 60000, 10000)  # ends past the 32 MiB disk (65536 sectors)
    table = read_partition_table(*_read(disk))
    assert any("overlap" in p for p in table.problems), table.problems
    assert any("past the end of the disk" in p for p in table.problems), table.problems
    report = inspect_path(str(disk))
    assert [c.name for c in report.failures] == ["partition-table"]
    assert_clean_error(run_vmforge("partitions", "-f", "raw", disk), contains="partition table")


def test_extended_chain_loop_is_cut(tmp_path: Path) -> None:
    disk = _disk(tmp_path, "mbr")
    table = read_partition_table(*_read(disk))
    ext = next(p for p in table.partitions if p.type == "0x05")
    with open(disk, "r+b") as f:  # the first EBR's link points back at itself
        f.seek(ext.start + 446 + 16)
        f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x05, b"\0\0\0", 0, 2048))
    table = read_partition_table(*_read(disk))
    assert any("loops" in p for p in table.problems), table.problems


def test_gpt_damage_is_reported(tmp_path: Path) -> None:
    disk = _disk(tmp_path, "gpt")
    data = bytearray(disk.read_bytes())
    data[512 + 80:512 + 84] = struct.pack("<I", 1 << 30)  # NumberOfPartitionEntries
    hdr = bytearray(data[512:512 + 92])
    hdr[16:20] = bytes(4)
    data[512 + 16:512 + 20] = struct.pack("<I", zlib.crc32(hdr))  # a valid CRC, hostile count
    table = read_partition_table(lambda o, n: bytes(data[o:o + n]), len(data))
    assert any("refused" in p for p in table.problems), table.problems
    data2 = bytearray(disk.read_bytes())
    data2[1024 + 40] ^= 0xFF  # an entry's first LBA changes: the array CRC breaks
    table = read_partition_table(lambda o, n: bytes(data2[o:o + n]), len(data2))
    assert any("entry array CRC32" in p for p in table.problems), table.problems
