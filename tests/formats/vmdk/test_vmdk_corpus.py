"""Real VMDKs made by other tools (../shared/corpus), read as qemu-img 7.2 reads them."""

from __future__ import annotations

import pytest

from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    map_diff,
    run_vmforge,
    vmforge_json,
    vmforge_ok,
)

GiB = 1 << 30


def test_iotest_version3_stream_optimized(corpus_vmdk, tmp_path):
    """16 GiB streamOptimized, header version 3: compared sparsely (map + compare)."""
    img = corpus_vmdk / "iotest-version3.vmdk"
    info, qinfo = vmforge_json("info", img), qemu_img_json("info", img)
    assert info["virtual-size"] == qinfo["virtual-size"] == 16 * GiB
    for key in ("cluster-size", "format-specific"):
        assert info[key] == qinfo[key], key
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    assert any(e["data"] for e in ours)
    out = tmp_path / "v3.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    proc = qemu_img("compare", "-f", "raw", "-F", "vmdk", out, img, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_afl9_refused_like_qemu(corpus_vmdk, tmp_path):
    img = corpus_vmdk / "afl9.vmdk"
    q = qemu_img("info", img, check=False)
    assert q.returncode != 0 and "L1 size too big" in q.stderr
    for args in (["info", img], ["map", img], ["convert", "-O", "raw", img, tmp_path / "o.raw"]):
        proc = run_vmforge(*args, isolated=True, mem_limit=1 << 30, timeout=60)
        assert_clean_error(proc, contains="L1 size too big")


@pytest.mark.parametrize("name", ["blank.vmdk", "input.vmdk", "ubuntu.2.0-disk1.vmdk"])
def test_virtualbox_stream_optimized_reads_like_qemu(corpus_vmdk, tmp_path, name):
    img = corpus_vmdk / name
    info, qinfo = vmforge_json("info", img), qemu_img_json("info", img)
    for key in ("virtual-size", "cluster-size", "format", "format-specific"):
        assert info[key] == qinfo[key], key
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    ours, theirs = vmforge_json("map", img), qemu_img_json("map", img)
    assert ours == theirs, map_diff(ours, theirs)
    out, expected = tmp_path / "v.raw", tmp_path / "q.raw"
    vmforge_ok("convert", "-O", "raw", img, out)
    qemu_img("convert", "-O", "raw", img, expected)
    assert_same_bytes(out, expected)
    # self-contained: untrusted mode reads it too, and check finds nothing
    vmforge_ok("convert", "--untrusted", "-O", "raw", img, tmp_path / "u.raw")
    assert run_vmforge("check", img).returncode == qemu_img("check", img, check=False).returncode


def test_bare_sesparse_extent_is_reported(corpus_vmdk):
    info = vmforge_json("info", corpus_vmdk / "sesparse.vmdk")
    data = info["format-specific"]["data"]
    assert info["format"] == "vmdk" and data["create-type"] == "seSparse"
    assert "cid" not in data  # the CIDs live in the (absent) descriptor
    assert info["cluster-size"] == 4096
