"""Downloading URL lists against a real local HTTP server with injected faults."""

from __future__ import annotations

import json
import socket

import pytest

from curation import schema
from curation.config import HttpConfig, IngestConfig, UrlRulesConfig
from curation.ingest import SourceSpec, WorkUnit, read_unit
from curation.ingest.http import fetch_urls, url_problem
from curation.ingest.url_rules import UrlRules
from tests.http_fixtures import LOOPBACK_HTTP, ImageServer

FAST = dict(connect_timeout=2.0, read_timeout=0.5, retries=2, backoff=0.01, **LOOPBACK_HTTP)


@pytest.fixture(scope="module")
def server():
    with ImageServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh_stats(server):
    server.reset_stats()


def fetch_one(url: str, **overrides):
    return fetch_urls([url], HttpConfig(**{**FAST, **overrides}))[0]


def url_unit(urls: list[str], shard: int = 3) -> WorkUnit:
    return WorkUnit(shard, SourceSpec("urls.txt", schema.POOL, "pool"), "urls", "urls.txt", tuple(urls))


def rows_of(table):
    return table.to_pylist()


def test_image_is_downloaded_with_its_metadata(server):
    res = fetch_one(server.url("/img/1.jpg"))
    assert res.ok and res.body == server.image(1)
    assert res.status == 200 and res.content_type == "image/jpeg"
    assert res.final_url == server.url("/img/1.jpg")


def test_404_is_not_retried(server):
    res = fetch_one(server.url("/status/404"))
    assert res.reason == "http_404" and res.status == 404 and res.body is None
    assert server.hits("/status/404") == 1


def test_500_then_200_succeeds_after_retries(server):
    res = fetch_one(server.url("/flaky/a/2/3.jpg"))
    assert res.ok and res.body == server.image(3)
    assert res.details["attempts"] == 3
    assert server.hits("/flaky/a/") == 3


def test_always_500_gives_up_after_the_configured_retries(server):
    res = fetch_one(server.url("/status/500"), retries=3)
    assert res.reason == "http_500" and res.details["attempts"] == 4
    assert server.hits("/status/500") == 4


def test_429_is_retried(server):
    res = fetch_one(server.url("/status/429?retry_after=0"), retries=1)
    assert res.reason == "http_429"
    assert server.hits("/status/429") == 2


def test_slow_response_times_out(server):
    res = fetch_one(server.url("/slow/2"), retries=0, read_timeout=0.3)
    assert res.reason == "timeout" and res.body is None


def test_body_cut_short_is_a_truncated_download(server):
    res = fetch_one(server.url("/truncated"), retries=0)
    assert res.reason == "truncated_download" and res.body is None


def test_declared_oversized_body_is_refused_before_reading(server):
    res = fetch_one(server.url("/big/300000"), max_bytes=100_000)
    assert res.reason == "too_large" and res.details == {"content_length": 300_000, "max_bytes": 100_000}


def test_undeclared_oversized_body_is_abandoned_while_streaming(server):
    total = 64 * 1024 * 1024
    res = fetch_one(server.url(f"/big-stream/{total}"), max_bytes=256 * 1024)
    assert res.reason == "too_large" and res.details["bytes_read"] > 256 * 1024
    # The client hung up long before the server could push the whole body.
    assert server.stream_bytes_sent < total


def test_redirects_are_followed_up_to_the_limit(server):
    ok = fetch_one(server.url("/redirect/3/2.jpg"), max_redirects=3)
    assert ok.ok and ok.body == server.image(2) and ok.final_url == server.url("/img/2.jpg")
    assert len(ok.details["redirects"]) == 3
    too_many = fetch_one(server.url("/redirect/4/2.jpg"), max_redirects=3)
    assert too_many.reason == "too_many_redirects"
    loop = fetch_one(server.url("/loop"), max_redirects=5)
    assert loop.reason == "too_many_redirects" and server.hits("/loop") == 6


def test_redirect_to_file_scheme_is_a_bad_url(server):
    res = fetch_one(server.url("/redirect-to?location=file:///etc/passwd"))
    assert res.reason == "bad_url" and res.details["redirect_to"] == "file:///etc/passwd"
    assert res.body is None


