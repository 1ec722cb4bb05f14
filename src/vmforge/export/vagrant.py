"""Vagrant box for the libvirt provider: a tar(.gz) of box.img (qcow2), metadata.json
and a Vagrantfile.

Sources: vagrant-libvirt documentation, "Boxes" (box format: box.img qcow2,
metadata.json ``{"provider": "libvirt", "format": "qcow2", "virtual_size": GiB}``,
Vagrantfile) and the Vagrant documentation, "Box File Format".
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from typing import Any

from ..ops.output import work_directory
from .build import ExportRequest, GiB, copy_into
from .facts import Subject
from .rules import Profile, Rule

DOC = "vagrant-libvirt documentation, 'Boxes' (box format)"
VAGRANT = "Vagrant documentation, 'Box File Format'"
MEMBERS = ("box.img", "metadata.json", "Vagrantfile")


def _metadata(s: Subject) -> tuple[dict[str, Any] | None, str | None]:
    def compute(s: Subject) -> tuple[dict[str, Any] | None, str | None]:
        m = s.tar.find("metadata.json") if s.tar is not None else None
        if m is None:
            return None, None
        text = s.member_text(m)
        try:
            data = json.loads(text or b"")
        except ValueError as err:
            return None, f"metadata.json is not JSON: {err}"
        if not isinstance(data, dict):
            return None, "metadata.json is not a JSON object"
        return data, None
    result: tuple[dict[str, Any] | None, str | None] = s.memo("vagrant.metadata", compute)
    return result


def _archive(s: Subject) -> str | None:
    if s.tar is None:
        return f"the file is a {s.kind}, not a tar or tar.gz"
    return s.tar.error


def _members(s: Subject) -> str | None:
    if s.tar is None or s.tar.error:
        return None
    missing = [n for n in MEMBERS if s.tar.find(n) is None]
    if missing:
        return f"the box lacks {', '.join(missing)}"
    return None


def _meta(s: Subject) -> str | None:
    data, err = _metadata(s)
    if err:
        return err
    if data is None:
        return None
    if data.get("provider") != "libvirt":
        return f"provider is {data.get('provider')!r}, not 'libvirt'"
    if data.get("format") != "qcow2":
        return f"format is {data.get('format')!r}, not 'qcow2'"
    size = data.get("virtual_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return f"virtual_size is {size!r}, not a positive whole number of GiB"
    return None


def _box_format(s: Subject) -> str | None:
    m = s.tar.find("box.img") if s.tar is not None else None
    if m is None:
        return None
    d = s.member_disk(m)
    if d is not None and d.fmt != "qcow2":
        return f"box.img is {d.fmt}, not qcow2"
    if d is not None and d.references:
        return f"box.img is not standalone: {d.references}"
    return None


def _size(s: Subject) -> str | None:
    data, _ = _metadata(s)
    m = s.tar.find("box.img") if s.tar is not None else None
    if data is None or m is None or not isinstance(data.get("virtual_size"), int):
        return None
    d = s.member_disk(m)
    if d is None or d.virtual_size is None:
        return None
    if d.virtual_size > data["virtual_size"] * GiB:
        return (f"box.img is {d.virtual_size} bytes, more than virtual_size "
                f"{data['virtual_size']} GiB")
    return None


RULES = (
    Rule("vagrant.archive", "the box is a tar, optionally gzip-compressed", VAGRANT, _archive),
    Rule("vagrant.members", "the box holds box.img, metadata.json and a Vagrantfile", DOC,
         _members),
    Rule("vagrant.metadata", "metadata.json says provider 'libvirt', format 'qcow2' and a "
         "virtual_size in whole GiB", DOC, _meta),
    Rule("vagrant.box-format", "box.img is a standalone qcow2", DOC, _box_format),
    Rule("vagrant.virtual-size", "virtual_size (GiB) holds box.img's virtual size", DOC, _size),
)

VAGRANTFILE = """\
# Made by vmforge for the vagrant-libvirt provider.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "kvm"
    libvirt.cpus = {cpus}
    libvirt.memory = {memory}
  end
end
"""


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None,
         path: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, int(time.time())
    if path is not None:
        info.size = os.path.getsize(path)
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    with work_directory(path) as work:
        img = os.path.join(work, "box.img")
        size = copy_into(req, img, "qcow2", {"compat": "1.1"})
        gib = -(-size // GiB)
        meta = json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": gib},
                          indent=2).encode() + b"\n"
        vfile = VAGRANTFILE.format(cpus=req.cpus, memory=req.memory >> 20).encode()
        with tarfile.open(path, "x:gz", compresslevel=1, format=tarfile.GNU_FORMAT) as tar:
            _add(tar, "metadata.json", meta)
            _add(tar, "Vagrantfile", vfile)
            _add(tar, "box.img", path=img)
    return {"virtual_size_gib": gib}


PROFILE = Profile("vagrant", "a libvirt box: box.img (qcow2), metadata.json and a "
                  "Vagrantfile in a tar.gz", RULES, build, (".box",))
