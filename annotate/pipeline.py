"""Annotate crypto-news articles with chain-of-thought prompts: (a) clean, (c) extract, (b) sentiment.

    python -m annotate --articles out/articles.jsonl --out out/annotations.jsonl
    python -m annotate --articles data/sample_news.jsonl --out out/annotations.jsonl --base-url http://127.0.0.1:8000/v1
    python -m annotate --articles data/sample_news.jsonl --out out/annotations.jsonl --backend local --limit 3

Per article: the cleaning prompt drops boilerplate paragraphs by number (the model never rewrites the text), the
extraction prompt finds coins, organisations, people and events, and the sentiment prompt judges the market and
each extracted coin. Every answer is validated (annotate/schema.py); an invalid one is retried once with the
errors, then the article is recorded as a failure with the raw answer. The output is appended and flushed record by
record in input order, so an interrupted run resumes where it stopped; answers are cached by llm.py. A request that
fails for good (llm.py's retries exhausted, a bad key) stops the run: fix the cause and rerun to resume.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from annotate import prompts
from annotate.schema import ANNOTATION_SCHEMA, CLEAN_SCHEMA, EXTRACT_SCHEMA, SENTIMENT_SCHEMA
from cli import parse_args
from jsonl import read_jsonl, write_jsonl
from llm import LLM, LLMArgs, LLMOutputError, validate
from scrape.corpus import read_articles


@dataclass
class AnnotateArgs:
    articles: str = field(default="out/articles.jsonl", metadata={"help": "input articles.jsonl (from scrape)"})
    out: str = field(default="out/annotations.jsonl", metadata={"help": "output annotations.jsonl (appended)"})
    limit: int = field(default=0, metadata={"help": "annotate at most this many articles; 0 = all"})
    clean: bool = field(default=True, metadata={"help": "run the boilerplate-cleaning prompt first"})
    max_chars: int = field(default=8000, metadata={"help": "article text shown to the model, cut at a paragraph"})
    max_tokens: int = field(default=1024, metadata={"help": "most tokens per answer (reasoning + JSON)"})
    retry_failed: bool = field(default=False, metadata={"help": "annotate again the articles recorded as failures "
                                                                "(use another --model or --cache none: the cache "
                                                                "replays the same answers)"})

    def __post_init__(self):
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0 (0 = all)")
        if self.max_chars < 200:
            raise ValueError(f"max_chars={self.max_chars} is too small to hold an article; use >= 200")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens={self.max_tokens} leaves no room to reason; use >= 16")


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Paragraphs (blank-line separated, else one per line), keeping whole ones up to max_chars in total."""
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    if len(blocks) == 1:
        blocks = [b.strip() for b in text.splitlines() if b.strip()]
    kept, total = [], 0
    for b in blocks:
        if total + len(b) > max_chars:
            if not kept:  # one giant paragraph: cut it rather than show nothing
                kept.append(b[:max_chars])
            break
        kept.append(b)
        total += len(b)
    return kept


def _ticker(value) -> str | None:
    value = (value or "").strip().lstrip("$").upper()
    return value or None


def _coin_key(coin: dict) -> str:
    return coin.get("ticker") or coin["name"].strip().lower()


def _clean_schema(llm: LLM, n: int) -> dict:
    """CLEAN_SCHEMA; for a local model, with the article's paragraph count as the maximum, so its constrained decoding
    cannot name a paragraph that does not exist (API answers keep the schema, and so their cache keys and repairs)."""
    if llm.args.backend != "local":
        return CLEAN_SCHEMA
    drop = CLEAN_SCHEMA["properties"]["drop"]
    return {**CLEAN_SCHEMA, "properties": {"drop": {**drop, "items": {**drop["items"], "maximum": n}}}}


def _check_clean(n: int):
    def check(obj: dict) -> list[str]:
        errors = [f"$.drop: paragraph {i} does not exist (there are {n})" for i in obj["drop"] if i > n]
        if not errors and len(set(obj["drop"])) >= n:
            errors.append("$.drop: every paragraph would be removed; keep the paragraphs of the story")
        return errors
    return check


def _check_extract(obj: dict) -> list[str]:
    errors = []
    for i, event in enumerate(obj["events"]):
        if event["date"] is not None:
            try:
                dt.date.fromisoformat(event["date"])
            except ValueError:
                errors.append(f"$.events[{i}].date: {event['date']!r} is not YYYY-MM-DD (or null)")
    return errors


def _idents(coin: dict) -> set[str]:
    """Lower-case names a coin goes by: its name and ticker (the model may put either in "ticker")."""
    return {v.strip().lstrip("$").lower() for v in (coin.get("name"), coin.get("ticker")) if v} - {""}


def _verdict(coin: dict, answers: list[dict]) -> dict | None:
    return next((a for a in answers if _idents(a) & _idents(coin)), None)


