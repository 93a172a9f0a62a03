"""A real HTTP server on 127.0.0.1, in a thread, with the faults a web crawl meets.

Reusable by any test that downloads images::

    from tests.http_fixtures import ImageServer

    with ImageServer() as server:
        url = server.url("/img/0.jpg")          # server.image(0) is the body
        fetch_urls([url], HttpConfig(**LOOPBACK_HTTP))

The crawler refuses loopback addresses by default (SSRF protection), so every crawl of this
server sets ``allow_private_addresses`` (``LOOPBACK_HTTP``). ``ImageServer(host="127.0.0.2")``
binds another loopback address (Linux answers on all of 127/8).

It serves real photographs from ``../shared/data/pool_caltech101`` when that folder exists and
generated JPEGs otherwise. Routes:

====================================  =============================================================
``/img/<i>.jpg[?delay=s]``            image ``i`` (optionally after holding the request ``s`` s)
``/status/<code>[?retry_after=n]``    that status with a short text body
``/flaky/<token>/<fails>/<i>.jpg``    500 for the first ``fails`` requests of ``token``, then image
``/slow/<seconds>``                   sleeps before sending headers, then image 0
``/truncated``                        Content-Length of image 0, half its bytes, connection closed
``/big/<n>``                          ``n`` bytes (a JPEG header + padding) with Content-Length
``/big-stream/<n>``                   the same without Content-Length (only the stream shows size)
``/redirect/<n>/<i>.jpg``             a chain of ``n`` (>= 1) redirects ending at image ``i``
``/loop``                             redirects to itself forever
``/redirect-to?location=<url>``       302 to any location (``file:///etc/passwd``, another host)
``/html``                             200 text/html page
``/robots/<i>.jpg?tag=<value>``       image ``i`` with ``X-Robots-Tag: <value>`` (repeat ``tag``)
``/echo-host``                        200 text/plain whose body is the request's Host header
``/empty``                            200 with an empty body
====================================  =============================================================

``server.max_in_flight`` is the largest number of requests handled at once since the last
``reset_stats()``; ``server.hits(prefix)`` counts requests whose path starts with ``prefix``;
``server.stream_bytes_sent`` is what ``/big-stream`` managed to write before the client left.
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# HttpConfig settings every crawl of a 127.0.0.1 test server needs.
LOOPBACK_HTTP = {"allow_private_addresses": True}

SHARED_POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pool_caltech101"


def generated_jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype="uint8")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def load_images(n: int) -> list[bytes]:
    """``n`` distinct JPEGs: real ones from the shared pool when present, else generated."""
    if SHARED_POOL.is_dir():
        paths = sorted(SHARED_POOL.rglob("*.jpg"))[:n]
        if len(paths) == n:
            return [p.read_bytes() for p in paths]
    return [generated_jpeg(i) for i in range(n)]


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.paths: list[str] = []
        self.flaky: dict[str, int] = {}
        self.stream_bytes_sent = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: "_Server"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        stats = self.server.stats
        with stats.lock:
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.paths.append(self.path)
        self._counted = True
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, byte caps): expected in these tests
        finally:
            self._leave()

    def _leave(self) -> None:
        """A request stops counting as in flight once its response starts: the client cannot
        have finished with it before that, so the count never overstates client concurrency."""
        if self._counted:
            self._counted = False
            with self.server.stats.lock:
                self.server.stats.in_flight -= 1

    def send_response(self, code, message=None) -> None:
        self._leave()
        super().send_response(code, message)

    # -- helpers ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers=None) -> None:
        """``headers``: a dict, or a list of (name, value) pairs when a name repeats."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers.items() if isinstance(headers, dict) else headers or []):
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _image(self, token: str) -> bytes:
        images = self.server.images
        return images[int(token.split(".")[0]) % len(images)]

    def _route(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        seg = [s for s in parts.path.split("/") if s]
        head = seg[0] if seg else ""
        if head == "img":
            if "delay" in query:
                time.sleep(float(query["delay"]))
            self._send(200, self._image(seg[1]))
        elif head == "status":
            headers = {"Retry-After": query["retry_after"]} if "retry_after" in query else None
            self._send(int(seg[1]), f"status {seg[1]}\n".encode(), "text/plain", headers)
        elif head == "flaky":
            token, fails = seg[1], int(seg[2])
            with self.server.stats.lock:
                seen = self.server.stats.flaky.get(token, 0)
                self.server.stats.flaky[token] = seen + 1
            if seen < fails:
                self._send(500, b"try again\n", "text/plain")
            else:
                self._send(200, self._image(seg[3]))
        elif head == "slow":
            time.sleep(float(seg[1]))
            self._send(200, self._image("0"))
        elif head == "truncated":
            body = self._image("0")
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif head == "big":
            n = int(seg[1])
            self._send(200, self._image("0")[:64] + b"\0" * max(0, n - 64))
        elif head == "big-stream":
            self._stream(int(seg[1]))
        elif head == "redirect":
            n = int(seg[1])
            self._redirect(f"/redirect/{n - 1}/{seg[2]}" if n > 1 else f"/img/{seg[2]}")
        elif head == "loop":
            self._redirect("/loop")
        elif head == "redirect-to":
            self._redirect(query["location"])
        elif head == "robots":
            tags = parse_qs(parts.query).get("tag", [])
            self._send(200, self._image(seg[1]), headers=[("X-Robots-Tag", t) for t in tags])
        elif head == "echo-host":
            self._send(200, (self.headers.get("Host") or "").encode(), "text/plain")
        elif head == "html":
            self._send(200, b"<!doctype html><html><body><img src='/img/0.jpg'></body></html>", "text/html; charset=utf-8")
        elif head == "empty":
            self._send(200, b"")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _stream(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        chunk = b"\0" * 65536
        sent = 0
        try:
            head = self._image("0")[:64]
            self.wfile.write(head)
            sent = len(head)
            while sent < n:
                part = chunk[: min(len(chunk), n - sent)]
                self.wfile.write(part)
                sent += len(part)
        finally:
            with self.server.stats.lock:
                self.server.stats.stream_bytes_sent = sent
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, images: list[bytes], host: str):
        super().__init__((host, 0), _Handler)
        self.images = images
        self.stats = _Stats()


class ImageServer:
    """Context manager running the fault-injecting image server in a background thread."""

    def __init__(self, n_images: int = 8, images: list[bytes] | None = None, host: str = "127.0.0.1"):
        self.host = host
        self._images = images if images is not None else load_images(n_images)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ImageServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._server = _Server(self._images, self.host)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def image(self, i: int) -> bytes:
        return self._images[i % len(self._images)]

    @property
    def max_in_flight(self) -> int:
        return self._server.stats.max_in_flight

    @property
    def stream_bytes_sent(self) -> int:
        return self._server.stats.stream_bytes_sent

    def hits(self, prefix: str) -> int:
        with self._server.stats.lock:
            return sum(p.startswith(prefix) for p in self._server.stats.paths)

    def reset_stats(self) -> None:
        with self._server.stats.lock:
            self._server.stats.max_in_flight = self._server.stats.in_flight
            self._server.stats.paths.clear()
            self._server.stats.flaky.clear()
            self._server.stats.stream_bytes_sent = 0
