"""The copy pipeline's fast paths: verbatim source bytes moved with copy_file_range,
out-of-order writes (-W), the compression level, and flat memory on big inputs.

Every output is checked by the oracle (qemu-img compare, qemu-img check); the spies
only prove that the path under test was the one taken.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import vmforge
from tests.data.qemu import check_json, qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    map_classes,
    run_vmforge,
    run_vmforge_inprocess,
    sha256,
    vmforge_ok,
)
from vmforge.util import fileio
from vmforge.util.fileio import FileSpan, pwrite_all

MiB = 1 << 20
WRITABLE = ["raw", "qcow2", "vpc", "vhdx", "vdi", "vmdk"]
CHECKABLE = {"qcow2", "vhdx", "vdi", "vmdk"}


def _compare(src, out, fmt: str) -> None:
    proc = qemu_img("compare", "-f", "raw", "-F", fmt, src, out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt in CHECKABLE:
        rc, report = check_json(out, fmt)
        assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report


@pytest.fixture
def spans_seen(monkeypatch):
    """Counts the bytes pwrite_all received as file spans (copied in the kernel)."""
    seen = {"spans": 0, "bytes": 0}
    real = fileio._copy_span

    def spy(fd: int, span: FileSpan, offset: int) -> None:
        seen["spans"] += 1
        seen["bytes"] += span.length
        real(fd, span, offset)

    monkeypatch.setattr(fileio, "_copy_span", spy)
    return seen


#: outputs whose zero-detection blocks are large enough for the first-word probe
#: (qcow2 clusters, VMDK grains, VDI blocks); the others are scanned through buffers
SPAN_WRITERS = {"qcow2", "vmdk", "vdi"}


@pytest.mark.parametrize("fmt", WRITABLE)
def test_verbatim_source_bytes_are_copied_in_the_kernel(fmt, pattern_file, tmp_path, spans_seen):
    src = pattern_file("mixed", size=24 * MiB)
    out = tmp_path / f"out.{fmt}"
    stats = vmforge.convert(str(src), str(out), fmt)
    _compare(src, out, fmt)
    assert stats.written_bytes > 0
    if fmt in SPAN_WRITERS:
        # every data byte of a raw source lies verbatim in its file: all went by span
        assert spans_seen["bytes"] == stats.written_bytes
    else:
        assert spans_seen["spans"] == 0


def test_chained_sources_copy_each_layers_bytes_verbatim(pattern_file, tmp_path, spans_seen):
    """An overlay's clusters and the base's clusters come from two different files."""
    base_raw = pattern_file("random", size=8 * MiB)
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-O", "qcow2", base_raw, base)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", str(top)],
                   check=True, capture_output=True)
    out = tmp_path / "flat.qcow2"
    vmforge.convert(str(top), str(out), "qcow2")
    assert spans_seen["bytes"] > 0
    proc = qemu_img("compare", top, out, check=False)
    assert proc.returncode == 0, proc.stdout


def test_compressed_sources_still_go_through_buffers(pattern_file, tmp_path, spans_seen):
    src = pattern_file("text", size=8 * MiB)
    packed = tmp_path / "packed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, packed)
    out = tmp_path / "out.qcow2"
    vmforge.convert(str(packed), str(out), "qcow2")
    assert spans_seen["spans"] == 0
    _compare(src, out, "qcow2")


def test_stream_output_is_written_from_buffers(pattern_file, tmp_path, spans_seen):
    src = pattern_file("mixed", size=8 * MiB)
    with open(tmp_path / "piped.raw", "wb") as sink:
        vmforge.convert(str(src), "-", "raw", stream_fd=sink.fileno())
    assert spans_seen["spans"] == 0
    _compare(src, tmp_path / "piped.raw", "raw")


def test_file_span_falls_back_when_the_kernel_cannot_copy(tmp_path, monkeypatch):
    """EXDEV (another file system) and friends: the bytes go through a buffer instead."""
    src = tmp_path / "src"
    payload = os.urandom(300_000)
    src.write_bytes(payload)

    def refuse(*_args, **_kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        span = FileSpan(fd_in, 0, len(payload))
        pwrite_all(fd_out, span[1000:200_000], 5)
        assert os.pread(fd_out, 199_000, 5) == payload[1000:200_000]
    finally:
        os.close(fd_in)
        os.close(fd_out)


def test_file_span_reports_a_source_that_ends_early(tmp_path):
    src = tmp_path / "short"
    src.write_bytes(b"x" * 1000)
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(vmforge.errors.ImageReadError, match="ends at offset 1000") as err:
            pwrite_all(fd_out, FileSpan(fd_in, 1000, 1000, str(src)), 0)
        assert err.value.path == str(src) and err.value.offset == 1000
    finally:
        os.close(fd_in)
        os.close(fd_out)


@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vmdk"])
def test_a_source_that_shrinks_during_the_copy_is_a_read_error(fmt, pattern_file, tmp_path):
    """The source file is cut short after the first chunk is written: the copy fails
    as a read of the source, not as a failed write, and leaves no output behind.

    (These writers take the source's bytes as file spans. Through buffers, a raw source
    reads its own end as a hole, so the rest converts as zeros, as qemu-img reads it.)"""
    src = tmp_path / "src.raw"
    src.write_bytes(pattern_file("random", size=24 * MiB).read_bytes())
    out = tmp_path / f"out.{fmt}"
    cut = []

    def shrink_once(done: int, total: int) -> None:
        if not cut and 0 < done < total:
            os.truncate(src, MiB)
            cut.append(done)

    with pytest.raises(vmforge.errors.ImageReadError, match="shrink") as err:
        vmforge.convert(str(src), str(out), fmt, src_fmt="raw", workers=1, progress=shrink_once)
    assert cut and err.value.path == str(src)
    assert not isinstance(err.value, vmforge.errors.OutputError)
    assert not out.exists() and os.listdir(tmp_path) == ["src.raw"]


def test_an_io_error_on_the_source_is_reported_as_a_read(pattern_file, tmp_path, monkeypatch):
    """EIO from the disk under the source (injected at the system call: a failing
    sector cannot be made on demand here) is named as a read of the source."""
    src = pattern_file("random", size=8 * MiB)
    out = tmp_path / "out.vhd"  # a writer fed from buffers, so the data is read with preadv
    real = os.preadv

    def failing(fd, buffers, offset, *rest):
        if sum(len(b) for b in buffers) >= MiB:  # the copy's data reads, not header probes
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(vmforge.errors.ImageReadError, match="Input/output error") as err:
        vmforge.convert(str(src), str(out), "vpc", src_fmt="raw")
    assert err.value.path == str(src)
    assert not out.exists()
    # the command line's one line names the source and the read (in this process, where
    # the injected error applies)
    proc = run_vmforge_inprocess("convert", "-f", "raw", "-O", "vpc", src, out)
    assert_clean_error(proc, contains=f"{src}: reading guest bytes at offset 0 failed")
    assert "write failed" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("fmt,extra", [("qcow2", []), ("qcow2", ["-c"]), ("vhdx", []),
                                       ("vmdk", ["-o", "subformat=streamOptimized"])])
def test_out_of_order_writes_give_the_same_disk(fmt, extra, pattern_file, tmp_path):
    src = pattern_file("mixed", size=24 * MiB)
    out = tmp_path / f"w.{fmt}"
    vmforge_ok("convert", "-W", "-m", "4", *extra, "-O", fmt, src, out)
    _compare(src, out, fmt)


def test_compression_level_reaches_the_compressor(pattern_file, tmp_path):
    src = pattern_file("text", size=8 * MiB)
    digests = {}
    for level in (1, 9):
        out = tmp_path / f"l{level}.qcow2"
        vmforge_ok("convert", "-c", "--compression-level", str(level), "-O", "qcow2", src, out)
        _compare(src, out, "qcow2")
        digests[level] = sha256(out)
    # the output is deterministic for one level, so different bytes mean the level
    # reached the compressor (sizes round to whole clusters and can coincide)
    assert digests[1] != digests[9]
    vmdk = tmp_path / "s.vmdk"
    vmforge_ok("convert", "--compression-level", "1", "-O", "vmdk", "-o",
               "subformat=streamOptimized", src, vmdk)
    _compare(src, vmdk, "vmdk")


def test_compression_level_without_compression_is_refused(pattern_file, tmp_path):
    src = pattern_file("text", size=1 * MiB)
    out = tmp_path / "x.qcow2"
    proc = run_vmforge("convert", "--compression-level", "5", "-O", "qcow2", src, out)
    assert_clean_error(proc, contains="--compression-level needs compressed output")
    assert not out.exists()


def test_memory_stays_flat_on_a_large_image(tmp_path):
    """Peak RSS of a real process converting 768 MiB of data stays far below the data."""
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(768):
            f.write(block)
    out = tmp_path / "big.qcow2"
    # VmHWM is this process image's own peak; ru_maxrss would carry over the peak of the
    # (large) test worker the child was forked from, since Linux keeps it across exec
    code = ("import sys, vmforge; "
            "vmforge.convert(sys.argv[1], sys.argv[2], 'qcow2'); "
            "print(next(l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmHWM:')))")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)],
                          capture_output=True, text=True, check=True)
    peak_mib = int(proc.stdout.strip()) / 1024
    assert peak_mib < 256, f"peak RSS {peak_mib:.0f} MiB"
    _compare(src, out, "qcow2")


@pytest.mark.parametrize("workers", ["0", "-1", "65"])
def test_worker_count_out_of_range_is_refused(workers, pattern_file, tmp_path):
    src = pattern_file("text", size=1 * MiB)
    out = tmp_path / "x.qcow2"
    proc = run_vmforge("convert", "-m", workers, "-O", "qcow2", src, out)
    assert_clean_error(proc, contains="number of workers must be 1 to 64")
    assert not out.exists()


@pytest.mark.parametrize("pattern", ["zero_runs", "mixed", "all_zero", "holes", "odd_size",
                                     "tiny_odd"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vhdx", "vmdk"])
def test_zero_blocks_inside_verbatim_data_stay_holes(pattern, fmt, pattern_file, tmp_path):
    """Zero detection on the verbatim paths (first-word probe for big blocks, a mapping
    for small ones) allocates exactly what qemu-img allocates for the same source."""
    src = pattern_file(pattern, size=4 * MiB)
    ours, theirs = tmp_path / f"v.{fmt}", tmp_path / f"q.{fmt}"
    vmforge.convert(str(src), str(ours), fmt)
    qemu_img("convert", "-O", fmt, src, theirs)
    _compare(src, ours, fmt)
    got = map_classes(qemu_img_json("map", "--output=json", "-f", fmt, ours))
    want = map_classes(qemu_img_json("map", "--output=json", "-f", fmt, theirs))
    data = [(s, e) for s, e, d, _ in got if d]
    if fmt == "raw":
        # qemu-img always allocates a raw output's first 4 KiB (file-posix's
        # allocate_first_block); elsewhere the two must agree
        want = [(max(s, 4096), e, d, z) for s, e, d, z in want if e > 4096]
        data = [(max(s, 4096), e) for s, e in data if e > 4096]
    assert data == [(s, e) for s, e, d, _ in want if d]
