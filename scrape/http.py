"""Polite, guarded HTTP for the scraper: robots.txt, per-host delay, retries with backoff, conditional GET, a
whole-request deadline, a size cap and an address guard.

    from scrape.http import HttpArgs, PoliteSession
    with PoliteSession(HttpArgs(delay=2.0), state=Path("out/http_state.json")) as http:
        page = http.get("https://decrypt.co/feed", conditional=True)   # Page(status=200|304, content, ...)
        page = http.get(item_url, origin="https://decrypt.co/feed")     # a link found in that feed

Every request has a deadline for the whole exchange (connect, headers and body), not per read: a server that drips
a byte every half second is cut off when it passes. 429, 5xx, timeouts and connection errors are retried with
exponential backoff and full jitter; a `Retry-After` header (seconds or an HTTP date) sets the wait instead.
robots.txt is fetched once per host and run (RFC 9309: a 4xx robots.txt allows everything; a 5xx or unreachable one
disallows everything *for now*, raised as `RobotsUnavailable` so the caller retries the host on its next run), and
its Crawl-delay raises the per-host delay up to a cap. ETag / Last-Modified of conditional requests persist in a
JSON state file. Redirect hops and discovered links that resolve to loopback, private, link-local or other
non-public addresses are refused (`Refused`) unless the start URL was itself such an address (a test server on
127.0.0.1, an intranet mirror); the address a connection really reached is checked too, so DNS that changes its
answer between the check and the connect gains nothing.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import ipaddress
import logging
import random
import re
import socket
import threading
import time
import urllib.robotparser
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from jsonl import write_json

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class HttpArgs:
    user_agent: str = field(
        default="LLM-training-scraper/0.1 (crypto-news research corpus; obeys robots.txt)",
        metadata={"help": "User-Agent sent with every request and matched against robots.txt; add a contact URL"})
    timeout: float = field(default=20.0, metadata={
        "help": "seconds for one whole request (connect, headers and body): a deadline, not a per-read timeout"})
    delay: float = field(default=2.0, metadata={"help": "minimum seconds between two requests to one host"})
    max_crawl_delay: float = field(default=30.0, metadata={
        "help": "cap on a robots.txt Crawl-delay (a site asking for more is crawled at this pace, with a log line)"})
    max_retries: int = field(default=4, metadata={"help": "retries after the first attempt on 429/5xx/network errors"})
    backoff: float = field(default=1.0, metadata={"help": "first retry waits up to this many seconds, then doubles"})
    max_wait: float = field(default=120.0, metadata={"help": "cap on one wait (backoff or Retry-After)"})
    max_bytes: int = field(default=5_000_000, metadata={"help": "size cap of one response body"})
    max_redirects: int = field(default=5, metadata={"help": "redirects followed per request"})

    def __post_init__(self):
        for name in ("timeout", "max_wait"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("delay", "max_crawl_delay", "max_retries", "backoff", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes={self.max_bytes} must be > 0")
        if not self.user_agent.strip():
            raise ValueError("user_agent is empty; name the bot and a contact URL")


class FetchError(Exception):
    """A request that failed for good (after retries, or a status that retrying cannot fix)."""

    def __init__(self, url: str, reason: str, status: int | None = None):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.status = url, reason, status


class Disallowed(FetchError):
    """robots.txt forbids this URL for our User-Agent."""


class RobotsUnavailable(Disallowed):
    """The host's robots.txt answered 5xx or not at all: RFC 9309 2.3.1.4 says assume a complete disallow, but only
    for now. Nothing is known about the URL; try the host again on a later run."""


class Refused(FetchError):
    """A URL we will not fetch: not http(s), or (reached from a public start URL) a host on a loopback, private,
    link-local or otherwise non-public address, where a redirect or a feed link could make us read an internal
    service."""


@dataclass
class Page:
    url: str                       # final URL after redirects
    status: int                    # 200, or 304 for a conditional request whose resource did not change
    content: bytes
    headers: dict

    @property
    def not_modified(self) -> bool:
        return self.status == 304

    @property
    def encoding(self) -> str | None:
        """The charset the server declared, if any (no ISO-8859-1 default: the page's <meta> knows better)."""
        found = re.search(r"charset=[\"']?([\w.:-]+)", self.headers.get("content-type", ""), re.I)
        return found.group(1) if found else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


# -- the address guard
def is_public_ip(address: str) -> bool:
    """False for loopback, private, link-local, shared (CGNAT), multicast, reserved and unspecified addresses,
    IPv4-mapped IPv6 ones included (::ffff:127.0.0.1 is loopback)."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone (fe80::1%eth0) is not part of the address
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({info[4][0] for info in infos})


def non_public_address(url: str) -> str | None:
    """The first non-public address the host of `url` resolves to, else None (also when it does not resolve: the
    connection then fails, or reaches an address the connect-time check judges)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return next((a for a in resolve(parts.hostname or "", port) if not is_public_ip(a)), None)


_local = threading.local()  # .guard: the _Guard of the request this thread is sending, if any


class _Guard:
    """The deadline and address policy of one request: a timer shuts down its sockets when the deadline passes
    (a blocked read then returns at once), and each new connection's peer address is checked."""

    def __init__(self, url: str, seconds: float, allow_internal: bool):
        self.url, self.seconds, self.allow_internal = url, seconds, allow_internal
        self.deadline = time.monotonic() + seconds
        self.conns: list = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Guard:
        _local.guard = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _local.guard = None

    def _expire(self) -> None:
        self.expired = True
        for conn in self.conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:  # socket.socket's own shutdown: SSLSocket's would unwrap TLS under the reading thread
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def check_clock(self) -> None:
        if self.expired or time.monotonic() > self.deadline:
            self.expired = True
            raise _DeadlineExceeded()

    def check_peer(self, sock: socket.socket) -> None:
        peer = sock.getpeername()[0]
        if not self.allow_internal and not is_public_ip(peer):
            raise Refused(self.url, f"connected to non-public address {peer}; only a start URL on such an "
                                    f"address may lead there")


class _DeadlineExceeded(Exception):
    pass


class _GuardedConnection:
    """Checks the peer of each new connection against the request's guard (unless it is a proxy's)."""

    def _new_conn(self):
        sock = super()._new_conn()
        guard = getattr(_local, "guard", None)
        if guard is not None and getattr(self, "proxy", None) is None:
            try:
                guard.check_peer(sock)
            except Refused:
                sock.close()
                raise
        return sock


class _GuardedPool:
    """Hands the request's guard every connection it uses, reused keep-alive ones included."""

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        guard = getattr(_local, "guard", None)
        if guard is not None:
            guard.conns.append(conn)
        return conn


class _HTTPPool(_GuardedPool, HTTPConnectionPool):
    ConnectionCls = type("_GuardedHTTPConnection", (_GuardedConnection, HTTPConnection), {})


class _HTTPSPool(_GuardedPool, HTTPSConnectionPool):
    ConnectionCls = type("_GuardedHTTPSConnection", (_GuardedConnection, HTTPSConnection), {})


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS managers bring pools of their own: left as they are
            manager.pool_classes_by_scheme = _POOLS
        return manager


class _Retry(Exception):
    """One attempt that failed in a way a later attempt may not (429, 5xx, timeouts, network errors)."""

    def __init__(self, reason: str, status: int | None = None, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.wait = reason, status, wait


class PoliteSession:
    """One `requests.Session` that is polite to every host it talks to, and careful where it goes."""

    def __init__(self, args: HttpArgs | None = None, state: Path | None = None, sleep=time.sleep):
        self.args = args or HttpArgs()
        self.session = requests.Session()
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, _GuardedAdapter())
        self.session.headers.update({"User-Agent": self.args.user_agent, "Accept-Encoding": "gzip, deflate"})
        self.state_path = Path(state) if state else None
        self.validators: dict[str, dict] = self._load_state() if self.state_path else {}
        self._sleep = sleep               # injectable so tests can record the waits
        self._robots: dict[str, urllib.robotparser.RobotFileParser] = {}
        self._robots_down: dict[str, str] = {}   # host -> why its robots.txt could not be read this run
        self._delay: dict[str, float] = {}       # host -> its Crawl-delay, capped
        self._internal: dict[str, bool] = {}     # host -> resolves to a non-public address
        self._last: dict[str, float] = {}
        self.requests = 0                 # requests sent on the wire (robots.txt included)

    def _load_state(self) -> dict[str, dict]:
        if not self.state_path.exists():
            return {}
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.state_path}: not valid JSON ({e}); delete it to start fresh") from e
        bad = next((k for k, v in data.items() if not isinstance(v, dict)), None) if isinstance(data, dict) else ""
        if bad is not None:
            where = f"key {bad!r}: expected {{etag, last_modified}}" if bad else "expected an object of URLs"
            raise ValueError(f"{self.state_path}: {where}; delete the file to start fresh (feeds are fetched whole)")
        return data

    # -- context manager: the validators are saved on exit
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.save()
        self.session.close()

    def save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.state_path, self.validators, indent=0)

    # -- politeness
    def robots(self, url: str, allow_internal: bool = True) -> urllib.robotparser.RobotFileParser:
        """The parsed robots.txt of `url`'s host, fetched on first use (once per run)."""
        host = _host(url)
        if host not in self._robots:
            rp = urllib.robotparser.RobotFileParser(host + "/robots.txt")
            try:
                _, resp, body = self._follow(host + "/robots.txt", {}, False, allow_internal)
                if resp.status_code >= 500:
                    rp.disallow_all = True  # RFC 9309 2.3.1.4: server error -> assume complete disallow, for now
                    self._robots_down[host] = f"HTTP {resp.status_code}"
                elif resp.status_code >= 400:
                    rp.allow_all = True     # RFC 9309 2.3.1.3: unavailable -> no rules
                else:
                    rp.parse(body.decode("utf-8", "replace").splitlines())
            except Refused as e:
                if _host(e.url) == host:    # the host itself is off limits: so is every URL on it
                    raise
                rp.disallow_all = True      # robots.txt redirected somewhere we do not go: as if unreachable
                self._robots_down[host] = e.reason
            except FetchError as e:
                rp.disallow_all = True      # unreachable: do not crawl blind
                self._robots_down[host] = e.reason
            if host in self._robots_down:
                log.warning("%s/robots.txt unavailable (%s): the host is deferred to the next run", host,
                            self._robots_down[host])
            self._robots[host] = rp
            self._delay[host] = self._crawl_delay(host, rp)
        return self._robots[host]

    def _crawl_delay(self, host: str, rp: urllib.robotparser.RobotFileParser) -> float:
        asked = float(rp.crawl_delay(self.args.user_agent) or 0)
        if asked > self.args.max_crawl_delay:
            log.warning("%s asks for Crawl-delay %gs; capped at max_crawl_delay=%gs", host, asked,
                        self.args.max_crawl_delay)
        return min(asked, self.args.max_crawl_delay)

    def allowed(self, url: str, allow_internal: bool = True) -> bool:
        return self.robots(url, allow_internal).can_fetch(self.args.user_agent, url)

    def _check_robots(self, url: str, allow_internal: bool) -> None:
        allowed = self.allowed(url, allow_internal)
        host = _host(url)
        if host in self._robots_down:
            raise RobotsUnavailable(url, f"robots.txt of {host} unavailable ({self._robots_down[host]}); "
                                         f"RFC 9309: disallowed for now, the host is tried again next run")
        if not allowed:
            raise Disallowed(url, "disallowed by robots.txt")

    def _wait_turn(self, host: str) -> None:
        delay = max(self.args.delay, self._delay.get(host, 0.0))
        if host in self._last:
            wait = self._last[host] + delay - time.monotonic()
            if wait > 0:
                self._sleep(wait)
        self._last[host] = time.monotonic()

    # -- the wire
    def _send(self, url: str, headers: dict, allow_internal: bool) -> tuple[requests.Response, bytes]:
        """One request with retries; no redirects followed; the whole exchange under one deadline and the size cap."""
        for attempt in range(self.args.max_retries + 1):
            self._wait_turn(_host(url))
            self.requests += 1
            try:
                with _Guard(url, self.args.timeout, allow_internal) as guard:
                    return self._exchange(url, headers, guard)
            except _Retry as e:
                reason, status, wait = e.reason, e.status, e.wait
            if attempt == self.args.max_retries:
                raise FetchError(url, f"{reason} after {attempt + 1} attempts", status)
            if wait is None:  # exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff")
                wait = random.uniform(0, self.args.backoff * 2 ** attempt)
            elif wait > self.args.max_wait:
                raise FetchError(url, f"{reason}; Retry-After {wait:.0f}s exceeds max_wait", status)
            log.info("retry %d for %s in %.1fs (%s)", attempt + 1, url, wait, reason)
            self._sleep(min(wait, self.args.max_wait))
        raise AssertionError("unreachable")

    def _exchange(self, url: str, headers: dict, guard: _Guard) -> tuple[requests.Response, bytes]:
        """One attempt: headers, then the body; a retryable failure raises _Retry."""
        try:
            resp = self.session.get(url, headers=headers, timeout=self.args.timeout, stream=True,
                                    allow_redirects=False)
            if resp.status_code in RETRY_STATUS:
                resp.close()
                raise _Retry(f"HTTP {resp.status_code}", resp.status_code,
                             retry_after_seconds(resp.headers.get("Retry-After")))
            return resp, self._read_capped(url, resp, guard)
        except (_DeadlineExceeded, requests.RequestException, http.client.HTTPException, OSError, ValueError) as e:
            # after the deadline's timer shut the socket, any of these may come out of requests / urllib3 / ssl
            if guard.expired or isinstance(e, _DeadlineExceeded):
                raise _Retry(f"Timeout: no whole response within the deadline timeout={self.args.timeout:g}s") from e
            if isinstance(e, (requests.ConnectionError, requests.Timeout)):
                raise _Retry(f"{type(e).__name__}: {e}") from e
            if isinstance(e, requests.RequestException):
                raise FetchError(url, f"{type(e).__name__}: {e}") from e
            raise

    def _read_capped(self, url: str, resp: requests.Response, guard: _Guard) -> bytes:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.args.max_bytes:
            resp.close()
            raise FetchError(url, f"Content-Length {length} exceeds max_bytes={self.args.max_bytes}", resp.status_code)
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(16 * 1024):
                guard.check_clock()
                size += len(chunk)
                if size > self.args.max_bytes:
                    raise FetchError(url, f"body exceeds max_bytes={self.args.max_bytes}", resp.status_code)
                chunks.append(chunk)
            guard.check_clock()  # a body cut short by the deadline's shutdown may look complete
        finally:
            resp.close()
        return b"".join(chunks)

    def get(self, url: str, conditional: bool = False, origin: str | None = None) -> Page:
        """GET `url` politely. `conditional` sends the stored ETag / Last-Modified and may return a 304 Page.
        `origin` is the start URL (a feed, a sitemap) where `url` was found: unless it is itself on a non-public
        address, `url` and its redirects must not be."""
        known = self.validators.get(url, {}) if conditional else {}
        headers = {}
        if known.get("etag"):
            headers["If-None-Match"] = known["etag"]
        if known.get("last_modified"):
            headers["If-Modified-Since"] = known["last_modified"]
        final, resp, body = self._follow(url, headers, True, self._is_internal(origin or url))
        if resp.status_code == 304 and known:
            return Page(final, 304, b"", {k.lower(): v for k, v in resp.headers.items()})
        if resp.status_code != 200:
            raise FetchError(final, f"HTTP {resp.status_code}", resp.status_code)
        if conditional:  # keyed by the URL asked for, so the next run finds it before any redirect
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if etag or modified:
                self.validators[url] = {"etag": etag, "last_modified": modified}
        return Page(final, 200, body, {k.lower(): v for k, v in resp.headers.items()})

    def forget(self, url: str) -> None:
        """Drop the stored validators of `url`, so the next conditional GET fetches the whole body."""
        self.validators.pop(url, None)

    def _is_internal(self, url: str) -> bool:
        """Whether `url`'s host resolves to a non-public address (cached per run; the connect-time peer check
        catches an answer that changes later)."""
        host = (urlsplit(url).hostname or "").lower()
        if host not in self._internal:
            self._internal[host] = non_public_address(url) is not None
        return self._internal[host]

    def _follow(self, url: str, headers: dict, check_robots: bool,
                allow_internal: bool) -> tuple[str, requests.Response, bytes]:
        """Send, following at most max_redirects redirects, each hop checked: http(s) only, a public address
        unless allow_internal, and its host's robots.txt."""
        for _ in range(self.args.max_redirects + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise Refused(url, "only http and https URLs are fetched")
            if not allow_internal and self._is_internal(url):
                raise Refused(url, f"{urlsplit(url).hostname} resolves to non-public address "
                                   f"{non_public_address(url)}; only a start URL on such an address may lead there")
            if check_robots:
                self._check_robots(url, allow_internal)
            resp, body = self._send(url, headers, allow_internal)
            if not (resp.is_redirect and resp.headers.get("Location")):
                return url, resp, body
            url = urljoin(url, resp.headers["Location"])
        raise FetchError(url, f"more than max_redirects={self.args.max_redirects} redirects")
