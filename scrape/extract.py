"""Article extraction: metadata from JSON-LD / OpenGraph / meta tags, body text from JSON-LD or a generic extractor.

    from scrape.extract import extract_article
    article = extract_article(html, url)   # {"title", "author", "published", "text", "tags", ...}
    python -m scrape.extract page.html [--generic-only] [--body-xpath XPATH]   # what one saved page yields

The generic extractor splits the cleaned page into text blocks, scores every element by the article-like text it
holds minus the boilerplate it holds (link-heavy and short blocks), takes the best element and keeps its blocks that
do not look like boilerplate. Quality on the article-extraction benchmark: BENCHMARKS.md, `## Article extraction`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import lxml.html
from lxml import etree

from cli import parse_args

# Never part of an article body.
_DROP_TAGS = {"script", "style", "noscript", "template", "svg", "math", "iframe", "object", "embed", "canvas",
              "button", "input", "select", "textarea", "option", "dialog", "head", "link", "meta", "audio", "video",
              "picture", "img", "map", "figure", "figcaption", "title", "marquee"}
# Usually furniture, but some sites wrap the whole page in them (a <form> on ASP.NET pages).
_FURNITURE_TAGS = {"nav", "footer", "aside", "form"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "form", "h1", "h2", "h3",
               "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "blockquote", "pre", "table", "thead", "tbody",
               "tr", "figure", "figcaption", "address", "center", "hr", "br", "body", "caption",
               "details", "summary"}
# Parts of an article's own flow: never taken as the whole article.
_FLOW_TAGS = {"p", "ul", "ol", "li", "dl", "table", "tbody", "tr", "blockquote", "pre", "h2", "h3", "h4", "h5", "h6"}
# Class / id words of page furniture, matched against the words of the attribute (split on - _ space camelCase).
_BOILER_WORDS = re.compile(
    r"^(?:comments?|commentlist|disqus|share|sharing|sharedaddy|social|sociable|related|relatedposts|recommended|"
    r"recirc|newsletter|subscribe|subscription|signup|sidebar|footer|breadcrumbs?|navbar|nav|navigation|menu|"
    r"cookie|cookies|consent|popup|modal|promo|advert|advertisement|adsbygoogle|sponsored|outbrain|taboola|"
    r"widget|toolbar|masthead|pagination|pager|tags|tagcloud|byline|author|bio|rating|skip|banner|"
    r"paywall|trending|popular|teaser|tooltip|overlay|login|follow|caption|credit|disclaimer|ticker|marquee)$")
# Furniture words that stay furniture even on a big element or next to a word like "content".
_STRONG = re.compile(r"comment|disqus|related|recommend|outbrain|taboola|newsletter|cookie|share|social", re.I)
# ...unless the same attribute also says it holds the article ("content-with-sidebar", "article-body-footer").
_KEEP_WORDS = re.compile(r"^(?:article|body|content|entry|main|post|story|text)$")
# Ad slots are only recognised by a whole class name: the word "ad" inside a class name is too often something else.
_AD_CLASS = re.compile(r"^(?:ad|ads|ad-.+|ads-.+|.+-ad|.+-ads|adslot|adunit|dfp.*|gpt-ad.*)$", re.I)
_SPLIT = re.compile(r"[\s_\-]+|(?<=[a-z])(?=[A-Z])")
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden")
_DATE = re.compile(r"\b(?:19|20)\d\d\b|\b\d{1,2}:\d\d\b")
_SENTENCE_END = re.compile(r"\w{3,}[.!?:]$")  # "... the deal." but not "3:34 p.m."
_WS = re.compile(r"[\s\u200b\ufeff]+")
# Lines that are calls to action, not article text.
_BOILER_LINE = re.compile(
    r"^(?:advert|advertisement|ad|sponsored|read more|read also|see also|related|share( this)?|continue reading|"
    r"click here|sign up|subscribe|follow us|tweet|email|print|comments?|loading\.*|"
    r"this slideshow requires javascript|don'?t miss|most (read|popular)|more great .{1,30} stories|"
    r"(you )?(may|might) also like|recommended( for you)?|explore further|related (articles|stories|posts|news)|"
    r"trending( now)?|story continues below|advertisement - scroll to continue|\W*)\W*$", re.I)


@dataclass
class _Block:
    text: str
    link_chars: int
    tag: str
    element: etree._Element
    size: int = field(init=False)  # computed once: every weighting under tuning reads it

    def __post_init__(self):
        self.size = _size(self.text)

    @property
    def link_density(self) -> float:
        return self.link_chars / max(1, len(self.text))


def _hidden(el) -> bool:
    return el.get("hidden") is not None or el.get("aria-hidden") == "true" or \
        bool(_HIDDEN_STYLE.search(el.get("style", "")))


def _marked(el) -> bool:
    """True for elements whose tag, role, class or id mark them as page furniture."""
    if el.tag in _FURNITURE_TAGS:
        return True
    if el.get("role") in ("navigation", "complementary", "contentinfo", "banner", "dialog", "menu"):
        return True
    classes = f"{el.get('class', '')} {el.get('id', '')}"
    if any(_AD_CLASS.match(c) for c in classes.split()):
        return True
    words = [t.lower() for t in _SPLIT.split(classes) if t]
    bad = [t for t in words if _BOILER_WORDS.match(t)]
    if bad and any(_KEEP_WORDS.match(t) for t in words):
        return any(_STRONG.match(t) for t in bad)
    return bool(bad)


def _remove(el) -> None:
    """Remove `el` and its subtree but keep its tail text (what lxml.html's drop_tree does)."""
    parent = el.getparent()
    if el.tail:
        prev = el.getprevious()
        if prev is not None:
            prev.tail = (prev.tail or "") + el.tail
        else:
            parent.text = (parent.text or "") + el.tail
    parent.remove(el)


_BOX_CHARS = 400  # a form with its wrappers holding less text than this is a sign-up, search or login box


def _text_len(el) -> int:
    return len(_WS.sub(" ", "".join(el.itertext())).strip())


def _drop_boxes(root) -> None:
    """Remove small forms together with the small wrappers that introduce them ("Daily newsletter: start every
    day with..."): calls to action, whatever their class names say. A form holding the page (ASP.NET) stays."""
    for form in list(root.iter("form")):
        if form.getparent() is None or _text_len(form) >= _BOX_CHARS:
            continue
        box = form
        for _ in range(2):
            parent = box.getparent()
            if parent is None or parent.getparent() is None or _text_len(parent) >= _BOX_CHARS:
                break
            box = parent
        _remove(box)


def _drop_junk(root) -> None:
    """Remove sign-up boxes, tags that never hold article text and hidden elements (in place)."""
    _drop_boxes(root)
    for el in list(root.iter()):
        if el.getparent() is None:
            continue
        if not isinstance(el.tag, str) or el.tag in _DROP_TAGS or _hidden(el):
            _remove(el)


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
        elif tag in ("td", "th"):
            parts.append(" ")  # a table row is one block; its cells stay separate words
        if el.tail and el is not root:  # the root's tail lies outside it
            parts.append(el.tail)
            if in_link:
                links[0] += len(el.tail.strip())

    walk(root, False)
    flush()
    return out


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _size(text: str) -> int:
    """Length in Latin-letter equivalents: a CJK character carries about as much as a short word."""
    return len(text) + 2 * len(_CJK.findall(text))


@dataclass(frozen=True)
class Weights:
    """The scoring weights of the generic extractor. `bench/extract.py --folds 5` fits them by grid search
    (`GRID`) and reports the F1 of that procedure on pages it did not see; the defaults are its fit on all pages."""
    good_min: int = 40      # non-link characters that make a block article-like (a sentence; not a label)
    link_w: float = 1.0     # link characters count against a good block this many times
    bad_w: float = 0.3      # a boilerplate block counts against its containers by this much per character...
    bad_c: float = 30.0     # ...plus this much per block, so many short bits (menus) weigh a lot
    desc_r: float = 0.85    # a descendant keeping this share of the best score is the tighter, better container


WEIGHTS = Weights()
# The values the tuning procedure may choose from (the defaults were 50, 2, 0.6, 15, 0.85 when hand-tuned).
GRID = {"good_min": (40, 50, 80), "link_w": (1.0, 2.0, 3.0), "bad_w": (0.3, 0.6, 1.0), "bad_c": (5.0, 15.0, 30.0),
        "desc_r": (0.75, 0.85, 0.95)}


def _good(b: _Block, w: Weights = WEIGHTS) -> bool:
    """Article-like: a sentence-sized block that is mostly not link text."""
    return b.size - b.link_chars >= w.good_min and b.link_density < 0.7 and not _BOILER_LINE.match(b.text)


def _plain(b: _Block) -> bool:
    """A short paragraph, list item or data-table row without links: part of an article, not furniture."""
    return b.tag in ("p", "li", "tr") and b.link_chars == 0


_TEASER_END = re.compile(r"(?:\.\.\.|\u2026|\[\u2026\]|\[\.\.\.\])\s*$")


def _teaser(b: _Block) -> bool:
    """A linked headline with an excerpt cut off by an ellipsis: how lists of other stories show each one. (A
    paywalled article's own last paragraph may end in an ellipsis too, but it is not a link.)"""
    return b.link_chars > 0 and bool(_TEASER_END.search(b.text))


def _value(b: _Block, w: Weights) -> float:
    """Container score of one block: its own words count for, link text, teasers and short snippets against."""
    if _teaser(b):
        return -w.bad_w * b.size - w.bad_c
    if _good(b, w):
        return b.size - w.link_w * b.link_chars
    if _plain(b):
        return 0.0
    return -w.bad_w * b.size - w.bad_c


def _lineage(el, top=None):
    """`el` and its ancestors below `top` (default: up to the document root, included)."""
    while el is not None and el is not top:
        yield el
        el = el.getparent()


def _furniture(blocks: list[_Block], h1, top=None, w: Weights = WEIGHTS, seen: dict | None = None) -> set:
    """Indices of blocks inside furniture-marked elements (below `top`). Weak marks (a class word like `has-sidebar`
    on the main column) are ignored on elements holding much of the page's good text; none are on elements holding
    the <h1>. `seen` caches each element's (marked, strong) across calls on one page."""
    seen = {} if seen is None else seen
    good: dict = {}
    count: dict = {}
    for b in blocks:
        if _good(b, w):
            for el in _lineage(b.element, top):
                good[el] = good.get(el, 0) + b.size
                count[el] = count.get(el, 0) + 1
    total = max(good.values(), default=0)
    title_path = set(h1.iterancestors()) if h1 is not None else set()
    marks: dict = {}
    out = set()
    for i, b in enumerate(blocks):
        for el in _lineage(b.element, top):
            if el not in marks:
                if el not in seen:
                    seen[el] = (_marked(el), bool(_STRONG.search(f"{el.get('class')} {el.get('id')}")))
                marked, strong = seen[el]
                marks[el] = marked and el not in title_path and (
                    strong or good.get(el, 0) < 0.4 * total or count.get(el, 0) < 3)
            if marks[el]:
                out.add(i)
                break
    return out


def _best_container(blocks: list[_Block], furniture: set, w: Weights):
    """The element maximising (good text) - (boilerplate text) over its blocks, or None."""
    score: dict = {}
    for i, b in enumerate(blocks):
        value = -w.bad_w * b.size - w.bad_c if i in furniture else _value(b, w)
        for el in (b.element, *b.element.iterancestors()):
            score[el] = score.get(el, 0.0) + value
    best = max(score, key=score.get, default=None)
    if best is None or score[best] <= 0:
        return None  # nothing on the page looks like article text
    # a wrapper that adds teasers around the article scores a little higher than the article itself: take the
    # deepest element that keeps most of the best score
    floor = w.desc_r * score[best]
    for el in best.iterdescendants():
        if score.get(el, 0.0) >= floor and el.tag not in _FLOW_TAGS:
            best = el
    return best


_CAPTION = re.compile(r"\((?:image|photo|picture|pic|credit|source|video)s?\s*:[^)]*\)$|"
                      r"^(?:image|photo|slide) \d+ of \d+$|^(?:©|\(c\)|copyright\b)", re.I)


def _keep(b: _Block) -> bool:
    """False for the headline, calls to action, link lists, captions, copyright and dateline/byline lines."""
    if b.tag == "h1" or _BOILER_LINE.match(b.text) or b.link_density >= 0.7 or _CAPTION.search(b.text):
        return False
    # a date or byline line: short, with a year or a clock time, and no sentence end
    return not (b.size < 80 and _DATE.search(b.text) and not _SENTENCE_END.search(b.text))


def _join(blocks: list[_Block]) -> str:
    return "\n\n".join(b.text for b in blocks)


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@dataclass
class Prepared:
    """A page made ready for the generic extractor: its text blocks and what counts as metadata. Scoring it with
    other weights needs no new parse (the tuning procedure scores each page under every weight in GRID)."""
    blocks: list[_Block]
    h1: etree._Element | None
    headings: tuple[str | None, ...] = ()
    standfirst: str | None = None
    body: etree._Element | None = None  # the page's one schema.org articleBody element, if it marks one
    authors: tuple[str, ...] = ()        # the page's authors (metadata): a block introducing one is their bio
    _furniture: dict = field(default_factory=dict, repr=False)  # good_min -> furniture (nothing else changes it)
    _marks: dict = field(default_factory=dict, repr=False)

    def _container(self, furniture: set, w: Weights):
        """The best container; inside the publisher's schema.org articleBody when the page marks one (it is the
        article by the page's own word; within it, the usual scoring still drops furniture)."""
        if self.body is not None:
            inside = set(self.body.iter())
            held = [(i, b) for i, b in enumerate(self.blocks) if b.element in inside]
            if held:
                local = {n for n, (i, _) in enumerate(held) if i in furniture}
                best = _best_container([b for _, b in held], local, w)
                return self.body if best is None or best not in inside else best
        return _best_container(self.blocks, furniture, w)

    def text(self, w: Weights = WEIGHTS) -> str:
        """Main text by text and link density. Blocks repeating one of `headings`, or the `standfirst` outside a
        <p> (a <p> equal to the description is the lead paragraph), are metadata."""
        blocks = self.blocks
        if w.good_min not in self._furniture:
            self._furniture[w.good_min] = _furniture(blocks, self.h1, w=w, seen=self._marks)
        furniture = self._furniture[w.good_min]
        best = self._container(furniture, w)
        if best is None:
            return ""
        inside = set(best.iter())
        repeats = {_words(h) for h in self.headings if h}
        dek = _words(self.standfirst or "")
        kept = [b for i, b in enumerate(blocks) if b.element in inside and i not in furniture and _keep(b)
                and _words(b.text) not in repeats and not (b.tag != "p" and _words(b.text) == dek)
                and not _bio(b, self.authors)]
        # an article starts and ends with prose or plain paragraphs: other short lines at the edges are bylines,
        # datelines, "Explore further"
        while kept and not (_good(kept[-1], w) or _plain(kept[-1])):
            kept.pop()
        start = next((i for i, b in enumerate(kept) if _good(b, w) or _plain(b)), len(kept))
        return _join(kept[start:])


_BIO_VERB = re.compile(r"\s+(?:is|was|has|covers|writes|reports|joined|serves|holds|leads|edits)\b", re.I)


def _bio(b: _Block, authors: tuple[str, ...]) -> bool:
    """"Jane Doe is a markets reporter covering...": the author box, not the article."""
    return any(len(a.split()) >= 2 and b.text.lower().startswith(a.lower()) and _BIO_VERB.match(b.text, len(a))
               for a in authors)


# CMS conventions for the element holding an article's body ("entry-content", "article__body", "storyBody").
_BODY_HEAD = {"article", "entry", "post", "story", "news", "blog", "single"}
_BODY_TAIL = {"body", "content", "text", "copy"}


def _body_class(el) -> bool:
    for token in f"{el.get('class', '')} {el.get('id', '')}".split():
        words = [t.lower() for t in _SPLIT.split(token) if t]
        if any(a in _BODY_HEAD and b in _BODY_TAIL for a, b in zip(words, words[1:])):
            return True
    return False


def _marked_body(root, blocks: list[_Block]):
    """The element the page marks as its article body: its one schema.org articleBody, else the one element (and
    what it nests) whose class says so (entry-content, article-body, ...), if it holds most article-like text."""
    marked = root.xpath('//*[@itemprop="articleBody"]')
    if len(marked) == 1:
        return marked[0]
    good: dict = {}
    for b in blocks:
        if _good(b):
            for el in _lineage(b.element):
                good[el] = good.get(el, 0) + b.size
    total = good.get(root, 0)
    candidates = {el for el in good if el is not root and _body_class(el)}
    outermost = [el for el in candidates if not any(a in candidates for a in el.iterancestors())]
    if len(outermost) != 1:  # none, or an article in several chunks: the scoring alone decides
        return None
    return outermost[0] if good[outermost[0]] >= 0.5 * total else None


def prepare(root, headings: tuple[str | None, ...] = (), standfirst: str | None = None,
            authors: tuple[str, ...] = ()) -> Prepared:
    """Drop what never holds article text from a parsed page (in place) and cut the rest into blocks."""
    _drop_junk(root)
    blocks = _blocks(root)
    return Prepared(blocks, next(root.iter("h1"), None), headings, standfirst, _marked_body(root, blocks), authors)


def generic_text(root, headings: tuple[str | None, ...] = (), standfirst: str | None = None,
                 w: Weights = WEIGHTS) -> str:
    """Main text of a parsed page by text and link density (modifies `root`); see `Prepared.text`."""
    return prepare(root, headings, standfirst).text(w)


def selected_text(root, xpath: str) -> str:
    """Text of the elements a site selector picks, cleaned like the generic path ("" if it matches nothing)."""
    _drop_junk(root)
    try:
        found = [el for el in root.xpath(xpath) if isinstance(el, etree._Element)]
    except etree.XPathError as e:
        raise ValueError(f"body_xpath {xpath!r} is not a valid XPath: {e}") from e
    chosen = set(found)
    kept = []
    for el in found:
        if any(a in chosen for a in el.iterancestors()):
            continue  # inside another match: its text is already in
        blocks = _blocks(el)
        furniture = _furniture(blocks, None, top=el)  # only elements inside the match can be furniture
        kept += [b for i, b in enumerate(blocks) if i not in furniture and _keep(b)]
    return _join(kept)


_HTML_PARSER = etree.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)
_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([\w-]+)""", re.I)


def decode_html(content: bytes, encoding: str | None = None) -> str:
    """Bytes of a page -> str: the HTTP charset, else the <meta> charset, else UTF-8 (bad bytes replaced)."""
    found = _CHARSET.search(content[:4096])
    for enc in (encoding, found.group(1).decode("ascii") if found else None, "utf-8"):
        if enc:
            try:
                return content.decode(enc, errors="replace")
            except LookupError:
                continue  # an unknown charset name: try the next guess
    raise AssertionError("utf-8 is always known")


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
            add(json.loads(script.text or "", strict=False))  # raw newlines in strings are common
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


def _first_str(value) -> str | None:
    """JSON-LD values may be a string, a list of them, or an object with @value."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("@value")
    return value.strip() if isinstance(value, str) and value.strip() else None


