"""Every error vmforge raises, in one tree.

::

    VmforgeError                    base of everything vmforge raises on purpose
    ├── UsageError                  the caller asked for something that makes no sense
    │   └── OptionError             a -o option is unknown, malformed or not allowed here
    ├── ImageError                  something about an image file (carries path, and offset where known)
    │   ├── ImageNotFound           the file does not exist or cannot be opened
    │   ├── UnknownFormat           no format recognises the file
    │   ├── AmbiguousFormat         more than one format claims the file (polyglot)
    │   ├── FormatMismatch          the caller said one format, the file is another
    │   ├── CorruptImage            the metadata contradicts itself (carries offset)
    │   │   └── TruncatedImage      a structure runs past the end of the file
    │   ├── UnsupportedFeature      a valid image uses a feature vmforge refuses (carries feature)
    │   ├── LimitExceeded           a size or count is beyond what we accept (carries limit)
    │   ├── ImageReadError          reading the file failed: an I/O error, or it shrank (carries offset)
    │   └── ReadOnlyImage           a write was asked of an image that must not be written
    ├── BackingChainError           a backing chain is broken, loops or is too deep
    ├── OutputError                 the destination cannot be created or written
    └── CompareError                compare could not be carried out (exit code 2)

Exceptions carry fields so that the CLI can print one line with a hint and tests can
assert on the field rather than the wording.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: pathlib is not needed to start the CLI
    from pathlib import Path


class VmforgeError(Exception):
    """Base class: a message, an optional hint, and the object it is about."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(VmforgeError):
    """The request itself is wrong (bad size, conflicting options...)."""


class OptionError(UsageError):
    """A format option (-o key=value) is unknown, malformed or out of range."""

    def __init__(self, message: str, *, option: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.option = option


class ImageError(VmforgeError):
    """Something is wrong with an image file; ``path`` names it, and ``offset`` says
    where in it, when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        offset: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.offset = offset
        if self.path and not message.startswith(self.path):
            message = f"{self.path}: {message}"
        super().__init__(message, hint=hint)


class ImageNotFound(ImageError):
    hint = "check the path; vmforge opens only regular files you name"


class UnknownFormat(ImageError):
    hint = "pass the format explicitly with -f FORMAT (see 'vmforge formats')"


class AmbiguousFormat(ImageError):
    hint = "the file looks like more than one format; pass -f only if you trust its origin"


class FormatMismatch(ImageError):
    hint = "the file is not in the format you named; check where it came from"


class CorruptImage(ImageError):
    """Metadata that cannot be right; ``offset`` is where it was found, if known."""

    hint = "run 'vmforge check' on it; do not write to it"


class TruncatedImage(CorruptImage):
    hint = "the file is shorter than its own metadata says; was the copy complete?"


class UnsupportedFeature(ImageError):
    """A feature we recognise but refuse (encryption, unknown incompatible bits...)."""

    def __init__(
        self,
        feature: str,
        *,
        path: str | Path | None = None,
        detail: str = "",
        hint: str | None = None,
    ) -> None:
        message = f"unsupported: {feature}" + (f" ({detail})" if detail else "")
        super().__init__(message, path=path, hint=hint)
        self.feature = feature


class LimitExceeded(ImageError):
    """A header field asks for more than vmforge allows (memory, size, count)."""

    hint = "the image is hostile or damaged; refused before allocating anything"

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        limit: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, path=path, hint=hint)
        self.limit = limit


class ImageReadError(ImageError):
    """The operating system could not give back an image's bytes: an I/O error from the
    storage, or a file that got shorter while it was being read. ``offset`` is where,
    in the file when known (else in the guest, as the message says)."""

    hint = "check the storage holding the image (the kernel log may say more)"


class ReadOnlyImage(ImageError):
    hint = "repair a copy instead ('vmforge convert' then check)"


class BackingChainError(VmforgeError):
    hint = "inspect the chain with 'vmforge info --backing-chain'"

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class OutputError(VmforgeError):
    hint = "check the destination directory exists, is writable and has space"


class CompareError(VmforgeError):
    """compare could not be completed; maps to exit code 2 like qemu-img."""
