"""Article-body extraction quality and speed: ours (generic path and full) vs trafilatura vs readability-lxml, in
sample and out of fold, plus the real crypto pages that nothing was tuned on.

    python -m bench.extract                       # all 181 pages, weights as shipped (an in-sample figure)
    python -m bench.extract --folds 5             # + the out-of-fold F1 of the tuning procedure (the headline)
    python -m bench.extract --data ../shared/data/article-extraction-benchmark --no-references

Data: scrapinghub's article-extraction-benchmark (181 news pages, gzip HTML, and `ground-truth.json` with the true
`articleBody`). Metric as in that benchmark's evaluate.py: tokens are `\\w+` runs, each page's text becomes a
multiset of word 4-gram shingles, TP/FP/FN are counted per page and normalised to sum 1 (so long pages weigh no
more than short ones), precision and recall are means over pages, F1 comes from the two means.

Cross-validation: pages are split into folds by site (host), so no site is both fitted and judged. The tuning
procedure is a grid search over `scrape.extract.GRID` for the best F1 on the training folds; each fold's pages are
then scored with the weights fitted without them, and those scores, pooled over all pages, give the out-of-fold F1.
trafilatura and readability-lxml have nothing to fit, so the same pages give their figure. The crypto pages
(`../shared/data/crypto-news/pages`) are only evaluated, never tuned on: truth is the text of the `body_xpath`
element in their expected.json (captions and "read also" boxes included, so recall stays below 1), and each is also
checked for the phrases it must and must not contain.
"""
from __future__ import annotations

import gzip
import itertools
import json
import random
import re
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import lxml.html

from cli import parse_args
from scrape.extract import GRID, WEIGHTS, Weights, extract_article, prepare_page
from scrape.sources import SOURCES

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATA = SHARED / "article-extraction-benchmark"
CRYPTO = SHARED / "crypto-news" / "pages"
CRYPTO_SOURCES = {"coindesk.html": "coindesk", "decrypt.html": "decrypt", "cointelegraph_de.html": "cointelegraph"}
_TOKEN = re.compile(r"\w+")


@dataclass
class BenchArgs:
    data: Path = field(default=DATA, metadata={"help": "folder with ground-truth.json and html/*.html.gz"})
    references: bool = field(default=True, metadata={"help": "also run trafilatura and readability-lxml"})
    folds: int = field(default=0, metadata={"help": "cross-validate the weight tuning over this many folds (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the split of sites into folds"})
    crypto: Path = field(default=CRYPTO, metadata={"help": "real crypto pages with expected.json ('' to skip)"})

    def __post_init__(self):
        if not (Path(self.data) / "ground-truth.json").is_file():
            raise FileNotFoundError(f"data={self.data} has no ground-truth.json; pass --data to the benchmark folder")
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds={self.folds} must be 0 (off) or >= 2")
        if str(self.crypto) and not (Path(self.crypto) / "expected.json").is_file():
            raise FileNotFoundError(f"crypto={self.crypto} has no expected.json; pass --crypto '' to skip")


def shingles(text: str, n: int = 4) -> Counter:
    """Word n-gram multiset; a text shorter than n words is one shorter shingle (as the benchmark does)."""
    tokens = _TOKEN.findall(text or "")
    return Counter(tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1)) if tokens[i:i + n])


def page_counts(true: str | Counter, pred: str) -> tuple[float, float, float]:
    """(TP, FP, FN) over shingles of one page, normalised to sum 1 (`true` may be its shingles already)."""
    t, p = true if isinstance(true, Counter) else shingles(true), shingles(pred)
    tp, fp, fn = sum((t & p).values()), sum((p - t).values()), sum((t - p).values())
    total = tp + fp + fn
    return (tp / total, fp / total, fn / total) if total else (0.0, 0.0, 0.0)


def scores(counts: list[tuple[float, float, float]]) -> dict:
    """Mean per-page precision and recall (pages with nothing to score left out, as in the benchmark), their F1."""
    def precision(tp, fp, fn):
        return 1.0 if fp == fn == 0 else tp / (tp + fp) if tp + fp else 0.0

    def recall(tp, fp, fn):
        return 1.0 if fp == fn == 0 else tp / (tp + fn) if tp + fn else 0.0

    p = statistics.mean([precision(*c) for c in counts if c[0] + c[1] > 0] or [0.0])
    r = statistics.mean([recall(*c) for c in counts if c[0] + c[2] > 0] or [0.0])
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
    import trafilatura  # lazy: a reference library, installed for benchmarks only (requirements-dev.txt)
    return trafilatura.extract(html, include_comments=False) or ""


