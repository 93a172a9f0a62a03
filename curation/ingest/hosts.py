"""One spelling per host, so that a rule or an address check cannot be passed by respelling it.

``127.0.0.1`` can also be written ``0x7f000001``, ``2130706433``, ``127.1``, ``0177.0.0.1``,
``[::ffff:127.0.0.1]``, ``[::ffff:7f00:1]``, ``127.0.0.1.`` or in full-width digits, and
resolvers (glibc's ``inet_aton``, browsers' URL parsers) accept all of them. ``canonical_host``
maps each to the same string: lower case, no trailing dot, IDNA (punycode) for other names,
IPv4 in dotted decimal, IPv6 compressed, IPv4-mapped IPv6 as the IPv4 address.

IPv4 spellings are parsed as the WHATWG URL standard does: a host whose last label is a number
(decimal, ``0x`` hex or leading-zero octal) is an IPv4 address, and one that cannot be is an
invalid host rather than a name to look up.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidHost(ValueError):
    """A host that looks like an IP address but is not a valid one (``999.1.1.1``, ``1.2.3.4.5``)."""


def _clean(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.rstrip(".")
    if host and not host.isascii():
        try:  # IDNA 2003 nameprep also maps full-width letters, digits and dots to ASCII
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            pass
    return host


def _ipv4_number(part: str) -> int | None:
    """One WHATWG IPv4 part (decimal, 0x hex, 0-prefixed octal), or None when it is not a number."""
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        if not digits:
            return 0
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    try:
        return int(digits, base) if digits.isalnum() and digits.isascii() else None
    except ValueError:
        return None


def _ends_in_number(labels: list[str]) -> bool:
    last = labels[-1]
    if last.isdigit() and last.isascii():
        return True
    return last[:2] in ("0x", "0X") and _ipv4_number(last) is not None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    labels = host.split(".")
    if not host or not _ends_in_number(labels):
        return None
    numbers = [_ipv4_number(label) if label else None for label in labels]
    if len(labels) > 4 or any(n is None for n in numbers):
        raise InvalidHost(f"{host!r} is not a valid IPv4 address")
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise InvalidHost(f"{host!r} is not a valid IPv4 address (a part is out of range)")
    value = last + sum(n << (8 * (3 - i)) for i, n in enumerate(head))
    return ipaddress.IPv4Address(value)


def parse_ip(host: str) -> IPAddress | None:
    """The address a host names literally, in any spelling; None for a name to look up.

    IPv4-mapped IPv6 addresses come back as their IPv4 address. ``InvalidHost`` when the host
    is meant as an address but is not a valid one.
    """
    host = _clean(host)
    if ":" in host:
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidHost(f"{host!r} is not a valid IPv6 address") from None
        return ip.ipv4_mapped or ip
    return _parse_ipv4(host)


def canonical_host(host: str) -> str:
    """The one spelling of ``host`` (see the module docstring); an invalid host is only cleaned."""
    try:
        ip = parse_ip(host)
    except InvalidHost:
        return _clean(host)
    return str(ip) if ip is not None else _clean(host)


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be used (an address spelling that is not an address), or None."""
    try:
        parse_ip(host)
    except InvalidHost as e:
        return str(e)
    return None
