"""Outputs made of several files (a VMDK descriptor and its extent files).

``ops.output.atomic_output`` writes an image under a temporary name and renames it at
the end. A multi-file format must write its extent file names into the descriptor
under their final names, yet no file may appear under a final name half-written. So
while an atomic output is open, ``pending_output(tmp)`` tells a writer the final name
of the file it was handed and lets it create companion files: each gets a temporary
name beside the destination and is renamed to its final name, before the main file,
when the output succeeds, or removed when it fails.

This lives below ``formats`` (which may not import ``ops``); ``ops.output`` drives it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from ..errors import OutputError


def temporary_name(directory: str, name: str) -> str:
    """A free name ``.NAME.XXXXXXXX.vmforge-tmp`` in ``directory``; no file is left there.

    The name is reserved by creating the file exclusively, then removed: the writer
    creates the file itself (truncating an existing file makes ext4 flush it on close).
    Ctrl-C or SIGTERM can land between the kernel creating the file and Python binding
    its descriptor (tempfile.mkstemp would then leave it behind); the name is known
    before the file is made, so it is removed whatever happens. Raises OSError.
    """
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.vmforge-tmp")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            os.close(fd)
            os.unlink(tmp)
        except BaseException:
            # O_EXCL: a file under this random name now was made by this call
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


class PendingOutput:
    """One atomic output in progress: its final name, its temporary name, companions."""

    def __init__(self, dest: str, tmp: str) -> None:
        self.dest = dest
        self.tmp = tmp
        #: (temporary path, final path) of each companion, in creation order
        self.companions: list[tuple[str, str]] = []

    def companion(self, final_name: str) -> str:
        """A temporary path for a companion that ends up as ``final_name`` (a base name
        in the destination's directory). The caller creates and writes the file."""
        if os.path.basename(final_name) != final_name or final_name in ("", ".", ".."):
            raise OutputError(f"{self.dest}: companion file name {final_name!r} is not a "
                              "plain file name")
        directory = os.path.dirname(os.path.abspath(self.dest))
        final = os.path.join(os.path.dirname(self.dest), final_name)
        if any(f == final for _, f in self.companions) or \
                os.path.abspath(final) == os.path.abspath(self.dest):
            raise OutputError(f"{self.dest}: two output files would be named {final_name}")
        try:
            tmp = temporary_name(directory, final_name)
        except OSError as err:
            raise OutputError(f"{final}: cannot create a file in {directory}: "
                              f"{err.strerror or err}") from None
        self.companions.append((tmp, final))
        return tmp

    def commit(self) -> None:
        """Rename every companion into place (the caller renames the main file last)."""
        for tmp, final in self.companions:
            if not os.path.exists(tmp):
                continue  # registered but never created
            with contextlib.suppress(FileNotFoundError):
                if not os.path.isdir(final):
                    os.unlink(final)
            os.replace(tmp, final)

    def discard(self) -> None:
        for tmp, _ in self.companions:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_CURRENT: contextvars.ContextVar[PendingOutput | None] = contextvars.ContextVar(
    "vmforge_pending_output", default=None)


def pending_output(path: str) -> PendingOutput | None:
    """The output in progress whose temporary name is ``path``, if any."""
    current = _CURRENT.get()
    if current is not None and os.path.abspath(current.tmp) == os.path.abspath(path):
        return current
    return None


@contextlib.contextmanager
def tracking(dest: str, tmp: str) -> Iterator[PendingOutput]:
    """Make ``pending_output(tmp)`` answer while the block runs (used by atomic_output)."""
    pending = PendingOutput(dest, tmp)
    token = _CURRENT.set(pending)
    try:
        yield pending
    finally:
        _CURRENT.reset(token)
