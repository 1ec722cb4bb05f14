"""Hostile qcow2 headers (SECURITY.md rows 1-8, 10): refused cleanly, quickly, untouched.

Each case patches one field of a qemu-made image with struct.pack_into (offsets from
QEMU docs/interop/qcow2.txt, "Header"), with boundary values like QEMU's image-fuzzer.
Every refusal must be: non-zero exit, exactly one stderr line starting "vmforge:",
no traceback, no output file left, bounded time and memory, input hash unchanged.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import vmforge
from tests.data.generators import write_pattern
from tests.data.qcow2_poke import Qcow2File
from tests.data.qemu import qemu_img, qemu_io
from tests.helpers import assert_clean_error, describe, run_vmforge, sha256
from vmforge import errors

MEM_LIMIT = 3 << 30  # a parser believing a 2^32-entry L1 would need 32 GiB
U32, U64 = 2**32 - 1, 2**64 - 1

pytestmark = pytest.mark.timeout(180)
ISOLATE_ALL = os.environ.get("VMFORGE_TEST_SUBPROCESS", "") not in ("", "0")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """qemu-made images to mutate: v3 (64 KiB clusters) and v2."""
    d = tmp_path_factory.mktemp("hostile-src")
    raw = write_pattern(d / "src.raw", "mixed")
    v3, v2 = d / "v3.qcow2", d / "v2.qcow2"
    qemu_img("convert", "-O", "qcow2", raw, v3)
    qemu_img("convert", "-O", "qcow2", "-o", "compat=0.10", raw, v2)
    for p in (v3, v2):
        os.chmod(p, 0o444)
    return {"v3": v3, "v2": v2, "raw": raw}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o644)
    return dest


def assert_refused(path: Path, tmp_path: Path, *, contains: str | None = None,
                   commands: tuple[str, ...] = ("info", "convert"),
                   api: bool = True, isolate_first: bool = True) -> None:
    before = sha256(path)
    outdir = tmp_path / "out"
    outdir.mkdir(exist_ok=True)
    for cmd in commands:
        out = outdir / f"{cmd}.raw"
        args = {
            "info": ("info", "-f", "qcow2", path),
            "info-probe": ("info", path),
            "map": ("map", "-f", "qcow2", "--output=json", path),
            "convert": ("convert", "-f", "qcow2", "-O", "raw", path, out),
            "convert-qcow2": ("convert", "-f", "qcow2", "-O", "qcow2", path, out),
            "check": ("check", "-f", "qcow2", path),
        }[cmd]
        # the first command runs as a real process under time and memory limits; once it
        # has refused, the rest run in-process (same code path, no interpreter start-up)
        if (cmd == commands[0] and isolate_first) or ISOLATE_ALL:
            proc = run_vmforge(*args, timeout=45, mem_limit=MEM_LIMIT, isolated=True)
        else:
            proc = run_vmforge(*args)
        assert_clean_error(proc, contains=contains if cmd != "info-probe" else None)
        assert not out.exists(), f"{cmd}: output left behind"
        assert sorted(os.listdir(outdir)) == [], f"{cmd}: stray files {os.listdir(outdir)}"
        assert sha256(path) == before, f"{cmd} modified the input"
    if api:
        with pytest.raises(errors.VmforgeError) as exc, vmforge.open_image(path, "qcow2") as img:
            img.read(0, img.virtual_size)
        if contains is not None:
            assert contains in str(exc.value)
        assert sha256(path) == before


# --- truncation -------------------------------------------------------------------------------
TRUNCATE_AT = list(range(0, 121))


@pytest.mark.slow
@pytest.mark.parametrize("length", TRUNCATE_AT)
def test_header_truncated(good, tmp_path, length):
    path = tmp_path / "t.qcow2"
    path.write_bytes(good["v3"].read_bytes()[:length])
    # a truncated header cannot ask for memory it does not describe: every tenth length
    # runs as a real process, the rest in-process (same code, no interpreter start-up)
    assert_refused(path, tmp_path, commands=("info", "convert"), isolate_first=length % 10 == 0)


@pytest.mark.parametrize("length", [0, 4, 20, 71, 72, 99])
def test_header_truncated_v2(good, tmp_path, length):
    path = tmp_path / "t.qcow2"
    path.write_bytes(good["v2"].read_bytes()[:length])
    assert_refused(path, tmp_path, commands=("info", "convert"))


def _table_points(img: Qcow2File) -> dict[str, int]:
    l1 = img.get("l1_table_offset")
    rt = img.get("refcount_table_offset")
    return {
        "in-l1": l1 + 4,
        "in-refcount-table": rt + 4,
        "in-first-l2": (img.l1_entry(0) & 0x00FF_FFFF_FFFF_FE00) + 100,
    }


@pytest.mark.parametrize("where", ["in-l1", "in-refcount-table", "in-first-l2"])
def test_truncated_inside_tables(good, tmp_path, where):
    path = _copy(good["v3"], tmp_path / "t.qcow2")
    cut = _table_points(Qcow2File(path))[where]
    with open(path, "r+b") as f:
        f.truncate(cut)
    cmds = ("map", "convert") if where == "in-first-l2" else ("info", "map", "convert")
    assert_refused(path, tmp_path, commands=cmds)


def test_truncated_inside_data_convert_fails(good, tmp_path):
    path = _copy(good["v3"], tmp_path / "t.qcow2")
    img = Qcow2File(path)
    last = max(img.data_cluster_host_offset(g) for g in range(0, 65536 * 8, 65536))
    with open(path, "r+b") as f:
        f.truncate(last + 1000)
    assert_refused(path, tmp_path, commands=("convert", "convert-qcow2"))


# --- header fields ----------------------------------------------------------------------------
def _field(name: str, value: int) -> Callable[[Qcow2File], None]:
    return lambda img: img.set(name, value)


def _fields(**kv: int) -> Callable[[Qcow2File], None]:
    def f(img: Qcow2File) -> None:
        for k, v in kv.items():
            img.set(k, v)
    return f


def _add_to(name: str, delta: int) -> Callable[[Qcow2File], None]:
    return lambda img: img.set(name, img.get(name) + delta)


def _or_incompat(bit: int) -> Callable[[Qcow2File], None]:
    return lambda img: img.set("incompatible_features", img.get("incompatible_features") | (1 << bit))


def _backing_name(name: bytes, *, size: int | None = None, offset: int = 0x1000):
    def f(img: Qcow2File) -> None:
        img.write_at(offset, name)
        img.set("backing_file_offset", offset)
        img.set("backing_file_size", len(name) if size is None else size)
    return f


def _ext(magic: int, length: int, data: bytes = b""):
    """A header extension right after the header (where qemu put its own ones)."""
    def f(img: Qcow2File) -> None:
        hl = img.get("header_length")
        img.write_at(hl, struct.pack(">II", magic, length) + data)
    return f


# (id, patch, expected substring of the error or None, image)
HEADER_CASES: list[tuple[str, Callable[[Qcow2File], None], str | None, str]] = []
for bit in (5, 6, 31, 63):
    HEADER_CASES.append((f"incompat-bit{bit}", _or_incompat(bit), "unsupported", "v3"))
for v in (0, 1, 4, 0x100, U32):
    HEADER_CASES.append((f"version{v}", _field("version", v), None, "v3"))
for m in (1, 2, 3, U32):
    HEADER_CASES.append((f"crypt{m}", _field("crypt_method", m),
                         "unsupported: encryption" if m in (1, 2) else None, "v3"))
    HEADER_CASES.append((f"crypt{m}-v2", _field("crypt_method", m),
                         "unsupported: encryption" if m in (1, 2) else None, "v2"))
for n in (2**31, U32, 2**28, 2**31 + 1, 0):
    HEADER_CASES.append((f"l1_size{n}", _field("l1_size", n), None, "v3"))
HEADER_CASES += [
    ("l1-offset-misaligned", _add_to("l1_table_offset", 1), None, "v3"),
    ("l1-offset-sector", _add_to("l1_table_offset", 512), None, "v3"),
    ("l1-offset-past-eof", _field("l1_table_offset", 1 << 40), None, "v3"),
    ("l1-offset-overflow", _field("l1_table_offset", 0xFFFF_FFFF_FFFF_0000), None, "v3"),
    ("l1-offset-overflow-2^63", _field("l1_table_offset", 1 << 63), None, "v3"),
    ("l1-size-x-offset-overflow", _fields(l1_table_offset=0xFFFF_FFFF_FFF0_0000, l1_size=2**20),
     None, "v3"),
    ("refcount-offset-misaligned", _add_to("refcount_table_offset", 8), None, "v3"),
    ("refcount-offset-past-eof", _field("refcount_table_offset", 1 << 40), None, "v3"),
    ("refcount-offset-overflow", _field("refcount_table_offset", 0xFFFF_FFFF_FFFF_0000), None, "v3"),
    ("snapshots-offset-misaligned", _fields(nb_snapshots=1, snapshots_offset=0x10001), None, "v3"),
    ("snapshots-offset-past-eof", _fields(nb_snapshots=1, snapshots_offset=1 << 40), None, "v3"),
    ("snapshots-offset-overflow", _fields(nb_snapshots=2, snapshots_offset=0xFFFF_FFFF_FFFF_0000),
     None, "v3"),
    ("size-2^63", _field("size", 1 << 63), None, "v3"),
    ("size-max", _field("size", U64), None, "v3"),
    ("size-2^62", _field("size", 1 << 62), None, "v3"),
    ("refcount-order-7", _field("refcount_order", 7), None, "v3"),
    ("refcount-order-max", _field("refcount_order", U32), None, "v3"),
    ("header-length-0", _field("header_length", 0), None, "v3"),
    ("header-length-71", _field("header_length", 71), None, "v3"),
    ("header-length-103", _field("header_length", 103), None, "v3"),
    ("header-length-gt-cluster", _field("header_length", 65536 + 8), None, "v3"),
    ("header-length-max", _field("header_length", U32), None, "v3"),
    ("compression-type-unknown",
     lambda img: (img.set("compression_type", 2), _or_incompat(3)(img)), None, "v3"),
    ("compression-type-without-bit", _field("compression_type", 1), None, "v3"),
    ("ext-length-huge", _ext(0x6803F857, U32), None, "v3"),
    ("ext-length-past-cluster", _ext(0x6803F857, 70000), None, "v3"),
    ("backing-name-1024", _backing_name(b"a" * 1024), None, "v3"),
    ("backing-name-size-max", _backing_name(b"b" * 16, size=U32), None, "v3"),
    ("backing-offset-past-cluster", _backing_name(b"base.qcow2", offset=65536 + 16), None, "v3"),
    ("backing-offset-past-eof", lambda img: (img.set("backing_file_offset", 1 << 40),
                                            img.set("backing_file_size", 10)), None, "v3"),
]
for n in (65537, 2**31, U32):
    HEADER_CASES.append((f"nb_snapshots{n}", _fields(nb_snapshots=n, snapshots_offset=0x10000), None, "v3"))
for n in (2**31, U32, 2**24):
    HEADER_CASES.append((f"refcount_table_clusters{n}", _field("refcount_table_clusters", n), None, "v3"))
for cb in (0, 8, 22, 63, 64, 255, U32):
    HEADER_CASES.append((f"cluster_bits{cb}", _field("cluster_bits", cb), None, "v3"))
    if cb in (8, 22):
        HEADER_CASES.append((f"cluster_bits{cb}-v2", _field("cluster_bits", cb), None, "v2"))


def test_external_data_bit_without_extension_refused(good, tmp_path):
    """Incompatible bit 2 with no data-file extension: info may describe it (qemu-img
    does), but nothing that needs guest data may proceed (qemu: 'data-file' is required)."""
    path = _copy(good["v3"], tmp_path / "h.qcow2")
    _or_incompat(2)(Qcow2File(path))
    assert_refused(path, tmp_path, commands=("convert", "map"))


@pytest.mark.parametrize(("case", "patch", "contains", "base"), HEADER_CASES,
                         ids=[c[0] for c in HEADER_CASES])
def test_hostile_header_refused(good, tmp_path, case, patch, contains, base):
    path = _copy(good[base], tmp_path / "h.qcow2")
    patch(Qcow2File(path))
    assert_refused(path, tmp_path, contains=contains)


PROBE_CASES = [c for c in HEADER_CASES if c[0] in (
    "incompat-bit5", "version1", "version4", "crypt1", "l1_size4294967295", "l1-offset-past-eof",
    "refcount_table_clusters4294967295", "nb_snapshots4294967295", "cluster_bits8", "cluster_bits22",
    "header-length-gt-cluster", "backing-name-1024", "size-max", "ext-length-huge")]


@pytest.mark.parametrize(("case", "patch", "contains", "base"), PROBE_CASES,
                         ids=[c[0] for c in PROBE_CASES])
def test_hostile_header_refused_when_probed_and_mapped(good, tmp_path, case, patch, contains, base):
    path = _copy(good[base], tmp_path / "h.qcow2")
    patch(Qcow2File(path))
    assert_refused(path, tmp_path, commands=("info-probe", "map"), api=False)


def test_unknown_incompatible_bit_names_the_feature(good, tmp_path):
    path = _copy(good["v3"], tmp_path / "h.qcow2")
    _or_incompat(17)(Qcow2File(path))
    with pytest.raises(errors.UnsupportedFeature) as exc, vmforge.open_image(path, "qcow2") as img:
        img.read(0, 512)
    assert str(exc.value).startswith(str(path) + ": unsupported: ") or \
        "unsupported: " in str(exc.value)
    assert exc.value.feature


@pytest.mark.parametrize("method", [1, 2])
def test_encryption_is_unsupported_feature(good, tmp_path, method):
    path = _copy(good["v3"], tmp_path / "h.qcow2")
    Qcow2File(path).set("crypt_method", method)
    with pytest.raises(errors.UnsupportedFeature) as exc:
        vmforge.open_image(path).__enter__()
    assert "unsupported: encryption" in str(exc.value)


def test_huge_l1_is_limit_or_corrupt(good, tmp_path):
    path = _copy(good["v3"], tmp_path / "h.qcow2")
    Qcow2File(path).set("l1_size", 2**31)
    with pytest.raises((errors.LimitExceeded, errors.CorruptImage)), \
            vmforge.open_image(path, "qcow2") as img:
        img.read(0, 512)


# --- the corrupt bit (row 4): readable, never written ---------------------------------------
def test_corrupt_bit_image_is_read_only(good, tmp_path):
    path = _copy(good["v3"], tmp_path / "c.qcow2")
    Qcow2File(path).set("incompatible_features", 2)
    before = sha256(path)
    out = tmp_path / "out.raw"
    proc = run_vmforge("convert", "-f", "qcow2", "-O", "raw", path, out, timeout=60, isolated=True)
    if proc.returncode == 0:  # read-only use is allowed; the bytes must then be right
        expected = tmp_path / "qemu.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", path, expected)
        assert out.read_bytes() == expected.read_bytes()
    else:
        assert_clean_error(proc)
    assert sha256(path) == before
    # writing into it is refused
    src = good["raw"]
    proc = run_vmforge("convert", "-n", "-f", "raw", "-O", "qcow2", src, path, timeout=60, isolated=True)
    assert_clean_error(proc)
    assert sha256(path) == before


# --- backing references ----------------------------------------------------------------------
def _with_backing(tmp_path: Path, name: str, fmt: str = "raw") -> Path:
    path = tmp_path / "ov.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", name, "-F", fmt, path, "4M")
    return path


def test_json_backing_refused_in_local_mode(tmp_path):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"SECRET" * 1000)
    name = f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}'
    path = _with_backing(tmp_path, name)
    assert_refused(path, tmp_path, commands=("map", "convert"))
    with pytest.raises(errors.VmforgeError), vmforge.open_image(path) as img:
        img.read(0, 4096)


def test_nbd_backing_refused_without_network(tmp_path):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        path = _with_backing(tmp_path, f"nbd://127.0.0.1:{port}/export")
        assert_refused(path, tmp_path, commands=("map", "convert"))
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
    finally:
        srv.close()


@pytest.mark.parametrize("name", ["nbd+unix:///x?socket=/tmp/s", "http://127.0.0.1:1/x",
                                  "file:/etc/hostname", "ssh://localhost/x"])
def test_protocol_backing_names_refused(tmp_path, name):
    path = _with_backing(tmp_path, name)
    assert_refused(path, tmp_path, commands=("map", "convert"))


@pytest.mark.timeout(120)
def test_fifo_backing_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = _with_backing(tmp_path, "pipe")
    import subprocess

    try:
        proc = run_vmforge("convert", "-O", "raw", path, tmp_path / "o.raw", timeout=20,
                           isolated=True)
    except subprocess.TimeoutExpired:
        pytest.fail("vmforge hung on a FIFO named as backing file (opened a non-regular file?)")
    assert_clean_error(proc)
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "dir"])
def test_non_regular_backing_refused(tmp_path, target):
    if target == "dir":
        (tmp_path / "dir").mkdir()
    path = _with_backing(tmp_path, target)
    assert_refused(path, tmp_path, commands=("convert",))


def test_backing_loop_refused(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", a, "4M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "4M")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)  # a -> b -> a
    # plain info does not open the backing file (neither does qemu-img info)
    assert_refused(a, tmp_path, commands=("map", "convert"), api=False)
    with pytest.raises(errors.BackingChainError), vmforge.open_image(a) as img:
        img.read(0, 512)
    proc = run_vmforge("info", "--backing-chain", a, timeout=60, isolated=True)
    assert_clean_error(proc)


def test_self_backing_refused(tmp_path):
    a = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", a, "4M")
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    with pytest.raises(errors.BackingChainError), vmforge.open_image(a) as img:
        img.read(0, 512)
    assert_refused(a, tmp_path, commands=("map", "convert"), api=False)


def test_chain_deeper_than_limit_refused(tmp_path):
    """SECURITY row 10: a chain deeper than the limit (vmforge: 64) is refused cleanly."""
    prev = None
    for i in range(70):
        p = tmp_path / f"l{i}.qcow2"
        back = ["-b", prev.name, "-F", "qcow2"] if prev else []
        qemu_img("create", "-f", "qcow2", "-u", *back, p, "1M")
        prev = p
    with pytest.raises(errors.BackingChainError), vmforge.open_image(prev) as img:
        img.read(0, 512)
    assert_refused(prev, tmp_path, commands=("convert", "map"), api=False)


def test_missing_backing_refused(tmp_path):
    path = _with_backing(tmp_path, "does-not-exist.qcow2", "qcow2")
    assert_refused(path, tmp_path, commands=("map", "convert"))


def test_untrusted_mode_refuses_any_backing(tmp_path):
    """SECURITY row 1: in untrusted mode a backing name is refused before opening anything."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"x" * 4096)
    for name in ("base.raw", "/etc/passwd", "json:{}", "nbd://127.0.0.1/x"):
        path = _with_backing(tmp_path, name)
        with pytest.raises(errors.VmforgeError), vmforge.open_image(path, untrusted=True) as img:
            img.read(0, 512)
        path.unlink()


