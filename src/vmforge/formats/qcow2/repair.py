"""``check -r leaks|all`` for qcow2: refcount repairs as qemu-img 7.2 makes them.

What is repaired (QEMU block/qcow2-refcount.c, qcow2_check_refcounts and
check_oflag_copied):

* leaks (-r leaks and -r all): a refcount above the number of references is set to
  that number;
* refcount errors (-r all): a refcount below the number of references is raised;
  a referenced cluster with refcount 0 makes QEMU rebuild the refcount structures,
  which here is the same operation (the refcount structures are always written anew);
  with -r leaks that case fails like QEMU ("need to rebuild refcount structures");
* QCOW_OFLAG_COPIED flags of the active L1/L2 tables, judged against the repaired
  refcounts (-r all; -r leaks too when no refcount error is left, as qemu does).

Only refcount blocks, the refcount table, the header fields that point at them and
COPIED flags are written, through update.Qcow2Update (new structures in free space,
then one header switch). Any other kind of corruption (misaligned tables, references
past the end of the file, a damaged refcount table...) is refused before anything is
written: those need judgement about guest data, which a repair must not make.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import CorruptImage
from ...model.check import CheckResult
from .update import Qcow2Update


@dataclass
class RepairReport:
    """What was repaired, and the lines QEMU prints while doing it (stderr)."""

    before: CheckResult
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    messages: list[str] = field(default_factory=list)
    failed: bool = False  # QEMU's "Check failed": nothing was written

    @property
    def fixed(self) -> bool:
        return bool(self.leaks_fixed or self.corruptions_fixed)


def repair_qcow2(path: str, mode: str) -> RepairReport:
    """Repair ``path`` in place; ``mode`` is "leaks" or "all".

    Raises CorruptImage for damage this repair does not touch (nothing is written),
    ReadOnlyImage for images marked corrupt or read-only files.
    """
    fix_errors = mode == "all"
    with Qcow2Update(path, "repair", repair=True) as up:
        a = up.analysis
        report = RepairReport(before=a.result)
        if a.other_corruptions:
            raise CorruptImage(
                f"{a.other_corruptions} errors are not refcount or COPIED-flag errors; "
                "vmforge repairs only those", path=path,
                hint="keep the file as it is and copy the guest data out with 'vmforge convert'")
        stored = a.stored.astype(np.int64)
        expected = np.zeros(len(stored), dtype=np.int64)
        expected[: len(a.expected)] = a.expected[: len(stored)]
        # QEMU prints every mismatch first (its compare_refcounts without fixing)
        report.messages += [m for m in a.result.messages if m.startswith(("Leaked", "ERROR cluster"))]
        leak = stored > expected
        error = stored < expected
        rebuild = bool((error & (stored == 0)).any())
        if rebuild and not fix_errors:
            report.messages.append("ERROR need to rebuild refcount structures")
            report.failed = True
            return report
        fix = leak | error if fix_errors else leak
        if rebuild:
            report.messages.append("Rebuilding refcount structure")
        else:
            for i in np.flatnonzero(fix).tolist():
                report.messages.append(
                    f"Repairing cluster {i} refcount={int(stored[i])} reference={int(expected[i])}")
        report.leaks_fixed = int(np.count_nonzero(fix & leak))
        report.corruptions_fixed = int(np.count_nonzero(fix & error))
        up.refs[: len(stored)] = np.where(fix, expected, stored)
        # qemu repairs COPIED flags under -r leaks too, once no refcount error is left
        # (block/qcow2-refcount.c check_oflag_copied: a wrong flag next to a wrong
        # refcount could turn into a leak)
        fix_flags = fix_errors or not a.refcount_errors
        if fix_flags:
            _, lines = up.fix_copied(up.l1)
            report.messages += [f"Repairing {line}" for line in lines]
            report.corruptions_fixed += len(lines)
        if not report.fixed:
            return report
        up.commit(fix_flags=fix_flags)
        return report
