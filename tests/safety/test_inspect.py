"""The one-pass inspector: same verdict for every chunking, the oracle's format and size,
every reference named, nothing opened but the file, hostile headers refused.
"""

from __future__ import annotations

import bz2
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import CORPUS
from tests.data.qemu import qemu_img, qemu_img_json
from tests.data.vdi_diff import read_vdi_header, write_diff_vdi
from tests.helpers import assert_clean_error, run_vmforge, vmforge_json, vmforge_ok
from vmforge.model.inspection import InspectReport
from vmforge.safety import StreamInspector, inspect, inspect_path

MiB = 1 << 20
#: chunk sizes fed to the inspector: odd, sector, larger than its internal step, whole
CHUNKINGS = (17, 512, 100_000, 1 << 30)


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for pos in range(0, len(data), size):
        yield data[pos:pos + size]


def _verdicts(data: bytes, **kwargs: object) -> list[dict[str, object]]:
    out = []
    for size in CHUNKINGS:
        report = inspect(_chunks(data, size), "img", **kwargs)  # type: ignore[arg-type]
        out.append(report.to_json())
    return out


def _same_whatever_the_chunking(data: bytes, **kwargs: object) -> InspectReport:
    verdicts = _verdicts(data, **kwargs)
    assert all(v == verdicts[0] for v in verdicts), verdicts
    return inspect(io.BytesIO(data), "img", **kwargs)  # type: ignore[arg-type]


# -- what qemu-img makes is recognised as qemu-img recognises it -----------------------------

QEMU_MADE = [
    ("raw", ""), ("qcow2", ""), ("qcow2", "compat=0.10"), ("qcow2", "cluster_size=2M"),
    ("vpc", "subformat=dynamic"), ("vpc", "subformat=fixed"), ("vdi", ""), ("vdi", "static=on"),
    ("parallels", ""), ("vhdx", ""), ("vhdx", "subformat=fixed,block_size=1M"),
    ("vmdk", ""), ("vmdk", "subformat=streamOptimized"),
]


@pytest.mark.parametrize(("fmt", "options"), QEMU_MADE, ids=lambda v: v or "default")
def test_reports_format_and_size_like_qemu(fmt: str, options: str,
                                           qemu_made: Callable[..., tuple[Path, Path]]) -> None:
    img, _ = qemu_made(fmt, options, "mixed", 3 * MiB + 512)
    report = _same_whatever_the_chunking(img.read_bytes())
    info = qemu_img_json("info", "--output=json", "-f", fmt, img)
    assert report.safe, report.checks
    assert report.format == fmt
    assert report.virtual_size == info["virtual-size"]
    assert report.file_size == img.stat().st_size
    assert report.references == []


# -- references: named, refused in untrusted mode, never opened -------------------------------


def _references(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Images that name other files, and the field the inspector must name."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    out: dict[str, tuple[Path, str]] = {}
    p = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", "-u", p, "1M")
    out["qcow2-backing"] = (p, "backing_file_offset")
    p = tmp_path / "json.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", 'json:{"file.filename":"/etc/shadow"}',
             "-F", "raw", "-u", p, "1M")
    out["qcow2-json"] = (p, "json:")
    p = tmp_path / "datafile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", p, "1M")
    out["qcow2-data-file"] = (p, "data file")
    qemu_img("create", "-q", "-f", "vpc", tmp_path / "base.vhd", "2M")
    p = tmp_path / "child.vhd"
    vmforge_ok("create", "-q", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", "child.vhd",
               cwd=tmp_path)
    out["vhd-parent"] = (p, "VHD")
    qemu_img("create", "-q", "-f", "vdi", tmp_path / "base.vdi", "2M")
    p = tmp_path / "child.vdi"
    write_diff_vdi(p, read_vdi_header(tmp_path / "base.vdi"), {})
    out["vdi-parent"] = (p, "uuidLinkage")
    p = tmp_path / "split.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", p, "3G")
    out["vmdk-extents"] = (p, "VMDK descriptor extent 2")
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "1M")
    p = tmp_path / "delta.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", p, cwd=tmp_path)
    out["vmdk-parent"] = (p, "parentFileNameHint")
    return out


@pytest.mark.parametrize("case", ["qcow2-backing", "qcow2-json", "qcow2-data-file",
                                  "vhd-parent", "vdi-parent", "vmdk-extents", "vmdk-parent"])
def test_references_are_named_and_refused_untrusted(tmp_path: Path, case: str,
                                                    opened_files: list[str]) -> None:
    path, field = _references(tmp_path)[case]
    opened_files.clear()
    report = inspect_path(str(path), untrusted=True)
    assert opened_files == [str(path)], f"opened more than the named file: {opened_files}"
    assert report.references, report
    failed = {c.name: c.detail for c in report.failures}
    assert "no-references" in failed and field in failed["no-references"], report.checks
    # local mode reports them without refusing
    local = inspect_path(str(path), untrusted=False)
    assert local.references == report.references
    assert "no-references" not in {c.name for c in local.checks}


# -- refusals ----------------------------------------------------------------------------------


