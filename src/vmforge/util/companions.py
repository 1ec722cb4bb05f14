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
import tempfile
from collections.abc import Iterator

from ..errors import OutputError


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
            fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".vmforge-tmp",
                                       dir=directory)
        except OSError as err:
            raise OutputError(f"{final}: cannot create a file in {directory}: "
                              f"{err.strerror}") from None
        os.close(fd)
        # the writer creates the file itself (truncating an existing one makes ext4
        # flush it on close), as atomic_output does for the main file
        os.unlink(tmp)
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
