"""Inside the guest: it reads the cloud-init seed, and traffic crosses a --forward.

One boot checks both (TCG boots are expensive): the guest finds the CD-ROM labelled
``cidata``, mounts it read-only, takes its hostname from the seed's meta-data and
prints what it read on the serial console; then it serves a page over HTTP on port 80,
which the host reaches through ``--forward PORT:80`` on user-mode NAT. The page names
a token only the guest's kernel command line carries, the guest's kernel release and
the hostname it took from the seed, so the reply cannot come from anywhere else.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import shutil
import socket
import time
import urllib.request

import pytest

from tests.helpers import vmforge_json, vmforge_ok
from vmforge.runtime.machine import Machine
from vmforge.runtime.state import VmState

from .conftest import free_port, qemu_processes, wait_serial

#: QEMU's user-mode network (slirp) defaults: the guest address its host forwards connect
#: to, and the gateway
SLIRP_GUEST = "10.0.2.15/24"
SLIRP_GATEWAY = "10.0.2.2"


def fetch(url: str, timeout: float) -> str:
    """GET ``url``, retrying while the guest is not serving yet (slirp accepts the host
    connection first and drops it if the guest side refuses)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def serial_value(log: str, key: str) -> str:
    """The rest of the one serial line that starts with ``key `` (exactly one must)."""
    values = [line[len(key) + 1:].rstrip("\r") for line in log.splitlines()
              if line.startswith(key + " ")]
    assert len(values) == 1, (key, log)
    return values[0]


@pytest.mark.vm
def test_guest_reads_seed_and_answers_through_forward(guest, vm_root, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    token = secrets.token_hex(8)
    hostname = f"seeded-{token[:6]}"
    first_line = f"#cloud-config  # vmforge test {token}"
    user_data = tmp_path / "user-data"
    user_data.write_text(f"{first_line}\nruncmd:\n  - [echo, '{token}']\n")
    port = free_port()
    started = vmforge_json(
        "run", "--detach", "-f", "raw", "--name", "seednet", "--memory", "256M",
        "--cloud-init", user_data, "--hostname", hostname, "--forward", f"{port}:80",
        "--kernel", guest.kernel, "--initrd", guest.initrd,
        "--append", guest.append("vmforge.seed=1", f"vmforge.ip={SLIRP_GUEST}",
                                 f"vmforge.gw={SLIRP_GATEWAY}", f"vmforge.http={token}"),
        base)
    st = VmState(vm_root / "seednet")
    try:
        assert started["marker"] == "VMFORGE-GUEST-UP"
        # attached read-only, with its format stated: QEMU's own view, and the command line
        cds = [b["inserted"] for b in Machine(st).qmp("query-block")
               if b.get("inserted") and b["inserted"]["file"] == str(st.dir / "seed.iso")]
        assert len(cds) == 1 and cds[0]["ro"] is True and cds[0]["image"]["format"] == "raw"
        argv = st.read_spec()["command"]
        (node,) = [json.loads(argv[i + 1]) for i, a in enumerate(argv[:-1])
                   if a == "-blockdev" and "seed.iso" in argv[i + 1]]
        assert node["driver"] == "raw" and node["read-only"] is True
        assert node["file"]["read-only"] is True

        log = wait_serial(st.serial_path, ("VMFORGE-SEED-DEVICE", "VMFORGE-HTTP-"), 150)
        assert "VMFORGE-SEED-FAILED" not in log and "VMFORGE-HTTP-FAILED" not in log, log
        assert serial_value(log, "VMFORGE-SEED") == f"hostname={hostname}"
        assert serial_value(log, "VMFORGE-USERDATA") == first_line
        assert serial_value(log, "VMFORGE-USERDATA-SHA256") == \
            hashlib.sha256(user_data.read_bytes()).hexdigest()
        # the guest sees a read-only CD-ROM (the SCSI CD-ROM driver's sr device)
        device = serial_value(log, "VMFORGE-SEED-DEVICE")
        assert device.startswith("/dev/sr") and device.endswith(" ro=1"), device
        assert "VMFORGE-HTTP-SERVING" in log, log

        page = fetch(f"http://127.0.0.1:{port}/", timeout=60)
        assert page == (f"VMFORGE-HTTP token={token} osrelease={guest.kernel_version} "
                        f"hostname={hostname}\n")
    finally:
        vmforge_ok("vm", "rm", "--force", "seednet")
    assert not qemu_processes(vm_root)
    # the forward went away with the VM
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
