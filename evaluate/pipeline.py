"""The sentiment pipeline (`make sentiment`): labelled training rows -> Alpaca records + a dev split -> LoRA training
with train_ddp.py -> every system (our LoRA, the majority class, TF-IDF + logistic regression, the base model zero-
and few-shot) scored on dev and each test set -> results.md + sentiment.png. Finished stages are kept: a rerun
resumes.

    python -m evaluate sentiment-pipeline --out out/sentiment [--limit 200] [--train-flags "..."]
    make sentiment
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cli import parse_args
from evaluate.calibrate import apply_offsets, fit_offsets, logprob_matrix, out_of_fold
from evaluate.headlines import headlines
from evaluate.loaders import LABELS, SHIPPED_SYSTEMS, load_labelled, load_sentiment
from evaluate.metrics import sentiment_metrics, summary
from evaluate.report import HUMAN, sentiment_report
from evaluate.sentiment import (INSTRUCTION, clean_text, load_generator, pick_shots, predict_local, save_eval,
                                score_predictions, to_alpaca)
from jsonl import write_json, write_jsonl
from precision import CHOICES
from train_ddp import TrainArgs, checkpoints, train

TFNS_DIR = "../shared/data/crypto-news/twitter_financial_news_sentiment"
# dev only (../shared/data/crypto-news/LICENSES.md): scored and used for choices, never trained on
CRYPTOLIN_DEV = "../shared/data/crypto-news/cryptolin/cryptolin_dev.jsonl"
# chosen by short measured trials on the dev split (BENCHMARKS.md, "Sentiment"); any train_ddp.py flag works here.
# 600 steps of 16 = 0.73 epoch of TFNS train + 4,000 headlines, 16 minutes on 2 AMX cores (BENCHMARKS.md has each
# CPU kind; --max-steps 0 trains one full epoch). 400 steps on 2,000 headlines scored CryptoLin dev 0.672, not 0.709
TRAIN_FLAGS = ("--precision auto --max-steps 600 --lr 1e-3 --warmup-steps 20 --micro-batch-size 16 --no-pack "
               "--lora-targets wq,wk,wv,wo,w1,w2,w3 --lora-r 16 --lora-alpha 32 --lora-dropout 0 "
               "--val-fraction 0 --save-every 25 --eval-every 0")


def split_dev(rows: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, dev): a seeded `fraction` of each label held out, so dev has the training set's label mix."""
    rng = random.Random(seed)
    dev_ids = set()
    for label in LABELS:
        ids = [i for i, r in enumerate(rows) if r["label"] == label]
        rng.shuffle(ids)
        dev_ids.update(ids[:round(fraction * len(ids))])
    return [r for i, r in enumerate(rows) if i not in dev_ids], [r for i, r in enumerate(rows) if i in dev_ids]


