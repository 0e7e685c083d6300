"""Which chunker and chunk size retrieve answers best: recall@k and MRR on two QA sets, one table.

    python -m bench.chunking            # the run in BENCHMARKS.md: MiniLM, 3 chunkers x 64/128/256 words x title
                                        # on/off (18.5 min on 2 cores shared with other jobs)
    python -m bench.chunking --real-articles 0 --titles off      # all 181 real articles
    python -m bench.chunking --embedder hashing:4096              # quick, no model (~15 s)

Corpus: the 30 invented articles of data/sample_news.jsonl plus the first 100 (`--real-articles`) of the 181
real article bodies of ../shared/data/article-extraction-benchmark (titles from their HTML), indexed together so
every question has all the other articles to be confused with. QA sets:
- `sample`: the 60 hand-written questions of data/sample_news_labels.jsonl; a chunk is relevant when it comes
  from the question's article and contains the answer verbatim.
- `cloze`: one question per real article, made here: a number or name cut out of a 10-40 word sentence, and
  only the `cloze_words` words on each side of the gap kept ("equivalent of ___ miles per gallon (38"); a chunk
  is relevant when it covers the cut-out span. The query's words come from its source, so this measures how
  chunk size and boundaries dilute a short local match, not paraphrase.
`R@Nw` is recall within the top chunks that fit a context budget of N words (top-N/size chunks): what a
reader model with a fixed prompt size actually gets. The default is the configuration with the best MRR@10 among
those within 0.02 of the best R@Nw (both averaged over the two sets).
"""
from __future__ import annotations

import gzip
import html
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cli import parse_args
from jsonl import read_jsonl
from retrieval.chunk import STRATEGIES, ChunkArgs, chunk_article, sentence_spans
from retrieval.embed import load_embedder
from retrieval.index import Index

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = ROOT.parent / "shared" / "data" / "article-extraction-benchmark"


@dataclass
class BenchArgs:
    embedder: str = field(default="minilm", metadata={"help": "embedder name (see retrieval.embed)"})
    chunkers: tuple[str, ...] = field(default=STRATEGIES, metadata={"help": "chunkers to compare"})
    sizes: tuple[int, ...] = field(default=(64, 128, 256), metadata={"help": "chunk sizes in words"})
    overlap: float = field(default=0.25, metadata={"help": "overlap as a fraction of the chunk size"})
    budget: int = field(default=512, metadata={"help": "context budget in words for the R@Nw column"})
    titles: tuple[str, ...] = field(default=("on", "off"), metadata={
        "help": "embed chunks with the article title (on), without (off), or both"})
    sample: Path = field(default=ROOT / "data" / "sample_news.jsonl", metadata={"help": "sample articles"})
    labels: Path = field(default=ROOT / "data" / "sample_news_labels.jsonl", metadata={"help": "their QA pairs"})
    benchmark: Path = field(default=BENCHMARK, metadata={"help": "article-extraction-benchmark folder"})
    real_articles: int = field(default=100, metadata={
        "help": "use the first N benchmark articles (0 = all 181; each costs MiniLM time in every configuration)"})
    cloze_words: int = field(default=4, metadata={"help": "words kept on each side of a cloze gap"})
    seed: int = field(default=0, metadata={"help": "seed for choosing cloze sentences"})

    def __post_init__(self):
        for p in (self.sample, self.labels, self.benchmark / "ground-truth.json"):
            if not Path(p).exists():
                raise FileNotFoundError(f"{p} not found (see --sample, --labels, --benchmark)")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap={self.overlap} must be in [0, 1)")
        if not self.titles or set(self.titles) - {"on", "off"}:
            raise ValueError(f"titles={self.titles}: use on, off or on,off")
        if unknown := set(self.chunkers) - set(STRATEGIES):
            raise ValueError(f"chunkers={self.chunkers}: unknown {sorted(unknown)}; choose from {STRATEGIES}")


@dataclass
class Question:
    text: str
    url: str
    answer: str
    span: tuple[int, int] | None = None  # cloze: the exact offsets that a relevant chunk must cover


def _title(html_gz: Path) -> str:
    """The page's <title> without a trailing site name ("... - WSJ"), as a scraper's headline field has it."""
    with gzip.open(html_gz, "rt", errors="replace") as f:
        m = re.search(r"<title[^>]*>(.*?)</title>", f.read(), re.S | re.I)
    title = html.unescape(" ".join(m.group(1).split())) if m else ""
    return re.sub(r"\s+[-|–—]\s+[^-|–—]{1,40}$", "", title)


_ANSWER = re.compile(r"\b\d[\d,.]*\d(?:%| percent| million| billion)?|\b\d+%?|(?<=\s)[A-Z][a-z]+(?: [A-Z][a-z]+)+")


def cloze_question(article: dict, rng: random.Random, words: int) -> Question | None:
    """A number or multi-word name (the answer) cut out of a 10-40 word sentence, with `words` words each side."""
    text = article["text"]
    options = []
    for s, e in sentence_spans(text):
        if 10 <= len(text[s:e].split()) <= 40:
            options += [(s, e, m.start() + s, m.end() + s) for m in _ANSWER.finditer(text[s:e])]
    if not options:
        return None
    s, e, a, b = rng.choice(options)
    before, after = text[s:a].split()[-words:], text[b:e].split()[:words]
    return Question(" ".join([*before, "___", *after]), article["url"], text[a:b], (a, b))


