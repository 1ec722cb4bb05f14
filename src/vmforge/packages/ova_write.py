"""Writing an OVA as a stream: the disk is compressed straight into the package.

References: DMTF DSP0243 2.1.1 section 5.3 (an OVA is a USTAR tar: the .ovf first, then
the manifest and certificate, then the files in References order), 5.1 (manifest
lines ``SHA256(name)= hex``, SHA1 for OVF 1.x), 5.2 (certificate, see ``signing``);
POSIX.1-1988 ustar headers (octal fields; sizes of 8 GiB and more in GNU tar's base-256
form, which GNU tar, bsdtar and Python's tarfile read).

The problem: a tar header states its member's size before the data, and everything
before the disk depends on the disk's last byte (the .ovf carries the disk file's
``ovf:size``, the .mf its digest, the .cert the signature of the .mf). The package is
still written without a temporary copy of the disk, in one of two ways:

* **A seekable destination** (a regular file: ``export -o vm.ova`` writes one under
  ``atomic_output``'s temporary name) takes one pass. The size of everything before the
  disk is known up front: the .mf has fixed-length lines, a .cert has the key's
  signature length, and the .ovf is laid out with the largest disk size a stream can
  have, padded with newlines (XML allows white space after the root element) to the
  same number of 512-byte blocks when the real size has fewer digits. So the disk is
  streamed straight to its place behind that reserved space while its digest is
  computed, and the headers are written into the space afterwards.
* **A pipe** (``dest`` "-": standard output, unless it is redirected to a regular file,
  which is written in place as above) cannot seek back, so the disk is compressed
  twice: a first pass only counts and digests the stream (keeping nothing),
  the headers are sent, and a second pass sends the stream itself. The stream is a
  deterministic function of the source (the same embedded descriptor, CID included, is
  given to both writers; grains are compressed independently, in guest order, at a
  fixed level), so both passes give the same bytes; the second pass's digest is
  checked against the first, and a source that changed in between fails the export.

Both ways keep memory to the copy engine's bounded window whatever the disk size.
The pipe pays for the second compression: measured here on a 200 MiB mixed image, see
docs/export.md. The same padding rule applies to both, so a file and a pipe export of
one source carry the same descriptor.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import stat
import tarfile
import time
from dataclasses import dataclass

from ..engine.copy import ChainSource, copy
from ..errors import OutputError, UsageError
from ..formats.vmdk.stream_writer import MAX_FILE_SECTORS, StreamOptimizedWriter, stream_descriptor
from ..model import align_up
from ..model.hardware import Bus, Disk, Nic, NicModel, VirtualHardware
from ..ops import open_image
from ..ops.output import atomic_output, finishing
from ..util.sink import AppendSink
from .ova import ALGORITHMS
from .ovf import Descriptor
from .ovf_write import descriptor_from_hardware, write_ovf
from .signing import Signer

BLOCK = 512  # a tar block (POSIX ustar)
#: tar writers pad the archive to a whole record of 20 blocks (GNU tar's and Python's
#: default blocking factor); readers that read whole records expect it
RECORD = 20 * BLOCK
#: the largest disk file a stream can be: the .ovf space is reserved for its digits
MAX_DISK_FILE = MAX_FILE_SECTORS * 512
#: ustar's 11 octal digits hold sizes below 8 GiB
USTAR_MAX_OCTAL = 8 ** 11
DISK_OPTIONS = {"subformat": "streamOptimized", "adapter_type": "lsilogic"}


def manifest_line(algo: str, name: str, digest: str) -> str:
    """VMware's strict spelling: ``SHA256(name)= hex``, one space after '='."""
    return f"{algo}({name})= {digest}\n"


def ustar_header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte ustar header of a regular file (mode 0644, owner 0:0, no names).

    A size of 8 GiB or more does not fit ustar's octal field; it is written in GNU
    tar's base-256 form (high bit of the first byte set), keeping the ustar magic.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = 0, mtime, 0o644
    info.uname = info.gname = ""
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    if size < USTAR_MAX_OCTAL:
        block[124:136] = b"%011o\0" % size
    else:
        block[124:136] = ((0x80 << 88) | size).to_bytes(12, "big")
    block[148:156] = b" " * 8  # the checksum is summed with its own field read as spaces
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pad(data: bytes) -> bytes:
    return data + bytes(_padded(len(data)) - len(data))


