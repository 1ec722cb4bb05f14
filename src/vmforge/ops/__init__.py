"""Format-independent operations, each built on the extent model."""

from .check import check
from .compare import CompareResult, compare
from .convert import convert
from .create import create
from .image import Image, open_image
from .info import info_to_qemu_json, map_entries
from .measure import measure

__all__ = ["check", "compare", "CompareResult", "convert", "create", "Image", "open_image",
           "info_to_qemu_json", "map_entries", "measure"]
