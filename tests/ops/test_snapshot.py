"""``vmforge snapshot`` against ``qemu-img snapshot`` on the same inputs.

The same sequence of guest writes and snapshot operations is run on two copies of an
image, one driven by qemu-img and one by vmforge; guest bytes of the active state
and of every snapshot must agree, and qemu-img check must be clean after every
vmforge step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.qcow2_poke import QCOW_OFLAG_COPIED, Qcow2File
from tests.data.qemu import check_json, convert_raw, qemu_img, qemu_io
from tests.helpers import assert_clean_error, assert_same_bytes, run_vmforge, sha256, vmforge_ok

# (create options, guest writes): small images, several layouts
CONFIGS = {
    "v3-64k": "",
    "v3-4k": "cluster_size=4096",
    "v2": "compat=0.10",
    "extl2": "extended_l2=on,cluster_size=32768",
    "rc64": "refcount_bits=64,cluster_size=4096",
    "rc4": "refcount_bits=4,cluster_size=4096",
    "lazy": "lazy_refcounts=on",
}
SIZE = 4 << 20


def make_image(path: Path, options: str, *, compressed: bool = False) -> Path:
    qemu_img("create", "-f", "qcow2", *(["-o", options] if options else []), path, SIZE)
    cmds = ["write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -z 2M 64k"]
    if compressed:
        cmds.append("write -c -P 0x33 3M 64k")
    qemu_io(path, cmds)
    return path


def snapshot_names(path: Path) -> list[tuple[str, str, int]]:
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return [(s["id"], s["name"], s["vm-state-size"]) for s in info.get("snapshots", [])]


def assert_clean(path: Path) -> None:
    code, data = check_json(path)
    assert code == 0, (code, data, qemu_img("check", path, check=False).stderr)


def assert_same_guest(a: Path, b: Path, tmp: Path, snapshots: list[str]) -> None:
    """Active state and every snapshot read the same through qemu-img."""
    for snap in [None, *snapshots]:
        tag = snap or "active"
        ra = convert_raw(a, tmp / f"a-{tag}.raw", snapshot=snap and f"snapshot.name={snap}")
        rb = convert_raw(b, tmp / f"b-{tag}.raw", snapshot=snap and f"snapshot.name={snap}")
        assert_same_bytes(rb, ra)
        ra.unlink()
        rb.unlink()


# Each step: ("io", qemu-io command) runs on both; ("c"|"a"|"d", arg) is a snapshot op.
SEQUENCE = [
    ("c", "s1"),
    ("io", "write -P 0x44 64k 128k"),
    ("c", "s2"),
    ("io", "write -P 0x55 1M 192k"),
    ("io", "write -z 0 64k"),
    ("a", "s1"),
    ("io", "write -P 0x66 3M 64k"),
    ("c", "s3"),
    ("d", "s2"),
    ("io", "discard 1M 64k"),
    ("a", "3"),  # by id
    ("d", "s1"),
]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_sequence_matches_qemu(tmp_path: Path, config: str) -> None:
    base = make_image(tmp_path / "base.qcow2", CONFIGS[config], compressed=config == "v3-64k")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(base, ours)
    shutil.copy(base, theirs)
    for op, arg in SEQUENCE:
        if op == "io":
            qemu_io(ours, [arg])
            qemu_io(theirs, [arg])
        else:
            qemu_img("snapshot", f"-{op}", arg, theirs)
            vmforge_ok("snapshot", f"-{op}", arg, ours)
        assert_clean(ours)
        assert snapshot_names(ours) == snapshot_names(theirs), (op, arg)
        assert_same_guest(ours, theirs, tmp_path, [n for _, n, _ in snapshot_names(theirs)])
    assert qemu_img("compare", ours, theirs).returncode == 0


def test_each_tool_applies_the_others_snapshots(tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.qcow2", "", compressed=True)
    vmforge_ok("snapshot", "-c", "by-vmforge", img)
    qemu_io(img, ["write -P 0x77 0 256k"])
    qemu_img("snapshot", "-c", "by-qemu", img)
    qemu_io(img, ["write -P 0x88 64k 64k"])
    assert_clean(img)
    at_vmforge = convert_raw(img, tmp_path / "v.raw", snapshot="by-vmforge")
    at_qemu = convert_raw(img, tmp_path / "q.raw", snapshot="by-qemu")
    qemu_img("snapshot", "-a", "by-vmforge", img)
    assert_clean(img)
    assert_same_bytes(convert_raw(img, tmp_path / "1.raw"), at_vmforge)
    vmforge_ok("snapshot", "-a", "by-qemu", img)
    assert_clean(img)
    assert_same_bytes(convert_raw(img, tmp_path / "2.raw"), at_qemu)
    vmforge_ok("snapshot", "-d", "by-qemu", img)
    qemu_img("snapshot", "-d", "by-vmforge", img)
    assert_clean(img)
    assert snapshot_names(img) == []
    assert_same_bytes(convert_raw(img, tmp_path / "3.raw"), at_qemu)


def test_apply_restores_the_snapshot_disk_size(tmp_path: Path) -> None:
    ours = make_image(tmp_path / "ours.qcow2", "")
    vmforge_ok("snapshot", "-c", "small", ours)
    qemu_img("resize", ours, "8M")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    vmforge_ok("snapshot", "-a", "small", ours)
    qemu_img("snapshot", "-a", "small", theirs)
    assert_clean(ours)
    size = json.loads(qemu_img("info", "--output=json", ours).stdout)["virtual-size"]
    assert size == SIZE
    assert qemu_img("compare", ours, theirs).returncode == 0


def test_list_is_byte_identical(tmp_path: Path) -> None:
    img = make_image(tmp_path / "x.qcow2", "")
    names = ["a", "sp ace", "x" * 16, "y" * 17, "z" * 40, "dup", "dup", "", "5"]
    for i, name in enumerate(names):
        tool = ("qemu", "vmforge")[i % 2]
        if tool == "qemu":
            qemu_img("snapshot", "-c", name, img)
        else:
            vmforge_ok("snapshot", "-c", name, img)
    expected = qemu_img("snapshot", "-l", img).stdout
    assert expected.count("\n") == len(names) + 2
    assert vmforge_ok("snapshot", "-l", img).stdout == expected
    empty = make_image(tmp_path / "empty.qcow2", "")
    assert vmforge_ok("snapshot", "-l", empty).stdout == qemu_img("snapshot", "-l", empty).stdout


@pytest.mark.parametrize("op,key", [("-d", "1"), ("-d", "2"), ("-d", "dup"), ("-a", "2"),
                                    ("-a", "dup"), ("-d", "3"), ("-a", "3"), ("-a", "4")])
def test_lookup_like_qemu(tmp_path: Path, op: str, key: str) -> None:
    """-a: id first, then name; -d: names only; where qemu-img fails, so does vmforge."""
    ours = make_image(tmp_path / "ours.qcow2", "")
    # id 1 is named "2", id 2 is named "dup", id 3 is named "dup" and holds other data
    qemu_img("snapshot", "-c", "2", ours)
    qemu_img("snapshot", "-c", "dup", ours)
    qemu_io(ours, ["write -P 0x99 0 64k"])
    qemu_img("snapshot", "-c", "dup", ours)
    qemu_io(ours, ["write -P 0xaa 0 64k"])
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    qemu_failed = qemu_img("snapshot", op, key, theirs, check=False).returncode != 0
    if qemu_failed:
        before = sha256(ours)
        assert_clean_error(run_vmforge("snapshot", op, key, ours), contains="not found")
        assert sha256(ours) == before
        return
    vmforge_ok("snapshot", op, key, ours)
    assert snapshot_names(ours) == snapshot_names(theirs)
    assert qemu_img("compare", ours, theirs).returncode == 0
    assert_clean(ours)


def _refusal(tmp_path: Path, args: list[str], prepare: str, contains: str) -> None:
    img = make_image(tmp_path / "x.qcow2", "")
    qemu_img("snapshot", "-c", "s1", img)
    if prepare == "corrupt-bit":
        q = Qcow2File(img)
        q.set("incompatible_features", q.get("incompatible_features") | 2)
    elif prepare == "dirty-bit":
        q = Qcow2File(img)
        q.set("incompatible_features", q.get("incompatible_features") | 1)
    elif prepare == "refcount-error":
        q = Qcow2File(img)
        q.set_refcount(q.data_cluster_host_offset(0) // q.cluster_size, 1)  # shared: 2 -> 1
    before = sha256(img)
    proc = run_vmforge("snapshot", *args, img)
    assert_clean_error(proc, contains=contains, codes=(1,))
    assert sha256(img) == before


@pytest.mark.parametrize("args,prepare,contains", [
    (["-a", "nosuch"], "", "snapshot 'nosuch' not found"),
    (["-d", "nosuch"], "", "snapshot 'nosuch' not found"),
    (["-c", "s2"], "corrupt-bit", "marked corrupt"),
    (["-d", "s1"], "dirty-bit", "dirty bit"),
    (["-a", "s1"], "refcount-error", "errors"),
    (["-c", "n" * 256], "", "longer than 255 bytes"),
])
def test_refusals_leave_the_file_untouched(tmp_path: Path, args: list[str], prepare: str,
                                           contains: str) -> None:
    _refusal(tmp_path, args, prepare, contains)


def test_refcount_overflow_is_refused_like_qemu(tmp_path: Path) -> None:
    """refcount_bits=1 cannot count a shared cluster: qemu-img fails, vmforge refuses cleanly."""
    theirs = make_image(tmp_path / "theirs.qcow2", "refcount_bits=1,cluster_size=4096")
    assert qemu_img("snapshot", "-c", "s", theirs, check=False).returncode != 0
    ours = make_image(tmp_path / "ours.qcow2", "refcount_bits=1,cluster_size=4096")
    before = sha256(ours)
    assert_clean_error(run_vmforge("snapshot", "-c", "s", ours), contains="refcount_bits=1")
    assert sha256(ours) == before


def test_other_formats_are_refused(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(65536))
    assert_clean_error(run_vmforge("snapshot", "-c", "s", raw), contains="raw images")
    assert_clean_error(run_vmforge("snapshot", "-l", tmp_path / "missing.qcow2"),
                       contains="no such file")


def test_read_only_file_is_refused(tmp_path: Path) -> None:
    """A file that cannot be opened for writing (root ignores modes: use the immutable bit)."""
    img = make_image(tmp_path / "ro.qcow2", "")
    qemu_img("snapshot", "-c", "s1", img)
    before = sha256(img)
    if os.geteuid() != 0:
        os.chmod(img, 0o444)
    elif subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        for args in (["-c", "s2"], ["-d", "s1"], ["-a", "s1"]):
            assert_clean_error(run_vmforge("snapshot", *args, img),
                               contains="cannot open for writing")
        assert vmforge_ok("snapshot", "-l", img).stdout == qemu_img("snapshot", "-l", img).stdout
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(img)], check=True)
    assert sha256(img) == before


QEMU_SYSTEM = shutil.which("qemu-system-x86_64")


def _monitor(img: Path, commands: list[str]) -> str:
    """Run QEMU (TCG, stopped CPU) with ``commands`` on its monitor; returns what it printed."""
    assert QEMU_SYSTEM
    proc = subprocess.run(
        [QEMU_SYSTEM, "-nodefaults", "-S", "-display", "none", "-machine", "accel=tcg", "-m", "64",
         "-drive", f"file={img},format=qcow2,if=virtio", "-monitor", "stdio"],
        input="".join(c + "\n" for c in [*commands, "quit"]), capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.skipif(QEMU_SYSTEM is None, reason="qemu-system-x86 is not installed")
def test_savevm_state_survives_operations_on_other_snapshots(tmp_path: Path) -> None:
    img = make_image(tmp_path / "vm.qcow2", "")
    _monitor(img, ["savevm vmsnap"])
    names = snapshot_names(img)
    assert names[0][2] > 0  # it carries VM state
    assert vmforge_ok("snapshot", "-l", img).stdout == qemu_img("snapshot", "-l", img).stdout
    vmforge_ok("snapshot", "-c", "disk-only", img)
    qemu_io(img, ["write -P 0x5c 0 64k"])
    vmforge_ok("snapshot", "-c", "later", img)
    vmforge_ok("snapshot", "-d", "disk-only", img)
    assert_clean(img)
    assert snapshot_names(img)[0] == names[0]
    assert vmforge_ok("snapshot", "-l", img).stdout == qemu_img("snapshot", "-l", img).stdout
    out = _monitor(img, ["loadvm vmsnap", "info snapshots"])
    assert "rror" not in out, out  # QEMU reads the VM state back without complaint
    vmforge_ok("snapshot", "-a", "vmsnap", img)
    assert_clean(img)
    # a full clone of a standalone image is the file itself: the VM state comes along
    clone = tmp_path / "clone.qcow2"
    vmforge_ok("clone", "--full", img, clone)
    assert_clean(clone)
    assert snapshot_names(clone) == snapshot_names(img)
    assert vmforge_ok("snapshot", "-l", clone).stdout.replace(str(clone), "") == \
        vmforge_ok("snapshot", "-l", img).stdout.replace(str(img), "")
    out = _monitor(clone, ["loadvm vmsnap", "info snapshots"])
    assert "rror" not in out, out


@pytest.mark.parametrize("config", ["v3-64k", "v3-4k", "v2", "extl2"])
def test_writing_into_an_image_with_snapshots_copies_shared_clusters(
        tmp_path: Path, config: str, pattern_file: Callable[..., Path]) -> None:
    """convert -n (and so commit/rebase) into an image with snapshots: copy-on-write."""
    img = make_image(tmp_path / "x.qcow2", CONFIGS[config], compressed=config == "v3-64k")
    vmforge_ok("snapshot", "-c", "s1", img)
    qemu_io(img, ["write -P 0x44 1M 128k"])
    qemu_img("snapshot", "-c", "s2", img)
    before = {s: convert_raw(img, tmp_path / f"{s}.raw", snapshot=s) for s in ("s1", "s2")}
    src = pattern_file("mixed", size=SIZE)
    vmforge_ok("convert", "-n", "-O", "qcow2", src, img)
    assert_clean(img)
    assert_same_bytes(convert_raw(img, tmp_path / "active.raw"), src)
    for s, raw in before.items():
        assert_same_bytes(convert_raw(img, tmp_path / f"after-{s}.raw", snapshot=s), raw)
    vmforge_ok("snapshot", "-a", "s1", img)
    assert_clean(img)
    assert_same_bytes(convert_raw(img, tmp_path / "back.raw"), before["s1"])
    for s in ("s1", "s2"):
        vmforge_ok("snapshot", "-d", s, img)
        assert_clean(img)


def test_resize_with_snapshots_like_qemu(tmp_path: Path) -> None:
    ours = make_image(tmp_path / "ours.qcow2", "cluster_size=4096")
    vmforge_ok("snapshot", "-c", "s1", ours)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    for size in ("8M", "1M"):
        qemu_img("resize", "--shrink", theirs, size)
        vmforge_ok("resize", "--shrink", "--force", ours, size)
        assert_clean(ours)
        assert qemu_img("compare", ours, theirs).returncode == 0
        assert_same_bytes(convert_raw(ours, tmp_path / "o.raw", snapshot="s1"),
                          convert_raw(theirs, tmp_path / "t.raw", snapshot="s1"))


class _Crash(Exception):
    pass


def _ops() -> dict[str, Callable[[Path], object]]:
    from vmforge.formats.qcow2 import repair, snapshot

    return {
        "create": lambda p: snapshot.create(str(p), "new"),
        "apply": lambda p: snapshot.apply(str(p), "s1"),
        "delete": lambda p: snapshot.delete(str(p), "s1"),
        "repair": lambda p: repair.repair_qcow2(str(p), "all"),
    }


@pytest.mark.parametrize("op", ["create", "apply", "delete", "repair"])
def test_a_crash_at_any_write_leaves_the_old_or_the_new_state(
        tmp_path: Path, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop the operation before each of its writes: qemu-img check stays clean, and the
    guest sees exactly the state before or the state after."""
    import vmforge.formats.qcow2.update as update

    base = make_image(tmp_path / "base.qcow2", "cluster_size=4096", compressed=True)
    qemu_img("snapshot", "-c", "s1", base)
    qemu_io(base, ["write -P 0x77 0 64k"])
    if op == "repair":  # a leak and a missing COPIED flag to repair
        q = Qcow2File(base)
        q.set_refcount(q.data_cluster_host_offset(1 << 20) // q.cluster_size, 3)
        q.set_l2_entry(0, q.l2_entry(0) & ~QCOW_OFLAG_COPIED)
    old_raw = convert_raw(base, tmp_path / "old.raw")
    done = tmp_path / "done.qcow2"
    shutil.copy(base, done)
    real = update.pwrite_all
    calls = 0

    def counting(fd: int, data: bytes, offset: int) -> None:
        nonlocal calls
        calls += 1
        real(fd, data, offset)

    monkeypatch.setattr(update, "pwrite_all", counting)
    _ops()[op](done)
    total = calls
    new_raw = convert_raw(done, tmp_path / "new.raw")
    states = [(sha256(old_raw), snapshot_names(base)), (sha256(new_raw), snapshot_names(done))]
    assert total >= 4
    def crash_at_release(self: object) -> None:
        raise _Crash

    # stops before each write (the header switch is the last one), then one after the
    # switch, before freed clusters are released
    for stop in range(total + 1):
        img = tmp_path / f"crash-{stop}.qcow2"
        shutil.copy(base, img)
        left = stop

        def crashing(fd: int, data: bytes, offset: int) -> None:
            nonlocal left
            if left == 0:
                raise _Crash
            left -= 1
            real(fd, data, offset)

        monkeypatch.setattr(update, "pwrite_all", crashing)
        monkeypatch.setattr(update.Qcow2Update, "_release", crash_at_release)
        with pytest.raises(_Crash):
            _ops()[op](img)
        code, data = check_json(img)
        if op == "repair" and stop < total:
            assert code == 2  # the old, damaged state, as it was
        else:
            assert code == 0, (stop, qemu_img("check", img, check=False).stderr)
        got = sha256(convert_raw(img, tmp_path / "got.raw"))
        assert (got, snapshot_names(img)) in states, stop
        if stop == total:
            assert (got, snapshot_names(img)) == states[1]
        img.unlink()


def test_untrusted_refuses_overlays(tmp_path: Path) -> None:
    make_image(tmp_path / "base.qcow2", "")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    before = sha256(top)
    for args in (["snapshot", "-c", "s"], ["snapshot", "-l"], ["amend", "-o", "compat=0.10"],
                 ["check", "-r", "all"]):
        assert_clean_error(run_vmforge(*args, "--untrusted", top),
                           contains="refused in untrusted mode")
    assert sha256(top) == before
    vmforge_ok("snapshot", "-c", "s", top)  # local mode: the backing file is not opened
    assert_clean(top)
