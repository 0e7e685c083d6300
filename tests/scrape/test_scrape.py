"""The scraper end to end against a scripted site on 127.0.0.1 (feeds, sitemaps, robots.txt, failures), the corpus
writer (dedup, crash safety), feed / sitemap parsing, the source registry and the CLI."""
import gzip
import json
import shutil
from datetime import datetime, timezone

import pytest

import scrape.__main__ as scrape_main
from scrape.__main__ import ScrapeArgs, main, scrape
from scrape.corpus import FIELDS, Corpus, canonical_url, read_articles, text_sha256
from scrape.feeds import parse_date, parse_feed, parse_sitemap
from scrape.http import HttpArgs
from scrape.sources import SOURCES, Source
from tests.scrape.conftest import ASSETS

PAGES = ["/news/article-jsonld.html", "/news/article-og.html", "/news/article-plain.html",
         "/news/article-sitemap.html"]
FAST = HttpArgs(delay=0.0, backoff=0.01, max_retries=1, timeout=5.0)


def registry(site) -> dict:
    return {"testnews": Source("testnews", site.base, feeds=(site.base + "/feed.xml",),
                               sitemaps=(site.base + "/sitemap-index.xml",))}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_scrape_then_rerun_fetches_nothing_new(site, tmp_path):
    out = tmp_path / "articles.jsonl"
    stats = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry(site))["testnews"]
    assert stats["new"] == 4 and stats["disallowed"] == 1 and stats["failed"] == 2  # 404 + persistent 500
    recs = {r["url"].removeprefix(site.base): r for r in records(out)}
    assert sorted(recs) == sorted(PAGES)
    for r in recs.values():
        assert set(FIELDS) <= set(r) and r["source"] == "testnews" and r["sha256"] == text_sha256(r["text"])
        assert datetime.fromisoformat(r["fetched_at"]).tzinfo is not None
    jsonld = recs["/news/article-jsonld.html"]
    assert jsonld["author"] == "Ada Example, Bob Sample" and jsonld["tags"] == ["listing", "altcoins"]
    assert jsonld["published"] == "2025-04-07T15:07:35+00:00"
    assert "Read more" not in jsonld["text"] and "comment" not in jsonld["text"]
    assert recs["/news/article-plain.html"]["aliases"] == [site.base + "/redirect/plain"]
    assert recs["/news/article-sitemap.html"]["title"] == "Imaginary stablecoin issuer publishes an audit"
    for page in PAGES:  # fetched once although the og page is listed in the feed and in the sitemap
        assert site.hits(page) == 1
    assert site.hits("/private/secret.html") == 0
    assert site.hits("/always-500") == 2 and site.hits("/news/gone.html") == 1

    before = len(site.log)
    again = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry(site))["testnews"]
    assert again["new"] == 0 and again["not_modified"] == 3  # feed, sitemap index, news sitemap: all 304
    second = [p for p, _ in site.log[before:]]
    assert not [p for p in second if p.startswith(("/news/", "/private/", "/redirect/"))]
    assert second.count("/always-500") == 2  # a 5xx is worth another try next run; the 404 is not
    assert len(records(out)) == 4


def test_a_broken_source_is_counted_not_fatal(site, tmp_path):
    sources = {"broken": Source("broken", site.base, feeds=(site.base + "/missing-feed.xml",),
                                sitemaps=(site.base + "/news/article-plain.html",)),  # HTML, not a sitemap
               **registry(site)}
    results = scrape(ScrapeArgs(out=tmp_path / "articles.jsonl", max_per_source=0), FAST, sources)
    assert results["broken"]["failed"] == 2 and results["broken"]["new"] == 0
    assert results["testnews"]["new"] == 4


def test_lost_scrape_state_refetches_feeds(site, tmp_path):
    out = tmp_path / "articles.jsonl"
    scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry(site))
    (tmp_path / "articles.jsonl.state.json").unlink()  # the HTTP validators survive, the feed items do not
    stats = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry(site))["testnews"]
    # the corpus still knows its 4 articles (the redirect by its alias); the given-up URLs are tried once more
    assert stats["new"] == 0 and stats["known"] == 4 and stats["failed"] == 2 and stats["disallowed"] == 1
    assert site.hits("/feed.xml") == 3  # 200, then 304 without items at hand, then a full GET


