"""Evaluate models on labelled financial sentiment (TFNS tweets, Financial PhraseBank, your JSONL).

    python evaluate.py sentiment --data ../shared/data/crypto-news/twitter_financial_news_sentiment/sent_valid.csv \
        --out out/eval/tfns [--adapter out/sentiment/adapter] [--shots 3 --shots-data sent_train.csv] [--limit 400]
    python evaluate.py sentiment --data my.jsonl --api-model gpt-4o-mini --out out/eval/gpt   # through llm.py
    python evaluate.py sentiment-pipeline --out out/sentiment          # convert -> LoRA train -> score -> report
    python evaluate.py news --adapter out/demo/adapter --out out/eval/news   # base / fine-tuned, +- retrieval
    make sentiment

A local model ranks the three label words by log-likelihood after one prompt (`sentiment_prompt`, the same one the
converter's training records render to), so there is no free text to parse; an API model answers in words that
are parsed. Outputs: predictions.jsonl, metrics.json (per-class precision/recall/F1, confusion matrix) and one JSON
line {n, accuracy, f1_weighted, f1_macro} on stdout.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jsonl import parse_jsonl, read_jsonl

LABELS = ("negative", "neutral", "positive")
# TFNS (zeroshot/twitter-financial-news-sentiment): 0 bearish, 1 bullish, 2 neutral
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}
LABEL_ALIASES = {"bearish": "negative", "bullish": "positive"}


# ---------------------------------------------------------------------------------------------- data

def _label(raw: str, where: str) -> str:
    word = raw.strip().lower()
    word = LABEL_ALIASES.get(word, word)
    if word not in LABELS:
        raise ValueError(f"{where}: unknown label {raw!r}; expected one of {', '.join(LABELS)} "
                         f"(or bearish/bullish; 0/1/2 in a TFNS CSV)")
    return word


def _row(text, label: str, where: str) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: missing or empty text; every row needs a non-empty text")
    return {"text": text.strip(), "label": label}


def _lines(text: str) -> list[str]:
    # not str.splitlines: tweets hold U+0085 and U+2028, which it treats as line breaks
    return [line.rstrip("\r") for line in text.split("\n")]


def _read_text(path: Path) -> str:
    # the Financial PhraseBank release is latin-1; copies re-saved as UTF-8 exist too
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _load_csv(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    if "text" not in fields or "label" not in fields:
        raise ValueError(f"{path}:1: CSV header {fields} needs columns `text` and `label`")
    rows = []
    for rec in reader:
        where = f"{path}:{reader.line_num}"
        raw = (rec["label"] or "").strip()
        rows.append(_row(rec["text"], TFNS_LABELS.get(raw) or _label(raw, where), where))
    return rows


def _load_jsonl(path: Path, text: str) -> list[dict]:
    rows = []
    for i, rec in parse_jsonl(text, path):
        where = f"{path}:{i}"
        if not isinstance(rec.get("label"), str):
            raise ValueError(f"{where}: expected an object with string fields `text` and `label`")
        rows.append(_row(rec.get("text"), _label(rec["label"], where), where))
    return rows


def _load_phrasebank(path: Path, text: str) -> list[dict]:
    rows = []
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        sentence, at, label = line.rpartition("@")  # the last @: sentences may contain @ themselves
        if not at:
            raise ValueError(f"{where}: expected `sentence@label` (Financial PhraseBank format)")
        rows.append(_row(sentence, _label(label, where), where))
    return rows


def load_sentiment(path: str | Path) -> list[dict]:
    """Rows {text, label word} from a TFNS CSV, a Financial PhraseBank txt or a JSONL file (detected by content)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    text = _read_text(path)
    first = next((line.strip() for line in _lines(text) if line.strip()), "")
    if not first:
        raise ValueError(f"{path}:1: empty file; expected a CSV (text,label), JSONL or `sentence@label` lines")
    if first.startswith("{"):
        rows = _load_jsonl(path, text)
    elif "@" in first and first.rpartition("@")[2].strip().lower() in LABELS:
        rows = _load_phrasebank(path, text)
    else:
        rows = _load_csv(path, text)
    if not rows:
        raise ValueError(f"{path}:2: no data rows after the header")
    return rows


# ---------------------------------------------------------------------------------------------- metrics

def sentiment_metrics(y_true, y_pred, labels=LABELS) -> dict:
    """Accuracy, weighted and macro F1, per-class precision/recall/F1 and the confusion matrix (rows = truth).

    Matches scikit-learn's f1_score(labels=all classes, zero_division=0): a class never predicted has precision 0."""
    index = {label: i for i, label in enumerate(labels)}
    t = np.array([index[y] for y in y_true], dtype=np.int64)
    p = np.array([index[y] for y in y_pred], dtype=np.int64)
    k = len(labels)
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)  # (truth, predicted)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    n = int(support.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "f1_weighted": float((f1 * support).sum() / n) if n else 0.0,
        "f1_macro": float(f1.mean()),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(support[i])} for i, label in enumerate(labels)},
        "labels": list(labels),
        "confusion": confusion.tolist(),
    }


# ---------------------------------------------------------------------------------------------- prompt

# short on purpose: every training example pays for these tokens (with SmolLM2's default system prompt, the fixed
# part of the prompt was two thirds of all training tokens with a 22-token instruction)
INSTRUCTION = "Sentiment of this financial news: negative, neutral or positive?"
_URL = re.compile(r"\s*https?://\S+")


def sentiment_instruction(shots=()) -> str:
    """The instruction, followed by worked examples ({text, label}) when shots are given."""
    if not shots:
        return INSTRUCTION
    examples = "\n\n".join(f"Text: {clean_text(s['text'])}\nAnswer: {s['label']}" for s in shots)
    return f"{INSTRUCTION}\n\nExamples:\n\n{examples}"


def clean_text(text: str) -> str:
    """The text as the model sees it: links removed (a t.co link is 13 tokens of noise, a quarter of a tweet)."""
    return _URL.sub("", text).strip() or text


