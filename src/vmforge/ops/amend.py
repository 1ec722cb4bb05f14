"""``amend``: change a qcow2 image's options in place (qemu-img amend)."""

from __future__ import annotations

from collections.abc import Mapping

from ..formats.qcow2.amend import amend_qcow2
from .snapshot import require_qcow2


def amend(path: str, options: Mapping[str, str], fmt: str | None = None, *,
          untrusted: bool = False) -> bool:
    """Apply ``options`` (compat, lazy_refcounts, refcount_bits) to ``path`` in place.

    Returns False when the image already had them. Raises OptionError for options
    qemu-img refuses, UnsupportedFeature for other formats and lossy downgrades.
    """
    require_qcow2(path, fmt, "amending", untrusted=untrusted,
                  hint="only qcow2 options can be amended")
    return amend_qcow2(path, dict(options))
