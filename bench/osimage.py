"""A realistic benchmark source: real Debian files in an ext4 file system on a raw disk.

The dependency closure of a few large Debian packages (a kernel with its modules, a C
and C++ compiler, Python, Perl, git, vim, systemd, LLVM) is fetched with
``apt-get download``, each package unpacked with ``dpkg-deb -x`` into one tree (nothing
is installed, no root is needed) and the tree turned into a 2 GiB raw disk by
``mkfs.ext4 -d``: about 1.1 GiB of executables, libraries, kernel modules, scripts and
documentation, which compress and deduplicate like a real root disk, unlike
generated data.

The image is cached under a name derived from the package list and the generator
version; the exact package versions that went in are written beside it
(``<image>.packages``). Without ``apt-get`` or Debian's package lists, or when the
Debian mirror cannot be reached, :class:`OSImageUnavailable` says why, and the
benchmark skips the OS-image cases instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: the packages whose dependency closure makes the file system (about 1.1 GiB unpacked)
ROOT_PACKAGES: tuple[str, ...] = (
    "linux-image-amd64", "gcc-12", "g++-12", "python3.11", "perl", "git", "vim",
    "coreutils", "systemd", "libllvm15",
)
DISK_SIZE = 2 << 30
#: fixed identity and clock so that the same packages give the same image bytes
FS_UUID = "5f0c6d1e-7b1a-4c39-9a53-2d7e0b6a9e11"
FS_TIME = "1700000000"


class OSImageUnavailable(Exception):
    """The OS image cannot be built here (no apt, no package lists, no mirror)."""


def image_name(packages: Sequence[str], generator_version: int) -> str:
    digest = hashlib.sha256("\n".join(packages).encode()).hexdigest()[:10]
    return f"os-debian-{digest}-{DISK_SIZE >> 20}M-v{generator_version}.raw"


def _tool(name: str) -> str:
    # mkfs.ext4 lives in /usr/sbin, which a non-root PATH often lacks
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise OSImageUnavailable(f"{name} is not installed")
    return path


def _run(argv: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 1800) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OSImageUnavailable(f"{argv[0]}: {err}") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        raise OSImageUnavailable(f"{os.path.basename(argv[0])} {argv[1]} exited "
                                 f"{proc.returncode}: {tail}")
    return proc.stdout


def closure(roots: Sequence[str]) -> dict[str, tuple[str, int]]:
    """name -> (candidate version, installed KiB) for ``roots`` and all they depend on.

    Recommends and Suggests are left out (as a minimal install would); both branches of
    an alternative dependency are taken, which only adds a few small packages.
    """
    apt_cache = _tool("apt-cache")
    out = _run([apt_cache, "depends", "--recurse", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *roots])
    # top-level lines name packages; "<name>" is a virtual package, "name:i386" a foreign one
    names = sorted({ln.strip() for ln in out.splitlines()
                    if ln and not ln[0].isspace() and not ln.startswith("<") and ":" not in ln})
    if not names:
        raise OSImageUnavailable("apt-cache knows none of the packages (run apt-get update)")
    shown = subprocess.run([apt_cache, "show", "--no-all-versions", *names],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
    found: dict[str, tuple[str, int]] = {}
    for stanza in shown.stdout.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line[0].isspace())
        if "Package" in fields and "Version" in fields:
            found[fields["Package"]] = (fields["Version"], int(fields.get("Installed-Size", "0")))
    missing = [r for r in roots if r not in found and r not in names]
    if missing or not found:
        raise OSImageUnavailable(f"apt-cache has no candidate for {', '.join(missing) or roots[0]} "
                                 "(run apt-get update)")
    return found


def build(path: Path, roots: Sequence[str] = ROOT_PACKAGES) -> None:
    """Download, unpack and format: the finished image appears at ``path`` (atomically)."""
    if not shutil.which("apt-get"):
        raise OSImageUnavailable("apt-get is not available (not a Debian-like system)")
    dpkg_deb, mkfs = _tool("dpkg-deb"), _tool("mkfs.ext4")
    packages = closure(roots)
    with tempfile.TemporaryDirectory(prefix="os-build-", dir=path.parent) as work:
        debs, tree = Path(work) / "debs", Path(work) / "tree"
        debs.mkdir()
        tree.mkdir()
        # one apt-get call downloads everything; a short timeout so that a machine
        # without the mirror learns so quickly
        _run(["apt-get", "download", "-q", "-o", "Acquire::Retries=2",
              "-o", "Acquire::http::Timeout=30", "-o", "Acquire::https::Timeout=30",
              *(f"{n}={v}" for n, (v, _) in sorted(packages.items()))], cwd=debs, timeout=3600)
        files = sorted(debs.glob("*.deb"))
        if len(files) != len(packages):
            raise OSImageUnavailable(f"apt-get download gave {len(files)} of {len(packages)} "
                                     "packages")
        for deb in files:
            _run([dpkg_deb, "-x", str(deb), str(tree)])
        tree_bytes = _tree_bytes(tree)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=FS_TIME)
        _run([mkfs, "-q", "-F", "-L", "vmforge-bench", "-U", FS_UUID, "-E",
              f"hash_seed={FS_UUID},root_owner=0:0", "-d", str(tree), str(tmp),
              str(DISK_SIZE >> 10) + "k"], env=env)
    manifest = {"roots": list(roots), "packages": {n: v for n, (v, _) in sorted(packages.items())},
                "tree_bytes": tree_bytes}
    manifest_path(path).write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.rename(path)


def manifest_path(image: Path) -> Path:
    return image.with_name(image.name + ".packages")


def describe(image: Path) -> str:
    """One line for the report: what went into ``image``."""
    try:
        manifest = json.loads(manifest_path(image).read_text())
    except (OSError, ValueError):
        return "Debian packages in ext4"
    return (f"raw {DISK_SIZE >> 30} GiB ext4 holding the files of {len(manifest['packages'])} "
            f"Debian 12 packages ({manifest['tree_bytes'] / (1 << 30):.2f} GiB; the closure of "
            f"{', '.join(manifest['roots'])})")


def _tree_bytes(tree: Path) -> int:
    total = 0
    for root, _, names in os.walk(tree):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size
    return total
