"""Evaluate models on labelled financial sentiment (TFNS tweets, Financial PhraseBank, your JSONL) and on labelled
news (sentiment, extraction, QA; base vs fine-tuned vs retrieval). One subcommand per evaluation, each a dataclass
of flags (cli.parse_args) and the function it runs:

    python -m evaluate sentiment --data ../shared/data/crypto-news/twitter_financial_news_sentiment/sent_valid.csv \
        --out out/eval/tfns [--adapter out/sentiment/adapter] [--shots 3 --shots-data sent_train.csv] [--limit 400]
    python -m evaluate sentiment --data my.jsonl --api-model gpt-4o-mini --out out/eval/gpt   # through llm.py
    python -m evaluate sentiment-pipeline --out out/sentiment          # convert -> LoRA train -> score -> report
    python -m evaluate news --adapter out/demo/adapter --out out/eval/news   # base / fine-tuned, +- retrieval
    make sentiment

Each prints one JSON line: {n, accuracy, f1_weighted, f1_macro} for `sentiment`, the results for the others.
"""
from __future__ import annotations

import argparse
import json
import sys

from cli import parse_args
from evaluate.metrics import summary
from evaluate.news import NewsArgs, evaluate_news
from evaluate.pipeline import PipelineArgs, run_pipeline
from evaluate.sentiment import SentimentArgs, run_sentiment

COMMANDS = {"sentiment": (SentimentArgs, run_sentiment), "sentiment-pipeline": (PipelineArgs, run_pipeline),
            "news": (NewsArgs, evaluate_news)}


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; print its summary as one JSON line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m evaluate {{{','.join(COMMANDS)}}} [--help]\n\n{__doc__}")
    cls, run = COMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"python -m evaluate {argv[0]}",
                                     description=sys.modules[run.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parse_args(argv[1:], cls, parser=parser)
    result = run(args)
    print(json.dumps(summary(result) if cls is SentimentArgs else result))
