"""scrape/http.py against a scripted server on 127.0.0.1: robots.txt, retries, Retry-After, timeouts, redirects,
conditional GET, size cap, per-host delay. Waits are recorded instead of slept, so nothing here is about time."""
import email.utils
import json
import time

import pytest

from scrape.http import Disallowed, FetchError, HttpArgs, PoliteSession, retry_after_seconds


class Sleeps(list):
    """Stands in for time.sleep: remembers each wait."""

    def __call__(self, seconds: float):
        self.append(seconds)


def session(tmp_path=None, sleeps=None, **kw) -> PoliteSession:
    args = HttpArgs(**{"delay": 0.0, "backoff": 0.05, "timeout": 5.0, **kw})
    state = tmp_path / "http.json" if tmp_path else None
    return PoliteSession(args, state=state, sleep=Sleeps() if sleeps is None else sleeps)


def test_allowed_page_fetched_once_with_our_user_agent(site):
    with session() as http:
        page = http.get(site.base + "/news/article-plain.html")
        http.get(site.base + "/news/article-og.html")
    assert page.status == 200 and b"imaginary chain" in page.content
    assert page.encoding == "utf-8"
    assert site.hits("/news/article-plain.html") == 1
    assert site.hits("/robots.txt") == 1  # fetched once per host, not per page
    assert all(h["User-Agent"] == HttpArgs().user_agent for _, h in site.log)


def test_disallowed_page_never_requested(site):
    with session() as http:
        with pytest.raises(Disallowed):
            http.get(site.base + "/private/secret.html")
        with pytest.raises(Disallowed):  # a redirect into a disallowed folder is stopped before the hop
            http.get(site.base + "/redirect/private")
    assert site.hits("/private/secret.html") == 0
    assert site.hits("/redirect/private") == 1


def test_robots_server_error_disallows_all_and_404_allows_all(site_factory):
    broken, absent = site_factory(robots_status=503), site_factory(robots_status=404)
    with session(max_retries=1) as http:
        with pytest.raises(Disallowed):
            http.get(broken.base + "/news/article-plain.html")
        assert http.get(absent.base + "/news/article-plain.html").status == 200
    assert broken.hits("/news/article-plain.html") == 0
    assert broken.hits("/robots.txt") == 2  # robots.txt itself was retried once, then given up on


def test_retry_after_is_honoured(site):
    sleeps = Sleeps()
    with session(sleeps=sleeps) as http:
        page = http.get(site.base + "/rate-limited")
    assert page.status == 200
    assert site.hits("/rate-limited") == 2
    assert 1.0 in sleeps  # the server's Retry-After: 1, not our backoff


def test_retry_after_beyond_max_wait_gives_up(site):
    with session(max_wait=60.0) as http:
        with pytest.raises(FetchError, match="Retry-After"):
            http.get(site.base + "/rate-limited-long")
    assert site.hits("/rate-limited-long") == 1


def test_5xx_retried_with_growing_jittered_backoff_until_success(site):
    sleeps = Sleeps()
    with session(sleeps=sleeps, backoff=0.5) as http:
        page = http.get(site.base + "/flaky")
    assert page.status == 200 and site.hits("/flaky") == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


def test_retries_stop(site):
    sleeps = Sleeps()
    with session(sleeps=sleeps, max_retries=2) as http:
        with pytest.raises(FetchError) as err:
            http.get(site.base + "/always-500")
    assert err.value.status == 500 and "3 attempts" in str(err.value)
    assert site.hits("/always-500") == 3 and len(sleeps) == 2


def test_timeout_is_retried_then_fails(site):
    site.slow_seconds = 1.0
    with session(timeout=0.2, max_retries=1) as http:
        with pytest.raises(FetchError, match="Timeout"):
            http.get(site.base + "/slow")
    assert site.hits("/slow") == 2