def convert(train_file: str | Path, out_dir: str | Path, dev_fraction: float = 0.05, seed: int = 0,
            limit: int = 0, crypto_headlines: int = 0) -> tuple[Path, Path]:
    """Labelled training rows -> out_dir/train.jsonl (Alpaca records for train_ddp.py) and out_dir/dev.jsonl
    ({text, label} rows held out from the same file, for choosing hyperparameters without the test set).
    crypto_headlines > 0 mixes that many template headlines (evaluate/headlines.py) into train, shuffled in, under
    their own instruction (the headline prompt, evaluate/sentiment.py)."""
    rows = load_sentiment(train_file)
    if limit:
        rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    train_rows, dev = split_dev(rows, dev_fraction, seed)
    records = [to_alpaca(r) for r in train_rows]
    records += [to_alpaca(r, "headline") for r in headlines(crypto_headlines, seed)]
    random.Random(seed).shuffle(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", records, ensure_ascii=True)
    write_jsonl(out_dir / "dev.jsonl", dev, ensure_ascii=True)
    return out_dir / "train.jsonl", out_dir / "dev.jsonl"


@dataclass
class PipelineArgs:
    out: str = field(default="out/sentiment", metadata={"help": "output folder (resumable: finished stages are kept)"})
    train_data: str = field(default=f"{TFNS_DIR}/sent_train.csv", metadata={"help": "labelled training set"})
    tests: tuple[str, ...] = field(
        default=(f"tfns={TFNS_DIR}/sent_valid.csv",
                 "fpb=../shared/data/crypto-news/financial_phrasebank/Sentences_AllAgree.txt",
                 f"crypto={CRYPTOLIN_DEV}"),
        metadata={"help": "test sets as name=path (never trained on); a CryptoLin file adds its VADER, FinBERT and "
                          "annotator rows"})
    checkpoint: str | None = field(default=None, metadata={"help": "base model; none = the embedded SmolLM2"})
    train_flags: str = field(default=TRAIN_FLAGS, metadata={"help": "flags for train_ddp.py (--data, --out and "
                                                                    "--checkpoint are set here)"})
    crypto_headlines: int = field(default=4000, metadata={
        "help": "template crypto-news headlines (evaluate/headlines.py, labelled by the event they report) mixed into "
                "the training rows: the crypto register the tweets lack; 0 = the training set alone"})
    dev_fraction: float = field(default=0.05, metadata={"help": "share of the training set held out as dev"})
    shots: int = field(default=3, metadata={"help": "examples in the few-shot baseline's prompt"})
    limit: int = field(default=0, metadata={"help": "use only N training rows and N rows of each test set (a "
                                                    "quick run); 0 = all"})
    headline_sets: tuple[str, ...] = field(default=("crypto",), metadata={
        "help": "test sets (names among --tests) that every local model scores with the crypto-headline prompt, the "
                "one the template headlines train; the others take the financial-news prompt"})
    calibrate_on: str = field(default="crypto", metadata={
        "help": "a dev set among --tests whose label prior our LoRA's scores are calibrated to (log-prior offsets "
                "chosen on it, scored out-of-fold; evaluate/calibrate.py); empty = none"})
    baseline_rows: int = field(default=400, metadata={
        "help": "the untuned base model scores a seeded sample of this many rows of each test set and skips dev "
                "(its figures sit below the majority class; +-0.03 shows the same); 0 = every row"})
    dtype: str = field(default="auto", metadata={
        "help": "evaluation weights dtype; auto: bf16 where the CPU/GPU runs it natively, else fp32 (precision.py)",
        "choices": CHOICES})
    seed: int = field(default=0, metadata={"help": "seed for the dev split and the shots"})

    def __post_init__(self):
        self.tests, self.headline_sets = tuple(self.tests), tuple(self.headline_sets)
        for t in self.tests:
            if "=" not in t:
                raise ValueError(f"tests entry {t!r} must be name=path, e.g. tfns=sent_valid.csv")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"dev_fraction={self.dev_fraction} must be in (0, 1)")
        if min(self.shots, self.limit, self.baseline_rows, self.crypto_headlines) < 0:
            raise ValueError(f"shots={self.shots}, limit={self.limit}, baseline_rows={self.baseline_rows} and "
                             f"crypto_headlines={self.crypto_headlines} must be >= 0")


def train_adapter(args: PipelineArgs, train_file: Path) -> Path:
    """LoRA-train on train_file into out/train, resuming from its newest checkpoint; copy the adapter to
    out/adapter."""
    out = Path(args.out)
    flags = shlex.split(args.train_flags) + ["--data", str(train_file), "--out", str(out / "train")]
    if args.checkpoint:
        flags += ["--checkpoint", args.checkpoint]
    resume = bool(checkpoints(out / "train"))
    (targs,) = parse_args(flags + (["--resume"] if resume else []), TrainArgs)
    t0 = time.perf_counter()
    result = train(targs)
    if result.name.startswith("step_"):
        raise RuntimeError(f"training stopped by SIGTERM at {result}; run the same command again to resume")
    tmp = out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result / "adapter", tmp)
    write_json(tmp / "train_time.json", {"seconds": round(time.perf_counter() - t0, 1), "resumed": resume,
                                         "flags": flags})
    os.replace(tmp, out / "adapter")
    return out / "adapter"


