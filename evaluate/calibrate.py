"""Class-prior calibration: one log-prior offset per label, added to a model's label log-probabilities before the
argmax, chosen on a dev set to maximise weighted F1. For a set whose label mix differs from the training data's
(CryptoLin headlines: half positive; TFNS tweets: two thirds neutral), it moves the decision boundary without
touching the model. Offsets are relative to neutral (fixed at 0); the fitted values travel as a small JSON file.

    python -m evaluate sentiment --data cryptolin_test.jsonl --adapter out/sentiment/adapter \
        --offsets out/sentiment/calibration_crypto.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from evaluate.loaders import LABELS
from evaluate.metrics import sentiment_metrics

# log-odds offsets tried for negative and positive (neutral stays 0): the LoRA's label log-probs span ~10 nats
GRID = np.round(np.arange(-6.0, 6.01, 0.25), 2)


def logprob_matrix(preds: list[dict]) -> np.ndarray:
    """(n, 3) label log-probabilities in LABELS order from predict_local's {pred, logprobs} records."""
    return np.array([[p["logprobs"][lab] for lab in LABELS] for p in preds], dtype=np.float64)


def apply_offsets(logprobs: np.ndarray, offsets: dict[str, float]) -> list[str]:
    """The label each row takes once offsets[label] is added to its log-probability."""
    shift = np.array([offsets.get(lab, 0.0) for lab in LABELS])
    return [LABELS[i] for i in np.argmax(logprobs + shift, axis=1)]


def fit_offsets(logprobs: np.ndarray, labels: list[str], grid=GRID) -> dict[str, float]:
    """The (negative, positive) offsets on `grid` with the best weighted F1 on these rows; among equal scores the
    smallest change (sum of |offset|) wins, so a set that needs none keeps none."""
    best, best_key = {lab: 0.0 for lab in LABELS}, None
    for neg in grid:
        for pos in grid:
            offsets = {"negative": float(neg), "neutral": 0.0, "positive": float(pos)}
            f1 = sentiment_metrics(labels, apply_offsets(logprobs, offsets))["f1_weighted"]
            key = (round(f1, 12), -(abs(neg) + abs(pos)))
            if best_key is None or key > best_key:
                best, best_key = offsets, key
    return best


def out_of_fold(logprobs: np.ndarray, labels: list[str], folds: int = 5, seed: int = 0) -> list[str]:
    """Each row's label under offsets fitted on the other folds (seeded split): an estimate, on the dev set itself,
    of what fitted offsets do on rows they were not fitted on."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    preds = [""] * len(labels)
    for k in range(folds):
        held = order[k::folds]
        rest = sorted(set(order) - set(held))
        offsets = fit_offsets(logprobs[rest], [labels[i] for i in rest])
        for i, label in zip(held, apply_offsets(logprobs[held], offsets)):
            preds[i] = label
    return preds


def read_offsets(path: str | Path) -> dict[str, float]:
    """The offsets saved in a calibration JSON ({"offsets": {label: value}, ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file at {path}; `make sentiment` writes calibration_<set>.json")
    offsets = json.loads(path.read_text(encoding="utf-8")).get("offsets")
    if not isinstance(offsets, dict) or set(offsets) - set(LABELS) or not all(
            isinstance(v, (int, float)) for v in offsets.values()):
        raise ValueError(f"{path}: `offsets` must map labels ({', '.join(LABELS)}) to numbers, got {offsets!r}")
    return {lab: float(offsets.get(lab, 0.0)) for lab in LABELS}
