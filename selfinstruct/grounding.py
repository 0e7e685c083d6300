"""Step 4, domain grounding: instructions whose input is one of our news articles (`articles.jsonl`).

    from scrape.corpus import read_articles
    from selfinstruct.grounding import excerpt, ground
    ground(llm, out / "grounded.jsonl", read_articles(path), kinds=("qa", "extract", "sentiment", "summary"))

Four kinds per article: a question answered in the text (with the sentence that proves it), extraction of coins,
organisations and amounts into JSON, sentiment with a reason, and a summary for a trader. The model answers in
JSON; each answer is validated (schema, and checks against the article text) before it becomes a training record,
so a hallucinated answer or a broken JSON is dropped and counted, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from annotate.schema import EVENT_TYPES  # one list of event types: annotation, training, evaluation
from llm import LLMOutputError
from selfinstruct.rouge import tokenize
from selfinstruct.store import append_jsonl, read_jsonl

KINDS = ("qa", "extract", "sentiment", "summary")
SAMPLING = dict(max_tokens=600, temperature=0.0)
# Several phrasings per kind, picked per article, so the tuned model does not learn one fixed wording.
INSTRUCTIONS = {
    "qa": ["Answer the question using only the news article.",
           "Read the crypto news article and answer the question.",
           "Using the article below, answer the question in one or two sentences."],
    "extract": ["Extract the cryptocurrencies, organisations, amounts and event type from the news article as JSON.",
                "List the coins, companies and amounts mentioned in the article, and the type of event, in JSON.",
                "Return a JSON object with the coins, organisations, amounts and event type in this crypto news."],
    "sentiment": ["Is this crypto news bullish, bearish or neutral for the market? Give the label and the reason.",
                  "Classify the market sentiment of the article as bullish, bearish or neutral, and explain why.",
                  "Decide whether the news is bullish, bearish or neutral, then give a one-sentence reason."],
    "summary": ["Summarise the news article in two or three sentences for a crypto trader.",
                "Write a short summary of the article that tells a trader what happened and why it matters.",
                "Give a brief, factual summary of this crypto news article."],
}
ASK = {
    "qa": ("Write one question that the article answers, its short answer, and the sentence of the article that "
           "contains the answer, copied exactly. Reply with JSON only: "
           '{"question": "...", "answer": "...", "evidence": "..."}'),
    "extract": ("Extract what the article mentions. Copy names exactly as written in the article. Reply with JSON "
                'only: {"coins": [...], "organizations": [...], "amounts": [{"value": number, "unit": "..."}], '
                f'"event_type": one of {json.dumps(EVENT_TYPES)}}}'),
    "sentiment": ("Is the article bullish, bearish or neutral for the crypto assets it covers? Reply with JSON only: "
                  '{"sentiment": "bullish" | "bearish" | "neutral", "reason": "one sentence"}'),
    "summary": ('Summarise the article in two or three factual sentences for a trader. Reply with JSON only: '
                '{"summary": "..."}'),
}
_STR = {"type": "string"}
SCHEMAS = {
    "qa": {"type": "object", "required": ["question", "answer", "evidence"],
           "properties": {"question": _STR, "answer": _STR, "evidence": _STR}},
    "extract": {"type": "object", "required": ["coins", "organizations", "amounts", "event_type"],
                "properties": {"coins": {"type": "array", "items": _STR},
                               "organizations": {"type": "array", "items": _STR},
                               "amounts": {"type": "array", "items": {
                                   "type": "object", "required": ["value", "unit"],
                                   "properties": {"value": {"type": "number"}, "unit": _STR}}},
                               "event_type": {"type": "string", "enum": EVENT_TYPES}}},
    "sentiment": {"type": "object", "required": ["sentiment", "reason"],
                  "properties": {"sentiment": {"type": "string", "enum": ["bullish", "bearish", "neutral"]},
                                 "reason": _STR}},
    "summary": {"type": "object", "required": ["summary"], "properties": {"summary": _STR}},
}


def excerpt(article: dict, max_chars: int) -> str:
    """Title and text, cut at the last sentence end before max_chars (the model's context is not unlimited)."""
    text = re.sub(r"[ \t]+", " ", article["text"]).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = max(cut.rfind(". "), cut.rfind(".\n"))
        text = cut[: end + 1] if end > max_chars // 2 else cut
    title = (article.get("title") or "").strip()
    return f"{title}\n\n{text}" if title else text


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def check(kind: str, obj: dict, text: str) -> list[str]:
    """Errors of a schema-valid answer against the article text; [] when usable."""
    lower = _norm(text)
    if kind == "qa":
        if not obj["question"].strip() or not obj["answer"].strip():
            return ["question and answer must not be empty"]
        if _norm(obj["evidence"]).strip(" .") not in lower:
            return ["'evidence' is not a sentence copied from the article"]
        missing = set(tokenize(obj["answer"])) - set(tokenize(text))
        if missing:
            return [f"the answer uses words not in the article: {sorted(missing)[:5]}"]
    elif kind == "extract":
        absent = [n for n in obj["coins"] + obj["organizations"] if _norm(n) not in lower]
        if absent:
            return [f"names not in the article: {absent[:5]}"]
    elif kind == "sentiment":
        if len(obj["reason"].split()) < 3:
            return ["'reason' must be a sentence"]
    elif kind == "summary":
        n = len(obj["summary"].split())
        if not 8 <= n <= 120 or len(obj["summary"]) >= len(text):
            return [f"the summary has {n} words; expected 8 to 120 and shorter than the article"]
    return []


def to_record(kind: str, obj: dict, text: str, instruction: str) -> dict:
    """The Alpaca record a validated answer becomes."""
    if kind == "qa":
        return {"instruction": instruction, "input": f"Article: {text}\n\nQuestion: {obj['question'].strip()}",
                "output": obj["answer"].strip()}
    if kind == "extract":
        out = {k: obj[k] for k in ("coins", "organizations", "amounts", "event_type")}
        return {"instruction": instruction, "input": text, "output": json.dumps(out, ensure_ascii=False)}
    if kind == "sentiment":
        return {"instruction": instruction, "input": text,
                "output": f"{obj['sentiment'].capitalize()}. {obj['reason'].strip()}"}
    return {"instruction": instruction, "input": text, "output": obj["summary"].strip()}


def ground(llm, path: Path, articles: list[dict], kinds=KINDS, max_chars: int = 3000) -> list[dict]:
    """One grounded record (or a counted failure) per article and kind; one JSONL line each in `path`."""
    rows = read_jsonl(path, ("url", "kind", "ok"))
    done = {(r["url"], r["kind"]) for r in rows}
    todo = [(a, k) for a in articles for k in kinds if (a["url"], k) not in done]

    def ask(job):
        article, kind = job
        text = excerpt(article, max_chars)
        messages = [{"role": "system", "content": "You turn crypto news articles into training data. Use only "
                                                  "facts stated in the article."},
                    {"role": "user", "content": f"Article:\n{text}\n\n{ASK[kind]}"}]
        try:
            # the prompt asks for JSON only: a local model writes it at once, without a reasoning pass first
            obj = llm.chat_json(messages, SCHEMAS[kind], check=lambda o: check(kind, o, text), reasoning=False,
                                **SAMPLING)
        except LLMOutputError as e:
            return {"ok": False, "reason": e.reason[:300]}
        pick = int(hashlib.sha256(article["url"].encode()).hexdigest(), 16) % len(INSTRUCTIONS[kind])
        return {"ok": True, "record": to_record(kind, obj, text, INSTRUCTIONS[kind][pick])}

    for (article, kind), result in zip(todo, llm.imap(ask, todo, desc="ground")):
        row = {"url": article["url"], "kind": kind, **result}
        append_jsonl(path, row)
        rows.append(row)
    return rows
