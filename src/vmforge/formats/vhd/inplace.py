"""Changing existing VHD files in place: writes, resize, a new parent, flattening, emptying.

qemu-img 7.2 can do none of this for VHD except plain writes into fixed and dynamic
disks, so the rules come from the specification and from what qemu and Hyper-V read:

- **Size.** A disk is sized by its CHS geometry or by "Current Size" depending on its
  creator (see structs.Footer.guest_size). A resized disk keeps its creator when the
  new size is exactly a CHS geometry (or the creator is already sized by Current
  Size, as Hyper-V's "win " is); otherwise it becomes "qem2" with the largest
  geometry, what ``qemu-img create -o force_size=on`` writes, so the new size is
  exact for qemu, Hyper-V and Azure alike.
- **Fixed** disks are the guest bytes then the footer: resizing moves the footer.
- **Dynamic** disks grow their BAT in place when the space up to the next structure
  allows, else the BAT moves to the end of the file (the header says where it is).
  Blocks dropped by a shrink are freed and the file is cut after the last structure.
- **Differencing** disks keep their parent's size (the parent check requires it), so
  they are not resized. A new parent rewrites the parent ID, name and locators;
  flattening (no parent) makes the disk dynamic: sectors a block does not hold are
  zeroed and every bitmap bit set, since a dynamic disk's blocks are read whole.
- Nothing is written before the image has been checked for overlapping structures:
  writing a block that shares space with the BAT or another block would corrupt it.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np

from ...engine.chain import resolve_backing_path
from ...errors import CorruptImage, OutputError, UnsupportedFeature, UsageError
from ...model import align_up
from ...util import tables
from ...util.fileio import pwrite_all, zero_range
from ..base import BackingRef, ImageWriter, OpenOptions
from . import structs as S
from .parent import link_to
from .reader import VpcReader
from .writer import DifferencingWriter, DynamicWriter, FixedWriter


def open_existing(path: str) -> ImageWriter:
    """A writer on the existing VHD ``path`` (fixed, dynamic or differencing).

    Raises CorruptImage (and the reader's errors) for images that cannot be written
    safely; nothing is written before that.
    """
    reader = VpcReader(path, OpenOptions())
    try:
        if not reader.dynamic:
            return FixedEdit(reader)
        layout = _Layout(reader)
        if reader.differencing:
            return DifferencingEdit(reader, layout)
        return DynamicEdit(reader, layout)
    finally:
        reader.close()


def _open_rw(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise OutputError(f"{path}: cannot open for writing: {err.strerror}") from None


def resized_footer(footer: S.Footer, new_size: int, path: str) -> S.Footer:
    """The footer of ``footer``'s disk at ``new_size`` bytes (see the module docstring).

    Raises UsageError past qemu's 2040 GiB limit.
    """
    sectors = new_size // S.SECTOR
    if sectors > S.MAX_SECTORS:
        raise UsageError(f"{path}: {new_size} bytes is too large for a VHD (at most "
                         f"{S.MAX_SECTORS * S.SECTOR})", hint="VHD disks hold at most 2040 GiB")
    chs = (footer.cylinders, footer.heads, footer.sectors_per_track)
    by_current = footer.creator_application in S.CURRENT_SIZE_CREATORS or \
        footer.chs_sectors == S.MAX_GEOMETRY
    creator = footer.creator_application
    if by_current:
        if chs != S.CHS_MAX:
            # Hyper-V's own disks carry the specification's geometry for their size
            chs = S.calculate_geometry(sectors)
    else:
        exact = S.calculate_geometry(sectors)
        if exact[0] * exact[1] * exact[2] == sectors:
            chs = exact
        else:
            # no geometry holds the size: size by Current Size, as force_size does
            creator, chs = b"qem2", S.CHS_MAX
    return replace(footer, current_size=new_size, creator_application=creator,
                   cylinders=chs[0], heads=chs[1], sectors_per_track=chs[2])


class FixedEdit(FixedWriter):
    """Writes into a fixed disk's data area; resize moves the footer."""

    def __init__(self, reader: VpcReader) -> None:
        self.path = reader.path
        self.virtual_size = reader.virtual_size
        self.footer_obj = reader.footer
        self.footer_at = reader.host.size - S.FOOTER_SIZE
        self.footer = reader.host.pread(self.footer_at, S.FOOTER_SIZE)
        self.fd = _open_rw(self.path)

    def resize(self, new_size: int) -> None:
        footer = resized_footer(self.footer_obj, new_size, self.path)
        sealed = footer.sealed()
        old = self.virtual_size
        if new_size > old:
            # the new footer first: a crash leaves a readable (if untidy) disk
            pwrite_all(self.fd, sealed, new_size)
            os.ftruncate(self.fd, new_size + S.FOOTER_SIZE)
            # the grown range (slack past the old size and the old footer) reads zeros
            zero_range(self.fd, old, min(new_size, self.footer_at + S.FOOTER_SIZE) - old)
        else:
            pwrite_all(self.fd, sealed, new_size)
            os.ftruncate(self.fd, new_size + S.FOOTER_SIZE)
        self.footer_obj, self.footer, self.footer_at = footer, sealed, new_size
        self.virtual_size = new_size

    def set_backing(self, backing: BackingRef | None) -> None:
        if backing is not None:
            raise UnsupportedFeature("a parent for a fixed VHD", path=self.path,
                                     detail="only differencing VHDs have one",
                                     hint="create a differencing disk on the parent "
                                          "(vmforge create -f vpc -b PARENT -F vpc) instead")

    def finish(self) -> None:
        self._close()


class _Layout:
    """Where an existing dynamic or differencing disk keeps everything, checked for overlaps."""

    def __init__(self, reader: VpcReader) -> None:
        assert reader.header is not None and reader.bat is not None
        path, hdr = reader.path, reader.header
        self.header_at = reader.footer.data_offset
        self.bat_bytes = align_up(hdr.max_table_entries * 4, S.SECTOR)
        self.locators = [(e.platform_data_offset, align_up(e.platform_data_length, S.SECTOR))
                         for e in hdr.parent_locator_entries
                         if e.platform_code != S.PLATFORM_NONE and e.platform_data_length]
        span = reader.bitmap_size + reader.block_size
        bat = np.frombuffer(reader.bat, dtype=np.uint32)  # (the reader's array, not copied)
        used = bat[bat != S.BAT_UNUSED].astype(np.int64) * S.SECTOR
        starts = np.concatenate([used, np.array(
            [0, self.header_at, hdr.table_offset] + [a for a, _ in self.locators],
            dtype=np.int64)])
        lengths = np.concatenate([np.full(len(used), span, dtype=np.int64), np.array(
            [S.FOOTER_SIZE, S.DYNAMIC_HEADER_SIZE, hdr.max_table_entries * 4]
            + [n for _, n in self.locators], dtype=np.int64)])
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], (starts + lengths)[order]
        clash = np.flatnonzero(s[1:] < np.maximum.accumulate(e)[:-1])
        if clash.size:
            at = int(s[int(clash[0]) + 1])
            raise CorruptImage(f"structures overlap at offset {at} (a block shares space with "
                               "the BAT, a header or another block); refusing to write",
                               path=path, offset=at,
                               hint="convert it to a new file instead of changing it in place")
        self.end = int(e.max())  # end of the last structure
        #: where the next block (or the footer) goes: never over bytes that are in use
        self.append_at = max(self.end, reader.host.size - S.FOOTER_SIZE)


