"""On-disk formats: one module or package each, found through the Format registry."""

from __future__ import annotations

from .base import (
    BackingRef,
    Capabilities,
    Format,
    HostFile,
    ImageReader,
    ImageWriter,
    OpenOptions,
)
from .parallels import ParallelsFormat
from .qcow2 import Qcow2Format
from .raw import RawFormat
from .registry import detect_format, get_format, list_formats, open_layer
from .vdi import VdiFormat
from .vhd import VpcFormat
from .vhdx import VhdxFormat
from .vmdk import VmdkFormat

__all__ = [
    "BackingRef", "Capabilities", "Format", "HostFile", "ImageReader", "ImageWriter",
    "OpenOptions", "ParallelsFormat", "Qcow2Format", "RawFormat", "VdiFormat", "VhdxFormat",
    "VmdkFormat", "VpcFormat",
    "detect_format", "get_format", "list_formats", "open_layer",
]
