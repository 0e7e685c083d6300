"""Split articles into chunks for retrieval: word windows, sentence packs or paragraph packs.

Every chunk is an exact slice `article["text"][start:end]` and carries the article's url, title and date,
so an answer can cite its source. Sizes count words (whitespace-separated); one English word is about
1.3 MiniLM word pieces, so chunks up to ~190 words fit the encoder's 256-piece window whole.

    from retrieval.chunk import ChunkArgs, chunk_article
    chunks = chunk_article({"url": ..., "title": ..., "published": ..., "text": ...}, ChunkArgs())
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

STRATEGIES = ("tokens", "sentences", "paragraphs")


# Defaults from bench/chunking.py (BENCHMARKS.md, Retrieval): at a fixed 512-word context budget 64-word chunks
# recall more answers than 128 or 256 (256 words also overflow MiniLM's 256-piece window); the three chunkers tie
# on recall, and whole sentences without the title rank the answer highest (MRR@10).
@dataclass
class ChunkArgs:
    chunker: Literal["tokens", "sentences", "paragraphs"] = field(default="sentences", metadata={
        "help": "tokens: fixed word windows; sentences: whole sentences packed up to the size; "
                "paragraphs: whole paragraphs packed up to the size (longer ones split by sentences)"})
    chunk_size: int = field(default=64, metadata={"help": "maximum words per chunk"})
    chunk_overlap: int = field(default=16, metadata={
        "help": "words shared by neighbouring chunks (whole sentences/paragraphs for those chunkers)"})
    chunk_title: bool = field(default=False, metadata={
        "help": "prepend the article title to the text that is embedded (helps topical questions, hurts ranking)"})

    def __post_init__(self):
        if self.chunker not in STRATEGIES:
            raise ValueError(f"chunker={self.chunker!r} must be one of {STRATEGIES}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(f"chunk_overlap={self.chunk_overlap} must be in [0, chunk_size={self.chunk_size})")


@dataclass
class Chunk:
    text: str
    url: str
    title: str
    published: str
    start: int  # character offsets of `text` in the article's text
    end: int

    def embed_text(self, with_title: bool) -> str:
        """The text the embedder sees: the title gives a chunk the context its sentences lack."""
        return f"{self.title}\n{self.text}" if with_title and self.title else self.text


_WORD = re.compile(r"\S+")
# a sentence ends at a line break, or at . ! ? (plus closing quotes/brackets) and whitespace when the next character
# is not lower-case (so caseless scripts split too) and the word before the stop is not in _ABBREV, the
# abbreviations that most often fake an end in news text
_SENT_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+|\s*\n\s*")
_ABBREV = re.compile(r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Corp|Co|Ltd|No|vs|etc|Gov|Sen|Rep|Gen))\.$")
_PARAGRAPH = re.compile(r"\n\s*\n")

Span = tuple[int, int]


def _strip(text: str, start: int, end: int) -> Span | None:
    """(start, end) without surrounding whitespace; None when only whitespace is left."""
    s = text[start:end]
    lead = len(s) - len(s.lstrip())
    body = s.strip()
    return (start + lead, start + lead + len(body)) if body else None


def _split(text: str, start: int, end: int, boundaries) -> list[Span]:
    """Cut text[start:end] at the given absolute offsets, dropping empty pieces."""
    spans, prev = [], start
    for cut in [*boundaries, end]:
        span = _strip(text, prev, cut)
        if span:
            spans.append(span)
        prev = cut
    return spans


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[Span]:
    """Sentence boundaries of text[start:end] as absolute (start, end) offsets."""
    end = len(text) if end is None else end
    cuts = [m.end() for m in _SENT_END.finditer(text, start, end) if "\n" in m.group() or (
            m.end() < end and not text[m.end()].islower()
            # the 6 characters up to the first stop hold the longest abbreviation plus the character before it
            and not _ABBREV.search(text[max(start, m.start() - 5):m.start() + 1]))]
    return _split(text, start, end, cuts)


def paragraph_spans(text: str) -> list[Span]:
    """Paragraphs split at blank lines; texts without blank lines have one paragraph per line."""
    sep = _PARAGRAPH if _PARAGRAPH.search(text) else re.compile(r"\n")
    return _split(text, 0, len(text), [m.start() for m in sep.finditer(text)])


def _word_spans(text: str, start: int, end: int) -> list[Span]:
    return [m.span() for m in _WORD.finditer(text, start, end)]


def _windows(words: list[Span], size: int, overlap: int) -> list[Span]:
    """Windows of `size` words that start every `size - overlap` words, the last one ending at the last word."""
    step = size - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [(words[i][0], words[min(i + size, len(words)) - 1][1]) for i in starts if i < len(words)]


def _pack(text: str, units: list[Span], size: int, overlap: int) -> list[Span]:
    """Greedily join consecutive units into spans of at most `size` words; the next span repeats the last
    whole units of the previous one up to `overlap` words. A unit longer than `size` becomes word windows."""
    counted = []
    for s, e in units:
        words = _word_spans(text, s, e)
        if len(words) > size:
            counted += [(ws, we, size) for ws, we in _windows(words, size, overlap)]
        else:
            counted.append((s, e, len(words)))
    spans, cur, n = [], [], 0
    for unit in counted:
        if cur and n + unit[2] > size:
            spans.append((cur[0][0], cur[-1][1]))
            carry, m = [], 0
            for u in reversed(cur):  # the tail of the finished span that fits the overlap budget
                if m + u[2] > overlap or m + u[2] + unit[2] > size:
                    break
                carry.insert(0, u)
                m += u[2]
            cur, n = carry, m
        cur.append(unit)
        n += unit[2]
    if cur:
        spans.append((cur[0][0], cur[-1][1]))
    return spans


def chunk_spans(text: str, args: ChunkArgs) -> list[Span]:
    """Character spans of the chunks of `text` under `args`."""
    size, overlap = args.chunk_size, args.chunk_overlap
    if args.chunker == "tokens":
        return _windows(_word_spans(text, 0, len(text)), size, overlap)
    if args.chunker == "sentences":
        return _pack(text, sentence_spans(text), size, overlap)
    units = []
    for s, e in paragraph_spans(text):
        long = len(_word_spans(text, s, e)) > size
        units += sentence_spans(text, s, e) if long else [(s, e)]
    return _pack(text, units, size, overlap)


def chunk_article(article: dict, args: ChunkArgs) -> list[Chunk]:
    """Chunks of one article record ({url, title, published, text}; only text is required)."""
    text = article.get("text") or ""
    meta = dict(url=article.get("url") or "", title=article.get("title") or "",
                published=article.get("published") or "")
    return [Chunk(text=text[s:e], start=s, end=e, **meta) for s, e in chunk_spans(text, args)]
