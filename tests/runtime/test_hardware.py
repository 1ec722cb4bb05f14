"""The virtual hardware model: parsing, validation and its JSON form (pure, no QEMU)."""

from __future__ import annotations

import json

import pytest

from vmforge.errors import UsageError
from vmforge.model.hardware import (
    MAX_CPUS,
    Bus,
    Disk,
    Firmware,
    Nic,
    NicModel,
    VirtualHardware,
    parse_cpus,
    parse_memory,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30), ("256", 256 << 20),
    ("16M", 16 << 20), (1 << 30, 1 << 30),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("12Q", "unknown memory size"), ("lots", "unknown memory size"), ("", "unknown memory size"),
    ("8M", "out of range"), ("1536K", "out of range"), ("100T", "out of range"),
    ("10000000", "out of range"),
])
def test_parse_memory_refuses(text, message):
    with pytest.raises(UsageError, match=message):
        parse_memory(text)


@pytest.mark.parametrize("text", ["0", "-1", str(MAX_CPUS + 1), "two", "1.5", ""])
def test_parse_cpus_refuses(text):
    with pytest.raises(UsageError):
        parse_cpus(text)


def test_parse_cpus_accepts_range():
    assert [parse_cpus(str(n)) for n in (1, 2, MAX_CPUS)] == [1, 2, MAX_CPUS]


def _full() -> VirtualHardware:
    return VirtualHardware(
        cpus=4, memory=2 << 30, machine="pc", firmware=Firmware.UEFI,
        disks=(Disk("/vm/a.qcow2", "qcow2"), Disk("/vm/b.raw", "raw", Bus.SATA, readonly=True),
               Disk("/vm/c.iso", "raw", Bus.IDE, cdrom=True)),
        nics=(Nic(NicModel.E1000, "52:54:00:12:34:56", "user"), Nic(network="none")),
        kernel="/k", initrd="/i", append="console=ttyS0")


def test_json_round_trip():
    hw = _full().validate()
    text = json.dumps(hw.to_dict())
    back = VirtualHardware.from_dict(json.loads(text))
    assert back == hw
    assert json.loads(text)["disks"][1]["bus"] == "sata"
    assert json.loads(text)["firmware"] == "uefi"


@pytest.mark.parametrize(("change", "message"), [
    ({"disks": (Disk("/a", ""),)}, "format must be stated"),
    ({"nics": (Nic(mac="52:54:00:zz:00:00"),)}, "invalid MAC"),
    ({"nics": (Nic(mac="01:00:5e:00:00:01"),)}, "multicast"),
    ({"nics": (Nic(mac="52:54:00:00:00:01"), Nic(mac="52:54:00:00:00:01"))}, "same MAC"),
    ({"nics": (Nic(network="../etc"),)}, "invalid network name"),
    ({"machine": "isapc"}, "unknown machine type"),
    ({"memory": (1 << 20) + 1}, "out of range"),
    ({"initrd": "/i"}, "need --kernel"),
])
def test_validate_refuses(change, message):
    with pytest.raises(UsageError, match=message):
        VirtualHardware(**change).validate()


@pytest.mark.parametrize(("key", "value"), [("firmware", "coreboot"), ("disks", [{"path": "/a",
                          "format": "raw", "bus": "usb"}]), ("colour", "red")])
def test_from_dict_refuses_unknown(key, value):
    data = VirtualHardware().to_dict()
    data[key] = value
    with pytest.raises(UsageError):
        VirtualHardware.from_dict(data)
