"""vmforge: virtual machine images, read and written in Python.

The API mirrors the CLI::

    import vmforge
    vmforge.create("base.qcow2", "qcow2", 10 << 30)
    with vmforge.open_image("base.qcow2") as img:
        fmt, size = img.format, img.virtual_size
        for ext in img.iter_extents():
            ...
        head = img.read(0, 512)
    vmforge.convert("disk.raw", "disk.qcow2", "qcow2", compress=True,
                    progress=lambda done, total: ...)
"""

from __future__ import annotations

import os as _os

# numpy's OpenBLAS starts one busy-waiting thread per core at import; vmforge does no
# linear algebra, and on a 2-core machine those threads steal time from the copy.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from typing import TYPE_CHECKING

from .util.lazy import lazy_package

# The public API is imported on first use (PEP 562), so that `vmforge --version` and
# other short commands do not pay for numpy, every reader and every writer at start-up.
_EXPORTS = {
    "CheckResult": ".model.check", "CompareResult": ".ops.compare", "CopyStats": ".engine.copy",
    "Extent": ".model", "ExtentKind": ".model", "Image": ".ops.image", "ImageInfo": ".model.info",
    "SnapshotInfo": ".model.info", "VmforgeError": ".errors", "check": ".ops.check",
    "compare": ".ops.compare", "convert": ".ops.convert", "create": ".ops.create",
    "human_size": ".model", "measure": ".ops.measure", "open_image": ".ops.image",
    "parse_size": ".model",
}
lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .engine.copy import CopyStats
    from .errors import VmforgeError
    from .model import Extent, ExtentKind, human_size, parse_size
    from .model.check import CheckResult
    from .model.info import ImageInfo, SnapshotInfo
    from .ops import (
        CompareResult,
        Image,
        check,
        compare,
        convert,
        create,
        measure,
        open_image,
    )

__version__ = "0.1.0"

__all__ = [
    "CheckResult", "CompareResult", "CopyStats", "Extent", "ExtentKind", "Image", "ImageInfo",
    "SnapshotInfo", "VmforgeError", "check", "compare", "convert", "create", "human_size",
    "measure", "open_image", "parse_size", "__version__",
]
