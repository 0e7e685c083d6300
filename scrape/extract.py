"""Article extraction: metadata from JSON-LD / OpenGraph / meta tags, body text from JSON-LD or a generic extractor.

    from scrape.extract import extract_article
    article = extract_article(html, url)   # {"title", "author", "published", "text", "tags", ...}
    python -m scrape.extract page.html     # print what one saved page yields

The generic extractor splits the cleaned page into text blocks, scores every element by the article-like text it
holds minus the boilerplate it holds (link-heavy and short blocks), takes the best element and keeps its blocks that
do not look like boilerplate. Quality on the article-extraction benchmark: BENCHMARKS.md, `## Article extraction`.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

import lxml.html
from lxml import etree

# Never part of an article body.
_DROP_TAGS = {"script", "style", "noscript", "template", "svg", "math", "iframe", "object", "embed", "canvas",
              "button", "input", "select", "textarea", "option", "nav", "footer", "aside", "form", "dialog",
              "head", "link", "meta", "audio", "video", "picture", "img", "map"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol",
               "li", "dl", "dt", "dd", "blockquote", "pre", "table", "thead", "tbody", "tr", "td", "th", "figure",
               "figcaption", "address", "center", "hr", "br", "body", "caption", "details", "summary", "span_block"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# Class / id words of page furniture; matched against whole tokens of the attribute (split on - _ space).
_BOILER_WORDS = re.compile(
    r"^(?:comments?|commentlist|disqus|share|sharing|social|sociable|related|relatedposts|recommended|recirc|"
    r"newsletter|subscribe|subscription|signup|sidebar|footer|breadcrumbs?|navbar|nav|navigation|menu|cookie|"
    r"cookies|consent|popup|modal|promo|advert|advertisement|ads?|adsbygoogle|sponsored|sponsor|outbrain|taboola|"
    r"widget|toolbar|masthead|pagination|pager|print|tags|tagcloud|byline|author|bio|rating|skip|hidden|banner|"
    r"paywall|trending|most|popular|teaser|tooltip|overlay|login|follow|caption|credit|disclaimer)$")
_KEEP_WORDS = re.compile(r"^(?:article|body|content|entry|main|post|story|text|hentry)$")
_SPLIT = re.compile(r"[\s_\-]+|(?<=[a-z])(?=[A-Z])")
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden")
_WS = re.compile(r"\s+")
# Lines that are calls to action, not article text.
_BOILER_LINE = re.compile(
    r"^(?:advertisement|sponsored|read more|read also|see also|related|share( this)?|continue reading|"
    r"click here|sign up|subscribe|follow us|tweet|email|print|comments?|loading\.*|\W*)\W*$", re.I)


@dataclass
class _Block:
    text: str
    link_chars: int
    tag: str
    element: etree._Element

    @property
    def link_density(self) -> float:
        return self.link_chars / max(1, len(self.text))


def _tokens(el) -> list[str]:
    attr = f"{el.get('class', '')} {el.get('id', '')}"
    return [t.lower() for t in _SPLIT.split(attr) if t]


def _is_boilerplate(el) -> bool:
    """True for elements whose class/id or attributes mark them as page furniture."""
    if el.get("hidden") is not None or el.get("aria-hidden") == "true" or _HIDDEN_STYLE.search(el.get("style", "")):
        return True
    if el.get("role") in ("navigation", "complementary", "contentinfo", "banner", "dialog"):
        return True
    tokens = _tokens(el)
    return any(_BOILER_WORDS.match(t) for t in tokens) and not any(_KEEP_WORDS.match(t) for t in tokens)


def _clean(root) -> None:
    """Drop tags that never hold article text and elements marked as furniture (in place)."""
    for el in list(root.iter(etree.Comment, etree.ProcessingInstruction)):
        el.drop_tree() if el.getparent() is not None else None
    total = len(_WS.sub("", root.text_content()))
    for el in list(root.iter()):
        if not isinstance(el.tag, str) or el.getparent() is None:
            continue
        if el.tag in _DROP_TAGS or (el.tag not in ("html", "body", "article", "main") and _is_boilerplate(el)):
            # safety net: a class word like "post-author-bio" wrapping half the page is a false positive
            if el.tag not in _DROP_TAGS and len(_WS.sub("", el.text_content())) > 0.4 * total:
                continue
            el.drop_tree()


def _blocks(root) -> list[_Block]:
    """Flatten the tree into text blocks: runs of inline text between block-level tags."""
    out: list[_Block] = []
    parts: list[str] = []
    links = [0]
    owner = [root]

    def flush():
        text = _WS.sub(" ", "".join(parts)).strip()
        if text:
            el = owner[0]
            out.append(_Block(text, min(links[0], len(text)), el.tag if isinstance(el.tag, str) else "", el))
        parts.clear()
        links[0] = 0

    def walk(el, in_link: bool):
        tag = el.tag if isinstance(el.tag, str) else ""
        is_block = tag in _BLOCK_TAGS
        if is_block:
            flush()
            owner[0] = el
        link = in_link or tag == "a"
        if el.text:
            parts.append(el.text)
            if link:
                links[0] += len(el.text.strip())
        for child in el:
            walk(child, link)
        if is_block:
            flush()
            owner[0] = el.getparent() if el.getparent() is not None else root
        if el.tail:
            parts.append(el.tail)
            if in_link:
                links[0] += len(el.tail.strip())

    walk(root, False)
    flush()
    return out


def _good(b: _Block) -> bool:
    """Article-like: a sentence-sized block with few links."""
    return len(b.text) >= 60 and b.link_density < 0.3 and not _BOILER_LINE.match(b.text)


def _best_container(blocks: list[_Block]):
    """The element maximising (good text) - (boilerplate text) over its blocks."""
    score: dict = {}
    for b in blocks:
        n = len(b.text)
        value = n if _good(b) else -0.6 * n - 15
        el = b.element
        while el is not None:
            score[el] = score.get(el, 0.0) + value
            el = el.getparent()
    return max(score, key=score.get) if score else None


def _keep(b: _Block) -> bool:
    if _BOILER_LINE.match(b.text):
        return False
    if b.link_density > 0.5:
        return False
    return True


def generic_text(root) -> str:
    """Main text of a parsed, cleaned page by text/link density (no metadata)."""
    blocks = _blocks(root)
    best = _best_container(blocks)
    if best is None:
        return ""
    inside = {id(e) for e in best.iter()}
    kept = [b.text for b in blocks if id(b.element) in inside and _keep(b)]
    return "\n\n".join(kept)


# ---------------------------------------------------------------- metadata

def _jsonld_items(root) -> list[dict]:
    items: list[dict] = []

    def add(node):
        if isinstance(node, list):
            for n in node:
                add(n)
        elif isinstance(node, dict):
            items.append(node)
            add(node.get("@graph", []))

    for script in root.xpath('//script[@type="application/ld+json"]'):
        try:
            add(json.loads(script.text or ""))
        except json.JSONDecodeError:
            continue  # broken JSON-LD is common; the meta tags and the generic path still apply
    return items


def _is_article(item: dict) -> bool:
    types = item.get("@type", [])
    types = types if isinstance(types, list) else [types]
    return any(isinstance(t, str) and t.endswith(("Article", "NewsArticle", "BlogPosting", "Report")) for t in types)


def _names(value) -> list[str]:
    if isinstance(value, list):
        return [n for v in value for n in _names(v)]
    if isinstance(value, dict):
        return _names(value.get("name"))
    return [value.strip()] if isinstance(value, str) and value.strip() else []


def _meta(root, *keys: str) -> str | None:
    for key in keys:
        for value in root.xpath(f'//meta[@property="{key}" or @name="{key}"]/@content'):
            if value.strip():
                return value.strip()
    return None


def extract_article(html: str | bytes, url: str = "", use_jsonld_body: bool = True) -> dict:
    """Title, author, published, text, tags, description, lang, site and canonical url of one article page."""
    if not html or not html.strip():
        return {"url": url, "title": None, "author": None, "published": None, "text": "", "tags": []}
    root = lxml.html.fromstring(html.encode() if isinstance(html, str) else html,
                                parser=lxml.html.HTMLParser(encoding="utf-8", remove_comments=True))
    article = next((i for i in _jsonld_items(root) if _is_article(i)), {})
    h1 = root.xpath("string(//h1)").strip()
    title = (_WS.sub(" ", article["headline"]).strip() if isinstance(article.get("headline"), str) else None) \
        or _meta(root, "og:title", "twitter:title") or h1 or root.findtext(".//title")
    authors = _names(article.get("author")) or [a for a in [_meta(root, "author", "article:author")] if a]
    keywords = article.get("keywords") or _meta(root, "keywords", "news_keywords") or []
    if isinstance(keywords, str):
        keywords = [k.strip() for k in keywords.split(",")]
    tags = [t.strip() for t in root.xpath('//meta[@property="article:tag"]/@content')] or keywords
    canonical = root.xpath('string(//link[@rel="canonical"]/@href)').strip() or _meta(root, "og:url")
    body = article.get("articleBody") if use_jsonld_body else None
    if isinstance(body, str) and len(body) > 200:
        text = "\n\n".join(_WS.sub(" ", line).strip() for line in body.split("\n") if line.strip())
    else:
        _clean(root)
        text = generic_text(root)
    return {
        "url": canonical or url,
        "title": title.strip() if title else None,
        "author": ", ".join(dict.fromkeys(authors)) or None,
        "published": article.get("datePublished") or _meta(root, "article:published_time", "datePublished",
                                                             "pubdate", "date", "dc.date", "parsely-pub-date"),
        "modified": article.get("dateModified") or _meta(root, "article:modified_time"),
        "description": article.get("description") or _meta(root, "og:description", "description"),
        "lang": root.get("lang") or _meta(root, "og:locale"),
        "site": _meta(root, "og:site_name"),
        "tags": [t for t in dict.fromkeys(tags) if isinstance(t, str) and t],
        "text": text,
    }


def main(argv: list[str] | None = None) -> None:
    for path in (argv if argv is not None else sys.argv[1:]):
        with open(path, "rb") as f:
            print(json.dumps(extract_article(f.read(), path), ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
