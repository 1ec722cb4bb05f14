"""Writing an output file atomically: a temporary name beside it, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from ..errors import AmbiguousFormat, OutputError
from ..formats.base import ImageWriter
from ..formats.registry import detect_format
from ..util.companions import temporary_name, tracking


@contextlib.contextmanager
def atomic_output(dest: str) -> Iterator[str]:
    """Yield a temporary path in ``dest``'s directory; on success rename it to ``dest``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    ``dest`` is untouched, so a failed convert never leaves a half file under its name.
    """
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise OutputError(f"{dest}: directory {directory} does not exist")
    try:
        # a free name, and no file yet: the writer creates the file itself (truncating an
        # existing file, even an empty one, makes ext4 flush it to disk on close,
        # auto_da_alloc: 0.8 s per 1.4 GiB); an interrupt here leaves nothing behind
        tmp = temporary_name(directory, os.path.basename(dest))
    except OSError as err:
        raise OutputError(f"{dest}: cannot create a file in {directory}: "
                          f"{err.strerror or err}") from None
    try:
        # a multi-file format (VMDK extents) learns the final name and registers its
        # companion files through util.companions; they are renamed before the main file
        with tracking(dest, tmp) as pending:
            try:
                yield tmp
                pending.commit()
            except BaseException:
                pending.discard()
                raise
        # Unlink first: ext4 flushes a file renamed over another one (auto_da_alloc),
        # which would make every convert wait for the disk. The old destination is
        # only removed once the new file is complete.
        with contextlib.suppress(FileNotFoundError):
            if not os.path.isdir(dest):
                os.unlink(dest)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def finishing(writer: ImageWriter, name: str) -> Iterator[ImageWriter]:
    """Finish ``writer`` when the block succeeds; abort it on any failure.

    An OSError while writing becomes OutputError naming ``name`` (a full disk is the
    user's problem to solve, not a vmforge bug).
    """
    try:
        yield writer
        writer.finish()
    except OSError as err:
        writer.abort()
        raise OutputError(f"{name}: write failed: {err.strerror or err}") from err
    except BaseException:
        writer.abort()
        raise


def require_probes_as(path: str, fmt: str, dest: str) -> None:
    """Refuse an output that a later probe would take for another format (SECURITY.md
    row 19): a raw disk whose guest wrote a qcow2 or VMDK header into its first sector
    would otherwise turn into that format, backing file and all, when someone opens it
    without naming the format (OSSA-2024-002)."""
    try:
        found = detect_format(path).name
    except AmbiguousFormat:
        found = "more than one format"
    if found != fmt:
        raise OutputError(
            f"{dest}: the {fmt} output would be probed as {found} (its data starts with a "
            f"{found} header)", hint="write it in a format with a header of its own, such as "
            "qcow2, or always open it with an explicit format")


@contextlib.contextmanager
def work_directory(beside: str) -> Iterator[str]:
    """A private directory beside ``beside`` (same file system, so results can be renamed
    into place), removed afterwards whatever happens."""
    directory = os.path.dirname(os.path.abspath(beside))
    try:
        work = tempfile.mkdtemp(prefix=".vmforge-work-", dir=directory)
    except OSError as err:
        raise OutputError(f"{beside}: cannot create a work directory: {err.strerror}") from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
