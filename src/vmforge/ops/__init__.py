"""Format-independent operations, each built on the extent model."""

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
