"""streamOptimized VMDK as a true stream, and images written to standard output.

The oracle is qemu-img (check, compare, info) on every output; the stream's layout is
also walked here, independently of vmforge's reader, to prove what qemu-img does not
look at: grains in increasing LBA order, tables after their grains, zero grains not
stored, footer and end-of-stream marker last, no seeks (everything also goes through
real pipes and a socket).
"""

from __future__ import annotations

import contextlib
import os
import pty
import socket
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest

from tests.data.generators import PATTERNS, pattern_bytes, pattern_size, random_bytes, text_bytes
from tests.data.qemu import convert_raw, qemu_img, qemu_img_json
from tests.helpers import (
    assert_clean_error,
    assert_same_bytes,
    describe,
    run_vmforge,
    vmforge_cmd,
    vmforge_ok,
)
from vmforge import ops
from vmforge.errors import VmforgeError
from vmforge.formats.vmdk import stream_writer
from vmforge.formats.vmdk.stream_writer import StreamOptimizedWriter

MiB = 1 << 20
GRAIN = 64 * 1024
GT_SPAN = 512 * GRAIN
STREAM = ("-O", "vmdk", "-o", "subformat=streamOptimized")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
EOS, GT, GD, FOOTER = 0, 1, 2, 3


# -- an independent walk of the stream ------------------------------------------------------


