# References:
#   VMware "Virtual Disk Format 5.0" technical note: "The Descriptor File" (header
#   keys version, CID, parentCID, createType, parentFileNameHint; "Extent
#   Descriptions": access, size in sectors, type, file name, offset; "The Disk
#   Database" ddb.* keys).
#   libyal/libvmdk "VMWare Virtual Disk Format (VMDK)": "Descriptor file".
#   QEMU 7.2 block/vmdk.c (vmdk_parse_extents, vmdk_co_do_create's template): what
#   qemu reads and writes.
"""The VMDK text descriptor: a strict parser and qemu-compatible rendering.

Descriptors are attacker-controlled (../SECURITY.md rows 11-13): the parser accepts
only comments, blank lines, known ``key=value`` lines, ``ddb.*`` lines and well-formed
extent lines, refuses duplicates and anything else, and never touches the file system.
Extent file names are checked by ``check_extent_name`` before anything is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import CorruptImage, LimitExceeded, UnsupportedFeature

#: a text descriptor (or an embedded one) longer than this is refused; qemu reads at
#: most 1 MiB - 1 bytes and silently ignores the rest
MAX_DESCRIPTOR_BYTES = 1 << 20
#: more extents than this is not a disk anyone made (a 2 TiB twoGb* disk has 1024)
MAX_EXTENTS = 8192

NO_PARENT_CID = 0xFFFFFFFF  # parentCID of a disk without a parent (VMDK 5.0)

# createType values (VMDK 5.0 "The Descriptor File", plus ESXi's seSparse)
CREATE_TYPES = (
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "streamOptimized", "vmfs", "vmfsSparse", "vmfsThin", "vmfsPreallocated",
    "vmfsEagerZeroedThick", "vmfsRaw", "vmfsRDM", "vmfsRDMP", "seSparse", "fullDevice",
    "partitionedDevice", "custom", "2GbMaxExtentSparse", "2GbMaxExtentFlat",
)
# extent types (VMDK 5.0 "Extent Descriptions")
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW",
                "SESPARSE")
ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
# header keys real descriptors carry (VMware Workstation/ESXi, VirtualBox, qemu)
HEADER_KEYS = ("version", "encoding", "CID", "parentCID", "isNativeSnapshot",
               "createType", "parentFileNameHint", "changeTrackPath")

_EXTENT = re.compile(
    r'^(?P<access>[A-Z]+)[ \t]+(?P<sectors>[0-9]+)[ \t]+(?P<type>[A-Z]+)'
    r'(?:[ \t]+"(?P<name>[^"]*)"(?:[ \t]+(?P<offset>[0-9]+))?)?[ \t]*$')
_KEYVAL = re.compile(r'^(?P<key>[A-Za-z][A-Za-z0-9_.]*)[ \t]*=[ \t]*(?P<value>.*?)[ \t]*$')
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


@dataclass(frozen=True, slots=True)
class ExtentLine:
    """One line of "# Extent description": ``sectors`` of the disk stored as ``type``
    in ``filename`` (none for ZERO) starting at sector ``offset`` of that file."""

    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int = 0

    def render(self) -> str:
        if self.filename is None:
            return f"{self.access} {self.sectors} {self.type}"
        line = f'{self.access} {self.sectors} {self.type} "{self.filename}"'
        if self.type == "FLAT":
            line += f" {self.offset}"
        return line


@dataclass(slots=True)
class Descriptor:
    """A parsed descriptor; ``ddb`` keeps the disk database in file order."""

    create_type: str
    cid: int
    parent_cid: int = NO_PARENT_CID
    version: int = 1
    parent_filename_hint: str | None = None
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def virtual_sectors(self) -> int:
        return sum(e.sectors for e in self.extents)

    def render(self) -> str:
        """The descriptor as qemu-img 7.2 lays it out (vmdk_co_do_create)."""
        parent = (f'parentFileNameHint="{self.parent_filename_hint}"'
                  if self.parent_filename_hint is not None else "")
        lines = [
            "# Disk DescriptorFile",
            f"version={self.version}",
            f"CID={self.cid:x}",
            f"parentCID={self.parent_cid:x}",
            f'createType="{self.create_type}"',
            parent,
            "# Extent description",
            *(e.render() for e in self.extents),
            "",
            "# The Disk Data Base",
            "#DDB",
            "",
            *(f'{k} = "{v}"' for k, v in self.ddb.items()),
        ]
        return "\n".join(lines) + "\n"


def qemu_ddb(size: int, adapter_type: str = "ide", hwversion: str = "4",
             toolsversion: str = "2147483647") -> dict[str, str]:
    """The disk database qemu-img writes: geometry with 63 sectors per track and 16
    heads for IDE, 255 for the other adapters (as VMware does), cylinders truncated."""
    heads = 16 if adapter_type == "ide" else 255
    return {
        "ddb.virtualHWVersion": hwversion,
        "ddb.geometry.cylinders": str(size // (63 * heads * 512)),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": "63",
        "ddb.adapterType": adapter_type,
        "ddb.toolsVersion": toolsversion,
    }


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def _bad(path: str | None, lineno: int, line: str, why: str) -> CorruptImage:
    shown = line if len(line) <= 60 else line[:57] + "..."
    return CorruptImage(f"VMDK descriptor line {lineno} {why}: {shown!r}", path=path)


def looks_like_text_descriptor(head: bytes) -> bool:
    """qemu's vmdk_probe for text: '#' comment lines and lines of spaces, then
    ``version=1|2|3`` (an empty line stops the probe, as in qemu)."""
    p, n = 0, len(head)
    while p < n:
        c = head[p:p + 1]
        if c == b"#":
            nl = head.find(b"\n", p)
            p = n if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < n and head[p:p + 1] == b" ":
                p += 1
            if head[p:p + 1] == b"\r":
                p += 1
            if p >= n or head[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(head.startswith(b"version=%d%s" % (v, eol), p)
                   for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


def decode_descriptor(raw: bytes, path: str | None) -> str:
    """Descriptor bytes as text: up to the first NUL (embedded descriptors are padded),
    UTF-8 (the ``encoding`` VMware writes by default), no control characters."""
    if len(raw) > MAX_DESCRIPTOR_BYTES:
        raise LimitExceeded(f"VMDK descriptor of {len(raw)} bytes is larger than "
                            f"{MAX_DESCRIPTOR_BYTES}", path=path, limit="descriptor size")
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptImage(f"VMDK descriptor is not text (byte {err.start} is not UTF-8)",
                           path=path) from None
    return text


def parse_descriptor(raw: bytes, path: str | None = None, *,
                     embedded: bool = False) -> Descriptor:
    """Parse and validate a descriptor.

    A stand-alone descriptor must name at least one extent; an embedded one (inside a
    sparse extent, whose header defines the data) may name any or none. Raises
    CorruptImage (garbage, duplicates, missing keys), LimitExceeded (size, extent count)
    or UnsupportedFeature (descriptor version).
    """
    text = decode_descriptor(raw, path)
    values: dict[str, str] = {}
    ddb: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for lineno, rawline in enumerate(text.split("\n"), 1):
        line = rawline.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        if any(ord(c) < 0x20 and c != "\t" for c in line):
            raise _bad(path, lineno, line, "holds control characters")
        m = _EXTENT.match(line)
        if m is not None and m.group("access") in ACCESS_MODES:
            extents.append(_extent(m, path, lineno, line))
            if len(extents) > MAX_EXTENTS:
                raise LimitExceeded(f"VMDK descriptor names more than {MAX_EXTENTS} extents",
                                    path=path, limit="extent count")
            continue
        kv = _KEYVAL.match(line)
        if kv is None:
            raise _bad(path, lineno, line, "is not understood")
        key, value = kv.group("key"), _unquote(kv.group("value"))
        if key.startswith("ddb."):
            target = ddb
        elif key in HEADER_KEYS:
            target = values
        else:
            raise _bad(path, lineno, line, f"has an unknown key '{key}'")
        if key in target:
            raise _bad(path, lineno, line, f"repeats the key '{key}'")
        target[key] = value
    return _build(values, ddb, extents, path, embedded)


def _extent(m: re.Match[str], path: str | None, lineno: int, line: str) -> ExtentLine:
    etype = m.group("type")
    if etype not in EXTENT_TYPES:
        raise _bad(path, lineno, line, f"has an unknown extent type '{etype}'")
    name, offset = m.group("name"), m.group("offset")
    sectors = int(m.group("sectors"))
    if etype == "ZERO":
        if name is not None:
            raise _bad(path, lineno, line, "names a file for a ZERO extent")
    elif name is None:
        raise _bad(path, lineno, line, "names no file")
    if offset is not None and etype not in ("FLAT", "VMFSRAW", "VMFSRDM"):
        raise _bad(path, lineno, line, f"gives an offset for a {etype} extent")
    if etype == "FLAT" and offset is None:
        # qemu: "Invalid extent line" (a FLAT extent needs its start sector)
        raise _bad(path, lineno, line, "gives no offset for a FLAT extent")
    if sectors <= 0 or sectors >= 1 << 40:
        raise _bad(path, lineno, line, f"has an invalid size of {sectors} sectors")
    off = int(offset) if offset is not None else 0
    if off >= 1 << 40:
        raise _bad(path, lineno, line, f"has an invalid offset of {off} sectors")
    return ExtentLine(m.group("access"), sectors, etype, name, off)


def _build(values: dict[str, str], ddb: dict[str, str], extents: list[ExtentLine],
           path: str | None, embedded: bool) -> Descriptor:
    create_type = values.get("createType")
    if create_type is None:
        # qemu: "invalid VMDK image descriptor"
        raise CorruptImage("VMDK descriptor has no createType", path=path)
    version_text = values.get("version", "1")
    if version_text not in ("1", "2", "3"):
        raise UnsupportedFeature(f"VMDK descriptor version {version_text[:20]!r}", path=path,
                                 detail="versions 1 to 3 exist")
    cids = []
    for key in ("CID", "parentCID"):
        text = values.get(key)
        if text is None:
            # qemu's vmdk_read_cid fails the open without them
            raise CorruptImage(f"VMDK descriptor has no {key}", path=path)
        if not _HEX.match(text):
            raise CorruptImage(f"VMDK descriptor {key} {text[:20]!r} is not 8 hex digits",
                               path=path)
        cids.append(int(text, 16))
    if not extents and not embedded:
        raise CorruptImage("VMDK descriptor names no extent", path=path)
    extra = {k: v for k, v in values.items()
             if k not in ("createType", "version", "CID", "parentCID", "parentFileNameHint")}
    return Descriptor(create_type=create_type, cid=cids[0], parent_cid=cids[1],
                      version=int(version_text),
                      parent_filename_hint=values.get("parentFileNameHint"),
                      extents=extents, ddb=ddb, extra=extra)


def check_extent_name(name: str, path: str | None) -> None:
    """Refuse an extent file name that could leave the descriptor's directory or is not
    a plain file name: '/', '\\', '..', absolute paths, ``json:`` and protocol names,
    empty names and control characters (../SECURITY.md row 12). Opens nothing."""
    why = None
    if not name or name in (".", ".."):
        why = "is not a file name"
    elif name.startswith("json:") or _PROTOCOL.match(name):
        why = "is a protocol or json: name"
    elif "/" in name or "\\" in name:
        why = "contains a directory separator"
    elif any(ord(c) < 0x20 for c in name):
        why = "contains control characters"
    if why is not None:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise CorruptImage(f"VMDK extent file name {shown!r} {why}; refused", path=path,
                           hint="extent files must sit beside the descriptor and be named "
                                "plainly")


def edit_descriptor(text: str, *, cid: int, parent_cid: int, parent_hint: str | None,
                    extents: list[ExtentLine], cylinders: int | None) -> str:
    """``text`` with the CIDs, parentFileNameHint, extent lines and geometry replaced.

    Everything else (comments, ``encoding``, ``isNativeSnapshot``, ddb keys a tool of
    another vendor wrote, their order and line ends) stays as it was: an in-place
    edit must not lose what the image's maker put there. ``parent_hint`` None removes
    the hint; an absent hint is inserted after createType (where qemu writes it).
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    extents_done = hint_done = False
    rendered = [e.render() for e in extents]
    for raw in lines:
        line = raw.strip(" \t\r")
        m = _EXTENT.match(line)
        if m is not None and m.group("access") in ACCESS_MODES:
            if not extents_done:
                out.extend(rendered)
                extents_done = True
            continue
        kv = _KEYVAL.match(line) if line and not line.startswith("#") else None
        key = kv.group("key") if kv is not None else None
        if key == "CID":
            out.append(f"CID={cid:08x}")
        elif key == "parentCID":
            out.append(f"parentCID={parent_cid:08x}")
        elif key == "parentFileNameHint":
            if parent_hint is not None and not hint_done:
                out.append(f'parentFileNameHint="{parent_hint}"')
            hint_done = True
        elif key == "ddb.geometry.cylinders" and cylinders is not None:
            out.append(f'ddb.geometry.cylinders = "{cylinders}"')
        elif key == "createType" and parent_hint is not None and \
                not any(_is_key(x, "parentFileNameHint") for x in lines):
            out.extend([raw, f'parentFileNameHint="{parent_hint}"'])
            hint_done = True
        elif line == "# Extent description" and not extents_done and \
                not any(_is_extent(x) for x in lines):
            out.extend([raw, *rendered])
            extents_done = True
        else:
            out.append(raw)
    return newline.join(out)


def _is_key(raw: str, key: str) -> bool:
    kv = _KEYVAL.match(raw.strip(" \t\r"))
    return kv is not None and kv.group("key") == key


def _is_extent(raw: str) -> bool:
    m = _EXTENT.match(raw.strip(" \t\r"))
    return m is not None and m.group("access") in ACCESS_MODES


def geometry_cylinders(ddb: dict[str, str], size: int) -> int | None:
    """ddb.geometry.cylinders for a disk of ``size`` bytes with the disk's own heads and
    sectors per track, truncated as qemu computes it; None if the geometry is absent."""
    try:
        heads = int(ddb["ddb.geometry.heads"])
        sectors = int(ddb["ddb.geometry.sectors"])
    except (KeyError, ValueError):
        return None
    if "ddb.geometry.cylinders" not in ddb or heads <= 0 or sectors <= 0:
        return None
    return size // (heads * sectors * 512)
