"""cloud-init NoCloud seed ISO: well formed (read back by pycdlib, and by isoinfo when
installed), and attached to the VM read-only as a CD-ROM with an explicit format."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pycdlib
import pytest

from tests.helpers import assert_clean_error, run_vmforge, vmforge_ok
from vmforge.errors import UsageError
from vmforge.runtime.cloudinit import Seed, check_hostname, read_user_data, ssh_key, write_seed
from vmforge.runtime.machine import Machine
from vmforge.runtime.state import VmState

from .conftest import qemu_processes

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZtZm9yZ2V0ZXN0a2V5dGVzdGtleXRlc3RrZXk= me@host"


def _read(iso_path, name: str) -> tuple[bytes, bytes]:
    """``name`` read back by its Rock Ridge and by its Joliet name."""
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        out = []
        for kwargs in ({"rr_path": f"/{name}"}, {"joliet_path": f"/{name}"}):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, **kwargs)
            out.append(buf.getvalue())
        return out[0], out[1]
    finally:
        iso.close()


def test_seed_is_well_formed(tmp_path):
    seed = Seed("vmforge-x", b"#cloud-config\npackages: [htop]\n", "web-1", (KEY,))
    path = tmp_path / "seed.iso"
    write_seed(seed, path)
    rr, joliet = _read(path, "user-data")
    assert rr == joliet == seed.user_data
    rr, joliet = _read(path, "meta-data")
    assert rr == joliet
    assert json.loads(rr) == {"instance-id": "vmforge-x", "local-hostname": "web-1",
                              "public-keys": [KEY]}
    assert path.stat().st_size % 2048 == 0 and path.read_bytes()[0x8001:0x8006] == b"CD001"
    if shutil.which("isoinfo"):
        out = subprocess.run(["isoinfo", "-d", "-i", str(path)], capture_output=True, text=True,
                             check=True).stdout
        assert "Volume id: cidata" in out


def test_seed_inputs(tmp_path):
    pub = tmp_path / "id.pub"
    pub.write_text(KEY + "\n")
    assert ssh_key(str(pub)) == KEY == ssh_key(KEY)
    priv = tmp_path / "id"
    priv.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxxx\n")
    with pytest.raises(UsageError, match="private key"):
        ssh_key(str(priv))
    with pytest.raises(UsageError, match="not an OpenSSH public key"):
        ssh_key("hello")
    for bad in ("-web", "a_b", "x" * 64, "a..b"):
        with pytest.raises(UsageError, match="invalid hostname"):
            check_hostname(bad)
    assert check_hostname("web-1.example") == "web-1.example"
    plain = tmp_path / "plain.yaml"
    plain.write_text("packages: [htop]\n")
    with pytest.raises(UsageError, match="not cloud-init user-data"):
        read_user_data(str(plain))
    with pytest.raises(UsageError, match="cannot read"):
        read_user_data(str(tmp_path / "missing"))


def test_seed_is_attached_read_only_as_raw_cdrom(guest, vm_root, tmp_path):
    """QEMU is asked (query-block) while the VM runs; no boot wait needed."""
    base = tmp_path / "base.raw"
    shutil.copyfile(guest.rootfs, base)
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\nruncmd: [echo hi]\n")
    vmforge_ok("run", "--detach", "--no-wait", "-f", "raw", "--name", "ci", "--net", "none",
               "--memory", "128M", "--kernel", guest.kernel, "--cloud-init", user_data,
               "--ssh-key", KEY, "--hostname", "seeded", base)
    st = VmState(vm_root / "ci")
    iso = st.dir / "seed.iso"
    blocks = {b["inserted"]["node-name"]: b for b in Machine(st).qmp("query-block")
              if b.get("inserted")}
    cd = blocks["disk1"]
    assert cd["inserted"]["ro"] is True and cd["inserted"]["image"]["format"] == "raw"
    assert cd["inserted"]["file"] == str(iso) and cd["removable"] is True  # a CD-ROM
    rr, _ = _read(iso, "meta-data")
    assert json.loads(rr) == {"instance-id": "vmforge-ci", "local-hostname": "seeded",
                              "public-keys": [KEY]}
    assert _read(iso, "user-data")[0] == user_data.read_bytes()
    # a clone gets its own copy of the seed
    vmforge_ok("vm", "kill", "ci")
    vmforge_ok("vm", "clone", "ci", "ci2")
    shown = json.loads(vmforge_ok("vm", "show", "ci2", "--output", "json").stdout)
    assert [d["path"] for d in shown["disks"]] == [str(vm_root / "ci2" / "disk0.qcow2"),
                                                   str(vm_root / "ci2" / "seed.iso")]
    for name in ("ci", "ci2"):
        vmforge_ok("vm", "rm", name)
    assert not qemu_processes(vm_root)


@pytest.mark.parametrize(("args", "contains"), [
    (["--ssh-key", "nonsense"], "not an OpenSSH public key"),
    (["--hostname", "bad_name"], "invalid hostname"),
    (["--cloud-init", "/nonexistent/user-data"], "cannot read the cloud-init file"),
])
def test_bad_seed_options(vm_root, tmp_path, args, contains):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    assert_clean_error(run_vmforge("run", "--detach", "--name", "bad", *args, base),
                       contains=contains)
    assert not (vm_root / "bad").exists()
