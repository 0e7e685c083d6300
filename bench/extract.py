"""Article-body extraction quality and speed: ours (generic path and full) vs trafilatura vs readability-lxml.

    python -m bench.extract
    python -m bench.extract --data ../shared/data/article-extraction-benchmark

Data: scrapinghub's article-extraction-benchmark (181 news pages, gzip HTML, and `ground-truth.json` with the true
`articleBody`). Metric as in that benchmark's evaluate.py: tokens are `\\w+` runs, each page's text becomes a
multiset of word 4-gram shingles, TP/FP/FN are counted per page and normalised to sum 1 (so long pages weigh no
more than short ones), precision and recall are means over pages, F1 comes from the two means.
"""
from __future__ import annotations

import gzip
import json
import re
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cli import parse_args
from scrape.extract import extract_article

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "article-extraction-benchmark"
_TOKEN = re.compile(r"\w+")


@dataclass
class BenchArgs:
    data: Path = field(default=DATA, metadata={"help": "folder with ground-truth.json and html/*.html.gz"})
    references: bool = field(default=True, metadata={"help": "also run trafilatura and readability-lxml"})

    def __post_init__(self):
        if not (Path(self.data) / "ground-truth.json").is_file():
            raise FileNotFoundError(f"data={self.data} has no ground-truth.json; pass --data to the benchmark folder")


def shingles(text: str, n: int = 4) -> Counter:
    """Word n-gram multiset; a text shorter than n words is one shorter shingle (as the benchmark does)."""
    tokens = _TOKEN.findall(text or "")
    return Counter(tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1)) if tokens[i:i + n])


def page_counts(true: str, pred: str) -> tuple[float, float, float]:
    """(TP, FP, FN) over shingles of one page, normalised to sum 1."""
    t, p = shingles(true), shingles(pred)
    tp, fp, fn = sum((t & p).values()), sum((p - t).values()), sum((t - p).values())
    total = tp + fp + fn
    return (tp / total, fp / total, fn / total) if total else (0.0, 0.0, 0.0)


def scores(counts: list[tuple[float, float, float]]) -> dict:
    """Mean per-page precision and recall (pages with nothing to score left out, as in the benchmark), their F1."""
    def precision(tp, fp, fn):
        return 1.0 if fp == fn == 0 else tp / (tp + fp) if tp + fp else 0.0

    def recall(tp, fp, fn):
        return 1.0 if fp == fn == 0 else tp / (tp + fn) if tp + fn else 0.0

    p = statistics.mean(precision(*c) for c in counts if c[0] + c[1] > 0)
    r = statistics.mean(recall(*c) for c in counts if c[0] + c[2] > 0)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def load(data: Path) -> list[tuple[str, str, str]]:
    """[(html, url, true body)] in ground-truth order."""
    truth = json.loads((data / "ground-truth.json").read_text(encoding="utf-8"))
    return [(gzip.decompress((data / "html" / f"{key}.html.gz").read_bytes()).decode("utf-8"), v["url"],
             v.get("articleBody", "")) for key, v in truth.items()]


def ours_generic(html: str, url: str) -> str:
    return extract_article(html, url, use_jsonld_body=False)["text"]


def ours_full(html: str, url: str) -> str:
    return extract_article(html, url)["text"]


def trafilatura_text(html: str, url: str) -> str:
    import trafilatura
    return trafilatura.extract(html, include_comments=False) or ""


def readability_text(html: str, url: str) -> str:
    import lxml.html
    from readability import Document
    summary = Document(html).summary(html_partial=True)
    return " ".join(lxml.html.fromstring(summary).itertext())  # one space per text node keeps words apart


def evaluate(extract, pages) -> dict:
    # CPU time of this process: the 2 cores are shared, and wall time would mostly measure the neighbours
    start = time.process_time()
    texts = [extract(html, url) for html, url, _ in pages]
    seconds = time.process_time() - start
    result = scores([page_counts(true, pred) for (_, _, true), pred in zip(pages, texts)])
    return {**result, "pages_per_s": len(pages) / seconds}


def main(argv: list[str] | None = None) -> None:
    args, = parse_args(argv, BenchArgs, description=__doc__)
    pages = load(Path(args.data))
    runs = {"ours (generic)": ours_generic, "ours (full)": ours_full}
    if args.references:
        runs |= {"trafilatura": trafilatura_text, "readability-lxml": readability_text}
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference libraries warn about odd pages
        for name, fn in runs.items():
            results[name] = evaluate(fn, pages)
    print(f"{len(pages)} pages; pages/s is per second of this process's CPU time")
    print(f"{'extractor':<18}{'precision':>10}{'recall':>10}{'F1':>8}{'pages/s':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>8.3f}{r['pages_per_s']:>10.1f}")
    f1 = results["ours (generic)"]["f1"]
    print(f"extract_f1_generic: {f1:.3f} (goal >= 0.95)")
    if "trafilatura" in results:
        print(f"extract_f1_vs_trafilatura: {f1 / results['trafilatura']['f1']:.3f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
