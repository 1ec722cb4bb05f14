"""Differencing VHD parents: reading the parent locators, choosing a parent, writing them.

A differencing disk names its parent three ways: "Parent Unique ID" (the parent's
footer "Unique Id", checked once the parent is open), "Parent Unicode Name" (a name
for people) and up to eight "Parent Locator Entries". vmforge follows only the two
Windows Unicode locators, in Hyper-V's order of preference: W2ru (relative to the
child's directory) first, then W2ku (absolute) when it is a local path once its
backslashes become slashes. A drive-letter or UNC path names another machine's file
system and is never guessed at. The locators are only stat()ed, never opened, and not
even that in untrusted mode: the chain refuses the reference there before anything
is touched (engine/chain.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ...engine.chain import resolve_backing_path
from ...errors import BackingChainError, CorruptImage, LimitExceeded, OptionError
from ...model.info import BackingRef
from ..base import ByteSource
from . import structs as S

#: A Windows path is at most 32,767 UTF-16 units; 64 KiB is beyond any real locator and
#: keeps a hostile "Platform Data Length" from costing memory.
MAX_LOCATOR_BYTES = 64 << 10

_DRIVE = re.compile(r"^[A-Za-z]:")
FOLLOWED = {S.PLATFORM_W2RU: "W2ru", S.PLATFORM_W2KU: "W2ku"}


@dataclass(frozen=True, slots=True)
class Locator:
    """One parent locator as stored, and the local file name it gives (if any)."""

    code: str  # "W2ru", "W2ku", ...
    text: str  # the stored path ("" for codes vmforge does not decode)
    local: str | None  # relative (W2ru) or absolute (W2ku) local name; None: not usable
    why: str = ""  # why ``local`` is None

    def describe(self) -> str:
        shown = f" '{self.text}'" if self.text else ""
        return f"{self.code}{shown}" + (f" ({self.why})" if self.why else "")


def read_locators(host: ByteSource, header: S.DynamicHeader) -> list[Locator]:
    """The header's parent locators, W2ru ones first, then W2ku, then the rest.

    Raises CorruptImage or LimitExceeded for entries whose data lies outside the file,
    is absurdly long or does not decode.
    """
    found: list[Locator] = []
    for i, entry in enumerate(header.parent_locator_entries):
        if entry.platform_code == S.PLATFORM_NONE:
            continue
        code = S.platform_name(entry.platform_code)
        length, at = entry.platform_data_length, entry.platform_data_offset
        if length > MAX_LOCATOR_BYTES:
            raise LimitExceeded(f"parent locator {i} ({code}) claims {length} bytes of data "
                                f"(at most {MAX_LOCATOR_BYTES} are accepted)", path=host.path,
                                limit="parent locator length")
        if at > host.size or length > host.size - at:
            raise CorruptImage(f"parent locator {i} ({code}): {length} bytes at offset {at} lie "
                               f"past the end of the file ({host.size} bytes)", path=host.path,
                               offset=at)
        if entry.platform_code not in FOLLOWED:
            found.append(Locator(code, "", None, "not followed by vmforge"))
            continue
        raw = host.pread(at, length) if length else b""
        text = _decode_utf16le(raw, host.path, i, code)
        if entry.platform_code == S.PLATFORM_W2RU:
            found.append(_relative(code, text))
        else:
            found.append(_absolute(code, text))
    order = {"W2ru": 0, "W2ku": 1}
    return sorted(found, key=lambda loc: order.get(loc.code, 2))


def _decode_utf16le(raw: bytes, path: str, index: int, code: str) -> str:
    if len(raw) % 2:
        raw = raw[:-1]  # an odd length cannot be UTF-16; the last byte is padding at best
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise CorruptImage(f"parent locator {index} ({code}) is not valid UTF-16",
                           path=path) from None
    text = text.split("\0", 1)[0]  # writers pad with NULs
    return text


def _relative(code: str, text: str) -> Locator:
    local = text.replace("\\", "/")
    if not local:
        return Locator(code, text, None, "empty")
    if _DRIVE.match(local) or local.startswith("/"):
        return Locator(code, text, None, "not a relative path")
    while local.startswith("./"):
        local = local[2:]
    return Locator(code, text, local or None, "" if local else "empty")


def _absolute(code: str, text: str) -> Locator:
    local = text.replace("\\", "/")
    if not local:
        return Locator(code, text, None, "empty")
    if _DRIVE.match(local):
        return Locator(code, text, None, "a Windows drive path")
    if local.startswith("//"):
        return Locator(code, text, None, "a Windows network path")
    if not local.startswith("/"):
        return Locator(code, text, None, "not an absolute path")
    return Locator(code, text, local)


def choose_parent(child: str, locators: list[Locator], parent_name: str, *,
                  untrusted: bool) -> tuple[BackingRef, BackingChainError | None]:
    """The backing reference to record, and the error to raise when following it fails.

    In untrusted mode nothing is looked up: the first usable name is recorded and the
    chain refuses it. Otherwise the first usable locator whose file exists wins.
    """
    usable = [loc for loc in locators if loc.local is not None]
    shown = usable[0].local if usable else (locators[0].text if locators and locators[0].text
                                            else parent_name)
    if untrusted:
        return BackingRef(shown or "(no parent locator)", "vpc"), None
    for loc in usable:
        assert loc.local is not None
        target = resolve_backing_path(child, loc.local)
        if os.path.exists(target) and not os.path.isdir(target):
            return BackingRef(loc.local, "vpc"), None
    tried = []
    for loc in locators:
        if loc.local is not None:
            tried.append(f"{loc.code} '{loc.text}' ({resolve_backing_path(child, loc.local)}: "
                         "no such file)")
        else:
            tried.append(loc.describe())
    detail = "; ".join(tried) if tried else "the header has no parent locator"
    name = f" '{parent_name}'" if parent_name else ""
    err = BackingChainError(
        f"{child}: parent VHD{name} not found; tried {detail}", path=child,
        hint="put the parent where the W2ru locator points (next to the child as Hyper-V "
             "does) or rebase the child")
    return BackingRef(shown or "(no parent locator)", "vpc"), err


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParentLink:
    """What a new differencing disk records about its parent."""

    unique_id: bytes  # the parent footer's "Unique Id"
    time_stamp: int  # the parent footer's "Time Stamp"
    name: str  # "Parent Unicode Name": the parent's file name
    relative: str  # W2ru text, ".\\dir\\parent.vhd" style
    absolute: str  # W2ku text, "\\abs\\dir\\parent.vhd"

    def locator_data(self) -> list[tuple[int, bytes]]:
        """(platform code, UTF-16 LE data) for the W2ku then W2ru locators, as Hyper-V orders them."""
        return [(S.PLATFORM_W2KU, self.absolute.encode("utf-16-le")),
                (S.PLATFORM_W2RU, self.relative.encode("utf-16-le"))]

    def unicode_name(self) -> bytes:
        return self.name.encode("utf-16-be")


def link_to(child: str, parent_name: str, footer: S.Footer) -> ParentLink:
    """The locators for ``parent_name`` (as the user gave it: relative to ``child``'s directory).

    Raises OptionError for names a Windows locator cannot carry.
    """
    target = os.path.abspath(resolve_backing_path(child, parent_name))
    rel = os.path.relpath(target, os.path.dirname(os.path.abspath(child)))
    for text in (target, rel):
        if "\\" in text:
            raise OptionError(f"the parent path '{text}' contains a backslash, which a VHD "
                              "parent locator cannot carry", option="backing_file",
                              hint="rename the parent file")
    relative = rel.replace("/", "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    base = os.path.basename(target)
    if len(base.encode("utf-16-be")) > S.PARENT_NAME_SIZE:
        raise OptionError(f"the parent file name '{base}' is longer than the 256 UTF-16 units "
                          "of Parent Unicode Name", option="backing_file")
    link = ParentLink(unique_id=footer.unique_id, time_stamp=footer.time_stamp, name=base,
                      relative=relative, absolute=target.replace("/", "\\"))
    for _, data in link.locator_data():
        if len(data) > MAX_LOCATOR_BYTES:
            raise OptionError("the parent path is too long for a VHD parent locator",
                              option="backing_file")
    return link
