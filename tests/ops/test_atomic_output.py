"""Outputs appear atomically: a convert that fails midway leaves nothing under the
destination name and no temporary files in the destination directory."""

from __future__ import annotations

import os
import shutil

import pytest

import vmforge
from tests.data.generators import write_pattern
from tests.data.qcow2_poke import QCOW_OFLAG_COPIED, Qcow2File
from tests.data.qemu import qemu_img, qemu_img_json
from tests.helpers import assert_clean_error, run_vmforge, sha256
from vmforge import errors


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A qcow2 whose last data cluster's L2 entry points past EOF: reads fail late."""
    d = tmp_path_factory.mktemp("broken")
    raw = write_pattern(d / "src.raw", "random", 8 << 20)
    path = d / "broken.qcow2"
    qemu_img("convert", "-O", "qcow2", raw, path)
    img = Qcow2File(path)
    last = max(e["start"] + e["length"] for e in qemu_img_json("map", path) if e["data"]) - 65536
    far = (os.path.getsize(path) // 65536 + 4096) * 65536
    img.set_l2_entry(last, QCOW_OFLAG_COPIED | far)
    os.chmod(path, 0o444)
    return path


FAIL_CASES = [("raw", []), ("raw", ["-m", "4"]), ("qcow2", []), ("qcow2", ["-c"]),
              ("qcow2", ["-m", "4"]), ("qcow2", ["-o", "preallocation=full"])]


@pytest.mark.parametrize(("out_fmt", "extra"), FAIL_CASES,
                         ids=[f"{f}-{'_'.join(e) or 'plain'}" for f, e in FAIL_CASES])
def test_failed_convert_leaves_nothing(broken, tmp_path, out_fmt, extra):
    outdir = tmp_path / "out"
    outdir.mkdir()
    dest = outdir / f"dest.{out_fmt}"
    before = sha256(broken)
    proc = run_vmforge("convert", *extra, "-O", out_fmt, broken, dest, timeout=120, isolated=True)
    assert_clean_error(proc)
    assert not dest.exists()
    assert os.listdir(outdir) == [], f"left behind: {os.listdir(outdir)}"
    assert sha256(broken) == before


def test_failed_convert_keeps_existing_destination(broken, tmp_path):
    dest = tmp_path / "dest.raw"
    dest.write_bytes(b"previous content")
    proc = run_vmforge("convert", "-O", "raw", broken, dest, timeout=120, isolated=True)
    assert_clean_error(proc)
    assert dest.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["dest.raw"]


def test_failed_api_convert_leaves_nothing(broken, tmp_path):
    dest = tmp_path / "dest.qcow2"
    with pytest.raises(errors.VmforgeError):
        vmforge.convert(str(broken), str(dest), "qcow2")
    assert os.listdir(tmp_path) == []


def test_unwritable_destination_is_clean_error(tmp_path):
    src = write_pattern(tmp_path / "s.raw", "random", 1 << 20)
    dest = tmp_path / "no" / "such" / "dir" / "x.qcow2"
    proc = run_vmforge("convert", "-O", "qcow2", src, dest, isolated=True)
    assert_clean_error(proc)


def test_successful_convert_leaves_only_destination(tmp_path):
    src = write_pattern(tmp_path / "s.raw", "mixed", 2 << 20)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for fmt in ("raw", "qcow2"):
        proc = run_vmforge("convert", "-O", fmt, src, outdir / f"d.{fmt}", isolated=True)
        assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(outdir)) == ["d.qcow2", "d.raw"]
    shutil.rmtree(outdir)


@pytest.mark.parametrize("where", ["main file", "companion"])
def test_interrupt_just_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch,
                                                                         where):
    """Ctrl-C can land between the kernel creating the temporary file and Python binding
    its descriptor (under load, a signal sent as soon as the file shows up does). The
    name is chosen before the file is made, so the file is still removed."""
    from vmforge.ops.output import atomic_output
    from vmforge.util import companions
    from vmforge.util.companions import pending_output

    real_open, made = os.open, []

    def open_then_interrupt(path, flags, mode=0o777, **kw):
        fd = real_open(path, flags, mode, **kw)
        if flags & os.O_EXCL:  # the name reservation, not the writer's own open
            made.append(path)
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    dest = tmp_path / "out.vmdk"
    with pytest.raises(KeyboardInterrupt):
        if where == "main file":
            monkeypatch.setattr(companions.os, "open", open_then_interrupt)
            with atomic_output(str(dest)):
                pytest.fail("the temporary name was handed out despite the interrupt")
        else:
            with atomic_output(str(dest)) as tmp:
                monkeypatch.setattr(companions.os, "open", open_then_interrupt)
                pending = pending_output(tmp)
                assert pending is not None
                pending.companion("out-flat.vmdk")
    assert made and all(p.endswith(".vmforge-tmp") for p in made), made
    assert list(tmp_path.iterdir()) == [], "the interrupted temporary file was left behind"
