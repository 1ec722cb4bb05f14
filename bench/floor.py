"""The kernel copy floor: the least a process can spend writing a disk's data to a new file.

    python3 -S bench/floor.py SOURCE OUTPUT

Copies the data ranges of SOURCE (SEEK_DATA/SEEK_HOLE) to the same offsets of a new
sparse OUTPUT, the fastest way found on this machine, and nothing else: no format, no
zero detection, no Python beyond a loop over 4 MiB pieces (``-S``: no site packages,
start-up ~10 ms, like qemu-img's). An uncompressed conversion writes about as many bytes
(the benchmark's qcow2, VHD, VDI, VMDK and VHDX outputs are within 0.1 % of their
source's data), so no converter can beat this time by much, whatever its language.

How it copies, and why (2 GiB mixed image, 1.4 GiB of data, in the page cache, 2 cores;
medians of 7 interleaved runs, best run in brackets; 2026-11-27):
- copy_file_range from one thread, each 4 MiB piece's blocks reserved first with
  fallocate: 0.44-0.45 s (0.36-0.41). Without the fallocate 0.64 s (0.55): ext4's
  delayed allocation reserves and maps block by block inside the write.
- The same from two threads: 0.46 s (0.42), no faster: a buffered write holds the
  file's inode lock, so writes into one file take turns.
- pread + pwrite from two threads (qemu-img's model), the file reserved first:
  0.45 s (0.39); with 4 MiB writes and no reservation, 1.7 s.
- One thread reading ahead while another writes: 0.40-1.24 s depending on the minute
  with 512 KiB-4 MiB writes (large page-cache folios are cheap, then stall in
  compaction), 0.46 s with 128 KiB writes.
- Writing through a shared mapping of the output (page faults, which take no inode
  lock, instead of write calls): 1.7-3.5 s.
- O_DIRECT writes go to the virtual disk: 0.8-1.0 GB/s, slower than the page cache.
Run to run this machine varies 2-5x when the page cache is full (writes must reclaim
memory first): compare the floor with the tools in the same run only.
"""

import os
import sys

PIECE = 4 << 20


def data_ranges(fd, size):
    """(start, end) of each data range of an open file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def copy(src, dst):
    fd = os.open(src, os.O_RDONLY)
    size = os.fstat(fd).st_size
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for start, end in data_ranges(fd, size):
        for pos in range(start, end, PIECE):
            n = min(PIECE, end - pos)
            os.posix_fallocate(out, pos, n)
            done = 0
            while done < n:
                k = os.copy_file_range(fd, out, n - done, pos + done, pos + done)
                if k == 0:
                    raise OSError(f"{src} ended early at {pos + done}")
                done += k
    os.ftruncate(out, size)
    os.close(out)
    os.close(fd)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    copy(sys.argv[1], sys.argv[2])
