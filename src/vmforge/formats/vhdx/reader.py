"""Reading fixed, dynamic and differencing VHDX files as extents.

Every offset and count a header gives is checked against the file size and the
specification's limits before anything is allocated. Payload blocks read as QEMU 7.2
reads them (NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED: zeros; FULLY_PRESENT: stored
data). A differencing disk's PARTIALLY_PRESENT blocks consult the sector bitmap:
sectors whose bit is clear are UNALLOCATED here and come from the parent, as do
NOT_PRESENT blocks.

The BAT is an ``array.array`` (util/tables.py), scanned run by run in bat.py, not a
numpy array: reading an image then costs no numpy import (~0.09 s of start-up).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ...errors import (
    BackingChainError,
    CorruptImage,
    LimitExceeded,
    TruncatedImage,
)
from ...model import Extent, ExtentKind
from ...model.check import CheckResult
from ...model.info import BackingRef, ImageInfo
from ...util import tables
from ..base import HostFile, ImageReader, OpenOptions
from . import bat as B
from . import structs as S
from .log import OverlayFile, find_active_sequence
from .meta import Metadata, read_metadata, read_region_table

#: BAT bytes held in memory: a 64 TiB disk in 1 MiB blocks needs 512 MiB; the BAT must
#: also lie inside the file, so a small hostile file never makes us allocate much
MAX_BAT_BYTES = 512 * S.MiB
_BITMAP_CACHE = 4  # sector bitmap blocks (1 MiB each) kept in memory
#: states whose blocks are stored in the file (2.5.1.1)
PRESENT_STATES = (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)

ZERO_STATES = (S.PAYLOAD_BLOCK_NOT_PRESENT, S.PAYLOAD_BLOCK_UNDEFINED, S.PAYLOAD_BLOCK_ZERO,
               S.PAYLOAD_BLOCK_UNMAPPED, S.PAYLOAD_BLOCK_UNMAPPED_V095)


def read_headers(host: Any) -> S.Header:
    """The current header: the valid one with the higher sequence number (2.2.2).

    Two valid headers with equal sequence numbers are accepted only when identical
    (Disk2vhd writes them so), as QEMU does.
    """
    path = host.path
    if host.size < S.HEADER_SECTION_SIZE:
        raise TruncatedImage(f"file of {host.size} bytes is shorter than the 1 MiB VHDX "
                             "header section", path=path, offset=0)
    if host.pread(0, 8) != S.FILE_SIGNATURE:
        raise CorruptImage("no 'vhdxfile' signature at offset 0", path=path, offset=0)
    valid: list[tuple[S.Header, bytes]] = []
    for at in (S.HEADER1_OFFSET, S.HEADER2_OFFSET):
        raw = host.pread(at, S.HEADER_SIZE)
        if not S.checksum_ok(raw):
            continue
        hdr = S.Header.unpack(raw)
        if hdr.signature == S.HEADER_SIGNATURE and hdr.version == S.HEADER_VERSION:
            valid.append((hdr, raw[:80]))
    if not valid:
        raise CorruptImage("no valid VHDX header found (both headers have a bad signature, "
                           "version or CRC-32C)", path=path, offset=S.HEADER1_OFFSET)
    if len(valid) == 2 and valid[0][0].sequence_number == valid[1][0].sequence_number:
        if valid[0][1] != valid[1][1]:
            raise CorruptImage("the two VHDX headers have the same sequence number but differ",
                               path=path, offset=S.HEADER2_OFFSET)
        return valid[0][0]
    return max(valid, key=lambda v: v[0].sequence_number)[0]


class VhdxReader(ImageReader):
    format_name = "vhdx"

    def __init__(self, path: str, options: OpenOptions | None = None) -> None:
        opts = options or OpenOptions()
        self.path = path
        self.host_file = HostFile(path)
        self.host: HostFile | OverlayFile = self.host_file
        self.log_replayed = False
        self.bat_errors: list[str] = []
        try:
            self._open(opts)
        except BaseException:
            self.host_file.close()
            raise

    def _open(self, opts: OpenOptions) -> None:
        path = self.path
        self.header = read_headers(self.host_file)
        log = find_active_sequence(self.host_file, self.header)
        if log:
            if not opts.replay_log:
                raise CorruptImage(
                    "read-only open refused: the VHDX log needs replay", path=path,
                    hint="pass --replay-log to replay it in memory (the file stays untouched), "
                         "or replay it into the file with 'vmforge check -r all'")
            overlay = OverlayFile(self.host_file)
            overlay.apply(log)
            self.host = overlay
            self.log_replayed = True
        host = self.host
        log_region = (self.header.log_offset, self.header.log_length)
        self.bat_region, self.meta_region = read_region_table(host, log_region)
        self.meta: Metadata = read_metadata(host, self.meta_region)
        m = self.meta
        self.virtual_size = m.virtual_size
        self.block_size = m.block_size
        self.sector = m.logical_sector_size
        self.ratio = S.chunk_ratio(m.block_size, m.logical_sector_size)
        self.blocks, entries = S.bat_entry_count(m.virtual_size, m.block_size,
                                                 m.logical_sector_size, m.has_parent)
        nbytes = entries * 8
        if nbytes > self.bat_region.length:
            raise CorruptImage(f"the BAT region ({self.bat_region.length} bytes) is too small for "
                               f"{entries} entries", path=path, offset=self.bat_region.file_offset)
        if nbytes > MAX_BAT_BYTES:
            raise LimitExceeded(f"a BAT of {nbytes} bytes is beyond {MAX_BAT_BYTES}", path=path,
                                limit="bat_size")
        #: the whole BAT (payload and sector bitmap entries, 2.5) as host-order integers
        self.bat = tables.from_bytes(host.pread(self.bat_region.file_offset, nbytes), 8, "little")
        #: the payload entries alone (block b at index b) and their states, one byte each
        self.payload = B.payload_entries(self.bat, self.blocks, self.ratio)
        self.states = B.states(self.payload)
        self.regions = [(0, S.HEADER_SECTION_SIZE), log_region,
                        (self.bat_region.file_offset, self.bat_region.length),
                        (self.meta_region.file_offset, self.meta_region.length)]
        # Found now, reported by check() (exit 2 as in qemu-img) and raised by any read:
        # info still shows what the headers say about a damaged file.
        self.bat_errors = self._check_bat()
        self._bitmaps: OrderedDict[int, bytes] = OrderedDict()
        self._bitmaps_lock = threading.Lock()  # copy workers share the reader
        self.backing = self._choose_parent(opts) if m.has_parent else None

    # -- consistency ---------------------------------------------------------------------

    def _check_bat(self) -> list[str]:
        """Problems with the BAT as QEMU's vhdx_check_bat_entries finds them, and more.

        Present payload blocks must lie inside the file (the last one may be cut short)
        and clear of the header, log, BAT and metadata regions; present sector bitmap
        blocks must lie inside the file; PARTIALLY_PRESENT needs a parent. Blocks that
        follow one another in the file are checked a run at a time (bat.py).
        """
        errors: list[str] = []
        st = self.states
        if not self.meta.has_parent:
            partial = st.find(S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            if partial >= 0:
                errors.append(f"BAT entry {partial} is PARTIALLY_PRESENT in a disk "
                              "without a parent")
        bad_state = st.find(4)  # 2.5.1.1 defines no state 4
        if bad_state >= 0:
            errors.append(f"BAT entry {bad_state} has the undefined state 4")
        past: list[str] = []
        cut: list[str] = []
        overlap: list[str] = []
        bs = self.block_size
        for a, b, state in B.state_runs(st, 0, self.blocks):
            if state not in PRESENT_STATES or self._span_sound(a, b):
                continue
            for r0, r1, entry in B.contiguous_runs(self.payload, a, b, bs):
                if not self._run_sound(r0, r1, entry):
                    self._run_errors(r0, r1, entry, past, cut, overlap)
        errors += past + cut + overlap
        if self.meta.has_parent:
            size = self.host.size
            for c, e in enumerate(B.bitmap_entries(self.bat, self.ratio)):
                if e & S.BAT_STATE_MASK == S.SB_BLOCK_PRESENT:
                    sb = e & S.BAT_FILE_OFFSET_MASK
                    if sb < S.HEADER_SECTION_SIZE or sb + S.SECTOR_BITMAP_SIZE > size:
                        errors.append(f"sector bitmap of chunk {c} at {sb} lies outside the file")
        return errors

    def _block_length(self, blk: int) -> int:
        """Guest bytes of block ``blk`` (the last block may be short)."""
        return min(self.block_size, self.virtual_size - blk * self.block_size)

    def _span_sound(self, a: int, b: int) -> bool:
        """Whether every block of ``[a, b)`` surely lies inside the file and clear of
        every region, judged by the lowest and highest offset alone (min and max run
        in C): blocks written in any order pass at once when the regions lie outside
        their span, as both qemu and vmforge lay them out. False means: look closer."""
        with memoryview(self.payload) as table:  # (a view: no copy of a long run)
            entries = table[a:b]
            # FileOffsetMB holds the high bits: the smallest entry has the lowest offset
            lo = min(entries) & S.BAT_FILE_OFFSET_MASK
            hi = (max(entries) & S.BAT_FILE_OFFSET_MASK) + self.block_size
            entries.release()
        if lo < S.HEADER_SECTION_SIZE or hi > self.host.size:
            return False
        return not any(rl and lo < r0 + rl and r0 < hi for r0, rl in self.regions[1:])

    def _run_sound(self, a: int, b: int, entry: int) -> bool:
        """Whether blocks ``[a, b)``, stored one after another from ``entry``'s offset,
        all lie inside the file and clear of every region (the common case: one test)."""
        lo = entry & S.BAT_FILE_OFFSET_MASK
        last = lo + (b - 1 - a) * self.block_size
        if lo < S.HEADER_SECTION_SIZE or last + self._block_length(b - 1) > self.host.size:
            return False
        hi = last + self.block_size
        return not any(rl and lo < r0 + rl and r0 < hi for r0, rl in self.regions[1:])

    def _run_errors(self, a: int, b: int, entry: int, past: list[str], cut: list[str],
                    overlap: list[str]) -> None:
        """The messages of each damaged block of a run, block by block."""
        size = self.host.size
        bs = self.block_size
        for i in range(a, b):
            o = (entry & S.BAT_FILE_OFFSET_MASK) + (i - a) * bs
            n = self._block_length(i)
            if o >= size or o < S.HEADER_SECTION_SIZE:
                past.append(f"BAT entry {i} start offset {o} points outside the file "
                            f"({size} bytes); the image has probably been truncated")
            elif o + n > size:
                cut.append(f"BAT entry {i} end offset {o + n - 1} points after the end of the "
                           f"file ({size} bytes); the image has probably been truncated")
            elif any(rl and o < r0 + rl and r0 < o + bs for r0, rl in self.regions[1:]):
                overlap.append(f"BAT entry {i} (block at {o}) overlaps VHDX metadata")

    def check(self) -> CheckResult:
        result = CheckResult(filename=self.path, format="vhdx")
        result.corruptions = len(self.bat_errors)
        result.messages = list(self.bat_errors)
        return result

    # -- differencing ------------------------------------------------------------------------

    def _choose_parent(self, opts: OpenOptions) -> BackingRef:
        """The parent named by the locator: relative_path, else a usable absolute path."""
        loc = self.meta.parent_locator
        assert loc is not None
        candidates: list[str] = []
        rel = loc.entries.get("relative_path")
        if rel:
            name = rel.replace("\\", "/")
            while name.startswith("./"):
                name = name[2:]
            if name and not os.path.isabs(name) and ":" not in name.split("/")[0]:
                candidates.append(name)
        absolute = loc.entries.get("absolute_win32_path")
        if absolute:
            name = absolute.replace("\\", "/")
            # a drive letter or a \\?\ volume name means nothing on this host
            if name.startswith("/") and not name.startswith("//") and ":" not in name:
                candidates.append(name)
        if not candidates:
            raise BackingChainError(
                f"{self.path}: the parent locator names no parent usable on this host "
                f"({absolute or 'no path'})", path=self.path,
                hint="put the parent beside the child and keep its relative_path")
        if not opts.untrusted:
            directory = os.path.dirname(self.path)
            for name in candidates:
                if os.path.exists(os.path.join(directory, name)):
                    return BackingRef(name, "vhdx")
        return BackingRef(candidates[0], "vhdx")

    @property
    def parent_linkage(self) -> str | None:
        loc = self.meta.parent_locator
        return None if loc is None else loc.entries.get("parent_linkage")

    def verify_parent(self, parent: Any) -> None:
        """The parent must be a VHDX whose DataWriteGuid is the locator's parent_linkage."""
        if not isinstance(parent, VhdxReader):
            raise BackingChainError(f"{self.path}: the parent {parent.path} is not a VHDX file",
                                    path=self.path)
        loc = self.meta.parent_locator
        assert loc is not None
        want = [S.parse_guid_str(loc.entries.get(k, "")) for k in ("parent_linkage",
                                                                   "parent_linkage2")]
        have = parent.header.data_write_guid
        if have not in [w for w in want if w is not None and w != S.ZERO_GUID]:
            raise BackingChainError(
                f"{self.path}: parent {parent.path} has DataWriteGuid {S.guid_str(have)} but the "
                f"parent locator expects {loc.entries.get('parent_linkage')}", path=self.path,
                hint="the parent was modified or replaced after the child was made")
        if parent.virtual_size != self.virtual_size:
            raise BackingChainError(
                f"{self.path}: parent {parent.path} is {parent.virtual_size} bytes, the child "
                f"{self.virtual_size}", path=self.path)

    def _sector_bitmap(self, chunk: int) -> bytes:
        """The sector bitmap block of ``chunk``: bit n set means sector n of the chunk
        is in this file (2.4.2: bit n is bit n % 8 of byte n // 8, LSB first)."""
        with self._bitmaps_lock:
            raw = self._bitmaps.get(chunk)
            if raw is not None:
                self._bitmaps.move_to_end(chunk)
                return raw
        e = self.bat[S.sb_index(chunk, self.ratio)]
        if e & S.BAT_STATE_MASK != S.SB_BLOCK_PRESENT:
            raise CorruptImage(f"a PARTIALLY_PRESENT block in chunk {chunk} has no sector bitmap",
                               path=self.path)
        raw = self.host.pread(e & S.BAT_FILE_OFFSET_MASK, S.SECTOR_BITMAP_SIZE)
        with self._bitmaps_lock:
            self._bitmaps[chunk] = raw
            if len(self._bitmaps) > _BITMAP_CACHE:
                self._bitmaps.popitem(last=False)
        return raw

    # -- extents ---------------------------------------------------------------------------

    def iter_extents(self, start: int, length: int) -> Iterator[Extent]:
        end = min(start + length, self.virtual_size)
        if start >= end:
            return
        if self.bat_errors:
            raise CorruptImage(self.bat_errors[0], path=self.path,
                               hint="'vmforge check' lists every damaged BAT entry")
        bs = self.block_size
        absent = ExtentKind.UNALLOCATED if self.meta.has_parent else ExtentKind.ZERO
        # runs of one state (never read the BAT twice); stored blocks further split
        # where they stop following one another in the file
        for a, b, state in B.state_runs(self.states, start // bs, (end - 1) // bs + 1):
            r_start = max(start, a * bs)
            r_end = min(end, b * bs)
            if state == S.PAYLOAD_BLOCK_NOT_PRESENT:
                yield Extent(r_start, r_end - r_start, absent)
            elif state in ZERO_STATES:
                yield Extent(r_start, r_end - r_start, ExtentKind.ZERO)
            elif state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
                size = self.host.size
                for c0, c1, entry in B.contiguous_runs(self.payload, a, b, bs):
                    g0, g1 = max(r_start, c0 * bs), min(r_end, c1 * bs)
                    host = (entry & S.BAT_FILE_OFFSET_MASK) + g0 - c0 * bs
                    if host + g1 - g0 <= size:  # (inline: blocks in any order take one each)
                        yield Extent(g0, g1 - g0, ExtentKind.DATA, host_offset=host)
                    else:
                        yield from self._present(c0, g0, g1, entry)
            elif state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                for blk in range(a, b):
                    yield from self._partial(blk, r_start, r_end, self.payload[blk])
            else:
                raise CorruptImage(f"BAT entry of block {a} has invalid state {state}",
                                   path=self.path)

    def _present(self, blk: int, g0: int, g1: int, entry: int) -> Iterator[Extent]:
        """Guest bytes ``[g0, g1)`` of blocks stored one after another from block ``blk``,
        whose BAT entry is ``entry``."""
        host = (entry & S.BAT_FILE_OFFSET_MASK) + g0 - blk * self.block_size
        # a block cut short by the end of the file would read zeros past it (as in qemu);
        # _check_bat refuses such blocks before any read, so this only guards the reads
        stored = max(0, min(g1 - g0, self.host.size - host))
        if stored:
            yield Extent(g0, stored, ExtentKind.DATA, host_offset=host)
        if stored < g1 - g0:
            yield Extent(g0 + stored, g1 - g0 - stored, ExtentKind.ZERO)

    def _partial(self, blk: int, lo: int, hi: int, entry: int) -> Iterator[Extent]:
        bs = self.block_size
        g0 = max(lo, blk * bs)
        g1 = min(hi, (blk + 1) * bs)
        sec = self.sector
        spb = bs // sec
        chunk, within = divmod(blk, self.ratio)
        bitmap = self._sector_bitmap(chunk)
        # sectors of the chunk that [g0, g1) touches
        first = within * spb
        s0, s1 = first + (g0 - blk * bs) // sec, first + -(-(g1 - blk * bs) // sec)
        for a, b, stored in tables.bit_runs(bitmap, s0, s1, "little"):  # 2.4.2
            e0 = max(g0, blk * bs + (a - first) * sec)
            e1 = min(g1, blk * bs + (b - first) * sec)
            if stored:
                yield from self._present(blk, e0, e1, entry)
            else:
                yield Extent(e0, e1 - e0, ExtentKind.UNALLOCATED)

    def read_host(self, extent: Extent, buf: memoryview) -> None:
        assert extent.host_offset is not None
        self.host.preadinto(buf, extent.host_offset)

    def verbatim_file(self, extent: Extent) -> HostFile | None:
        # a replayed log lives in a private overlay: those reads must go through it
        if extent.reads_zero and not extent.hole:
            return None  # zero by metadata: the host bytes may hold anything
        return self.host if isinstance(self.host, HostFile) else None

    def info(self) -> ImageInfo:
        info = ImageInfo(filename=self.path, format="vhdx", virtual_size=self.virtual_size,
                         actual_size=self.host_file.allocated, cluster_size=self.block_size)
        if self.backing is not None:
            info.backing_filename = self.backing.filename
            info.full_backing_filename = os.path.join(os.path.dirname(self.path),
                                                      self.backing.filename)
            info.backing_format = "vhdx"
        if self.meta.parent_locator is not None:
            data = {k.replace("_", "-"): v for k, v in self.meta.parent_locator.entries.items()}
            info.format_specific = {"type": "vhdx", "data": data}
        return info

    def close(self) -> None:
        self.host.close()


__all__ = ["VhdxReader", "read_headers"]
