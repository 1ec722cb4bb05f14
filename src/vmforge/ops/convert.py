"""``convert``: any image (or several, end to end) into a new image of any writable format."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..engine.copy import ChainSource, ConcatSource, CopyStats, Progress, Source, copy
from ..errors import LimitExceeded, UnsupportedFeature, UsageError
from ..formats import Format, ImageWriter, get_format
from ..model import align_up
from .create import backing_ref
from .image import Image, open_image
from .output import atomic_output, finishing, require_probes_as

#: more threads than this only add queueing (each holds a 4 MiB chunk in flight)
MAX_WORKERS = 64


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
    out_of_order: bool = False,
    compression_level: int | None = None,
    snapshot: str | None = None,
    untrusted: bool = False,
    allow_data_file: bool = False,
    skip_create: bool = False,
    stream_fd: int | None = None,
    max_virtual_size: int | None = None,
    parents: Sequence[str] = (),
    replay_log: bool = False,
) -> CopyStats:
    """Convert ``sources`` into ``dest`` in format ``out_fmt`` and return what was copied.

    With ``backing`` (qemu-img's -B) the output is an overlay and only what the
    source's top layer holds is copied. ``sparse_size`` 0 writes zeros explicitly
    (fully allocated output). The output appears under ``dest`` only when complete,
    except with ``skip_create`` (qemu-img's -n), which writes into an existing image
    of at least the source's size, zeros included.

    ``dest`` "-" writes the image as a stream to ``stream_fd`` (standard output: a
    pipe, socket or file), in order and without seeking; only formats that can be
    streamed (raw, streamOptimized VMDK) accept it. A failure leaves the stream short.

    ``workers`` threads read, scan and compress (default: the CPUs); ``out_of_order``
    (qemu-img -W) lets ranges reach the writer in the order they finish;
    ``compression_level`` overrides the output format's default level.
    """
    paths = [sources] if isinstance(sources, str) else list(sources)
    if not paths:
        raise UsageError("convert needs at least one source")
    opts = dict(options or {})
    format_cls = get_format(out_fmt)
    if not format_cls.capabilities.write:
        raise UnsupportedFeature(f"writing {format_cls.name}")
    streaming = dest == "-"
    if streaming:
        _check_streamable(format_cls, opts, stream_fd, skip_create=skip_create,
                          backing=backing or opts.get("backing_file"))
    if compress and not format_cls.capabilities.compression:
        raise UsageError(f"{format_cls.name} cannot store compressed data",
                         hint="drop -c or choose -O qcow2")
    if compress and opts.get("preallocation", "off") != "off":
        raise UsageError("compression cannot be combined with preallocation")
    if snapshot is not None and len(paths) > 1:
        raise UsageError("-l (snapshot) works with a single source")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"-m {workers}: the number of workers must be 1 to {MAX_WORKERS}")
    tuning = _Tuning(workers, out_of_order, compression_level)
    images: list[Image] = []
    with contextlib.ExitStack() as stack:
        for p in paths:
            img = open_image(p, src_fmt, untrusted=untrusted, allow_data_file=allow_data_file,
                             snapshot=snapshot, parents=parents, replay_log=replay_log)
            stack.callback(img.close)
            images.append(img)
        ref, _ = backing_ref(backing, backing_fmt, dest, opts)
        max_depth = 0 if ref is not None else None
        parts = [ChainSource(img.chain, max_depth) for img in images]
        source: Source = parts[0] if len(parts) == 1 else ConcatSource(parts)
        if max_virtual_size is not None and source.virtual_size > max_virtual_size:
            # SECURITY.md row 9: refused before anything is written; this also bounds a
            # compressed image whose clusters all share one tiny compressed cluster
            raise LimitExceeded(
                f"virtual size {source.virtual_size} bytes exceeds the quota of "
                f"{max_virtual_size} bytes", path=paths[0], limit="max virtual size",
                hint="raise --max-virtual-size if this image is expected")
        for img in images:
            if not streaming and os.path.exists(dest) and os.path.samefile(img.path, dest):
                raise UsageError(f"{dest} is both a source and the destination")
        if streaming:
            assert stream_fd is not None
            writer = format_cls.create_stream(stream_fd, align_up(source.virtual_size, 512), opts)
            stats = _run(source, writer, "standard output", explicit_zeroes=False,
                         sparse_size=sparse_size, compress=compress, tuning=tuning,
                         progress=progress)
        elif skip_create:
            if ref is not None:
                raise UsageError("-n and -B cannot be combined", hint="create the overlay first")
            writer = format_cls.open_for_write(dest)
            if writer.virtual_size < source.virtual_size:
                writer.abort()
                raise UsageError(f"{dest} is smaller ({writer.virtual_size} bytes) than the source "
                                 f"({source.virtual_size} bytes)")
            stats = _run(source, writer, dest, explicit_zeroes=True, sparse_size=sparse_size,
                         compress=compress, tuning=tuning, progress=progress)
        else:
            with atomic_output(dest) as tmp:
                writer = format_cls.create(tmp, align_up(source.virtual_size, 512), opts, ref,
                                           None)
                stats = _run(source, writer, dest, explicit_zeroes=ref is not None,
                             sparse_size=sparse_size, compress=compress, tuning=tuning,
                             progress=progress)
                require_probes_as(tmp, format_cls.name, dest)
    return stats


def _check_streamable(format_cls: type[Format], opts: Mapping[str, str], stream_fd: int | None, *,
                      skip_create: bool, backing: str | None) -> None:
    """Refuse a stream the format or the other options cannot make, before opening anything."""
    if stream_fd is None:
        raise UsageError("'-' (standard output) needs an output descriptor",
                         hint="give an output file name")
    if skip_create:
        raise UsageError("-n cannot write into standard output", hint="drop -n or name a file")
    if backing:
        raise UsageError("an output written to standard output cannot have a backing file",
                         hint="drop -B or name an output file")
    if not format_cls.capabilities.stream_write:
        raise UnsupportedFeature(
            f"writing {format_cls.name} images to standard output",
            detail="the format needs to seek back into the file",
            hint="give an output file name, or use -O raw or -O vmdk -o subformat=streamOptimized")


@dataclass(frozen=True)
class _Tuning:
    """How the copy runs, not what it produces (except the layout with out_of_order)."""

    workers: int | None
    out_of_order: bool
    compression_level: int | None


def _run(source: Source, writer: ImageWriter, dest: str, *, explicit_zeroes: bool,
         sparse_size: int, compress: bool, tuning: _Tuning,
         progress: Progress | None) -> CopyStats:
    """Copy and finish the writer; abort it on any failure."""
    with finishing(writer, dest):
        if tuning.compression_level is not None and not (compress or writer.compress_always):
            raise UsageError("--compression-level needs compressed output",
                             hint="add -c, or choose -O vmdk -o subformat=streamOptimized")
        return copy(source, writer, explicit_zeroes=explicit_zeroes, sparse=sparse_size > 0,
                    sparse_size=max(sparse_size, 512), compress=compress,
                    workers=tuning.workers, out_of_order=tuning.out_of_order,
                    compression_level=tuning.compression_level, progress=progress)
