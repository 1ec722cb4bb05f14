"""Hostile VHDX files (../shared/SECURITY.md rows 15, 16, 20): one clean error, bounded memory.

Each case starts from a valid image vmforge wrote and changes one field, re-sealing
the CRC-32C so that the field itself, not the checksum, is what gets judged.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest

import vmforge
from tests.formats.vhdx.helpers import poke_both_region_tables, poke_sealed, region
from tests.helpers import assert_clean_error, poke, run_vmforge, sha256, vmforge_ok
from vmforge import errors
from vmforge.formats.vhdx import structs as S

MiB = 1 << 20
GOOD_SIZE = 4 * MiB
META_ITEMS = 64 * 1024  # vmforge writes the items right after the 64 KiB table
# item offsets inside the metadata region, in the order the writer lays them out
FILE_PARAMS, VIRTUAL_SIZE, LOGICAL = META_ITEMS, META_ITEMS + 8, META_ITEMS + 32


@pytest.fixture(scope="module")
def good(tmp_path_factory, pattern_file) -> Path:
    d = tmp_path_factory.mktemp("vhdx-hostile")
    out = d / "good.vhdx"
    vmforge_ok("convert", "-O", "vhdx", "-o", "block_size=1M", pattern_file("mixed", size=GOOD_SIZE),
               out)
    os.chmod(out, 0o444)
    return out


def _headers(path: Path, at: int, fmt: str, *values: object) -> None:
    for h in (S.HEADER1_OFFSET, S.HEADER2_OFFSET):
        poke_sealed(path, h, S.HEADER_SIZE, at, fmt, *values)


def _metadata(path: Path, at: int, fmt: str, *values: object) -> None:
    meta, _ = region(path, S.METADATA_GUID)
    poke(path, meta + at, fmt, *values)


def _meta_table(path: Path, at: int, fmt: str, *values: object) -> None:
    meta, _ = region(path, S.METADATA_GUID)
    poke(path, meta + at, fmt, *values)  # the metadata table has no checksum (2.6.1)


def _third_region(path: Path, required: int) -> None:
    _, length = region(path, S.METADATA_GUID)
    extra = S.RegionEntry(uuid.uuid4().bytes_le, os.path.getsize(path) - MiB, MiB, required)
    poke_both_region_tables(path, 8, "<I", 3)
    poke_both_region_tables(path, 16 + 2 * 32, "32s", extra.pack())


def _third_item(path: Path, flags: int) -> None:
    _meta_table(path, 10, "<H", 6)
    item = S.MetadataEntry(uuid.uuid4().bytes_le, META_ITEMS, 8, flags).pack()
    _meta_table(path, 32 + 5 * 32, "32s", item)


CASES = {
    "file-signature": (lambda p: poke(p, 0, "8s", b"vhdxfilX"), "vhdxfile", errors.CorruptImage),
    "both-header-crcs": (lambda p: [poke(p, h + 100, "B", 1) for h in
                                    (S.HEADER1_OFFSET, S.HEADER2_OFFSET)],
                         "no valid VHDX header", errors.CorruptImage),
    "both-header-signatures": (lambda p: _headers(p, 0, "4s", b"HEAD"), "no valid VHDX header",
                               errors.CorruptImage),
    "header-version": (lambda p: _headers(p, 66, "<H", 2), "no valid VHDX header",
                       errors.CorruptImage),
    "equal-sequences-differ": (lambda p: [poke_sealed(p, h, S.HEADER_SIZE, 8, "<Q", 7) for h in
                                          (S.HEADER1_OFFSET, S.HEADER2_OFFSET)]
                               and poke_sealed(p, S.HEADER2_OFFSET, S.HEADER_SIZE, 16, "16s",
                                               uuid.uuid4().bytes_le),
                               "same sequence number", errors.CorruptImage),
    "region-count-2048": (lambda p: poke_both_region_tables(p, 8, "<I", 2048), "2047",
                          errors.LimitExceeded),
    "region-count-huge": (lambda p: poke_both_region_tables(p, 8, "<I", 0xFFFFFFFF), "2047",
                          errors.LimitExceeded),
    "region-signatures": (lambda p: poke_both_region_tables(p, 0, "4s", b"REGI"), "'regi'",
                          errors.CorruptImage),
    "region-crcs": (lambda p: [poke(p, t + 1000, "B", 1) for t in
                               (S.REGION_TABLE1_OFFSET, S.REGION_TABLE2_OFFSET)], "CRC-32C",
                    errors.CorruptImage),
    "bat-past-eof": (lambda p: poke_both_region_tables(p, 16 + 16, "<Q", 1 << 40),
                     "past the end", errors.TruncatedImage),
    "bat-length-huge": (lambda p: poke_both_region_tables(p, 16 + 24, "<I", 0xFFFFF000),
                        "past the end", errors.TruncatedImage),
    "regions-overlap": (lambda p: poke_both_region_tables(
        p, 16 + 32 + 16, "<Q", region(p, S.BAT_GUID)[0]), "overlaps", errors.CorruptImage),
    "region-in-header": (lambda p: poke_both_region_tables(p, 16 + 16, "<Q", 0), "overlaps",
                         errors.CorruptImage),
    "unknown-required-region": (lambda p: _third_region(p, 1), "required VHDX region",
                                errors.UnsupportedFeature),
    "metadata-signature": (lambda p: _meta_table(p, 0, "8s", b"METADATA"), "'metadata'",
                           errors.CorruptImage),
    "metadata-count-2048": (lambda p: _meta_table(p, 10, "<H", 2048), "2047",
                            errors.LimitExceeded),
    "metadata-count-max": (lambda p: _meta_table(p, 10, "<H", 0xFFFF), "2047",
                           errors.LimitExceeded),
    "unknown-required-item": (lambda p: _third_item(p, S.META_IS_REQUIRED),
                              "required VHDX metadata item", errors.UnsupportedFeature),
    "item-outside-region": (lambda p: _meta_table(p, 32 + 16, "<I", 0xFFFFFFF0),
                            "outside the metadata region", errors.CorruptImage),
    "duplicate-item": (lambda p: _meta_table(p, 32 + 32, "16s", S.FILE_PARAMETERS_GUID),
                       "twice", errors.CorruptImage),
    "block-size-3M": (lambda p: _metadata(p, FILE_PARAMS, "<I", 3 * MiB), "block size",
                      errors.CorruptImage),
    "block-size-512K": (lambda p: _metadata(p, FILE_PARAMS, "<I", 512 * 1024), "block size",
                        errors.CorruptImage),
    "block-size-512M": (lambda p: _metadata(p, FILE_PARAMS, "<I", 512 * MiB), "block size",
                        errors.CorruptImage),
    "block-size-0": (lambda p: _metadata(p, FILE_PARAMS, "<I", 0), "block size",
                     errors.CorruptImage),
    "virtual-size-2^63": (lambda p: _metadata(p, VIRTUAL_SIZE, "<Q", 1 << 63), "64 TiB",
                          errors.LimitExceeded),
    "virtual-size-max": (lambda p: _metadata(p, VIRTUAL_SIZE, "<Q", (1 << 64) - 512), "64 TiB",
                         errors.LimitExceeded),
    "bat-too-small": (lambda p: _metadata(p, VIRTUAL_SIZE, "<Q", 60 << 40), "too small",
                      errors.CorruptImage),
    "odd-virtual-size": (lambda p: _metadata(p, VIRTUAL_SIZE, "<Q", GOOD_SIZE + 1),
                         "multiple", errors.CorruptImage),
    "logical-sector-1024": (lambda p: _metadata(p, LOGICAL, "<I", 1024), "logical sector",
                            errors.CorruptImage),
    "parent-without-locator": (lambda p: _metadata(p, FILE_PARAMS + 4, "<I", S.PARAMS_HAS_PARENT),
                               "parent locator", errors.CorruptImage),
    "log-version": (lambda p: _headers(p, 64, "<H", 1), "log version", errors.CorruptImage),
    "log-offset-misaligned": (lambda p: _headers(p, 72, "<Q", MiB + 4096), "log offset",
                              errors.CorruptImage),
    "log-length-huge": (lambda p: _headers(p, 48, "16s", uuid.uuid4().bytes_le)
                        or _headers(p, 68, "<I", 0xFFF00000), "log of", errors.LimitExceeded),
    "log-past-eof": (lambda p: _headers(p, 48, "16s", uuid.uuid4().bytes_le)
                     or _headers(p, 72, "<Q", 1 << 40), "past the end", errors.TruncatedImage),
    "bat-entry-state-4": (lambda p: poke(p, region(p, S.BAT_GUID)[0], "<Q", (16 << 20) | 4),
                          "state", errors.CorruptImage),
    "partial-without-parent": (lambda p: poke(p, region(p, S.BAT_GUID)[0], "<Q",
                                              (16 << 20) | S.PAYLOAD_BLOCK_PARTIALLY_PRESENT),
                               "without a parent", errors.CorruptImage),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_field(good, tmp_path, case):
    mutate, words, exc = CASES[case]
    bad = tmp_path / f"{case}.vhdx"
    shutil.copyfile(good, bad)
    os.chmod(bad, 0o644)
    mutate(bad)
    before = sha256(bad)
    # counts and sizes that would make a naive parser allocate run under a memory cap
    capped = exc is errors.LimitExceeded or "huge" in case or "small" in case
    proc = run_vmforge("convert", "-f", "vhdx", "-O", "raw", bad, tmp_path / "out.raw",
                       **({"isolated": True, "mem_limit": 1 << 30, "timeout": 60} if capped else {}))
    assert_clean_error(proc, contains=words)
    assert not (tmp_path / "out.raw").exists()
    with pytest.raises(exc), vmforge.open_image(str(bad), "vhdx") as img:
        img.read(0, img.virtual_size)
    assert sha256(bad) == before, "a hostile input is never written"


def test_one_bad_header_falls_back(good, tmp_path):
    """A torn header update leaves one valid header: that one is used (2.2.2)."""
    bad = tmp_path / "torn.vhdx"
    shutil.copyfile(good, bad)
    os.chmod(bad, 0o644)
    poke(bad, S.HEADER2_OFFSET + 100, "B", 1)  # the current (higher sequence) header
    with vmforge.open_image(str(good)) as a, vmforge.open_image(str(bad)) as b:
        assert a.read(0, GOOD_SIZE) == b.read(0, GOOD_SIZE)


def test_one_bad_region_table_falls_back(good, tmp_path):
    bad = tmp_path / "region1.vhdx"
    shutil.copyfile(good, bad)
    os.chmod(bad, 0o644)
    poke(bad, S.REGION_TABLE1_OFFSET + 100, "B", 1)
    vmforge_ok("compare", good, bad)


# truncation: inside every fixed structure, at the metadata and BAT, and in the data
TRUNCATE_AT = [0, 7, 8, 4096, 65536, 65536 + 80, 131072 + 4095, 196608 + 16, 262144 + 65535,
               MiB - 1, MiB, 2 * MiB + 8, 3 * MiB + 4, 3 * MiB + 65536 + 20, 8 * MiB,
               8 * MiB + 12345]


@pytest.mark.parametrize("length", TRUNCATE_AT)
def test_truncated(good, tmp_path, length):
    cut = tmp_path / "cut.vhdx"
    with open(good, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(length))
    proc = run_vmforge("convert", "-f", "vhdx", "-O", "raw", cut, tmp_path / "x.raw")
    assert_clean_error(proc)
    with pytest.raises(errors.CorruptImage), vmforge.open_image(str(cut), "vhdx") as img:
        img.read(0, img.virtual_size)  # TruncatedImage is a CorruptImage


def test_hostile_log_entries_are_not_replayed(good, tmp_path):
    """A log GUID with garbage in the log: no valid entry, so nothing to replay (as qemu)."""
    bad = tmp_path / "garbage-log.vhdx"
    shutil.copyfile(good, bad)
    os.chmod(bad, 0o644)
    log_guid = uuid.uuid4().bytes_le
    _headers(bad, 48, "16s", log_guid)
    # an entry header that claims the whole log, with a wrong checksum and absurd counts
    entry = S.LOG_ENTRY_HEADER.pack(S.LOG_ENTRY_SIGNATURE, 0, MiB, 0, 1, 0xFFFFFFFF, 0, log_guid,
                                    0, 0)
    poke(bad, MiB, f"{len(entry)}s", entry)
    vmforge_ok("compare", good, bad)
    vmforge_ok("compare", "--replay-log", good, bad)


def test_log_entry_checksum_guards_replay(good, tmp_path):
    """A well-formed entry replays; the same entry with one byte changed does not."""
    target = region(good, S.BAT_GUID)[0]
    log_guid = uuid.uuid4().bytes_le
    data = S.PAYLOAD_BLOCK_ZERO.to_bytes(8, "little") * 512  # a BAT page: every block ZERO
    head = S.LOG_ENTRY_HEADER.pack(S.LOG_ENTRY_SIGNATURE, 0, 8192, 0, 5, 1, 0, log_guid,
                                   os.path.getsize(good), os.path.getsize(good))
    desc = S.LOG_DESCRIPTOR.pack(S.LOG_DESC_SIGNATURE, data[4092:], data[:8], target, 5)
    sector = S.LOG_DATA_SEQ_HIGH.pack(S.LOG_DATA_SIGNATURE, 0) + data[8:4092] + \
        struct.pack("<I", 5)
    entry = S.seal((head + desc).ljust(4096, b"\0") + sector)
    for name, blob, replayed in (("ok", entry, True), ("bad", entry[:5000] + b"X" + entry[5001:],
                                                       False)):
        path = tmp_path / f"{name}.vhdx"
        shutil.copyfile(good, path)
        os.chmod(path, 0o644)
        _headers(path, 48, "16s", log_guid)
        poke(path, MiB, f"{len(blob)}s", blob)
        if replayed:
            assert_clean_error(run_vmforge("info", path), contains="log needs replay")
            with vmforge.open_image(str(path), replay_log=True) as img:
                # the logged BAT page is in force: the disk now reads as zeros
                assert img.read(0, GOOD_SIZE) == bytes(GOOD_SIZE)
            with vmforge.open_image(str(good)) as img:
                assert img.read(0, GOOD_SIZE) != bytes(GOOD_SIZE)
        else:
            vmforge_ok("info", path)
