"""The one-pass inspector: what a file is, what it points at, and whether it is safe.

It reads a file or a stream once, in chunks of any size, keeping a bounded amount
(see stream.py). Every format's ``inspect`` runs on what was kept: while the stream
flows, to learn which later ranges to keep (discovery, file size unknown); at the end,
for the verdict (file size known). The stream is cut into fixed internal steps and
discovery runs only at step boundaries, so the verdict is the same whatever chunk
sizes the caller feeds (SECURITY.md row 20).

Checks, each named in the report:
  one-format        exactly one format claims the file (polyglots refused, row 17)
  expected-format   the format the caller stated is the format found (rows 18, 27)
  headers           the format's header checks pass (rows 3-7, 11-16, 21)
  no-references     untrusted mode: nothing names another file (rows 1, 2, 11, 12)
  size-quota        the virtual size is within the caller's quota (row 9)
  <hazard>          facts that make an image unusable as it is: corrupt or dirty
                    qcow2, a VHDX log that needs replay (rows 4, 16)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from ..errors import ImageNotFound, VmforgeError
from ..formats import Format, get_format
from ..formats.registry import PROBE_BYTES
from ..guest.partitions import read_partition_table
from ..model import human_size
from ..model.inspection import Check, FormatFacts, InspectReport
from .stream import HEAD, Capture, NeedBytes

#: internal step: discovery runs at these boundaries only, whatever the caller's chunks
STEP = 64 << 10
#: the discovery participant for a raw disk's partition table (extended boot records)
PARTITIONS = "partition table"
#: bytes kept beyond any range a parser asks for
LOOKAHEAD = 1 << 20
#: ISO 9660 volume descriptor signature ("CD001" at byte 1 of sector 16)
ISO_OFFSET, ISO_MAGIC = 0x8001, b"CD001"


class StreamInspector:
    """Feed bytes with ``feed``; ``finish`` returns the report."""

    def __init__(self, name: str = "<stream>", *, expect_format: str | None = None,
                 untrusted: bool = True, max_virtual_size: int | None = None) -> None:
        self.capture = Capture(name)
        self.expect = get_format(expect_format).name if expect_format else None
        self.untrusted = untrusted
        self.max_virtual_size = max_virtual_size
        self._pending = bytearray()
        self._waiting: dict[str, tuple[int, int] | None] = {}  # format -> range it awaits
        self._candidates: list[type[Format]] | None = None

    # -- streaming ---------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % STEP
        for pos in range(0, whole, STEP):
            self._step(bytes(self._pending[pos:pos + STEP]))
        del self._pending[:whole]

    def _step(self, block: bytes) -> None:
        self.capture.consume(block)
        if self._candidates is None and self.capture.seen >= min(HEAD, PROBE_BYTES):
            head = bytes(self.capture.head[:PROBE_BYTES])
            self._candidates = [f for f in Format.registry.values()
                                if f.name != "raw" and f.probe(head, Capture.UNKNOWN) > 1]
            self._waiting = {f.name: (0, 0) for f in self._candidates}
            if not self._candidates:  # a raw disk: its partition table is what to follow
                self._waiting[PARTITIONS] = (0, 0)
        for name, waiting in list(self._waiting.items()):
            if waiting is not None and (waiting == (0, 0) or self._arrived(waiting)):
                self._discover(name)

    def _arrived(self, rng: tuple[int, int]) -> bool:
        off, n = rng
        return off + n <= self.capture.seen

    def _discover(self, name: str) -> None:
        """Run a header reader on what we have; remember what it needs next."""
        try:
            if name == PARTITIONS:
                read_partition_table(self.capture.pread_upto, self.capture.size)
            else:
                get_format(name).inspect(self.capture)
        except NeedBytes as need:
            # keep a margin past what was asked: the next structure is usually right
            # behind it (metadata items after their table) and may pass by before the
            # next discovery step
            if self.capture.want(need.offset, max(need.length, LOOKAHEAD)) or \
                    self.capture.want(need.offset, need.length):
                self._waiting[name] = (need.offset, need.length)
                return
        except (VmforgeError, ValueError, OverflowError):
            pass  # the final run reports it, with the true file size
        self._waiting[name] = None

    # -- the verdict -------------------------------------------------------------------------------

    def finish(self) -> InspectReport:
        if self._pending:
            self._step(bytes(self._pending))
            self._pending.clear()
        cap = self.capture
        cap.end()
        report = InspectReport(cap.path, cap.size)
        fmt = self._detect(report)
        if fmt is None:
            return report
        if self.expect is not None:
            ok = self.expect == fmt.name
            report.checks.append(Check("expected-format", ok, f"stated {self.expect}, found "
                                       f"{fmt.name}" if not ok else fmt.name))
        try:
            facts = fmt.inspect(cap)
        except NeedBytes as need:
            report.checks.append(Check(
                "headers", False, f"metadata at offset {need.offset} (+{need.length} bytes) "
                "could not be kept in one pass; inspect the file instead of a stream"))
            return report
        except VmforgeError as err:
            report.checks.append(Check("headers", False, str(err)))
            return report
        except (ValueError, OverflowError) as err:  # a parser bug must not pass as "safe"
            report.checks.append(Check("headers", False, f"unreadable header: {err}"))
            return report
        self._judge(report, facts)
        if facts.format == "raw":
            self._partitions(report)
        return report

    def _partitions(self, report: InspectReport) -> None:
        """A raw disk's partition table, from what the capture kept (SECURITY.md row 26)."""
        cap = self.capture
        try:
            table = read_partition_table(cap.pread_upto, cap.size)
        except NeedBytes as need:
            report.checks.append(Check("partition-table", False,
                                       f"partition entries at offset {need.offset} could not "
                                       "be kept in one pass"))
            return
        if table.scheme is None:
            return
        report.details["partitions"] = table.to_json()
        report.checks.append(Check("partition-table", not table.problems,
                                   "; ".join(table.problems) or
                                   f"{table.scheme}, {len(table.partitions)} partitions"))

    def _detect(self, report: InspectReport) -> type[Format] | None:
        cap = self.capture
        head = bytes(cap.head[:PROBE_BYTES])
        tail = bytes(cap.tail[-512:]) if cap.size >= 512 else b""
        found = [f for f in Format.registry.values()
                 if max(f.probe(head, cap.size), f.probe_tail(tail, cap.size)) > 1]
        names = [f.name for f in found]
        if cap.head[ISO_OFFSET:ISO_OFFSET + len(ISO_MAGIC)] == ISO_MAGIC:
            names.append("iso9660")
        if len(names) > 1:
            report.checks.append(Check("one-format", False,
                                       "looks like more than one format: " + ", ".join(names)))
            return None
        fmt = found[0] if found else get_format("raw")
        report.checks.append(Check("one-format", True, names[0] if names else "raw"))
        return fmt

    def _judge(self, report: InspectReport, facts: FormatFacts) -> None:
        report.format, report.subformat = facts.format, facts.subformat
        report.virtual_size = facts.virtual_size
        report.references = list(facts.references)
        report.details = dict(facts.details)
        report.checks.append(Check("headers", True, "header checks passed"))
        if self.untrusted:
            if facts.references:
                named = "; ".join(f"{r.field} names '{r.value}'" for r in facts.references)
                report.checks.append(Check("no-references", False, named))
            else:
                report.checks.append(Check("no-references", True, "self-contained"))
        if self.max_virtual_size is not None and facts.virtual_size is not None:
            ok = facts.virtual_size <= self.max_virtual_size
            report.checks.append(Check(
                "size-quota", ok, f"virtual size {human_size(facts.virtual_size)}"
                + ("" if ok else f" exceeds the quota of {human_size(self.max_virtual_size)}")))
        for name, why in facts.hazards.items():
            report.checks.append(Check(name, False, why))


def inspect(stream: BinaryIO | Iterable[bytes], name: str = "<stream>", *,
            expect_format: str | None = None, untrusted: bool = True,
            max_virtual_size: int | None = None, chunk_size: int = 1 << 20) -> InspectReport:
    """Inspect a binary stream (a file object or an iterable of byte chunks) in one pass."""
    ins = StreamInspector(name, expect_format=expect_format, untrusted=untrusted,
                          max_virtual_size=max_virtual_size)
    if hasattr(stream, "read"):
        while chunk := stream.read(chunk_size):
            ins.feed(chunk)
    else:
        for chunk in stream:
            ins.feed(chunk)
    return ins.finish()


def inspect_path(path: str, *, expect_format: str | None = None, untrusted: bool = True,
                 max_virtual_size: int | None = None, chunk_size: int = 1 << 20) -> InspectReport:
    """Inspect a file by reading it front to back once (never opening anything else)."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as err:
        raise ImageNotFound(f"cannot open: {err.strerror}", path=path) from None
    with f:
        return inspect(f, path, expect_format=expect_format, untrusted=untrusted,
                       max_virtual_size=max_virtual_size, chunk_size=chunk_size)
