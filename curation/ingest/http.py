"""Polite, bounded asynchronous downloads of URL lists.

Each ingest worker fetches one work unit of URLs with asyncio + aiohttp:

* a global limit and a per-host limit of requests in flight (semaphores: the host slot is taken
  first so that one slow host cannot hold every global slot while it waits);
* retries with exponential backoff after 5xx, 429 (``Retry-After`` honoured up to the read
  timeout), timeouts, connection errors and bodies cut short;
* redirects followed by hand so that the hop limit, the http/https rule, the URL blocklists and
  the address policy apply to *every* hop (a redirect to ``file://``, to a blocked host or to a
  private address is never followed);
* SSRF protection (``addresses``): only public addresses are connected to unless
  ``allow_private_addresses`` is set, and the connector connects to exactly the address checked;
* ``X-Robots-Tag: noai`` / ``noimageai`` honoured (``robots_opt_out``) before the body is read;
* a byte cap checked against ``Content-Length`` before reading and while streaming, so an
  oversized body is abandoned early rather than buffered.

Every URL yields one ``FetchResult`` (in input order); failures carry a ledger reason instead of
raising.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver

from curation.config import HttpConfig
from curation.ingest import errors as R
from curation.ingest.addresses import AddressPolicy, BlockedAddressError, CheckedResolver
from curation.ingest.hosts import InvalidHost, host_problem, parse_ip
from curation.ingest.robots import opt_out_directive, user_agent_token
from curation.ingest.url_rules import UrlRules, host_of

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ALLOWED_SCHEMES = frozenset({"http", "https"})
_CHUNK = 64 * 1024


@dataclass
class FetchResult:
    url: str
    final_url: str | None = None
    status: int | None = None
    content_type: str | None = None
    body: bytes | None = None
    reason: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None


def url_problem(url: str) -> str | None:
    """Why a URL may not be fetched (scheme other than http/https, no host, malformed), or None."""
    if not url or not url.strip():
        return "empty URL"
    if any(ch.isspace() or ord(ch) < 32 for ch in url.strip()):
        return "URL contains whitespace or control characters"
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError for a malformed port
    except ValueError as e:
        return f"malformed URL: {e}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} is not http or https"
    if not parts.hostname:
        return "URL has no host"
    problem = host_problem(parts.hostname)
    if problem is not None:
        return problem
    if port == 0:
        return "URL has port 0"
    return None


def _retryable(result: FetchResult) -> bool:
    if result.reason in (R.TIMEOUT, R.CONNECTION_ERROR, R.TRUNCATED_DOWNLOAD):
        return True
    return result.status is not None and result.reason is not None and (result.status >= 500 or result.status == 429)


def _pinned(url: str) -> str | yarl.URL:
    """The URL with an address host written canonically (``0x7f000001`` -> ``127.0.0.1``), so the
    request goes to the very address the policy checked; host names are left to the resolver."""
    try:
        host = urlsplit(url).hostname
        ip = parse_ip(host) if host else None
    except (ValueError, InvalidHost):
        return url
    if ip is None or str(ip) == host:
        return url
    return yarl.URL(url).with_host(str(ip))


def _blocked_address(e: BaseException) -> BlockedAddressError | None:
    """The policy refusal behind a connector error (aiohttp wraps resolver errors), if any."""
    for err in (e, getattr(e, "os_error", None), e.__cause__):
        if isinstance(err, BlockedAddressError):
            return err
    return None


class Fetcher:
    """Downloads many URLs concurrently within the limits of one ``HttpConfig``.

    ``resolver`` replaces the system resolver behind the address check (tests use it to play DNS).
    """

    def __init__(self, cfg: HttpConfig, rules: UrlRules | None = None, resolver: AbstractResolver | None = None):
        self.cfg = cfg
        self.rules = rules
        self.policy = AddressPolicy(cfg.allow_private_addresses, cfg.allowed_networks)
        self._resolver = resolver
        self._ua_token = user_agent_token(cfg.user_agent)
        self._global: asyncio.Semaphore | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        self._global = asyncio.Semaphore(self.cfg.concurrency)
        self._hosts = {}
        timeout = aiohttp.ClientTimeout(
            total=self.cfg.connect_timeout + self.cfg.read_timeout,
            sock_connect=self.cfg.connect_timeout,
            sock_read=self.cfg.read_timeout,
        )
        resolver = CheckedResolver(self.policy, self._resolver or aiohttp.ThreadedResolver())
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency, limit_per_host=self.cfg.per_host, ttl_dns_cache=300, resolver=resolver
        )
        try:
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers={"User-Agent": self.cfg.user_agent},
                trust_env=False,
            ) as session:
                return list(await asyncio.gather(*(self._fetch_with_retries(session, u) for u in urls)))
        finally:
            await resolver.close()  # a resolver passed to the connector is not closed by it

    async def _fetch_with_retries(self, session: aiohttp.ClientSession, url: str) -> FetchResult:
        attempt = 0
        while True:
            result = await self._follow_redirects(session, url)
            if not _retryable(result) or attempt >= self.cfg.retries:
                if attempt:
                    result.details["attempts"] = attempt + 1
                return result
            delay = self.cfg.backoff * (2**attempt)
            retry_after = result.details.pop("retry_after", None)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.cfg.read_timeout))
            attempt += 1
            await asyncio.sleep(delay)

    async def _follow_redirects(self, session: aiohttp.ClientSession, url: str) -> FetchResult:
        hops: list[str] = []
        current = url.strip()
        for _ in range(self.cfg.max_redirects + 1):
            problem = url_problem(current)
            if problem is not None:
                details = {"error": problem}
                if hops:
                    details.update(redirect_to=current, redirects=hops)
                return FetchResult(url, final_url=current if hops else None, reason=R.BAD_URL, details=details)
            block = self.rules.check(current) if self.rules is not None else None
            if block is None:
                block = self.policy.check_url(current)
            if block is not None:
                details = {**block.details, "redirects": hops} if hops else dict(block.details)
                return FetchResult(url, final_url=current if hops else None, reason=block.reason, details=details)
            result, location = await self._request_once(session, url, current)
            if location is None:
                if hops:
                    result.details.setdefault("redirects", hops)
                return result
            hops.append(current)
            current = urljoin(current, location.strip())
        return FetchResult(
            url, final_url=current, reason=R.TOO_MANY_REDIRECTS, details={"max_redirects": self.cfg.max_redirects, "redirects": hops}
        )

    def _host_slot(self, url: str) -> asyncio.Semaphore:
        host = host_of(url) or ""
        sem = self._hosts.get(host)
        if sem is None:
            sem = self._hosts[host] = asyncio.Semaphore(self.cfg.per_host)
        return sem

    async def _request_once(self, session: aiohttp.ClientSession, url: str, current: str) -> tuple[FetchResult, str | None]:
        """One HTTP request; returns (result, redirect location or None)."""
        assert self._global is not None
        result = FetchResult(url, final_url=current)
        try:
            async with self._host_slot(current), self._global:
                async with session.get(_pinned(current), allow_redirects=False) as resp:
                    result.status = resp.status
                    result.content_type = resp.headers.get("Content-Type")
                    if resp.status in REDIRECT_STATUSES:
                        location = resp.headers.get("Location")
                        if location:
                            return result, location
                        result.reason = R.http_status_reason(resp.status)
                        result.details = {"error": "redirect without a Location header"}
                        return result, None
                    if not 200 <= resp.status < 300:
                        result.reason = R.http_status_reason(resp.status)
                        retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
                        if retry_after is not None:
                            result.details["retry_after"] = retry_after
                        return result, None
                    if self.cfg.robots_opt_out and self._opted_out(resp, result):
                        return result, None
                    await self._read_body(resp, result)
                    return result, None
        except aiohttp.ClientPayloadError as e:
            result.reason, result.details = R.TRUNCATED_DOWNLOAD, {"error": str(e) or type(e).__name__}
        except TimeoutError as e:  # includes aiohttp's connect/read timeouts
            result.reason, result.details = R.TIMEOUT, {"error": str(e) or type(e).__name__}
        except (aiohttp.InvalidURL, ValueError) as e:
            result.reason, result.details = R.BAD_URL, {"error": str(e) or type(e).__name__}
        except (aiohttp.ClientError, OSError) as e:
            blocked = _blocked_address(e)
            if blocked is not None:
                result.reason, result.details = R.BLOCKED_ADDRESS, blocked.details()
            else:
                result.reason, result.details = R.CONNECTION_ERROR, {"error": f"{type(e).__name__}: {e}"}
        return result, None

    def _opted_out(self, resp: aiohttp.ClientResponse, result: FetchResult) -> bool:
        values = resp.headers.getall("X-Robots-Tag", [])
        directive = opt_out_directive(values, self._ua_token, self.cfg.robots_opt_out_directives)
        if directive is None:
            return False
        result.reason = R.ROBOTS_OPT_OUT
        result.details = {"directive": directive, "x_robots_tag": values if len(values) > 1 else values[0]}
        return True

    async def _read_body(self, resp: aiohttp.ClientResponse, result: FetchResult) -> None:
        cap = self.cfg.max_bytes
        declared = resp.content_length
        if declared is not None and declared > cap:
            result.reason, result.details = R.TOO_LARGE, {"content_length": declared, "max_bytes": cap}
            return
        chunks: list[bytes] = []
        received = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            received += len(chunk)
            if received > cap:
                result.reason, result.details = R.TOO_LARGE, {"bytes_read": received, "max_bytes": cap}
                return
            chunks.append(chunk)
        # aiohttp raises on a short body for identity encoding; compressed bodies differ in length.
        if declared is not None and received < declared and "Content-Encoding" not in resp.headers:
            result.reason = R.TRUNCATED_DOWNLOAD
            result.details = {"content_length": declared, "bytes_read": received}
            return
        result.body = b"".join(chunks)


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
    return max(seconds, 0.0)


def fetch_urls(
    urls: list[str], cfg: HttpConfig, rules: UrlRules | None = None, resolver: AbstractResolver | None = None
) -> list[FetchResult]:
    """Synchronous entry point: fetch ``urls`` and return one result per URL, in input order.

    Safe to call from code that already runs an event loop (the fetch then runs in a thread).
    """
    fetcher = Fetcher(cfg, rules, resolver)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fetcher.fetch_many(list(urls)))
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(fetcher.fetch_many(list(urls)))
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="curation-fetch")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
