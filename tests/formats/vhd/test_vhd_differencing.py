"""Differencing VHD (disk type 4), read and write.

qemu-img 7.2 cannot read or write differencing VHDs, so the specification is the
oracle: chains are built by vmforge's writer with writes at odd sector offsets, and
what they show is checked against the same writes applied to a raw buffer here. The
flattened results are then judged by qemu-img (compare, check) as usual.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import vmforge
from tests.data.qemu import check_json, qemu_img, qemu_io
from tests.helpers import assert_clean_error, assert_same_bytes, run_vmforge, vmforge_json, vmforge_ok
from vmforge import errors
from vmforge.formats import BackingRef
from vmforge.formats.vhd import VpcFormat
from vmforge.formats.vhd import structs as S

MiB = 1 << 20
SECTOR = 512
BASE_SIZE = 5 * MiB + 7 * SECTOR  # three 2 MiB blocks, the last one partial


def _writes(seed: int, sectors: int, count: int = 24) -> list[tuple[int, int, bool]]:
    """(first sector, sector count, zeros?) at odd offsets, some across block boundaries."""
    rng = np.random.default_rng(seed)
    per_block = (2 * MiB) // SECTOR
    out = [(per_block - 3, 7, False), (2 * per_block - 1, 2, True)]  # straddle two blocks
    for _ in range(count):
        start = int(rng.integers(0, sectors - 40)) | 1
        out.append((start, int(rng.integers(1, 40)), bool(rng.integers(0, 4) == 0)))
    return out


def _apply(writer, composed: bytearray, owner: np.ndarray, depth: int,
           writes: list[tuple[int, int, bool]], seed: int) -> None:
    rng = np.random.default_rng(seed + 1000)
    for first, n, zeros in writes:
        off, length = first * SECTOR, n * SECTOR
        if zeros:
            writer.write_zeroes(off, length)
            composed[off:off + length] = bytes(length)
        else:
            data = rng.integers(1, 256, size=length, dtype=np.uint8).tobytes()
            writer.write(off, data)
            composed[off:off + length] = data
        # a layer written later sits above: depth 0 is the top once the chain is built
        owner[first:first + n] = depth


def _make_child(parent: Path, child: Path, size: int) -> object:
    return VpcFormat.create(str(child), size, {}, BackingRef(parent.name, "vpc"))


@pytest.fixture(scope="module", params=["dynamic", "fixed"])
def chain3(request, pattern_file, tmp_path_factory):
    """base (vmforge-made) <- d1 <- d2, the expected guest bytes and each sector's depth."""
    root = tmp_path_factory.mktemp(f"vhdchain-{request.param}")
    src = pattern_file("mixed", size=BASE_SIZE)
    base = root / "base.vhd"
    vmforge_ok("convert", "-O", "vpc", "-o", f"subformat={request.param}", src, base)
    with vmforge.open_image(str(base), "vpc") as img:
        size = img.virtual_size
        composed = bytearray(img.read(0, size))
    sectors = size // SECTOR
    owner = np.full(sectors, 2, dtype=np.int8)  # 2: base, 1: d1, 0: d2
    layers = [base]
    for depth, seed in ((1, 7), (0, 11)):
        child = root / f"d{2 - depth}.vhd"
        w = _make_child(layers[-1], child, size)
        try:
            assert w.virtual_size == size
            _apply(w, composed, owner, depth, _writes(seed, sectors), seed)
            w.finish()
        except BaseException:
            w.abort()
            raise
        layers.append(child)
    expected = root / "expected.raw"
    expected.write_bytes(bytes(composed))
    return layers, expected, owner


