"""util.fileio.Coalesced: pieces of one buffer or file span, written in as few calls as
the layout allows, with the bytes each piece asked for at the offset it asked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmforge.util import fileio
from vmforge.util.fileio import Coalesced, FileSpan


@pytest.mark.parametrize("as_span", [False, True])
def test_pieces_join_only_where_data_and_file_both_continue(tmp_path: Path, monkeypatch,
                                                            as_span: bool) -> None:
    data = os.urandom(64 << 10)
    src = tmp_path / "src"
    src.write_bytes(data)
    calls: list[tuple[int, int]] = []
    real = fileio.pwrite_all

    def counting(fd: int, piece: fileio.WriteData, offset: int) -> None:
        calls.append((offset, len(piece)))
        real(fd, piece, offset)

    monkeypatch.setattr(fileio, "pwrite_all", counting)
    # (start in data, length, file offset): 0-2 continue each other; 3 skips ahead in
    # the file; 4 goes back in the data; 5 continues 4
    pieces = [(0, 4096, 8192), (4096, 4096, 12288), (8192, 8192, 16384),
              (16384, 4096, 65536), (32768, 4096, 69632), (36864, 8192, 73728)]
    src_fd = os.open(src, os.O_RDONLY)
    out_fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        view = FileSpan(src_fd, 0, len(data)) if as_span else memoryview(data)
        out = Coalesced(out_fd, view)
        for start, n, at in pieces:
            out.add(start, n, at)
        out.flush()
        out.flush()  # nothing left: no call
    finally:
        os.close(src_fd)
        os.close(out_fd)
    assert calls == [(8192, 16384), (65536, 4096), (69632, 12288)]
    written = (tmp_path / "out").read_bytes()
    for start, n, at in pieces:
        assert written[at:at + n] == data[start:start + n]
