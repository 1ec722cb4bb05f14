"""qcow2 images made by the oracle (qemu-img / qemu-io), described as generated specs.

``SPECS`` maps a spec name to an :class:`ImageSpec`; ``build(spec, workdir)`` makes the
image with qemu tools only. The lists are generated from the option axes below, so a
new cluster size or option value only needs adding to an axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .generators import MiB, write_pattern
from .qemu import opts, qemu_img, qemu_io

CLUSTER_SIZES = tuple(512 << i for i in range(13))  # 512 .. 2 MiB
COMPATS = ("0.10", "1.1")
COMPRESSION_TYPES = ("zlib", "zstd")
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)
PREALLOCATIONS = ("off", "metadata", "falloc", "full")
EXTENDED_L2_CLUSTER_SIZES = (16384, 65536, 2 * MiB)

IMAGE_SIZE = 4 * MiB


@dataclass
class Built:
    """A built image: ``path`` is what the tests open; ``chain`` lists every layer, top first."""

    path: Path
    fmt: str
    chain: list[Path] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    workdir: Path | None = None


@dataclass(frozen=True)
class ImageSpec:
    name: str
    builder: Callable[[Path], Built]
    tags: frozenset[str] = frozenset()

    def build(self, workdir: Path) -> Built:
        workdir.mkdir(parents=True, exist_ok=True)
        built = self.builder(workdir)
        built.workdir = workdir
        if not built.chain:
            built.chain = [built.path]
        return built


def _a(n: float, align: int) -> int:
    return int(n) // align * align


def io_script(cs: int, size: int, salt: int = 0) -> list[str]:
    """qemu-io commands exercising data, partial, zero (write -z) and discarded clusters."""
    def clamp(off: int, n: int) -> tuple[int, int]:
        off = min(off, size - 512)
        return off, max(1, min(n, size - off))

    cmds = []
    for pat, off, n in [
        (0xA1 + salt, _a(size * 0.05, cs), cs),  # one full aligned cluster
        (0xA2 + salt, _a(size * 0.1, cs) + 100, 5000),  # unaligned, partial clusters (COW)
    ]:
        off, n = clamp(off, n)
        cmds.append(f"write -P {pat:#x} {off} {n}")
    off, n = clamp(_a(size * 0.5, cs), 2 * cs)
    cmds.append(f"write -z {off} {n}")  # aligned zero clusters
    off, n = clamp(_a(size * 0.3, cs) + 7, 1000)
    cmds.append(f"write -z {off} {n}")  # unaligned zero write: partial cluster
    off, n = clamp(_a(size * 0.7, cs), cs)
    cmds.append(f"discard {off} {n}")
    cmds.append(f"write -P {0xA4 + salt:#x} {size - 512} 512")  # last sector
    return cmds


def _qcow2_from_pattern(workdir: Path, name: str, options: dict[str, object], *,
                        pattern: str = "mixed", size: int = IMAGE_SIZE, compress: bool = False,
                        io: bool = True, salt: int = 0) -> Built:
    raw = write_pattern(workdir / f"{name}.src.raw", pattern, size)
    img = workdir / f"{name}.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
             *opts(options), raw, img)
    if io:
        cs = int(options.get("cluster_size", 65536))  # type: ignore[call-overload]
        qemu_io(img, io_script(cs, size, salt))
    return Built(img, "qcow2")


SPECS: dict[str, ImageSpec] = {}


def _add(name: str, builder: Callable[[Path], Built], *tags: str) -> None:
    assert name not in SPECS, name
    SPECS[name] = ImageSpec(name, builder, frozenset(tags))


# --- every cluster size x compat --------------------------------------------------------
for _cs, _compat in itertools.product(CLUSTER_SIZES, COMPATS):
    _add(f"plain-cs{_cs}-compat{_compat}",
         lambda w, cs=_cs, c=_compat: _qcow2_from_pattern(
             w, "img", {"compat": c, "cluster_size": cs}),
         "plain", f"cs{_cs}")

# --- compressed (qemu-img convert -c) -----------------------------------------------------
for _ctype, _cs in itertools.product(COMPRESSION_TYPES, (512, 4096, 65536, 2 * MiB)):
    for _rewrite in (False, True):
        _add(f"compressed-{_ctype}-cs{_cs}" + ("-rewritten" if _rewrite else ""),
             lambda w, t=_ctype, cs=_cs, rw=_rewrite: _qcow2_from_pattern(
                 w, "img", {"compression_type": t, "cluster_size": cs}, compress=True, io=rw),
             "compressed")
_add("compressed-zlib-compat0.10",
     lambda w: _qcow2_from_pattern(w, "img", {"compat": "0.10"}, compress=True, io=True),
     "compressed")

# --- refcount widths ----------------------------------------------------------------------
for _rb in REFCOUNT_BITS:
    _add(f"refcount-bits{_rb}",
         lambda w, rb=_rb: _qcow2_from_pattern(w, "img", {"refcount_bits": rb, "cluster_size": 4096}),
         "refcount")


# --- preallocation ------------------------------------------------------------------------
def _prealloc(workdir: Path, mode: str, cs: int) -> Built:
    raw = write_pattern(workdir / "src.raw", "mixed", IMAGE_SIZE)
    img = workdir / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"preallocation={mode},cluster_size={cs}", img,
             IMAGE_SIZE)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", raw, img)
    qemu_io(img, io_script(cs, IMAGE_SIZE))
    return Built(img, "qcow2")


for _mode, _cs in itertools.product(PREALLOCATIONS, (4096, 65536)):
    _add(f"prealloc-{_mode}-cs{_cs}", lambda w, m=_mode, cs=_cs: _prealloc(w, m, cs), "prealloc")
# preallocated but never written: every cluster allocated and reading zero
_add("prealloc-metadata-empty",
     lambda w: (qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata",
                         w / "img.qcow2", IMAGE_SIZE), Built(w / "img.qcow2", "qcow2"))[1],
     "prealloc")

# --- lazy refcounts -----------------------------------------------------------------------
_add("lazy-refcounts",
     lambda w: _qcow2_from_pattern(w, "img", {"lazy_refcounts": "on", "cluster_size": 65536}),
     "lazy")


def _lazy_dirty(workdir: Path) -> Built:
    """A crash with lazy refcounts: dirty bit set, refcounts not yet written."""
    b = _qcow2_from_pattern(workdir, "img", {"lazy_refcounts": "on"}, io=False)
    qemu_io(b.path, ["write -P 0x5a 1M 256k", "write -P 0x5b 3M 64k", "abort"], check=False)
    return b


_add("lazy-refcounts-dirty", _lazy_dirty, "lazy", "dirty")


# --- extended L2 (subclusters) --------------------------------------------------------------
def _subcluster_script(cs: int) -> list[str]:
    sc = cs // 32
    return [
        f"write -P 0xb1 0 {sc}",  # exactly one subcluster
        f"write -P 0xb2 {cs + 3 * sc + 5} {2 * sc}",  # unaligned, across subclusters
        f"write -z {2 * cs + sc} {4 * sc}",  # zero subclusters in an unallocated cluster
        f"write -P 0xb3 {3 * cs} {cs}",  # a full cluster ...
        f"write -z {3 * cs + 10 * sc} {sc}",  # ... with a zero subcluster inside
        f"discard {3 * cs + 20 * sc} {2 * sc}",  # ... and a discarded pair
        f"write -P 0xb4 {3 * cs + 31 * sc + 1} {sc - 1}",  # last subcluster, odd start
    ]


def _extl2(workdir: Path, cs: int, *, backing: bool = False, compress: bool = False) -> Built:
    size = max(IMAGE_SIZE, 4 * cs)
    img = workdir / "img.qcow2"
    o = {"extended_l2": "on", "cluster_size": cs}
    chain = []
    if compress:
        raw = write_pattern(workdir / "src.raw", "mixed", size)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *opts(o), raw, img)
    elif backing:
        base = write_pattern(workdir / "base.raw", "random", size)
        qemu_img("create", "-f", "qcow2", *opts(o), "-b", "base.raw", "-F", "raw", img, size)
        chain = [img, base]
    else:
        qemu_img("create", "-f", "qcow2", *opts(o), img, size)
    qemu_io(img, _subcluster_script(cs))
    return Built(img, "qcow2", chain=chain)


for _cs in EXTENDED_L2_CLUSTER_SIZES:
    _add(f"extl2-cs{_cs}", lambda w, cs=_cs: _extl2(w, cs), "extl2")
_add("extl2-backing-cs65536", lambda w: _extl2(w, 65536, backing=True), "extl2", "chain")
_add("extl2-backing-cs16384", lambda w: _extl2(w, 16384, backing=True), "extl2", "chain")
_add("extl2-compressed-cs65536", lambda w: _extl2(w, 65536, compress=True), "extl2", "compressed")


# --- backing chains of depth 3 ----------------------------------------------------------------
CHAIN_BASE_FMTS = ("qcow2", "raw")
CHAIN_CLUSTER_TRIPLES = ((65536, 65536, 65536), (4096, 65536, 512), (2 * MiB, 4096, 65536))
CHAIN_PATH_MODES = ("relative", "absolute", "subdir")
CHAIN_SIZES = {"same": (IMAGE_SIZE,) * 3, "grow": (2 * MiB, 3 * MiB, IMAGE_SIZE),
               "shrink": (IMAGE_SIZE, IMAGE_SIZE, 3 * MiB)}


def _chain(workdir: Path, base_fmt: str, css: tuple[int, int, int], mode: str,
           sizes: tuple[int, int, int]) -> Built:
    s_base, s_mid, s_top = sizes
    cs_base, cs_mid, cs_top = css
    layer_dir = workdir / "layers" if mode == "subdir" else workdir
    layer_dir.mkdir(exist_ok=True)
    raw = write_pattern(layer_dir / "base.src.raw", "mixed", s_base)
    if base_fmt == "raw":
        base = raw
    else:
        base = layer_dir / "base.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs_base}", raw, base)
    mid = layer_dir / "mid.qcow2"
    top = workdir / "top.qcow2"
    if mode == "absolute":
        base_ref, mid_ref = str(base.resolve()), str(mid.resolve())
    elif mode == "subdir":  # each name is relative to the image that holds it
        base_ref, mid_ref = base.name, f"layers/{mid.name}"
    else:
        base_ref, mid_ref = base.name, mid.name
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs_mid}", "-b", base_ref,
             "-F", base_fmt, mid, s_mid, cwd=layer_dir)
    qemu_io(mid, [
        f"write -P 0xc1 {_a(s_mid * 0.05, cs_mid)} {cs_mid}",
        f"write -P 0xc2 {_a(s_mid * 0.4, 512) + 512} 70000",
        f"write -z {_a(s_mid * 0.0, cs_mid)} {cs_mid}",  # zeros hiding base data
        f"discard {_a(s_mid * 0.125, cs_mid)} {cs_mid}",  # base data region
        f"write -P 0xc3 {s_mid - 4096} 4096",
    ], cwd=layer_dir)
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs_top}", "-b", mid_ref,
             "-F", "qcow2", top, s_top, cwd=workdir)
    sc = min(s_mid, s_top)
    qemu_io(top, [
        f"write -P 0xd1 {_a(s_top * 0.25, cs_top)} {cs_top}",
        f"write -P 0xd2 {_a(s_top * 0.05, 512) + 1536} 3000",  # partial over mid data: COW
        f"write -z {_a(s_top * 0.4, cs_top)} {max(cs_top, 65536)}",  # hides mid's 0xc2 data
        f"discard {_a(sc * 0.6, cs_top)} {cs_top}",
        f"write -z {_a(s_top * 0.7, 512) + 1024} 2048",  # partial zero write
        f"write -P 0xd3 {s_top - 1024} 1024",
    ], cwd=workdir)
    return Built(top, "qcow2", chain=[top, mid, base])


for _bf, _css, _mode in itertools.product(CHAIN_BASE_FMTS, CHAIN_CLUSTER_TRIPLES, CHAIN_PATH_MODES):
    if _mode == "subdir" and _css != CHAIN_CLUSTER_TRIPLES[0]:
        continue
    _add(f"chain-{_bf}-cs{'-'.join(map(str, _css))}-{_mode}",
         lambda w, bf=_bf, css=_css, m=_mode: _chain(w, bf, css, m, CHAIN_SIZES["same"]), "chain")
for _sz in ("grow", "shrink"):
    _add(f"chain-qcow2-{_sz}",
         lambda w, sz=_sz: _chain(w, "qcow2", CHAIN_CLUSTER_TRIPLES[1], "relative", CHAIN_SIZES[sz]),
         "chain")


# --- internal snapshots ------------------------------------------------------------------------
def _snapshots(workdir: Path, options: dict[str, object]) -> Built:
    b = _qcow2_from_pattern(workdir, "img", options, io=False)
    cs = int(options.get("cluster_size", 65536))  # type: ignore[call-overload]
    qemu_img("snapshot", "-c", "first", b.path)
    qemu_io(b.path, io_script(cs, IMAGE_SIZE, salt=1))
    qemu_img("snapshot", "-c", "second snap", b.path)  # a name with a space
    qemu_io(b.path, [f"write -P 0xee {_a(IMAGE_SIZE * 0.05, cs)} {cs}",
                     f"write -z 0 {cs}", f"discard {_a(IMAGE_SIZE * 0.9, cs)} {cs}",
                     "write -P 0xef 100000 3333"])
    b.snapshots = ["first", "second snap"]
    return b


for _o in ({"cluster_size": 4096}, {"cluster_size": 65536}, {"compat": "0.10"},
           {"cluster_size": 65536, "extended_l2": "on"}):
    _add("snapshots-" + "-".join(f"{k}{v}" for k, v in _o.items()),
         lambda w, o=_o: _snapshots(w, o), "snapshots")


def spec_names(*tags: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Spec names carrying any of ``tags`` (all when none), minus those with ``exclude`` tags."""
    return [n for n, s in SPECS.items()
            if (not tags or s.tags & set(tags)) and not s.tags & set(exclude)]
