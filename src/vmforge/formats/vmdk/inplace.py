"""Changing an existing VMDK in place: resize, commit into it, empty it, rebase it.

Subformats: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse and
twoGbMaxExtentFlat. streamOptimized is refused (its grains are compressed and its
tables sit behind them: there is nowhere to put a changed grain), and so are the
ESX/ESXi types (vmfs*, seSparse) that qemu-img does not write either.

* Sparse extents are changed by sparse_edit.SparseEdit (grains appended, tables and
  directories rewritten at ``finish``, a larger grain directory moved to the end of
  the file when a growth needs one). Flat extents are written directly; a flat extent
  grows by extending its file.
* twoGbMaxExtent* grow by a last extent of up to 2 GiB and new -sNNN/-fNNN files named
  after the descriptor's own name, as qemu names them. New files are created under
  temporary names and linked to their final names (never over an existing file) only
  when the image is finished; a failure removes them. Extent files a shrink drops are
  removed after the new descriptor is written.
* The descriptor is edited line by line (descriptor.edit_descriptor), keeping whatever
  its maker wrote; the extent sizes and ddb.geometry.cylinders follow the new size.

CIDs (VMDK 5.0 "The Descriptor File": the CID changes when the content does, and a
child's parentCID names the CID of the parent it was made on):
  * a session that writes guest data or resizes gives the image a new random CID at
    ``finish``, as qemu does on its first write - so committing into a base changes
    the base's CID, and children of that base that were not part of the commit no
    longer match it (vmforge then refuses their chain; that is the point of CIDs);
  * rebasing (``set_backing``) keeps the CID: what a rebase writes keeps the guest's
    view of the image, so the image's own children stay valid; parentCID becomes the
    new parent's CID (ffffffff without one);
  * ``make_empty`` (the last step of a commit) keeps the CID and sets parentCID to the
    parent's current CID: the overlay was just committed into that parent, so it
    again describes the same disk on top of it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ...engine.chain import resolve_backing_path
from ...errors import ImageError, OutputError, UnsupportedFeature
from ...util.fileio import pwrite_all, zero_range
from ..base import BackingRef, ImageWriter, OpenOptions
from . import structs as S
from .descriptor import (
    MAX_EXTENTS,
    NO_PARENT_CID,
    ExtentLine,
    decode_descriptor,
    edit_descriptor,
    geometry_cylinders,
    parse_descriptor,
)
from .extents import FlatExtent, HostedSparseExtent
from .sparse_edit import SparseEdit, create_sparse_extent

SECTOR = S.SECTOR_SIZE
WRITABLE = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
_CONVERT_HINT = ("convert it to a monolithicSparse VMDK first (vmforge convert -O vmdk), "
                 "then convert back with -o subformat=streamOptimized")


@dataclass
class _Piece:
    """One extent of the disk being edited."""

    line: ExtentLine
    start: int
    size: int
    fd: int
    path: str
    file_offset: int = 0
    sparse: SparseEdit | None = None
    orig_file_size: int = 0
    #: temporary name of a file created in this session (linked to ``path`` at finish)
    tmp: str | None = None
    #: a flat extent made shorter: its file is cut at ``finish``
    shrunk: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


class VmdkInPlaceWriter(ImageWriter):
    """An existing monolithicSparse, monolithicFlat or twoGbMaxExtent* VMDK, opened to
    be changed. Raises UnsupportedFeature for other subformats, CorruptImage (and the
    reader's errors) for images that are not safe to write; nothing is written then."""

    def __init__(self, path: str) -> None:
        from .reader import VmdkReader

        self.path = path
        self.fds: list[int] = []
        self.pieces: list[_Piece] = []
        self.dropped: list[_Piece] = []
        self.changed = self.rebased = False
        self._parent: Any = None
        reader = VmdkReader(path, OpenOptions())
        try:
            self.create_type = reader.create_type
            if self.create_type == "streamOptimized":
                raise UnsupportedFeature("writing into a streamOptimized VMDK in place",
                                         path=path, hint=_CONVERT_HINT)
            if self.create_type not in WRITABLE:
                raise UnsupportedFeature(
                    f"writing into a {self.create_type} VMDK in place", path=path,
                    detail="vmforge changes " + ", ".join(WRITABLE) + " VMDKs in place",
                    hint="convert it to a monolithicSparse VMDK")
            self.desc = reader.descriptor
            self.monolithic = reader.monolithic
            self.parent_hint = self.desc.parent_filename_hint
            self.parent_cid = self.desc.parent_cid
            self.fd = self._open(path)
            if self.monolithic:
                ext = reader.extents[0]
                assert isinstance(ext, HostedSparseExtent)
                h = ext.header
                self.text = decode_descriptor(
                    os.pread(self.fd, h.descriptorSize * SECTOR, h.descriptorOffset * SECTOR),
                    path)
                line = self.desc.extents[0] if self.desc.extents else ExtentLine(
                    "RW", h.capacity, "SPARSE", os.path.basename(path))
                self.pieces.append(self._sparse_piece(line, 0, self.fd, path, h))
            else:
                self.text = decode_descriptor(os.pread(self.fd, 1 << 20, 0), path)
                self._open_extents(reader)
        except BaseException:
            reader.close()
            self.abort()
            raise
        reader.close()
        self.virtual_size = sum(p.size for p in self.pieces)
        grains = [p.sparse.grain for p in self.pieces if p.sparse is not None]
        self.granularity = max([*grains, 4096])
        if any(self.granularity % g for g in grains):
            self.abort()
            raise UnsupportedFeature("writing into a VMDK whose extents have different grain "
                                     "sizes", path=path, hint="convert it to a new VMDK")

    # -- opening --------------------------------------------------------------------------
    def _open(self, path: str, flags: int = 0) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | flags, 0o644)
        except OSError as err:
            raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None
        self.fds.append(fd)
        return fd

    def _parent_reader(self) -> Callable[[int, int], bytes] | None:
        return self._read_parent if self.parent_hint is not None else None

    def _sparse_piece(self, line: ExtentLine, start: int, fd: int, path: str,
                      header: S.SparseExtentHeader) -> _Piece:
        parent = self._parent_reader()

        def read(offset: int, length: int) -> bytes:
            assert parent is not None
            return parent(start + offset, length)

        edit = SparseEdit(fd, path, header, read if parent is not None else None)
        return _Piece(line, start, header.capacity * SECTOR, fd, path, sparse=edit,
                      orig_file_size=edit.orig_size)

    def _open_extents(self, reader: Any) -> None:
        want = "SPARSE" if self.create_type.endswith("Sparse") else "FLAT"
        names = [line.filename for line in self.desc.extents]
        if len(set(names)) != len(names) or os.path.basename(self.path) in names:
            raise UnsupportedFeature("writing into a VMDK whose extents share a file",
                                     path=self.path, hint="convert it to a new VMDK")
        directory = os.path.dirname(self.path)
        for line, ext in zip(self.desc.extents, reader.extents, strict=True):
            if line.type != want or line.access != "RW":
                raise UnsupportedFeature(
                    f"writing into a {self.create_type} VMDK with a {line.access} "
                    f"{line.type} extent", path=self.path, hint="convert it to a new VMDK")
            assert line.filename is not None
            fpath = os.path.join(directory, line.filename)
            fd = self._open(fpath)
            if isinstance(ext, FlatExtent):
                self.pieces.append(_Piece(line, ext.start, ext.size, fd, fpath,
                                          file_offset=ext.file_offset,
                                          orig_file_size=os.fstat(fd).st_size))
            else:
                assert isinstance(ext, HostedSparseExtent)
                self.pieces.append(self._sparse_piece(line, ext.start, fd, fpath, ext.header))

    # -- the parent -----------------------------------------------------------------------
    def _read_parent(self, offset: int, length: int) -> bytes:
        """Guest bytes of the parent chain (zeros past its end), for partial grains."""
        if self._parent is None:
            from ...engine.chain import open_chain
            from ...engine.stream import ExtentStream
            from ..registry import open_layer

            assert self.parent_hint is not None
            chain = open_chain(resolve_backing_path(self.path, self.parent_hint), "vmdk",
                               lambda p, f: open_layer(p, f, OpenOptions()))
            self._parent = (chain, ExtentStream(chain))
        chain, stream = self._parent
        n = max(0, min(length, chain.virtual_size - offset))
        data: bytes = stream.read(offset, n) if n else b""
        return data + bytes(length - n)

    def _parent_size(self) -> int:
        if self.parent_hint is None:
            return 0
        self._read_parent(0, 0)
        size: int = self._parent[0].virtual_size
        return size

    # -- guest data -----------------------------------------------------------------------
    def _split(self, offset: int, length: int) -> list[tuple[_Piece, int, int]]:
        out = []
        end = offset + length
        for p in self.pieces:
            if p.end <= offset or p.start >= end:
                continue
            lo, hi = max(offset, p.start), min(end, p.end)
            out.append((p, lo - p.start, hi - lo))
        return out

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.changed = True
        done = 0
        for p, inner, n in self._split(offset, len(view)):
            if p.sparse is not None:
                p.sparse.write(inner, view[done:done + n])
            else:
                pwrite_all(p.fd, view[done:done + n], p.file_offset + inner)
            done += n

    def write_zeroes(self, offset: int, length: int) -> None:
        self.changed = True
        for p, inner, n in self._split(offset, length):
            if p.sparse is not None:
                p.sparse.write_zeroes(inner, n)
            else:
                zero_range(p.fd, p.file_offset + inner, n)

    def make_empty(self) -> None:
        """Unmap everything (sparse only); parentCID follows the parent's current CID."""
        if any(p.sparse is None for p in self.pieces):
            raise UnsupportedFeature(f"emptying a {self.create_type} VMDK", path=self.path,
                                     hint="keep the overlay as it is (commit -d)")
        for p in self.pieces:
            assert p.sparse is not None
            p.sparse.make_empty()
        if self.parent_hint is not None:
            self.parent_cid = self._cid_of(self.parent_hint)

    # -- backing --------------------------------------------------------------------------
    def _cid_of(self, name: str) -> int:
        from .reader import VmdkReader

        target = resolve_backing_path(self.path, name)
        try:
            parent = VmdkReader(target, OpenOptions())
        except ImageError as err:
            raise UnsupportedFeature(f"a parent that is not a readable VMDK ({err.message})",
                                     path=self.path,
                                     hint="a VMDK's parent must be a VMDK image") from None
        try:
            cid: int = parent.descriptor.cid
        finally:
            parent.close()
        return cid

    def set_backing(self, backing: BackingRef | None) -> None:
        """New parentFileNameHint and parentCID; None makes a standalone disk (a delta
        VMDK is a sparse disk with a parent, so dropping the parent is all it takes)."""
        if backing is not None:
            if any(p.sparse is None for p in self.pieces):
                raise UnsupportedFeature(f"a parent for a {self.create_type} VMDK",
                                         path=self.path,
                                         hint="flat VMDKs cannot have a parent; convert it "
                                              "to a monolithicSparse VMDK first")
            if backing.format not in (None, "vmdk"):
                raise UnsupportedFeature(f"a {backing.format} parent for a VMDK",
                                         path=self.path, hint="a VMDK's parent must be a VMDK")
            if '"' in backing.filename or "\n" in backing.filename:
                raise UnsupportedFeature("a parent name with quotes or line breaks",
                                         path=self.path, hint="rename the parent file")
            self.parent_cid = self._cid_of(backing.filename)
            self.parent_hint = backing.filename
        else:
            self.parent_hint, self.parent_cid = None, NO_PARENT_CID
        self.rebased = True
        self._render()  # refuse a descriptor that no longer fits before finishing

    # -- size -----------------------------------------------------------------------------
    def resize(self, new_size: int) -> None:
        if new_size % SECTOR:
            raise UnsupportedFeature(f"a VMDK size of {new_size} bytes (not whole sectors)",
                                     path=self.path, hint="use a multiple of 512")
        old = self.virtual_size
        if new_size < old:
            self._shrink(new_size)
        elif new_size > old:
            self._grow(new_size)
        self.virtual_size = new_size
        self.changed = True
        self._render()
        if new_size > old and self.parent_hint is not None:
            # the parent must not show through the new space (qemu >= 5.1 zeroes it too)
            reach = min(new_size, self._parent_size())
            if reach > old:
                self.write_zeroes(old, reach - old)

    def _shrink(self, new_size: int) -> None:
        keep = [p for p in self.pieces if p.start < new_size]
        self.dropped.extend(p for p in self.pieces if p.start >= new_size)
        self.pieces = keep
        last = keep[-1]
        size = new_size - last.start
        if last.sparse is not None:
            last.sparse.resize(size // SECTOR)
        last.shrunk = last.sparse is None and size < last.size
        last.size = size
        last.line = replace(last.line, sectors=size // SECTOR)

    def _grow(self, new_size: int) -> None:
        split = self.create_type.startswith("twoGbMaxExtent")
        last = self.pieces[-1]
        room = new_size - last.start
        if split:
            room = min(room, max(S.SPLIT_EXTENT_BYTES, last.size))
        if room > last.size:
            if last.sparse is not None:
                if room > S.MAX_EXTENT_SECTORS * SECTOR:
                    raise UnsupportedFeature(
                        f"a {self.create_type} VMDK of {new_size} bytes", path=self.path,
                        detail="a sparse extent holds at most 2 TiB",
                        hint="convert it to -o subformat=twoGbMaxExtentSparse")
                last.sparse.resize(room // SECTOR)
            else:
                os.ftruncate(last.fd, max(os.fstat(last.fd).st_size, last.file_offset + room))
            last.size = room
            last.line = replace(last.line, sectors=room // SECTOR)
        pos = last.end
        if pos < new_size:
            count = len(self.pieces) + -(-(new_size - pos) // S.SPLIT_EXTENT_BYTES)
            if count > MAX_EXTENTS:
                raise UnsupportedFeature(f"a VMDK of more than {MAX_EXTENTS} extents",
                                         path=self.path)
            from .writer import extent_names

            names = extent_names(self.path, self.create_type, count)
            while pos < new_size:
                size = min(S.SPLIT_EXTENT_BYTES, new_size - pos)
                self._add_extent(names[len(self.pieces)], pos, size)
                pos += size

    def _add_extent(self, name: str, start: int, size: int) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        final = os.path.join(os.path.dirname(self.path), name)
        if os.path.lexists(final) or any(p.path == final for p in self.pieces + self.dropped):
            raise OutputError(f"{final}: already exists; the new extent file of "
                              f"{self.path} would overwrite it",
                              hint="move that file away first")
        try:
            tfd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".vmforge-tmp",
                                        dir=directory)
        except OSError as err:
            raise OutputError(f"{final}: cannot create a file in {directory}: "
                              f"{err.strerror}") from None
        self.fds.append(tfd)
        sparse = self.create_type.endswith("Sparse")
        line = ExtentLine("RW", size // SECTOR, "SPARSE" if sparse else "FLAT", name, 0)
        if sparse:
            header = create_sparse_extent(tfd, tmp, size // SECTOR)
            piece = self._sparse_piece(line, start, tfd, final, header)
            piece.orig_file_size = 0
        else:
            os.ftruncate(tfd, size)
            piece = _Piece(line, start, size, tfd, final)
        piece.tmp = tmp
        self.pieces.append(piece)

    # -- completion -----------------------------------------------------------------------
    def _render(self) -> bytes:
        if self.monolithic and not self.desc.extents:
            lines: list[ExtentLine] = []
        else:
            lines = [p.line for p in self.pieces]
        cid = self.desc.cid
        if self.changed and not self.rebased:
            while cid in (self.desc.cid, NO_PARENT_CID):
                cid = secrets.randbits(32)
        text = edit_descriptor(
            self.text, cid=cid, parent_cid=self.parent_cid, parent_hint=self.parent_hint,
            extents=lines, cylinders=geometry_cylinders(self.desc.ddb, self.virtual_size))
        raw = text.encode()
        parse_descriptor(raw, self.path, embedded=self.monolithic)  # never write garbage
        if self.monolithic:
            sparse = self.pieces[0].sparse
            assert sparse is not None
            room = sparse.header.descriptorSize * SECTOR
            if len(raw) > room:
                raise UnsupportedFeature(
                    f"a descriptor of {len(raw)} bytes in a VMDK with room for {room}",
                    path=self.path, hint="use a shorter parent file name")
        return raw

    def finish(self) -> None:
        raw = self._render()
        linked: list[str] = []
        for p in self.pieces:
            # from here on metadata refers to the appended space: a failure must not
            # truncate it away (abort then only removes files nothing names yet)
            p.orig_file_size = -1
        try:
            for p in self.pieces:
                if p.sparse is not None:
                    p.sparse.finish(raw if self.monolithic else None)
                elif p.shrunk and p.file_offset + p.size < os.fstat(p.fd).st_size:
                    os.ftruncate(p.fd, p.file_offset + p.size)
            for p in self.pieces:
                if p.tmp is not None:
                    os.link(p.tmp, p.path)  # fails rather than replace a file
                    linked.append(p.path)
            if not self.monolithic:
                pwrite_all(self.fd, raw, 0)
                os.ftruncate(self.fd, len(raw))
        except OSError as err:
            for name in linked:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            self.abort()
            raise OutputError(f"{self.path}: cannot update the VMDK: {err.strerror}") from None
        for p in self.pieces:
            if p.tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(p.tmp)
                p.tmp = None
        for p in self.dropped:
            with contextlib.suppress(OSError):
                os.unlink(p.path)
        self.dropped = []
        self.abort()

    def abort(self) -> None:
        """Undo what can be undone (appended space, new files) and close everything."""
        for p in self.pieces:
            if p.tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(p.tmp)
            elif p.orig_file_size >= 0 and p.fd in self.fds:
                with contextlib.suppress(OSError):
                    if os.fstat(p.fd).st_size > p.orig_file_size:
                        os.ftruncate(p.fd, p.orig_file_size)
        self.pieces, self.dropped = [], []
        if self._parent is not None:
            self._parent[0].close()
            self._parent = None
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def open_vmdk_for_write(path: str) -> ImageWriter:
    return VmdkInPlaceWriter(path)


__all__ = ["WRITABLE", "VmdkInPlaceWriter", "open_vmdk_for_write"]
