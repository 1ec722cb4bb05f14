"""Human-readable output mirrors qemu-img's (info, map, check, measure), byte for byte."""

from __future__ import annotations

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import describe, run_vmforge

SPECS = ["plain-cs65536-compat1.1", "plain-cs512-compat0.10", "compressed-zstd-cs65536-rewritten",
         "chain-qcow2-cs65536-65536-65536-subdir", "chain-raw-cs4096-65536-512-relative",
         "snapshots-cluster_size65536", "extl2-backing-cs65536", "prealloc-metadata-cs4096",
         "lazy-refcounts-dirty"]


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("cmd", [("info",), ("info", "--backing-chain"), ("map",), ("check",)],
                         ids=["info", "info-chain", "map", "check"])
def test_human_output_matches_qemu(images, name, cmd):
    b = images.get(name)
    cwd = b.path.parent
    q = qemu_img(*cmd, b.path.name, cwd=cwd, check=False)
    v = run_vmforge(*cmd, b.path.name, cwd=cwd)
    assert v.returncode == q.returncode, describe(v)
    assert v.stdout == q.stdout, f"qemu-img:\n{q.stdout}\n" + describe(v)


@pytest.mark.parametrize("name", ["plain-cs65536-compat1.1", "chain-qcow2-grow",
                                  "snapshots-cluster_size4096"])
def test_human_measure_matches_qemu(images, name):
    b = images.get(name)
    q = qemu_img("measure", "-O", "qcow2", b.path, check=False)
    v = run_vmforge("measure", "-O", "qcow2", b.path)
    assert (v.returncode, v.stdout) == (q.returncode, q.stdout), describe(v)