_EMPTY = {"url": None, "title": None, "author": None, "published": None, "modified": None, "description": None,
          "lang": None, "site": None, "tags": []}


def _parse(html: str | bytes):
    """The page's root element (plain etree elements: lxml.html's classes cost a lookup per node), or None."""
    if isinstance(html, bytes):
        html = decode_html(html)
    if not html.strip():
        return None
    return etree.fromstring(html.encode("utf-8"), _HTML_PARSER)


def _metadata(root, url: str) -> tuple[dict, dict]:
    """(title, author, published, ... of the page, its JSON-LD article object or {})."""
    article = next((i for i in _jsonld_items(root) if _is_article(i)), {})
    title = _first_str(article.get("headline")) or _meta(root, "og:title", "twitter:title") \
        or root.xpath("normalize-space(//h1)") or root.findtext(".//title")
    authors = _names(article.get("author")) or [a for a in [_meta(root, "author", "article:author")] if a]
    keywords = article.get("keywords") or _meta(root, "news_keywords", "keywords") or []
    if isinstance(keywords, str):
        keywords = keywords.split(",")
    tags = root.xpath('//meta[@property="article:tag"]/@content') or keywords
    canonical = root.xpath('string(//link[@rel="canonical"]/@href)').strip() or _meta(root, "og:url")
    return {
        "url": urljoin(url, canonical) if canonical else url,
        "title": _WS.sub(" ", title).strip() if title else None,
        "author": ", ".join(dict.fromkeys(authors)) or None,
        "published": _first_str(article.get("datePublished")) or _meta(
            root, "article:published_time", "datePublished", "pubdate", "date", "dc.date", "parsely-pub-date"),
        "modified": _first_str(article.get("dateModified")) or _meta(root, "article:modified_time"),
        "description": _first_str(article.get("description")) or _meta(root, "og:description", "description"),
        "lang": root.get("lang") or _meta(root, "og:locale"),
        "site": _meta(root, "og:site_name"),
        "tags": list(dict.fromkeys(t.strip() for t in tags if isinstance(t, str) and t.strip())),
    }, article


