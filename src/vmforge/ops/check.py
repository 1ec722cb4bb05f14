"""``check``: metadata consistency, answered by the format that has metadata to check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine.chain import untrusted_reference
from ..errors import UnsupportedFeature, UsageError
from ..formats import OpenOptions, detect_format, get_format, open_layer
from ..model.check import CheckResult

if TYPE_CHECKING:
    from ..formats.qcow2.repair import RepairReport


def check(path: str, fmt: str | None = None, *, untrusted: bool = False) -> CheckResult:
    """Check one image file (backing files are not opened; nothing is written).

    Raises UnsupportedFeature("checks") for formats without metadata (qemu-img exit 63).
    """
    with open_layer(path, fmt, OpenOptions(untrusted=untrusted)) as reader:
        if untrusted and reader.backing is not None:
            raise untrusted_reference(path, reader.backing.filename)
        return reader.check()


def repair(path: str, mode: str, fmt: str | None = None, *,
           untrusted: bool = False) -> tuple[RepairReport, CheckResult]:
    """``check -r leaks|all``: repair in place, then check again (as qemu-img does).

    Returns the repair report and the check of the repaired image. Raises
    UnsupportedFeature("checks") for formats without metadata, UnsupportedFeature for
    formats whose repair vmforge does not implement (only qcow2, and VHDX whose repair
    is replaying its log in place), CorruptImage for
    damage it will not touch (nothing is written then).
    """
    if mode not in ("leaks", "all"):
        raise UsageError(f"invalid -r mode '{mode}'", hint="use -r leaks or -r all")
    # the writing side loads only here: a plain check never needs it
    from ..formats.qcow2.repair import RepairReport, repair_qcow2
    from ..formats.vhdx.log import replay_in_place

    if (get_format(fmt) if fmt else detect_format(path)).name == "vhdx":
        # a VHDX's only repair is replaying its log (qemu-img does it on a read-write open)
        replayed = replay_in_place(path)  # any -r opens read-write in qemu, which replays
        return RepairReport(before=CheckResult(path, "vhdx"),
                            corruptions_fixed=1 if replayed else 0), check(path, "vhdx")
    with open_layer(path, fmt, OpenOptions(untrusted=untrusted)) as reader:
        name = reader.format_name
        if name != "qcow2":
            reader.check()  # formats without checks raise UnsupportedFeature("checks")
            raise UnsupportedFeature(f"repairing {name} images", path=path,
                                     hint="only qcow2 images can be repaired")
    report = repair_qcow2(path, mode)
    return report, check(path, "qcow2", untrusted=untrusted)