def test_local_mode_follows_plain_backing(tmp_path):
    """The counterpart: a normal relative backing file is followed in local mode."""
    base = write_pattern(tmp_path / "base.raw", "random", 4 << 20)
    path = _with_backing(tmp_path, "base.raw")
    with vmforge.open_image(path) as img:
        assert img.read(0, 4 << 20) == base.read_bytes()


def test_data_file_bit_refused_in_untrusted_mode(tmp_path):
    data = tmp_path / "d.bin"
    path = tmp_path / "df.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", path, "4M")
    qemu_io(path, ["write -P 0x42 0 64k"])
    before = sha256(path)
    with pytest.raises(errors.VmforgeError), \
            vmforge.open_image(path, untrusted=True, allow_data_file=True) as img:
        img.read(0, 4096)
    with pytest.raises(errors.UnsupportedFeature), vmforge.open_image(path) as img:
        img.read(0, 4096)
    with vmforge.open_image(path, allow_data_file=True) as img:
        assert img.read(0, 65536) == b"\x42" * 65536
    assert sha256(path) == before
    proc = run_vmforge("convert", "-O", "raw", path, tmp_path / "o.raw", isolated=True)
    assert_clean_error(proc)
    proc = run_vmforge("convert", "--allow-data-file", "-O", "raw", path, tmp_path / "o2.raw", isolated=True)
    assert proc.returncode == 0, describe(proc)


@pytest.mark.parametrize("name", ["base.raw", "/etc/passwd", "json:{}"])
def test_untrusted_cli_refuses_backing(tmp_path, name):
    (tmp_path / "base.raw").write_bytes(b"y" * 65536)
    path = _with_backing(tmp_path, name)
    before = sha256(path)
    for cmd in (("convert", "--untrusted", "-O", "raw", path, tmp_path / "o.raw"),
                ("map", "--untrusted", "--output=json", path)):
        proc = run_vmforge(*cmd, timeout=45, isolated=True)
        assert_clean_error(proc)
    assert not (tmp_path / "o.raw").exists()
    assert sha256(path) == before