def test_since_and_max_per_source(site, tmp_path):
    out = tmp_path / "articles.jsonl"
    stats = scrape(ScrapeArgs(out=out, since="2025-04-01", max_per_source=1), FAST, registry(site))["testnews"]
    assert stats["new"] == 1 and stats["too_old"] == 1
    assert [r["url"] for r in records(out)] == [site.base + "/news/article-jsonld.html"]  # the newest
    assert site.hits("/redirect/plain") == 0  # published 2024: never fetched
    stats = scrape(ScrapeArgs(out=out, since="2025-04-01", max_per_source=1), FAST, registry(site))["testnews"]
    assert stats["new"] == 1 and stats["known"] >= 1  # the next newest on the next run
    assert site.hits("/news/article-jsonld.html") == 1


def test_interrupted_run_loses_nothing(site, tmp_path, monkeypatch):
    out = tmp_path / "articles.jsonl"
    real, calls = scrape_main.extract_article, []

    def dies_on_second_page(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(scrape_main, "extract_article", dies_on_second_page)
    with pytest.raises(KeyboardInterrupt):
        scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry(site))
    kept = records(out)
    assert len(kept) == 1
    monkeypatch.setattr(scrape_main, "extract_article", real)
    stats = scrape(ScrapeArgs(out=out, max_per_source=0), FAST, registry(site))["testnews"]
    assert stats["new"] == 3 and len(records(out)) == 4
    assert site.hits(kept[0]["url"].removeprefix(site.base)) == 1


