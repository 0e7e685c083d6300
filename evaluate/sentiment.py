"""Sentiment scoring: the one prompt (shared by training records and evaluation), few-shot examples, local
log-likelihood ranking of the label words, API answers parsed from words, and the `sentiment` subcommand.

    python -m evaluate sentiment --data ../shared/data/crypto-news/twitter_financial_news_sentiment/sent_valid.csv \
        --out out/eval/tfns [--adapter out/sentiment/adapter] [--shots 3 --shots-data sent_train.csv] [--limit 400]
    python -m evaluate sentiment --data my.jsonl --api-model gpt-4o-mini --out out/eval/gpt   # through llm.py

A local model ranks the three label words by log-likelihood after one prompt (`sentiment_prompt`, the same one the
converter's training records render to), so there is no free text to parse; an API model answers in words that
are parsed. Outputs: predictions.jsonl, metrics.json (per-class precision/recall/F1, confusion matrix).
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import format_prompt
from evaluate.calibrate import apply_offsets, logprob_matrix, read_offsets
from evaluate.loaders import LABEL_ALIASES, LABELS, load_sentiment
from evaluate.metrics import sentiment_metrics
from generate import Generator
from jsonl import write_json, write_jsonl
from llm import LLM, LLMArgs
from precision import CHOICES, choose_dtype

# short on purpose: every training example pays for these tokens (with SmolLM2's default system prompt, the fixed
# part of the prompt was two thirds of all training tokens with a 22-token instruction)
INSTRUCTION = "Sentiment of this financial news: negative, neutral or positive?"
# crypto-news headlines are judged as a crypto reader judges them (a listing, an integration or a funding round is
# good news, where the tweets call a company's announcement neutral): their own task, trained on the template
# headlines (evaluate/headlines.py), so the two label conventions do not pull one prompt apart
HEADLINE_INSTRUCTION = "Sentiment of this crypto news headline: negative, neutral or positive?"
PROMPTS = {"news": INSTRUCTION, "headline": HEADLINE_INSTRUCTION}
# no system turn: the chat template's default one (SmolLM2: 16 tokens) was a quarter of every training example's
# tokens and taught nothing; an empty one costs 4 (data.format_prompt)
SYSTEM = ""
_URL = re.compile(r"\s*https?://\S+")


def sentiment_instruction(shots=(), prompt: str = "news") -> str:
    """The instruction of `prompt` (news or headline, PROMPTS), followed by worked examples ({text, label}) when
    shots are given."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt={prompt!r} must be one of {', '.join(PROMPTS)}")
    if not shots:
        return PROMPTS[prompt]
    examples = "\n\n".join(f"Text: {clean_text(s['text'])}\nAnswer: {s['label']}" for s in shots)
    return f"{PROMPTS[prompt]}\n\nExamples:\n\n{examples}"


def clean_text(text: str) -> str:
    """The text as the model sees it: links removed (a t.co link is 13 tokens of noise, a quarter of a tweet)."""
    return _URL.sub("", text).strip() or text


def sentiment_prompt(text: str, tokenizer, shots=(), prompt: str = "news") -> str:
    """The prompt before the label word: data.py's rendering of the record the converter writes for `text`, so
    training and evaluation see the same tokens (shots go into the instruction: one shared prefix)."""
    return format_prompt(tokenizer, sentiment_instruction(shots, prompt), clean_text(text), SYSTEM)


def to_alpaca(row: dict, prompt: str = "news") -> dict:
    """A labelled row as the Alpaca record train_ddp.py learns from (the answer is the bare label word)."""
    return {"system": SYSTEM, "instruction": sentiment_instruction((), prompt), "input": clean_text(row["text"]),
            "output": row["label"]}


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


def load_generator(checkpoint=None, adapter=None, dtype: str = "auto") -> Generator:
    """A local model (None = the embedded SmolLM2) with an optional LoRA adapter, weights in `dtype` (precision.py's
    names; auto = precision.choose_dtype's choice for the CPU)."""
    return Generator.from_checkpoint(checkpoint, adapter=adapter, dtype=choose_dtype(dtype, "cpu"))


