"""VMDK fixtures: the corpus samples decompressed (sparse) into a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CORPUS
from tests.helpers import decompress_sparse


@pytest.fixture(scope="session")
def corpus_vmdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sesparse.vmdk, iotest-version3.vmdk and afl9.vmdk, decompressed; the ovf/ VMDKs
    copied (they are stored uncompressed)."""
    dest = tmp_path_factory.mktemp("corpus-vmdk")
    sources = {
        "sesparse.vmdk": CORPUS / "dissect-hypervisor" / "vmdk" / "sesparse.vmdk.gz",
        "iotest-version3.vmdk": CORPUS / "qemu-iotests" / "iotest-version3.vmdk.bz2",
        "afl9.vmdk": CORPUS / "qemu-iotests" / "afl9.vmdk.bz2",
    }
    for name, src in sources.items():
        if not src.is_file():
            pytest.fail(f"corpus missing: {src}")
        decompress_sparse(src, dest / name)
    for name in ("blank.vmdk", "input.vmdk", "ubuntu.2.0-disk1.vmdk"):
        src = CORPUS / "ovf" / name
        if not src.is_file():
            pytest.fail(f"corpus missing: {src}")
        (dest / name).write_bytes(src.read_bytes())
    return dest
