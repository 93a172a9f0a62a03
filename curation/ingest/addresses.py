"""Which addresses the crawler may connect to (SSRF protection), checked where it connects.

A crawl list is untrusted input: without a check, ``http://169.254.169.254/`` reads a cloud
metadata service and ``http://10.0.0.5:8265/`` reaches a private Ray dashboard. By default the
crawler refuses every address that is not public: loopback, private, link-local, multicast,
reserved, unspecified, shared (CGNAT) and the like, also when the address hides inside an IPv6
one (IPv4-mapped, IPv4-compatible, 6to4, NAT64). Such URLs end as ``blocked_address``.

Two places check, so that no spelling and no DNS answer slips through:

* ``AddressPolicy.check_url`` refuses a URL whose host *is* an address (any spelling, see
  ``hosts``) or a ``localhost`` name before any request, for the first URL and every redirect hop;
* ``CheckedResolver`` is the connector's resolver: names are resolved once, refused addresses
  are removed from the answer, and the connector connects to exactly the addresses that remain.
  There is no second lookup between check and connect, so DNS rebinding cannot swap the address,
  while the URL's host name still goes out as the ``Host`` header and TLS server name.

``allow_private_addresses`` turns the check off (the project's tests and demo serve on
127.0.0.1); ``allowed_networks`` admits chosen networks only (an internal image mirror).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from curation.ingest.errors import BLOCKED_ADDRESS
from curation.ingest.hosts import IPAddress, InvalidHost, canonical_host, parse_ip
from curation.ingest.url_rules import Block

_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (and that a gateway would connect to), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_category(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (``loopback``, ``private``, ...), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            category = address_category(inner)
            if category is not None:
                return category
    for category, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return category
    return None if ip.is_global else "not_global"


def _is_localhost_name(host: str) -> bool:
    """``localhost`` and ``*.localhost`` always mean this machine (RFC 6761), whatever DNS says."""
    name = canonical_host(host)
    return name == "localhost" or name.endswith(".localhost")


class AddressPolicy:
    """The crawl's address rules, from ``HttpConfig.allow_private_addresses`` / ``allowed_networks``."""

    def __init__(self, allow_private: bool = False, allowed_networks: list[str] | tuple[str, ...] = ()):
        self.allow_private = allow_private
        self.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def refusal(self, ip: IPAddress) -> str | None:
        """The category that refuses ``ip``, or None when the crawler may connect to it."""
        if self.allow_private:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip.version == net.version and ip in net for net in self.allowed_networks):
            return None
        return address_category(ip)

    def check_url(self, url: str) -> Block | None:
        """``blocked_address`` when the URL's host is a refused address literal, else None.

        Host names are left to ``CheckedResolver``, which sees what they resolve to.
        """
        try:
            host = urlsplit(url).hostname
            ip = parse_ip(host) if host else None
        except (ValueError, InvalidHost):
            return None  # url_problem reports malformed hosts as bad_url
        if ip is None and host and _is_localhost_name(host) and self.refusal(_LOOPBACK) is not None:
            return Block(BLOCKED_ADDRESS, {"host": host, "category": "loopback", "rule": "localhost name (RFC 6761)"})
        category = self.refusal(ip) if ip is not None else None
        if category is None:
            return None
        return Block(BLOCKED_ADDRESS, {"host": host, "address": str(ip), "category": category})


class BlockedAddressError(OSError):
    """Every address a host name resolved to was refused by the policy."""

    def __init__(self, host: str, refused: list[tuple[str, str]]):
        self.host = host
        self.refused = refused
        listed = ", ".join(f"{addr} ({cat})" for addr, cat in refused)
        super().__init__(f"{host} resolves only to refused addresses: {listed}")

    def details(self) -> dict:
        addr, cat = self.refused[0]
        out = {"host": self.host, "address": addr, "category": cat}
        if len(self.refused) > 1:
            out["addresses"] = [a for a, _ in self.refused]
        return out


class CheckedResolver(AbstractResolver):
    """Resolves with ``inner`` and keeps only the addresses ``policy`` admits.

    aiohttp connects to the addresses a resolver returns (and caches them for the connector's
    DNS TTL), so what was checked is what is connected to.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver):
        self.policy = policy
        self.inner = inner

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[tuple[str, str]] = []
        for answer in answers:
            try:
                ip = ipaddress.ip_address(answer["host"])
            except ValueError:
                refused.append((str(answer["host"]), "unparsable"))
                continue
            category = self.policy.refusal(ip)
            if category is None:
                kept.append(answer)
            else:
                refused.append((str(ip), category))
        if not kept:
            if not refused:
                raise OSError(f"{host} did not resolve to any address")
            raise BlockedAddressError(host, refused)
        return kept

    async def close(self) -> None:
        await self.inner.close()
