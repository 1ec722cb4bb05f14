"""Changing an existing VHDX in place: writes, resize, a new parent, flattening, emptying.

Used by ``convert -n``, ``resize``, ``commit`` and ``rebase``. What it does, and why:

* It refuses a file whose log needs replay ([MS-VHDX] 2.3.3: its metadata is not to be
  trusted until replayed), a damaged BAT, and a PARTIALLY_PRESENT block without a
  sector bitmap; all before anything is written.
* 2.2.2: before the first change to the file the headers get a new FileWriteGuid, and
  before the first change to what the guest sees a new DataWriteGuid too. Both header
  slots are rewritten, the non-current one first, each with a higher SequenceNumber,
  with LogGuid zero (nothing in the old log may ever be replayed over the new state).
  Moving data between a child and its parent without changing what the guest sees
  (emptying a committed child, changing only the parent locator with ``rebase -u``)
  keeps the DataWriteGuid, so the image's own children stay valid.
* A parent's DataWriteGuid changes when a commit writes into it, which breaks the
  parent_linkage of every child made before. ``make_empty`` (the end of a plain
  commit) re-links the emptied child to the parent's new DataWriteGuid; it reads
  exactly as the parent now does, so the link is true by construction. Children
  left holding data (``commit -d``, the images between a deep commit's top and base)
  keep the old linkage and are refused when read, as 2.6.2.6 intends; ``rebase -u``
  onto the parent re-links one once the user knows it is still right.
* Metadata goes through the log (journal.py, 2.3): data is written and flushed first,
  then the BAT pages that changed, the metadata items and the region tables are logged,
  flushed, written in place and flushed. A BAT that has to grow is written whole to
  fresh space at the end of the file and named by both region table copies in one log
  entry, so a crash leaves either the old or the new BAT named. Sector bitmap bits of
  a differencing disk are written in place right after the sectors they cover (as
  payload data is), not through the log.
* A differencing disk is never resized (2.6.2.6: it has its parent's size); a fixed disk
  stays fixed (LeaveBlocksAllocated: blocks past a shrink are dropped, blocks a grow adds
  are allocated) and is never given a parent.
"""

from __future__ import annotations

import os
import struct
import uuid
from typing import Any

import numpy as np

from ...engine.chain import resolve_backing_path
from ...errors import CorruptImage, OutputError, ReadOnlyImage, UnsupportedFeature, UsageError
from ...model.info import BackingRef
from ...util import tables
from ...util.fileio import pwrite_all, zero_range
from ..base import HostFile, OpenOptions
from . import structs as S
from .journal import PAGE, write_through_log
from .log import find_active_sequence
from .reader import MAX_BAT_BYTES, VhdxReader, read_headers
from .writer import HIDING_STATES, ParentInfo, VhdxWriter, parent_info


def _region_entries(reader: VhdxReader) -> list[S.RegionEntry]:
    """Every entry of the region table copy the reader used (unknown regions are kept)."""
    host = reader.host
    for at in (S.REGION_TABLE1_OFFSET, S.REGION_TABLE2_OFFSET):
        raw = host.pread(at, S.REGION_TABLE_SIZE)
        if not S.checksum_ok(raw):
            continue
        sig, _count, entries = S.unpack_region_table(raw)
        if sig == S.REGION_SIGNATURE and reader.bat_region in entries \
                and reader.meta_region in entries:
            return entries
    raise CorruptImage("no valid VHDX region table", path=host.path, offset=S.REGION_TABLE1_OFFSET)


