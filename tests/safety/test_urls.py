"""SECURITY.md row 28: import URLs pointing at loopback/private addresses are refused.

DNS names are resolved through an injected table standing in for DNS (no network in
tests); addresses written into URLs need no resolver at all.
"""

from __future__ import annotations

import pytest

from vmforge.safety.urls import RefusedURL, check_redirect, check_url


def table(answers: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        return answers[host]
    return resolve


DNS = table({
    "images.example.org": ["93.184.215.14"],
    "internal.example.org": ["10.1.2.3"],
    "mixed.example.org": ["93.184.215.14", "192.168.1.10"],
    "v6.example.org": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "rebind.example.org": ["::ffff:127.0.0.1"],
})


@pytest.mark.parametrize("url", [
    "https://images.example.org/disk.qcow2", "http://images.example.org:8080/a.vmdk",
    "https://v6.example.org/x", "https://93.184.215.14/disk.raw",
])
def test_public_urls_pass(url: str) -> None:
    resolved = check_url(url, DNS)
    assert resolved.addresses


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1/disk", "non-public"), ("http://[::1]/disk", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "non-public"),
    ("http://10.0.0.5/x", "non-public"), ("http://172.16.3.4/x", "non-public"),
    ("http://192.168.0.1/x", "non-public"), ("http://[fe80::1%25eth0]/x", "non-public"),
    ("http://[::ffff:127.0.0.1]/x", "non-public"), ("http://0.0.0.0/x", "non-public"),
    ("http://224.0.0.1/x", "non-public"), ("http://2130706433/x", "non-standard"),
    ("http://0x7f000001/x", "non-standard"), ("http://127.1/x", "non-standard"),
    ("https://internal.example.org/x", "non-public"), ("https://mixed.example.org/x", "non-public"),
    ("https://rebind.example.org/x", "non-public"),
    ("file:///etc/passwd", "only http"), ("ftp://images.example.org/x", "only http"),
    ("nbd://images.example.org/x", "only http"), ("https://user:pw@images.example.org/", "credentials"),
    ("https:///nohost", "no host"),
])
def test_refused(url: str, why: str) -> None:
    with pytest.raises(RefusedURL, match=why):
        check_url(url, DNS)


def test_redirects_are_checked_and_bounded() -> None:
    ok = check_redirect("https://images.example.org/a", "/b", DNS)
    assert ok.url == "https://images.example.org/b"
    with pytest.raises(RefusedURL, match="non-public"):
        check_redirect("https://images.example.org/a", "http://169.254.169.254/", DNS)
    with pytest.raises(RefusedURL, match="redirects"):
        check_redirect("https://images.example.org/a", "/b", DNS, hops=5)


def test_localhost_through_the_real_resolver() -> None:
    with pytest.raises(RefusedURL, match="non-public"):
        check_url("http://localhost:8080/disk")