class _DigestSink(AppendSink):
    """An append-only sink that digests everything it passes on; with ``fd`` -1 it only
    counts and digests (the first pass of an export to a pipe)."""

    def __init__(self, fd: int, algo: str) -> None:
        super().__init__(fd)
        self.digest = hashlib.new(ALGORITHMS[algo])

    def flush(self) -> None:
        for piece in self._pending:
            self.digest.update(piece)
        if self.fd < 0:
            self._pending, self._pending_bytes = [], 0
            return
        super().flush()


@dataclass
class _Package:
    """The names and hardware of one single-disk package, and how its members are made."""

    base: str
    version: str
    hardware: VirtualHardware
    capacity: int
    algo: str
    signer: Signer | None
    mtime: int

    @property
    def disk_name(self) -> str:
        return f"{self.base}-disk1.vmdk"

    def descriptor(self, disk_size: int) -> Descriptor:
        return descriptor_from_hardware(self.hardware, version=self.version, name=self.base,
                                        capacities={self.disk_name: self.capacity},
                                        file_sizes={self.disk_name: disk_size})

    def members(self, disk_size: int, disk_digest: str) -> list[tuple[str, bytes]]:
        """(name, bytes) of every member before the disk, in package order."""
        ovf = write_ovf(self.descriptor(disk_size))
        room = _padded(len(write_ovf(self.descriptor(MAX_DISK_FILE))))
        if _padded(len(ovf)) < room:  # fewer size digits: fill the reserved blocks
            ovf += b"\n" * (room - BLOCK + 1 - len(ovf))
        h = hashlib.new(ALGORITHMS[self.algo], ovf).hexdigest()
        mf = (manifest_line(self.algo, f"{self.base}.ovf", h)
              + manifest_line(self.algo, self.disk_name, disk_digest)).encode()
        out = [(f"{self.base}.ovf", ovf), (f"{self.base}.mf", mf)]
        if self.signer is not None:
            out.append((f"{self.base}.cert",
                        self.signer.cert_file(self.algo, f"{self.base}.mf", mf)))
        return out

    def head(self, disk_size: int, disk_digest: str) -> bytes:
        """Every byte before the disk's data: members, their headers, the disk's header."""
        out = io.BytesIO()
        for name, data in self.members(disk_size, disk_digest):
            out.write(ustar_header(name, len(data), self.mtime))
            out.write(_pad(data))
        out.write(ustar_header(self.disk_name, disk_size, self.mtime))
        return out.getvalue()

    def head_size(self) -> int:
        """``len(head(...))`` for any disk, known before the disk is written."""
        digest = "0" * hashlib.new(ALGORITHMS[self.algo]).digest_size * 2
        return len(self.head(MAX_DISK_FILE, digest))

    def tail(self, start: int, written: int) -> bytes:
        """What follows a disk of ``written`` bytes at archive offset ``start``: its
        padding, two zero blocks (end of archive), then zeros to a whole record."""
        end = start + _padded(written) + 2 * BLOCK
        return bytes(_padded(written) - written + 2 * BLOCK + (-end % RECORD))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _stream_disk(source: ChainSource, pkg: _Package, descriptor: bytes, fd: int,
                 shown: str) -> tuple[int, str]:
    """Compress the source as a streamOptimized VMDK into ``fd`` at its current position
    (``fd`` -1: nowhere); returns the stream's size and digest."""
    sink = _DigestSink(fd, pkg.algo)
    writer = StreamOptimizedWriter(sink, pkg.disk_name, pkg.capacity, descriptor)
    with finishing(writer, shown):
        copy(source, writer)
    return sink.position, sink.digest.hexdigest()


def _one_pass(source: ChainSource, pkg: _Package, descriptor: bytes, fd: int, base: int,
              shown: str) -> int:
    """The package at offset ``base`` of the seekable ``fd``: the disk streamed behind
    the reserved header space, the headers written into it afterwards."""
    reserved = pkg.head_size()
    try:
        os.lseek(fd, base + reserved, os.SEEK_SET)
    except OSError as err:
        raise OutputError(f"{shown}: cannot seek: {err.strerror}") from None
    size, digest = _stream_disk(source, pkg, descriptor, fd, shown)
    head = pkg.head(size, digest)
    if len(head) != reserved:  # the layout promise above; never expected to fail
        raise OutputError(f"internal error: OVA header area is {len(head)} bytes, "
                          f"{reserved} were reserved")
    tail = pkg.tail(reserved, size)
    try:
        _pwrite_all(fd, head, base)
        _pwrite_all(fd, tail, base + reserved + size)
        # whoever writes to the descriptor next appends after the package
        os.lseek(fd, base + reserved + size + len(tail), os.SEEK_SET)
    except OSError as err:
        raise OutputError(f"{shown}: write failed: {err.strerror}") from err
    return size


