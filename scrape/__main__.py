"""Scrape crypto news into `articles.jsonl`: discover articles in RSS/Atom feeds and news sitemaps, fetch them
politely, extract title, author, date, body and tags, append new ones.

    python -m scrape --out out/articles.jsonl                       # every source in scrape/sources.py
    python -m scrape --sources coindesk,decrypt --max-per-source 20 --since 2025-04-01
    python -m scrape --from-html saved_pages/ --out out/articles.jsonl   # offline: extract saved pages
    make scrape ARGS="--max-per-source 20"

A record: {url (canonical), source, title, published (ISO 8601), author, text, fetched_at, sha256 (of the text
with whitespace collapsed), tags}, plus `aliases` (the feed's URL) when the page names another canonical URL.
A rerun fetches only what is new: URLs already in the corpus (or given up on, in `<out>.state.json`) are skipped,
unchanged feeds answer 304 to a conditional GET (validators in `<out>.http.json`). Records are appended and
flushed one by one, so an interrupted run loses nothing. A failing page or source is logged and counted, never
fatal. Only what cannot change by waiting is given up on (a 4xx, a real robots.txt Disallow, a page that is not an
article); a host whose robots.txt is down (5xx or unreachable) is `deferred`: its URLs are tried on the next run.
Links that a feed or a redirect points at loopback, private or link-local addresses are `refused`, unless the
source's own feed URL is on such an address.
"""
from __future__ import annotations

import gzip
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from cli import parse_args
from jsonl import write_json
from scrape.corpus import Corpus, canonical_url, text_sha256
from scrape.extract import decode_html, extract_article
from scrape.feeds import FeedItem, parse_date, parse_feed, parse_sitemap
from scrape.http import Disallowed, FetchError, HttpArgs, PoliteSession, Refused, RobotsUnavailable
from scrape.sources import SOURCES, Source

log = logging.getLogger("scrape")

MAX_CHILD_SITEMAPS = 5  # a news sitemap index lists a handful of recent files; more is an archive, not news


@dataclass
class ScrapeArgs:
    out: Path = field(default=Path("out/articles.jsonl"), metadata={"help": "the corpus (JSONL), appended to"})
    sources: tuple[str, ...] = field(default=(), metadata={"help": "source names, comma-separated; empty = all"})
    since: str | None = field(default=None, metadata={"help": "skip articles published before this ISO date"})
    max_per_source: int = field(default=50, metadata={"help": "new articles fetched per source and run (0 = all)"})
    min_chars: int = field(default=200, metadata={"help": "pages with less body text are not articles"})
    from_html: Path | None = field(default=None, metadata={"help": "extract saved .html/.html.gz pages offline"})

    def __post_init__(self):
        self.out = Path(self.out)
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"sources: unknown {unknown}; known: {', '.join(SOURCES)}")
        if self.since is not None and parse_date(self.since) is None:
            raise ValueError(f"since={self.since!r} is not a date; use ISO 8601 such as 2025-04-01")
        if self.max_per_source < 0:
            raise ValueError(f"max_per_source={self.max_per_source} must be >= 0 (0 = no limit)")
        if self.from_html is not None and not Path(self.from_html).is_dir():
            raise FileNotFoundError(f"from_html={self.from_html} is not a directory of saved pages")

    @property
    def since_dt(self) -> datetime | None:
        return parse_date(self.since)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(value) -> str | None:
    dt = parse_date(value) if isinstance(value, str) else value
    return dt.isoformat() if dt else (value if isinstance(value, str) else None)


def _record(article: dict, item_url: str, source: str, item: FeedItem | None = None) -> dict:
    """The corpus record of one extracted page; the page's own metadata wins over the feed's."""
    url = canonical_url(article.get("url") or item_url)
    if urlsplit(url).netloc != urlsplit(canonical_url(item_url)).netloc:
        url = canonical_url(item_url)  # a canonical link to another host is a syndication partner, not this page
    record = {
        "url": url,
        "source": source,
        "title": article.get("title") or (item.title if item else None),
        "published": _iso(article.get("published")) or (_iso(item.published) if item else None),
        "author": article.get("author") or (item.author if item else None),
        "text": article["text"],
        "fetched_at": _now(),
        "sha256": text_sha256(article["text"]),
        "tags": article.get("tags") or (item.tags if item else []),
    }
    if canonical_url(item_url) != url:
        record["aliases"] = [canonical_url(item_url)]  # so a rerun knows the feed's URL too
    return record


