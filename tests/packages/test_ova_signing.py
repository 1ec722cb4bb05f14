"""OVA signatures (NAME.cert): vmforge's signatures checked by the openssl CLI, openssl's
signatures checked by vmforge, and every kind of bad signature refused cleanly."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.qemu import qemu_img
from tests.helpers import (
    assert_clean_error,
    pack_ustar,
    run_vmforge,
    tar_members,
    vmforge_cmd,
    vmforge_json,
    vmforge_ok,
)

MiB = 1 << 20
DIGEST = {"1": "sha1", "2": "sha256"}


def openssl(*args: object, cwd: Path | None = None) -> str:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=True, cwd=cwd).stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """key.pem + cert.pem (and both.pem: key and certificate in one file, as ovftool's
    --privateKey takes them), other.pem (another RSA key), ec.pem, locked.pem."""
    d = tmp_path_factory.mktemp("keys")
    for name, cn in (("", "vmforge test signer"), ("other-", "someone else")):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}key.pem",
                "-out", d / f"{name}cert.pem", "-subj", f"/CN={cn}/O=vmforge tests", "-days", "3")
    (d / "both.pem").write_bytes((d / "key.pem").read_bytes() + (d / "cert.pem").read_bytes())
    openssl("pkey", "-in", d / "key.pem", "-pubout", "-out", d / "pub.pem")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", d / "ec.pem")
    openssl("pkey", "-in", d / "key.pem", "-aes256", "-passout", "pass:secret",
            "-out", d / "locked.pem")
    return d


members = tar_members
pack = pack_ustar


def unsigned(tmp: Path, src: Path, version: str = "2") -> list[tuple[str, bytes]]:
    ova = tmp / f"unsigned-{version}.ova"
    if not ova.exists():
        vmforge_ok("export", src, "-f", "raw", "--target", "vmware", "--ovf-version", version,
                   "--name", "vm", "-o", ova)
    return members(ova)


@pytest.mark.parametrize("version,key_args,to_pipe", [
    ("1", ("--private-key", "both.pem"), False),
    ("2", ("--sign", "key.pem", "--cert", "cert.pem"), False),
    ("2", ("--private-key", "key.pem", "--certificate", "cert.pem"), True),
])
def test_vmforge_signature_verified_by_openssl(tmp_path: Path, keys: Path, version: str,
                                               key_args: tuple[str, ...], to_pipe: bool,
                                               pattern_file: Callable[..., Path]) -> None:
    src = pattern_file("mixed", size=4 * MiB)
    args = ["export", src, "-f", "raw", "--target", "vmware", "--ovf-version", version,
            "--name", "vm", *(a if not a.endswith(".pem") else keys / a for a in key_args)]
    ova = tmp_path / "vm.ova"
    if to_pipe:
        proc = subprocess.run([*vmforge_cmd(), *map(str, args), "-o", "-"],
                              capture_output=True, check=True)
        ova.write_bytes(proc.stdout)
    else:
        out = vmforge_json(*args, "-o", ova)
        assert out["signed_by"] == "O=vmforge tests,CN=vmforge test signer" and out["valid"]
    got = members(ova)
    assert [n for n, _ in got] == ["vm.ovf", "vm.mf", "vm.cert", "vm-disk1.vmdk"]
    x = tmp_path / "x"
    x.mkdir()
    subprocess.run(["tar", "xf", ova, "-C", x], check=True)
    cert = (x / "vm.cert").read_text()
    algo = DIGEST[version].upper()
    first, rest = cert.split("\n", 1)
    m = re.fullmatch(rf"{algo}\(vm\.mf\)= ([0-9a-f]{{512}})", first)
    assert m is not None, first
    assert rest == (keys / "cert.pem").read_text()
    (x / "sig.bin").write_bytes(bytes.fromhex(m.group(1)))
    verified = openssl("dgst", f"-{DIGEST[version]}", "-verify", keys / "pub.pem",
                       "-signature", x / "sig.bin", x / "vm.mf")
    assert verified.strip() == "Verified OK"
    done = vmforge_ok("import", ova, "-o", tmp_path / "imported").stdout
    assert "signed by O=vmforge tests,CN=vmforge test signer (self-signed" in done
    assert f"{algo} signature verified" in done
    assert qemu_img("compare", "-F", "raw", tmp_path / "imported" / "vm-disk1.qcow2", src,
                    check=False).returncode == 0
    assert vmforge_ok("validate", "--target", "vmware", ova).returncode == 0


@pytest.mark.parametrize("layout", ["after-manifest", "at-the-end"])
def test_openssl_signature_verified_by_vmforge(tmp_path: Path, keys: Path, layout: str,
                                               pattern_file: Callable[..., Path]) -> None:
    """A package signed with the openssl CLI, as VMware's guide does it by hand; DSP0243
    lets the manifest and certificate follow the descriptor or end the archive."""
    ovf, mf, disk = unsigned(tmp_path, pattern_file("mixed", size=4 * MiB))
    (tmp_path / "vm.mf").write_bytes(mf[1])
    openssl("dgst", "-sha256", "-sign", keys / "key.pem", "-out", tmp_path / "sig.bin",
            tmp_path / "vm.mf")
    cert = (f"SHA256(vm.mf)= {(tmp_path / 'sig.bin').read_bytes().hex()}\n".encode()
            + (keys / "cert.pem").read_bytes())
    order = [ovf, mf, ("vm.cert", cert), disk] if layout == "after-manifest" else \
        [ovf, disk, mf, ("vm.cert", cert)]
    ova = pack(tmp_path / "signed.ova", order)
    done = vmforge_ok("import", ova, "-o", tmp_path / "out").stdout
    assert "signed by O=vmforge tests,CN=vmforge test signer" in done
    report = vmforge_json("validate", "--target", "vmware", ova, ok_codes=(0, 1))
    broken = {v["rule"] for v in report["violations"]}
    assert broken == (set() if layout == "after-manifest" else {"vmware.ova-order"})


def _resign(mf: bytes, keys: Path, tmp: Path, key: str = "key.pem", name: str = "vm.mf",
            cert: str = "cert.pem") -> bytes:
    (tmp / "m").write_bytes(mf)
    openssl("dgst", "-sha256", "-sign", keys / key, "-out", tmp / "s", tmp / "m")
    return f"SHA256({name})= {(tmp / 's').read_bytes().hex()}\n".encode() + \
        (keys / cert).read_bytes()


BAD = {
    # (how the package is spoiled, what the refusal says)
    "flipped-bit": ("signature", "does not match the manifest"),
    "other-key": ("other-key", "does not match the manifest"),
    "manifest-edited": ("manifest", "does not match the manifest"),
    "other-file": ("name", "signs 'other.mf', not the manifest"),
    "no-certificate": ("nocert", "holds no PEM certificate"),
    "no-manifest": ("nomf", "signs a manifest the package lacks"),
    "garbage-line": ("garbage", "does not start with one line"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_signatures_refused(tmp_path: Path, keys: Path, case: str,
                                pattern_file: Callable[..., Path]) -> None:
    kind, message = BAD[case]
    ovf, mf, disk = unsigned(tmp_path, pattern_file("mixed", size=4 * MiB))
    cert = _resign(mf[1], keys, tmp_path)
    items = [ovf, mf, ("vm.cert", cert), disk]
    if kind == "signature":
        first, rest = cert.split(b"\n", 1)
        last = b"0" if first[-1:] != b"0" else b"1"
        items[2] = ("vm.cert", first[:-1] + last + b"\n" + rest)
    elif kind == "other-key":  # signed by another key, shown with our certificate
        items[2] = ("vm.cert", _resign(mf[1], keys, tmp_path, key="other-key.pem"))
    elif kind == "manifest":  # digests still right, but not the bytes that were signed
        items[1] = ("vm.mf", mf[1] + b"\n")
    elif kind == "name":
        items[2] = ("vm.cert", _resign(mf[1], keys, tmp_path, name="other.mf"))
    elif kind == "nocert":
        items[2] = ("vm.cert", cert.split(b"\n", 1)[0] + b"\n")
    elif kind == "nomf":
        items = [ovf, ("vm.cert", cert), disk]
    else:
        items[2] = ("vm.cert", b"hello\n" + cert)
    ova = pack(tmp_path / "bad.ova", items)
    work = tmp_path / "w"
    work.mkdir()
    proc = run_vmforge("import", *(["--no-manifest"] if kind == "nomf" else []), ova,
                       "-o", work / "out")
    assert_clean_error(proc, contains=message)
    assert list(work.iterdir()) == []
    report = vmforge_json("validate", "--target", "vmware", ova, ok_codes=(1,))
    assert "vmware.signature" in {v["rule"] for v in report["violations"]}


def test_unsigned_package_still_imports(tmp_path: Path, pattern_file: Callable[..., Path]) -> None:
    unsigned(tmp_path, pattern_file("mixed", size=4 * MiB), "1")
    done = vmforge_ok("import", tmp_path / "unsigned-1.ova", "-o", tmp_path / "out").stdout
    assert "unsigned (no certificate file)" in done


@pytest.mark.parametrize("args,message", [
    (("--private-key", "locked.pem"), "encrypted"),
    (("--private-key", "key.pem", "--certificate", "other-cert.pem"), "not the private key's"),
    (("--private-key", "key.pem"), "no PEM certificate found"),
    (("--private-key", "ec.pem", "--certificate", "cert.pem"), "signing keys"),
    (("--private-key", "cert.pem"), "no PEM private key"),
    (("--certificate", "cert.pem"), "--certificate needs --private-key"),
    (("--private-key", "missing.pem"), "cannot read the private key"),
])
def test_signing_mistakes_are_clean_errors(tmp_path: Path, keys: Path, args: tuple[str, ...],
                                           message: str) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(b"\1" * MiB)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_vmforge("export", src, "-f", "raw", "--target", "vmware",
                       *(a if not a.endswith(".pem") else keys / a for a in args),
                       "-o", out / "vm.ova")
    assert_clean_error(proc, contains=message)
    assert list(out.iterdir()) == []


def test_private_key_needs_an_ova(tmp_path: Path, keys: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(b"\1" * MiB)
    proc = run_vmforge("export", src, "-f", "raw", "--target", "vmware", "--private-key",
                       keys / "both.pem", "-o", tmp_path / "d.vmdk")
    assert_clean_error(proc, contains="signs OVA packages")
    assert not (tmp_path / "d.vmdk").exists()
