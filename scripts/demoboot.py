"""The demo's last act: boot the project's test guest from an image vmforge made.

The guest (tests/data/guest.py: the Debian kernel, a busybox initramfs, a small ext4
root disk) is built once per machine from Debian packages and cached. Its ext4 disk is
converted to qcow2 by vmforge, and that qcow2 is booted with ``vmforge run``: QEMU reads
vmforge's qcow2 through a private overlay, the guest mounts the disk and writes a file,
and afterwards the qcow2's checksum proves the write went into the overlay only.

Everything runs in the demo's work directory with its own VM state directory, so no VM
of the user is seen or touched; the VM is killed in a ``finally`` whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from toolpaths import REPO, run

NAME = "demo-guest"
WROTE = "VMFORGE-WROTE"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _short(text: str) -> str:
    """Paths under the home directory as ~/..., for readable command lines."""
    return text.replace(str(Path.home()) + "/", "~/")


def _show(vmforge: list[str], args: list[str], *, quiet: bool = False) -> bool:
    print(f"\n$ vmforge {_short(shlex.join(args))}")
    proc = run([*vmforge, *args])
    if not quiet:
        for line in (proc.stdout or "").rstrip("\n").splitlines():
            print(f"  {line}")
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines() or ["(no output)"]
        print(f"  !! exit {proc.returncode}: {lines[-1][:400]}")
    return proc.returncode == 0


def _serial(state_root: Path) -> str:
    try:
        return (state_root / NAME / "serial.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _our_qemus(state_root: Path) -> list[int]:
    """Processes whose command line names our private state root: only our VM's QEMU."""
    needle = os.fsencode(str(state_root)) + b"/"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def boot_tour(vmforge: list[str], work: Path, timeout: float = 120.0) -> bool | None:
    """Boot the test guest from a vmforge-made qcow2.

    Returns True if every step worked, False if one failed, None if the boot part was
    skipped (no QEMU, or the guest cannot be built here, e.g. no Debian registry).
    """
    print("\nBooting the project's test guest from a qcow2 that vmforge wrote ...")
    if shutil.which("qemu-system-x86_64") is None:
        print("  skipped: qemu-system-x86_64 is not installed (make setup installs it)")
        return None
    sys.path.insert(0, str(REPO))
    from tests.data.guest import GuestUnavailable, build

    t0 = time.perf_counter()
    try:
        guest = build()
    except (GuestUnavailable, OSError) as err:
        print(f"  skipped: the test guest cannot be built here ({err}); it needs the Debian "
              "package registry once (apt-get download), busybox-static and e2fsprogs")
        return None
    print(f"  test guest: Debian kernel {guest.kernel_version} + busybox initramfs, ready in "
          f"{time.perf_counter() - t0:.1f} s (cached in {_short(str(guest.kernel.parent))})")

    image = work / "guest-root.qcow2"
    if not _show(vmforge, ["convert", "-f", "raw", "-O", "qcow2", str(guest.rootfs), str(image)]):
        return False
    before = _sha256(image)
    print(f"  sha256 {before[:16]}...  {image.name}")

    state_root = work / "vms"
    saved = os.environ.get("VMFORGE_STATE_DIR")
    os.environ["VMFORGE_STATE_DIR"] = str(state_root)  # the vmforge children inherit it
    ok = False
    try:
        ok = _show(vmforge, ["run", "--detach", "--name", NAME, "--memory", "128M", "--net", "none",
                             "--timeout", f"{timeout:g}", "--kernel", str(guest.kernel),
                             "--initrd", str(guest.initrd),
                             "--append", guest.append("vmforge.disk=1", "vmforge.write=1"),
                             str(image)])
        if ok:
            deadline = time.monotonic() + 60
            while WROTE not in _serial(state_root) and time.monotonic() < deadline:
                time.sleep(0.2)
            said = [ln.strip() for ln in _serial(state_root).splitlines()
                    if ln.startswith("VMFORGE-")]
            print("  the guest says: " + (" | ".join(said) or "(nothing)"))
            ok = WROTE in said and any(s.startswith("VMFORGE-ROOT vmforge-root") for s in said)
            if not ok:
                print("  !! the guest did not mount its disk and write to it")
        ok = _show(vmforge, ["vm", "list"]) and ok
        ok = _show(vmforge, ["vm", "stop", NAME]) and ok
        left = _our_qemus(state_root)
        if left:
            print(f"  !! QEMU still running after vm stop: pids {left}")
            ok = False
        after = _sha256(image)
        same = after == before
        print(f"\n  sha256 {after[:16]}...  {image.name}: "
              f"{'unchanged: the guest wrote into its overlay' if same else 'CHANGED'}")
        ok = ok and same
        ok = _show(vmforge, ["vm", "rm", NAME], quiet=True) and ok
    finally:
        if (state_root / NAME).exists():
            run([*vmforge, "vm", "kill", NAME])
        for pid in _our_qemus(state_root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if saved is None:
            os.environ.pop("VMFORGE_STATE_DIR", None)
        else:
            os.environ["VMFORGE_STATE_DIR"] = saved
    return ok