class DynamicEdit(DynamicWriter):
    """Writes, resize (growing or moving the BAT) into an existing dynamic disk."""

    def __init__(self, reader: VpcReader, layout: _Layout) -> None:
        assert reader.header is not None and reader.bat is not None
        self.path = reader.path
        self.virtual_size = reader.virtual_size
        self.footer_obj = reader.footer
        self.footer = reader.host.pread(0, S.FOOTER_SIZE)
        self.header = reader.header
        self.header_at = layout.header_at
        self.header_dirty = False
        self.block_size = reader.block_size
        self.bitmap_size = reader.bitmap_size
        self.bat = reader.bat[:]  # (a copy: the writer's own, of host-order integers)
        self.bat_written = layout.bat_bytes  # bytes of the BAT area as found
        self.layout = layout
        self.next_block = layout.append_at
        self.bitmap = b"\xff" * self.bitmap_size
        self.sectors_per_block = self.block_size // S.SECTOR
        self.present = {}
        self._may_track = True
        self._checked: dict[int, bool] = {}  # block index -> whether its bitmap is partial
        self.freed: list[tuple[int, int]] = []  # (host offset, length) to free in finish
        self.fd = _open_rw(self.path)

    def _tracks(self, index: int) -> bool:
        # Blocks qemu and vmforge write have every bit set; a dynamic disk from elsewhere
        # may mark only the sectors written (the specification allows it), and then the
        # sectors written now must be marked too, or Hyper-V would read them as zeros.
        partial = self._checked.get(index)
        if partial is None:
            entry = int(self.bat[index])
            if entry == S.BAT_UNUSED:
                partial = False  # allocated now, with every bit set
            else:
                raw = os.pread(self.fd, -(-self.sectors_per_block // 8), entry * S.SECTOR)
                partial = raw.count(0xFF) != len(raw)
            self._checked[index] = partial
        return partial

    def _free_block(self, index: int) -> None:
        entry = int(self.bat[index])
        if entry != S.BAT_UNUSED:
            self.present.pop(index, None)
            self._checked.pop(index, None)
            self.freed.append((entry * S.SECTOR, self.bitmap_size + self.block_size))
            self.bat[index] = S.BAT_UNUSED

    def _zero_tail(self, index: int, inner: int, end: int) -> None:
        """Zero bytes ``[inner, end)`` of block ``index`` if it is stored."""
        entry = int(self.bat[index])
        if entry != S.BAT_UNUSED and end > inner:
            zero_range(self.fd, entry * S.SECTOR + self.bitmap_size + inner, end - inner)

    def resize(self, new_size: int) -> None:
        footer = resized_footer(self.footer_obj, new_size, self.path)
        bs, old = self.block_size, self.virtual_size
        old_entries, new_entries = -(-old // bs), -(-new_size // bs)
        hdr = self.header
        if new_size < old:
            last = new_entries - 1
            self._zero_tail(last, new_size - last * bs, min(bs, old - last * bs))
            for index in range(new_entries, len(self.bat)):
                self._free_block(index)
            self.bat = self.bat[:new_entries]
            self.header = replace(hdr, max_table_entries=new_entries)
        elif new_size > old:
            if old % bs:  # the old last block's bytes past the old end must read zeros
                last = old_entries - 1
                self._zero_tail(last, old - last * bs, min(bs, new_size - last * bs))
            for index in range(old_entries, len(self.bat)):
                self._free_block(index)  # stale entries past the old end
            if new_entries > hdr.max_table_entries:
                self._grow_bat(new_entries)
        self.footer_obj, self.footer = footer, footer.sealed()
        self.virtual_size = new_size
        self.header_dirty = True

    def _grow_bat(self, entries: int) -> None:
        hdr = self.header
        need = align_up(entries * 4, S.SECTOR)
        table = hdr.table_offset
        # the BAT may grow up to the next structure after it (a block, a locator or the
        # header); when it is the last one, new blocks simply go after it
        ahead = [a for a, _ in self.layout.locators if a >= table]
        if self.header_at > table:
            ahead.append(self.header_at)
        later = [e * S.SECTOR for e in self.bat if e != S.BAT_UNUSED and e * S.SECTOR > table]
        if later:
            ahead.append(min(later))
        if ahead and table + need > min(ahead):
            # no room: the BAT moves to the end of the file, blocks are appended after it
            self.freed.append((table, self.bat_written))
            table = self.next_block
            self.bat_written = 0
        self.next_block = max(self.next_block, table + need)
        self.bat.extend(tables.filled(4, entries - len(self.bat), S.BAT_UNUSED))
        self.header = replace(hdr, max_table_entries=entries, table_offset=table)

    def set_backing(self, backing: BackingRef | None) -> None:
        if backing is not None:
            raise UnsupportedFeature("a parent for a dynamic VHD", path=self.path,
                                     detail="its unallocated blocks read as zeros, not as a "
                                            "parent's data",
                                     hint="convert it with -B PARENT into a differencing disk "
                                          "(vmforge convert -O vpc -B PARENT -F vpc)")

    def _end_of_structures(self) -> int:
        """Where the last structure in use ends (the footer goes there)."""
        hdr = self.header
        ends = [S.FOOTER_SIZE, self.header_at + S.DYNAMIC_HEADER_SIZE,
                hdr.table_offset + align_up(hdr.max_table_entries * 4, S.SECTOR)]
        ends += [e.platform_data_offset + align_up(e.platform_data_length, S.SECTOR)
                 for e in hdr.parent_locator_entries
                 if e.platform_code != S.PLATFORM_NONE and e.platform_data_length]
        last = max((e for e in self.bat if e != S.BAT_UNUSED), default=None)
        if last is not None:
            ends.append(last * S.SECTOR + self.bitmap_size + self.block_size)
        return max(ends)

    def _before_metadata(self) -> None:
        """Hook: data changes that must reach the file before the tables do."""

    def finish(self) -> None:
        self._store_all_bits()
        self._before_metadata()
        hdr = self.header
        bat = tables.to_bytes(self.bat, "big")
        # unused entries in the BAT's last sector (and in an area it shrank from) are
        # 0xFFFFFFFF, as qemu leaves them
        pad = max(align_up(len(bat), S.SECTOR), self.bat_written) - len(bat)
        pwrite_all(self.fd, bat + b"\xff" * pad, hdr.table_offset)
        if self.header_dirty:
            pwrite_all(self.fd, hdr.sealed(), self.header_at)
        # after a shrink, emptying or a move, the file ends after the last structure in use
        footer_at = self._end_of_structures() if self.freed else self.next_block
        pwrite_all(self.fd, self.footer, 0)
        pwrite_all(self.fd, self.footer, footer_at)
        os.ftruncate(self.fd, footer_at + S.FOOTER_SIZE)
        # only now that nothing refers to them: give the freed areas back
        for at, length in self.freed:
            if at < footer_at:
                zero_range(self.fd, at, min(length, footer_at - at))
        self._close()


class DifferencingEdit(DynamicEdit, DifferencingWriter):
    """An existing differencing disk: writes (sector-exact), a new parent, flatten, empty."""

    granularity = S.SECTOR

    def __init__(self, reader: VpcReader, layout: _Layout) -> None:
        DynamicEdit.__init__(self, reader, layout)
        self.bitmap = bytes(self.bitmap_size)
        self.flatten = False
        self.locator_data: list[tuple[int, bytes]] = []

    def _tracks(self, index: int) -> bool:
        return True

    def resize(self, new_size: int) -> None:
        raise UnsupportedFeature("resizing a differencing VHD", path=self.path,
                                 detail="it must keep its parent's size",
                                 hint="flatten it first (vmforge rebase -b '' FILE) or commit "
                                      "it into its parent, then resize")

    def make_empty(self) -> None:
        for index in range(len(self.bat)):
            self._free_block(index)
        self.present.clear()

    def set_backing(self, backing: BackingRef | None) -> None:
        if backing is None:
            self.flatten = True
            self._to_dynamic()
            return
        if backing.format != "vpc":
            raise UnsupportedFeature(f"a {backing.format} parent for a differencing VHD",
                                     path=self.path, hint="convert the parent to vpc first")
        parent = VpcReader(resolve_backing_path(self.path, backing.filename))
        try:
            pfooter, psize = parent.footer, parent.virtual_size
        finally:
            parent.close()
        if psize != self.virtual_size:
            raise UsageError(f"{backing.filename} is {psize} bytes but the differencing VHD "
                             f"{self.path} is {self.virtual_size}: a differencing VHD has its "
                             "parent's size", hint="resize the parent first")
        link = link_to(self.path, backing.filename, pfooter)
        # reuse the old locators' space where the new path fits, else append
        free = sorted(self.layout.locators, key=lambda a: a[1])
        entries: list[S.ParentLocator] = []
        self.locator_data = []
        for code, data in link.locator_data():
            need = max(S.SECTOR, align_up(len(data), S.SECTOR))
            slot = next((a for a in free if a[1] >= need and a[0] % S.SECTOR == 0), None)
            if slot is not None:
                free.remove(slot)
                at, space = slot
            else:
                at, space = self.next_block, need
                self.next_block += need
            entries.append(S.ParentLocator(platform_code=code, platform_data_space=space,
                                           platform_data_length=len(data),
                                           platform_data_offset=at))
            self.locator_data.append((at, data + bytes(space - len(data))))
        self.freed.extend(free)
        self.header = replace(
            self.header, parent_unique_id=link.unique_id, parent_time_stamp=link.time_stamp,
            parent_unicode_name=link.unicode_name(),
            parent_locator_entries=tuple(entries) + (S.ParentLocator(),) * (
                S.LOCATOR_COUNT - len(entries)))
        self.header_dirty = True

    def _to_dynamic(self) -> None:
        self.freed.extend(self.layout.locators)
        self.header = replace(self.header, parent_unique_id=bytes(16), parent_time_stamp=0,
                              parent_unicode_name=bytes(S.PARENT_NAME_SIZE),
                              parent_locator_entries=(S.ParentLocator(),) * S.LOCATOR_COUNT)
        self.footer_obj = replace(self.footer_obj, disk_type=S.DISK_TYPE_DYNAMIC)
        self.footer = self.footer_obj.sealed()
        self.header_dirty = True

    def _before_metadata(self) -> None:
        for at, data in self.locator_data:
            pwrite_all(self.fd, data, at)
        if not self.flatten:
            return
        # A dynamic disk's blocks are read whole: sectors this disk did not hold (they
        # were the parent's) become zeros, and every bit is set as qemu sets them.
        full = b"\xff" * self.bitmap_size
        for index, entry in enumerate(self.bat):
            if entry == S.BAT_UNUSED:
                continue
            host = entry * S.SECTOR + self.bitmap_size
            for run in re.finditer(rb"\x00+", self._stored_bits(index)):  # sectors not held
                zero_range(self.fd, host + run.start() * S.SECTOR,
                           (run.end() - run.start()) * S.SECTOR)
            pwrite_all(self.fd, full, entry * S.SECTOR)