def walk_stream(data: bytes) -> dict:
    """Parse a streamOptimized VMDK front to back, asserting the stream's invariants."""
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd_off,
     overhead) = struct.unpack_from("<4sIIQQQQIQQQ", data, 0)
    assert magic == b"KDMV" and version == 3, (magic, version)
    assert flags == 0x30001, hex(flags)  # newline test, compressed grains, markers
    assert struct.unpack_from("<H", data, 77)[0] == 1  # compressAlgorithm deflate
    assert gd_off == GD_AT_END and grain == 128 and gtes == 512 and rgd == 0
    assert desc_off == 1 and overhead % 128 == 0 and overhead >= 1 + desc_size
    descriptor = data[512:512 * (1 + desc_size)].rstrip(b"\0").decode()
    assert 'createType="streamOptimized"' in descriptor
    assert not any(data[512 * (1 + desc_size):512 * overhead]), "padding before grains"
    pos = overhead * 512
    grains: dict[int, bytes] = {}
    gts: dict[int, list[int]] = {}  # sector of GT data -> entries
    last_lba = -1
    events = []
    while True:
        assert pos % 512 == 0 and pos + 512 <= len(data), f"marker past the end at {pos}"
        val, size = struct.unpack_from("<QI", data, pos)
        if size:
            assert val > last_lba and val % 128 == 0, f"grain LBA {val} after {last_lba}"
            last_lba = val
            payload = data[pos + 12:pos + 12 + size]
            grains[pos // 512] = zlib.decompress(payload)
            assert len(grains[pos // 512]) == GRAIN
            events.append(("grain", val // 128))
            pos += -(-(12 + size) // 512) * 512
            continue
        kind = struct.unpack_from("<I", data, pos + 12)[0]
        assert not any(data[pos + 16:pos + 512]), "marker padding"
        if kind == GT:
            assert val == 4
            gts[pos // 512 + 1] = list(struct.unpack_from("<512I", data, pos + 512))
            events.append(("gt", pos // 512 + 1))
        elif kind == GD:
            gd_sector = pos // 512 + 1
            n_entries = -(-capacity // (128 * 512))
            assert val == -(-n_entries * 4 // 512)
            gd = list(struct.unpack_from(f"<{n_entries}I", data, pos + 512))
            events.append(("gd", gd_sector))
        elif kind == FOOTER:
            assert val == 1
            footer = data[pos + 512:pos + 1024]
            assert footer[:4] == b"KDMV"
            head = bytearray(data[:512])
            head[56:64] = struct.pack("<Q", gd_sector)
            assert footer == bytes(head), "footer must be the header with the real gdOffset"
            events.append(("footer", 0))
        elif kind == EOS:
            assert val == 0 and not any(data[pos:pos + 512])
            assert pos + 512 == len(data), "bytes after the end-of-stream marker"
            break
        else:
            raise AssertionError(f"unknown marker type {kind} at {pos}")
        pos += 512 + val * 512
    kinds = [k for k, _ in events]
    assert kinds[-2:] == ["gd", "footer"] and kinds.count("gd") == 1
    # every GT the GD names is a GT that was written, and it lists exactly the grains
    # of its 32 MiB; each GT comes after its grains and before the next table's grains
    content: dict[int, bytes] = {}
    for gt_index, gt_sector in enumerate(gd):
        if gt_sector == 0:
            continue
        assert gt_sector in gts, f"GD entry {gt_index} -> {gt_sector} is not a GT"
        table_pos = events.index(("gt", gt_sector))
        for i, sector in enumerate(gts[gt_sector]):
            if sector:
                grain_no = gt_index * 512 + i
                assert events.index(("grain", grain_no)) < table_pos
                content[grain_no] = grains[sector]
    assert len(content) == len(grains), "a grain no table points at"
    for i, (kind, _) in enumerate(events):
        if kind == "grain":
            later = [v for k, v in events[i:] if k == "gt"]
            assert later, "a grain after the last table"
    return {"capacity": capacity, "grains": content, "gd": gd, "descriptor": descriptor}


def stream_content(walked: dict, size: int) -> bytes:
    buf = bytearray(walked["capacity"] * 512)
    for n, data in walked["grains"].items():
        buf[n * GRAIN:n * GRAIN + GRAIN] = data[:len(buf) - n * GRAIN]
    return bytes(buf[:size])


def nonzero_grains(content: bytes) -> set[int]:
    return {i // GRAIN for i in range(0, len(content), GRAIN) if any(content[i:i + GRAIN])}


def qemu_ok(image: Path, source: Path, src_fmt: str = "raw") -> None:
    """The oracle's verdicts: check clean, compare identical, a streamOptimized vmdk."""
    chk = qemu_img("check", "-f", "vmdk", image, check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    cmp_ = qemu_img("compare", "-f", src_fmt, "-F", "vmdk", source, image, check=False)
    assert cmp_.returncode == 0, cmp_.stdout + cmp_.stderr
    info = qemu_img_json("info", "-f", "vmdk", image)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"


def sh(cmd: str, **kw) -> subprocess.CompletedProcess[bytes]:
    """A shell pipeline with pipefail, so vmforge's exit code is not hidden by cat."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                          timeout=120, **kw)


def vmforge_sh() -> str:
    return " ".join(f"'{c}'" for c in vmforge_cmd())


# -- files: convert and create --------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_convert_to_stream_file(pattern_file, tmp_path, pattern):
    src = pattern_file(pattern)
    out = tmp_path / "out.vmdk"
    vmforge_ok("convert", "-f", "raw", *STREAM, src, out)
    qemu_ok(out, src)
    size = pattern_size(pattern)
    virtual = -(-size // 512) * 512
    assert qemu_img_json("info", "-f", "vmdk", out)["virtual-size"] == virtual
    walked = walk_stream(out.read_bytes())
    expected = pattern_bytes(pattern)
    assert stream_content(walked, size) == expected
    # all-zero grains are not stored; every grain with data is
    assert set(walked["grains"]) == nonzero_grains(expected)
    # the descriptor names the final file, not the temporary one it was written as
    assert 'SPARSE "out.vmdk"' in walked["descriptor"]


def test_qcow2_source_and_qemu_made_reference(tmp_path, pattern_file):
    """From qcow2, and the same content as qemu-img's own streamOptimized output."""
    src = pattern_file("mixed")
    qcow = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, qcow)
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    vmforge_ok("convert", *STREAM, qcow, ours)
    qemu_img("convert", "-f", "raw", *STREAM, src, theirs)
    qemu_ok(ours, qcow, "qcow2")
    cmp_ = qemu_img("compare", "-f", "vmdk", "-F", "vmdk", ours, theirs, check=False)
    assert cmp_.returncode == 0, cmp_.stdout
    # qemu preallocates every table at the front; the stream carries only what is used
    assert ours.stat().st_size < theirs.stat().st_size


@pytest.mark.parametrize("size", ["1G", "1000000", "64M"])
def test_create_empty_stream(tmp_path, size):
    out, ref = tmp_path / "empty.vmdk", tmp_path / "ref.vmdk"
    vmforge_ok("create", "-f", "vmdk", "-o", "subformat=streamOptimized", out, size)
    qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized", ref, size)
    ours, theirs = (qemu_img_json("info", "-f", "vmdk", p) for p in (out, ref))
    assert ours["virtual-size"] == theirs["virtual-size"]  # 1000000 rounds up to 1000448
    assert qemu_img("check", "-f", "vmdk", out, check=False).returncode == 0
    walked = walk_stream(out.read_bytes())
    assert walked["grains"] == {} and not any(walked["gd"])
    mapped = qemu_img_json("map", "-f", "vmdk", out)
    assert all(not e["data"] and e["zero"] for e in mapped), mapped
    cmp_ = qemu_img("compare", "-f", "vmdk", "-F", "vmdk", out, ref, check=False)
    assert cmp_.returncode == 0, cmp_.stdout


def test_tables_follow_their_grains_across_gaps(tmp_path):
    """~128 MiB (sparse) over five grain tables: one table empty (not written, GD entry
    0), data on both sides of table boundaries, the last grain partial."""
    size = 4 * GT_SPAN + 5 * GRAIN + 1536
    src = tmp_path / "gaps.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for off, data in [(0, random_bytes(3 * GRAIN, 1)),
                          (GT_SPAN - GRAIN - 100, text_bytes(GRAIN + 300, 2)),
                          (4 * GT_SPAN - 7, b"boundary-crossing"),
                          (size - 1000, random_bytes(1000, 3))]:
            f.seek(off)
            f.write(data)
    out = tmp_path / "gaps.vmdk"
    vmforge_ok("convert", "-f", "raw", *STREAM, src, out)
    qemu_ok(out, src)
    walked = walk_stream(out.read_bytes())
    assert [bool(e) for e in walked["gd"]] == [True, True, False, True, True]
    assert stream_content(walked, size) == src.read_bytes()


@pytest.mark.parametrize("pattern", ["mixed", "odd_size", "holes"])
def test_read_back_by_vmforge(qemu_made, pattern_file, tmp_path, pattern):
    """qemu-img's streamOptimized and ours, read by vmforge's reader, give the bytes."""
    theirs, their_raw = qemu_made("vmdk", "subformat=streamOptimized", pattern, 4 * MiB)
    got = tmp_path / "theirs.raw"
    vmforge_ok("convert", "-f", "vmdk", "-O", "raw", theirs, got)
    assert_same_bytes(got, their_raw)
    ours = tmp_path / "ours.vmdk"
    vmforge_ok("convert", "-f", "raw", *STREAM, pattern_file(pattern), ours)
    got_ours = tmp_path / "ours.raw"
    vmforge_ok("convert", "-f", "vmdk", "-O", "raw", ours, got_ours)
    assert_same_bytes(got_ours, their_raw)
    check = run_vmforge("check", "-f", "vmdk", ours)
    assert check.returncode == 0, describe(check)


def test_compression_runs_in_the_engine_workers(pattern_file, tmp_path, monkeypatch):
    """Every grain arrives through write_compressed (compressed in worker threads)."""
    calls = {"write": 0, "compressed": 0}
    threads: set[str] = set()
    real_compressor = StreamOptimizedWriter.compressor

    def counting_compressor(self, level=None):
        inner = real_compressor(self, level)

        def compress(unit):
            threads.add(threading.current_thread().name)
            return inner(unit)
        return compress

    def write(self, offset, data):
        calls["write"] += 1

    real_wc = StreamOptimizedWriter.write_compressed

    def write_compressed(self, offset, stored):
        calls["compressed"] += 1
        real_wc(self, offset, stored)

    monkeypatch.setattr(StreamOptimizedWriter, "compressor", counting_compressor)
    monkeypatch.setattr(StreamOptimizedWriter, "write", write)
    monkeypatch.setattr(StreamOptimizedWriter, "write_compressed", write_compressed)
    src = pattern_file("random")  # incompressible: still stored compressed
    ops.convert(str(src), str(tmp_path / "w.vmdk"), "vmdk", src_fmt="raw",
                options={"subformat": "streamOptimized"}, workers=2)
    assert calls == {"write": 0, "compressed": pattern_size("random") // GRAIN}
    assert threads and all(t.startswith("vmforge-copy") for t in threads), threads


def test_writer_refuses_out_of_order(tmp_path):
    w = stream_writer.create_stream_optimized(str(tmp_path / "o.vmdk"), 4 * MiB, {})
    w.write(2 * GRAIN, bytes([1]) * GRAIN)
    with pytest.raises(Exception, match="out of order"):
        w.write(0, bytes([1]) * GRAIN)
    w.abort()


# -- standard output: pipes, a socket, a file redirect -----------------------------------------


def test_stream_through_a_pipe_to_cat(pattern_file, tmp_path):
    src = pattern_file("mixed")
    out = tmp_path / "piped.vmdk"
    proc = sh(f"{vmforge_sh()} convert -f raw {' '.join(STREAM)} '{src}' - | cat > '{out}'")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    qemu_ok(out, src)
    walked = walk_stream(out.read_bytes())
    assert 'SPARSE "stream.vmdk"' in walked["descriptor"]


def test_stream_to_a_file_redirect_and_progress_on_stderr(pattern_file, tmp_path):
    src = pattern_file("text")
    out = tmp_path / "redirected.vmdk"
    with open(out, "wb") as f:
        proc = subprocess.run([*vmforge_cmd(), "convert", "-p", "-f", "raw", *STREAM, src, "-"],
                              stdout=f, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"written" in proc.stderr  # -p's summary and bar went to stderr
    qemu_ok(out, src)
    walk_stream(out.read_bytes())


def test_stream_to_a_socket(pattern_file, tmp_path):
    src = pattern_file("holes")
    ours, theirs = socket.socketpair()
    received = bytearray()

    def reader() -> None:
        while chunk := theirs.recv(1 << 16):
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    with ours:
        proc = subprocess.run([*vmforge_cmd(), "convert", "-f", "raw", *STREAM, src, "-"],
                              stdout=ours.fileno(), stderr=subprocess.PIPE, timeout=120)
        ours.shutdown(socket.SHUT_WR)
    t.join(60)
    theirs.close()
    assert proc.returncode == 0, proc.stderr.decode()
    out = tmp_path / "socket.vmdk"
    out.write_bytes(received)
    qemu_ok(out, src)


def _pipe_into_file(fn, dest: Path, *, nonblocking: bool = False) -> None:
    """Run ``fn(write_fd)`` while a thread drains the pipe into ``dest``.

    A pipe cannot seek: any lseek/pwrite by the writer fails with ESPIPE. With
    ``nonblocking`` the write end is O_NONBLOCK (as ssh leaves its pipes): writes of
    128 KiB into a 64 KiB pipe come back short or with EAGAIN.
    """
    r, w = os.pipe()
    if nonblocking:
        os.set_blocking(w, False)
    with open(dest, "wb") as f:
        def drain() -> None:
            while chunk := os.read(r, 1 << 16):
                f.write(chunk)
        t = threading.Thread(target=drain)
        t.start()
        try:
            fn(w)
        finally:
            os.close(w)
            t.join(60)
            os.close(r)


@pytest.mark.parametrize("pattern", ["odd_size", "zero_runs", "all_zero", "tiny_odd"])
def test_in_process_os_pipe(pattern_file, tmp_path, pattern):
    src = pattern_file(pattern)
    out = tmp_path / "pipe.vmdk"
    _pipe_into_file(lambda fd: ops.convert(str(src), "-", "vmdk", src_fmt="raw",
                                           options={"subformat": "streamOptimized"},
                                           stream_fd=fd), out)
    qemu_ok(out, src)
    walked = walk_stream(out.read_bytes())
    assert stream_content(walked, pattern_size(pattern)) == pattern_bytes(pattern)


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_nonblocking_pipe(pattern_file, tmp_path, fmt):
    src = pattern_file("random")
    out = tmp_path / f"nb.{fmt}"
    options = {"subformat": "streamOptimized"} if fmt == "vmdk" else {}
    _pipe_into_file(lambda fd: ops.convert(str(src), "-", fmt, src_fmt="raw", options=options,
                                           stream_fd=fd), out, nonblocking=True)
    if fmt == "vmdk":
        qemu_ok(out, src)
    else:
        assert_same_bytes(out, src)


@pytest.mark.parametrize("pattern", ["mixed", "holes", "odd_size", "tiny_odd"])
def test_raw_to_a_pipe(pattern_file, tmp_path, pattern):
    """-O raw to standard output: every byte, holes as zeros, sized like qemu's raw."""
    src = pattern_file(pattern)
    qcow = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, qcow)
    expected = convert_raw(qcow, tmp_path / "qemu.raw", fmt="qcow2")
    out = tmp_path / "piped.raw"
    _pipe_into_file(lambda fd: ops.convert(str(qcow), "-", "raw", stream_fd=fd), out)
    assert out.stat().st_size == expected.stat().st_size
    assert_same_bytes(out, expected)
    if pattern == "mixed":  # once through the CLI and a shell pipe
        proc = sh(f"{vmforge_sh()} convert -O raw '{qcow}' - | cat > '{tmp_path / 'sh.raw'}'")
        assert proc.returncode == 0, proc.stderr.decode()
        assert_same_bytes(tmp_path / "sh.raw", expected)


def _truncated_qcow2(tmp_path: Path) -> Path:
    """A 16 MiB qcow2 whose last data clusters lie past its (cut) end."""
    raw = tmp_path / "big.raw"
    raw.write_bytes(text_bytes(16 * MiB, 5))
    qcow = tmp_path / "cut.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    os.truncate(qcow, qcow.stat().st_size - 2 * MiB)
    return qcow


@pytest.mark.parametrize("fmt", ["vmdk", "raw"])
def test_failing_source_mid_stream(tmp_path, fmt):
    """A read error after data went out: non-zero exit, one error line, and the stream
    is visibly short (no end-of-stream marker, no footer)."""
    qcow = _truncated_qcow2(tmp_path)
    out = tmp_path / f"short.{fmt}"
    opts = "-o subformat=streamOptimized" if fmt == "vmdk" else ""
    proc = sh(f"{vmforge_sh()} convert -f qcow2 -O {fmt} {opts} '{qcow}' - | cat > '{out}'")
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmforge: "), proc.stderr
    data = out.read_bytes()
    # the failure came after data went out (a vmdk's header and descriptor are 64 KiB)
    assert len(data) > (1 * MiB if fmt == "raw" else 128 * 1024), len(data)
    if fmt == "raw":
        assert len(data) < 16 * MiB
        return
    tail = data[-1536:]
    val, size, kind = struct.unpack_from("<QII", tail, 0)
    assert (size, kind) != (0, FOOTER) and any(data[-512:]), "footer/EOS written"
    chk = qemu_img("check", "-f", "vmdk", out, check=False)
    assert chk.returncode != 0


def test_broken_pipe_is_a_clean_failure(pattern_file):
    src = pattern_file("random")
    proc = sh(f"{vmforge_sh()} convert -f raw {' '.join(STREAM)} '{src}' - | head -c 1000 "
              "> /dev/null")
    assert proc.returncode != 0
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.decode().count("\n") <= 1, proc.stderr


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, options, kwargs, contains", [
    ("qcow2", {}, {}, "standard output"),
    ("vpc", {}, {}, "standard output"),
    ("vmdk", {}, {}, "streamOptimized"),
    ("vmdk", {"subformat": "monolithicFlat"}, {}, "streamOptimized"),
    ("vmdk", {"subformat": "streamOptimized", "zeroed_grain": "on"}, {}, "zeroed_grain"),
    ("vmdk", {"subformat": "streamOptimized", "adapter_type": "scsi"}, {}, "adapter_type"),
    ("raw", {}, {"skip_create": True}, "-n"),
    ("raw", {"preallocation": "full"}, {}, "preallocation"),
])
def test_formats_that_cannot_stream_refuse(pattern_file, fmt, options, kwargs, contains):
    """Refused with a typed error before a byte reaches the stream."""
    r, w = os.pipe()
    try:
        with pytest.raises(VmforgeError, match=contains) as err:
            ops.convert(str(pattern_file("text")), "-", fmt, src_fmt="raw", options=options,
                        stream_fd=w, **kwargs)
        assert err.value.hint
        os.close(w)
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        with contextlib.suppress(OSError):
            os.close(w)


def test_cli_refusal_is_one_line(pattern_file):
    proc = subprocess.run([*vmforge_cmd(), "convert", "-f", "raw", "-O", "qcow2",
                           pattern_file("text"), "-"],
                          capture_output=True, text=True, timeout=60)
    assert_clean_error(proc, contains="standard output")
    assert proc.stdout == ""


def test_refuses_a_terminal(pattern_file):
    src = pattern_file("text")
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([*vmforge_cmd(), "convert", "-f", "raw", "-O", "raw", src, "-"],
                              stdout=slave, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode != 0, describe(proc)
    assert "terminal" in proc.stderr and "Traceback" not in proc.stderr


def test_in_process_cli_without_a_descriptor(pattern_file):
    """run_vmforge in-process captures stdout in memory: a clean refusal, not a crash."""
    proc = run_vmforge("convert", "-f", "raw", "-O", "raw", pattern_file("text"), "-")
    assert_clean_error(proc, contains="standard output")
