"""Article discovery: RSS 2.0 / RSS 1.0 / Atom feeds and (news) sitemaps, parsed with lxml.

    from scrape.feeds import parse_feed, parse_sitemap
    items = parse_feed(xml_bytes, base_url)                  # [FeedItem(url, title, published, ...)]
    items, children = parse_sitemap(xml_bytes, base_url)     # a sitemap index yields child sitemap URLs

Namespaces are matched by local name, so the many variants publishers ship all parse. The parser neither resolves
entities nor touches the network (no XXE), and recovers from the malformed XML that real feeds often are.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urljoin

from lxml import etree

_PARSER = dict(resolve_entities=False, no_network=True, recover=True, huge_tree=False, remove_comments=True)


@dataclass
class FeedItem:
    url: str
    title: str | None = None
    published: datetime | None = None
    author: str | None = None
    tags: list[str] = field(default_factory=list)
    origin: str | None = None  # the start URL (a source's feed or sitemap) that led here, for the address guard


def parse_date(value: str | None) -> datetime | None:
    """RFC 822 (RSS), ISO 8601 (Atom, sitemaps) or a bare date -> aware datetime (naive means UTC)."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _root(content: bytes):
    if not content or not content.strip():
        raise ValueError("empty document")
    root = etree.fromstring(content, etree.XMLParser(**_PARSER))
    if root is None:
        raise ValueError("not XML")
    return root


def _local(el) -> str:
    return etree.QName(el).localname if isinstance(el.tag, str) else ""


def _children(el, *names: str):
    return [c for c in el if _local(c) in names]


def _text(el, *names: str) -> str | None:
    for c in _children(el, *names):
        text = "".join(c.itertext()).strip()
        if text:
            return text
    return None


def parse_feed(content: bytes, base_url: str = "") -> list[FeedItem]:
    """Items of an RSS 2.0, RSS 1.0 (RDF) or Atom feed, in feed order."""
    root = _root(content)
    items = []
    for el in root.iter():
        name = _local(el)
        if name == "item":  # RSS 2.0 and RSS 1.0
            url = _text(el, "link") or el.get("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}about")
            guid = _children(el, "guid")
            if not url and guid and guid[0].get("isPermaLink", "true") == "true":
                url = (guid[0].text or "").strip()
            date = _text(el, "pubDate", "date", "published", "updated")
            author = _text(el, "creator", "author")
            tags = ["".join(c.itertext()).strip() for c in _children(el, "category", "subject")]
        elif name == "entry":  # Atom
            links = _children(el, "link")
            alt = [ln for ln in links if ln.get("rel", "alternate") == "alternate"] or links
            url = alt[0].get("href") if alt else None
            date = _text(el, "published", "updated")
            author = next((_text(a, "name") for a in _children(el, "author")), None)
            tags = [c.get("term") or c.get("label") or "" for c in _children(el, "category")]
        else:
            continue
        if url:
            items.append(FeedItem(urljoin(base_url, url.strip()), _text(el, "title"), parse_date(date), author,
                                  [t for t in tags if t]))
    if not items and _local(root) not in ("rss", "feed", "RDF"):
        raise ValueError(f"not a feed: root element <{_local(root)}>")
    return items


def parse_sitemap(content: bytes, base_url: str = "") -> tuple[list[FeedItem], list[str]]:
    """(page items, child sitemap URLs) of a sitemap, a news sitemap or a sitemap index."""
    root = _root(content)
    kind = _local(root)
    if kind == "sitemapindex":
        return [], [urljoin(base_url, u) for u in (_text(s, "loc") for s in _children(root, "sitemap")) if u]
    if kind != "urlset":
        raise ValueError(f"not a sitemap: root element <{kind}>")
    items = []
    for url_el in _children(root, "url"):
        loc = _text(url_el, "loc")
        if not loc:
            continue
        news = next(iter(_children(url_el, "news")), None)  # Google News sitemap extension
        date = (_text(news, "publication_date") if news is not None else None) or _text(url_el, "lastmod")
        title = _text(news, "title") if news is not None else None
        keywords = (_text(news, "keywords") or "") if news is not None else ""
        items.append(FeedItem(urljoin(base_url, loc), title, parse_date(date), None,
                              [k.strip() for k in keywords.split(",") if k.strip()]))
    return items, []