def _to_file(source: ChainSource, pkg: _Package, descriptor: bytes, path: str,
             shown: str) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise OutputError(f"{shown}: cannot create: {err.strerror}") from None
    try:
        return _one_pass(source, pkg, descriptor, fd, 0, shown)
    finally:
        os.close(fd)


def _seekable_at(fd: int) -> int | None:
    """Where a one-pass package can go when ``fd`` (standard output) is a regular file
    (``-o - > vm.ova``); None for pipes, sockets and O_APPEND files (``>>``), where a
    positioned write would land at the end instead."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or \
                fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return None
        return os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None


def _to_pipe(source: ChainSource, pkg: _Package, descriptor: bytes, fd: int) -> int:
    shown = "standard output"
    size, digest = _stream_disk(source, pkg, descriptor, -1, shown)
    out = AppendSink(fd)
    head = pkg.head(size, digest)
    try:
        out.write(head)
        out.flush()
        sent, sent_digest = _stream_disk(source, pkg, descriptor, fd, shown)
        if (sent, sent_digest) != (size, digest):
            raise OutputError("the source changed while it was exported: the package sent "
                              "does not match its manifest",
                              hint="export from an image nothing writes to (stop its VM)")
        out.write(pkg.tail(len(head), size))
        out.flush()
    except OSError as err:
        raise OutputError(f"{shown}: write failed: {err.strerror or err}") from err
    return size


def export_ova(image: str, dest: str, *, src_fmt: str | None = None, version: str = "1.0",
               name: str | None = None, cpus: int = 1, memory: int = 1 << 30,
               untrusted: bool = False, signer: Signer | None = None,
               stream_fd: int | None = None, mtime: int | None = None) -> Descriptor:
    """Write ``dest`` (an OVA for VMware-compatible targets): the .ovf (``version`` 1.0
    or 2.0), the manifest (SHA1 for 1.0, SHA256 for 2.0), with ``signer`` a certificate
    file signing it, and the disk as a streamOptimized VMDK on an LSI Logic SCSI
    controller, with one E1000 NIC. Returns the descriptor written.

    ``dest`` "-" writes to ``stream_fd`` (a pipe, socket or file: see the module
    docstring for why a pipe costs a second compression). A file appears under
    ``dest`` only when complete; a failed stream is left short. Raises the errors of
    opening the image, OutputError, UsageError.
    """
    base = name or os.path.splitext(os.path.basename(image))[0]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:48].lstrip(".") or "vm"
    if dest == "-" and stream_fd is None:
        raise UsageError("'-' (standard output) needs an output descriptor",
                         hint="give an output file name")
    algo = "SHA1" if version.startswith("1") else "SHA256"
    with open_image(image, src_fmt, untrusted=untrusted) as img:
        capacity = align_up(img.virtual_size, 512)
        disk_name = f"{base}-disk1.vmdk"
        hw = VirtualHardware(cpus=cpus, memory=memory, serial=False,
                             disks=(Disk(disk_name, "vmdk", Bus.SCSI),),
                             nics=(Nic(NicModel.E1000),))
        pkg = _Package(base, version, hw, capacity, algo, signer,
                       int(time.time()) if mtime is None else mtime)
        descriptor = stream_descriptor(capacity, disk_name, DISK_OPTIONS)
        source = ChainSource(img.chain)
        if dest == "-":
            assert stream_fd is not None
            at = _seekable_at(stream_fd)
            if at is not None:
                size = _one_pass(source, pkg, descriptor, stream_fd, at, "standard output")
            else:
                size = _to_pipe(source, pkg, descriptor, stream_fd)
        else:
            with atomic_output(dest) as tmp:
                size = _to_file(source, pkg, descriptor, tmp, dest)
    return pkg.descriptor(size)
