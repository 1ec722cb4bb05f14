"""The project's own test guest, built from Debian packages only (no other download).

* kernel: ``boot/vmlinuz-*`` from the package linux-image-amd64 depends on
  (``apt-get download`` + ``dpkg-deb -x``; nothing is installed, no root needed);
* initramfs: the host's static busybox (package busybox-static) plus the kernel
  modules a virtio disk, ext4 and the ACPI power button need, in dependency order (read
  from each module's ``depends=`` modinfo string), and an ``/init`` script;
* root disk: a small ext4 file system made by ``mkfs.ext4 -d`` (no mount, no root).

The /init prints ``VMFORGE-GUEST-UP`` on the serial console as soon as it runs. Kernel
command-line switches select what else it does:

``vmforge.disk=1``    mount /dev/vda (ext4) and print ``VMFORGE-ROOT <first line of /hello>``
``vmforge.write=1``   also write /written in it, sync, print ``VMFORGE-WROTE``
``vmforge.counter=1`` print ``VMFORGE-COUNT n`` once a second, forever
``vmforge.shell=1``   run an interactive busybox ``sh`` on ttyS0 (for ``vmforge vm console``)
                      and print ``VMFORGE-SHELL``
``vmforge.ip=A/NN``   bring eth0 up with address A/NN
``vmforge.ping=B,C``  ping each address (up to 6 tries, 1 s apart, side by side) and print
                      ``VMFORGE-PING B ok`` or ``VMFORGE-PING B fail``
``vmforge.seed=1``    load the CD-ROM drivers (AHCI, sr, ISO 9660: the bus runtime/machine.py
                      puts the seed on), find the file system labelled ``cidata`` (the
                      cloud-init NoCloud seed), mount it read-only, set the hostname from
                      its meta-data and print ``VMFORGE-SEED hostname=<local-hostname>``,
                      ``VMFORGE-USERDATA <first line of user-data>``,
                      ``VMFORGE-USERDATA-SHA256 <digest of the whole user-data>`` and
                      ``VMFORGE-SEED-DEVICE <device> ro=<blockdev --getro>``; or
                      ``VMFORGE-SEED-FAILED <why>``
``vmforge.gw=G``      add a default route via G (after ``vmforge.ip``)
``vmforge.http=TOKEN`` serve ``/`` over HTTP on port 80 (busybox httpd) with the line
                      ``VMFORGE-HTTP token=TOKEN osrelease=<kernel release> hostname=<hostname>``
                      and print ``VMFORGE-HTTP-SERVING``; with QEMU's user-mode network use
                      ``vmforge.ip=10.0.2.15/24 vmforge.gw=10.0.2.2`` (slirp's defaults, where
                      its host forwards connect to)

An ACPI power-button press (QMP ``system_powerdown``) powers the guest off, so the
graceful stop path can be tested.

Everything lands in a cache directory (``$VMFORGE_GUEST_CACHE``, default
``~/.cache/vmforge/test-guest``) keyed by kernel version and this builder's version, so
it is built once per machine. ``python -m tests.data.guest`` builds it and prints paths.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER = "VMFORGE-GUEST-UP"
BUILDER_VERSION = "3"
#: the modules /init loads; their dependencies are added in front automatically
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4", "evdev",
                  "button", "virtio_balloon")
#: loaded only with ``vmforge.seed=1`` (so other boots do not pay for the AHCI probe): the
#: seed CD-ROM sits on SATA (q35's built-in ICH9 AHCI, or an ``ahci`` device on pc), read
#: through the SCSI CD-ROM driver; isofs reads its ISO 9660 + Rock Ridge names
SEED_MODULES = ("ahci", "sr_mod", "isofs")
BUSYBOX = "/bin/busybox"
CONSOLE_APPEND = "console=ttyS0 panic=-1 quiet loglevel=3"

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /sbin /usr/bin /usr/sbin /etc
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VMFORGE-GUEST-UP" > /dev/ttyS0
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
# busybox acpid maps the power button (an evdev key) to /etc/acpi/PWRF/00000080
mkdir -p /etc/acpi/PWRF /var/log /var/run
printf '#!/bin/sh\necho VMFORGE-POWEROFF > /dev/ttyS0\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid
cmdline=$(cat /proc/cmdline)
has() { case " $cmdline " in *" $1 "*) return 0;; esac; return 1; }
if has vmforge.disk=1; then
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  if mount -t ext4 /dev/vda /mnt; then
    echo "VMFORGE-ROOT $(head -n 1 /mnt/hello)" > /dev/ttyS0
    if has vmforge.write=1; then
      echo "written by the guest" > /mnt/written
      dd if=/dev/urandom of=/mnt/noise bs=64k count=16 2>/dev/null
      sync
      echo "VMFORGE-WROTE" > /dev/ttyS0
    fi
  else
    echo "VMFORGE-ROOT-FAILED" > /dev/ttyS0
  fi
fi
if has vmforge.seed=1; then
  for m in $(cat /modules-seed.order); do insmod "/lib/modules/$m" 2>/dev/null; done
  # the AHCI ports are probed asynchronously: wait (bounded) for the labelled medium. The
  # label is read from the ISO 9660 primary volume descriptor (ECMA-119 8.4: logical sector
  # 16 of 2048 bytes; standard identifier "CD001" at byte 1, volume identifier at bytes
  # 40-71, space padded). Not busybox findfs: its volume_id reads a 68 KiB probe buffer
  # and gives up on a device smaller than that, which a seed ISO (66 KiB) is
  dev=""; i=0
  while [ -z "$dev" ] && [ $i -lt 300 ]; do
    for d in /dev/sr* /dev/sd* /dev/vd*; do
      [ -b "$d" ] || continue
      if [ "$(dd if="$d" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] &&
         [ "$(dd if="$d" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')" = cidata ]; then
        dev=$d; break
      fi
    done
    [ -n "$dev" ] || { sleep 0.1; i=$((i+1)); }
  done
  mkdir -p /seed
  if [ -z "$dev" ]; then
    devs=$(echo $(ls /dev | grep -E '^(sr|sd|vd)'))
    echo "VMFORGE-SEED-FAILED no device labelled cidata (block devices: $devs)" > /dev/ttyS0
  elif ! mount -t iso9660 -o ro "$dev" /seed; then
    echo "VMFORGE-SEED-FAILED cannot mount $dev" > /dev/ttyS0
  else
    # meta-data is JSON or YAML: "local-hostname": "h", or local-hostname: h
    h=$(sed -n 's/.*local-hostname"*: *"*\([^", ]*\).*/\1/p' /seed/meta-data | head -n 1)
    [ -n "$h" ] && hostname "$h"
    echo "VMFORGE-SEED hostname=$h" > /dev/ttyS0
    echo "VMFORGE-USERDATA $(head -n 1 /seed/user-data)" > /dev/ttyS0
    echo "VMFORGE-USERDATA-SHA256 $(sha256sum < /seed/user-data | cut -d ' ' -f 1)" > /dev/ttyS0
    echo "VMFORGE-SEED-DEVICE $dev ro=$(blockdev --getro "$dev")" > /dev/ttyS0
  fi
fi
for w in $cmdline; do
  case "$w" in
    vmforge.ip=*) ip link set lo up; ip link set eth0 up; ip addr add "${w#vmforge.ip=}" dev eth0;;
  esac
done
for w in $cmdline; do
  case "$w" in
    vmforge.gw=*) ip route add default via "${w#vmforge.gw=}";;
  esac
done
for w in $cmdline; do
  case "$w" in
    vmforge.http=*)
      mkdir -p /www
      r=$(cat /proc/sys/kernel/osrelease)
      echo "VMFORGE-HTTP token=${w#vmforge.http=} osrelease=$r hostname=$(hostname)" > /www/index.html
      if httpd -p 80 -h /www; then
        echo "VMFORGE-HTTP-SERVING" > /dev/ttyS0
      else
        echo "VMFORGE-HTTP-FAILED" > /dev/ttyS0
      fi;;
  esac
done
for w in $cmdline; do
  case "$w" in
    vmforge.ping=*)
      for t in $(echo "${w#vmforge.ping=}" | tr , ' '); do
        ( k=0; r=fail
          while [ $k -lt 6 ]; do
            if ping -c 1 -W 1 "$t" >/dev/null 2>&1; then r=ok; break; fi
            k=$((k+1)); sleep 1
          done
          echo "VMFORGE-PING $t $r" > /dev/ttyS0 ) &
      done;;
  esac
done
if has vmforge.shell=1; then
  # its own session: opening ttyS0 makes it the shell's controlling terminal (job
  # control, Ctrl-C); -i: interactive (a prompt) whatever isatty says
  setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1' &
  echo "VMFORGE-SHELL" > /dev/ttyS0
fi
n=0
while true; do
  if has vmforge.counter=1; then echo "VMFORGE-COUNT $n" > /dev/ttyS0; fi
  n=$((n+1))
  sleep 1
done
"""


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    rootfs: Path  # raw ext4 image
    kernel_version: str

    def append(self, *switches: str) -> str:
        return " ".join((CONSOLE_APPEND, *switches))