def test_redirect_to_a_blocked_host_is_never_followed(server):
    target = f"http://localhost:{server.port}/img/0.jpg"
    rules = UrlRules.from_config(UrlRulesConfig(domains=["localhost"]))
    res = fetch_urls([server.url(f"/redirect-to?location={target}")], HttpConfig(**FAST), rules)[0]
    assert res.reason == "blocked_domain" and res.final_url == target
    assert server.hits("/img") == 0


def test_refused_connection_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = fetch_one(f"http://127.0.0.1:{port}/x.jpg", retries=1)
    assert res.reason == "connection_error" and res.details["attempts"] == 2


@pytest.mark.parametrize(
    "url",
    ["", "   ", "file:///etc/passwd", "ftp://example.com/a.jpg", "data:image/png;base64,AAAA",
     "javascript:alert(1)", "http://", "example.com/a.jpg", "http://[::1/a.jpg", "http://exa mple.com/a.jpg"],
)
def test_non_http_and_malformed_urls_are_refused(url):
    assert url_problem(url) is not None


def test_http_and_https_urls_are_accepted():
    assert url_problem("http://example.com/a.jpg") is None
    assert url_problem("https://img.example.com:8443/a%20b.jpg?x=1") is None


# A fresh server per concurrency test: requests abandoned by earlier tests (the slow route)
# may still be sleeping in the shared server and would count as in flight.
def test_per_host_concurrency_is_respected():
    with ImageServer(n_images=2) as fresh:
        urls = [fresh.url(f"/img/{i}.jpg?delay=0.25") for i in range(12)]
        results = fetch_urls(urls, HttpConfig(**{**FAST, "read_timeout": 5.0}, concurrency=16, per_host=3))
        assert all(r.ok for r in results)
        assert fresh.max_in_flight == 3


def test_global_concurrency_is_respected():
    with ImageServer(n_images=2) as fresh:
        urls = [fresh.url(f"/img/{i}.jpg?delay=0.25") for i in range(8)]
        results = fetch_urls(urls, HttpConfig(**{**FAST, "read_timeout": 5.0}, concurrency=2, per_host=8))
        assert all(r.ok for r in results)
        assert fresh.max_in_flight == 2


def test_read_unit_keeps_input_order_and_reports_every_failure(server):
    urls = [
        server.url("/img/0.jpg"),
        server.url("/status/404"),
        "ftp://example.com/x.jpg",
        server.url("/html"),
        server.url("/empty"),
        server.url("/redirect/1/5.jpg"),
    ]
    cfg = IngestConfig(http=HttpConfig(**FAST))
    rows = rows_of(read_unit(url_unit(urls), cfg))
    assert [r["uid"] for r in rows] == [schema.make_uid(3, i) for i in range(6)]
    assert [r["url"] for r in rows] == urls
    assert [r["drop_reason"] for r in rows] == [None, "http_404", "bad_url", "not_image", "zero_bytes", None]
    ok, missing, html, redirected = rows[0], rows[1], rows[3], rows[5]
    assert ok["bytes"] == server.image(0) and ok["format"] == "JPEG" and ok["width"] > 0
    assert ok["http_status"] == 200 and ok["content_type"] == "image/jpeg"
    assert missing["id"] == __import__("hashlib").sha256(("missing:" + urls[1]).encode()).hexdigest()
    assert missing["http_status"] == 404 and missing["bytes"] is None
    assert html["content_type"].startswith("text/html") and "content_type" in json.loads(html["drop_details"])
    assert redirected["final_url"] == server.url("/img/5.jpg") and redirected["bytes"] == server.image(5)


def test_blocked_urls_in_a_list_are_never_requested(server):
    urls = [server.url("/img/0.jpg"), f"http://localhost:{server.port}/img/1.jpg", server.url("/img/2.jpg?private=1")]
    cfg = IngestConfig(http=HttpConfig(**FAST), url_rules=UrlRulesConfig(domains=["localhost"], regexes=[r"private=1"]))
    rows = rows_of(read_unit(url_unit(urls), cfg))
    assert [r["drop_reason"] for r in rows] == [None, "blocked_domain", "blocked_url"]
    assert json.loads(rows[2]["drop_details"])["pattern"] == "private=1"
    assert server.hits("/img") == 1
