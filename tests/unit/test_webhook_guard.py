"""The webhook guard: no callback unless the operator allows the host, https, and public
addresses only (loopback, private, link-local and metadata addresses refused)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from services.common import netguard
from services.common.settings import StoreSettings
from services.storage.webhooks import WebhookRefusedError, check_url, sign, subscribed

ALLOWED = StoreSettings(
    webhook_allow_hosts=[
        "*.example.com",
        "93.184.216.34",
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "::1",
        "localhost",
    ]
)


@pytest.mark.parametrize(
    ("url", "settings", "rule"),
    [
        ("https://hooks.example.com/x", StoreSettings(), "webhooks are off"),
        ("http://93.184.216.34/x", ALLOWED, "scheme must be https"),
        ("ftp://93.184.216.34/x", ALLOWED, "scheme"),
        ("https://evil.test/x", ALLOWED, "not in the operator's allowed hosts"),
        ("https://user:pw@93.184.216.34/x", ALLOWED, "no credentials"),
        ("https://127.0.0.1/x", ALLOWED, "non-public address"),
        ("https://10.1.2.3/x", ALLOWED, "non-public address"),
        ("https://169.254.169.254/latest/meta-data", ALLOWED, "non-public address"),
        ("https://[::1]/x", ALLOWED, "non-public address"),
        ("https://localhost/x", ALLOWED, "non-public address"),
        ("https://93.184.216.34:99999/x", ALLOWED, "not a valid URL"),
    ],
)
async def test_refused(url: str, settings: StoreSettings, rule: str) -> None:
    with pytest.raises(WebhookRefusedError, match=rule):
        await check_url(url, settings)


async def test_allowed_public_address_is_pinned() -> None:
    target = await check_url("https://93.184.216.34/hook?x=1", ALLOWED)
    assert ("93.184.216.34", 443, "93.184.216.34") == (target.host, target.port, target.address)


async def test_ports_are_part_of_the_allow_list() -> None:
    """Item 12: an entry without a port allows the scheme's default port only."""
    with pytest.raises(WebhookRefusedError, match="port 8443 is not in the operator's"):
        await check_url("https://93.184.216.34:8443/hook", ALLOWED)
    for entry in ("93.184.216.34:8443", "93.184.216.34:*"):
        settings = StoreSettings(webhook_allow_hosts=[entry])
        assert 8443 == (await check_url("https://93.184.216.34:8443/hook", settings)).port


async def test_private_addresses_only_with_the_operators_opt_in() -> None:
    settings = StoreSettings(
        webhook_allow_hosts=["127.0.0.1:*"], webhook_allow_http=True, webhook_allow_private=True
    )
    assert "127.0.0.1" == (await check_url("http://127.0.0.1:9/x", settings)).address


def test_signature_is_standard_webhooks_hmac() -> None:
    """As the Standard Webhooks reference library signs (not a second copy of our HMAC)."""
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    at = datetime.fromtimestamp(1700000000, UTC)
    assert Webhook(secret).sign("msg_1", at, "{}") == sign(secret, "msg_1", 1700000000, b"{}")


@pytest.mark.parametrize(
    ("kind", "events", "expected"),
    [
        ("succeeded", ["completed"], True),
        ("cancelled", ["completed"], True),
        ("progress", ["completed"], False),
        ("progress", ["progress"], True),
        ("started", ["completed", "started"], True),
    ],
)
def test_subscriptions(kind: str, events: list[str], expected: bool) -> None:
    assert expected == subscribed(kind, events)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("10.0.0.1", False),
        # 6to4 (2002::/16) wrapping a private or loopback IPv4 (issue 15 item 12).
        ("2002:0a00:0001::1", False),
        ("2002:7f00:0001::1", False),
        ("2002:a9fe:a9fe::1", False),  # 169.254.169.254, the metadata service
        ("2002:5db8:d822::1", True),  # 93.184.216.34
        # NAT64, well-known and local-use prefixes.
        ("64:ff9b::10.0.0.1", False),
        ("64:ff9b::127.0.0.1", False),
        ("64:ff9b:1::a9fe:a9fe", False),
        ("64:ff9b::93.184.216.34", True),
        # IPv4-mapped and IPv4-compatible.
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::ffff:93.184.216.34", True),
        ("::10.0.0.1", False),
        ("::1", False),
        # Teredo: server 10.0.0.1, client ~0xa2472b37 = 93.184.212.200.
        ("2001:0:a00:1::a247:2b37", False),
    ],
)
def test_public_addresses_look_inside_ipv6(address: str, public: bool) -> None:
    assert public == netguard.public_address(address)


@pytest.mark.parametrize(
    ("host", "port", "scheme", "entries", "allowed"),
    [
        ("hooks.example.com", 443, "https", ["hooks.example.com"], True),
        # A host allowed without a port: its default port only (issue 15 item 12).
        ("hooks.example.com", 22, "https", ["hooks.example.com"], False),
        ("hooks.example.com", 8443, "https", ["hooks.example.com"], False),
        ("hooks.example.com", 80, "http", ["hooks.example.com"], True),
        ("hooks.example.com", 8443, "https", ["hooks.example.com:8443"], True),
        ("hooks.example.com", 443, "https", ["hooks.example.com:8443"], False),
        ("a.example.org", 9000, "https", ["*.example.org:*"], True),
        ("a.example.org", 443, "https", ["*.example.org"], True),
        ("evil.test", 443, "https", ["*.example.org:*"], False),
        ("::1", 8443, "https", ["[::1]:8443"], True),
        ("::1", 443, "https", ["::1"], True),
        ("::1", 8443, "https", ["::1"], False),
    ],
)
def test_allow_list_entries_include_ports(
    host: str, port: int, scheme: str, entries: list[str], allowed: bool
) -> None:
    assert allowed == netguard.host_allowed(host, port, scheme, entries)
