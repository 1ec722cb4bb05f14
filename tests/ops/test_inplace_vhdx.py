"""resize, commit and rebase on VHDX: fixed, dynamic and differencing (.avhdx).

qemu-img cannot resize VHDX nor read differencing VHDX, so the oracle is the bytes each
test composes itself (qemu-io's writes applied to a Python buffer), qemu-img's own
reading, checking and comparing of every result it can read (fixed and dynamic images,
flattened children), qemu-io writing into what vmforge resized, and the rules of
[MS-VHDX]: the virtual disk size item, both region table copies, the headers'
sequence numbers and GUIDs, and parent_linkage = the parent's DataWriteGuid.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img, qemu_img_json, qemu_io
from tests.formats.vhdx.helpers import corpus_file, poke_sealed, region
from tests.helpers import assert_clean_error, run_vmforge, sha256, vmforge_json, vmforge_ok
from tests.ops.test_lifecycle import read_only
from vmforge.formats.base import HostFile
from vmforge.formats.vhdx import VhdxReader
from vmforge.formats.vhdx import structs as S
from vmforge.formats.vhdx.reader import read_headers

MiB = 1 << 20
GiB = 1 << 30
SIZE = 6 * MiB
BASE_WRITES = ("write -P 0x11 0 2M", "write -P 0x12 3M 1M", "write -P 0x13 5M 4K")
CHILD_WRITES = ("write -P 0x21 1M 1536K", "write -z 3M 64K", "write -P 0x22 4M 4K",
                "write -P 0x23 6287360 4096")
MID_WRITES = ("write -P 0x31 512K 8K", "write -P 0x32 5M 1M", "write -z 100K 4K")


# -- building images and composing what they must read --------------------------------------------


def compose(buf: bytearray, writes: tuple[str, ...]) -> bytearray:
    """Apply qemu-io ``write -P``/``write -z`` commands to a raw buffer."""
    for cmd in writes:
        m = re.fullmatch(r"write (?:-P (\w+)|-z) (\w+) (\w+)", cmd)
        assert m, cmd
        off, n = _num(m[2]), _num(m[3])
        buf[off:off + n] = bytes([int(m[1], 0) if m[1] else 0]) * n
    return buf


def _num(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def qemu_vhdx(path: Path, size: int, writes: tuple[str, ...] = (), *, sub: str = "dynamic",
              block: str = "1M") -> Path:
    # qemu's fixed disks with block_state_zero=on (its default) have ZERO blocks and no
    # offsets, written at the end of the file like a dynamic disk's: not fixed at all
    zero = "off" if sub == "fixed" else "on"
    qemu_img("create", "-q", "-f", "vhdx", "-o",
             f"subformat={sub},block_size={block},block_state_zero={zero}", path, str(size))
    if writes:
        qemu_io(path, list(writes), fmt="vhdx")
    return path


def child_vhdx(parent: Path, name: str, writes: tuple[str, ...], *, block: str = "2M") -> Path:
    """A differencing VHDX on ``parent`` holding ``writes``: qemu-io writes a qcow2 overlay
    on a raw copy of the parent's view (qemu cannot open a differencing VHDX), and
    vmforge copies the overlay's own data into the child."""
    d = parent.parent
    below = d / f"{name}.below.raw"
    vmforge_ok("convert", "-O", "raw", parent, below)
    ov = d / f"{name}.ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", below.name, "-F",
             "raw", ov, cwd=d)
    qemu_io(ov, list(writes))
    child = d / name
    vmforge_ok("convert", "-O", "vhdx", "-o", f"block_size={block}", "-B", parent.name, "-F",
               "vhdx", ov, child, cwd=d)
    ov.unlink()
    below.unlink()
    return child