class GuestUnavailable(RuntimeError):
    """The host lacks what the build needs (apt metadata, busybox-static, mkfs.ext4)."""


def cache_root() -> Path:
    env = os.environ.get("VMFORGE_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmforge" / "test-guest"


def _run(*argv: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=300)
    except FileNotFoundError as err:
        raise GuestUnavailable(f"{argv[0]} is not installed") from err
    if proc.returncode != 0:
        raise GuestUnavailable(f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)."""
    out = _run("apt-cache", "depends", "linux-image-amd64")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise GuestUnavailable("apt-cache knows no linux-image-amd64 (run apt-get update)")


# --- initramfs: the "newc" cpio format (see the kernel's early-userspace docs) -------------

def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes = b"", ino: int = 0) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))


def make_cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc archive; ``files`` maps path -> (mode, content); parents are added as dirs."""
    out = io.BytesIO()
    dirs: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    ino = 1
    for d in sorted(dirs):
        _cpio_entry(out, d, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    for path, (mode, data) in sorted(files.items()):
        _cpio_entry(out, path, mode, data, ino=ino)
        ino += 1
    _cpio_entry(out, "TRAILER!!!", 0)
    return out.getvalue()


def _depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9:data.index(b"\0", at + 9)].decode()
    return [d for d in value.split(",") if d]


def module_order(modroot: Path, wanted: tuple[str, ...]) -> list[Path]:
    """``wanted`` modules and their dependencies, each after everything it depends on."""
    index = {p.name[:-3].replace("-", "_"): p for p in modroot.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name not in index:  # not a module: built into the kernel
            return
        seen.add(name)
        for dep in _depends(index[name]):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def build(root: Path | None = None) -> Guest:
    """Build (or reuse) the guest under the cache directory; safe to call concurrently."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    package = kernel_package()
    key = hashlib.sha256(f"{package}/{BUILDER_VERSION}/{WANTED_MODULES}/{SEED_MODULES}/{INIT}"
                         .encode()).hexdigest()[:12]
    final = root / f"{package}-{key}"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "done").exists():
            _build_into(final, package)
    version = (final / "kernel-version").read_text().strip()
    return Guest(final / "vmlinuz", final / "initrd.img", final / "rootfs.raw", version)


def _build_into(final: Path, package: str) -> None:
    if not Path(BUSYBOX).exists():
        raise GuestUnavailable("busybox-static is not installed (make apt)")
    if shutil.which("mkfs.ext4") is None:
        raise GuestUnavailable("e2fsprogs is not installed (make apt)")
    shutil.rmtree(final, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp_name:
        tmp = Path(tmp_name)
        _run("apt-get", "download", package, cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise GuestUnavailable(f"apt-get download {package} gave {debs}")
        tree = tmp / "tree"
        _run("dpkg-deb", "-x", str(debs[0]), str(tree))
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
        version = vmlinuz.name[len("vmlinuz-"):]
        modroot = tree / "lib" / "modules" / version
        mods = module_order(modroot, WANTED_MODULES)
        seed_mods = [m for m in module_order(modroot, SEED_MODULES) if m not in mods]
        missing = [n for n in SEED_MODULES
                   if not any(m.name[:-3].replace("-", "_") == n for m in seed_mods + mods)]
        if missing:
            raise GuestUnavailable(f"{package} has no module {', '.join(missing)}")
        files: dict[str, tuple[int, bytes]] = {
            "init": (stat.S_IFREG | 0o755, INIT.encode()),
            "bin/busybox": (stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()),
            "modules.order": (stat.S_IFREG | 0o644,
                              "".join(f"{m.name}\n" for m in mods).encode()),
            "modules-seed.order": (stat.S_IFREG | 0o644,
                                   "".join(f"{m.name}\n" for m in seed_mods).encode()),
        }
        for m in mods + seed_mods:
            files[f"lib/modules/{m.name}"] = (stat.S_IFREG | 0o644, m.read_bytes())
        out = tmp / "out"
        out.mkdir()
        (out / "initrd.img").write_bytes(gzip.compress(make_cpio(files), 6))
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        rootdir = tmp / "rootdir"
        rootdir.mkdir()
        (rootdir / "hello").write_text("vmforge-root\n")
        _run("mkfs.ext4", "-q", "-F", "-L", "vmforge", "-d", str(rootdir),
             str(out / "rootfs.raw"), "16M")
        (out / "kernel-version").write_text(version + "\n")
        (out / "done").write_text("ok\n")
        os.rename(out, final)


if __name__ == "__main__":
    g = build()
    print(f"kernel  {g.kernel}\ninitrd  {g.initrd}\nrootfs  {g.rootfs}\nversion {g.kernel_version}")
