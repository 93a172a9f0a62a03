"""SSRF protection and opt-outs of the crawler, against real servers on loopback only.

By default the crawler connects to public addresses only: every spelling of a loopback address
is refused before a byte is sent, also after a redirect and behind a host name, and the refused
URL ends in the ledger as ``blocked_address``. ``allow_private_addresses`` lets the same URLs
through (the positive controls below show the refusals are the policy, not a dead server).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from urllib.parse import urlencode

import pytest
from aiohttp.abc import AbstractResolver

from curation import schema
from curation.config import ConfigError, HttpConfig, IngestConfig, load_config
from curation.ingest import SourceSpec, WorkUnit, read_unit
from curation.ingest.addresses import AddressPolicy, CheckedResolver, address_category
from curation.ingest.http import fetch_urls, url_problem
from curation.ingest.robots import opt_out_directive, user_agent_token
from tests.http_fixtures import LOOPBACK_HTTP, ImageServer

FAST = dict(connect_timeout=2.0, read_timeout=2.0, retries=0)

# Every spelling of this machine's loopback the issue lists, and a few more resolvers accept.
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "localhost", "LOCALHOST.", "127.0.0.1.", "0x7f000001", "2130706433", "127.1",
    "0177.0.0.1", "0x7f.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width digits: IDNA maps them to 127.0.0.1
    "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # full-width "localhost"
]


@pytest.fixture(scope="module")
def server():
    with ImageServer(n_images=4) as s:
        yield s


@pytest.fixture(scope="module")
def internal():
    """A second server on another loopback address: the 'internal service' a redirect aims at."""
    with ImageServer(n_images=4, host="127.0.0.2") as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh_stats(server, internal):
    server.reset_stats()
    internal.reset_stats()


class FakeDNS(AbstractResolver):
    """Answers host names from a table, as a hostile DNS server may; counts the lookups."""

    def __init__(self, table: dict[str, str]):
        self.table = table
        self.lookups: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"no such host: {host}")
        return [{"hostname": host, "host": self.table[host], "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self):
        pass


def fetch(url: str, resolver=None, **cfg):
    return fetch_urls([url], HttpConfig(**{**FAST, **cfg}), resolver=resolver)[0]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_is_refused_by_default(server, host):
    res = fetch(f"http://{host}:{server.port}/img/0.jpg")
    assert res.reason == "blocked_address" and res.body is None
    assert res.details["category"] == "loopback"
    assert "address" not in res.details or ipaddress.ip_address(res.details["address"]).is_loopback
    assert server.hits("/") == 0


# "LOCALHOST." is left to the system resolver, which may not know the trailing-dot name.
@pytest.mark.parametrize("host", [h for h in LOOPBACK_SPELLINGS if h != "LOCALHOST."])
def test_allow_private_addresses_fetches_every_spelling(server, host):
    res = fetch(f"http://{host}:{server.port}/img/1.jpg", **LOOPBACK_HTTP)
    assert res.ok and res.body == server.image(1)


@pytest.mark.parametrize(
    "host, category",
    [("0.0.0.0", "unspecified"), ("0", "unspecified"), ("[::]", "unspecified"), ("[::1]", "loopback"),
     ("169.254.169.254", "link_local"), ("10.0.0.1", "private"), ("192.168.1.1", "private"),
     ("[fd00::1]", "private"), ("224.0.0.1", "multicast"), ("100.64.0.1", "not_global")],
)
def test_other_non_public_addresses_are_refused_without_connecting(host, category):
    # None of these is contacted: the literal is refused before any connection is attempted.
    res = fetch(f"http://{host}/a.jpg", connect_timeout=0.2)
    assert res.reason == "blocked_address" and res.details["category"] == category


def test_localhost_names_follow_the_loopback_rule(server):
    for host in ("localhost", "img.localhost"):
        assert fetch(f"http://{host}:{server.port}/img/0.jpg").details["rule"] == "localhost name (RFC 6761)"
    res = fetch(f"http://localhost:{server.port}/img/0.jpg", allowed_networks=["127.0.0.0/8"])
    assert res.ok and res.body == server.image(0)


def test_a_host_name_resolving_to_a_refused_address_is_blocked_after_lookup(internal):
    dns = FakeDNS({"images.example": "127.0.0.2"})
    res = fetch(f"http://images.example:{internal.port}/img/0.jpg", resolver=dns)
    assert res.reason == "blocked_address"
    assert res.details == {"host": "images.example", "address": "127.0.0.2", "category": "loopback"}
    assert internal.hits("/") == 0


def test_the_connection_goes_to_the_checked_address_and_keeps_the_host_name(internal):
    # images.example exists only in FakeDNS: reaching the server proves the connector used the
    # checked answer, and the Host header still names the URL's host (as TLS SNI would).
    dns = FakeDNS({"images.example": "127.0.0.2"})
    urls = [f"http://images.example:{internal.port}/echo-host", f"http://images.example:{internal.port}/img/2.jpg"]
    results = fetch_urls(urls, HttpConfig(**FAST, allowed_networks=["127.0.0.2/32"]), resolver=dns)
    assert results[0].ok and results[0].body == f"images.example:{internal.port}".encode()
    assert results[1].ok and results[1].body == internal.image(2)
    assert dns.lookups == ["images.example"]  # one lookup, then the pinned address is reused


@pytest.mark.parametrize("target_host", ["127.0.0.2", "0x7f000002", "2130706434", "[::ffff:127.0.0.2]", "[::ffff:7f00:2]", "internal.example"])
def test_a_redirect_to_a_refused_address_is_not_followed(server, internal, target_host):
    target = f"http://{target_host}:{internal.port}/img/0.jpg"
    dns = FakeDNS({"internal.example": "127.0.0.2"})
    start = server.url(f"/redirect-to?location={target}")
    res = fetch(start, resolver=dns, allowed_networks=["127.0.0.1/32"])  # the first hop is admitted
    assert res.reason == "blocked_address" and res.details["address"] == "127.0.0.2"
    assert res.details["redirects"] == [start]
    assert server.hits("/redirect-to") == 1 and internal.hits("/") == 0
    # Control: admitting the target's network lets the same redirect through.
    ok = fetch(start, resolver=dns, allowed_networks=["127.0.0.1/32", "127.0.0.2/32"])
    assert ok.ok and ok.body == internal.image(0)


def test_blocked_addresses_reach_the_ledger(server):
    urls = [server.url("/img/0.jpg"), f"http://0x7f000001:{server.port}/img/1.jpg"]
    unit = WorkUnit(0, SourceSpec("urls.txt", schema.POOL, "pool"), "urls", "urls.txt", tuple(urls))
    rows = read_unit(unit, IngestConfig(http=HttpConfig(**FAST))).to_pylist()
    assert [r["drop_reason"] for r in rows] == ["blocked_address", "blocked_address"]
    assert json.loads(rows[1]["drop_details"])["category"] == "loopback"
    assert server.hits("/") == 0


def test_an_address_spelling_that_is_no_address_is_a_bad_url():
    for url in ("http://999.1.1.1/a.jpg", "http://1.2.3.4.5/a.jpg", "http://08.1.1.1/a.jpg", "http://foo.123/a.jpg"):
        assert "not a valid IPv4 address" in url_problem(url)


@pytest.mark.parametrize(
    "address, category",
    [("8.8.8.8", None), ("2001:4860:4860::8888", None), ("127.255.0.1", "loopback"), ("::1", "loopback"),
     ("::ffff:127.0.0.1", "loopback"), ("::7f00:1", "loopback"),  # IPv4-compatible
     ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
     ("64:ff9b::a00:1", "private"),  # NAT64 around 10.0.0.1
     ("64:ff9b::808:808", "reserved"),  # NAT64 lies in ::/8, which Python counts as reserved
     ("fe80::1", "link_local"), ("fc00::1", "private"), ("ff02::1", "multicast"),
     ("240.0.0.1", "private"), ("198.18.0.1", "private"), ("0.0.0.0", "unspecified")],
)
def test_address_categories(address, category):
    assert address_category(ipaddress.ip_address(address)) == category


def test_checked_resolver_drops_refused_answers_and_keeps_the_rest():
    class Mixed(FakeDNS):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            bad = await FakeDNS({host: "10.1.1.1"}).resolve(host, port)
            return bad + await FakeDNS({host: "8.8.8.8"}).resolve(host, port)

    answers = asyncio.run(CheckedResolver(AddressPolicy(), Mixed({})).resolve("mixed.example", 80))
    assert [a["host"] for a in answers] == ["8.8.8.8"]  # the connector never sees 10.1.1.1


def test_allowed_networks_are_validated():
    with pytest.raises(ConfigError, match="not a network: 'nonsense'"):
        load_config("smoke", overrides={"ingest": {"http": {"allowed_networks": ["nonsense"]}}})


def test_private_addresses_are_refused_unless_the_config_says_otherwise():
    assert HttpConfig().allow_private_addresses is False
    assert load_config("lvd").ingest.http.allow_private_addresses is False
    assert load_config("demo").ingest.http.allow_private_addresses is True  # its crawl is on 127.0.0.1


# -- X-Robots-Tag opt-outs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags, directive",
    [(["noai"], "noai"), (["noimageai"], "noimageai"), (["NoAI, nofollow"], "noai"), (["curation: noai"], "noai"),
     (["CURATION:noimageai"], "noimageai"), (["otherbot: noai", "curation: noimageai"], "noimageai"),
     (["noindex, unavailable_after: 25 Jun 2030 15:00:00 PST, noai"], "noai"),
     (["otherbot: noai"], None), (["noindex"], None), ([], None)],
)
def test_x_robots_tag_opt_outs_are_honoured(server, tags, directive):
    query = urlencode([("tag", t) for t in tags])
    res = fetch(server.url(f"/robots/3.jpg?{query}"), **LOOPBACK_HTTP)
    if directive is None:
        assert res.ok and res.body == server.image(3)
    else:
        assert res.reason == "robots_opt_out" and res.body is None and res.details["directive"] == directive


def test_the_opt_out_switch_turns_it_off(server):
    res = fetch(server.url("/robots/1.jpg?tag=noai"), robots_opt_out=False, **LOOPBACK_HTTP)
    assert res.ok and res.body == server.image(1)


def test_the_user_agent_token_comes_from_the_configured_user_agent():
    assert user_agent_token(HttpConfig().user_agent) == "curation"
    assert user_agent_token("MyCrawler/2.0") == "mycrawler"
    assert opt_out_directive(["mycrawler: noai"], "mycrawler", ["noai"]) == "noai"
    assert opt_out_directive(["mycrawler: noai"], "curation", ["noai"]) is None
