"""Pure data: extents, image information, sizes. Imports nothing above it.

The names below load from their modules on first use (see vmforge.util.lazy): the
CLI parses sizes long before it needs the extent dataclasses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..util.lazy import lazy_package

lazy_package(__name__, {
    "Extent": ".extent", "ExtentKind": ".extent", "coalesce": ".extent",
    "align_down": ".sizes", "align_up": ".sizes", "human_size": ".sizes", "parse_size": ".sizes",
})

if TYPE_CHECKING:
    from .extent import Extent, ExtentKind, coalesce
    from .sizes import align_down, align_up, human_size, parse_size

__all__ = ["Extent", "ExtentKind", "coalesce", "align_down", "align_up", "human_size", "parse_size"]
