"""``vmforge check`` against ``qemu-img check``: exit codes and JSON counts.

Clean qemu-made images of every spec, plus corruptions made by poking bytes the way
QEMU's iotests 060 do: bumped refcounts (leaks), zeroed refcounts (corruptions),
L2 entries pointing into metadata or past the end of the file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

from tests.data.qcow2_builders import SPECS
from tests.data.qcow2_poke import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, Qcow2File
from tests.data.qemu import check_json, qemu_img_json
from tests.helpers import assert_clean_error, describe, run_vmforge, sha256

COUNT_KEYS = ("corruptions", "leaks", "check-errors", "image-end-offset", "total-clusters",
              "allocated-clusters", "fragmented-clusters", "compressed-clusters")


def vmforge_check(path, cwd=None) -> tuple[int, dict]:
    import json

    proc = run_vmforge("check", "--output=json", "-f", "qcow2", path, cwd=cwd)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert proc.returncode in (0, 1, 2, 3, 63), describe(proc)
    try:
        return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {})
    except json.JSONDecodeError:
        raise AssertionError("invalid JSON\n" + describe(proc)) from None


def assert_check_matches(path) -> tuple[int, dict]:
    before = sha256(path)
    q_rc, q = check_json(path)
    v_rc, v = vmforge_check(path)
    assert sha256(path) == before, "check modified the image"
    assert v_rc == q_rc, f"exit: vmforge={v_rc} qemu={q_rc}\nvmforge={v}\nqemu={q}"
    diffs = {k: (v.get(k, 0), q.get(k, 0)) for k in COUNT_KEYS if v.get(k, 0) != q.get(k, 0)}
    assert not diffs, f"(vmforge, qemu) differ: {diffs}"
    return q_rc, q


@pytest.mark.parametrize("name", list(SPECS))
def test_check_matches_qemu_on_qemu_made_images(images, name):
    b = images.get(name)
    assert_check_matches(b.path)


@pytest.mark.parametrize("name", ["plain-cs65536-compat1.1", "snapshots-cluster_size4096",
                                  "compressed-zstd-cs65536-rewritten", "lazy-refcounts-dirty"])
def test_check_json_exact(images, name):
    b = images.get(name)
    q_rc, q = check_json(b.path)
    v_rc, v = vmforge_check(b.path)
    assert (v_rc, v) == (q_rc, q)


def test_check_raw_is_not_supported_like_qemu(pattern_file):
    src = pattern_file("mixed")
    from tests.data.qemu import qemu_img

    q = qemu_img("check", "-f", "raw", src, check=False)
    v = run_vmforge("check", "-f", "raw", src)
    assert q.returncode == 63
    assert v.returncode == 63, describe(v)
    assert "Traceback" not in v.stderr


# --- corruptions -------------------------------------------------------------------------------
def _first_data_guest_offset(img: Qcow2File, path) -> int:
    for e in qemu_img_json("map", "-f", "qcow2", path):
        if e["data"] and e["depth"] == 0 and "offset" in e and e["offset"] % img.cluster_size == 0 \
                and e["start"] % img.cluster_size == 0:
            return e["start"]
    raise AssertionError("no data cluster")


def _data_cluster(img: Qcow2File, path) -> int:
    return img.data_cluster_host_offset(_first_data_guest_offset(img, path)) // img.cluster_size


def leak_bump(img, path):
    """refcount 2 for a cluster referenced once; COPIED cleared so that only the leak shows."""
    g = _first_data_guest_offset(img, path)
    c = img.data_cluster_host_offset(g) // img.cluster_size
    img.set_refcount(c, img.get_refcount(c) + 1)
    img.set_l2_entry(g, img.l2_entry(g) & ~QCOW_OFLAG_COPIED)


def leak_orphan(img, path):
    size = os.path.getsize(path)
    cs = img.cluster_size
    end = -(-size // cs) * cs
    with open(path, "r+b") as f:
        f.truncate(end + cs)
    img.set_refcount(end // cs, 1)


def corrupt_zero_data(img, path):
    img.set_refcount(_data_cluster(img, path), 0)


def corrupt_zero_l2(img, path):
    img.set_refcount((img.l1_entry(0) & 0x00FF_FFFF_FFFF_FE00) // img.cluster_size, 0)


def corrupt_zero_refblock(img, path):
    block = img.u64(img.get("refcount_table_offset"))
    img.set_refcount(block // img.cluster_size, 0)


def corrupt_zero_header(img, path):
    img.set_refcount(0, 0)


def l2_into_header(img, path):
    """A compressed-cluster descriptor (byte granular) whose data lies inside the header.

    A standard entry cannot point at cluster 0: host offset 0 means "unallocated".
    """
    x = 62 - (img.get("cluster_bits") - 8)  # qcow2.txt "Compressed Clusters Descriptor"
    g = _first_data_guest_offset(img, path)
    img.set_l2_entry(g, QCOW_OFLAG_COMPRESSED | (0 << x) | 72)
    if img.l2_entry_size == 16:  # extended L2: a compressed entry's bitmap must be zero
        img.put_u64(img.l2_entry_offset(g) + 8, 0)


def l2_into_l1(img, path):
    l1 = img.get("l1_table_offset")
    img.set_l2_entry(_first_data_guest_offset(img, path), QCOW_OFLAG_COPIED | l1)


def l2_past_eof(img, path):
    far = (os.path.getsize(path) // img.cluster_size + 1000) * img.cluster_size
    img.set_l2_entry(_first_data_guest_offset(img, path), QCOW_OFLAG_COPIED | far)


def l2_unaligned(img, path):
    g = _first_data_guest_offset(img, path)
    img.set_l2_entry(g, img.l2_entry(g) + 512)


def leak_and_corruption(img, path):
    leak_orphan(img, path)
    corrupt_zero_l2(img, path)


def corrupt_bit_set(img, path):
    img.set("incompatible_features", img.get("incompatible_features") | 2)


def refcount_too_low_shared(img, path):
    """Two L2 entries share one data cluster whose refcount is 1."""
    g = _first_data_guest_offset(img, path)
    other = g + img.cluster_size * 2
    img.set_l2_entry(other, img.l2_entry(g))


MUTATIONS: dict[str, Callable] = {f.__name__: f for f in (
    leak_bump, leak_orphan, corrupt_zero_data, corrupt_zero_l2, corrupt_zero_refblock,
    corrupt_zero_header, l2_into_header, l2_into_l1, l2_past_eof, l2_unaligned,
    leak_and_corruption, corrupt_bit_set, refcount_too_low_shared,
)}
EXPECTED_EXIT = {"leak_bump": 3, "leak_orphan": 3, "corrupt_bit_set": 0}
BASES = ["plain-cs65536-compat1.1", "plain-cs4096-compat0.10", "refcount-bits4",
         "refcount-bits64", "extl2-cs65536", "snapshots-cluster_size65536"]
CORRUPT_CASES = [(b, m) for b in BASES for m in MUTATIONS
                 if not (b == "refcount-bits4" and m == "leak_bump")]


@pytest.mark.parametrize(("base", "mutation"), CORRUPT_CASES)
def test_check_matches_qemu_on_corrupted_images(images, tmp_path, base, mutation):
    b = images.get(base)
    path = tmp_path / "bad.qcow2"
    shutil.copyfile(b.path, path)
    MUTATIONS[mutation](Qcow2File(path), path)
    q_rc, q = assert_check_matches(path)
    assert q_rc == EXPECTED_EXIT.get(mutation, 2), f"oracle surprise: {q_rc} {q}"


@pytest.mark.parametrize("mutation", ["l2_into_header", "l2_into_l1"])
def test_l2_into_metadata_convert_fails_cleanly(images, tmp_path, mutation):
    """SECURITY row 8: L2 entries pointing into metadata: check reports, convert refuses."""
    b = images.get("plain-cs65536-compat1.1")
    path = tmp_path / "bad.qcow2"
    shutil.copyfile(b.path, path)
    MUTATIONS[mutation](Qcow2File(path), path)
    before = sha256(path)
    out = tmp_path / "out.raw"
    proc = run_vmforge("convert", "-O", "raw", path, out)
    assert_clean_error(proc)
    assert not out.exists()
    assert sha256(path) == before
