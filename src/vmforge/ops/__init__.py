"""Format-independent operations, each built on the extent model.

Each name is imported from its module on first use (see vmforge.util.lazy), so that
a command pays only for the operations it runs: ``compare`` and ``convert`` need numpy
and the writers, ``info`` needs neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..util.lazy import lazy_package

lazy_package(__name__, {
    "amend": ".amend", "apply_snapshot": ".snapshot", "check": ".check", "commit": ".commit",
    "compare": ".compare", "CompareResult": ".compare", "convert": ".convert",
    "create": ".create", "create_snapshot": ".snapshot", "dd": ".dd",
    "delete_snapshot": ".snapshot", "full_clone": ".clone", "Image": ".image",
    "info_to_qemu_json": ".info", "linked_clone": ".clone", "list_snapshots": ".snapshot",
    "map_entries": ".info", "measure": ".measure", "open_image": ".image", "rebase": ".rebase",
    "repair": ".check", "resize": ".resize",
})

if TYPE_CHECKING:
    from .amend import amend
    from .check import check, repair
    from .clone import full_clone, linked_clone
    from .commit import commit
    from .compare import CompareResult, compare
    from .convert import convert
    from .create import create
    from .dd import dd
    from .image import Image, open_image
    from .info import info_to_qemu_json, map_entries
    from .measure import measure
    from .rebase import rebase
    from .resize import resize
    from .snapshot import apply_snapshot, create_snapshot, delete_snapshot, list_snapshots

__all__ = ["amend", "apply_snapshot", "create_snapshot", "delete_snapshot", "list_snapshots",
           "repair", "check", "commit", "compare", "CompareResult", "convert", "create", "dd",
           "full_clone", "Image", "info_to_qemu_json", "linked_clone", "map_entries", "measure",
           "open_image", "rebase", "resize"]
