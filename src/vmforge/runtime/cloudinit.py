"""cloud-init NoCloud seed: an ISO 9660 image labelled ``cidata`` (built with pycdlib).

cloud-init's NoCloud data source looks for a file system with the volume label
``cidata`` holding ``user-data`` and ``meta-data`` (cloud-init docs, "NoCloud"). The
ISO carries Rock Ridge and Joliet names so the lower-case, hyphenated names survive
(plain ISO 9660 level 1 would make them ``USERDATA.;1``).

``meta-data`` is written as JSON, which is YAML too (cloud-init reads it with a YAML
loader): ``instance-id`` (new per VM, so cloud-init runs on first boot of each clone),
``local-hostname`` from ``--hostname``, and ``public-keys`` from ``--ssh-key`` (the
NoCloud source hands metadata ``public-keys`` to the default user's authorized_keys).
``user-data`` is the ``--cloud-init`` file as given, or an empty ``#cloud-config``.
The seed is attached to the VM read-only, as a CD-ROM with ``format=raw`` stated.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pycdlib

from ..errors import UsageError

VOLUME_LABEL = "cidata"
#: user-data beyond this is not a config but a mistake (cloud-init's own limit is larger)
MAX_USER_DATA = 1 << 20
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_KEY = re.compile(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|"
                  r"sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/=]+( [^\r\n]*)?$")


@dataclass(frozen=True)
class Seed:
    """What goes into a NoCloud seed."""

    instance_id: str
    user_data: bytes = b"#cloud-config\n"
    hostname: str | None = None
    ssh_keys: tuple[str, ...] = ()

    def meta_data(self) -> bytes:
        meta: dict[str, object] = {"instance-id": self.instance_id}
        if self.hostname:
            meta["local-hostname"] = self.hostname
        if self.ssh_keys:
            meta["public-keys"] = list(self.ssh_keys)
        return (json.dumps(meta, indent=2) + "\n").encode()


def read_user_data(path: str) -> bytes:
    """The ``--cloud-init`` file; raises UsageError (missing, too big, not a user-data)."""
    try:
        size = os.stat(path).st_size
        if size > MAX_USER_DATA:
            raise UsageError(f"{path}: {size} bytes is too big for cloud-init user-data",
                             hint=f"at most {MAX_USER_DATA} bytes")
        data = Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read the cloud-init file: {err.strerror}") from None
    # cloud-init acts on a user-data by its first line; anything else is silently ignored
    # by the guest, which is worse than refusing here
    if not data.startswith((b"#cloud-config", b"#!", b"#include", b"#cloud-boothook",
                            b"Content-Type: multipart/")):
        raise UsageError(f"{path} is not cloud-init user-data",
                         hint="start it with '#cloud-config' (or '#!' for a script)")
    return data


def ssh_key(value: str) -> str:
    """``--ssh-key``: a public key, or a file holding one; raises UsageError."""
    text = value
    if os.path.isfile(value):
        try:
            text = Path(value).read_text(errors="replace").strip()
        except OSError as err:
            raise UsageError(f"{value}: {err.strerror}") from None
    if "PRIVATE KEY" in text:
        raise UsageError(f"{value} is a private key", hint="give the .pub file")
    if not _KEY.match(text.strip()):
        raise UsageError(f"not an OpenSSH public key: {value[:60]!r}",
                         hint="give a key such as 'ssh-ed25519 AAAA... user@host' or its .pub file")
    return text.strip()


def check_hostname(name: str) -> str:
    if not _HOSTNAME.match(name):
        raise UsageError(f"invalid hostname {name!r}", hint="letters, digits and '-', dot-separated")
    return name


def write_seed(seed: Seed, path: Path) -> None:
    """Write the seed ISO to ``path`` (replaced atomically)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    try:
        for iso_name, name, data in (("USERDATA.;1", "user-data", seed.user_data),
                                     ("METADATA.;1", "meta-data", seed.meta_data())):
            iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name}", rr_name=name,
                       joliet_path=f"/{name}")
        tmp = path.with_suffix(".tmp")
        iso.write(str(tmp))
        os.replace(tmp, path)
    finally:
        iso.close()
