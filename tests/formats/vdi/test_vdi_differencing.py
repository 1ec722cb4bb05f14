"""Differencing VDI (image type 4), read with a parent the user names.

qemu-img refuses these ("non-NULL link UUID"). A VDI names its parent only by UUID,
so vmforge reads one only when the user names the parent file (``--parent``), matches
it by uuidCreate, and never searches the directory. Chains are hand-built
(tests/data/vdi_diff.py) on a qemu-img-made base; the expected guest bytes are the
writes applied to the base's raw here.
"""

from __future__ import annotations

import numpy as np
import pytest

import vmforge
from tests.data.qemu import qemu_img
from tests.data.vdi_diff import read_vdi_header, write_diff_vdi
from tests.helpers import assert_clean_error, assert_same_bytes, poke, run_vmforge, vmforge_json, vmforge_ok
from vmforge import errors
from vmforge.formats.vdi import structs as S

MiB = 1 << 20
OFF_TYPE = 0x4C
OFF_UUID_LINKAGE = 0x1A8


def _block(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, size=MiB, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def vdi_chain(qemu_made, tmp_path_factory):
    """base.vdi (qemu-img) <- d1.vdi <- d2.vdi, the expected raw and each block's depth."""
    root = tmp_path_factory.mktemp("vdichain")
    base_src, base_raw = qemu_made("vdi", "", "mixed", 5 * MiB)
    base = root / "base.vdi"
    base.write_bytes(base_src.read_bytes())
    expected = bytearray(base_raw.read_bytes())
    depth = [2] * 5
    h1 = write_diff_vdi(root / "d1.vdi", read_vdi_header(base), {1: _block(1), 3: _block(3)},
                        zero={4})
    write_diff_vdi(root / "d2.vdi", h1, {0: _block(10), 3: _block(13)}, zero={1})
    for layer, blocks, zeros in ((1, {1: 1, 3: 3}, {4}), (0, {0: 10, 3: 13}, {1})):
        for idx, seed in blocks.items():
            expected[idx * MiB:(idx + 1) * MiB] = _block(seed)
            depth[idx] = layer
        for idx in zeros:
            expected[idx * MiB:(idx + 1) * MiB] = bytes(MiB)
            depth[idx] = layer
    exp = root / "expected.raw"
    exp.write_bytes(bytes(expected))
    return root, exp, depth


def test_qemu_refuses_them(vdi_chain):
    root, _, _ = vdi_chain
    assert qemu_img("info", "-f", "vdi", root / "d1.vdi", check=False).returncode != 0


@pytest.mark.parametrize("order", ["parent-first", "grandparent-first"])
def test_reads_with_named_parents(vdi_chain, tmp_path, order):
    root, expected, _ = vdi_chain
    named = [root / "d1.vdi", root / "base.vdi"]
    if order == "grandparent-first":
        named.reverse()
    parents = [a for p in named for a in ("--parent", p)]
    out = tmp_path / "flat.raw"
    vmforge_ok("convert", *parents, "-O", "raw", root / "d2.vdi", out)
    assert_same_bytes(out, expected)
    qcow = tmp_path / "flat.qcow2"
    vmforge_ok("convert", *parents, "-O", "qcow2", root / "d2.vdi", qcow)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", qcow, expected)
    want = expected.read_bytes()
    with vmforge.open_image(str(root / "d2.vdi"), parents=[str(p) for p in named]) as img:
        assert len(img.chain.layers) == 3
        off = 1
        while off < len(want):
            n = min(77777, len(want) - off)
            assert img.read(off, n) == want[off:off + n], off
            off += n


def test_map_and_info_show_the_chain(vdi_chain):
    root, _, depth = vdi_chain
    args = ("--parent", root / "base.vdi", "--parent", root / "d1.vdi", root / "d2.vdi")
    entries = vmforge_json("map", *args)
    got = []
    for e in entries:
        got += [e["depth"]] * (e["length"] // MiB)
    assert got == depth
    # zero blocks of a differencing image hide the parent: zero at their own depth
    assert any(e["depth"] == 0 and e["zero"] and not e["data"] for e in entries)
    chain = vmforge_json("info", "--backing-chain", *args)
    assert [c["filename"] for c in chain] == [str(root / n) for n in ("d2.vdi", "d1.vdi", "base.vdi")]
    assert chain[0]["backing-filename"] == str(root / "d1.vdi")
    assert chain[0]["backing-filename-format"] == "vdi"
    d1 = read_vdi_header(root / "d1.vdi")
    assert chain[0]["format-specific"]["data"]["parent-uuid"] == str(d1.uuidCreate)


def test_without_a_named_parent(vdi_chain, tmp_path):
    root, _, _ = vdi_chain
    d2 = root / "d2.vdi"
    d1 = read_vdi_header(root / "d1.vdi")
    info = vmforge_json("info", d2)  # the child alone: described, nothing followed
    assert info["format-specific"]["data"]["parent-uuid"] == str(d1.uuidCreate)
    assert "backing-filename" not in info
    for cmd in (("convert", "-O", "raw", d2, tmp_path / "o.raw"), ("map", d2)):
        proc = run_vmforge(*cmd)
        assert_clean_error(proc, contains=str(d1.uuidCreate))
        assert "not named" in proc.stderr
    assert not (tmp_path / "o.raw").exists()
    # a wrong file named: its UUID is listed, nothing else is searched
    proc = run_vmforge("convert", "--parent", root / "base.vdi", "-O", "raw", d2,
                       tmp_path / "o.raw")
    assert_clean_error(proc, contains=str(read_vdi_header(root / "base.vdi").uuidCreate))
    proc = run_vmforge("map", "--parent", tmp_path / "nope.vdi", d2)
    assert_clean_error(proc, contains="nope.vdi")


def test_untrusted_refuses(vdi_chain, tmp_path):
    root, _, _ = vdi_chain
    proc = run_vmforge("convert", "--untrusted", "--parent", root / "d1.vdi",
                       "--parent", root / "base.vdi", "-O", "raw", root / "d2.vdi",
                       tmp_path / "o.raw")
    assert_clean_error(proc, contains="untrusted")
    with pytest.raises(errors.BackingChainError, match="untrusted"):
        vmforge.open_image(str(root / "d2.vdi"), untrusted=True, parents=[str(root / "d1.vdi")])


def test_verify_parent_checks_the_uuid(vdi_chain):
    root, _, _ = vdi_chain
    with vmforge.open_image(str(root / "d2.vdi"), follow_backing=False) as child, \
            vmforge.open_image(str(root / "base.vdi")) as wrong, \
            pytest.raises(errors.BackingChainError, match="links to"):
        child.top.verify_parent(wrong.top)


def test_parent_loop_refused(vdi_chain, tmp_path):
    root, _, _ = vdi_chain
    # a differencing image that claims itself as parent: named, matched, and a loop
    me = tmp_path / "me.vdi"
    h = write_diff_vdi(me, read_vdi_header(root / "base.vdi"), {0: _block(5)})
    poke(me, OFF_UUID_LINKAGE, "16s", h.uuidCreate.bytes_le)
    proc = run_vmforge("convert", "--parent", me, "-O", "raw", me, tmp_path / "o.raw")
    assert_clean_error(proc, contains="loop")


@pytest.mark.parametrize(("field", "value", "contains"), [
    (OFF_UUID_LINKAGE, bytes(16), "uuidLinkage is zero"),  # type diff, no parent
    (OFF_TYPE, S.TYPE_NORMAL, "only differencing images"),  # parent, type normal
])
def test_inconsistent_headers(vdi_chain, tmp_path, field, value, contains):
    root, _, _ = vdi_chain
    p = tmp_path / "bad.vdi"
    p.write_bytes((root / "d1.vdi").read_bytes())
    if isinstance(value, bytes):
        poke(p, field, "16s", value)
    else:
        poke(p, field, "<I", value)
    assert_clean_error(run_vmforge("info", p), contains=contains)
