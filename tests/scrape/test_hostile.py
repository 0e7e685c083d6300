"""The scraper against hostile or failing web servers on 127.0.0.1: a robots.txt outage that must not lose
articles, servers that drip bytes, redirects and feed links into internal addresses, an absurd Crawl-delay.

Addresses such as 10.0.0.7 or 169.254.169.254 are refused before any connection, so no test reaches them. To play
a *public* start URL, the tests declare 127.0.0.1 public (monkeypatching `scrape.http.is_public_ip`); every other
non-public address stays internal."""
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import scrape.http as http_mod
from scrape.__main__ import ScrapeArgs, scrape
from scrape.http import FetchError, HttpArgs, PoliteSession, Refused, RobotsUnavailable, is_public_ip
from scrape.sources import Source
from tests.scrape.conftest import ASSETS

FAST = HttpArgs(delay=0.0, backoff=0.01, max_retries=1, timeout=5.0)
ARTICLES = ["article-jsonld.html", "article-og.html", "article-plain.html", "article-sitemap.html"]


class Sleeps(list):
    def __call__(self, seconds: float):
        self.append(seconds)


class Scripted:
    """A server whose routes are functions of the request handler; `hits` counts requests per path."""

    def __init__(self, routes: dict):
        self.routes, self.hits, self.stop = routes, {}, threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                site.hits[path] = site.hits.get(path, 0) + 1
                route = site.routes.get(path)
                if route is None:
                    return send(self, 404, b"not found")
                return route(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def send(handler, status: int, body: bytes = b"", headers: dict | None = None):
    handler.send_response(status)
    for k, v in {"Content-Type": "text/html; charset=utf-8", "Content-Length": str(len(body)),
                 **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except OSError:
        pass


@pytest.fixture
def scripted():
    servers = []

    def make(routes: dict) -> Scripted:
        servers.append(Scripted(routes))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def public_loopback(monkeypatch):
    """127.0.0.1 plays a public address; every other loopback, private or link-local address stays internal."""
    monkeypatch.setattr(http_mod, "is_public_ip", lambda a: a == "127.0.0.1" or is_public_ip(a))


def session(sleeps=None, **kw) -> PoliteSession:
    return PoliteSession(HttpArgs(**{"delay": 0.0, "backoff": 0.01, "timeout": 5.0, **kw}),
                         sleep=Sleeps() if sleeps is None else sleeps)


# -- robots.txt outages defer, never skip
def rss(links: list[str]) -> bytes:
    items = "".join(f"<item><title>t{i}</title><link>{u}</link><pubDate>Mon, 07 Apr 2025 1{i}:00:00 GMT</pubDate>"
                    f"</item>" for i, u in enumerate(links))
    return f'<?xml version="1.0"?><rss version="2.0"><channel><title>x</title>{items}</channel></rss>'.encode()


def test_a_host_whose_robots_txt_fails_then_recovers_gets_all_its_articles(site_factory, scripted, tmp_path):
    pages = site_factory(robots_status=503)  # the article host: robots.txt down on the first run
    links = [f"{pages.base}/news/{name}" for name in ARTICLES]
    feeds = scripted({"/robots.txt": lambda h: send(h, 404), "/feed.xml": lambda h: send(h, 200, rss(links))})
    registry = {"split": Source("split", feeds.base, feeds=(feeds.base + "/feed.xml",))}
    out = tmp_path / "articles.jsonl"

    first = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry)["split"]
    assert first["new"] == 0 and first["deferred"] == 4 and first["disallowed"] == 0
    state = json.loads((tmp_path / "articles.jsonl.state.json").read_text())
    assert state["skip"] == {}  # nothing given up on
    assert not any(pages.hits(f"/news/{name}") for name in ARTICLES)

    pages.robots_status = 200  # the site recovers
    second = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry)["split"]
    assert second["new"] == 4 and second["deferred"] == 0
    urls = [json.loads(line)["url"] for line in out.read_text().splitlines()]
    assert sorted(urls) == sorted(links)