def readability_text(html: str, url: str) -> str:
    from readability import Document  # lazy: a reference library, as above
    summary = Document(html).summary(html_partial=True)
    return " ".join(lxml.html.fromstring(summary).itertext())  # one space per text node keeps words apart


def evaluate(extract, pages) -> dict:
    # CPU time of this process: the 2 cores are shared, and wall time would mostly measure the neighbours
    start = time.process_time()
    texts = [extract(html, url) for html, url, _ in pages]
    seconds = time.process_time() - start
    counts = [page_counts(true, pred) for (_, _, true), pred in zip(pages, texts)]
    return {**scores(counts), "pages_per_s": len(pages) / seconds, "counts": counts}


# -- cross-validation of the tuning procedure
def site_folds(pages, k: int, seed: int = 0) -> list[int]:
    """The fold of each page: sites (hosts) shuffled with `seed` and dealt round-robin, so a site's pages share one."""
    hosts = sorted({(urlsplit(url).hostname or "").removeprefix("www.") for _, url, _ in pages})
    random.Random(seed).shuffle(hosts)
    fold_of = {h: i % k for i, h in enumerate(hosts)}
    return [fold_of[(urlsplit(url).hostname or "").removeprefix("www.")] for _, url, _ in pages]


def grid(space: dict = GRID) -> list[Weights]:
    """Every combination of the values in `space` (the shipped weights first, so they win ties)."""
    names = list(space)
    combos = [replace(WEIGHTS, **dict(zip(names, values))) for values in itertools.product(*space.values())]
    return [WEIGHTS] + [w for w in combos if w != WEIGHTS]


class Tuner:
    """Per-page (TP, FP, FN) under each candidate weighting, computed once and shared by every fold."""

    def __init__(self, pages, candidates: list[Weights]):
        self.truths = [shingles(true) for _, _, true in pages]
        self.prepared = [prepare_page(html, url) for html, url, _ in pages]
        self.candidates = candidates
        self._counts: dict[Weights, list] = {}
        self._memo: list[dict] = [{} for _ in pages]  # page -> text -> counts: most weightings agree on a page

    def counts(self, w: Weights) -> list[tuple[float, float, float]]:
        if w not in self._counts:
            self._counts[w] = [self._page(i, p.text(w)) for i, p in enumerate(self.prepared)]
        return self._counts[w]

    def _page(self, i: int, text: str) -> tuple[float, float, float]:
        if text not in self._memo[i]:
            self._memo[i][text] = page_counts(self.truths[i], text)
        return self._memo[i][text]

    def fit(self, rows: list[int]) -> Weights:
        """The candidate with the best F1 on the pages `rows` (the first one on a tie)."""
        return max(self.candidates, key=lambda w: scores([self.counts(w)[i] for i in rows])["f1"])


def cross_validate(pages, k: int, seed: int = 0, candidates: list[Weights] | None = None) -> dict:
    """Out-of-fold counts of the tuning procedure, each fold's fitted weights, and the fit on all pages."""
    tuner = Tuner(pages, candidates or grid())
    folds = site_folds(pages, k, seed)
    oof: list = [None] * len(pages)
    fitted = []
    for f in range(k):
        train = [i for i, g in enumerate(folds) if g != f]
        w = tuner.fit(train)
        fitted.append(w)
        for i, g in enumerate(folds):
            if g == f:
                oof[i] = tuner.counts(w)[i]
    everything = tuner.fit(list(range(len(pages))))
    return {"folds": folds, "oof": oof, "fitted": fitted, "all_pages": everything,
            "in_sample": tuner.counts(everything)}


def per_fold(counts: list, folds: list[int], k: int) -> list[float]:
    return [scores([c for c, g in zip(counts, folds) if g == f])["f1"] for f in range(k)]


# -- the real crypto pages
def crypto_pages(folder: Path) -> list[dict]:
    """Each page with its truth (the body_xpath element's text) and the phrases it must / must not contain."""
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    out = []
    for name, exp in expected.items():
        raw = (folder / name).read_bytes()
        truth = " ".join(" ".join(el.itertext()) for el in lxml.html.fromstring(raw).xpath(exp["body_xpath"]))
        evaldata = exp.get("trafilatura_evaldata", {})
        out.append({"name": name, "raw": raw, "truth": truth, "url": exp["url"],
                    "with": exp.get("body_must_contain", []) + evaldata.get("with", []),
                    "without": evaldata.get("without", [])})
    return out


