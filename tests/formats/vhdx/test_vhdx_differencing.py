"""Differencing VHDX (.avhdx): where vmforge goes past qemu-img, which refuses them.

The expected bytes and layer depths come from an equivalent qcow2 chain built by
qemu-img/qemu-io: the same writes land in qcow2 overlays (4 KiB clusters) over the
same raw base, and vmforge copies each overlay's own data into a differencing VHDX
(convert -B). The VHDX chain must then read like the qcow2 chain, byte for byte and
layer for layer. The Windows-made sample's parent is not shipped: its header and
locator are checked, and reading it fails cleanly for want of the parent.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

import vmforge
from tests.data.qemu import qemu_img, qemu_io
from tests.formats.vhdx.helpers import corpus_file
from tests.helpers import assert_clean_error, assert_same_bytes, run_vmforge, vmforge_json, vmforge_ok
from vmforge import errors
from vmforge.formats.vhdx import structs as S

MiB = 1 << 20
SIZE = 12 * MiB
# (layer, qemu-io commands): whole blocks, single 4 KiB pieces, zero writes, a chunk tail
WRITES = {
    1: ["write -P 0x11 4096 8192", "write -P 0x22 2M 2M", "write -z 4M 2M", "write -z 6M 12288",
        "write -P 0x34 11M 512K"],
    2: ["write -P 0x44 8192 4096", "write -P 0x55 2M 4096", "write -z 9M 4096",
        "write -P 0x66 3M 1M", "write -P 0x77 12220416 4096"],
}


def _depths(entries: list[dict], size: int) -> np.ndarray:
    """Layer answering each 4 KiB of the disk, from a map."""
    out = np.full(size // 4096, -1, dtype=np.int64)
    for e in entries:
        out[e["start"] // 4096:(e["start"] + e["length"]) // 4096] = e["depth"]
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory, pattern_file) -> dict[str, Path]:
    """base.vhdx <- child1.vhdx <- child2.vhdx, and the qcow2 chain holding the same data."""
    d = tmp_path_factory.mktemp("vhdx-chain")
    base_raw = d / "base.raw"
    shutil.copyfile(pattern_file("mixed", size=SIZE), base_raw)
    vmforge_ok("convert", "-O", "vhdx", "-o", "block_size=1M", base_raw, d / "base.vhdx")
    below_q, below_v = (base_raw, "raw"), d / "base.vhdx"
    for layer, cmds in WRITES.items():
        ov = d / f"ov{layer}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", below_q[0].name,
                 "-F", below_q[1], ov)
        qemu_io(ov, cmds)
        child = d / f"child{layer}.vhdx"
        # block sizes differ per layer on purpose: 1 MiB, then 2 MiB, then qemu's default
        opts = ["-o", "block_size=2M"] if layer == 1 else []
        vmforge_ok("convert", "-O", "vhdx", *opts, "-B", below_v.name, "-F", "vhdx", ov, child,
                   cwd=d)
        below_q, below_v = (ov, "qcow2"), child
    expected = d / "expected.raw"
    qemu_img("convert", "-O", "raw", d / "ov2.qcow2", expected)
    return {"dir": d, "top": d / "child2.vhdx", "mid": d / "child1.vhdx", "base": d / "base.vhdx",
            "qtop": d / "ov2.qcow2", "expected": expected}


def test_chain_reads_like_the_qcow2_chain(chain, tmp_path):
    out = tmp_path / "flat.raw"
    vmforge_ok("convert", "-O", "raw", chain["top"], out)
    assert_same_bytes(out, chain["expected"])
    mine = _depths(vmforge_json("map", chain["top"]), SIZE)
    theirs = _depths(vmforge_json("map", chain["qtop"]), SIZE)
    want = _depths(__import__("json").loads(
        qemu_img("map", "--output=json", chain["qtop"]).stdout), SIZE)
    assert (theirs == want).all()
    assert (mine == want).all(), np.flatnonzero(mine != want)[:10]
    expected = chain["expected"].read_bytes()
    with vmforge.open_image(str(chain["top"])) as img:
        assert len(img.chain.layers) == 3
        for off in range(1, SIZE, 5001 * 7):
            n = min(5001, SIZE - off)
            assert img.read(off, n) == expected[off:off + n]


def test_chain_reads_without_numpy(chain, tmp_path):
    """Converting, mapping and checking the differencing chain (sector bitmaps, parents)
    imports no numpy: the VHDX reader's BAT scan is array.array and C searches (issue 5)."""
    import re

    from tests.cli.test_startup import offenders, probe

    out = tmp_path / "flat.raw"
    top = str(chain["top"])
    result = probe([("convert", "main", ["convert", "-O", "raw", top, str(out)]),
                    ("map", "main", ["map", "--output=json", top]),
                    ("info", "main", ["info", "--backing-chain", top]),
                    ("check", "main", ["check", top])])
    for step in result["steps"]:
        assert step["code"] == 0, step
    assert_same_bytes(out, chain["expected"])
    assert "vmforge.formats.vhdx.reader" in result["steps"][0]["new"]
    numpy = offenders(result, re.compile(r"^numpy$"))
    assert not numpy, "reading a VHDX chain imported numpy:\n" + "\n".join(numpy)


