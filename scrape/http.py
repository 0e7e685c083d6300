"""Polite HTTP for the scraper: robots.txt, per-host delay, retries with backoff, conditional GET, size cap.

    from scrape.http import HttpArgs, PoliteSession
    with PoliteSession(HttpArgs(delay=2.0), state=Path("out/http_state.json")) as http:
        page = http.get("https://decrypt.co/feed", conditional=True)   # Page(status=200|304, content, ...)

Every request has a timeout. 429, 5xx, timeouts and connection errors are retried with exponential backoff and
full jitter; a `Retry-After` header (seconds or an HTTP date) sets the wait instead. robots.txt is fetched once per
host (RFC 9309: a 4xx robots.txt allows everything, an unreachable one disallows everything) and its Crawl-delay
raises the per-host delay. ETag / Last-Modified of conditional requests persist in a JSON state file.
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import time
import urllib.robotparser
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class HttpArgs:
    user_agent: str = field(
        default="LLM-training-scraper/0.1 (crypto-news research corpus; obeys robots.txt)",
        metadata={"help": "User-Agent sent with every request and matched against robots.txt; add a contact URL"})
    timeout: float = field(default=20.0, metadata={"help": "seconds per request (connect and read)"})
    delay: float = field(default=2.0, metadata={"help": "minimum seconds between two requests to one host"})
    max_retries: int = field(default=4, metadata={"help": "retries after the first attempt on 429/5xx/network errors"})
    backoff: float = field(default=1.0, metadata={"help": "first retry waits up to this many seconds, then doubles"})
    max_wait: float = field(default=120.0, metadata={"help": "cap on one wait (backoff or Retry-After)"})
    max_bytes: int = field(default=5_000_000, metadata={"help": "size cap of one response body"})
    max_redirects: int = field(default=5, metadata={"help": "redirects followed per request"})

    def __post_init__(self):
        for name in ("timeout", "max_wait"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("delay", "max_retries", "backoff", "max_redirects"):
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


class PoliteSession:
    """One `requests.Session` that is polite to every host it talks to."""

    def __init__(self, args: HttpArgs | None = None, state: Path | None = None, sleep=time.sleep):
        self.args = args or HttpArgs()
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": self.args.user_agent, "Accept-Encoding": "gzip, deflate"})
        self.state_path = Path(state) if state else None
        self.validators: dict[str, dict] = {}
        if self.state_path and self.state_path.exists():
            try:
                self.validators = json.loads(self.state_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.state_path}: not valid JSON ({e}); delete it to start fresh") from e
        self._sleep = sleep               # injectable so tests can record the waits
        self._robots: dict[str, urllib.robotparser.RobotFileParser] = {}
        self._last: dict[str, float] = {}
        self.requests = 0                 # requests sent on the wire (robots.txt included)

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
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.validators, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.state_path)

    # -- politeness
    def robots(self, url: str) -> urllib.robotparser.RobotFileParser:
        """The parsed robots.txt of `url`'s host, fetched on first use."""
        host = _host(url)
        if host not in self._robots:
            rp = urllib.robotparser.RobotFileParser(host + "/robots.txt")
            try:
                _, resp, body = self._follow(host + "/robots.txt", {}, check_robots=False)
                if resp.status_code >= 500:
                    rp.disallow_all = True  # RFC 9309 2.3.1.4: server error -> assume complete disallow
                elif resp.status_code >= 400:
                    rp.allow_all = True     # RFC 9309 2.3.1.3: unavailable -> no rules
                else:
                    rp.parse(body.decode("utf-8", "replace").splitlines())
            except FetchError:
                rp.disallow_all = True      # unreachable: do not crawl blind
            self._robots[host] = rp
        return self._robots[host]

    def allowed(self, url: str) -> bool:
        return self.robots(url).can_fetch(self.args.user_agent, url)

    def _wait_turn(self, host: str) -> None:
        rp = self._robots.get(host)
        crawl_delay = rp.crawl_delay(self.args.user_agent) if rp is not None else None
        delay = max(self.args.delay, float(crawl_delay or 0))
        if host in self._last:
            wait = self._last[host] + delay - time.monotonic()
            if wait > 0:
                self._sleep(wait)
        self._last[host] = time.monotonic()

    # -- the wire
    def _send(self, url: str, headers: dict) -> tuple[requests.Response, bytes]:
        """One request with retries; no redirects followed; body read up to the size cap."""
        for attempt in range(self.args.max_retries + 1):
            self._wait_turn(_host(url))
            self.requests += 1
            wait = None
            try:
                resp = self.session.get(url, headers=headers, timeout=self.args.timeout, stream=True,
                                        allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout) as e:
                reason, status = f"{type(e).__name__}: {e}", None
            else:
                if resp.status_code not in RETRY_STATUS:
                    return resp, self._read_capped(url, resp)
                reason, status = f"HTTP {resp.status_code}", resp.status_code
                wait = retry_after_seconds(resp.headers.get("Retry-After"))
                resp.close()
            if attempt == self.args.max_retries:
                raise FetchError(url, f"{reason} after {attempt + 1} attempts", status)
            if wait is None:  # exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff")
                wait = random.uniform(0, self.args.backoff * 2 ** attempt)
            elif wait > self.args.max_wait:
                raise FetchError(url, f"{reason}; Retry-After {wait:.0f}s exceeds max_wait", status)
            log.info("retry %d for %s in %.1fs (%s)", attempt + 1, url, wait, reason)
            self._sleep(min(wait, self.args.max_wait))
        raise AssertionError("unreachable")

    def _read_capped(self, url: str, resp: requests.Response) -> bytes:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.args.max_bytes:
            resp.close()
            raise FetchError(url, f"Content-Length {length} exceeds max_bytes={self.args.max_bytes}", resp.status_code)
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(64 * 1024):
                size += len(chunk)
                if size > self.args.max_bytes:
                    raise FetchError(url, f"body exceeds max_bytes={self.args.max_bytes}", resp.status_code)
                chunks.append(chunk)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise FetchError(url, f"reading body: {e}", resp.status_code) from e
        finally:
            resp.close()
        return b"".join(chunks)

    def get(self, url: str, conditional: bool = False) -> Page:
        """GET `url` politely. `conditional` sends the stored ETag / Last-Modified and may return a 304 Page."""
        known = self.validators.get(url, {}) if conditional else {}
        headers = {}
        if known.get("etag"):
            headers["If-None-Match"] = known["etag"]
        if known.get("last_modified"):
            headers["If-Modified-Since"] = known["last_modified"]
        final, resp, body = self._follow(url, headers, check_robots=True)
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

    def _follow(self, url: str, headers: dict, check_robots: bool) -> tuple[str, requests.Response, bytes]:
        """Send, following at most max_redirects redirects, each hop checked against its host's robots.txt."""
        for _ in range(self.args.max_redirects + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise FetchError(url, "only http and https URLs are fetched")
            if check_robots and not self.allowed(url):
                raise Disallowed(url, "disallowed by robots.txt")
            resp, body = self._send(url, headers)
            if not (resp.is_redirect and resp.headers.get("Location")):
                return url, resp, body
            url = urljoin(url, resp.headers["Location"])
        raise FetchError(url, f"more than max_redirects={self.args.max_redirects} redirects")