def _check_sentiment(coins: list[dict]):
    def check(obj: dict) -> list[str]:
        return [f"$.coins: no entry for {prompts.coin_label(c)}; judge every listed coin"
                for c in coins if _verdict(c, obj["coins"]) is None]
    return check


def annotate_article(llm: LLM, article: dict, args: AnnotateArgs) -> dict:
    """One annotations.jsonl record for `article`: ok with the annotations, or a failure with the raw answer."""
    base = {"url": article["url"], "title": article.get("title"), "published": article.get("published"),
            "model": llm.model_id}
    params = dict(max_tokens=args.max_tokens, temperature=0.0)
    paragraphs = split_paragraphs(article["text"], args.max_chars)
    reasoning, drop, step = {}, [], "clean"
    try:
        if args.clean and len(paragraphs) > 1:
            answer = llm.chat_json_answer(prompts.clean_messages(article, paragraphs),
                                          _clean_schema(llm, len(paragraphs)), check=_check_clean(len(paragraphs)),
                                          **params)
            drop, reasoning["clean"] = sorted(set(answer.data["drop"])), answer.reasoning
        text = "\n\n".join(p for i, p in enumerate(paragraphs, 1) if i not in drop)

        step = "extract"
        answer = llm.chat_json_answer(prompts.extract_messages(article, text), EXTRACT_SCHEMA,
                                      check=_check_extract, **params)
        facts, reasoning["extract"] = answer.data, answer.reasoning
        coins = {}
        for c in facts["coins"]:  # one entry per coin, tickers normalised (the model writes "$eth" too)
            coin = {"name": c["name"].strip(), "ticker": _ticker(c["ticker"])}
            coins.setdefault(_coin_key(coin), coin)

        step = "sentiment"
        answer = llm.chat_json_answer(prompts.sentiment_messages(article, text, list(coins.values())),
                                      SENTIMENT_SCHEMA, check=_check_sentiment(list(coins.values())), **params)
        judged, reasoning["sentiment"] = answer.data, answer.reasoning
    except LLMOutputError as e:
        return {**base, "ok": False, "step": step, "error": e.reason, "raw": e.raw_text}

    verdicts = [_verdict(coin, judged["coins"]) for coin in coins.values()]
    record = {**base, "ok": True,
              "sentiment": judged["market"]["sentiment"], "rationale": judged["market"]["reason"],
              "coins": [{**coin, "sentiment": v["sentiment"], "reason": v["reason"]}
                        for coin, v in zip(coins.values(), verdicts)],
              "entities": {"organizations": facts["organizations"], "people": facts["people"]},
              "events": facts["events"], "removed_paragraphs": drop, "clean_text": text, "reasoning": reasoning}
    errors = validate(record, ANNOTATION_SCHEMA)
    assert not errors, errors  # built from validated answers, so it always fits
    return record


def _load_done(out: Path, retry_failed: bool) -> set[str]:
    """URLs already in `out`; drops a line cut off by a crash (and failures, to retry them) from the file."""
    if not out.exists():
        return set()
    records = read_jsonl(out, drop_torn_tail=True)
    for lineno, r in records:
        if not isinstance(r.get("url"), str):
            raise ValueError(f"{out}:{lineno}: an annotation needs a string 'url' (got {r.get('url')!r}); "
                             f"fix or delete the line, or pass a new --out")
    keep = [r for _, r in records if r.get("ok") or not retry_failed]
    if len(keep) < len(records):
        write_jsonl(out, keep)
    return {r["url"] for r in keep}


def annotate_file(aargs: AnnotateArgs, largs: LLMArgs) -> dict:
    """Annotate every article of aargs.articles not yet in aargs.out; returns counts and the LLM usage."""
    articles = read_articles(aargs.articles)
    if aargs.limit:
        articles = articles[:aargs.limit]
    out = Path(aargs.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _load_done(out, aargs.retry_failed)
    todo = [a for a in articles if a["url"] not in done]
    stats = dict(articles=len(articles), skipped=len(articles) - len(todo), annotated=0, failed=0)
    with LLM(largs) as llm, out.open("a", encoding="utf-8") as f:
        for record in llm.imap(lambda a: annotate_article(llm, a, aargs), todo, desc="annotate"):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()  # an interrupted run keeps every finished record
            stats["annotated" if record["ok"] else "failed"] += 1
        stats["usage"] = llm.usage
    return stats


def main(argv: list[str] | None = None) -> None:
    aargs, largs = parse_args(argv, AnnotateArgs, LLMArgs, description=__doc__)
    stats = annotate_file(aargs, largs)
    usage = stats.pop("usage")
    print(f"{aargs.out}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"LLM: {usage['requests']} requests, {usage['cached']} from cache, {usage['retries']} retries, "
          f"{usage['prompt_tokens']} + {usage['completion_tokens']} tokens, ~${usage['cost_usd']:.4f}")