class _State:
    """`<out>.state.json`: URLs given up on for good (not articles, 4xx, a robots.txt Disallow) with the reason, and
    what each feed or sitemap listed last time (reused when it answers 304 Not Modified)."""

    # Before robots.txt outages were told apart from real rules, both were saved as "robots.txt": such URLs are
    # checked again (a real Disallow costs no page request, robots.txt is read once per host and run).
    AMBIGUOUS = {"robots.txt"}

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); delete it (the corpus itself is enough to resume)") from e
        self.skip: dict[str, str] = self._section(data, "skip", str)
        self.feeds: dict[str, dict] = self._section(data, "feeds", dict)
        self.skip = {url: why for url, why in self.skip.items() if why not in self.AMBIGUOUS}

    def _section(self, data, key: str, kind: type) -> dict:
        fix = "delete the file (the corpus itself is enough to resume)"
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: expected a JSON object with 'skip' and 'feeds'; {fix}")
        section = data.get(key, {})
        if not isinstance(section, dict):
            raise ValueError(f"{self.path}: key {key!r} must be an object, got {type(section).__name__}; {fix}")
        for name, value in section.items():
            if not isinstance(value, kind) or (kind is dict and not {"items", "children"} <= set(value)):
                raise ValueError(f"{self.path}: {key}[{name!r}] is malformed ({str(value)[:60]}); {fix}")
        return section

    def save(self) -> None:
        write_json(self.path, {"skip": self.skip, "feeds": self.feeds}, indent=None)


def _item_to_json(i: FeedItem) -> dict:
    return {**asdict(i), "published": i.published.isoformat() if i.published else None}


def _item_from_json(d: dict, state: _State, url: str) -> FeedItem:
    try:
        return FeedItem(**{**d, "published": parse_date(d["published"])})
    except (TypeError, KeyError) as e:
        raise ValueError(f"{state.path}: feeds[{url!r}] holds a malformed item ({e}); delete the file") from e


def _fetch_listing(http: PoliteSession, url: str, kind: str, origin: str, state: _State,
                   stats: dict) -> tuple[list[FeedItem], list[str]]:
    """The items and child sitemaps one feed or sitemap lists now (a 304 reuses those stored last time)."""
    page = http.get(url, conditional=True, origin=origin)
    if page.not_modified and url not in state.feeds:
        http.forget(url)  # the HTTP state outlived the scrape state: ask for the whole body again
        page = http.get(url, conditional=True, origin=origin)
    if page.not_modified:
        stats["not_modified"] += 1
        return [_item_from_json(d, state, url) for d in state.feeds[url]["items"]], state.feeds[url]["children"]
    if kind == "feed":
        return parse_feed(page.content, page.url), []
    return parse_sitemap(page.content, page.url)


def discover(http: PoliteSession, source: Source, state: _State, stats: dict) -> list[FeedItem]:
    """All items the source's feeds and sitemaps list now, each with the start URL that led to it."""
    items: list[FeedItem] = []
    queue = [(u, "feed", u) for u in source.feeds] + [(u, "sitemap", u) for u in source.sitemaps]
    children = 0
    while queue:
        url, kind, origin = queue.pop(0)
        try:
            found, more = _fetch_listing(http, url, kind, origin, state, stats)
        except RobotsUnavailable as e:
            stats["deferred"] += 1
            log.warning("%s: %s %s deferred to the next run: %s", source.name, kind, url, e.reason)
            continue
        except (FetchError, ValueError) as e:
            stats["refused" if isinstance(e, Refused) else "failed"] += 1
            log.warning("%s: %s %s failed: %s", source.name, kind, url, e)
            continue
        for item in found:
            item.origin = item.origin or origin
        state.feeds[url] = {"items": [_item_to_json(i) for i in found], "children": more}
        items += found
        for child in more[: max(0, MAX_CHILD_SITEMAPS - children)]:
            queue.append((child, "sitemap", origin))
            children += 1
    return items


def _select(items: list[FeedItem], corpus: Corpus, state: _State, args: ScrapeArgs, stats: dict) -> list[FeedItem]:
    """New items only: unknown URL, published on or after --since, newest first, at most --max-per-source."""
    since, seen, out = args.since_dt, set(), []
    for item in items:
        try:
            key = canonical_url(item.url)
        except ValueError as e:  # a feed can carry any string as a link, e.g. a bad port
            stats["failed"] += 1
            log.warning("bad URL %r in a feed: %s", item.url, e)
            continue
        if key in seen:
            continue
        seen.add(key)
        if key in corpus or key in state.skip:
            stats["known"] += 1
        elif since and item.published and item.published < since:
            stats["too_old"] += 1
        else:
            out.append(item)
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    out.sort(key=lambda i: i.published or epoch, reverse=True)
    return out[: args.max_per_source] if args.max_per_source else out


STATS = ("new", "known", "too_old", "duplicate", "not_article", "disallowed", "deferred", "refused", "failed",
         "not_modified")