def test_an_unreachable_robots_txt_defers_with_its_own_message(scripted, caplog):
    def hang_up(h):
        h.close_connection = True  # no answer at all: a connection error, retried, then "unreachable"

    down = scripted({"/robots.txt": hang_up, "/a.html": lambda h: send(h, 200, b"hi")})
    with caplog.at_level(logging.WARNING), session(max_retries=1) as http:
        with pytest.raises(RobotsUnavailable) as err:
            http.get(down.base + "/a.html")
    assert "robots.txt" in str(err.value) and "next run" in str(err.value) and down.base in str(err.value)
    assert "disallowed by robots.txt" not in str(err.value)
    assert "deferred to the next run" in caplog.text
    assert down.hits.get("/a.html") is None and down.hits["/robots.txt"] == 2


def test_a_real_disallow_is_remembered_and_old_ambiguous_skips_are_checked_again(site, tmp_path):
    out = tmp_path / "articles.jsonl"
    registry = {"t": Source("t", site.base, feeds=(site.base + "/feed.xml",))}
    scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry)
    state_path = tmp_path / "articles.jsonl.state.json"
    state = json.loads(state_path.read_text())
    secret = site.base + "/private/secret.html"
    assert state["skip"][secret] == "disallowed by robots.txt"
    # a state file written before outages were told apart: its "robots.txt" entries are judged again
    plain = site.base + "/news/article-plain.html"
    state["skip"] = {secret: "robots.txt"}
    state_path.write_text(json.dumps(state))
    out.write_text("")
    stats = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry)["t"]
    assert stats["disallowed"] == 1 and stats["new"] == 3
    assert site.hits("/private/secret.html") == 0 and plain in out.read_text()


# -- a whole-request deadline
def drip_body(h):
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    for _ in range(1000):  # 500 s at this pace, unless the client hangs up
        try:
            h.wfile.write(b"x")
            h.wfile.flush()
        except OSError:
            return
        time.sleep(0.5)


def drip_headers(h):
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(1000):
        try:
            h.wfile.write(f"X-Drip-{i}: y\r\n".encode())
            h.wfile.flush()
        except OSError:
            return
        time.sleep(0.5)


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_dripping_server_is_cut_off_at_the_deadline(scripted, path):
    server = scripted({"/robots.txt": lambda h: send(h, 404), "/drip-body": drip_body, "/drip-headers": drip_headers})
    with session(timeout=1.5, max_retries=1) as http:
        with pytest.raises(FetchError, match="deadline") as err:
            http.get(server.base + path)
    assert path in str(err.value) and "2 attempts" in str(err.value)  # a deadline is retried like a timeout
    assert server.hits[path] == 2


def test_body_size_cap_holds_while_streaming(scripted):
    def endless(h):
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for _ in range(10_000):
                h.wfile.write(b"y" * 1024)
        except OSError:
            pass

    server = scripted({"/robots.txt": lambda h: send(h, 404), "/endless": endless})
    with session(max_bytes=50_000) as http:
        with pytest.raises(FetchError, match="max_bytes=50000") as err:
            http.get(server.base + "/endless")
    assert "/endless" in str(err.value)


