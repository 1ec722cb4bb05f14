"""``vmforge compare`` exit codes (0 identical, 1 different, 2 error) against qemu-img."""

from __future__ import annotations

import os

import pytest

import vmforge
from tests.data.generators import MiB, pattern_bytes, write_buffer
from tests.data.qemu import qemu_img
from tests.helpers import describe, run_vmforge


def _make(tmp_path, name, buf, fmt):
    raw = write_buffer(tmp_path / f"{name}.raw", buf)
    if fmt == "raw":
        return raw
    out = tmp_path / f"{name}.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


BASE = pattern_bytes("mixed", 2 * MiB)


def _flip(buf: bytes, off: int) -> bytes:
    b = bytearray(buf)
    b[off] ^= 0x5A
    return bytes(b)


VARIANTS = {
    "identical": lambda: BASE,
    "byte-first": lambda: _flip(BASE, 0),
    "byte-middle": lambda: _flip(BASE, 1_000_001),
    "byte-last": lambda: _flip(BASE, len(BASE) - 1),
    "byte-in-hole": lambda: _flip(BASE, 3 * len(BASE) // 8 + 5),
    "longer-zero-tail": lambda: BASE + bytes(MiB),
    "longer-data-tail": lambda: BASE + bytes(MiB - 1) + b"\x01",
    "shorter": lambda: BASE[: len(BASE) - 64 * 1024],
    "shorter-after-zeros": lambda: BASE[: 3 * len(BASE) // 8 + 4096],
}
CASES = [(v, fa, fb, strict) for v in VARIANTS for fa in ("raw", "qcow2") for fb in ("raw", "qcow2")
         for strict in (False, True) if not (fa == fb == "raw" and strict)]



@pytest.mark.parametrize(("variant", "fa", "fb", "strict"), CASES,
                         ids=[f"{v}-{a}-{b}{'-strict' if s else ''}" for v, a, b, s in CASES])
def test_compare_exit_code_matches_qemu(tmp_path, variant, fa, fb, strict):
    a = _make(tmp_path, "a", BASE, fa)
    b = _make(tmp_path, "b", VARIANTS[variant](), fb)
    flags = ["-s"] if strict else []
    q = qemu_img("compare", *flags, "-f", fa, "-F", fb, a, b, check=False)
    v = run_vmforge("compare", *flags, "-f", fa, "-F", fb, a, b)
    assert q.returncode in (0, 1)
    assert v.returncode == q.returncode, f"qemu: {q.returncode} {q.stdout}{q.stderr}\n" + describe(v)
    assert "Traceback" not in v.stderr
    if fa == fb == "qcow2" and not strict:  # probed formats give the same verdict
        v2 = run_vmforge("compare", a, b)
        assert v2.returncode == q.returncode, describe(v2)


@pytest.mark.parametrize("variant", ["identical", "byte-middle", "byte-in-hole", "longer-data-tail",
                                     "shorter"])
def test_compare_message_matches_qemu(tmp_path, variant):
    """qemu-img prints 'Images are identical.' or 'Content mismatch at offset N!'."""
    a = _make(tmp_path, "a", BASE, "qcow2")
    b = _make(tmp_path, "b", VARIANTS[variant](), "raw")
    q = qemu_img("compare", a, b, check=False)
    v = run_vmforge("compare", a, b)
    assert v.stdout.strip() == q.stdout.strip(), describe(v)


def test_compare_missing_file_is_exit_2(tmp_path):
    a = _make(tmp_path, "a", BASE, "qcow2")
    q = qemu_img("compare", a, tmp_path / "missing.qcow2", check=False)
    v = run_vmforge("compare", a, tmp_path / "missing.qcow2")
    assert q.returncode == 2
    assert v.returncode == 2, describe(v)
    lines = [ln for ln in v.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmforge: "), describe(v)


def test_compare_corrupt_file_is_exit_2(tmp_path):
    a = _make(tmp_path, "a", BASE, "qcow2")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(a.read_bytes()[:100])  # a truncated header
    q = qemu_img("compare", "-F", "qcow2", a, bad, check=False)
    v = run_vmforge("compare", "-F", "qcow2", a, bad)
    assert q.returncode == 2
    assert v.returncode == 2, describe(v)


@pytest.mark.parametrize("name", ["chain-qcow2-cs65536-65536-65536-relative",
                                  "snapshots-cluster_size65536", "compressed-zstd-cs4096-rewritten"])
def test_compare_qemu_made_image_with_its_raw(images, tmp_path, name):
    b = images.get(name)
    raw = images.qemu_raw(name)
    v = run_vmforge("compare", b.path, raw)
    assert v.returncode == 0, describe(v)
    changed = tmp_path / "changed.raw"
    data = bytearray(raw.read_bytes())
    data[len(data) // 2] ^= 1
    changed.write_bytes(bytes(data))
    v = run_vmforge("compare", b.path, changed)
    q = qemu_img("compare", b.path, changed, check=False)
    assert (v.returncode, q.returncode) == (1, 1), describe(v)
    assert os.path.exists(b.path)


def test_api_reads_agree_with_compare(tmp_path):
    a = _make(tmp_path, "a", BASE, "qcow2")
    with vmforge.open_image(a) as img:
        assert img.read(0, img.virtual_size) == BASE