def tfidf_classifier(train_rows: list[dict]):
    """TF-IDF (word 1-2 grams) + logistic regression fitted on train_rows, the baseline a practitioner tries first;
    False without scikit-learn."""
    try:  # scikit-learn is a dev dependency: the pipeline runs without it, minus this row
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        return False
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                        LogisticRegression(C=10.0, max_iter=2000))
    return clf.fit([r["text"] for r in train_rows], [r["label"] for r in train_rows])


def _test_sets(args: PipelineArgs, dev_file: Path) -> dict[str, list[dict]]:
    """{set name: rows}: dev first, then each --tests entry (a --limit run samples each)."""
    sets = {"dev": load_sentiment(dev_file)}
    for entry in args.tests:
        name, path = entry.split("=", 1)
        rows = load_labelled(path)
        # a quick run samples (the files are sorted by label, so their first rows are one class)
        sets[name] = random.Random(args.seed).sample(rows, args.limit) if 0 < args.limit < len(rows) else rows
    return sets


class _Scorer:
    """Predictions of one system on one set; holds the one local model in memory and the TF-IDF model."""

    def __init__(self, args: PipelineArgs, train_rows: list[dict]):
        self.args, self.train_rows = args, train_rows
        self.majority = Counter(r["label"] for r in train_rows).most_common(1)[0][0]
        self.gen, self.gen_key, self.tfidf = None, None, None

    def predict(self, system: str, how, rows: list[dict], set_name: str) -> tuple[list[dict], list[dict]] | None:
        """(rows, predictions): the set's rows, or one row per (row, annotator) pair for "annotators"; None when the
        system cannot run on this set (TF-IDF without scikit-learn, a column or annotators the set lacks)."""
        if how == "annotators":
            if "annotators" not in rows[0]:
                return None
            pairs = [(r, a) for r in rows for a in r["annotators"]]
            return [{"text": r["text"], "label": r["label"]} for r, _ in pairs], [{"pred": a} for _, a in pairs]
        if how in SHIPPED_SYSTEMS:
            return None if how not in rows[0] else (rows, [{"pred": r[how]} for r in rows])
        if how == "own majority":
            label = Counter(r["label"] for r in rows).most_common(1)[0][0]
            return rows, [{"pred": label} for _ in rows]
        preds = self._predict_texts(system, how, [r["text"] for r in rows], set_name)
        return None if preds is None else (rows, preds)

    def _predict_texts(self, system: str, how, texts: list[str], set_name: str) -> list[dict] | None:
        if how == "majority":
            return [{"pred": self.majority} for _ in texts]
        if how == "tfidf":
            if self.tfidf is None:
                self.tfidf = tfidf_classifier(self.train_rows)
            if self.tfidf is False:
                return None
            return [{"pred": p} for p in self.tfidf.predict([clean_text(t) for t in texts])]
        adapter, shots = how
        if self.gen is None or self.gen_key != str(adapter):
            self.gen = None  # one model in memory at a time
            self.gen, self.gen_key = load_generator(self.args.checkpoint, adapter, self.args.dtype), str(adapter)
        prompt = "headline" if set_name in self.args.headline_sets else "news"
        return predict_local(self.gen, texts, shots, desc=f"{system} / {set_name}", prompt=prompt)


def _rows_for(args: PipelineArgs, how, set_name: str, rows: list[dict]) -> list[dict]:
    """The rows a system scores: all of them, except for the untuned base model (args.baseline_rows)."""
    if not (isinstance(how, tuple) and how[0] is None) or not args.baseline_rows:
        return rows
    if set_name == "dev":  # dev chooses our LoRA's settings; the base model has none to choose
        return []
    n = args.baseline_rows
    return random.Random(args.seed).sample(rows, n) if n < len(rows) else rows


