"""A scripted news site on 127.0.0.1 for the scraper tests: feeds, sitemaps, pages, robots.txt, 429/500, slow
responses, redirects and big bodies, each request recorded."""
from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "scrape"
ETAG = '"feed-v1"'
LAST_MODIFIED = "Mon, 07 Apr 2025 16:00:00 GMT"
XML = {"/feed.xml": "feed.xml", "/atom.xml": "atom.xml", "/sitemap-index.xml": "sitemap-index.xml",
       "/news-sitemap.xml": "news-sitemap.xml"}
REDIRECTS = {"/redirect/plain": "/news/article-plain.html", "/redirect/private": "/private/secret.html",
             "/redirect/absolute": "{base}/news/article-og.html", "/loop": "/loop"}


class Site:
    """The server's script and its request log."""

    def __init__(self, robots_status: int = 200, robots_body: str | None = None):
        self.robots_status = robots_status
        self.robots_body = robots_body
        self.slow_seconds = 2.0
        self.log: list[tuple[str, dict]] = []   # (path, headers) in arrival order
        self.lock = threading.Lock()
        self.base = ""

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.log if p == path)

    def paths(self) -> Counter:
        return Counter(p for p, _ in self.log)

    def fixture(self, name: str) -> bytes:
        return (ASSETS / name).read_text(encoding="utf-8").replace("{{BASE}}", self.base).encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    site: Site

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/html; charset=utf-8", headers=None,
              length: bool = True):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, size cap): expected

    def do_GET(self):
        site = self.site
        path = self.path.split("?")[0]
        with site.lock:
            site.log.append((path, dict(self.headers)))
            n = site.hits(path)
        if path == "/robots.txt":
            if site.robots_status != 200:
                return self._send(site.robots_status, b"no")
            body = site.robots_body.encode() if site.robots_body is not None else site.fixture("robots.txt")
            return self._send(200, body, "text/plain")
        if path in XML:
            if self.headers.get("If-None-Match") == ETAG or self.headers.get("If-Modified-Since") == LAST_MODIFIED:
                return self._send(304, headers={"ETag": ETAG})
            return self._send(200, site.fixture(XML[path]), "application/xml",
                              {"ETag": ETAG, "Last-Modified": LAST_MODIFIED})
        if path in REDIRECTS:
            return self._send(301 if path == "/redirect/plain" else 302,
                              headers={"Location": REDIRECTS[path].format(base=site.base)})
        if path.startswith("/news/") or path.startswith("/private/"):
            name = "private.html" if path.startswith("/private/") else path.removeprefix("/news/")
            if (ASSETS / name).is_file():
                return self._send(200, site.fixture(name))
            return self._send(404, b"not found")
        if path == "/flaky":  # two 503s, then the page
            return self._send(503, b"busy") if n <= 2 else self._send(200, site.fixture("article-plain.html"))
        if path == "/rate-limited":  # one 429 asking for a 1 s pause, then the page
            if n == 1:
                return self._send(429, b"slow down", headers={"Retry-After": "1"})
            return self._send(200, site.fixture("article-plain.html"))
        if path == "/rate-limited-long":
            return self._send(429, b"come back tomorrow", headers={"Retry-After": "86400"})
        if path == "/always-500":
            return self._send(500, b"broken")
        if path == "/slow":
            time.sleep(site.slow_seconds)
            return self._send(200, b"too late")
        if path == "/big":
            return self._send(200, b"x" * 20_000)
        if path == "/big-unsized":  # no Content-Length: the cap must hold while streaming
            return self._send(200, b"x" * 200_000, length=False)
        return self._send(404, b"not found")


def _serve(site: Site):
    handler = type("Handler", (_Handler,), {"site": site})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.handle_error = lambda *a: None  # clients hanging up early are part of the script
    site.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


@pytest.fixture
def site():
    s = Site()
    server = _serve(s)
    yield s
    server.shutdown()
    server.server_close()


@pytest.fixture
def site_factory():
    servers = []

    def make(**kw) -> Site:
        s = Site(**kw)
        servers.append(_serve(s))
        return s

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()
