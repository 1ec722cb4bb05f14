"""Which accelerator QEMU gets: KVM when a short real probe proves it works, else TCG.

``/dev/kvm`` answering the KVM API is not enough. On hosts where it is served by a
nested-virtualization module (kvm_pvm), a standard guest hangs or crawls, so KVM is
trusted only after a tiny guest has run under it: a 512-byte boot sector that switches
the CPU straight from real mode to 64-bit long mode (identity-mapped 2 MiB page) and
writes to QEMU's isa-debug-exit port. QEMU then exits with ``(0x21 << 1) | 1 = 67``.
With working KVM this takes about 0.15 s; the probe allows ``PROBE_TIMEOUT`` seconds.
(On the PVM host this project is built on, it takes ~5 s and Linux hangs after its
decompressor: such a KVM is refused.)

The result is cached for the current boot of the host (keyed by the kernel's boot_id)
in the state root, and ``VMFORGE_ACCEL=kvm|tcg`` overrides the choice.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..util.run import CommandError, run

#: the probe guest, assembled from this source (GNU as, ld -Ttext=0x7c00 --oformat binary):
#:   .code16: cli; zero ds/es/ss; rep stosw 0x3000 bytes at 0x1000 (page tables);
#:   PML4[0]=0x2003, PDPT[0]=0x3003, PD[0]=0x83 (2 MiB page); cr3=0x1000; cr4|=PAE;
#:   EFER(0xC0000080)|=LME; lgdt; cr0|=PG|PE; ljmp 0x08:long64
#:   .code64 long64: mov $0x21,%al; out %al,$0xf4; 1: hlt; jmp 1b
#:   gdt: null, 0x00209A0000000000 (64-bit code segment); gdtr: limit 15, base gdt
PROBE_CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bf0010b90018f3abc70600100320c70600200330c7060030830066b800100000"
    "0f22d80f20e06683c8200f22e066b9800000c00f32660d000100000f30660f0116787c0f20c0660d01"
    "0000800f22c066ea607c00000800b021e6f4f4ebfd90000000000000000000000000009a20000f0068"
    "7c0000"
)
#: isa-debug-exit turns the byte written into exit status (byte << 1) | 1
PROBE_EXIT = (0x21 << 1) | 1
PROBE_TIMEOUT = 2.5
ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen and why (always shown to the user)."""

    name: str
    reason: str

    def qemu_args(self, cpus: int) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # multi-threaded TCG uses one host thread per vCPU
        return ["-accel", "tcg,thread=multi" if cpus > 1 else "tcg"]


def probe_image() -> bytes:
    """The probe guest as a 512-byte MBR boot sector."""
    return PROBE_CODE + bytes(510 - len(PROBE_CODE)) + b"\x55\xaa"


def probe_kvm(qemu: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the probe guest under KVM; (works, explanation)."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    with tempfile.TemporaryDirectory(prefix="vmforge-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(probe_image())
        argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc",
                "-accel", "kvm", "-m", "16", "-drive", f"file={disk},format=raw,if=ide",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        start = time.monotonic()
        try:
            result = run(argv, timeout=timeout, check=False)
        except CommandError:
            return False, f"a long-mode probe guest did not finish within {timeout:g} s under KVM"
        took = time.monotonic() - start
    if result.returncode == PROBE_EXIT:
        return True, f"KVM ran a long-mode probe guest in {took:.2f} s"
    detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
    return False, f"KVM probe failed (exit {result.returncode}: {detail[0]})"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose_accel(qemu: str, requested: str | None = None, cache_dir: Path | None = None) -> Accel:
    """``requested`` (kvm, tcg, auto/None) -> the Accel to use.

    Asking for kvm explicitly when the probe fails is an error, not a silent fallback.
    """
    requested = (requested or os.environ.get("VMFORGE_ACCEL") or "auto").lower()
    if requested not in (*ACCELS, "auto"):
        raise UsageError(f"unknown accelerator {requested!r}", hint="choose kvm, tcg or auto")
    if requested == "tcg":
        return Accel("tcg", "requested")
    cache = cache_dir / "accel.json" if cache_dir else None
    works, why = _cached(cache) if cache else (None, "")
    if works is None:
        works, why = probe_kvm(qemu)
        if cache:
            _store(cache, works, why)
    if works:
        return Accel("kvm", why)
    if requested == "kvm":
        raise UsageError(f"KVM is not usable here: {why}", hint="use --accel tcg (slower)")
    return Accel("tcg", f"software emulation; KVM not used: {why}")


def _cached(path: Path) -> tuple[bool | None, str]:
    try:
        data = json.loads(path.read_text())
        if data.get("boot_id") == _boot_id() and isinstance(data.get("works"), bool):
            return bool(data["works"]), str(data.get("reason", ""))
    except (OSError, ValueError, AttributeError):
        pass
    return None, ""


def _store(path: Path, works: bool, reason: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"boot_id": _boot_id(), "works": works, "reason": reason}))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache only saves a probe next time

