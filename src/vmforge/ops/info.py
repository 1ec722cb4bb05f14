"""``info`` and ``map``: what an image is and where its bytes are, in qemu-img's shapes."""

from __future__ import annotations

from typing import Any

from ..model.info import ImageInfo
from .image import Image


def info_to_qemu_json(info: ImageInfo) -> dict[str, Any]:
    """One image as ``qemu-img info --output=json`` prints it."""
    out: dict[str, Any] = {}
    if info.snapshots:
        out["snapshots"] = [s.to_qemu_json() for s in info.snapshots]
    if info.backing_format:
        out["backing-filename-format"] = info.backing_format
    out["virtual-size"] = info.virtual_size
    out["filename"] = info.filename
    if info.cluster_size is not None:
        out["cluster-size"] = info.cluster_size
    out["format"] = info.format
    out["actual-size"] = info.actual_size
    if info.format_specific:
        out["format-specific"] = info.format_specific
    if info.backing_filename:
        out["full-backing-filename"] = info.full_backing_filename or info.backing_filename
        out["backing-filename"] = info.backing_filename
    if info.dirty is not None:
        out["dirty-flag"] = info.dirty
    return out


def map_entries(image: Image) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``: entries merged where qemu merges them.

    qemu merges neighbours with the same flags and depth when their host offsets are
    contiguous or absent, so adjacent compressed clusters print as one entry.
    """
    out: list[dict[str, Any]] = []
    for ext in image.iter_extents():
        entry = ext.to_qemu_json()
        if out:
            last = out[-1]
            same = all(last[k] == entry[k] for k in ("depth", "present", "zero", "data"))
            if same and ("offset" in last) == ("offset" in entry) and (
                    "offset" not in last or last["offset"] + last["length"] == entry["offset"]):
                last["length"] += entry["length"]
                continue
        out.append(entry)
    if not out:
        # an empty disk: qemu-img prints one zero-length entry with every flag false
        out.append({"start": 0, "length": 0, "depth": 0, "present": False, "zero": False,
                    "data": False})
    return out