def vm_raw(path: Path) -> bytes:
    """The guest's bytes as vmforge reads the whole chain."""
    out = path.with_name(path.name + ".raw")
    vmforge_ok("convert", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_raw(path: Path) -> bytes:
    out = path.with_name(path.name + ".qraw")
    qemu_img("convert", "-f", "vhdx", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_clean(path: Path, expected: bytes | None = None) -> None:
    """qemu-img check finds nothing, and compare agrees with ``expected``."""
    proc = qemu_img("check", "-f", "vhdx", path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if expected is not None:
        want = path.with_name(path.name + ".want")
        want.write_bytes(expected)
        proc = qemu_img("compare", "-f", "vhdx", "-F", "raw", path, want, check=False)
        want.unlink()
        assert proc.returncode == 0, proc.stdout + proc.stderr


def header(path: Path) -> S.Header:
    host = HostFile(path)
    try:
        return read_headers(host)
    finally:
        host.close()


def both_headers_valid(path: Path) -> list[int]:
    """Sequence numbers of the two header copies, each checked for its CRC-32C."""
    seqs = []
    with open(path, "rb") as f:
        for at in (S.HEADER1_OFFSET, S.HEADER2_OFFSET):
            f.seek(at)
            raw = f.read(S.HEADER_SIZE)
            assert S.checksum_ok(raw), f"header at {at} has a bad CRC"
            h = S.Header.unpack(raw)
            assert h.log_guid == S.ZERO_GUID  # nothing in the old log may be replayed
            seqs.append(h.sequence_number)
    return seqs


def meta(path: Path) -> VhdxReader:
    return VhdxReader(str(path))


def linkage(path: Path) -> bytes | None:
    r = meta(path)
    try:
        return S.parse_guid_str(r.parent_linkage or "")
    finally:
        r.close()


def hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(d.iterdir()) if p.is_file()}


# -- resize ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub,block", [("dynamic", "1M"), ("dynamic", "8M"), ("fixed", "1M")])
@pytest.mark.parametrize("change", ["+3M", "17M", "--shrink 2M", "--shrink -1536K",
                                    "--shrink --force 5M"])
def test_resize(tmp_path: Path, sub: str, block: str, change: str) -> None:
    p = qemu_vhdx(tmp_path / "d.vhdx", SIZE, BASE_WRITES if "shrink" not in change
                  or "force" in change else BASE_WRITES[:1], sub=sub, block=block)
    buf = compose(bytearray(SIZE), BASE_WRITES if "shrink" not in change or "force" in change
                  else BASE_WRITES[:1])
    before = header(p)
    *flags, size = change.split()
    vmforge_ok("resize", "-q", *flags, p, "--", size)
    new = SIZE + _num(size[1:]) * (1 if size[0] == "+" else -1) if size[0] in "+-" else _num(size)
    want = bytes(buf[:new]) + bytes(max(0, new - SIZE))
    assert qemu_img_json("info", "--output=json", p)["virtual-size"] == new
    qemu_clean(p, want)
    r = meta(p)
    try:  # the metadata item, the flags and the BAT as 2.5 and 2.6.2 want them
        assert r.meta.virtual_size == new
        assert r.meta.leave_blocks_allocated == (sub == "fixed")
        if sub == "fixed":  # every block keeps its place in the file (qemu's are ZERO there)
            assert len(r.payload) == r.blocks > 0
            assert all(e & S.BAT_STATE_MASK == S.PAYLOAD_BLOCK_FULLY_PRESENT for e in r.payload)
    finally:
        r.close()
    after = header(p)
    assert after.sequence_number > before.sequence_number
    assert after.data_write_guid != before.data_write_guid
    assert after.file_write_guid != before.file_write_guid
    assert min(both_headers_valid(p)) > before.sequence_number
    # qemu writes into what vmforge resized, and reads back what it wrote
    qemu_io(p, [f"write -P 0x44 {new - 8192} 8K", f"read -P 0x44 {new - 8192} 8K"], fmt="vhdx")
    assert vm_raw(p) == want[:new - 8192] + b"\x44" * 8192


def test_grow_after_shrink_reads_zeros(tmp_path: Path) -> None:
    p = qemu_vhdx(tmp_path / "d.vhdx", 4 * MiB, ("write -P 7 0 4M",), block="1M")
    vmforge_ok("resize", "-q", "--shrink", "--force", p, str(MiB + 512))
    vmforge_ok("resize", "-q", p, "4M")
    qemu_clean(p, b"\x07" * (MiB + 512) + bytes(3 * MiB - 512))


def test_grow_relocates_the_bat(tmp_path: Path) -> None:
    """1 MiB blocks: a 1 MiB BAT region holds 131072 entries, so 200 GiB needs a new one at
    the end of the file, named by both region table copies; blocks past a 4 GiB chunk
    (the sector bitmap entries interleaved, 2.5) land where qemu looks for them."""
    p = qemu_vhdx(tmp_path / "d.vhdx", SIZE, BASE_WRITES, block="1M")
    old_bat = region(p, S.BAT_GUID)
    vmforge_ok("resize", "-q", p, "200G")
    new_bat = region(p, S.BAT_GUID)
    assert new_bat[0] >= old_bat[0] + old_bat[1] and new_bat[1] >= 200 * 1024 * 8
    assert new_bat[0] % MiB == 0 and new_bat[1] % MiB == 0
    with open(p, "rb") as f:
        f.seek(S.REGION_TABLE1_OFFSET)
        t1 = f.read(S.REGION_TABLE_SIZE)
        f.seek(S.REGION_TABLE2_OFFSET)
        t2 = f.read(S.REGION_TABLE_SIZE)
    assert t1 == t2 and S.checksum_ok(t1)
    assert qemu_img("check", p, check=False).returncode == 0
    assert qemu_img_json("info", "--output=json", p)["virtual-size"] == 200 * GiB
    qemu_io(p, ["read -P 0x11 0 2M", "read -P 0x12 3M 1M", "read -P 0 6M 1M",
                "read -P 0 150G 1M", "write -P 0x55 199G 1M", "write -P 0x56 4G 4K"], fmt="vhdx")
    entries = {e["start"]: e for e in vmforge_json("map", p) if e["data"]}
    with open(p, "rb") as f:
        for start, byte, n in ((199 * GiB, 0x55, MiB), (4 * GiB, 0x56, 4096)):
            f.seek(entries[start]["offset"])
            assert f.read(n) == bytes([byte]) * n
    assert_clean_error(run_vmforge("resize", "-q", "--shrink", p, "6M"),
                       contains="offset 4294967296")
    vmforge_ok("resize", "-q", "--shrink", "--force", p, "6M")  # the data past 6M goes
    qemu_clean(p, bytes(compose(bytearray(SIZE), BASE_WRITES)))


# -- commit ----------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, bytes]:
    base = qemu_vhdx(tmp_path / "base.vhdx", SIZE, BASE_WRITES, block="1M")
    child = child_vhdx(base, "child.avhdx", CHILD_WRITES)
    composed = bytes(compose(compose(bytearray(SIZE), BASE_WRITES), CHILD_WRITES))
    assert vm_raw(child) == composed
    return base, child, composed


def test_commit_empties_and_relinks_the_child(pair: tuple[Path, Path, bytes]) -> None:
    base, child, composed = pair
    base_guid, child_hdr = header(base).data_write_guid, header(child)
    vmforge_ok("commit", "-q", child)
    qemu_clean(base, composed)
    # the base's data changed: a new DataWriteGuid; the emptied child links to it
    assert header(base).data_write_guid != base_guid
    assert linkage(child) == header(base).data_write_guid
    # the child's own view did not change: its DataWriteGuid stays (its children stay valid)
    assert header(child).data_write_guid == child_hdr.data_write_guid
    assert header(child).sequence_number > child_hdr.sequence_number
    assert all(e["depth"] == 1 for e in vmforge_json("map", child)), "the child still holds data"
    assert vm_raw(child) == composed
    assert os.path.getsize(child) < 8 * MiB  # its blocks are gone from the file


def test_commit_keep_relinks_the_child(pair: tuple[Path, Path, bytes]) -> None:
    """commit -d: the child keeps its data, and its parent_linkage follows the base's new
    DataWriteGuid (2.6.2.6), so the chain stays readable."""
    base, child, composed = pair
    vmforge_ok("commit", "-q", "-d", child)
    qemu_clean(base, composed)
    assert vm_raw(child) == composed


def test_commit_through_a_three_level_chain(tmp_path: Path) -> None:
    """top into mid, then mid into base: each emptied child is re-linked, and top stays
    valid after the second commit because emptying mid kept mid's DataWriteGuid."""
    base = qemu_vhdx(tmp_path / "base.vhdx", SIZE, BASE_WRITES, block="8M")
    mid = child_vhdx(base, "mid.avhdx", MID_WRITES, block="1M")
    top = child_vhdx(mid, "top.avhdx", CHILD_WRITES)
    composed = bytes(compose(compose(compose(bytearray(SIZE), BASE_WRITES), MID_WRITES),
                             CHILD_WRITES))
    assert vm_raw(top) == composed
    vmforge_ok("commit", "-q", top)
    assert vm_raw(top) == composed
    vmforge_ok("commit", "-q", mid)
    qemu_clean(base, composed)
    assert vm_raw(top) == composed
    assert {e["depth"] for e in vmforge_json("map", top)} == {2}


def test_commit_deep_relinks_the_middle(tmp_path: Path) -> None:
    base = qemu_vhdx(tmp_path / "base.vhdx", SIZE, BASE_WRITES)
    mid = child_vhdx(base, "mid.avhdx", MID_WRITES)
    top = child_vhdx(mid, "top.avhdx", CHILD_WRITES)
    composed = bytes(compose(compose(compose(bytearray(SIZE), BASE_WRITES), MID_WRITES),
                             CHILD_WRITES))
    vmforge_ok("commit", "-q", "-b", base, top)
    qemu_clean(base, composed)
    # qemu-img documents the images in between as invalid now; vmforge re-links the one
    # above the base, and since the top's view did not change the chain reads the same
    assert vm_raw(top) == composed


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
@pytest.mark.parametrize("grow", [False, True])
def test_commit_qcow2_overlay_into_vhdx(tmp_path: Path, grow: bool, sub: str) -> None:
    """A qcow2 overlay on a VHDX base: qemu-img commits it too (when no growing is needed)."""
    for who in ("ours", "theirs"):
        d = tmp_path / who
        d.mkdir()
        qemu_vhdx(d / "base.vhdx", SIZE, BASE_WRITES, sub=sub)
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.vhdx", "-F", "vhdx", d / "top.qcow2",
                 str(SIZE + (2 * MiB if grow else 0)), cwd=d)
        qemu_io(d / "top.qcow2", [*CHILD_WRITES, "write -P 0x66 6M 1M"] if grow
                else list(CHILD_WRITES))
    composed = compose(compose(bytearray(SIZE), BASE_WRITES), CHILD_WRITES)
    if grow:
        composed += b"\x66" * MiB + bytes(MiB)
    size_before = os.path.getsize(tmp_path / "ours" / "base.vhdx")
    vmforge_ok("commit", "-q", tmp_path / "ours" / "top.qcow2")
    qemu_clean(tmp_path / "ours" / "base.vhdx", bytes(composed))
    if sub == "fixed" and not grow:  # written where the fixed disk's blocks already are
        assert os.path.getsize(tmp_path / "ours" / "base.vhdx") == size_before
    if not grow:  # qemu-img cannot grow a VHDX
        qemu_img("commit", "-q", tmp_path / "theirs" / "top.qcow2")
        assert qemu_raw(tmp_path / "ours" / "base.vhdx") == \
            qemu_raw(tmp_path / "theirs" / "base.vhdx")


def test_fixed_disk_blocks_are_written_in_place(tmp_path: Path, pattern_file) -> None:
    """A fixed disk's block that is ZERO but keeps its offset (LeaveBlocksAllocated) is
    written where it is: the file does not grow."""
    p = qemu_vhdx(tmp_path / "f.vhdx", SIZE, sub="fixed")
    bat_at, _ = region(p, S.BAT_GUID)
    with open(p, "r+b") as f:
        f.seek(bat_at + 8)
        entry = int.from_bytes(f.read(8), "little")
        f.seek(bat_at + 8)
        f.write((entry & S.BAT_FILE_OFFSET_MASK | S.PAYLOAD_BLOCK_ZERO).to_bytes(8, "little"))
    size = os.path.getsize(p)
    src = pattern_file("mixed", size=SIZE)
    vmforge_ok("convert", "-n", "-O", "vhdx", src, p)
    assert os.path.getsize(p) == size
    qemu_clean(p, Path(src).read_bytes())


# -- rebase ----------------------------------------------------------------------------------------


def test_rebase_safe_onto_another_parent(pair: tuple[Path, Path, bytes]) -> None:
    base, child, composed = pair
    d = base.parent
    other = qemu_vhdx(d / "other.vhdx", SIZE, ("write -P 0x11 0 1M", "write -P 0x77 2M 2M"))
    child_guid = header(child).data_write_guid
    vmforge_ok("rebase", "-q", "-b", "other.vhdx", "-F", "vhdx", child, cwd=d)
    assert linkage(child) == header(other).data_write_guid
    assert vmforge_json("info", child)["backing-filename"] == "other.vhdx"
    assert header(child).data_write_guid != child_guid  # data was copied into it
    base.unlink()  # nothing comes from the old parent any more
    assert vm_raw(child) == composed


def test_rebase_unsafe_only_relinks(pair: tuple[Path, Path, bytes]) -> None:
    base, child, composed = pair
    d = base.parent
    os.rename(base, d / "moved.vhdx")
    child_guid = header(child).data_write_guid
    assert_clean_error(run_vmforge("convert", "-O", "raw", child, d / "x.raw"))
    vmforge_ok("rebase", "-q", "-u", "-b", "moved.vhdx", "-F", "vhdx", child, cwd=d)
    assert vm_raw(child) == composed
    assert header(child).data_write_guid == child_guid  # what the guest sees is unchanged
    r = meta(child)
    try:
        loc = r.meta.parent_locator
        assert loc is not None and loc.entries["relative_path"] == "moved.vhdx"
        assert loc.entries["absolute_win32_path"] == str(d / "moved.vhdx").replace("/", "\\")
    finally:
        r.close()


@pytest.mark.parametrize("unsafe", [False, True])
def test_rebase_flattens_into_a_dynamic_disk(pair: tuple[Path, Path, bytes],
                                            unsafe: bool) -> None:
    base, child, composed = pair
    flags = ["-u"] if unsafe else []
    want = bytearray(composed)
    if unsafe:  # what the child itself does not store reads zeros from now on
        for e in vmforge_json("map", child):
            if e["depth"] > 0:
                want[e["start"]:e["start"] + e["length"]] = bytes(e["length"])
    vmforge_ok("rebase", "-q", *flags, "-b", "", child)
    # a standalone dynamic disk now: qemu-img reads it
    qemu_clean(child, bytes(want))
    r = meta(child)
    try:
        assert not r.meta.has_parent and r.meta.parent_locator is None and r.backing is None
    finally:
        r.close()
    base.unlink()
    assert vm_raw(child) == want
    assert want != composed or not unsafe


def test_rebase_gives_a_dynamic_disk_a_parent(tmp_path: Path) -> None:
    base = qemu_vhdx(tmp_path / "base.vhdx", SIZE, BASE_WRITES)
    solo = qemu_vhdx(tmp_path / "solo.vhdx", SIZE, CHILD_WRITES, block="2M")
    want = bytes(compose(bytearray(SIZE), CHILD_WRITES))
    vmforge_ok("rebase", "-q", "-b", "base.vhdx", "-F", "vhdx", solo, cwd=tmp_path)
    assert vm_raw(solo) == want  # a safe rebase keeps what the guest sees
    assert linkage(solo) == header(base).data_write_guid
    assert vmforge_json("info", solo)["backing-filename"] == "base.vhdx"
    # and back: flattening again gives a disk qemu-img reads the same
    vmforge_ok("rebase", "-q", "-b", "", solo)
    qemu_clean(solo, want)


# -- refusals leave every file as it was ------------------------------------------------------------


def test_refusals_change_nothing(pair: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    base, child, _ = pair
    d = base.parent
    qemu_vhdx(d / "small.vhdx", 4 * MiB)
    fixed = qemu_vhdx(d / "fixed.vhdx", SIZE, sub="fixed")
    qemu_img("create", "-q", "-f", "qcow2", d / "q.qcow2", str(SIZE))
    before = hashes(d)
    cases = [
        (("resize", "--shrink", base, "2M"), "offset 3145728"),
        (("resize", base, "+100"), "multiple of 512"),
        (("resize", child, "+1M"), "differencing VHDX"),
        (("resize", base, "64T"), "larger blocks"),
        (("resize", base, "65T"), "max of 64TB"),
        (("rebase", "-b", "small.vhdx", "-F", "vhdx", child), "bytes"),
        (("rebase", "-u", "-b", "small.vhdx", "-F", "vhdx", child), "parent's size"),
        (("rebase", "-u", "-b", "q.qcow2", "-F", "qcow2", child), "VHDX parent"),
        (("rebase", "-u", "-b", "base.vhdx", "-F", "vhdx", fixed), "fixed VHDX"),
        (("commit", base), "no backing file"),
        (("rebase", "-u", "-b", "child.avhdx", "-F", "vhdx", child), "its own parent"),
    ]
    for args, words in cases:
        assert_clean_error(run_vmforge(*args, cwd=d), contains=words)
    with read_only(base):
        assert_clean_error(run_vmforge("commit", child), contains="read-only")
        assert_clean_error(run_vmforge("resize", base, "+1M"), contains="read-only")
    with read_only(child):
        assert_clean_error(run_vmforge("rebase", "-b", "", child), contains="read-only")
    assert hashes(d) == before
    # a damaged BAT (a block past the end of the file) is never written
    bat_at, _ = region(base, S.BAT_GUID)
    with open(base, "r+b") as f:
        f.seek(bat_at)
        f.write(((1 << 40) | S.PAYLOAD_BLOCK_FULLY_PRESENT).to_bytes(8, "little"))
    before = hashes(d)
    assert_clean_error(run_vmforge("resize", base, "+1M"), contains="outside the file")
    assert_clean_error(run_vmforge("commit", child), contains="outside the file")
    assert hashes(d) == before


def test_dirty_log_is_never_written(tmp_path: Path) -> None:
    img = corpus_file(tmp_path, "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2")
    copy = tmp_path / "dirty.vhdx"
    shutil.copyfile(img, copy)
    before = sha256(copy)
    assert_clean_error(run_vmforge("resize", copy, "+1M"), contains="log")
    assert_clean_error(run_vmforge("rebase", "-u", "-b", "", copy), contains="log")
    assert sha256(copy) == before


def test_damaged_metadata_header_is_never_written(tmp_path: Path) -> None:
    p = qemu_vhdx(tmp_path / "d.vhdx", SIZE, BASE_WRITES)
    meta_at, _ = region(p, S.METADATA_GUID)
    poke_sealed(p, S.REGION_TABLE1_OFFSET, S.REGION_TABLE_SIZE, 0, "4s", b"xxxx")
    poke_sealed(p, S.REGION_TABLE2_OFFSET, S.REGION_TABLE_SIZE, 0, "4s", b"xxxx")
    before = sha256(p)
    assert_clean_error(run_vmforge("resize", "-f", "vhdx", p, "+1M"), contains="region")
    assert sha256(p) == before
    assert meta_at > 0


def test_hyperv_child_relinked_then_flattened(tmp_path: Path) -> None:
    """The Windows-made .avhdx (its parent not shipped, its blocks PARTIALLY_PRESENT with
    Hyper-V's sector bitmaps): rebase -u links it to an empty parent of its size, then
    rebase -u -b "" makes a dynamic disk holding only its own sectors, which qemu-img
    reads exactly as vmforge read the relinked chain."""
    child = tmp_path / "c.avhdx"
    shutil.copyfile(corpus_file(tmp_path, "dissect-hypervisor/vhdx/differencing.avhdx.gz"),
                    child)
    os.chmod(child, 0o644)
    vmforge_ok("create", "-q", "-f", "vhdx", tmp_path / "empty.vhdx", "8G")
    guid = header(child).data_write_guid
    vmforge_ok("rebase", "-q", "-u", "-b", "empty.vhdx", "-F", "vhdx", child, cwd=tmp_path)
    assert linkage(child) == header(tmp_path / "empty.vhdx").data_write_guid
    assert header(child).data_write_guid == guid
    want = tmp_path / "want.raw"
    vmforge_ok("convert", "-O", "raw", child, want)
    vmforge_ok("rebase", "-q", "-u", "-b", "", child)
    assert qemu_img("check", child, check=False).returncode == 0
    got = tmp_path / "got.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", child, got)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", got, want, check=False).returncode == 0
    assert want.stat().st_blocks > 0 and os.path.getsize(want) == 8 * GiB


@pytest.mark.parametrize("name", ["fixed.vhdx.gz", "dynamic.vhdx.gz"])
def test_resize_windows_made_disks(tmp_path: Path, name: str) -> None:
    """Hyper-V's own fixed and dynamic disks (10 MiB; 2 and 32 MiB blocks) grow and shrink."""
    p = tmp_path / "w.vhdx"
    shutil.copyfile(corpus_file(tmp_path, f"dissect-hypervisor/vhdx/{name}"), p)
    os.chmod(p, 0o644)
    original = qemu_raw(p)
    vmforge_ok("resize", "-q", p, "+3M")
    qemu_clean(p, original + bytes(3 * MiB))
    vmforge_ok("resize", "-q", "--shrink", "--force", p, "7M")
    qemu_clean(p, original[:7 * MiB])
    vmforge_ok("resize", "-q", p, "12M")
    qemu_clean(p, original[:7 * MiB] + bytes(5 * MiB))
    r = meta(p)
    try:
        assert r.meta.leave_blocks_allocated == name.startswith("fixed")
    finally:
        r.close()


class _Crash(Exception):
    pass


@pytest.mark.parametrize("new_size", ["200G", "3M"])
def test_crash_after_logging_replays_to_the_new_state(tmp_path: Path, monkeypatch,
                                                      new_size: str) -> None:
    """The metadata goes through the log (2.3): a crash after the log entry is flushed but
    before anything reaches its place leaves a file that qemu-img (check -r all) and
    vmforge (--replay-log) both replay to the finished resize."""
    from vmforge.formats.vhdx import journal
    from vmforge.ops.resize import resize

    p = qemu_vhdx(tmp_path / "d.vhdx", SIZE, BASE_WRITES, block="1M")
    real_write = journal.pwrite_all

    def crashing(fd, header, pages, log_guid, set_log_guid):  # type: ignore[no-untyped-def]
        log = range(header.log_offset, header.log_offset + header.log_length)
        monkeypatch.setattr(journal, "pwrite_all",
                            lambda f, data, off: real_write(f, data, off) if off in log else None)

        def stop(guid: bytes) -> None:
            if guid == S.ZERO_GUID:
                raise _Crash  # the power goes before the log is retired
            set_log_guid(guid)
        real_through(fd, header, pages, log_guid, stop)

    real_through = journal.write_through_log
    monkeypatch.setattr("vmforge.formats.vhdx.inplace.write_through_log", crashing)
    with pytest.raises(_Crash):
        resize(str(p), new_size, shrink=True, force=True)
    monkeypatch.undo()
    new = _num(new_size)
    want = bytes(compose(bytearray(SIZE), BASE_WRITES))[:new]
    assert_clean_error(run_vmforge("info", p), contains="log needs replay")
    assert vmforge_json("info", "--replay-log", p)["virtual-size"] == new
    theirs = tmp_path / "theirs.vhdx"
    shutil.copyfile(p, theirs)
    qemu_img("check", "-q", "-r", "all", theirs)  # qemu replays the log on a writable open
    assert qemu_img_json("info", "--output=json", theirs)["virtual-size"] == new
    qemu_io(theirs, ["read -P 0x11 0 2M", "read -P 0 6M 1M" if new > SIZE
                     else "read -P 0 2M 1M"], fmt="vhdx")
    vmforge_ok("check", "-q", "-r", "all", p)  # vmforge replays it the same way
    if new > SIZE:  # 200 GiB: qemu reads without block status, so only probe it
        assert qemu_img("check", p, check=False).returncode == 0
        qemu_io(p, ["read -P 0x11 0 2M", "read -P 0x13 5M 4K", "read -P 0 100G 1M"], fmt="vhdx")
    else:
        qemu_clean(p, want)
        assert qemu_raw(theirs) == want