def test_corpus_drops_a_cut_off_last_line_and_rejects_a_broken_one(tmp_path):
    path = tmp_path / "articles.jsonl"
    good = {k: "x" for k in FIELDS} | {"url": "https://a.example/1", "text": "some text"}
    path.write_text(json.dumps(good) + "\n" + '{"url": "https://a.example/2", "te')
    with Corpus(path) as corpus:
        assert corpus.count == 1 and "https://A.example/1#top" in corpus
        assert corpus.add(good | {"url": "https://a.example/2", "text": "other", "sha256": text_sha256("other")})
        assert not corpus.add(good | {"url": "https://a.example/3", "sha256": text_sha256("other")})  # same text
    assert [r["url"] for r in records(path)] == ["https://a.example/1", "https://a.example/2"]
    path.write_text("not json\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"articles.jsonl:1"):
        Corpus(path)


def test_canonical_url():
    assert canonical_url("HTTPS://Www.Example.com:443/a/b?utm_source=x&id=3&fbclid=y#frag") == \
        "https://www.example.com/a/b?id=3"
    assert canonical_url("http://example.com:8080/news/x/amp") == "http://example.com:8080/news/x"
    assert canonical_url("http://example.com") == "http://example.com/"
    assert canonical_url("http://[::1]:8080/x") == "http://[::1]:8080/x"  # IPv6 literals keep their brackets
    assert canonical_url("http://[::1]/") == "http://[::1]/"
    assert text_sha256("a  b\n\nc") == text_sha256("a b c")


def test_from_html_offline(tmp_path, capsys):
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ["article-jsonld.html", "article-og.html", "article-plain.html", "private.html"]:
        html = (ASSETS / name).read_text().replace("{{BASE}}", "https://www.decrypt.co")
        (pages / name).write_text(html)
    (pages / "article-sitemap.html.gz").write_bytes(gzip.compress((ASSETS / "article-sitemap.html").read_bytes()))
    (pages / "broken.html.gz").write_bytes(b"not gzip")
    out = tmp_path / "articles.jsonl"
    main(["--from-html", str(pages), "--out", str(out), "--since", "2025-04-07"])
    assert len(records(out)) == 3  # the og page (2025-04-06) is too old
    main(["--from-html", str(pages), "--out", str(out)])
    recs = records(out)
    assert len(recs) == 4  # private.html is too short to be an article, broken.html.gz is counted and skipped
    by_source = {r["source"] for r in recs}
    assert "decrypt" in by_source and "local" in by_source  # canonical host -> registry name; none -> local
    assert "corpus:" in capsys.readouterr().out
    main(["--from-html", str(pages), "--out", str(out)])
    assert len(records(out)) == 4  # nothing twice


def test_from_html_real_pages(shared_data, tmp_path):
    pages = tmp_path / "pages"
    shutil.copytree(shared_data / "crypto-news" / "pages", pages)
    out = tmp_path / "articles.jsonl"
    main(["--from-html", str(pages), "--out", str(out)])
    recs = {r["source"]: r for r in records(out)}
    assert set(recs) == {"coindesk", "decrypt", "cointelegraph"}
    assert recs["decrypt"]["author"] == "Vince Dioquino"
    assert recs["coindesk"]["url"].startswith("https://www.coindesk.com/markets/2025/04/07/")


def test_feed_parsing_rss_and_atom():
    rss = parse_feed((ASSETS / "feed.xml").read_bytes().replace(b"{{BASE}}", b"http://t.example"))
    assert len(rss) == 6
    assert rss[0].url == "http://t.example/news/article-jsonld.html?utm_source=rss&utm_medium=feed"
    assert rss[0].author == "Ada Example" and rss[0].tags == ["listing", "altcoins"]
    assert rss[0].published == datetime(2025, 4, 7, 15, 7, 35, tzinfo=timezone.utc)
    atom = parse_feed((ASSETS / "atom.xml").read_bytes(), "https://t.example/feeds/atom.xml")
    assert [a.url for a in atom] == ["https://t.example/news/article-jsonld.html",
                                     "https://example.invalid/news/article-og.html"]
    assert atom[0].author == "Ada Example" and atom[0].tags == ["listing"]
    assert atom[1].published.utcoffset().total_seconds() == 7200


def test_feed_parsing_rdf_guid_and_errors():
    rdf = b"""<?xml version="1.0"?><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
      xmlns="http://purl.org/rss/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/">
      <item rdf:about="https://t.example/1"><title>One</title><dc:date>2025-04-01</dc:date></item></rdf:RDF>"""
    (item,) = parse_feed(rdf)
    assert item.url == "https://t.example/1" and item.published == datetime(2025, 4, 1, tzinfo=timezone.utc)
    guid = b"<rss><channel><item><guid>https://t.example/g</guid></item></channel></rss>"
    assert parse_feed(guid)[0].url == "https://t.example/g"
    with pytest.raises(ValueError, match="not a feed"):
        parse_feed(b"<html><body>hello</body></html>")
    with pytest.raises(ValueError):
        parse_feed(b"")


def test_feed_parser_does_not_resolve_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xxe = f"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>
      <rss><channel><item><title>&x;</title><link>https://t.example/a</link></item></channel></rss>"""
    (item,) = parse_feed(xxe.encode())
    assert item.url == "https://t.example/a" and "TOP-SECRET" not in (item.title or "")


def test_sitemaps():
    index, children = parse_sitemap((ASSETS / "sitemap-index.xml").read_bytes().replace(b"{{BASE}}", b"http://t"))
    assert index == [] and children == ["http://t/news-sitemap.xml"]
    items, more = parse_sitemap((ASSETS / "news-sitemap.xml").read_bytes().replace(b"{{BASE}}", b"http://t"))
    assert more == [] and [i.url for i in items] == ["http://t/news/article-sitemap.html",
                                                     "http://t/news/article-og.html"]
    assert items[0].title == "Imaginary stablecoin issuer publishes an audit"
    assert items[0].tags == ["stablecoins", "audit"] and items[1].published.year == 2025
    with pytest.raises(ValueError, match="not a sitemap"):
        parse_sitemap(b"<rss/>")


def test_parse_date_forms():
    utc = timezone.utc
    assert parse_date("Mon, 07 Apr 2025 15:07:35 GMT") == datetime(2025, 4, 7, 15, 7, 35, tzinfo=utc)
    assert parse_date("2025-04-07T15:07:35.128Z") == datetime(2025, 4, 7, 15, 7, 35, 128000, tzinfo=utc)
    assert parse_date("2025-04-07") == datetime(2025, 4, 7, tzinfo=utc)
    assert parse_date("yesterday") is None and parse_date(None) is None


def test_registry():
    assert len(SOURCES) >= 10
    assert {"coindesk", "cointelegraph", "decrypt", "theblock", "bitcoinmagazine", "cryptoslate", "cryptonews",
            "utoday", "newsbtc", "bitcoinist"} <= set(SOURCES)
    for s in SOURCES.values():
        assert all(u.startswith("https://") for u in s.feeds + s.sitemaps) and s.home.startswith("https://")
    with pytest.raises(ValueError, match="feed or sitemap"):
        Source("empty", "https://x.example")


@pytest.mark.parametrize("argv", [["--sources", "nope"], ["--since", "yesterday"], ["--max-per-source", "-1"],
                                  ["--delay", "-2"]])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert argv[0].lstrip("-").replace("-", "_") in capsys.readouterr().err


def test_read_articles_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make scrape"):
        read_articles(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"url": "u1", "text": "t"}\n{"url": "u2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: article needs a non-empty string 'text'"):
        read_articles(bad)
    bad.write_text('{"url": "u1", "text": "t"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_articles(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"url": "u", "text": "a"}\n\n{"url": "u", "text": "b"}\n')
    assert [a["text"] for a in read_articles(dup)] == ["a"]
