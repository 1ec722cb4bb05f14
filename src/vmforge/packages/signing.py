"""OVF package signatures: the certificate file (``NAME.cert``) that signs the manifest.

References: DMTF DSP0243 2.1.1 section 5.2 (the certificate file carries the signed
digest of the manifest and the X.509 certificate) and 5.3 (in an OVA the manifest and
certificate either both follow the descriptor or both end the archive); VMware "OVF
Tool User's Guide", "OVF Package Signing" (ovftool's ``--privateKey``: the layout is one
line ``SHA256(NAME.mf)= <hex signature>`` followed by the PEM certificate, and the
signature is what ``openssl dgst -sha256 -sign KEY NAME.mf`` writes: RSASSA-PKCS1-v1_5
over the manifest's bytes). VirtualBox reads the same layout (ApplianceImplImport.cpp).

What is verified: the signature over the manifest, with the public key of the first
certificate in the file. What is not: a chain of trust. vmforge has no trust store; it
reports the certificate's subject and issuer and whether it is self-signed or expired,
as ovftool does, and leaves trusting that signer to the user.

All cryptography comes from the ``cryptography`` package; nothing is hand-written.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..errors import CorruptImage, UnsupportedFeature, UsageError

#: key and certificate files are a few KiB; a certificate member is capped the same way
MAX_PEM = 1 << 20
#: the digests a signature line may name, as DSP0243 manifests spell them
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA1": hashes.SHA1, "SHA256": hashes.SHA256, "SHA512": hashes.SHA512}
_SIG_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\(([^()]+)\)= ?([0-9a-fA-F]+)$")
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
#: RSA keys shorter than this are refused for signing (NIST SP 800-131A: 2048 bits)
MIN_RSA_BITS = 2048


class SignatureError(CorruptImage):
    """A certificate file that does not sign the package's manifest."""

    hint = "the package was altered after it was signed, or its .cert belongs to another package"


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a package, as its certificate says (not checked against any trust store)."""

    algorithm: str
    subject: str
    issuer: str
    self_signed: bool
    not_after: str
    expired: bool

    def to_dict(self) -> dict[str, object]:
        return {"algorithm": self.algorithm, "subject": self.subject, "issuer": self.issuer,
                "self_signed": self.self_signed, "not_after": self.not_after,
                "expired": self.expired, "trusted": None}


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as err:
        raise UsageError(f"{path}: cannot read the {what}: {err.strerror}") from None
    if len(data) > MAX_PEM:
        raise UsageError(f"{path}: the {what} file is over {MAX_PEM} bytes",
                         hint="give a PEM file holding one key or certificate")
    return data


class Signer:
    """An RSA private key and its certificate, ready to sign manifests.

    ``key_path`` is a PEM private key; like ovftool's ``--privateKey`` file it may also
    hold the certificate, else ``cert_path`` names it. Raises UsageError for unreadable
    or encrypted keys, a certificate that does not match the key, and
    UnsupportedFeature for keys other than RSA.
    """

    def __init__(self, key_path: str, cert_path: str | None = None) -> None:
        key_pem = _read_pem(key_path, "private key")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise UsageError(f"{key_path}: the private key is encrypted",
                             hint="give an unencrypted key (openssl pkey -in KEY -out PLAIN)"
                             ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise UsageError(f"{key_path}: no PEM private key could be read",
                             hint="a signing key looks like '-----BEGIN PRIVATE KEY-----'"
                             ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise UnsupportedFeature(f"{type(key).__name__.removeprefix('_')} signing keys",
                                     path=key_path, hint="OVF signatures use RSA keys")
        if key.key_size < MIN_RSA_BITS:
            raise UsageError(f"{key_path}: a {key.key_size}-bit RSA key is too weak to sign with",
                             hint=f"use a key of at least {MIN_RSA_BITS} bits")
        cert_source = cert_path or key_path
        cert_pem = _read_pem(cert_path, "certificate") if cert_path else key_pem
        start = cert_pem.find(_PEM_CERT)
        if start < 0:
            raise UsageError(f"{cert_source}: no PEM certificate found",
                             hint="give the signer's certificate with --certificate CERT.pem")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem[start:])
        except ValueError as err:
            raise UsageError(f"{cert_source}: the certificate cannot be read: {err}") from None
        if cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise UsageError(f"{cert_source}: the certificate is not the private key's",
                             hint="give the certificate issued for this key")
        self.key = key
        self.certificate = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    @property
    def signature_bytes(self) -> int:
        return (self.key.key_size + 7) // 8

    def cert_file_size(self, algo: str, mf_name: str) -> int:
        """The exact length of the certificate file ``cert_file`` will return, known
        before the manifest is (an RSA signature is always the key's length)."""
        return len(f"{algo}({mf_name})= ") + 2 * self.signature_bytes + 1 + len(self.cert_pem)

    def cert_file(self, algo: str, mf_name: str, manifest: bytes) -> bytes:
        """The certificate file signing ``manifest`` (the bytes of member ``mf_name``)."""
        signature = self.key.sign(manifest, padding.PKCS1v15(), HASHES[algo]())
        return f"{algo}({mf_name})= {signature.hex()}\n".encode() + self.cert_pem


def load_signer(key_path: str | None, cert_path: str | None) -> Signer | None:
    """A Signer when a key is given; a certificate without a key is a usage error."""
    if key_path is None:
        if cert_path is not None:
            raise UsageError("--certificate needs --private-key", hint="give the signing key")
        return None
    return Signer(os.fspath(key_path), cert_path)


def verify_cert_file(text: bytes, mf_name: str, manifest: bytes, path: str) -> SignatureInfo:
    """Check that ``text`` (a .cert member) signs ``manifest`` (member ``mf_name``).

    Raises SignatureError for a malformed file, a signature naming another file or one
    that does not verify, and UnsupportedFeature for non-RSA certificates.
    """
    start = text.find(_PEM_CERT)
    if start < 0:
        raise SignatureError("the certificate file holds no PEM certificate", path=path)
    try:
        head = text[:start].decode("ascii")
    except UnicodeDecodeError:
        raise SignatureError("the certificate file's signature line is not ASCII",
                             path=path) from None
    lines = [ln.strip() for ln in head.splitlines() if ln.strip()]
    matches = [m for m in map(_SIG_LINE.match, lines) if m is not None]
    if len(lines) != 1 or len(matches) != 1:
        raise SignatureError("the certificate file does not start with one line "
                             "'SHA256(NAME.mf)= <hex signature>'", path=path)
    algo, name, hexsig = matches[0].groups()
    if name != mf_name:
        raise SignatureError(f"the certificate file signs {name!r}, not the manifest "
                             f"{mf_name!r}", path=path)
    if len(hexsig) % 2:
        raise SignatureError("the signature is not a whole number of bytes", path=path)
    try:
        cert = x509.load_pem_x509_certificate(text[start:])
    except ValueError as err:
        raise SignatureError(f"the certificate cannot be read: {err}", path=path) from None
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise UnsupportedFeature(f"{type(public).__name__.removeprefix('_')} package signatures",
                                 path=path, hint="vmforge verifies RSA signatures")
    try:
        public.verify(bytes.fromhex(hexsig), manifest, padding.PKCS1v15(), HASHES[algo]())
    except InvalidSignature:
        raise SignatureError(f"the {algo} signature in the certificate file does not match "
                             "the manifest", path=path) from None
    now = _dt.datetime.now(_dt.UTC)
    not_after = cert.not_valid_after_utc
    return SignatureInfo(algo, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                         cert.subject == cert.issuer, not_after.isoformat(), not_after < now)