class VhdxEditor(VhdxWriter):
    """The VHDX writer on an existing file; nothing is written until something changes."""

    @classmethod
    def open_existing(cls, path: str) -> VhdxEditor:
        host = HostFile(path)
        try:
            header = read_headers(host)
            if find_active_sequence(host, header):
                raise ReadOnlyImage("the VHDX log needs replay; vmforge does not write into such "
                                    "a file", path=path,
                                    hint="replay it first with 'vmforge check -r all'")
            if header.log_length < S.MiB:
                raise UnsupportedFeature("writing into a VHDX without a log", path=path,
                                         detail=f"LogLength {header.log_length}",
                                         hint="convert it into a new VHDX file")
        finally:
            host.close()
        reader = VhdxReader(path, OpenOptions())
        try:
            if reader.bat_errors:
                raise CorruptImage(f"will not write into a damaged image: {reader.bat_errors[0]}",
                                   path=path, hint="'vmforge check' lists every damaged BAT entry")
            self = cls.__new__(cls)
            self._load(reader, header, _region_entries(reader))
        finally:
            reader.close()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise ReadOnlyImage(f"cannot open for writing: {err.strerror}", path=path) from None
        return self

    def _load(self, reader: VhdxReader, header: S.Header, regions: list[S.RegionEntry]) -> None:
        m = reader.meta
        self.path = reader.path
        self.header = header
        self.regions = regions
        self.bat_region, self.meta_region = reader.bat_region, reader.meta_region
        raw_table = reader.host.pread(self.meta_region.file_offset, S.METADATA_TABLE_SIZE)
        self.meta_entries = S.unpack_metadata_table(raw_table)[2]
        self.virtual_size = m.virtual_size
        self.block_size = m.block_size
        self.log_size = header.log_length
        self.fixed = m.leave_blocks_allocated
        self.zero_state = True
        self.sector = m.logical_sector_size
        self.ratio = reader.ratio
        self.spb = m.block_size // m.logical_sector_size
        self.blocks = reader.blocks
        # the reader's and the writer's BAT are both array.array (host order); whole-table
        # steps here see this copy through _view
        self.bat = reader.bat[:]
        self.old_bat = tables.to_bytes(self.bat, "little")
        self.parent: ParentInfo | None = None
        self.backing = reader.backing
        self.locator = m.parent_locator
        if m.has_parent and m.parent_locator is not None:
            e = m.parent_locator.entries
            guid = S.parse_guid_str(e.get("parent_linkage", "")) or S.ZERO_GUID
            self.parent = ParentInfo(guid, e.get("relative_path", ""),
                                     e.get("absolute_win32_path", ""))
        self.counts: dict[int, int] = {}
        self.bitmaps: dict[int, int] = {}
        self._index()
        ends = [reader.host_file.size]
        bat = self._view()
        states = bat[self.payload_idx] & np.uint64(S.BAT_STATE_MASK)
        present = (states == S.PAYLOAD_BLOCK_FULLY_PRESENT) | \
                  (states == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        if present.any():
            top = int((bat[self.payload_idx][present]
                       & np.uint64(S.BAT_FILE_OFFSET_MASK)).max())
            ends.append(top + self.block_size)
        if self.parent is not None:
            for chunk in range(-(-self.blocks // self.ratio)):
                sb = int(self.bat[S.sb_index(chunk, self.ratio)])
                if sb & S.BAT_STATE_MASK == S.SB_BLOCK_PRESENT:
                    self.bitmaps[chunk] = sb & S.BAT_FILE_OFFSET_MASK
                    ends.append(self.bitmaps[chunk] + S.SECTOR_BITMAP_SIZE)
            partial = np.flatnonzero(states == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            lost = [int(b) for b in partial if int(b) // self.ratio not in self.bitmaps]
            if lost:
                raise CorruptImage(f"block {lost[0]} is PARTIALLY_PRESENT but its chunk has no "
                                   "sector bitmap", path=self.path)
        ends += [r.file_offset + r.length for r in regions]
        self.end = -(-max(ends) // S.ALIGNMENT) * S.ALIGNMENT
        self.reusable = self._reusable_blocks(reader) if self.fixed else {}
        self.data_start = self.end  # unused by the editor; kept for the writer's contract
        #: space of dropped blocks and bitmaps, punched only once the BAT no longer names
        #: it (a crash before that must not leave the old BAT pointing at zeros)
        self.holes: list[tuple[int, int]] = []
        self.meta_changed = self.locator_changed = False
        self.file_guid_done = self.data_guid_done = False

    def _reusable_blocks(self, reader: VhdxReader) -> dict[int, int]:
        """Blocks of a fixed disk that are not present but keep their place in the file.

        qemu-img makes fixed disks with every block ZERO (block_state_zero) at its own
        offset; writing one should use that place, not grow the file. An offset is used
        only when it lies in the file, clear of every region, and no other entry names it.
        """
        entries = self._view()[self.payload_idx]
        offsets = (entries & np.uint64(S.BAT_FILE_OFFSET_MASK)).astype(np.int64)
        states = entries & np.uint64(S.BAT_STATE_MASK)
        named = offsets[offsets > 0]
        values, counts = np.unique(named, return_counts=True)
        shared = values[counts > 1]
        ok = (offsets >= S.HEADER_SECTION_SIZE) & (offsets + self.block_size <= self.end)
        ok &= ~np.isin(offsets, shared)
        ok &= (states != S.PAYLOAD_BLOCK_FULLY_PRESENT) & \
              (states != S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        for r0, rl in reader.regions[1:]:
            ok &= ~((offsets < r0 + rl) & (r0 < offsets + self.block_size))
        return {int(b): int(offsets[b]) for b in np.flatnonzero(ok)}

    def _host(self, blk: int) -> int:
        at = self.reusable.pop(blk, None)
        if at is None:
            return super()._host(blk)
        self._modify(data=True)
        zero_range(self.fd, at, self.block_size)  # it read zeros until now
        self._set(blk, at, S.PAYLOAD_BLOCK_FULLY_PRESENT)
        return at

    def _view(self) -> np.ndarray[Any, Any]:
        """The BAT as a numpy array sharing its memory (changes reach the BAT)."""
        return np.frombuffer(self.bat, dtype=np.uint64)

    def _index(self) -> None:
        idx = np.arange(self.blocks, dtype=np.int64)
        self.payload_idx = idx + idx // self.ratio

    # -- headers (2.2.2) ---------------------------------------------------------------------

    def _modify(self, *, data: bool) -> None:
        if self.file_guid_done and (self.data_guid_done or not data):
            return
        h = self.header
        self._write_headers(uuid.uuid4().bytes_le,
                            uuid.uuid4().bytes_le if data else h.data_write_guid, S.ZERO_GUID)
        self.file_guid_done = True
        self.data_guid_done = self.data_guid_done or data

    def _write_headers(self, file_guid: bytes, data_guid: bytes, log_guid: bytes) -> None:
        """Both header slots, the non-current one first, each flushed (2.2.2.1)."""
        h = self.header
        with open(self.path, "rb") as f:
            f.seek(S.HEADER1_OFFSET)
            first_raw = f.read(S.HEADER_SIZE)
        first_is_current = S.checksum_ok(first_raw) and S.Header.unpack(first_raw) == h
        slots = (S.HEADER1_OFFSET, S.HEADER2_OFFSET)
        order = (slots[1], slots[0]) if first_is_current else slots
        new = h
        for n, at in enumerate(order, start=1):
            new = S.Header(S.HEADER_SIGNATURE, 0, h.sequence_number + n, file_guid, data_guid,
                           log_guid, S.LOG_VERSION, S.HEADER_VERSION, h.log_length, h.log_offset)
            pwrite_all(self.fd, new.sealed(), at)
            os.fsync(self.fd)
        # the header as it now stands in the slot written last (the current one)
        self.header = S.Header.unpack(new.sealed())

    def _set_log_guid(self, log_guid: bytes) -> None:
        h = self.header
        self._write_headers(h.file_write_guid, h.data_write_guid, log_guid)

    # -- resize ------------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow or shrink; blocks wholly past a shrink are freed, a grow reads zeros."""
        if self.parent is not None:
            raise UnsupportedFeature(
                "resizing a differencing VHDX", path=self.path,
                detail="a differencing disk has its parent's size (MS-VHDX 2.6.2.6)",
                hint="commit it into its parent, or flatten it with 'vmforge rebase -b \"\"', "
                     "then resize")
        if new_size <= 0 or new_size % self.sector:
            raise UsageError(f"the new size must be a positive multiple of this VHDX's "
                             f"{self.sector}-byte logical sector", hint=f"try "
                             f"{new_size + (-new_size) % self.sector}")
        if new_size > S.MAX_VIRTUAL_SIZE:
            raise UsageError("Image size too large; max of 64TB", hint="VHDX stops at 64 TiB")
        if new_size == self.virtual_size:
            return
        bs, old_size, old_blocks = self.block_size, self.virtual_size, self.blocks
        blocks, entries = S.bat_entry_count(new_size, bs, self.sector, False)
        if entries * 8 > MAX_BAT_BYTES:  # the reader would refuse the result
            raise UsageError(f"{new_size} bytes in {bs >> 20} MiB blocks needs a BAT of "
                             f"{entries * 8} bytes, beyond vmforge's {MAX_BAT_BYTES}",
                             hint="convert to a VHDX with larger blocks (-o block_size=...)")
        self._modify(data=True)
        if new_size > old_size and old_size % bs:
            # what an earlier shrink left past the old end must not reappear
            last = old_blocks - 1
            e = self._entry(last)
            if e & S.BAT_STATE_MASK == S.PAYLOAD_BLOCK_FULLY_PRESENT:
                inner = old_size - last * bs
                n = min(bs, new_size - last * bs) - inner
                zero_range(self.fd, (e & S.BAT_FILE_OFFSET_MASK) + inner, n)
        self._free_blocks(blocks, old_blocks)  # blocks past a shrink go
        bat = self.bat[:entries]  # (a copy) zero-extended to the new entry count
        bat.frombytes(bytes(8 * (entries - len(bat))))
        self.bat, self.blocks, self.virtual_size = bat, blocks, new_size
        self._index()
        if blocks > old_blocks:
            if self.fixed:  # LeaveBlocksAllocated: every block has its place in the file
                for blk in range(old_blocks, blocks):
                    self._set(blk, self.end, S.PAYLOAD_BLOCK_FULLY_PRESENT)
                    self.end += bs
                os.ftruncate(self.fd, self.end)  # sparse, as qemu creates fixed disks
            else:
                grown = self.payload_idx[old_blocks:]
                self._view()[grown] = S.PAYLOAD_BLOCK_ZERO
        self.meta_changed = True

    def _present(self, first: int, last: int) -> list[int]:
        """Blocks in ``[first, last)`` stored in the file (FULLY or PARTIALLY_PRESENT)."""
        states = self._view()[self.payload_idx[first:last]] & np.uint64(S.BAT_STATE_MASK)
        hit = (states == S.PAYLOAD_BLOCK_FULLY_PRESENT) | \
              (states == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        return [first + int(b) for b in np.flatnonzero(hit)]

    def _free_blocks(self, first: int, last: int) -> None:
        """Blocks ``[first, last)`` become NOT_PRESENT; their space becomes holes."""
        for blk in self._present(first, last):
            self.holes.append((self._entry(blk) & S.BAT_FILE_OFFSET_MASK, self.block_size))
        self._view()[self.payload_idx[first:last]] = S.PAYLOAD_BLOCK_NOT_PRESENT
        for table in (self.counts, self.reusable):
            for blk in [b for b in table if first <= b < last]:
                del table[blk]

    def _drop_bitmaps(self) -> None:
        for chunk, at in self.bitmaps.items():
            self.holes.append((at, S.SECTOR_BITMAP_SIZE))
            self.bat[S.sb_index(chunk, self.ratio)] = S.SB_BLOCK_NOT_PRESENT
        self.bitmaps = {}

    # -- differencing ------------------------------------------------------------------------

    def make_empty(self) -> None:
        """Drop every block and sector bitmap, then re-link to the parent as it is now.

        What the guest sees is unchanged (a commit put this image's data into the parent
        first), so the DataWriteGuid stays and this image's own children stay valid.
        """
        if self.parent is None:
            raise UnsupportedFeature("emptying a VHDX that has no parent", path=self.path,
                                     hint="keep the image as it is (commit -d)")
        current = self._current_parent()
        self._modify(data=False)
        self._free_blocks(0, self.blocks)
        self._drop_bitmaps()
        self.parent = ParentInfo(current, self.parent.relative_path, self.parent.absolute_path)
        # only the link changes: other keys (volume_path...) still name the same parent,
        # parent_linkage2 named the parent as it was
        assert self.locator is not None
        entries = {k: v for k, v in self.locator.entries.items() if k != "parent_linkage2"}
        entries["parent_linkage"] = S.guid_str(current)
        self._set_locator(S.ParentLocator(self.locator.locator_type, entries))
        self.meta_changed = True

    def _current_parent(self) -> bytes:
        """The DataWriteGuid of the parent this image names, read from its header now."""
        assert self.backing is not None
        host = HostFile(resolve_backing_path(self.path, self.backing.filename))
        try:
            return read_headers(host).data_write_guid
        finally:
            host.close()

    def set_backing(self, backing: BackingRef | None) -> None:
        """A new parent (the locator re-linked to its DataWriteGuid), or none (flatten).

        Flattening makes the disk dynamic: PARTIALLY_PRESENT blocks become FULLY_PRESENT
        with their unset sectors zeroed, NOT_PRESENT blocks become ZERO (the parent no
        longer shows through), the sector bitmaps go. A dynamic disk given a parent keeps
        what it shows: its NOT_PRESENT blocks become ZERO first.
        """
        if backing is None:
            if self.parent is not None:
                self._flatten()
            return
        target = resolve_backing_path(self.path, backing.filename)
        if os.path.exists(target) and os.path.samefile(target, self.path):
            raise UsageError(f"{self.path} cannot be its own parent",
                             hint="name the image the chain should continue with")
        info, size = parent_info(self.path, backing)
        if size != self.virtual_size:
            raise UsageError(f"a differencing VHDX has its parent's size: the new parent is "
                             f"{size} bytes, {self.path} is {self.virtual_size}",
                             hint="resize the parent first")
        if self.fixed:
            raise UnsupportedFeature("giving a fixed VHDX a parent", path=self.path,
                                     hint="convert it to a dynamic VHDX first "
                                          "(vmforge convert -O vhdx)")
        self._modify(data=False)
        if self.parent is None:
            view = self._view()
            states = view[self.payload_idx] & np.uint64(S.BAT_STATE_MASK)
            absent = self.payload_idx[(states == S.PAYLOAD_BLOCK_NOT_PRESENT)
                                      | np.isin(states, np.array(HIDING_STATES, dtype="<u8"))]
            view[absent] = S.PAYLOAD_BLOCK_ZERO
            _, entries = S.bat_entry_count(self.virtual_size, self.block_size, self.sector, True)
            bat = self.bat[:]  # (a copy: the view above still shares self.bat's memory)
            bat.frombytes(bytes(8 * (entries - len(bat))))
            self.bat = bat
        self.parent = info
        self.backing = BackingRef(info.relative_path, "vhdx")
        self._set_locator(info.locator())
        self.meta_changed = True

    def _flatten(self) -> None:
        self._modify(data=False)
        sec = self.sector
        view = self._view()
        states = view[self.payload_idx] & np.uint64(S.BAT_STATE_MASK)
        view[self.payload_idx[states == S.PAYLOAD_BLOCK_NOT_PRESENT]] = S.PAYLOAD_BLOCK_ZERO
        for blk in np.flatnonzero(states == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT).tolist():
            e = self._entry(blk)
            at, nbytes = self._block_bits(blk)
            bits = np.unpackbits(np.frombuffer(os.pread(self.fd, nbytes, at), np.uint8),
                                 bitorder="little")
            n = min(self.spb, -(-(self.virtual_size - blk * self.block_size) // sec))
            bits = bits[:n]
            # runs of unset sectors read the parent until now: from here on zeros
            edges = np.flatnonzero(np.diff(np.concatenate(([1], bits, [1])).astype(np.int8)))
            host = e & S.BAT_FILE_OFFSET_MASK
            for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                zero_range(self.fd, host + a * sec, (b - a) * sec)
            self._set(blk, host, S.PAYLOAD_BLOCK_FULLY_PRESENT)
        self._drop_bitmaps()
        self.counts = {}
        _, entries = S.bat_entry_count(self.virtual_size, self.block_size, self.sector, False)
        self.bat = self.bat[:entries]
        self.parent = None
        self.backing = None
        self._set_locator(None)
        self.meta_changed = True

    # -- metadata (2.6) ----------------------------------------------------------------------

    def _item(self, guid: bytes) -> S.MetadataEntry | None:
        return next((e for e in self.meta_entries if e.item_id == guid), None)

    def _set_locator(self, locator: S.ParentLocator | None) -> None:
        self.locator = locator
        self.locator_changed = True

    def _metadata_writes(self) -> list[tuple[int, bytes]]:
        """(offset in the region, bytes) to write: size, flags, locator and table."""
        out: list[tuple[int, bytes]] = []
        size_item = self._item(S.VIRTUAL_DISK_SIZE_GUID)
        params = self._item(S.FILE_PARAMETERS_GUID)
        assert size_item is not None and params is not None
        out.append((size_item.offset, struct.pack("<Q", self.virtual_size)))
        flags = (S.PARAMS_LEAVE_BLOCKS_ALLOCATED if self.fixed else 0) | \
                (S.PARAMS_HAS_PARENT if self.parent is not None else 0)
        out.append((params.offset + 4, struct.pack("<I", flags)))
        if self.locator_changed:
            entries = [e for e in self.meta_entries if e.item_id != S.PARENT_LOCATOR_GUID]
            old = self._item(S.PARENT_LOCATOR_GUID)
            if self.locator is not None:
                blob = self.locator.pack()
                if old is not None and len(blob) <= old.length:
                    at = old.offset
                else:
                    used = max([S.METADATA_TABLE_SIZE] + [e.offset + e.length for e in entries
                                                          if e.length])
                    at = -(-used // 8) * 8
                    if at + len(blob) > self.meta_region.length:
                        raise OutputError(f"{self.path}: no room for the parent locator in the "
                                          "metadata region", hint="make a new differencing "
                                          "disk with 'vmforge create -b' instead")
                entries.append(S.MetadataEntry(S.PARENT_LOCATOR_GUID, at, len(blob),
                                               S.META_IS_REQUIRED))
                out.append((at, blob))
            out.append((0, S.pack_metadata_table(entries)))
            self.meta_entries = entries
        return out

    # -- finish ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Flush the data, then the BAT pages that changed and the metadata, then flush."""
        if self.fd < 0:
            return
        try:
            if self.file_guid_done:
                self._commit_metadata()
        except OSError as err:
            raise OutputError(f"{self.path}: cannot update the VHDX metadata: "
                              f"{err.strerror}") from None
        finally:
            self.abort()

    def _commit_metadata(self) -> None:
        fd = self.fd
        os.fsync(fd)  # the data before anything that points at it
        pages: dict[int, bytes] = {}
        new = tables.to_bytes(self.bat, "little")
        moved = len(new) > self.bat_region.length
        old_region = self.bat_region
        if moved:
            # the grown BAT goes whole to fresh space, named only when the region table
            # changes (through the log, both copies in one entry)
            at, length = self.end, -(-len(new) // S.ALIGNMENT) * S.ALIGNMENT
            self.end = at + length
            os.ftruncate(fd, self.end)
            pwrite_all(fd, new, at)
            self.bat_region = S.RegionEntry(S.BAT_GUID, at, length, old_region.required)
            self.regions = [self.bat_region if r.guid == S.BAT_GUID else r for r in self.regions]
            table = S.pack_region_table(self.regions)
            for copy in (S.REGION_TABLE1_OFFSET, S.REGION_TABLE2_OFFSET):
                for i in range(0, S.REGION_TABLE_SIZE, PAGE):
                    pages[copy + i] = table[i:i + PAGE]
        else:
            # compared with what the region holds, not what the reader used: entries past
            # a shrink or a flatten are cleared even where an old writer left bytes
            base = old_region.file_offset
            span = min(old_region.length, -(-max(len(new), len(self.old_bat)) // PAGE) * PAGE)
            old = os.pread(fd, span, base).ljust(span, b"\0")
            new_padded = new.ljust(span, b"\0")
            for i in range(0, span, PAGE):
                piece = new_padded[i:i + PAGE]
                if piece != old[i:i + PAGE]:
                    pages[base + i] = piece
        if self.meta_changed:
            for off, blob in self._metadata_writes():
                self._patch(pages, self.meta_region.file_offset + off, blob)
        write_through_log(fd, self.header, pages, uuid.uuid4().bytes_le, self._set_log_guid)
        if moved:  # named by nothing now
            self.holes.append((old_region.file_offset, old_region.length))
        for at, n in self.holes:
            zero_range(fd, at, n)
        if self.holes:
            self._trim()

    def _patch(self, pages: dict[int, bytes], offset: int, blob: bytes) -> None:
        """Lay ``blob`` at file ``offset`` over the pages to log (read from the file first)."""
        end = offset + len(blob)
        for page in range(offset - offset % PAGE, end, PAGE):
            cur = bytearray(pages.get(page) or os.pread(self.fd, PAGE, page).ljust(PAGE, b"\0"))
            lo, hi = max(offset, page), min(end, page + PAGE)
            cur[lo - page:hi - page] = blob[lo - offset:hi - offset]
            pages[page] = bytes(cur)

    def _trim(self) -> None:
        """Cut the file after the last byte still in use (freed blocks at the end)."""
        used = [r.file_offset + r.length for r in self.regions]
        used.append(self.header.log_offset + self.header.log_length)
        entries = self._view()[self.payload_idx]
        states = entries & np.uint64(S.BAT_STATE_MASK)
        present = (states == S.PAYLOAD_BLOCK_FULLY_PRESENT) | \
                  (states == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        if present.any():
            used.append(int((entries[present] & np.uint64(S.BAT_FILE_OFFSET_MASK)).max())
                        + self.block_size)
        used += [at + S.SECTOR_BITMAP_SIZE for at in self.bitmaps.values()]
        end = -(-max(used) // S.ALIGNMENT) * S.ALIGNMENT
        if os.fstat(self.fd).st_size > end:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)


__all__ = ["VhdxEditor"]
