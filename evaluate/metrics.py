"""Scores, each checked against the library it stands in for (tests/test_evaluate*.py): classification metrics
(scikit-learn's), event-type metrics, SQuAD answer F1 and ROUGE-L (rouge-score's), coin matching for extraction.

    from evaluate.metrics import sentiment_metrics, qa_scores
    sentiment_metrics(["neutral", "positive"], ["neutral", "neutral"])["f1_weighted"]
"""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from annotate.schema import EVENT_TYPES
from evaluate.loaders import LABELS
from selfinstruct.rouge import rouge_l

_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


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


def summary(metrics: dict) -> dict:
    """The headline figures of sentiment_metrics: {n, accuracy, f1_weighted, f1_macro}."""
    return {k: metrics[k] for k in ("n", "accuracy", "f1_weighted", "f1_macro")}


def annotator_agreement(rows: list[dict]) -> float:
    """How often one annotator's label equals the majority label, over every (row, annotator) pair: the human
    ceiling beside a model's accuracy (CryptoLin's rows carry `annotators`)."""
    pairs = [(a, r["label"]) for r in rows for a in r["annotators"]]
    return sum(a == label for a, label in pairs) / len(pairs) if pairs else 0.0


def present_macro_f1(metrics: dict, labels) -> float:
    """Mean F1 of the labels present in gold or predictions (scikit-learn's default label set), from
    sentiment_metrics' per-class scores: a class absent from a small --limit run does not count as a zero."""
    present = [lab for lab in labels if metrics["per_class"][lab]["support"] or
               sum(row[metrics["labels"].index(lab)] for row in metrics["confusion"])]
    return float(np.mean([metrics["per_class"][lab]["f1"] for lab in present])) if present else 0.0


def event_metrics(gold: list[str], predicted: list[str | None]) -> dict:
    """Accuracy and macro F1 (present_macro_f1) of event types; an answer outside annotate/schema.py's EVENT_TYPES
    (or none) is wrong."""
    invalid = "(invalid)"
    m = sentiment_metrics(gold, [p if p in EVENT_TYPES else invalid for p in predicted], labels=(*EVENT_TYPES, invalid))
    return {"event_accuracy": m["accuracy"], "event_f1_macro": present_macro_f1(m, EVENT_TYPES)}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of normalised answers; when either is empty, 1.0 only if both are (as SQuAD v2)."""
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
    answer = _CITATION.sub("", answer).strip()
    ref = normalize_answer(reference)
    return {"f1": token_f1(answer, reference), "rouge_l": rouge_l(reference, answer),
            "contains": bool(ref) and f" {ref} " in f" {normalize_answer(answer)} "}


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
