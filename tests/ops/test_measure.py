"""``vmforge measure --output=json`` equals ``qemu-img measure --output=json``."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.data.generators import PATTERNS
from tests.data.qcow2_builders import spec_names
from tests.data.qemu import opts, qemu_img, qemu_img_json
from tests.helpers import assert_clean_error, run_vmforge, vmforge_json

SIZES = ["0", "1M", "123456789", "1T", "16T"]
TARGETS = [
    ("raw", {}), ("qcow2", {}), ("qcow2", {"cluster_size": 512}),
    ("qcow2", {"cluster_size": 2097152}), ("qcow2", {"refcount_bits": 1}),
    ("qcow2", {"refcount_bits": 64}), ("qcow2", {"extended_l2": "on"}),
    ("qcow2", {"preallocation": "metadata"}), ("qcow2", {"preallocation": "full"}),
    ("qcow2", {"compat": "0.10"}), ("raw", {"preallocation": "full"}),
]
TARGET_IDS = [f"{fmt}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "default")
              for fmt, o in TARGETS]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("target", range(len(TARGETS)), ids=TARGET_IDS)
def test_measure_size_matches_qemu(size, target):
    fmt, o = TARGETS[target]
    q = qemu_img("measure", "--output=json", "-O", fmt, *opts(o), "--size", size, check=False)
    if q.returncode != 0:  # e.g. 1T with 512-byte clusters: "image size is too large"
        assert_clean_error(run_vmforge("measure", "--output=json", "-O", fmt, *opts(o),
                                       "--size", size))
        return
    got = vmforge_json("measure", "-O", fmt, *opts(o), "--size", size)
    assert got == json.loads(q.stdout)


@pytest.mark.parametrize(("pattern", "target"),
                         list(itertools.product(PATTERNS, (0, 1, 2))) + [("mixed", 3), ("mixed", 6)],
                         ids=[f"{p}-{TARGET_IDS[t]}" for p, t in
                              list(itertools.product(PATTERNS, (0, 1, 2))) + [("mixed", 3), ("mixed", 6)]])
def test_measure_raw_file_matches_qemu(pattern_file, pattern, target):
    fmt, o = TARGETS[target]
    src = pattern_file(pattern)
    expected = qemu_img_json("measure", "-O", fmt, *opts(o), "-f", "raw", src)
    got = vmforge_json("measure", "-O", fmt, *opts(o), "-f", "raw", src)
    assert got == expected


MEASURE_SPECS = (spec_names("compressed")[:4] + spec_names("chain")[:3]
                 + spec_names("snapshots")[:2] + spec_names("extl2")[:2]
                 + ["plain-cs512-compat1.1", "plain-cs2097152-compat0.10", "prealloc-full-cs65536",
                    "prealloc-metadata-empty"])


@pytest.mark.parametrize("name", MEASURE_SPECS)
@pytest.mark.parametrize("target", (1, 2), ids=TARGET_IDS[1:3])
def test_measure_qcow2_file_matches_qemu(images, name, target):
    fmt, o = TARGETS[target]
    b = images.get(name)
    expected = qemu_img_json("measure", "-O", fmt, *opts(o), b.path)
    got = vmforge_json("measure", "-O", fmt, *opts(o), b.path)
    assert got == expected
