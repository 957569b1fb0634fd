"""Where a server-side callback (a task's webhook) may connect: the guard's rules, pure.

**Addresses.** Public ones only. An IPv6 address can carry an IPv4 one inside it, and a
gateway or relay on the path unwraps it: 6to4 (``2002:AABB:CCDD::/16`` reaches
``A.A.B.B``…), NAT64 (``64:ff9b::/96`` and the local-use ``64:ff9b:1::/48``), IPv4-mapped
(``::ffff:0:0/96``), IPv4-compatible (``::/96``) and Teredo (``2001::/32``, server and
obfuscated client). Such an address is public only if the IPv6 address and every IPv4
address inside it are.

**Hosts and ports.** An allow-list entry is ``host`` (a ``*`` pattern allowed), optionally
with ``:port`` (``[v6]:port`` for an IPv6 literal) or ``:*`` for any port. Without a port
an entry allows the scheme's default port only (443 for https, 80 for http): a host
allowed for its web server is not thereby allowed for its other services.
"""

from __future__ import annotations

import fnmatch
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_V4 = 0xFFFFFFFF
_6TO4 = ipaddress.IPv6Network("2002::/16")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_TEREDO = ipaddress.IPv6Network("2001::/32")
DEFAULT_PORTS = {"https": 443, "http": 80}


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (none for a plain one)."""
    value = int(ip)
    if ip in _6TO4:
        return [ipaddress.IPv4Address((value >> 80) & _V4)]
    if ip in _TEREDO:
        return [ipaddress.IPv4Address((value >> 64) & _V4), ipaddress.IPv4Address(~value & _V4)]
    if ip in _MAPPED or ip in _COMPATIBLE or any(ip in net for net in _NAT64):
        return [ipaddress.IPv4Address(value & _V4)]
    return []


def _public(ip: IPAddress) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


def public_address(address: str) -> bool:
    """Whether ``address`` (an IP literal) and every IPv4 address inside it are public."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _public(ip)
    inner = embedded_ipv4(ip)
    # A mapped, compatible or NAT64 address stands for the IPv4 one (Python calls them
    # reserved whatever is inside): judge that one alone. 6to4 and Teredo: both.
    translated = ip in _MAPPED or ip in _COMPATIBLE or any(ip in net for net in _NAT64)
    return (translated or _public(ip)) and all(_public(v4) for v4 in inner)


def _entry(entry: str) -> tuple[str, str]:
    """``host[:port|:*]`` → (host pattern, port text; empty: the default port)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest.removeprefix(":")
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""  # a bare name, or a bare IPv6 literal (no port)


def host_allowed(host: str, port: int, scheme: str, entries: list[str]) -> bool:
    """Whether an allow-list entry names ``host`` (lower case) and admits ``port``."""
    for entry in entries:
        pattern, allowed = _entry(entry)
        if not fnmatch.fnmatchcase(host, pattern):
            continue
        if allowed == "*" or allowed == str(port):
            return True
        if not allowed and port == DEFAULT_PORTS.get(scheme):
            return True
    return False
