"""Finding a format by name or by content."""

from __future__ import annotations

import os

from ..errors import (
    AmbiguousFormat,
    FormatMismatch,
    ImageNotFound,
    UnknownFormat,
    UnsupportedFeature,
)
from .base import Format, HostFile, ImageReader, OpenOptions

PROBE_BYTES = 4096


def list_formats() -> list[type[Format]]:
    return sorted(Format.registry.values(), key=lambda f: f.name)


def get_format(name: str) -> type[Format]:
    """The format called ``name`` (qemu-img's spelling or a common alias)."""
    key = name.lower()
    for fmt in Format.registry.values():
        if key == fmt.name or key in fmt.aliases:
            return fmt
    known = ", ".join(f.name for f in list_formats())
    raise UnknownFormat(f"unknown format '{name}'", hint=f"known formats: {known}")


def detect_format(path: str) -> type[Format]:
    """Probe a file: the single format whose header matches, else raw.

    Two or more non-raw matches mean a polyglot file and are refused.
    """
    host = HostFile(path)
    try:
        head = host.pread_upto(0, PROBE_BYTES)
        size = host.size
        tail = host.pread_upto(size - 512, 512) if size >= 512 else b""
    finally:
        host.close()
    # a footer counts like a header: a file with both is a polyglot and is refused
    scores = [(max(fmt.probe(head, size), fmt.probe_tail(tail, size)), fmt)
              for fmt in Format.registry.values()]
    strong = [(s, f) for s, f in scores if s > 1]
    if len(strong) > 1:
        names = ", ".join(f.name for _, f in strong)
        raise AmbiguousFormat(f"looks like more than one format ({names})", path=path)
    if strong:
        return strong[0][1]
    return get_format("raw")


def open_layer(path: str, fmt: str | None, options: OpenOptions | None = None) -> ImageReader:
    """Open one image file as a reader; an explicit ``fmt`` always wins over probing.

    When the caller names raw but the file carries another format's header, that is
    refused (../SECURITY.md row 18) unless the header is the caller's own business:
    the check only looks at probe scores, never follows anything.
    """
    opts = options or OpenOptions()
    if not os.path.lexists(path):
        raise ImageNotFound("no such file", path=path)
    format_cls = detect_format(path) if fmt is None else get_format(fmt)
    if fmt is not None and opts.untrusted and format_cls.name == "raw":
        probed = detect_format(path)
        if probed.name != "raw":
            raise FormatMismatch(f"named raw but the file is {probed.name}", path=path)
    if opts.snapshot is not None and not format_cls.capabilities.snapshots:
        raise UnsupportedFeature("internal snapshots", path=path,
                                 detail=f"{format_cls.name} images have none")
    return format_cls.open(path, opts)