def predict_local(gen, texts: list[str], shots=(), chunk: int = 256, desc: str = "score",
                  prompt: str = "news") -> list[dict]:
    """{pred, logprobs} per text: score_options over the label words (the shared prompt prefix runs once a chunk)."""
    out = []
    with tqdm(total=len(texts), desc=desc, unit="row", dynamic_ncols=True) as bar:
        for i in range(0, len(texts), chunk):
            prompts = [sentiment_prompt(t, gen.tokenizer, shots, prompt) for t in texts[i:i + chunk]]
            scores = gen.score_options(prompts, list(LABELS))  # (n, 3) summed log-probs
            for row in scores.tolist():
                out.append({"pred": LABELS[int(np.argmax(row))], "logprobs": dict(zip(LABELS, row))})
            bar.update(len(prompts))
    return out


def predict_api(llm, texts: list[str], shots=(), prompt: str = "news") -> list[dict]:
    """{pred, answer} per text from a chat model's free-text answer; unparseable answers count as wrong (pred None)."""
    def ask(text: str) -> dict:
        msg = f"{sentiment_instruction(shots, prompt)}\n\n{clean_text(text)}"
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


def save_eval(out: Path, metrics: dict, records: list[dict]) -> None:
    """predictions.jsonl, then metrics.json, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", records, ensure_ascii=True)  # no reader can split a line on U+2028
    write_json(out / "metrics.json", metrics)  # last: its presence marks the evaluation as complete


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
    dtype: str = field(default="auto", metadata={
        "help": "local weights dtype; auto: bf16 where the CPU/GPU runs it natively, else fp32 (precision.py)",
        "choices": CHOICES})
    api_model: str | None = field(default=None, metadata={"help": "ask this OpenAI-compatible chat model through "
                                                                  "llm.py instead (OPENAI_API_KEY, OPENAI_BASE_URL)"})
    base_url: str | None = field(default=None, metadata={"help": "API base URL for --api-model"})
    seed: int = field(default=0, metadata={"help": "seed for choosing the shots"})
    prompt: str = field(default="news", metadata={
        "help": "news: the financial-news instruction (tweets, PhraseBank); headline: the crypto-headline one that "
                "make sentiment's template headlines train (CryptoLin)", "choices": tuple(PROMPTS)})
    offsets: str | None = field(default=None, metadata={
        "help": "calibration JSON (make sentiment's calibration_<set>.json): label-prior offsets added to a local "
                "model's label log-probs before choosing"})

    def __post_init__(self):
        if self.offsets and self.api_model:
            raise ValueError("--offsets shifts a local model's label log-probs; an --api-model answers in words")
        if self.shots < 0 or self.limit < 0:
            raise ValueError(f"shots={self.shots} and limit={self.limit} must be >= 0")
        if self.shots and not self.shots_data:
            raise ValueError(f"shots={self.shots} needs --shots-data (a labelled training file; shots never come "
                             "from the test set)")
        if self.api_model and (self.checkpoint or self.adapter):
            raise ValueError("--api-model asks an API; it cannot take --checkpoint or --adapter")


def run_sentiment(args: SentimentArgs, gen=None) -> dict:
    """Score args.data, write predictions.jsonl + metrics.json into args.out; return the metrics."""
    rows = load_sentiment(args.data)
    if args.limit:
        rows = rows[:args.limit]
    shots = pick_shots(load_sentiment(args.shots_data), args.shots, args.seed) if args.shots else ()
    t0 = time.perf_counter()
    if args.api_model:
        with LLM(LLMArgs(model=args.api_model, base_url=args.base_url)) as llm:
            preds = predict_api(llm, [r["text"] for r in rows], shots, args.prompt)
    else:
        gen = gen or load_generator(args.checkpoint, args.adapter, args.dtype)
        preds = predict_local(gen, [r["text"] for r in rows], shots, prompt=args.prompt)
        if args.offsets:
            labels = apply_offsets(logprob_matrix(preds), read_offsets(args.offsets))
            preds = [{**p, "pred": label} for p, label in zip(preds, labels)]
    metrics, records = score_predictions(rows, preds)
    seconds = time.perf_counter() - t0
    metrics.update(data=str(args.data), shots=args.shots, seconds=round(seconds, 1),
                   rows_per_s=round(len(rows) / seconds, 2), model=args.api_model or args.checkpoint or "embedded",
                   adapter=args.adapter, offsets=args.offsets, prompt=args.prompt)
    save_eval(Path(args.out), metrics, records)
    return metrics