def test_connection_error_is_retried_then_fails():
    with session(max_retries=2) as http:
        with pytest.raises(FetchError):
            http.get("http://127.0.0.1:9/news/x.html")  # nothing listens on the discard port
        assert http.requests == 3  # robots.txt: three attempts, then the host counts as unreachable


def test_redirects_followed_within_limit(site):
    with session(max_redirects=3) as http:
        page = http.get(site.base + "/redirect/plain")
        assert page.url == site.base + "/news/article-plain.html" and page.status == 200
        assert http.get(site.base + "/redirect/absolute").url == site.base + "/news/article-og.html"
        with pytest.raises(FetchError, match="max_redirects=3"):
            http.get(site.base + "/loop")
    assert site.hits("/loop") == 4


def test_conditional_get_persists_validators(site, tmp_path):
    url = site.base + "/feed.xml"
    with session(tmp_path) as http:
        first = http.get(url, conditional=True)
        second = http.get(url, conditional=True)
        plain = http.get(url)  # not conditional: the full body again
    assert first.status == 200 and first.content and not first.not_modified
    assert second.not_modified and second.content == b""
    assert plain.status == 200 and plain.content == first.content
    saved = json.loads((tmp_path / "http.json").read_text())
    assert saved[url]["etag"] == '"feed-v1"' and saved[url]["last_modified"]
    with session(tmp_path) as http:  # a new process reads the state file
        assert http.get(url, conditional=True).not_modified
    sent = [h for p, h in site.log if p == "/feed.xml"]
    assert "If-None-Match" not in sent[0] and "If-None-Match" not in sent[2]
    assert sent[1]["If-None-Match"] == '"feed-v1"' and sent[3]["If-Modified-Since"]


def test_size_cap_with_and_without_content_length(site):
    with session(max_bytes=10_000) as http:
        with pytest.raises(FetchError, match="max_bytes"):
            http.get(site.base + "/big")
        with pytest.raises(FetchError, match="max_bytes"):
            http.get(site.base + "/big-unsized")
        assert http.get(site.base + "/news/article-plain.html").status == 200


def test_http_error_is_not_retried(site):
    with session() as http:
        with pytest.raises(FetchError) as err:
            http.get(site.base + "/news/gone.html")
    assert err.value.status == 404 and site.hits("/news/gone.html") == 1


def test_per_host_delay_spaces_requests(site):
    sleeps = Sleeps()
    with session(sleeps=sleeps, delay=30.0) as http:
        http.get(site.base + "/news/article-plain.html")
        http.get(site.base + "/news/article-og.html")
    # robots.txt, then two pages: each request after the first waits for the rest of the 30 s
    assert len(sleeps) == 2 and all(20.0 < s <= 30.0 for s in sleeps)


def test_crawl_delay_raises_the_per_host_delay(site_factory):
    slow_host = site_factory(robots_body="User-agent: *\nCrawl-delay: 7\nDisallow: /private/\n")
    sleeps = Sleeps()
    with session(sleeps=sleeps, delay=0.0) as http:
        http.get(slow_host.base + "/news/article-plain.html")
        http.get(slow_host.base + "/news/article-og.html")
    assert len(sleeps) == 2 and all(5.0 < s <= 7.0 for s in sleeps)


def test_only_http_urls():
    with session() as http:
        with pytest.raises(FetchError, match="http"):
            http.get("file:///etc/passwd")


def test_retry_after_parsing():
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 90, usegmt=True)
    assert 80 <= retry_after_seconds(later) <= 91
    assert retry_after_seconds("Mon, 07 Apr 2025 16:00:00 GMT") == 0.0  # a date in the past: no wait


@pytest.mark.parametrize("field,value", [("delay", -1.0), ("timeout", 0.0), ("max_bytes", 0), ("user_agent", " ")])
def test_args_validation(field, value):
    with pytest.raises(ValueError, match=field):
        HttpArgs(**{field: value})


def test_corrupt_state_file_names_the_file(tmp_path):
    (tmp_path / "http.json").write_text("{not json")
    with pytest.raises(ValueError, match="http.json"):
        session(tmp_path)