def calibrate(out: Path, lora_folder: Path, set_name: str, folds: int = 5) -> dict:
    """Fit label-prior offsets to our LoRA's scores on one dev set (out/calibration_<set>.json) and return the
    metrics of its out-of-fold predictions (each fold under offsets fitted on the others)."""
    records = [json.loads(line) for line in (lora_folder / set_name / "predictions.jsonl").open()]
    logprobs, labels = logprob_matrix(records), [r["label"] for r in records]
    offsets, oof = fit_offsets(logprobs, labels), out_of_fold(logprobs, labels, folds)
    metrics = sentiment_metrics(labels, oof)
    in_sample = sentiment_metrics(labels, apply_offsets(logprobs, offsets))["f1_weighted"]
    write_json(out / f"calibration_{set_name}.json", {
        "offsets": offsets, "set": set_name, "rows": len(labels), "f1_weighted_in_sample": in_sample,
        "f1_weighted_out_of_fold": metrics["f1_weighted"], "folds": folds,
        "note": "log-prior offsets added to the LoRA's label log-probs (neutral = 0), chosen on this dev set"})
    metrics.update(offsets=offsets, f1_weighted_in_sample=in_sample, folds=folds)
    return metrics


def run_pipeline(args: PipelineArgs) -> dict:
    """convert -> baselines -> LoRA train -> score it -> results.md + sentiment.png; every system is scored on dev
    and each test set. Finished stages are kept, so a rerun resumes. Returns {system: {set: metrics summary}}."""
    out = Path(args.out)
    n_headlines = min(args.crypto_headlines, args.limit // 3) if args.limit else args.crypto_headlines
    train_file, dev_file = convert(args.train_data, out / "data", args.dev_fraction, args.seed, args.limit,
                                   n_headlines)
    records = [json.loads(line) for line in train_file.open()]
    train_rows = [{"text": r["input"], "label": r["output"]} for r in records]
    sets = _test_sets(args, dev_file)
    # the base model's shots: rows of the training file itself (not the template headlines)
    shots = pick_shots([row for row, r in zip(train_rows, records) if r["instruction"] == INSTRUCTION], args.shots,
                       args.seed)
    adapter = out / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        train_adapter(args, train_file)
    sampled = f" ({args.baseline_rows} sampled rows a set)" if args.baseline_rows else ""
    # the adapter's scores first (the figure this pipeline exists for), the baselines after; listed in table order
    systems = [("our LoRA zero-shot", (adapter, ())), ("majority class", "majority"),
               ("majority class of the set itself", "own majority"), ("TF-IDF + logistic regression", "tfidf"),
               ("VADER (predictions shipped with CryptoLin)", "vader"),
               ("FinBERT (predictions shipped with CryptoLin)", "finbert"),
               (f"base zero-shot{sampled}", (None, ())), (f"base {args.shots}-shot{sampled}", (None, shots)),
               (f"{HUMAN} (human agreement)", "annotators")]
    results: dict[str, dict] = {}
    scorer = _Scorer(args, train_rows)
    for system, how in systems:
        for set_name, all_rows in sets.items():
            rows = _rows_for(args, how, set_name, all_rows)
            if not rows:
                continue
            folder = out / "eval" / re.sub(r"[^a-z0-9]+", "_", system.lower()).strip("_") / set_name
            if (folder / "metrics.json").is_file():
                results.setdefault(system, {})[set_name] = json.loads((folder / "metrics.json").read_text())
                continue
            t0 = time.perf_counter()
            scored = scorer.predict(system, how, rows, set_name)
            if scored is None:
                continue
            metrics, records = score_predictions(*scored)
            metrics.update(seconds=round(time.perf_counter() - t0, 1), system=system, set=set_name)
            save_eval(folder, metrics, records)
            results.setdefault(system, {})[set_name] = metrics
    # table order: the baselines, our LoRA (then calibrated to a dev set's prior), the human agreement
    order = [name for name, _ in systems[1:-1]] + [systems[0][0]]
    lora = out / "eval" / "our_lora_zero_shot"
    if args.calibrate_on in sets and (lora / args.calibrate_on / "metrics.json").is_file():
        prior = f"our LoRA + {args.calibrate_on} label prior (fitted on {args.calibrate_on}, out-of-fold)"
        results[prior] = {args.calibrate_on: calibrate(out, lora, args.calibrate_on)}
        order.append(prior)
    order.append(systems[-1][0])
    results = {name: results[name] for name in order if name in results}
    sentiment_report(out, results, list(sets))
    return {system: {s: summary(m) for s, m in by_set.items()} for system, by_set in results.items()}
