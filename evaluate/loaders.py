"""Labelled sentiment files -> rows {text, label word}: a TFNS CSV, a Financial PhraseBank txt or a JSONL file,
told apart by their content (`load_sentiment`); CryptoLin's JSONL keeps its annotators' labels and the predictions it
ships for VADER and FinBERT (`load_cryptolin`; `load_labelled` picks either). Errors name the file and line.

    from evaluate.loaders import load_cryptolin, load_sentiment
    rows = load_sentiment("../shared/data/crypto-news/twitter_financial_news_sentiment/sent_valid.csv")
    rows = load_cryptolin("../shared/data/crypto-news/cryptolin/cryptolin_dev.jsonl")   # + annotators, vader, finbert
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from jsonl import parse_jsonl, read_jsonl

LABELS = ("negative", "neutral", "positive")
# TFNS (zeroshot/twitter-financial-news-sentiment): 0 bearish, 1 bullish, 2 neutral
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}
LABEL_ALIASES = {"bearish": "negative", "bullish": "positive"}
# the reference systems whose predictions CryptoLin ships, one column each
SHIPPED_SYSTEMS = ("vader", "finbert")


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


def load_cryptolin(path: str | Path) -> list[dict]:
    """CryptoLin rows {text, label, annotators, vader, finbert}: the majority label, the three annotators' labels and
    the two reference systems' predictions, each a label word (../shared/data/crypto-news/LICENSES.md)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CryptoLin file at {path}; it sits in ../shared/data/crypto-news/cryptolin/")
    rows = []
    for i, rec in read_jsonl(path):
        where = f"{path}:{i}"
        row = _row(rec.get("text"), _label(str(rec.get("label", "")), where), where)
        annotators = rec.get("annotators")
        if not isinstance(annotators, list) or not annotators:
            raise ValueError(f"{where}: `annotators` must be a non-empty list of label words, got {annotators!r}")
        row["annotators"] = [_label(str(a), f"{where} annotators") for a in annotators]
        for name in SHIPPED_SYSTEMS:
            row[name] = _label(str(rec.get(name, "")), f"{where} {name}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_labelled(path: str | Path) -> list[dict]:
    """load_cryptolin for a JSONL file whose first record has `annotators`, load_sentiment for anything else."""
    path = Path(path)
    if path.is_file():
        first = next((line for line in _lines(_read_text(path)) if line.strip()), "")
        try:
            if "annotators" in json.loads(first):
                return load_cryptolin(path)
        except (ValueError, TypeError):  # not a JSON object: load_sentiment reads it (or names what is wrong)
            pass
    return load_sentiment(path)