def crypto_runs(references: bool) -> dict:
    runs = {"ours (generic)": lambda page: extract_article(page["raw"], page["url"], use_jsonld_body=False)["text"],
            "ours (site selector)": lambda page: extract_article(
                page["raw"], page["url"], body_xpath=SOURCES[CRYPTO_SOURCES[page["name"]]].body_xpath)["text"]}
    if references:
        html = lambda page: page["raw"].decode("utf-8", "replace")  # noqa: E731
        runs["trafilatura"] = lambda page: trafilatura_text(html(page), page["url"])
        runs["readability-lxml"] = lambda page: readability_text(html(page), page["url"])
    return runs


def score_crypto(pages: list[dict], references: bool) -> dict:
    """{extractor: {page: {precision, recall, f1, with, without}}}."""
    results: dict = {}
    for name, run in crypto_runs(references).items():
        for page in pages:
            text = run(page)
            tp, fp, fn = page_counts(page["truth"], text)
            p, r = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0
            results.setdefault(name, {})[page["name"]] = {
                "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                "with": sum(s in text for s in page["with"]), "of_with": len(page["with"]),
                "without": sum(s not in text for s in page["without"]), "of_without": len(page["without"])}
    return results


# -- the report
def _print_table(results: dict) -> None:
    print(f"{'extractor':<18}{'precision':>10}{'recall':>10}{'F1':>8}{'pages/s':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>8.3f}{r['pages_per_s']:>10.1f}")


def _print_cv(cv: dict, results: dict, k: int) -> float:
    oof = scores(cv["oof"])
    print(f"\n{k}-fold cross-validation by site ({len(set(cv['folds']))} folds; grid of {len(grid())} weightings)")
    print(f"{'':<26}{'precision':>10}{'recall':>10}{'F1':>8}   per fold")
    rows = {"ours, in sample (fit on all)": (scores(cv["in_sample"]), cv["in_sample"]),
            "ours, out of fold": (oof, cv["oof"])}
    rows |= {name: (r, r["counts"]) for name, r in results.items() if name in ("trafilatura", "readability-lxml")}
    for name, (r, counts) in rows.items():
        folds = " ".join(f"{f:.3f}" for f in per_fold(counts, cv["folds"], k))
        print(f"{name:<26}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>8.3f}   {folds}")
    for f, w in enumerate(cv["fitted"]):
        print(f"fold {f} fitted: {w}")
    print(f"all pages fitted: {cv['all_pages']} (shipped: {WEIGHTS})")
    return oof["f1"]


def _print_crypto(crypto: dict) -> None:
    print("\nreal crypto pages (never tuned on; truth = the body_xpath element): P / R / F1, phrases with, without")
    for name, per_page in crypto.items():
        cells = [f"{page.split('.')[0]} {r['precision']:.2f}/{r['recall']:.2f}/{r['f1']:.2f} "
                 f"{r['with']}/{r['of_with']} {r['without']}/{r['of_without']}" for page, r in per_page.items()]
        mean = statistics.mean(r["f1"] for r in per_page.values())
        print(f"{name:<22} mean F1 {mean:.3f} | " + " | ".join(cells))


def main(argv: list[str] | None = None) -> None:
    args, = parse_args(argv, BenchArgs, description=__doc__)
    pages = load(Path(args.data))
    runs = {"ours (generic)": ours_generic, "ours (full)": ours_full}
    if args.references:
        runs |= {"trafilatura": trafilatura_text, "readability-lxml": readability_text}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference libraries warn about odd pages
        results = {name: evaluate(fn, pages) for name, fn in runs.items()}
        crypto = score_crypto(crypto_pages(Path(args.crypto)), args.references) if str(args.crypto) else None
    print(f"{len(pages)} pages; pages/s is per second of this process's CPU time; shipped weights (in sample)")
    _print_table(results)
    oof = _print_cv(cross_validate(pages, args.folds, args.seed), results, args.folds) if args.folds else None
    if crypto:
        _print_crypto(crypto)
    f1 = results["ours (generic)"]["f1"]
    print(f"\nextract_f1_generic_in_sample: {f1:.3f} (goal >= 0.95)")
    if oof is not None:
        print(f"extract_f1_out_of_fold: {oof:.3f} (goal >= trafilatura on the same pages)")
    if "trafilatura" in results:
        theirs = results["trafilatura"]
        if oof is not None:
            print(f"extract_f1_oof_vs_trafilatura: {oof / theirs['f1']:.3f}x (goal >= 1.0x)")
        print(f"extract_speed_vs_trafilatura: {results['ours (generic)']['pages_per_s'] / theirs['pages_per_s']:.2f}x "
              f"(goal: faster, >= 1.0x)")


if __name__ == "__main__":
    main()
