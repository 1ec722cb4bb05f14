"""``convert``: any image (or several, end to end) into a new image of any writable format."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

from ..engine.copy import ChainSource, ConcatSource, CopyStats, Progress, Source, copy
from ..errors import OutputError, UnsupportedFeature, UsageError
from ..formats import ImageWriter, get_format
from ..model import align_up
from .create import backing_ref
from .image import Image, open_image
from .output import atomic_output


def convert(
    sources: str | Sequence[str],
    dest: str,
    out_fmt: str = "raw",
    *,
    src_fmt: str | None = None,
    options: Mapping[str, str] | None = None,
    compress: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = None,
    sparse_size: int = 4096,
    progress: Progress | None = None,
    workers: int | None = None,
    snapshot: str | None = None,
    untrusted: bool = False,
    allow_data_file: bool = False,
    skip_create: bool = False,
) -> CopyStats:
    """Convert ``sources`` into ``dest`` in format ``out_fmt`` and return what was copied.

    With ``backing`` (qemu-img's -B) the output is an overlay and only what the
    source's top layer holds is copied. ``sparse_size`` 0 writes zeros explicitly
    (fully allocated output). The output appears under ``dest`` only when complete,
    except with ``skip_create`` (qemu-img's -n), which writes into an existing image
    of at least the source's size, zeros included.
    """
    paths = [sources] if isinstance(sources, str) else list(sources)
    if not paths:
        raise UsageError("convert needs at least one source")
    if dest == "-":
        raise UsageError("writing to standard output is not supported for this format",
                         hint="give an output file name")
    opts = dict(options or {})
    format_cls = get_format(out_fmt)
    if not format_cls.capabilities.write:
        raise UnsupportedFeature(f"writing {format_cls.name}")
    if compress and not format_cls.capabilities.compression:
        raise UsageError(f"{format_cls.name} cannot store compressed data",
                         hint="drop -c or choose -O qcow2")
    if compress and opts.get("preallocation", "off") != "off":
        raise UsageError("compression cannot be combined with preallocation")
    if snapshot is not None and len(paths) > 1:
        raise UsageError("-l (snapshot) works with a single source")
    images: list[Image] = []
    with contextlib.ExitStack() as stack:
        for p in paths:
            img = open_image(p, src_fmt, untrusted=untrusted, allow_data_file=allow_data_file,
                             snapshot=snapshot)
            stack.callback(img.close)
            images.append(img)
        ref, _ = backing_ref(backing, backing_fmt, dest, opts)
        max_depth = 0 if ref is not None else None
        parts = [ChainSource(img.chain, max_depth) for img in images]
        source: Source = parts[0] if len(parts) == 1 else ConcatSource(parts)
        for img in images:
            if os.path.exists(dest) and os.path.samefile(img.path, dest):
                raise UsageError(f"{dest} is both a source and the destination")
        if skip_create:
            if ref is not None:
                raise UsageError("-n and -B cannot be combined", hint="create the overlay first")
            writer = format_cls.open_for_write(dest)
            if writer.virtual_size < source.virtual_size:
                writer.abort()
                raise UsageError(f"{dest} is smaller ({writer.virtual_size} bytes) than the source "
                                 f"({source.virtual_size} bytes)")
            stats = _run(source, writer, dest, explicit_zeroes=True, sparse_size=sparse_size,
                         compress=compress, workers=workers, progress=progress)
        else:
            with atomic_output(dest) as tmp:
                writer = format_cls.create(tmp, align_up(source.virtual_size, 512), opts, ref,
                                           None)
                stats = _run(source, writer, dest, explicit_zeroes=ref is not None,
                             sparse_size=sparse_size, compress=compress, workers=workers,
                             progress=progress)
    return stats

def _run(source: Source, writer: ImageWriter, dest: str, *, explicit_zeroes: bool,
         sparse_size: int, compress: bool, workers: int | None,
         progress: Progress | None) -> CopyStats:
    """Copy and finish the writer; abort it on any failure."""
    try:
        stats = copy(source, writer, explicit_zeroes=explicit_zeroes, sparse=sparse_size > 0,
                     sparse_size=max(sparse_size, 512), compress=compress, workers=workers,
                     progress=progress)
        writer.finish()
    except OSError as err:
        writer.abort()
        raise OutputError(f"{dest}: write failed: {err.strerror or err}") from err
    except BaseException:
        writer.abort()
        raise
    return stats
