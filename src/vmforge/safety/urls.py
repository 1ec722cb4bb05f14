"""Import URLs from strangers (SECURITY.md row 28): only http(s) to public addresses.

A catalog that fetches "https://example.org/disk.qcow2" for a user must not be turned
into a proxy for the host's own network: loopback, private ranges, link-local (the
cloud metadata service at 169.254.169.254), multicast and reserved addresses are
refused, whether written as an address, hidden in another notation, or behind a DNS
name. Every redirect target is checked the same way before it is followed, and the
connection should be made to the address checked here (``ResolvedURL.addresses``), so
a DNS answer that changes between check and use cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import UsageError

Resolver = Callable[[str, int], Sequence[str]]

ALLOWED_SCHEMES = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class ResolvedURL:
    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


class RefusedURL(UsageError):
    """An import URL that points where vmforge must not connect."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (IPv4 and IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise RefusedURL(f"cannot resolve '{host}': {err.strerror}") from None
    return sorted({str(info[4][0]) for info in infos})


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not ip.is_multicast


def check_url(url: str, resolver: Resolver = system_resolver) -> ResolvedURL:
    """Refuse (RefusedURL) anything but http(s) to public addresses; return what to connect to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise RefusedURL(f"'{url}': only http and https URLs can be imported",
                         hint="upload the file instead")
    if parts.username is not None or parts.password is not None:
        raise RefusedURL(f"'{url}': credentials in the URL are refused")
    host = parts.hostname
    if not host:
        raise RefusedURL(f"'{url}': no host name")
    try:
        port = parts.port or ALLOWED_SCHEMES[scheme]
    except ValueError:
        raise RefusedURL(f"'{url}': invalid port") from None
    try:
        literal = ipaddress.ip_address(host)
        addresses: Sequence[str] = [str(literal)]
    except ValueError:
        if host.replace(".", "").isdigit() or host.lower().startswith("0x"):
            # 2130706433, 0x7f000001, 127.1: notations the resolver turns into loopback
            raise RefusedURL(f"'{url}': numeric host '{host}' in a non-standard notation") \
                from None
        addresses = resolver(host, port)
    if not addresses:
        raise RefusedURL(f"'{url}': '{host}' has no address")
    private = [a for a in addresses if not _public(a)]
    if private:
        raise RefusedURL(f"'{url}': '{host}' is a non-public address ({', '.join(private)})",
                         hint="imports are fetched only from public addresses")
    return ResolvedURL(url, host, port, tuple(addresses))


def check_redirect(current: str, location: str, resolver: Resolver = system_resolver,
                   hops: int = 0, max_hops: int = 5) -> ResolvedURL:
    """The target of a redirect, checked like the original URL, with a hop limit."""
    from urllib.parse import urljoin

    if hops >= max_hops:
        raise RefusedURL(f"'{current}': more than {max_hops} redirects")
    return check_url(urljoin(current, location), resolver)
