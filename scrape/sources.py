"""The crypto-news sources the scraper knows. Adding one is one `Source(...)` line.

    python -m scrape --sources coindesk,decrypt

`feeds` and `sitemaps` are discovery URLs (RSS/Atom, news sitemaps or sitemap indexes) as the sites published
them in 2025; sites move them, so a source whose feeds fail shows up in the run's failure counts. `body_xpath`
optionally names the element holding the article body; without it (or when it matches nothing) the generic
extractor finds the body.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    home: str
    feeds: tuple[str, ...] = ()
    sitemaps: tuple[str, ...] = ()
    body_xpath: str | None = None

    def __post_init__(self):
        if not self.feeds and not self.sitemaps:
            raise ValueError(f"source {self.name}: give at least one feed or sitemap URL")


def _has_class(name: str) -> str:
    return f'contains(concat(" ", normalize-space(@class), " "), " {name} ")'


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("coindesk", "https://www.coindesk.com",
           feeds=("https://www.coindesk.com/arc/outboundfeeds/rss/",),
           sitemaps=("https://www.coindesk.com/arc/outboundfeeds/news-sitemap-index/",),
           body_xpath=f"//div[{_has_class('document-body')}]"),
    Source("cointelegraph", "https://cointelegraph.com",
           feeds=("https://cointelegraph.com/rss",),
           body_xpath=f"//div[{_has_class('post-content')}]"),
    Source("decrypt", "https://decrypt.co",
           feeds=("https://decrypt.co/feed",),
           body_xpath=f"//div[{_has_class('post-content')} and {_has_class('unreset')}]//p"),
    Source("theblock", "https://www.theblock.co", feeds=("https://www.theblock.co/rss.xml",)),
    Source("bitcoinmagazine", "https://bitcoinmagazine.com", feeds=("https://bitcoinmagazine.com/.rss/full/",)),
    Source("cryptoslate", "https://cryptoslate.com", feeds=("https://cryptoslate.com/feed/",),
           sitemaps=("https://cryptoslate.com/news-sitemap.xml",)),
    Source("cryptonews", "https://cryptonews.com", feeds=("https://cryptonews.com/news/feed/",)),
    Source("utoday", "https://u.today", feeds=("https://u.today/rss",)),
    Source("newsbtc", "https://www.newsbtc.com", feeds=("https://www.newsbtc.com/feed/",)),
    Source("bitcoinist", "https://bitcoinist.com", feeds=("https://bitcoinist.com/feed/",)),
]}