def _fetch_record(http: PoliteSession, source: Source, item: FeedItem, state: _State, stats: dict) -> dict | None:
    """The record of one listed article, or None (counted, and remembered when waiting cannot change it)."""
    key = canonical_url(item.url)
    try:
        page = http.get(item.url, origin=item.origin)
        html = decode_html(page.content, page.encoding)
        article = extract_article(html, page.url, body_xpath=source.body_xpath)
        return _record(article, item.url, source.name, item)
    except RobotsUnavailable:
        stats["deferred"] += 1  # robots.txt is down: disallowed for now, not for good (logged once per host)
    except Disallowed:
        stats["disallowed"] += 1
        state.skip[key] = "disallowed by robots.txt"
    except Refused as e:
        stats["refused"] += 1
        log.warning("%s: %s", source.name, e)
    except FetchError as e:
        stats["failed"] += 1
        log.warning("%s: %s", source.name, e)
        if e.status is not None and 400 <= e.status < 500 and e.status != 429:
            state.skip[key] = f"HTTP {e.status}"  # gone for good; 429 and 5xx are worth another run
    except ValueError as e:  # an unparsable page or a malformed canonical URL
        stats["failed"] += 1
        log.warning("%s: %s: %s", source.name, item.url, e)
    return None


def scrape_source(http: PoliteSession, source: Source, corpus: Corpus, state: _State, args: ScrapeArgs) -> dict:
    """Discover, fetch and extract one source's new articles; returns its counts."""
    stats = dict.fromkeys(STATS, 0)
    todo = _select(discover(http, source, state, stats), corpus, state, args, stats)
    for item in tqdm(todo, desc=source.name, unit="page", leave=False):
        record = _fetch_record(http, source, item, state, stats)
        if record is None:
            continue
        key = canonical_url(item.url)
        if len(record["text"]) < args.min_chars:
            stats["not_article"] += 1
            state.skip[key] = f"{len(record['text'])} chars of text"
            continue
        published = parse_date(record["published"])
        if args.since_dt and published and published < args.since_dt:
            stats["too_old"] += 1
            state.skip[key] = "published before --since"
            continue
        if corpus.add(record):
            stats["new"] += 1
        else:
            stats["duplicate"] += 1
            state.skip[key] = "duplicate text"
    if stats["deferred"]:
        log.warning("%s: %d URLs deferred to the next run (robots.txt unavailable)", source.name, stats["deferred"])
    return stats


def scrape(args: ScrapeArgs, http_args: HttpArgs, registry: dict[str, Source] | None = None) -> dict[str, dict]:
    """Run every selected source into `args.out`; returns counts per source. Nothing here raises for one bad page."""
    registry = registry or SOURCES
    chosen = [registry[n] for n in args.sources] if args.sources else list(registry.values())
    state = _State(args.out.with_name(args.out.name + ".state.json"))
    results = {}
    with Corpus(args.out) as corpus, PoliteSession(http_args, args.out.with_name(args.out.name + ".http.json")) as http:
        try:
            for source in chosen:
                results[source.name] = scrape_source(http, source, corpus, state, args)
                state.save()  # after each source too: a killed process keeps what the finished ones learnt
        finally:
            state.save()
    return results


def _source_of(url: str) -> str:
    """The registry name of a page's site (subdomains such as de.cointelegraph.com included), else its host."""
    host = (urlsplit(url).hostname or "").removeprefix("www.")
    for s in SOURCES.values():
        home = urlsplit(s.home).hostname.removeprefix("www.")
        if host == home or host.endswith("." + home):
            return s.name
    return host or "local"


def from_html(args: ScrapeArgs) -> dict[str, dict]:
    """Extract every saved page in `args.from_html` (no network) into the corpus; returns counts per source."""
    paths = sorted(p for p in Path(args.from_html).rglob("*") if p.name.endswith((".html", ".htm", ".html.gz")))
    results: dict[str, dict] = {}
    with Corpus(args.out) as corpus:
        for path in tqdm(paths, desc="pages", unit="page"):
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                html = decode_html(raw)
                article = extract_article(html, path.resolve().as_uri())
                source = _source_of(article["url"])
                if source in SOURCES and SOURCES[source].body_xpath:  # the site's selector, as when scraping
                    article = extract_article(html, article["url"], body_xpath=SOURCES[source].body_xpath)
                record = _record(article, article["url"], source)
            except (OSError, ValueError) as e:  # a broken .gz, a malformed canonical URL
                results.setdefault("unreadable", {"failed": 0})["failed"] += 1
                log.warning("%s: %s", path, e)
                continue
            stats = results.setdefault(source, {"new": 0, "duplicate": 0, "not_article": 0, "too_old": 0})
            published = parse_date(record["published"])
            if len(record["text"]) < args.min_chars:
                stats["not_article"] += 1
                log.warning("%s: only %d chars of text", path, len(record["text"]))
            elif args.since_dt and published and published < args.since_dt:
                stats["too_old"] += 1
            else:
                stats["new" if corpus.add(record) else "duplicate"] += 1
    return results


def main(argv: list[str] | None = None) -> None:
    args, http_args = parse_args(argv, ScrapeArgs, HttpArgs, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = from_html(args) if args.from_html else scrape(args, http_args)
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: (k != "new", k))
    print(f"{'source':<16}" + "".join(f"{k:>13}" for k in keys))
    for name, r in results.items():
        print(f"{name:<16}" + "".join(f"{r.get(k, 0):>13}" for k in keys))
    print(f"corpus: {args.out}")


if __name__ == "__main__":
    main()