def test_chain_uses_partially_present_blocks(chain):
    def states(path: Path) -> list[int]:
        with vmforge.open_image(str(path), follow_backing=False) as img:
            r = img.top
            assert r.meta.has_parent  # type: ignore[attr-defined]
            assert int(r.bat[S.sb_index(0, r.ratio)]) & 7 == S.SB_BLOCK_PRESENT  # type: ignore
            return [int(r.bat[S.bat_index(b, r.ratio)]) & 7  # type: ignore[attr-defined]
                    for b in range(r.blocks)]  # type: ignore[attr-defined]

    # child2: 8 MiB blocks (qemu's default), both only partly written
    assert states(chain["top"]) == [S.PAYLOAD_BLOCK_PARTIALLY_PRESENT] * 2
    # child1, 2 MiB blocks: 2M..4M written whole, 4M..6M zeroed whole (the parent hidden
    # without storing anything), 8M..10M untouched, the rest partly written
    P, F, Z, N = (S.PAYLOAD_BLOCK_PARTIALLY_PRESENT, S.PAYLOAD_BLOCK_FULLY_PRESENT,
                  S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_NOT_PRESENT)
    assert states(chain["mid"]) == [P, F, Z, P, N, P]


def test_flatten_equals_chain(chain, tmp_path):
    flat = tmp_path / "flat.vhdx"
    vmforge_ok("convert", "-O", "vhdx", chain["top"], flat)
    qemu_img("compare", "-f", "raw", "-F", "vhdx", chain["expected"], flat)
    assert qemu_img("check", flat).returncode == 0


def test_info_backing_chain(chain):
    infos = vmforge_json("info", "--backing-chain", chain["top"])
    assert [i["filename"].rsplit("/", 1)[-1] for i in infos] == \
        ["child2.vhdx", "child1.vhdx", "base.vhdx"]
    assert infos[0]["backing-filename"] == "child1.vhdx"
    assert infos[0]["backing-filename-format"] == "vhdx"
    with vmforge.open_image(str(chain["mid"]), follow_backing=False) as mid:
        guid = S.guid_str(mid.top.header.data_write_guid)  # type: ignore[attr-defined]
    data = infos[0]["format-specific"]["data"]
    assert data["parent-linkage"] == guid
    assert data["relative-path"] == "child1.vhdx"
    assert data["absolute-win32-path"].endswith("\\child1.vhdx")


def test_qemu_refuses_differencing(chain):
    proc = qemu_img("info", chain["top"], check=False)
    assert proc.returncode != 0 and "not supported" in proc.stderr.lower()


