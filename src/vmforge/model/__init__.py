"""Pure data: extents, image information, sizes. Imports nothing above it."""

from .extent import Extent, ExtentKind, coalesce
from .sizes import align_down, align_up, human_size, parse_size

__all__ = ["Extent", "ExtentKind", "coalesce", "align_down", "align_up", "human_size", "parse_size"]