def _prepare_root(root, meta: dict) -> Prepared:
    authors = tuple(a.strip() for a in (meta["author"] or "").split(",") if a.strip())
    return prepare(root, (meta["title"], _meta(root, "og:title", "twitter:title")), meta["description"], authors)


def prepare_page(html: str | bytes, url: str = "") -> Prepared:
    """The generic path of `extract_article` up to the scoring: `prepare_page(html).text(weights)` is its text with
    JSON-LD articleBody off (what the tuning procedure in bench/extract.py scores)."""
    root = _parse(html)
    if root is None:
        return Prepared([], None)
    return _prepare_root(root, _metadata(root, url)[0])


def extract_article(html: str | bytes, url: str = "", use_jsonld_body: bool = True,
                    body_xpath: str | None = None, w: Weights = WEIGHTS) -> dict:
    """Title, author, published, text, tags (and modified, description, lang, site) of one article page.

    Body: a site selector (`body_xpath`) if it matches, else the generic extractor; JSON-LD `articleBody`
    replaces either unless it is a teaser or `use_jsonld_body` is off. `url` becomes the page's canonical URL."""
    root = _parse(html)
    if root is None:
        return {**_EMPTY, "url": url, "text": ""}
    meta, article = _metadata(root, url)
    text = (selected_text(root, body_xpath) if body_xpath else "") or _prepare_root(root, meta).text(w)
    body = _first_str(article.get("articleBody")) if use_jsonld_body else None
    if body and "<" in body:
        body = lxml.html.fromstring(body).text_content()  # some sites put HTML in articleBody
    # the publisher's own body wins unless it is a teaser (many sites cut it to a few hundred characters)
    if body and len(body) >= max(200, 0.8 * len(text)):
        text = "\n\n".join(_WS.sub(" ", line).strip() for line in body.split("\n") if line.strip())
    return {**meta, "text": text}


@dataclass
class ExtractArgs:
    generic_only: bool = field(default=False, metadata={"help": "ignore JSON-LD articleBody"})
    body_xpath: str | None = field(default=None, metadata={"help": "XPath of the body element (a site selector)"})


def main(argv: list[str] | None = None) -> None:
    args, ns = parse_args(argv, ExtractArgs, description=__doc__,
                          positional=[("pages", {"nargs": "+", "type": Path, "help": "saved .html files"})])
    for path in ns.pages:
        if not path.is_file():
            raise FileNotFoundError(f"no page at {path}")
        article = extract_article(path.read_bytes(), path.resolve().as_uri(), not args.generic_only, args.body_xpath)
        print(json.dumps(article, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
