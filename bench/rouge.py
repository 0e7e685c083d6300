"""Speed of the Self-Instruct ROUGE-L filter: ours (numpy) vs rouge-score vs rouge-score-rs (Rust).

    python -m bench.rouge                         # all 3,121 texts (rouge-score alone takes 5-10 min on 2 cores)
    python -m bench.rouge --reference-prefix 800  # rouge-score on the first 800 texts only (quick)

The workload is the pipeline's: each text of ../shared/data/selfinstruct/rouge_pool.json in turn is kept if its
ROUGE-L F-measure against every text kept so far is <= 0.7. All three must keep the same list.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli import parse_args
from selfinstruct.rouge import RougeFilter

POOL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "selfinstruct" / "rouge_pool.json"


@dataclass
class BenchArgs:
    pool: Path = field(default=POOL, metadata={"help": "JSON list of texts"})
    threshold: float = field(default=0.7, metadata={"help": "keep a text if its max ROUGE-L is <= this"})
    reference_prefix: int = field(default=0, metadata={
        "help": "time rouge-score on only the first N texts (0 = all; the full run takes minutes)"})
    repeats: int = field(default=3, metadata={"help": "best of N runs for ours and rouge-score-rs"})

    def __post_init__(self):
        if not self.pool.is_file():
            raise FileNotFoundError(f"pool={self.pool} not found; pass --pool PATH to a JSON list of texts")
        if self.reference_prefix < 0:
            raise ValueError(f"reference_prefix={self.reference_prefix} must be >= 0 (0 = all texts)")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")


def ours(texts: list[str], threshold: float) -> list[str]:
    filt = RougeFilter(threshold)
    return [t for t in texts if filt.add_if_novel(t)]


def reference(texts: list[str], threshold: float, max_score) -> list[str]:
    """The filter as the Self-Instruct code writes it: score against every kept text, keep if the max <= threshold."""
    kept: list[str] = []
    for t in texts:
        if not kept or max_score(t, kept) <= threshold:
            kept.append(t)
    return kept


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> None:
    from rouge_score import rouge_scorer
    import rouge_score_rs

    args, = parse_args(argv, BenchArgs, description=__doc__)
    texts = json.loads(args.pool.read_text())
    thr = args.threshold
    py = rouge_scorer.RougeScorer(["rougeL"])
    rs = rouge_score_rs.RougeScorer(["rougeL"])

    t_ours, kept = timed(lambda: ours(texts, thr), args.repeats)
    print(f"{len(texts)} texts, threshold {thr}: {len(kept)} kept")
    print(f"ours (numpy):                     {t_ours:8.3f} s")
    # rouge-score-rs two ways: score_multi (one call per candidate) and score_batch (pairs, all cores); take the best
    t_multi, kept_multi = timed(lambda: reference(
        texts, thr, lambda t, k: rs.score_multi(k, t)["rougeL"].fmeasure), args.repeats)
    t_batch, kept_batch = timed(lambda: reference(
        texts, thr, lambda t, k: max(s["rougeL"].fmeasure for s in rs.score_batch(k, [t] * len(k)))), args.repeats)
    assert kept_multi == kept and kept_batch == kept, "rouge-score-rs kept a different list"
    print(f"rouge-score-rs score_multi:       {t_multi:8.3f} s")
    print(f"rouge-score-rs score_batch:       {t_batch:8.3f} s")
    t_rs = min(t_multi, t_batch)

    n_ref = args.reference_prefix or len(texts)
    prefix = texts[:n_ref]
    t_ours_prefix = t_ours if n_ref == len(texts) else timed(lambda: ours(prefix, thr), args.repeats)[0]
    t_py, kept_py = timed(lambda: reference(
        prefix, thr, lambda t, k: max(py.score(t, x)["rougeL"].fmeasure for x in k)), 1)
    assert kept_py == kept[:len(kept_py)] and kept_py == ours(prefix, thr), "rouge-score kept a different list"
    label = "all" if n_ref == len(texts) else f"first {n_ref}"
    print(f"rouge-score ({label} texts):  {t_py:8.3f} s   (ours on the same texts: {t_ours_prefix:.3f} s)")
    print(f"rouge_filter_vs_rouge_score: {t_py / t_ours_prefix:.1f}x (goal >= 100x)")
    print(f"rouge_filter_vs_rouge_score_rs: {t_rs / t_ours:.1f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
