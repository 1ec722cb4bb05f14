"""KubeVirt containerDisk: an OCI image whose layer holds the disk under /disk/, owned
by 107:107 (the qemu user of virt-launcher), written as an OCI image-layout tar.

Sources: KubeVirt user guide, "Disks and Volumes: containerDisk" (``ADD --chown=107:107
disk.qcow2 /disk/``; qcow2 or raw); OCI image-spec v1.0: image-layout.md (oci-layout,
index.json, blobs/sha256/<hex>), descriptor.md (digest and size), manifest.md,
config.md (rootfs.diff_ids), layer.md (tar media types).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from ..ops.output import work_directory
from .build import ExportRequest, copy_into
from .facts import DiskFacts, Member, Subject, disk_facts
from .rules import Profile, Rule

GUIDE = "KubeVirt user guide, 'Disks and Volumes: containerDisk'"
OCI = "OCI image-spec v1.0"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_TYPES = (MT_LAYER, MT_LAYER + "+gzip")
QEMU_UID = QEMU_GID = 107  # the qemu user and group in virt-launcher
DISK_NAME = "disk/disk.img"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass
class OciFacts:
    error: str | None = None  # the first structural problem (for the layout rules)
    layout: str | None = None
    index: str | None = None
    digests: str | None = None
    manifest: str | None = None
    config: str | None = None
    disks: list[tuple[str, int, int, DiskFacts | None]] = field(default_factory=list)


def _json(s: Subject, name: str) -> Any:
    m = s.tar.find(name) if s.tar is not None else None
    if m is None:
        return None
    try:
        return json.loads(s.member_text(m) or b"")
    except ValueError:
        return None


def _blob(s: Subject, digest: Any) -> Member | None:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        return None
    return s.tar.find("blobs/sha256/" + digest[7:]) if s.tar is not None else None


def _descriptor_ok(s: Subject, d: Any, types: tuple[str, ...]) -> str | None:
    if not isinstance(d, dict):
        return "a descriptor is not a JSON object"
    if d.get("mediaType") not in types:
        return f"media type {d.get('mediaType')!r} is not {' or '.join(types)}"
    blob = _blob(s, d.get("digest"))
    if blob is None:
        return f"digest {d.get('digest')!r} names no blob in the archive"
    if d.get("size") != blob.info.size:
        return f"descriptor size {d.get('size')!r} differs from the blob's {blob.info.size}"
    return None


def _facts(s: Subject) -> OciFacts:
    f = OciFacts()
    tar = s.tar
    if tar is None or tar.error:
        f.error = "not a tar" if tar is None else tar.error
        return f
    layout = _json(s, "oci-layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        f.layout = "no oci-layout file with an imageLayoutVersion"
    for m in tar.members:
        if m.name.startswith("blobs/sha256/") and m.info.isreg():
            d = s.member_digests(m)
            if d is None or d["SHA256"] != m.name.rsplit("/", 1)[1]:
                f.digests = f"blob {m.name} does not hash to its name"
                break
    index = _json(s, "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(index, dict) or index.get("schemaVersion") != 2 or not manifests \
            or not isinstance(manifests, list):
        f.index = "index.json is missing or not schemaVersion 2 with a manifests list"
        return f
    f.index = _descriptor_ok(s, manifests[0], (MT_MANIFEST,))
    if f.index:
        return f
    manifest = _json(s, "blobs/sha256/" + manifests[0]["digest"][7:])
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        f.manifest = "the manifest is not a schemaVersion 2 JSON object"
        return f
    layers = manifest.get("layers")
    f.manifest = _descriptor_ok(s, manifest.get("config"), (MT_CONFIG,))
    if not isinstance(layers, list) or not layers:
        f.manifest = f.manifest or "the manifest lists no layers"
        return f
    for layer in layers:
        f.manifest = f.manifest or _descriptor_ok(s, layer, LAYER_TYPES)
    if f.manifest:
        return f
    config = _json(s, "blobs/sha256/" + manifest["config"]["digest"][7:])
    diff_ids = []
    for layer in layers:
        diff_id = _scan_layer(s, _blob(s, layer["digest"]), f)
        diff_ids.append(diff_id)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        f.config = "the config has no rootfs of type 'layers'"
    elif rootfs.get("diff_ids") != diff_ids:
        f.config = "rootfs.diff_ids do not match the layers' uncompressed digests"
    return f


def _scan_layer(s: Subject, blob: Member | None, f: OciFacts) -> str | None:
    """The layer's diff_id (sha256 of the uncompressed tar); its /disk/ files into ``f``."""
    data = s.open_member(blob) if blob is not None else None
    if data is None:
        return None
    try:
        with tarfile.open(fileobj=data, mode="r:*") as layer:
            for i, m in enumerate(layer):
                if i > 4096:
                    break
                name = m.name.removeprefix("./").removeprefix("/")
                if name.startswith("disk/") and m.isreg():
                    inner = layer.extractfile(m)
                    assert inner is not None

                    def read(off: int, n: int, inner: Any = inner) -> bytes:
                        if off < 0:
                            return b""
                        inner.seek(off)
                        return bytes(inner.read(n))

                    f.disks.append((name, m.uid, m.gid, disk_facts(read, m.size)))
        data.seek(0)
        raw = data.read(2)
        data.seek(0)
        h = hashlib.sha256()
        stream: Any = data
        if raw == b"\x1f\x8b":
            import gzip

            stream = gzip.GzipFile(fileobj=data)
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
        return "sha256:" + h.hexdigest()
    except (tarfile.TarError, OSError, EOFError) as err:
        f.manifest = f.manifest or f"a layer is not a readable tar: {err}"
        return None