def test_polyglot_iso_with_a_qcow2_header_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "poly.img"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    data = bytearray(p.read_bytes().ljust(64 * 1024, b"\0"))
    data[0x8001:0x8006] = b"CD001"  # an ISO 9660 primary volume descriptor
    report = _same_whatever_the_chunking(bytes(data))
    assert not report.safe
    assert report.failures[0].name == "one-format"
    assert "qcow2" in report.failures[0].detail and "iso9660" in report.failures[0].detail


def test_stated_raw_but_qcow2_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "upload.img"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", "-u", p, "1M")
    report = _same_whatever_the_chunking(p.read_bytes(), expect_format="raw")
    assert {c.name for c in report.failures} >= {"expected-format"}


def test_quota_and_hazards(tmp_path: Path) -> None:
    p = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "2T")
    report = inspect_path(str(p), max_virtual_size=100 * (1 << 30))
    assert [c.name for c in report.failures] == ["size-quota"]
    data = bytearray(p.read_bytes())
    data[79] |= 2  # incompatible feature bit 1: corrupt (qcow2.txt, header byte 72..79)
    report = _same_whatever_the_chunking(bytes(data))
    assert [c.name for c in report.failures] == ["corrupt"]


@pytest.mark.parametrize("fmt", ["qcow2", "vpc", "vdi", "parallels"])
def test_truncated_headers_refused_at_every_length(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, p, "8M")
    data = p.read_bytes()
    # the headers and tables each format checks against the file size (VHD: footer copy,
    # dynamic header, a 16-byte BAT)
    header_end = {"qcow2": 112, "vpc": 1536 + 16, "vdi": 512, "parallels": 64}[fmt]
    for n in range(0, header_end, 7):
        ins = StreamInspector("t", untrusted=True)
        for b in data[:n]:  # one byte at a time
            ins.feed(bytes([b]))
        report = ins.finish()
        whole = inspect(io.BytesIO(data[:n]), "t")
        assert report.to_json() == whole.to_json(), n
        # a cut header is never "safe" as that format: refused, or taken as raw bytes
        assert not report.safe or report.format == "raw", (n, report.checks)


def _corpus(name: str, tmp_path: Path) -> Path:
    src = CORPUS / "qemu-iotests" / f"{name}.bz2"
    dest = tmp_path / name
    dest.write_bytes(bz2.decompress(src.read_bytes()))
    return dest


@pytest.mark.parametrize(("name", "message"), [
    ("afl5.img", "Max Table Entries too large (1073741825)"),
    ("afl9.vmdk", "L1 size too big"),
])
def test_fuzzer_images_from_the_corpus_are_refused(tmp_path: Path, name: str,
                                                   message: str) -> None:
    path = _corpus(name, tmp_path)
    report = _same_whatever_the_chunking(path.read_bytes())
    assert [c.name for c in report.failures] == ["headers"]
    assert message in report.failures[0].detail


def test_vmdk_extent_names_escaping_the_directory_are_refused(tmp_path: Path) -> None:
    desc = ('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
            'createType="monolithicFlat"\nRW 2048 FLAT "../../etc/passwd" 0\n')
    report = _same_whatever_the_chunking(desc.encode(), untrusted=False)
    assert [c.name for c in report.failures] == ["headers"], report.checks


def test_vhdx_log_and_windows_differencing_disk(tmp_path: Path) -> None:
    dirty = _corpus("iotest-dirtylog-10G-4M.vhdx", tmp_path)
    report = _same_whatever_the_chunking(dirty.read_bytes())
    assert [c.name for c in report.failures] == ["log-replay"]
    assert report.virtual_size == 10 << 30
    import gzip

    avhdx = tmp_path / "differencing.avhdx"
    avhdx.write_bytes(gzip.decompress(
        (CORPUS / "dissect-hypervisor" / "vhdx" / "differencing.avhdx.gz").read_bytes()))
    report = inspect_path(str(avhdx), untrusted=True)
    assert report.subformat == "differencing"
    fields = {r.field for r in report.references}
    assert "VHDX parent locator relative_path" in fields
    assert "VHDX parent locator absolute_win32_path" in fields
    assert [c.name for c in report.failures] == ["no-references"]


# -- the command -------------------------------------------------------------------------------


def test_cli_exit_codes_json_and_stdin(tmp_path: Path) -> None:
    refs = _references(tmp_path)
    base = tmp_path / "base.qcow2"
    assert vmforge_json("inspect", "--untrusted", "--output=json", base)["safe"] is True
    proc = run_vmforge("inspect", "--untrusted", refs["qcow2-backing"][0])
    assert_clean_error(proc, contains="no-references")
    assert "backing-file: '/etc/passwd'" in proc.stdout
    with open(refs["qcow2-backing"][0], "rb") as f:
        import subprocess

        from tests.helpers import vmforge_cmd
        piped = subprocess.run([*vmforge_cmd(), "inspect", "--untrusted", "--output=json", "-"],
                               stdin=f, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 1
    assert json.loads(piped.stdout)["references"][0]["value"] == "/etc/passwd"
