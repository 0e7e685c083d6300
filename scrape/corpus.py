"""The article corpus on disk: `articles.jsonl`, one article a line, keyed by canonical URL and text hash.

    with Corpus(Path("out/articles.jsonl")) as corpus:
        if canonical_url(url) not in corpus:
            corpus.add(record)          # appended and flushed at once: an interrupted run loses nothing

Opening a corpus whose last line was cut off by a crash (no newline) drops that line from the file and carries on;
a broken line anywhere else is an error naming the line.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from jsonl import read_jsonl

FIELDS = ("url", "source", "title", "published", "author", "text", "fetched_at", "sha256")
# Query parameters that only track the click; the same article with or without them is one article.
_TRACKING = ("utm_", "fbclid", "gclid", "mc_cid", "mc_eid", "ref", "ref_src", "cmpid", "ocid", "taid", "mod")


def canonical_url(url: str) -> str:
    """Lower-case scheme and host, no default port, no fragment, no tracking parameters, no trailing `/amp`."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets, or the netloc reads as host:port
        host = f"[{host}]"
    if parts.port and not (parts.scheme, parts.port) in (("http", 80), ("https", 443)):
        host = f"{host}:{parts.port}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not k.lower().startswith(_TRACKING)]
    path = parts.path or "/"
    if path.endswith(("/amp", "/amp/")):
        path = path[: path.rindex("/amp")] or "/"
    return urlunsplit((parts.scheme.lower(), host, path, urlencode(query), ""))


def text_sha256(text: str) -> str:
    """Hash of the text with whitespace normalised, so re-extraction with other line breaks is a duplicate."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def read_articles(path: str | Path) -> list[dict]:
    """The articles of an articles.jsonl (first occurrence of each URL); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no articles at {path}; run `make scrape` or pass --articles data/sample_news.jsonl")
    articles, seen = [], set()
    for n, article in read_jsonl(path):
        for key in ("url", "text"):
            if not isinstance(article.get(key), str) or not article[key].strip():
                raise ValueError(f"{path}:{n}: article needs a non-empty string {key!r} "
                                 f"(the articles.jsonl schema: {', '.join(FIELDS)})")
        if article["url"] not in seen:
            seen.add(article["url"])
            articles.append(article)
    return articles


class Corpus:
    """Append-only JSONL of articles with the sets of known URLs and text hashes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.urls: set[str] = set()
        self.hashes: set[str] = set()
        self.count = 0
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        # a last line cut off by a crash or kill is dropped: its URL is fetched again
        for i, record in read_jsonl(self.path, drop_torn_tail=True):
            if "url" not in record or "text" not in record:
                raise ValueError(f"{self.path}:{i}: a record needs at least `url` and `text`")
            self._remember(record)

    def _remember(self, record: dict) -> None:
        self.urls.add(canonical_url(record["url"]))
        for alias in record.get("aliases", ()):
            self.urls.add(canonical_url(alias))
        self.hashes.add(record.get("sha256") or text_sha256(record["text"]))
        self.count += 1

    def __contains__(self, url: str) -> bool:
        return canonical_url(url) in self.urls

    def is_duplicate(self, record: dict) -> bool:
        return record["url"] in self or record["sha256"] in self.hashes

    def add(self, record: dict) -> bool:
        """Append `record` unless its URL or text is already in; True if written."""
        missing = [k for k in FIELDS if k not in record]
        assert not missing, f"record lacks {missing}"
        if self.is_duplicate(record):
            return False
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self._remember(record)
        return True

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