def oci(s: Subject) -> OciFacts:
    result: OciFacts = s.memo("kubevirt", _facts)
    return result


def _archive(s: Subject) -> str | None:
    if s.tar is None:
        return f"the file is a {s.kind}, not an OCI image-layout tar"
    return s.tar.error


def _disk_path(s: Subject) -> str | None:
    f = oci(s)
    if f.error or f.index or f.manifest:
        return None
    if len(f.disks) != 1:
        return f"the image holds {len(f.disks)} files under /disk/, not exactly one"
    return None


def _owner(s: Subject) -> str | None:
    for name, uid, gid, _ in oci(s).disks:
        if (uid, gid) != (QEMU_UID, QEMU_GID):
            return f"/{name} is owned by {uid}:{gid}, not 107:107"
    return None


def _disk_format(s: Subject) -> str | None:
    for name, _, _, d in oci(s).disks:
        if d is not None and d.fmt not in ("qcow2", "raw"):
            return f"/{name} is {d.fmt}, not qcow2 or raw"
        if d is not None and d.references:
            return f"/{name} is not standalone: {d.references}"
    return None


RULES = (
    Rule("kubevirt.archive", "the file is an OCI image layout as a tar", f"{OCI} image-layout.md",
         _archive),
    Rule("kubevirt.oci-layout", "an oci-layout file gives the imageLayoutVersion",
         f"{OCI} image-layout.md", lambda s: oci(s).layout),
    Rule("kubevirt.index", "index.json is schemaVersion 2 and points at an image manifest blob "
         "of the declared size", f"{OCI} image-index.md, descriptor.md", lambda s: oci(s).index),
    Rule("kubevirt.digests", "every blob hashes (sha256) to its name",
         f"{OCI} image-layout.md (blobs), descriptor.md (digests)", lambda s: oci(s).digests),
    Rule("kubevirt.manifest", "the manifest names an OCI config and tar layers present with "
         "their declared sizes", f"{OCI} manifest.md", lambda s: oci(s).manifest),
    Rule("kubevirt.config", "the config's rootfs.diff_ids are the layers' uncompressed digests",
         f"{OCI} config.md", lambda s: oci(s).config),
    Rule("kubevirt.disk-path", "exactly one disk file, under /disk/", GUIDE, _disk_path),
    Rule("kubevirt.disk-owner", "the disk is owned by 107:107 (qemu in virt-launcher)", GUIDE,
         _owner),
    Rule("kubevirt.disk-format", "the disk is a standalone qcow2 or raw image", GUIDE,
         _disk_format),
)


def _tarinfo(name: str, size: int, *, uid: int = 0, gid: int = 0, mode: int = 0o644,
             kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.uid, info.gid, info.mode, info.type = size, uid, gid, mode, kind
    info.mtime = int(time.time())
    return info


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build(req: ExportRequest, path: str) -> dict[str, Any]:
    with work_directory(path) as work:
        disk = os.path.join(work, "disk.img")
        copy_into(req, disk, "qcow2", {"compat": "1.1"})
        layer = os.path.join(work, "layer.tar")
        with tarfile.open(layer, "x", format=tarfile.PAX_FORMAT) as t:
            t.addfile(_tarinfo("disk", 0, uid=QEMU_UID, gid=QEMU_GID, mode=0o555,
                               kind=tarfile.DIRTYPE))
            with open(disk, "rb") as f:
                t.addfile(_tarinfo(DISK_NAME, os.path.getsize(disk), uid=QEMU_UID,
                                   gid=QEMU_GID, mode=0o440), f)
        layer_hex, layer_size = _file_sha256(layer), os.path.getsize(layer)
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_hex}"]},
        }).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": MT_LAYER, "digest": f"sha256:{layer_hex}",
                        "size": layer_size}],
        }).encode()
        index = json.dumps({
            "schemaVersion": 2, "mediaType": MT_INDEX,
            "manifests": [{"mediaType": MT_MANIFEST, "digest": _digest(manifest),
                           "size": len(manifest),
                           "annotations": {"org.opencontainers.image.ref.name": req.base}}],
        }).encode()
        layout = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
        with tarfile.open(path, "x", format=tarfile.PAX_FORMAT) as out:
            for name, data in (("oci-layout", layout), ("index.json", index),
                               (f"blobs/sha256/{_digest(config)[7:]}", config),
                               (f"blobs/sha256/{_digest(manifest)[7:]}", manifest)):
                out.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            with open(layer, "rb") as f:
                out.addfile(_tarinfo(f"blobs/sha256/{layer_hex}", layer_size), f)
    return {"manifest": _digest(manifest)}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


PROFILE = Profile("kubevirt", "a containerDisk: an OCI image-layout tar whose layer holds "
                  "/disk/disk.img (qcow2) owned by 107:107", RULES, build, (".tar",))