def sentiment_prompt(text: str, tokenizer, shots=()) -> str:
    """The prompt before the label word: data.py's rendering of the record the converter writes for `text`, so
    training and evaluation see the same tokens (shots go into the instruction: one shared prefix)."""
    from data import format_prompt

    return format_prompt(tokenizer, sentiment_instruction(shots), clean_text(text))


def to_alpaca(row: dict) -> dict:
    """A labelled row as the Alpaca record train_ddp.py learns from (the answer is the bare label word)."""
    return {"instruction": sentiment_instruction(), "input": clean_text(row["text"]), "output": row["label"]}


def pick_shots(rows: list[dict], k: int, seed: int = 0, max_chars: int = 160) -> list[dict]:
    """k short examples cycling through the labels in a seeded order (balanced, so no label dominates the prefix)."""
    rng = random.Random(seed)
    order = list(LABELS)
    rng.shuffle(order)
    pools = {lab: [r for r in rows if r["label"] == lab and len(r["text"]) <= max_chars] for lab in LABELS}
    for lab, pool in pools.items():
        if not pool:
            raise ValueError(f"no {lab!r} example of <= {max_chars} characters to use as a shot")
        rng.shuffle(pool)
    return [pools[order[i % 3]][i // 3] for i in range(k)]


def parse_label(answer: str) -> str | None:
    """The first label word (or bearish/bullish) in a free-text answer; None when there is none."""
    m = re.search(r"\b(negative|neutral|positive|bearish|bullish)\b", answer.lower())
    return None if m is None else LABEL_ALIASES.get(m.group(1), m.group(1))


# ---------------------------------------------------------------------------------------------- prediction

def predict_local(gen, texts: list[str], shots=(), chunk: int = 256, desc: str = "score") -> list[dict]:
    """{pred, logprobs} per text: score_options over the label words (the shared prompt prefix runs once a chunk)."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(texts), desc=desc, unit="row", dynamic_ncols=True) as bar:
        for i in range(0, len(texts), chunk):
            prompts = [sentiment_prompt(t, gen.tokenizer, shots) for t in texts[i:i + chunk]]
            scores = gen.score_options(prompts, list(LABELS))  # (n, 3) summed log-probs
            for row in scores.tolist():
                out.append({"pred": LABELS[int(np.argmax(row))], "logprobs": dict(zip(LABELS, row))})
            bar.update(len(prompts))
    return out


def predict_api(llm, texts: list[str], shots=()) -> list[dict]:
    """{pred, answer} per text from a chat model's free-text answer; unparseable answers count as wrong (pred None)."""
    def ask(text: str) -> dict:
        msg = f"{sentiment_instruction(shots)}\n\n{clean_text(text)}"
        answer = llm.chat([{"role": "user", "content": msg}], max_tokens=8, temperature=0.0).text
        return {"pred": parse_label(answer), "answer": answer}

    return llm.map(ask, texts, desc="ask")


def score_predictions(rows: list[dict], preds: list[dict]) -> tuple[dict, list[dict]]:
    """(metrics, prediction records); an unparsed answer scores as wrong and is counted."""
    unparsed = sum(p["pred"] is None for p in preds)
    # an unparsed answer must count as wrong: score it as a fixed label other than the truth
    fallback = {"negative": "positive", "neutral": "negative", "positive": "negative"}
    y_pred = [p["pred"] or fallback[r["label"]] for r, p in zip(rows, preds)]
    metrics = sentiment_metrics([r["label"] for r in rows], y_pred)
    metrics["unparsed"] = unparsed
    records = [{"i": i, "text": r["text"], "label": r["label"], **p} for i, (r, p) in enumerate(zip(rows, preds))]
    return metrics, records


def write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")  # ASCII escapes: no reader can split a line on U+2028
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_eval(out: Path, metrics: dict, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", records)
    write_json(out / "metrics.json", metrics)  # last: its presence marks the evaluation as complete


def summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("n", "accuracy", "f1_weighted", "f1_macro")}


@dataclass
class SentimentArgs:
    data: str = field(default="", metadata={"help": "labelled set: TFNS CSV, PhraseBank txt or JSONL {text,label}",
                                            "required": True})
    out: str = field(default="out/eval/sentiment", metadata={"help": "folder for predictions.jsonl, metrics.json"})
    checkpoint: str | None = field(default=None, metadata={"help": "local model path; none = the embedded SmolLM2"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder to apply"})
    shots: int = field(default=0, metadata={"help": "worked examples in the prompt (drawn from --shots-data)"})
    shots_data: str | None = field(default=None, metadata={"help": "labelled file to draw shots from (not the test "
                                                                   "set), e.g. TFNS sent_train.csv"})
    limit: int = field(default=0, metadata={"help": "score only the first N rows; 0 = all"})
    dtype: str = field(default="bfloat16", metadata={"help": "local weights dtype (float32 on CPUs without bf16)",
                                                     "choices": ["bfloat16", "float32"]})
    api_model: str | None = field(default=None, metadata={"help": "ask this OpenAI-compatible chat model through "
                                                                  "llm.py instead (OPENAI_API_KEY, OPENAI_BASE_URL)"})
    base_url: str | None = field(default=None, metadata={"help": "API base URL for --api-model"})
    seed: int = field(default=0, metadata={"help": "seed for choosing the shots"})

    def __post_init__(self):
        if self.shots < 0 or self.limit < 0:
            raise ValueError(f"shots={self.shots} and limit={self.limit} must be >= 0")
        if self.shots and not self.shots_data:
            raise ValueError(f"shots={self.shots} needs --shots-data (a labelled training file; shots never come "
                             "from the test set)")
        if self.api_model and (self.checkpoint or self.adapter):
            raise ValueError("--api-model asks an API; it cannot take --checkpoint or --adapter")


def load_generator(checkpoint=None, adapter=None, dtype: str = "bfloat16"):
    import torch

    from generate import Generator

    return Generator.from_checkpoint(checkpoint, adapter=adapter, dtype=getattr(torch, dtype))


def run_sentiment(args: SentimentArgs, gen=None) -> dict:
    """Score args.data, write predictions.jsonl + metrics.json into args.out; return the metrics."""
    rows = load_sentiment(args.data)
    if args.limit:
        rows = rows[:args.limit]
    shots = pick_shots(load_sentiment(args.shots_data), args.shots, args.seed) if args.shots else ()
    t0 = time.perf_counter()
    if args.api_model:
        from llm import LLM, LLMArgs

        with LLM(LLMArgs(model=args.api_model, base_url=args.base_url)) as llm:
            preds = predict_api(llm, [r["text"] for r in rows], shots)
    else:
        gen = gen or load_generator(args.checkpoint, args.adapter, args.dtype)
        preds = predict_local(gen, [r["text"] for r in rows], shots)
    metrics, records = score_predictions(rows, preds)
    seconds = time.perf_counter() - t0
    metrics.update(data=str(args.data), shots=args.shots, seconds=round(seconds, 1),
                   rows_per_s=round(len(rows) / seconds, 2), model=args.api_model or args.checkpoint or "embedded",
                   adapter=args.adapter)
    save_eval(Path(args.out), metrics, records)
    return metrics


# ---------------------------------------------------------------------------------------------- converter

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
            limit: int = 0) -> tuple[Path, Path]:
    """Labelled training rows -> out_dir/train.jsonl (Alpaca records for train_ddp.py) and out_dir/dev.jsonl
    ({text, label} rows held out from the same file, for choosing hyperparameters without the test set)."""
    rows = load_sentiment(train_file)
    if limit:
        rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    train, dev = split_dev(rows, dev_fraction, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", map(to_alpaca, train))
    write_jsonl(out_dir / "dev.jsonl", dev)
    return out_dir / "train.jsonl", out_dir / "dev.jsonl"


# ---------------------------------------------------------------------------------------------- pipeline

TFNS_DIR = "../shared/data/crypto-news/twitter_financial_news_sentiment"
# FinGPT v3 README (AI4Finance-Foundation/FinGPT, fingpt/FinGPT_v3/README.md), weighted F1 as published, not
# re-measured. Their FPB figures use BloombergGPT's split and train on FPB; we never train on FPB.
PUBLISHED = (("FinGPT v3.3 (Llama2-13B + LoRA)", 0.903, 0.882), ("GPT-4", 0.808, 0.833),
             ("ChatGPT", 0.736, 0.781), ("FinBERT", 0.733, 0.880), ("Llama2-7B-chat zero-shot", 0.296, 0.390))
# chosen by short measured trials on the dev split (BENCHMARKS.md, "Sentiment"); any train_ddp.py flag works here.
# 400 steps of 16 = 0.7 epoch: what fits an hour of two shared CPU cores (--max-steps 0 trains one full epoch)
TRAIN_FLAGS = ("--precision bf16 --max-steps 400 --lr 1e-3 --warmup-steps 20 --micro-batch-size 16 --no-pack "
               "--lora-targets wq,wk,wv,wo,w1,w2,w3 --lora-r 16 --lora-alpha 32 --lora-dropout 0 "
               "--val-fraction 0 --save-every 25 --eval-every 0")


@dataclass
class PipelineArgs:
    out: str = field(default="out/sentiment", metadata={"help": "output folder (resumable: finished stages are kept)"})
    train_data: str = field(default=f"{TFNS_DIR}/sent_train.csv", metadata={"help": "labelled training set"})
    tests: tuple[str, ...] = field(
        default=(f"tfns={TFNS_DIR}/sent_valid.csv",
                 "fpb=../shared/data/crypto-news/financial_phrasebank/Sentences_AllAgree.txt"),
        metadata={"help": "test sets as name=path (never trained on)"})
    checkpoint: str | None = field(default=None, metadata={"help": "base model; none = the embedded SmolLM2"})
    train_flags: str = field(default=TRAIN_FLAGS, metadata={"help": "flags for train_ddp.py (--data, --out and "
                                                                    "--checkpoint are set here)"})
    dev_fraction: float = field(default=0.05, metadata={"help": "share of the training set held out as dev"})
    shots: int = field(default=3, metadata={"help": "examples in the few-shot baseline's prompt"})
    limit: int = field(default=0, metadata={"help": "use only N training rows and N rows of each test set (a "
                                                    "quick run); 0 = all"})
    dtype: str = field(default="bfloat16", metadata={"help": "evaluation weights dtype",
                                                     "choices": ["bfloat16", "float32"]})
    seed: int = field(default=0, metadata={"help": "seed for the dev split and the shots"})

    def __post_init__(self):
        self.tests = tuple(self.tests)
        for t in self.tests:
            if "=" not in t:
                raise ValueError(f"tests entry {t!r} must be name=path, e.g. tfns=sent_valid.csv")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"dev_fraction={self.dev_fraction} must be in (0, 1)")
        if self.shots < 0 or self.limit < 0:
            raise ValueError(f"shots={self.shots} and limit={self.limit} must be >= 0")


def train_adapter(args: PipelineArgs, train_file: Path) -> Path:
    """LoRA-train on train_file into out/train (resuming from its newest checkpoint); copy the adapter to out/adapter."""
    import shlex
    import shutil

    from cli import parse_args
    from train_ddp import TrainArgs, checkpoints, train

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


def tfidf_classifier(train: list[dict]):
    """TF-IDF (word 1-2 grams) + logistic regression fitted on train, the baseline a practitioner tries first;
    False without scikit-learn."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        return False
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                        LogisticRegression(C=10.0, max_iter=2000))
    return clf.fit([r["text"] for r in train], [r["label"] for r in train])


def run_pipeline(args: PipelineArgs) -> dict:
    """convert -> baselines -> LoRA train -> score it -> results.md + sentiment.png; every system is scored on dev
    and each test set. Finished stages are kept, so a rerun resumes. Returns {system: {set: metrics summary}}."""
    from collections import Counter

    out = Path(args.out)
    train_file, dev_file = convert(args.train_data, out / "data", args.dev_fraction, args.seed, args.limit)
    train_rows = [{"text": r["input"], "label": r["output"]} for r in map(json.loads, train_file.open())]
    sets = {"dev": load_sentiment(dev_file)}
    for entry in args.tests:
        name, path = entry.split("=", 1)
        rows = load_sentiment(path)
        # a quick run samples (the files are sorted by label, so their first rows are one class)
        sets[name] = random.Random(args.seed).sample(rows, args.limit) if 0 < args.limit < len(rows) else rows
    shots = pick_shots(train_rows, args.shots, args.seed)
    majority = Counter(r["label"] for r in train_rows).most_common(1)[0][0]

    adapter = out / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        train_adapter(args, train_file)
    # the adapter's scores first (the figure this pipeline exists for), the baselines after; listed in table order
    systems = [("our LoRA zero-shot", (adapter, ())), ("majority class", "majority"),
               ("TF-IDF + logistic regression", "tfidf"), ("base zero-shot", (None, ())),
               (f"base {args.shots}-shot", (None, shots))]
    results: dict[str, dict] = {}
    gen, gen_key, tfidf = None, None, None
    for system, how in systems:
        for set_name, rows in sets.items():
            folder = out / "eval" / re.sub(r"[^a-z0-9]+", "_", system.lower()).strip("_") / set_name
            if (folder / "metrics.json").is_file():
                results.setdefault(system, {})[set_name] = json.loads((folder / "metrics.json").read_text())
                continue
            texts = [r["text"] for r in rows]
            t0 = time.perf_counter()
            if how == "majority":
                preds = [{"pred": majority} for _ in texts]
            elif how == "tfidf":
                if tfidf is None:
                    tfidf = tfidf_classifier(train_rows)
                if tfidf is False:
                    continue  # scikit-learn is a dev dependency: no row without it
                preds = [{"pred": p} for p in tfidf.predict([clean_text(t) for t in texts])]
            else:
                if gen is None or gen_key != str(how[0]):
                    gen = None  # one model in memory at a time
                    gen, gen_key = load_generator(args.checkpoint, how[0], args.dtype), str(how[0])
                preds = predict_local(gen, texts, how[1], desc=f"{system} / {set_name}")
            metrics, records = score_predictions(rows, preds)
            metrics.update(seconds=round(time.perf_counter() - t0, 1), system=system, set=set_name)
            save_eval(folder, metrics, records)
            results.setdefault(system, {})[set_name] = metrics
    order = [name for name, _ in systems[1:]] + [systems[0][0]]
    results = {name: results[name] for name in order if name in results}
    report(out, results, list(sets))
    return {system: {s: summary(m) for s, m in by_set.items()} for system, by_set in results.items()}


def report(out: Path, results: dict, set_names: list[str]) -> None:
    """results.md (our systems, then the published figures) and sentiment.png (weighted F1 per system and set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = "| system | " + " | ".join(f"{s} acc | {s} F1-w | {s} F1-m" for s in set_names) + " |"
    lines = ["# Financial sentiment: TFNS / FPB", "",
             "Measured here (`make sentiment`); F1-w = weighted F1, F1-m = macro F1. `dev` is held out from TFNS "
             "train; `tfns` is TFNS valid (the published test set); `fpb` is Financial PhraseBank AllAgree, "
             "never trained on (transfer from tweets to news sentences).", "", head,
             "|---" * (1 + 3 * len(set_names)) + "|"]
    for system, by_set in results.items():
        cells = [f"{by_set[s]['accuracy']:.3f} | {by_set[s]['f1_weighted']:.3f} | {by_set[s]['f1_macro']:.3f}"
                 if s in by_set else "- | - | -" for s in set_names]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "Published (weighted F1, FinGPT v3 README, as published, not re-measured; their FPB split differs "
              "and they train on FPB):", "", "| model | TFNS F1-w | FPB F1-w |", "|---|---|---|"]
    lines += [f"| {name} | {tfns:.3f} | {fpb:.3f} |" for name, tfns, fpb in PUBLISHED]
    tmp = out / "results.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "results.md")

    shown = [s for s in ("tfns", "fpb") if s in set_names] or set_names[:2]
    names = list(results) + [p[0] for p in PUBLISHED]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(shown)
    for j, s in enumerate(shown):
        ours = [results[n][s]["f1_weighted"] if s in results[n] else 0.0 for n in results]
        published = [p[1 + j] if s in ("tfns", "fpb") else 0.0 for p in PUBLISHED]
        xs = np.arange(len(names)) + (j - (len(shown) - 1) / 2) * width
        bars = ax.bar(xs, ours + published, width, label=s, color=f"C{j}")
        for b in bars[len(ours):]:
            b.set_hatch("//")
            b.set_alpha(0.6)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="weighted F1", ylim=(0, 1), title="Financial sentiment (hatched: published figures, not re-measured)")
    ax.legend()
    fig.savefig(out / "sentiment.png.tmp.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(out / "sentiment.png.tmp.png", out / "sentiment.png")


# ---------------------------------------------------------------------------------------------- news
# --- news: base vs fine-tuned vs retrieval (`python evaluate.py news`, the news-eval section) ---
# Held-out news with gold labels (data/README.md): the market sentiment, main event type and coins of each article,
# and two questions whose answers are verbatim in it. Every system gets the same articles and questions. Sentiment
# and extraction give the model the article itself, so retrieval changes only QA: closed-book against retrieval/qa.py
# over an index of --articles, the seed's "compare results from QA to fine-tuned generation".

NEWS_SYSTEMS = ("base", "fine-tuned", "base+retrieval", "fine-tuned+retrieval", "api", "api+retrieval")
CLOSED_BOOK_INSTRUCTION = "Answer the question. If you do not know the answer, say that you do not know."
# (metric key, table header); every metric is in [0, 1]
NEWS_METRICS = (("sentiment_accuracy", "sentiment acc"), ("sentiment_f1_macro", "sentiment F1-m"),
                ("json_valid", "JSON valid"), ("coins_f1", "coins F1"), ("event_accuracy", "event acc"),
                ("event_f1_macro", "event F1-m"), ("qa_f1", "QA F1"), ("qa_rouge_l", "QA ROUGE-L"),
                ("qa_contains", "QA contains"), ("retrieval_hit", "retrieval hit"))
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    import string

    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of normalised answers; when either is empty, 1.0 only if both are (as SQuAD v2)."""
    from collections import Counter

    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(answer: str, reference: str) -> dict:
    """Token F1, ROUGE-L F (rouge-score's, no stemming) and containment of the reference, after dropping [n]
    citations: retrieval answers cite their excerpts, which no reference does."""
    from selfinstruct.rouge import rouge_l

    answer = _CITATION.sub("", answer).strip()
    ref = normalize_answer(reference)
    return {"f1": token_f1(answer, reference), "rouge_l": rouge_l(reference, answer),
            "contains": bool(ref) and f" {ref} " in f" {normalize_answer(answer)} "}


def extraction_instruction() -> str:
    from annotate.schema import EVENT_TYPES

    return ('Read the crypto news article and reply with JSON only, in this format: '
            '{"event_type": "hack", "coins": [{"name": "Bitcoin", "ticker": "BTC"}]}. '
            f'"event_type" is the main event, one of: {", ".join(EVENT_TYPES)}. '
            '"coins" lists every cryptocurrency the article names, with its ticker.')


def extraction_schema() -> dict:
    """A valid extraction: an event type and annotate/schema.py's coin objects, or bare coin names (what models tuned
    on selfinstruct/grounding.py's records write). An unknown event type is a wrong field, not invalid JSON."""
    from annotate.schema import EXTRACT_SCHEMA

    coin = EXTRACT_SCHEMA["properties"]["coins"]["items"]
    return {"type": "object", "required": ["event_type", "coins"],
            "properties": {"event_type": {"type": "string"},
                           "coins": {"type": "array",
                                     "items": {**coin, "type": ["object", "string"], "required": ["name"]}}}}


def extraction_decoding_schema() -> dict:
    """What constrained extraction decodes under: extraction_schema() with the event type one of annotate's and coins
    as {name, ticker} objects, no other keys (llm.decoding_schema); whatever it decodes validates against it."""
    from annotate.schema import EVENT_TYPES, EXTRACT_SCHEMA
    from llm import decoding_schema

    coins = {"type": "array", "items": EXTRACT_SCHEMA["properties"]["coins"]["items"]}
    return decoding_schema({**extraction_schema(), "properties": {"event_type": {"enum": EVENT_TYPES},
                                                                  "coins": coins}})


def parse_extraction(answer: str) -> tuple[dict | None, str | None]:
    """(object, None) for the last JSON object in the answer that fits extraction_schema(), else (None, reason)."""
    from llm import LLMOutputError, parse_json_answer

    try:
        return parse_json_answer(answer, extraction_schema())[0], None
    except LLMOutputError as e:
        return None, e.reason


def coin_counts(predicted: list, gold: list[dict]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of predicted coins against gold {name, ticker} coins. A
    predicted coin (an object or a bare string) matches a gold coin by ticker or name, ignoring case and a leading $;
    repeats count once (an unmatched coin is known by its ticker, else its name)."""
    def ids(coin) -> list[str]:
        values = [coin] if isinstance(coin, str) else [coin.get("ticker"), coin.get("name")]
        return [v.strip().lstrip("$").casefold() for v in values if isinstance(v, str) and v.strip()]

    gold_ids = [set(ids(g)) for g in gold]
    found, unmatched = set(), set()
    for coin in predicted:
        mine = ids(coin)
        hits = {i for i, g in enumerate(gold_ids) if g.intersection(mine)}
        found |= hits
        if not hits and mine:
            unmatched.add(mine[0])
    return len(found), len(unmatched), len(gold) - len(found)


def present_macro_f1(metrics: dict, labels) -> float:
    """Mean F1 of the labels present in gold or predictions (scikit-learn's default label set), from
    sentiment_metrics' per-class scores: a class absent from a small --limit run does not count as a zero."""
    present = [lab for lab in labels if metrics["per_class"][lab]["support"] or
               sum(row[metrics["labels"].index(lab)] for row in metrics["confusion"])]
    return float(np.mean([metrics["per_class"][lab]["f1"] for lab in present])) if present else 0.0


def event_metrics(gold: list[str], predicted: list[str | None]) -> dict:
    """Accuracy and macro F1 (present_macro_f1) of event types; an answer outside annotate/schema.py's EVENT_TYPES
    (or none) is wrong."""
    from annotate.schema import EVENT_TYPES

    invalid = "(invalid)"
    m = sentiment_metrics(gold, [p if p in EVENT_TYPES else invalid for p in predicted], labels=(*EVENT_TYPES, invalid))
    return {"event_accuracy": m["accuracy"], "event_f1_macro": present_macro_f1(m, EVENT_TYPES)}


def _labels_error(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}; see data/README.md for the labels format")


def _check_labels(rec: dict, where: str) -> None:
    from annotate.schema import EVENT_TYPES

    if not isinstance(rec.get("url"), str):
        raise _labels_error(where, "expected a string `url`")
    if rec.get("sentiment") not in LABELS:
        raise _labels_error(where, f"sentiment={rec.get('sentiment')!r} must be one of {LABELS}")
    if rec.get("event_type") not in EVENT_TYPES:
        raise _labels_error(where, f"event_type={rec.get('event_type')!r} must be one of {EVENT_TYPES}")
    coins = rec.get("coins")
    if not isinstance(coins, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in coins):
        raise _labels_error(where, "`coins` must be a list of {name, ticker} objects")
    qa = rec.get("qa")
    if not isinstance(qa, list) or not all(isinstance(p, dict) and isinstance(p.get("question"), str)
                                           and isinstance(p.get("answer"), str) for p in qa):
        raise _labels_error(where, "`qa` must be a list of {question, answer} objects")


def load_news(articles: str | Path, labels: str | Path) -> tuple[list[dict], list[dict]]:
    """(every article, the labelled ones in labels-file order, each with its labels under "gold"), joined on url."""
    from scrape.corpus import read_articles

    corpus = read_articles(articles)  # names a missing file or a bad line itself
    labels = Path(labels)
    if not labels.is_file():
        raise FileNotFoundError(f"no file at {labels}; pass --labels (e.g. data/sample_news_labels.jsonl)")
    by_url = {a.get("url"): a for a in corpus}
    items = []
    for n, rec in read_jsonl(labels):
        _check_labels(rec, f"{labels}:{n}")
        if rec["url"] not in by_url:
            raise ValueError(f"{labels}:{n}: url {rec['url']} is not in {articles}; label only articles it holds")
        items.append({**by_url[rec["url"]], "gold": rec})
    if not items:
        raise ValueError(f"{labels}: no labelled articles")
    return corpus, items


@dataclass
class NewsArgs:
    articles: str = field(default="data/sample_news.jsonl", metadata={
        "help": "articles JSONL; all are indexed for retrieval, the labelled ones are evaluated"})
    labels: str = field(default="data/sample_news_labels.jsonl", metadata={
        "help": "gold labels JSONL: sentiment, event_type, coins, qa per article url (data/README.md)"})
    out: str = field(default="out/eval/news", metadata={"help": "folder for report.md, news.png, "
                                                                "predictions.jsonl, metrics.json"})
    systems: tuple[str, ...] = field(default=(), metadata={
        "help": f"subset of {','.join(NEWS_SYSTEMS)}; empty = every system the other flags allow"})
    checkpoint: str | None = field(default=None, metadata={"help": "base model path; none = the embedded SmolLM2"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder of the fine-tuned systems"})
    index: str | None = field(default=None, metadata={"help": "retrieval index folder; built over --articles if "
                                                               "it holds none; none = OUT/index"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N labelled articles; 0 = all"})
    max_new_tokens: int = field(default=48, metadata={"help": "answer length limit for QA"})
    extract_tokens: int = field(default=80, metadata={"help": "answer length limit for the JSON extraction (the "
                                                              "sample's gold answers take <= 56 tokens)"})
    constrained: bool = field(default=False, metadata={
        "help": "decode the local systems' extraction JSON under its schema, event types from annotate's list "
                "(generate.py json_schema); API systems answer as usual"})
    batch_tokens: int = field(default=8192, metadata={"help": "a local model generates together as many prompts "
                                                              "as fit: rows x longest prompt <= this"})
    k: int | None = field(default=None, metadata={"help": "chunks retrieved per question; none = retrieval.qa's"})
    # retrieval.qa answers from 512 words; half keeps CPU evaluation fast and still puts the question's article in
    # the prompt for 92% of the sample's questions (97% at 512; MiniLM index, sentence chunks of 128 words)
    context_words: int = field(default=256, metadata={"help": "most words of excerpts in a retrieval prompt"})
    dtype: str = field(default="bfloat16", metadata={"help": "local weights dtype (float32 on CPUs without bf16)",
                                                     "choices": ["bfloat16", "float32"]})
    api_model: str | None = field(default=None, metadata={"help": "the api systems' OpenAI-compatible chat model, "
                                                                  "through llm.py (OPENAI_API_KEY, OPENAI_BASE_URL)"})
    base_url: str | None = field(default=None, metadata={"help": "API base URL for --api-model"})

    def __post_init__(self):
        self.systems = tuple(self.systems)
        unknown = [s for s in self.systems if s not in NEWS_SYSTEMS]
        if unknown:
            raise ValueError(f"systems={','.join(unknown)} unknown; choose from {','.join(NEWS_SYSTEMS)}")
        if any(s.startswith("fine-tuned") for s in self.systems) and not self.adapter:
            raise ValueError("systems fine-tuned and fine-tuned+retrieval need --adapter (a LoRA adapter folder)")
        if any(s.startswith("api") for s in self.systems) and not self.api_model:
            raise ValueError("systems api and api+retrieval need --api-model")
        for name in ("max_new_tokens", "extract_tokens", "batch_tokens", "k", "context_words"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0")

    def selected(self) -> list[str]:
        """The systems to run, in NEWS_SYSTEMS order."""
        if self.systems:
            return [s for s in NEWS_SYSTEMS if s in self.systems]
        return [s for s in NEWS_SYSTEMS if (self.adapter or not s.startswith("fine-tuned"))
                and (self.api_model or not s.startswith("api"))]


def _article_text(item: dict) -> str:
    return f"{item['title']}\n\n{item['text']}" if item.get("title") else item["text"]


def _complete(model, api: bool, tasks: list[tuple[str, str]], max_tokens: int, batch_tokens: int,
              desc: str, json_schema: dict | None = None) -> list[str]:
    """Greedy answers to (instruction, input) pairs: from an API model through llm.py, or from a local Generator in
    the prompt format data.py trains on (decoded under json_schema when given). Local batches hold prompts of similar
    length (less padding), as many as fit batch_tokens: a decoding step of 64 rows costs ~1.5x one of 16 on CPU, so
    wide batches save most."""
    if api:
        def ask(task: tuple[str, str]) -> str:
            content = f"{task[0]}\n\n{task[1]}" if task[1] else task[0]
            return model.chat([{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0).text

        return model.map(ask, tasks, desc=desc)
    from tqdm import tqdm

    from data import format_prompt
    from generate import GenerateArgs

    tok = model.tokenizer
    ids = [model.encode(format_prompt(tok, i, x), chat=tok.chat_template is not None) for i, x in tasks]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, start = [], 0
    while start < len(order):
        n = 1  # sorted ascending: the row being added is the batch's longest
        while start + n < len(order) and (n + 1) * len(ids[order[start + n]]) <= batch_tokens:
            n += 1
        batches.append(order[start:start + n])
        start += n
    texts = [""] * len(ids)
    gargs = GenerateArgs(max_new_tokens=max_tokens, json_schema=json.dumps(json_schema) if json_schema else "")
    with tqdm(total=len(ids), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for batch in batches:
            for i, result in zip(batch, model.generate_ids([ids[i] for i in batch], gargs)):
                texts[i] = result.text
            bar.update(len(batch))
    return texts


def news_sentiment(model, api: bool, items: list[dict], desc: str = "sentiment") -> tuple[dict, list[dict]]:
    """Market sentiment of each article, asked as the sentiment subcommand asks it (predict_local / predict_api)."""
    rows = [{"text": _article_text(it), "label": it["gold"]["sentiment"]} for it in items]
    texts = [r["text"] for r in rows]
    preds = predict_api(model, texts) if api else predict_local(model, texts, desc=desc)
    m, _ = score_predictions(rows, preds)
    records = [{"task": "sentiment", "url": it["url"], "gold": r["label"], **p} for it, r, p in zip(items, rows, preds)]
    return {"sentiment_accuracy": m["accuracy"], "sentiment_f1_macro": present_macro_f1(m, LABELS)}, records


def news_extraction(model, api: bool, items: list[dict], args: NewsArgs, desc: str = "extraction"
                    ) -> tuple[dict, list[dict]]:
    """JSON validity, micro F1 of the coins (summed over articles) and event-type scores of one extraction prompt."""
    tasks = [(extraction_instruction(), _article_text(it)) for it in items]
    schema = extraction_decoding_schema() if args.constrained and not api else None
    answers = _complete(model, api, tasks, args.extract_tokens, args.batch_tokens, desc, schema)
    records, counts = [], np.zeros(3, dtype=np.int64)
    for it, answer in zip(items, answers):
        obj, error = parse_extraction(answer)
        coins = obj["coins"] if obj else []
        tp_fp_fn = coin_counts(coins, it["gold"]["coins"])
        counts += tp_fp_fn
        records.append({"task": "extraction", "url": it["url"], "answer": answer, "valid": obj is not None,
                        "error": error, "event_type": obj["event_type"] if obj else None, "coins": coins,
                        "gold_event_type": it["gold"]["event_type"], "gold_coins": it["gold"]["coins"],
                        "coins_tp_fp_fn": list(tp_fp_fn)})
    tp, fp, fn = counts.tolist()
    return {"json_valid": float(np.mean([r["valid"] for r in records])),
            "coins_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            **event_metrics([r["gold_event_type"] for r in records], [r["event_type"] for r in records])}, records


def news_qa(model, api: bool, items: list[dict], args: NewsArgs, qa=None, desc: str = "qa") -> tuple[dict, list[dict]]:
    """Answers to every gold question: closed-book, or through retrieval.qa.QA when `qa` is given."""
    from tqdm import tqdm

    pairs = [(it, p) for it in items for p in it["gold"]["qa"]]
    questions = [p["question"] for _, p in pairs]
    if qa is None:
        tasks = [(f"{CLOSED_BOOK_INSTRUCTION}\n\nQuestion: {q}", "") for q in questions]
        answers = [(text, None) for text in _complete(model, api, tasks, args.max_new_tokens, args.batch_tokens, desc)]
    else:
        answers = []
        rows = max(1, args.batch_tokens // (2 * args.context_words))  # ~1.4 tokens a word, plus the instruction
        with tqdm(total=len(questions), desc=desc, unit="question", dynamic_ncols=True) as bar:
            for start in range(0, len(questions), rows):
                batch = qa.answer(questions[start:start + rows])
                answers += [(a.text, [s.url for s in a.sources]) for a in batch]
                bar.update(len(batch))
    records = []
    for (it, pair), (text, sources) in zip(pairs, answers):
        rec = {"task": "qa", "url": it["url"], "question": pair["question"], "reference": pair["answer"],
               "answer": text, **qa_scores(text, pair["answer"])}
        if sources is not None:
            rec.update(sources=sources, hit=it["url"] in sources)
        records.append(rec)
    metrics = {f"qa_{k}": float(np.mean([r[k] for r in records])) if records else 0.0
               for k in ("f1", "rouge_l", "contains")}
    if qa is not None:
        metrics["retrieval_hit"] = float(np.mean([r["hit"] for r in records])) if records else 0.0
    return metrics, records


def news_index(args: NewsArgs, out: Path):
    """(folder, Index): the one at --index (default OUT/index), built over --articles if the folder holds none."""
    from retrieval.chunk import ChunkArgs
    from retrieval.index import Index, IndexArgs, build_index

    path = Path(args.index) if args.index else out / "index"
    if (path / "index.json").is_file():
        return path, Index.load(path)
    return path, build_index(IndexArgs(articles=Path(args.articles), out=path), ChunkArgs(), progress=True)[0]


def evaluate_news(args: NewsArgs, llm=None, generators: dict | None = None) -> dict:
    """Score every selected system on the labelled news; write report.md, news.png, predictions.jsonl and metrics.json
    into args.out. `llm` (an llm.LLM) serves the api systems instead of one built from --api-model/--base-url;
    `generators` ({"base": Generator, "fine-tuned": Generator}) replace loading --checkpoint / --adapter.
    Returns {"systems": {system: {metric: value}}, "report", "plot", "predictions", "metrics": paths}."""
    import contextlib

    _, items = load_news(args.articles, args.labels)
    items = items[:args.limit or None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = args.selected()
    index_path = index = None
    if any(s.endswith("+retrieval") for s in systems):
        index_path, index = news_index(args, out)
    results, records = {}, []
    for base in ("base", "fine-tuned", "api"):
        todo = [s for s in systems if s.split("+")[0] == base]
        if not todo:
            continue
        api = base == "api"
        with contextlib.ExitStack() as stack:
            if api:
                from llm import LLM, LLMArgs

                model = llm or stack.enter_context(LLM(LLMArgs(model=args.api_model, base_url=args.base_url)))
            elif generators and base in generators:
                model = generators[base]
            else:  # one model in memory at a time
                model = load_generator(args.checkpoint, args.adapter if base == "fine-tuned" else None, args.dtype)
            for system in todo:
                t0 = time.perf_counter()
                if system == base:
                    parts = [news_sentiment(model, api, items, f"{system} / sentiment"),
                             news_extraction(model, api, items, args, f"{system} / extraction"),
                             news_qa(model, api, items, args, desc=f"{system} / qa")]
                else:
                    from generate import GenerateArgs
                    from retrieval.qa import QA, QAArgs

                    qargs = QAArgs(index=index_path, answerer=f"openai:{args.api_model}" if api else "local",
                                   context_words=args.context_words, **({"k": args.k} if args.k else {}))
                    qa = QA(qargs, GenerateArgs(max_new_tokens=args.max_new_tokens), index=index,
                            generator=None if api else model, llm=model if api else None)
                    parts = [news_qa(model, api, items, args, qa, desc=f"{system} / qa")]
                results[system] = {k: v for metrics, _ in parts for k, v in metrics.items()}
                results[system]["seconds"] = round(time.perf_counter() - t0, 1)
                records += [{"system": system, **r} for _, recs in parts for r in recs]
            del model
    results = {s: results[s] for s in systems}  # NEWS_SYSTEMS order, not the order the models ran in
    setup = {"articles": len(items), "questions": sum(len(it["gold"]["qa"]) for it in items),
             "labels": str(args.labels), "checkpoint": args.checkpoint or "embedded SmolLM2-135M-Instruct",
             "adapter": args.adapter, "api_model": args.api_model, "dtype": args.dtype,
             "constrained": args.constrained,
             "index": None if index is None else f"{index_path} ({len(index)} chunks, {index.embedder_name})"}
    paths = {"report": out / "report.md", "plot": out / "news.png", "predictions": out / "predictions.jsonl",
             "metrics": out / "metrics.json"}
    write_jsonl(paths["predictions"], records)
    news_report(paths["report"], results, setup)
    news_plot(paths["plot"], results)
    write_json(paths["metrics"], {"setup": setup, "systems": results})
    return {"systems": results, **{k: str(v) for k, v in paths.items()}}


def news_report(path: Path, results: dict, setup: dict) -> None:
    """The markdown table (one row per system, one column per metric) with what each number means."""
    lines = ["# News evaluation: base vs fine-tuned vs retrieval", "",
             f"{setup['articles']} labelled articles and {setup['questions']} questions from `{setup['labels']}`; "
             f"model {setup['checkpoint']} ({setup['dtype']})"
             + (f", adapter `{setup['adapter']}`" if setup["adapter"] else "")
             + (f", API model `{setup['api_model']}`" if setup["api_model"] else "")
             + (f"; index {setup['index']}" if setup["index"] else "") + ". Greedy decoding"
             + ("; the local systems' extraction JSON decoded under its schema (--constrained)."
                if setup.get("constrained") else "."), "",
             "| system | " + " | ".join(h for _, h in NEWS_METRICS) + " | seconds |",
             "|---" * (len(NEWS_METRICS) + 2) + "|"]
    for system, m in results.items():
        cells = [f"{m[k]:.3f}" if k in m else "—" for k, _ in NEWS_METRICS]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {m['seconds']} |")
    lines += ["", "- Sentiment and extraction give the model the article itself, so retrieval cannot change them: "
              "they are measured once per model (— in the + retrieval rows).",
              "- sentiment: market sentiment of the article, asked as `evaluate.py sentiment` asks it (a local model "
              "ranks the label words by log-likelihood); acc = accuracy, F1-m = macro F1.",
              "- extraction: one prompt asks for JSON with `event_type` and `coins`. JSON valid: the answer holds "
              "such an object (llm.parse_json_answer); an invalid answer counts as no coins and no event. coins F1: "
              "micro F1 over all articles, a coin matching by name or ticker. event F1-m: macro F1 over event types.",
              "- QA: two questions per article, answers verbatim in it. F1: SQuAD token F1; ROUGE-L: F-measure as "
              "rouge-score computes it; contains: the normalised reference appears in the answer; citations like "
              "[1] are removed first. retrieval hit: the question's article is among the excerpts retrieved.",
              "- seconds: wall time of the row's tasks, model loading excluded.", ""]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def news_plot(path: Path, results: dict) -> None:
    """A grouped bar chart: one group per metric, one bar per system (absent metrics leave a gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(k, h) for k, h in NEWS_METRICS if any(k in m for m in results.values())]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(results))
    for j, (system, m) in enumerate(results.items()):
        xs = np.arange(len(shown)) + (j - (len(results) - 1) / 2) * width
        ax.bar(xs, [m.get(k, np.nan) for k, _ in shown], width, label=system, color=f"C{j}")
    ax.set_xticks(np.arange(len(shown)), [h for _, h in shown], rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="score", title="News: base vs fine-tuned vs retrieval")
    ax.legend(fontsize=8)
    tmp = path.with_name(path.stem + ".tmp.png")  # matplotlib picks the format from the extension
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- CLI

COMMANDS = {"sentiment": (SentimentArgs, run_sentiment), "sentiment-pipeline": (PipelineArgs, run_pipeline),
            "news": (NewsArgs, evaluate_news)}


def main(argv: list[str] | None = None) -> None:
    import sys

    from cli import parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python evaluate.py {{{','.join(COMMANDS)}}} [--help]\n\n{__doc__}")
    cls, run = COMMANDS[argv[0]]
    (args,) = parse_args(argv[1:], cls, description=__doc__)
    result = run(args)
    print(json.dumps(summary(result) if cls is SentimentArgs else result))


if __name__ == "__main__":
    main()