def test_create_overlay_reads_as_parent(chain, tmp_path):
    base = tmp_path / "base.vhdx"
    shutil.copyfile(chain["base"], base)
    child = tmp_path / "empty-child.vhdx"
    vmforge_ok("create", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx", child)
    assert vmforge_ok("compare", base, child).returncode == 0
    entries = vmforge_json("map", child)
    assert {e["depth"] for e in entries} == {1}, "an empty child shows its parent everywhere"


def test_parent_identity_checked(chain, tmp_path):
    d = tmp_path
    for name in ("base.vhdx", "child1.vhdx", "child2.vhdx"):
        shutil.copyfile(chain["dir"] / name, d / name)
    # a different file under the parent's name: same size, another DataWriteGuid
    vmforge_ok("convert", "-O", "vhdx", chain["expected"], d / "child1.vhdx")
    proc = run_vmforge("convert", "-O", "raw", d / "child2.vhdx", d / "x.raw")
    assert_clean_error(proc, contains="DataWriteGuid")
    with vmforge.open_image(str(d / "child1.vhdx")) as other:
        assert S.guid_str(other.top.header.data_write_guid) in proc.stderr  # type: ignore
    with pytest.raises(errors.BackingChainError):
        vmforge.open_image(str(d / "child2.vhdx"))


def test_untrusted_refuses_parent(chain):
    assert_clean_error(run_vmforge("info", "--untrusted", "--backing-chain", chain["top"]),
                       contains="untrusted")


@pytest.mark.parametrize(("args", "word"), [
    (["-F", "raw"], "VHDX parent"), (["-F", "vhdx", "-o", "subformat=fixed"], "fixed")])
def test_create_differencing_refusals(chain, tmp_path, args, word):
    shutil.copyfile(chain["base"], tmp_path / "base.vhdx")
    proc = run_vmforge("create", "-f", "vhdx", "-b", "base.vhdx", *args, tmp_path / "c.vhdx")
    assert_clean_error(proc, contains=word)


def test_create_differencing_wrong_size(chain, tmp_path):
    shutil.copyfile(chain["base"], tmp_path / "base.vhdx")
    proc = run_vmforge("create", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx",
                       tmp_path / "c.vhdx", "16M")
    assert_clean_error(proc, contains="parent's size")


# --- the Windows-made differencing disk (parent not shipped) --------------------------------

AVHDX = "dissect-hypervisor/vhdx/differencing.avhdx.gz"
PARENT = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"


@pytest.fixture(scope="module")
def avhdx(tmp_path_factory):
    return corpus_file(tmp_path_factory.mktemp("avhdx"), AVHDX)


def test_avhdx_info_without_parent(avhdx):
    assert qemu_img("info", avhdx, check=False).returncode != 0  # qemu cannot open it at all
    info = vmforge_json("info", avhdx)
    assert info["virtual-size"] == 8 << 30 and info["cluster-size"] == 2 * MiB
    assert info["backing-filename"] == PARENT and info["backing-filename-format"] == "vhdx"
    loc = info["format-specific"]["data"]
    assert loc["parent-linkage"] == "{ff34003b-11ed-4cf8-a166-b2be05e20b80}"
    assert loc["relative-path"] == ".\\" + PARENT
    assert loc["absolute-win32-path"].startswith("C:\\Users\\Public")
    with vmforge.open_image(str(avhdx), follow_backing=False) as img:
        r = img.top
        assert int(r.bat[0]) & 7 == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT  # type: ignore
        assert int(r.bat[S.sb_index(0, r.ratio)]) & 7 == S.SB_BLOCK_PRESENT  # type: ignore
        kinds = {e.kind.value for e in r.iter_extents(0, 2 * MiB)}
        assert kinds == {"data", "unallocated"}, kinds  # sectors from the parent, and its own


def test_avhdx_read_needs_parent(avhdx, tmp_path):
    proc = run_vmforge("convert", "-O", "raw", avhdx, tmp_path / "x.raw")
    assert_clean_error(proc, contains=PARENT)
    assert not (tmp_path / "x.raw").exists()


def test_avhdx_wrong_parent_refused(avhdx, tmp_path):
    local = tmp_path / "child.avhdx"
    shutil.copyfile(avhdx, local)
    vmforge_ok("create", "-f", "vhdx", tmp_path / PARENT, "8G")
    proc = run_vmforge("map", local)
    assert_clean_error(proc, contains="{ff34003b-11ed-4cf8-a166-b2be05e20b80}")
    assert str(uuid.UUID(int=0)) not in proc.stderr


def test_write_into_a_zeroed_block_keeps_the_parent_hidden(chain, tmp_path):
    """A block first zeroed whole (ZERO), then partly written, still hides the parent."""
    from vmforge.formats import BackingRef, get_format

    shutil.copyfile(chain["base"], tmp_path / "base.vhdx")
    with vmforge.open_image(str(tmp_path / "base.vhdx")) as base:
        parent = base.read(0, SIZE)
    # a block for contrast where the parent has data past the first 4 KiB
    other = next(b for b in range(2, SIZE // MiB)
                 if parent[b * MiB + 4096:(b + 1) * MiB].count(0) < MiB - 4096)
    assert parent[MiB:2 * MiB].count(0) < MiB, "the zeroed block must hide parent data"
    child = tmp_path / "c.vhdx"
    w = get_format("vhdx").create(str(child), SIZE, {"block_size": "1M"},
                                  BackingRef("base.vhdx", "vhdx"))
    w.write_zeroes(MiB, MiB)
    w.write(MiB + 4096, b"\x5a" * 4096)
    w.write(other * MiB, b"\x5b" * 4096)  # a plain partial block
    w.finish()
    with vmforge.open_image(str(child)) as img:
        got = img.read(0, SIZE)
        states = [int(img.top.bat[S.bat_index(b, img.top.ratio)]) & 7  # type: ignore
                  for b in (0, 1, other)]
    assert got[MiB:MiB + 4096] == bytes(4096)
    assert got[MiB + 4096:MiB + 8192] == b"\x5a" * 4096
    assert got[MiB + 8192:2 * MiB] == bytes(MiB - 8192)
    assert got[other * MiB:other * MiB + 4096] == b"\x5b" * 4096
    assert got[other * MiB + 4096:(other + 1) * MiB] == parent[other * MiB + 4096:(other + 1) * MiB]
    assert got[:MiB] == parent[:MiB]
    assert states == [S.PAYLOAD_BLOCK_NOT_PRESENT, S.PAYLOAD_BLOCK_FULLY_PRESENT,
                      S.PAYLOAD_BLOCK_PARTIALLY_PRESENT]