# -- the address guard
INTERNAL = ["http://10.0.0.7/admin", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/x", "http://192.168.1.1/", "http://100.64.0.1/", "http://0.0.0.0/"]


def test_internal_addresses_are_not_public():
    for url in INTERNAL:
        assert http_mod.non_public_address(url) is not None, url
    assert is_public_ip("93.184.216.34") and is_public_ip("2606:2800:220:1::")
    assert not is_public_ip("fe80::1%eth0") and not is_public_ip("224.0.0.1")


@pytest.mark.parametrize("target", INTERNAL + ["file:///etc/passwd", "ftp://ftp.example/x", "gopher://x/"])
def test_redirects_from_a_public_start_into_internal_addresses_are_refused(scripted, public_loopback, target):
    server = scripted({"/robots.txt": lambda h: send(h, 404),
                       "/go": lambda h: send(h, 302, headers={"Location": target})})
    with session() as http:
        with pytest.raises(Refused) as err:
            http.get(server.base + "/go")
    assert target.split("//")[1].split("/")[0] in str(err.value) or "http and https" in str(err.value)


def test_a_start_url_on_loopback_may_redirect_to_loopback(scripted):
    server = scripted({"/robots.txt": lambda h: send(h, 404), "/page": lambda h: send(h, 200, b"ok")})
    other = scripted({"/robots.txt": lambda h: send(h, 404),
                      "/go": lambda h: send(h, 302, headers={"Location": server.base + "/page"})})
    with session() as http:
        assert http.get(other.base + "/go").content == b"ok"
        with pytest.raises(Refused):  # but not into a loopback link found on a public page
            http.get(server.base + "/page", origin="http://93.184.216.34/feed.xml")
    assert server.hits.get("/page") == 1


def test_dns_that_changes_its_answer_is_caught_at_connect(scripted, monkeypatch):
    server = scripted({"/robots.txt": lambda h: send(h, 404), "/page": lambda h: send(h, 200, b"secret")})
    monkeypatch.setattr(http_mod, "resolve", lambda host, port: ["93.184.216.34"])  # the check sees a public answer
    with session() as http:
        with pytest.raises(Refused, match="connected to non-public address 127.0.0.1"):
            http.get(server.base + "/page")
    assert server.hits == {}  # connected, saw the peer, sent nothing


def test_feed_links_into_internal_addresses_are_refused(scripted, public_loopback, tmp_path):
    links = INTERNAL[:3] + ["file:///etc/passwd"]
    feeds = scripted({"/robots.txt": lambda h: send(h, 404), "/feed.xml": lambda h: send(h, 200, rss(links))})
    registry = {"evil": Source("evil", feeds.base, feeds=(feeds.base + "/feed.xml",))}
    out = tmp_path / "articles.jsonl"
    stats = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry)["evil"]
    assert stats["refused"] == 4 and stats["new"] == 0 and stats["failed"] == 0


# -- Crawl-delay
def test_crawl_delay_is_capped_with_a_log_line(site_factory, caplog):
    greedy = site_factory(robots_body="User-agent: *\nCrawl-delay: 86400\n")
    sleeps = Sleeps()
    with caplog.at_level(logging.WARNING), session(sleeps=sleeps, max_crawl_delay=30.0) as http:
        http.get(greedy.base + "/news/article-plain.html")
        http.get(greedy.base + "/news/article-og.html")
    assert len(sleeps) == 2 and all(20.0 < s <= 30.0 for s in sleeps)
    assert "Crawl-delay 86400s" in caplog.text and "max_crawl_delay=30s" in caplog.text


# -- state files name their path and key
@pytest.mark.parametrize("content,match", [
    ('{"skip": []}', "key 'skip' must be an object"),
    ('{"skip": {"https://a.example/1": 3}}', r"skip\['https://a.example/1'\] is malformed"),
    ('{"feeds": {"https://a.example/f": {"items": []}}}', r"feeds\['https://a.example/f'\] is malformed"),
    ('[1, 2]', "expected a JSON object"),
    ("\xff{", "not valid JSON"),
])
def test_a_bad_scrape_state_names_its_file_and_key(site, tmp_path, content, match):
    out = tmp_path / "articles.jsonl"
    (tmp_path / "articles.jsonl.state.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=match) as err:
        scrape(ScrapeArgs(out=out), FAST, {"t": Source("t", site.base, feeds=(site.base + "/feed.xml",))})
    assert "articles.jsonl.state.json" in str(err.value)


@pytest.mark.parametrize("content,match", [("[1]", "expected an object of URLs"),
                                           ('{"https://a.example/f": "etag"}', "key 'https://a.example/f'")])
def test_a_bad_http_state_names_its_file_and_key(tmp_path, content, match):
    (tmp_path / "http.json").write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        PoliteSession(FAST, state=tmp_path / "http.json")
    assert "http.json" in str(err.value)