def load_corpus(args: BenchArgs) -> tuple[list[dict], dict[str, list[Question]]]:
    articles = [r for _, r in read_jsonl(args.sample)]
    labels = [r for _, r in read_jsonl(args.labels)]
    sample_q = [Question(qa["question"], rec["url"], qa["answer"]) for rec in labels for qa in rec["qa"]]
    truth = json.loads((args.benchmark / "ground-truth.json").read_text(encoding="utf-8"))
    rng, cloze_q = random.Random(args.seed), []
    for key in sorted(truth)[:args.real_articles or None]:
        rec = truth[key]
        title = _title(args.benchmark / "html" / f"{key}.html.gz")
        art = {"url": rec["url"], "text": rec["articleBody"], "title": title}
        articles.append(art)
        q = cloze_question(art, rng, args.cloze_words)
        if q:
            cloze_q.append(q)
    return articles, {"sample": sample_q, "cloze": cloze_q}


def _relevant(chunk, q: Question) -> bool:
    if chunk.url != q.url:
        return False
    return chunk.start <= q.span[0] and q.span[1] <= chunk.end if q.span else q.answer in chunk.text


def evaluate(index: Index, questions: list[Question], qvecs: np.ndarray, budget_k: int) -> dict[str, float]:
    """Recall@1/5/10, recall within the context budget, and MRR@10 (first relevant chunk's reciprocal rank)."""
    _, ids = index.search(qvecs, max(10, budget_k))
    ranks = []
    for q, row in zip(questions, ids):
        hit = next((r for r, i in enumerate(row) if _relevant(index.chunks[i], q)), None)
        ranks.append(np.inf if hit is None else hit + 1)
    ranks = np.array(ranks)
    return {"R@1": np.mean(ranks <= 1), "R@5": np.mean(ranks <= 5), "R@10": np.mean(ranks <= 10),
            "R@budget": np.mean(ranks <= budget_k), "MRR": np.mean(np.where(ranks <= 10, 1 / ranks, 0.0))}


def run(args: BenchArgs) -> list[dict]:
    """One row per (configuration, QA set)."""
    from tqdm import tqdm

    articles, qsets = load_corpus(args)
    embedder = load_embedder(args.embedder)
    qvecs = {name: embedder.encode([q.text for q in qs]) for name, qs in qsets.items()}
    cache: dict[str, np.ndarray] = {}  # the same chunk text recurs across configurations: embed it once

    def measure(cargs: ChunkArgs) -> list[dict]:
        chunks = [c for a in articles for c in chunk_article(a, cargs)]
        texts = [c.embed_text(cargs.chunk_title) for c in chunks]
        todo = sorted({t for t in texts if t not in cache})
        cache.update(zip(todo, embedder.encode(todo) if todo else []))
        index = Index(embedder, cargs)
        index.add_vectors(np.stack([cache[t] for t in texts]), chunks)
        budget_k = max(1, args.budget // cargs.chunk_size)
        return [dict(chunker=cargs.chunker, size=cargs.chunk_size, overlap=cargs.chunk_overlap,
                     title=cargs.chunk_title, qa=name, chunks=len(chunks),
                     **evaluate(index, qs, qvecs[name], budget_k)) for name, qs in qsets.items()]

    rows = []
    configs = [ChunkArgs(chunker=c, chunk_size=size, chunk_overlap=int(size * args.overlap), chunk_title=title)
               for title in (t == "on" for t in args.titles)
               for c in args.chunkers for size in args.sizes]
    for cargs in tqdm(configs, desc="configurations"):
        rows += measure(cargs)
    return rows


def pick_default(rows: list[dict], tolerance: float = 0.02) -> tuple[dict, float, float]:
    """The configuration with the best MRR@10 among those whose R@budget (averaged over the QA sets) is within
    `tolerance` (about one question per set) of the best: recall decides first, ranking breaks near-ties."""
    keys = ("chunker", "size", "overlap", "title")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    means = {g: (float(np.mean([r["R@budget"] for r in rs])), float(np.mean([r["MRR"] for r in rs])))
             for g, rs in groups.items()}
    top = max(recall for recall, _ in means.values())
    best = max((g for g, (recall, _) in means.items() if recall >= top - tolerance), key=lambda g: means[g][1])
    return dict(zip(keys, best)), *means[best]


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, BenchArgs, description=__doc__)
    rows = run(args)
    print(f"embedder {args.embedder}; overlap {args.overlap:.0%} of size; R@{args.budget}w = top-{args.budget}/size")
    print(f"| chunker | size | overlap | title | QA set | chunks | R@1 | R@5 | R@10 | R@{args.budget}w | MRR@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunker']} | {r['size']} | {r['overlap']} | {'yes' if r['title'] else 'no'} | {r['qa']} | "
              f"{r['chunks']} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | {r['R@budget']:.3f} | "
              f"{r['MRR']:.3f} |")
    best, recall, mrr = pick_default(rows)
    print(f"default (best MRR@10 within 0.02 of the best R@{args.budget}w, both averaged over QA sets): "
          f"{best['chunker']} {best['size']} words, overlap {best['overlap']}, title {'on' if best['title'] else 'off'}"
          f" (R@{args.budget}w {recall:.3f}, MRR@10 {mrr:.3f})")


if __name__ == "__main__":
    main()