def _depths(entries: list[dict], sectors: int) -> np.ndarray:
    got = np.full(sectors, -1, dtype=np.int8)
    for e in entries:
        assert e["start"] % SECTOR == 0 and e["length"] % SECTOR == 0, e
        got[e["start"] // SECTOR:(e["start"] + e["length"]) // SECTOR] = e["depth"]
    return got


def test_chain_reads_composed_bytes(chain3, tmp_path):
    layers, expected, owner = chain3
    top = layers[-1]
    out = tmp_path / "flat.raw"
    vmforge_ok("convert", "-O", "raw", top, out)
    assert_same_bytes(out, expected)
    qemu_img("compare", "-f", "raw", "-F", "raw", out, expected)
    want = expected.read_bytes()
    with vmforge.open_image(str(top)) as img:
        assert img.format == "vpc" and len(img.chain.layers) == 3
        assert img.read(0, len(want)) == want
        for off in range(0, len(want), 4096):
            assert img.read(off, min(4096, len(want) - off)) == want[off:off + 4096], off
        off = 1
        while off < len(want):
            n = min(7777, len(want) - off)
            assert img.read(off, n) == want[off:off + n], f"read at {off}"
            off += n


@pytest.mark.parametrize("fmt", ["qcow2", "vpc"])
def test_chain_flattens(chain3, tmp_path, fmt):
    layers, expected, _ = chain3
    out = tmp_path / f"flat.{fmt}"
    vmforge_ok("convert", "-O", fmt, layers[-1], out)
    qemu_img("compare", "-f", fmt, "-F", "raw", out, expected)
    if fmt == "qcow2":
        rc, data = check_json(out)
        assert rc == 0, data


def test_map_and_info_show_the_chain(chain3):
    layers, _, owner = chain3
    base, d1, d2 = layers
    entries = vmforge_json("map", d2)
    got = _depths(entries, len(owner))
    assert (got == owner).all(), f"first wrong sector {int(np.flatnonzero(got != owner)[0])}"
    # sector-exact: the odd-offset writes show up as their own entries at depth 0 and 1
    assert {0, 1, 2} <= {e["depth"] for e in entries}
    # the top layer alone: exactly the sectors d2 wrote are its own
    top = vmforge_json("info", "--backing-chain", d2)
    assert [i["filename"] for i in top] == [str(d2), str(d2.parent / "d1.vhd"),
                                            str(d2.parent / "base.vhd")]
    assert top[0]["backing-filename"] == "d1.vhd" and top[0]["backing-filename-format"] == "vpc"
    assert top[0]["full-backing-filename"] == str(d1)
    assert top[1]["backing-filename"] == "base.vhd"
    assert "backing-filename" not in top[2]
    spec = top[0]["format-specific"]["data"]
    with open(d1, "rb") as f:
        f.seek(-512, os.SEEK_END)
        d1_id = S.Footer.unpack(f.read(512)).unique_id
    import uuid
    assert spec["parent-unique-id"] == str(uuid.UUID(bytes=d1_id))
    assert spec["disk-type"] == "differencing" and spec["parent-name"] == "d1.vhd"
    assert spec["parent-locators"] == f"W2ru .\\d1.vhd; W2ku {str(d1).replace('/', chr(92))}"
    human = vmforge_ok("map", d2).stdout
    assert str(d2) in human and str(d1) in human


def test_written_layout_follows_the_spec(chain3):
    layers, _, owner = chain3
    d2 = layers[-1]
    data = d2.read_bytes()
    footer = S.Footer.unpack(data[-512:])
    assert data[:512] == data[-512:] and S.footer_checksum_ok(data[-512:])
    assert footer.disk_type == S.DISK_TYPE_DIFFERENCING and footer.data_offset == 512
    hdr = S.DynamicHeader.unpack(data[512:1536])
    assert S.dynamic_checksum_ok(data[512:1536])
    parent_footer = S.Footer.unpack(layers[1].read_bytes()[-512:])
    assert hdr.parent_unique_id == parent_footer.unique_id
    assert hdr.parent_time_stamp == parent_footer.time_stamp
    codes = [S.platform_name(e.platform_code) for e in hdr.parent_locator_entries
             if e.platform_code]
    assert codes == ["W2ku", "W2ru"]
    for e in hdr.parent_locator_entries[:2]:
        assert e.platform_data_offset % 512 == 0 and e.platform_data_space % 512 == 0
        text = data[e.platform_data_offset:e.platform_data_offset + e.platform_data_length]
        assert text.decode("utf-16-le") in (".\\d1.vhd", str(layers[1]).replace("/", "\\"))
    # each allocated block's bitmap has exactly the sectors d2 wrote (MSB = first sector)
    bat = np.frombuffer(data[hdr.table_offset:hdr.table_offset + 4 * hdr.max_table_entries],
                        dtype=">u4")
    per_block = hdr.block_size // SECTOR
    for i, entry in enumerate(bat.tolist()):
        mine = owner[i * per_block:(i + 1) * per_block] == 0
        if entry == S.BAT_UNUSED:
            assert not mine.any()
            continue
        bits = np.unpackbits(np.frombuffer(data[entry * 512:entry * 512 + per_block // 8],
                                           dtype=np.uint8))[:len(mine)].astype(bool)
        assert (bits == mine).all()


# --- create and convert ------------------------------------------------------------------------


@pytest.fixture()
def base_vhd(pattern_file, tmp_path):
    base = tmp_path / "base.vhd"
    vmforge_ok("convert", "-O", "vpc", pattern_file("mixed", size=4 * MiB), base)
    return base


def test_create_takes_the_parents_size(base_vhd, tmp_path):
    child = tmp_path / "child.vhd"
    vmforge_ok("create", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", child)
    ci = vmforge_json("info", child)
    bi = vmforge_json("info", base_vhd)
    assert ci["virtual-size"] == bi["virtual-size"] and ci["backing-filename"] == "base.vhd"
    out = tmp_path / "c.raw"
    vmforge_ok("convert", "-O", "raw", child, out)
    qemu_img("compare", "-f", "raw", "-F", "vpc", out, base_vhd)
    # an empty child stores nothing: every range comes from the parent
    assert {e["depth"] for e in vmforge_json("map", child)} == {1}
    # the size qemu-img would give a 4 MiB vpc is the parent's: accepted
    vmforge_ok("create", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", tmp_path / "c2.vhd", "4M")


@pytest.mark.parametrize(("args", "contains"), [
    (("-b", "base.vhd", "-F", "vpc", "{child}", "8M"), "size of its parent"),
    (("-o", "subformat=fixed", "-b", "base.vhd", "-F", "vpc", "{child}"), "differencing"),
    (("-b", "base.vhd", "-F", "raw", "{child}"), "VHD parent"),
    (("-b", "base.vhd", "{child}"), "backing format"),
    (("-b", "missing.vhd", "-F", "vpc", "{child}"), "missing.vhd"),
])
def test_create_refusals(base_vhd, tmp_path, args, contains):
    child = tmp_path / "child.vhd"
    argv = [str(child) if a == "{child}" else a for a in args]
    assert_clean_error(run_vmforge("create", "-f", "vpc", *argv), contains=contains)
    assert not child.exists()


@pytest.fixture()
def qcow2_overlays(pattern_file, tmp_path):
    """raw base <- ov1.qcow2 <- ov2.qcow2 with 512-byte clusters, written at odd sectors."""
    base = tmp_path / "base.raw"
    shutil.copyfile(pattern_file("mixed", size=4 * MiB), base)
    os.chmod(base, 0o644)
    ov1, ov2 = tmp_path / "ov1.qcow2", tmp_path / "ov2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.raw",
             "-F", "raw", ov1)
    qemu_io(ov1, ["write -P 0xab 1536 1536", "write -P 0xcd 2096640 9216",
                  "write -z 3000320 2048"])
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "ov1.qcow2",
             "-F", "qcow2", ov2)
    qemu_io(ov2, ["write -P 0x11 2560 512", "write -z 2097152 1024", "write -P 0x22 4193792 512"])
    return base, ov1, ov2


def test_convert_qcow2_overlays_into_a_vhd_chain(qcow2_overlays, tmp_path):
    base, ov1, ov2 = qcow2_overlays
    vbase, d1, d2 = tmp_path / "base.vhd", tmp_path / "d1.vhd", tmp_path / "d2.vhd"
    vmforge_ok("convert", "-O", "vpc", base, vbase)
    vmforge_ok("convert", "-O", "vpc", "-B", "base.vhd", "-F", "vpc", ov1, d1)
    vmforge_ok("convert", "-O", "vpc", "-B", "d1.vhd", "-F", "vpc", ov2, d2)
    for qcow, vhd in ((ov1, d1), (ov2, d2)):
        # the guest sees the qcow2 chain's bytes, then zeros up to the CHS-rounded size
        flat = tmp_path / "flat.raw"
        vmforge_ok("convert", "-O", "raw", vhd, flat)
        q = tmp_path / "q.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", qcow, q)
        with open(q, "ab") as f:
            f.truncate(flat.stat().st_size)
        assert_same_bytes(flat, q)
        # only the overlay's own sectors went into the differencing disk
        ours = [(e["start"], e["length"]) for e in vmforge_json("map", vhd) if e["depth"] == 0]
        theirs = [(e["start"], e["length"])
                  for e in vmforge_json("map", qcow) if e["depth"] == 0]
        assert ours == theirs
    assert d2.stat().st_size < 3 * (2 * MiB + 512) + 8192  # blocks, not the whole disk


def test_convert_B_copies_only_the_top_layer(chain3, tmp_path):
    layers, expected, owner = chain3
    base, d1, d2 = layers
    # a copy of d1's directory so that the new top layer sits next to its parent
    work = tmp_path / "w"
    work.mkdir()
    for p in (base, d1):
        shutil.copyfile(p, work / p.name)
    again = work / "d2again.vhd"
    vmforge_ok("convert", "-O", "vpc", "-B", "d1.vhd", "-F", "vpc", d2, again)
    got = _depths(vmforge_json("map", again), len(owner))
    assert ((got == 0) == (owner == 0)).all()
    out = tmp_path / "again.raw"
    vmforge_ok("convert", "-O", "raw", again, out)
    assert_same_bytes(out, expected)


# --- finding the parent ------------------------------------------------------------------------


def _rewrite_locator(path: Path, code: bytes, text: str) -> None:
    """Point the locator with ``code`` at ``text`` (within its reserved space), resealed."""
    with open(path, "r+b") as f:
        buf = bytearray(f.read(1536))
        for i in range(S.LOCATOR_COUNT):
            at = 512 + 576 + 24 * i
            if buf[at:at + 4] == code:
                _, space, _, _, off = struct.unpack_from(">IIIIQ", buf, at)
                data = text.encode("utf-16-le")
                assert len(data) <= space
                struct.pack_into(">I", buf, at + 8, len(data))
                f.seek(off)
                f.write(data.ljust(space, b"\0"))
        struct.pack_into(">I", buf, 512 + 36, 0)
        struct.pack_into(">I", buf, 512 + 36, S.checksum(bytes(buf[512:1536]), 36))
        f.seek(512)
        f.write(buf[512:1536])
        # the footer copy and footer are unchanged


def _two_layer(base_vhd, tmp_path) -> Path:
    child = tmp_path / "child.vhd"
    vmforge_ok("create", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", child)
    return child


def test_w2ku_used_when_w2ru_misses(base_vhd, tmp_path):
    child = _two_layer(base_vhd, tmp_path)
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    moved = elsewhere / "child.vhd"
    shutil.move(child, moved)
    info = vmforge_json("info", moved)
    assert info["backing-filename"] == str(base_vhd)  # the absolute locator
    out = tmp_path / "o.raw"
    vmforge_ok("convert", "-O", "raw", moved, out)
    qemu_img("compare", "-f", "raw", "-F", "vpc", out, base_vhd)


def test_parent_moved_is_a_clear_error(base_vhd, tmp_path):
    child = _two_layer(base_vhd, tmp_path)
    base_vhd.rename(tmp_path / "elsewhere.vhd")
    # info of the child alone still works and shows what it points at
    assert vmforge_json("info", child)["backing-filename"] == "base.vhd"
    for cmd in (("convert", "-O", "raw", child, tmp_path / "o.raw"), ("map", child),
                ("info", "--backing-chain", child)):
        proc = run_vmforge(*cmd)
        assert_clean_error(proc, contains="parent VHD 'base.vhd' not found")
        assert "W2ru '.\\base.vhd'" in proc.stderr and "W2ku" in proc.stderr
    assert not (tmp_path / "o.raw").exists()


def test_drive_letter_locator_named_in_the_error(base_vhd, tmp_path):
    child = _two_layer(base_vhd, tmp_path)
    _rewrite_locator(child, b"W2ku", "C:\\VMs\\base.vhd")
    _rewrite_locator(child, b"W2ru", ".\\gone.vhd")
    proc = run_vmforge("convert", "-O", "raw", child, tmp_path / "o.raw")
    assert_clean_error(proc, contains="not found")
    assert "W2ku 'C:\\VMs\\base.vhd' (a Windows drive path)" in proc.stderr
    assert "gone.vhd" in proc.stderr


def test_parent_id_mismatch(base_vhd, pattern_file, tmp_path):
    child = _two_layer(base_vhd, tmp_path)
    old = S.Footer.unpack(base_vhd.read_bytes()[-512:]).unique_id
    vmforge_ok("convert", "-O", "vpc", pattern_file("mixed", size=4 * MiB), base_vhd)  # rebuilt
    new = S.Footer.unpack(base_vhd.read_bytes()[-512:]).unique_id
    import uuid
    proc = run_vmforge("convert", "-O", "raw", child, tmp_path / "o.raw")
    assert_clean_error(proc, contains="unique ID")
    assert str(uuid.UUID(bytes=old)) in proc.stderr and str(uuid.UUID(bytes=new)) in proc.stderr


def test_untrusted_refuses_without_looking(base_vhd, tmp_path, monkeypatch):
    child = _two_layer(base_vhd, tmp_path)
    proc = run_vmforge("convert", "--untrusted", "-O", "raw", child, tmp_path / "o.raw")
    assert_clean_error(proc, contains="untrusted")
    # info refuses too (any reference is refused in untrusted mode); inspect names it
    assert_clean_error(run_vmforge("info", "--untrusted", child), contains="untrusted")
    assert vmforge_json("info", child)["backing-filename"] == "base.vhd"
    # the locators are not even looked up in untrusted mode
    import vmforge.formats.vhd.parent as parent_mod

    def no_lookup(path):  # pragma: no cover - must not run
        raise AssertionError(f"looked up {path}")

    monkeypatch.setattr(parent_mod.os.path, "exists", no_lookup)
    with pytest.raises(errors.BackingChainError, match="untrusted"):
        vmforge.open_image(str(child), "vpc", untrusted=True)


# --- hostile ------------------------------------------------------------------------------------


def _locator_entry(path: Path, index: int, **fields: int) -> None:
    with open(path, "r+b") as f:
        f.seek(512)
        buf = bytearray(f.read(1024))
        at = 576 + 24 * index
        code, space, length, res, off = struct.unpack_from(">IIIIQ", buf, at)
        vals = {"space": space, "length": length, "offset": off, **fields}
        struct.pack_into(">IIIIQ", buf, at, code, vals["space"], vals["length"], res,
                         vals["offset"])
        struct.pack_into(">I", buf, 36, 0)
        struct.pack_into(">I", buf, 36, S.checksum(bytes(buf), 36))
        f.seek(512)
        f.write(buf)


@pytest.mark.parametrize(("fields", "error", "contains"), [
    ({"length": 1 << 30}, errors.LimitExceeded, "parent locator 0"),
    ({"length": 65 << 10}, errors.LimitExceeded, "parent locator 0"),
    ({"offset": 1 << 40}, errors.CorruptImage, "past the end"),
    ({"offset": 2**64 - 2}, errors.CorruptImage, "past the end"),
])
def test_hostile_locators(base_vhd, tmp_path, fields, error, contains):
    child = _two_layer(base_vhd, tmp_path)
    _locator_entry(child, 0, **fields)
    with pytest.raises(error, match=contains):
        vmforge.open_image(str(child), "vpc")
    proc = run_vmforge("info", child, isolated=True, mem_limit=1 << 30)
    assert_clean_error(proc)


def test_odd_locator_length_falls_back(base_vhd, tmp_path):
    child = _two_layer(base_vhd, tmp_path)
    # W2ru cut to 3 bytes: "." and a stray byte, the child's own directory: not a parent;
    # the W2ku locator still finds it
    _locator_entry(child, 1, length=3)
    assert vmforge_json("info", child)["backing-filename"] == str(base_vhd)
    with vmforge.open_image(str(child)) as img:
        assert len(img.chain.layers) == 2


def test_bitmap_outside_the_file(chain3, tmp_path):
    layers, _, _ = chain3
    bad = tmp_path / "bad.vhd"
    shutil.copyfile(layers[-1], bad)
    data = bad.read_bytes()
    hdr = S.DynamicHeader.unpack(data[512:1536])
    bat = np.frombuffer(data[hdr.table_offset:hdr.table_offset + 4 * hdr.max_table_entries],
                        dtype=">u4")
    i = int(np.flatnonzero(bat != S.BAT_UNUSED)[0])
    with open(bad, "r+b") as f:
        f.seek(hdr.table_offset + 4 * i)
        f.write(struct.pack(">I", len(data) // 512 + 10))
    with pytest.raises(errors.TruncatedImage):
        vmforge.open_image(str(bad), "vpc", follow_backing=False)
    assert_clean_error(run_vmforge("map", bad))


def test_locator_loop_refused(base_vhd, tmp_path):
    a = _two_layer(base_vhd, tmp_path)  # child.vhd on base.vhd
    b = tmp_path / "b.vhd"
    vmforge_ok("create", "-f", "vpc", "-b", "child.vhd", "-F", "vpc", b)
    # make child.vhd claim b.vhd as its parent, by locator and by ID: b -> child -> b
    b_id = S.Footer.unpack(b.read_bytes()[-512:]).unique_id
    with open(a, "r+b") as f:
        f.seek(512)
        buf = bytearray(f.read(1024))
        buf[40:56] = b_id
        struct.pack_into(">I", buf, 36, 0)
        struct.pack_into(">I", buf, 36, S.checksum(bytes(buf), 36))
        f.seek(512)
        f.write(buf)
    _rewrite_locator(a, b"W2ru", ".\\b.vhd")
    _rewrite_locator(a, b"W2ku", str(b).replace("/", "\\"))
    proc = run_vmforge("convert", "-O", "raw", b, tmp_path / "o.raw", isolated=True)
    assert_clean_error(proc, contains="loops")


def test_truncated_differencing_at_every_length(base_vhd, tmp_path):
    size = vmforge_json("info", base_vhd)["virtual-size"]
    w = VpcFormat.create(str(tmp_path / "w.vhd"), size, {}, BackingRef("base.vhd", "vpc"))
    w.write(512 * 9, bytes(range(256)) * 4)
    w.finish()
    data = (tmp_path / "w.vhd").read_bytes()
    for n in [*range(0, 3072, 61), len(data) - 600, len(data) - 513]:
        p = tmp_path / "cut.vhd"
        p.write_bytes(data[:n])
        with pytest.raises(errors.ImageError):
            vmforge.open_image(str(p), "vpc", follow_backing=False)


def test_block_written_again_after_flush(base_vhd, tmp_path):
    """flush_before() moves bitmaps to disk; a later write to that block keeps both."""
    size = vmforge_json("info", base_vhd)["virtual-size"]
    child = tmp_path / "c.vhd"
    w = VpcFormat.create(str(child), size, {}, BackingRef("base.vhd", "vpc"))
    w.write(3 * SECTOR, b"\x01" * SECTOR)
    w.flush_before(2 * MiB)
    w.write(5 * SECTOR, b"\x02" * SECTOR)
    w.finish()
    own = [(e["start"], e["length"]) for e in vmforge_json("map", child) if e["depth"] == 0]
    assert own == [(3 * SECTOR, SECTOR), (5 * SECTOR, SECTOR)]
