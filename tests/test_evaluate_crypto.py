"""CryptoLin (crypto-news headlines labelled by three people) in evaluate: the loader, the inter-annotator agreement,
and the pipeline's rows for the predictions the file ships (VADER, FinBERT) and for one annotator."""
import json
import random

import pytest
import torch

import evaluate
from checkpoint import embedded_model_path, save_model
from evaluate.loaders import load_cryptolin, load_labelled
from evaluate.metrics import annotator_agreement, sentiment_metrics
from evaluate.pipeline import _Scorer
from model import ModelArgs, Transformer


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ROW = {"id": 1, "date": "2021-05-01", "text": "Exchange X lists token Y", "label": "positive",
       "annotators": ["positive", "positive", "neutral"], "vader": "neutral", "finbert": "positive"}


def test_agreement_hand_checked():
    rows = [{"label": "positive", "annotators": ["positive", "positive", "neutral"]},
            {"label": "neutral", "annotators": ["negative", "neutral", "positive"]},  # all differ: neutral by rule
            {"label": "negative", "annotators": ["negative"] * 3}]
    assert annotator_agreement(rows) == pytest.approx(6 / 9)
    assert annotator_agreement([]) == 0.0


def test_loader_keeps_annotators_and_shipped_predictions(tmp_path):
    path = _write(tmp_path / "c.jsonl", [ROW, {**ROW, "text": "Hack drains bridge", "label": "Negative",
                                               "annotators": ["negative"] * 3, "vader": "negative"}])
    rows = load_cryptolin(path)
    assert rows[0] == {"text": ROW["text"], "label": "positive", "annotators": ["positive", "positive", "neutral"],
                       "vader": "neutral", "finbert": "positive"}
    assert rows[1]["label"] == "negative" and load_labelled(path) == rows
    # a plain {text, label} JSONL still goes through load_sentiment
    plain = _write(tmp_path / "p.jsonl", [{"text": "a", "label": "neutral"}])
    assert load_labelled(plain) == [{"text": "a", "label": "neutral"}]


@pytest.mark.parametrize("bad, match", [
    ({"annotators": []}, r"c\.jsonl:2: `annotators` must be a non-empty list"),
    ({"annotators": ["positive", "up"]}, r"c\.jsonl:2 annotators: unknown label 'up'"),
    ({"vader": None}, r"c\.jsonl:2 vader: unknown label 'None'"),
    ({"text": " "}, r"c\.jsonl:2: missing or empty text"),
])
def test_loader_names_file_line_and_field(tmp_path, bad, match):
    path = _write(tmp_path / "c.jsonl", [ROW, {**ROW, **bad}])
    with pytest.raises(ValueError, match=match):
        load_cryptolin(path)
    with pytest.raises(FileNotFoundError, match="no CryptoLin file"):
        load_cryptolin(tmp_path / "missing.jsonl")


def test_real_dev_file_counts_and_agreement(shared_data):
    rows = load_cryptolin(shared_data / "crypto-news/cryptolin/cryptolin_dev.jsonl")
    assert len(rows) == 501
    assert [sum(r["label"] == lab for r in rows) for lab in evaluate.LABELS] == [72, 176, 253]  # LICENSES.md
    assert all(len(r["annotators"]) == 3 for r in rows)
    # 1,473 of the 1,503 (headline, annotator) pairs match the majority (the "98%")
    assert annotator_agreement(rows) == pytest.approx(1473 / 1503)
    # the label is the vote of the three, neutral when no two agree or when positive and negative both occur (the
    # corpus' rule: one annotator against two opposite ones defaults to neutral)
    for r in rows:
        a = r["annotators"]
        top = max(set(a), key=a.count)
        split = a.count(top) < 2 or {"positive", "negative"} <= set(a)
        assert r["label"] == ("neutral" if split else top), r


def test_scorer_rows_for_shipped_columns_annotators_and_own_majority(tmp_path):
    rows = load_cryptolin(_write(tmp_path / "c.jsonl", [
        ROW, {**ROW, "label": "negative", "annotators": ["negative", "negative", "negative"], "vader": "negative"},
        {**ROW, "label": "positive", "annotators": ["positive", "neutral", "positive"], "finbert": "neutral"}]))
    scorer = _Scorer(evaluate.PipelineArgs(), [{"text": "t", "label": "neutral"}])
    scored_rows, preds = scorer.predict("VADER", "vader", rows, "crypto")
    assert scored_rows == rows and [p["pred"] for p in preds] == ["neutral", "negative", "neutral"]
    pair_rows, pair_preds = scorer.predict("human", "annotators", rows, "crypto")
    assert len(pair_rows) == len(pair_preds) == 9
    m, _ = evaluate.score_predictions(pair_rows, pair_preds)
    assert m["accuracy"] == pytest.approx(annotator_agreement(rows))
    assert [p["pred"] for p in scorer.predict("own", "own majority", rows, "crypto")[1]] == ["positive"] * 3
    assert [p["pred"] for p in scorer.predict("majority", "majority", rows, "crypto")[1]] == ["neutral"] * 3
    plain = [{"text": "x", "label": "neutral"}]  # TFNS rows: no columns, no annotators -> no row
    assert scorer.predict("VADER", "vader", plain, "tfns") is None
    assert scorer.predict("human", "annotators", plain, "tfns") is None


@pytest.mark.slow
def test_pipeline_scores_cryptolin_beside_the_others(shared_data, tmp_path):
    """A --limit run with a tiny model: the crypto column holds VADER, FinBERT, the set's own majority and the
    annotator rows, each equal to the same figure computed from the sampled rows, and the agreement is printed."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=128,
                                  tie_embeddings=True, max_seq_len=1024))
    try:
        src = embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ckpt = save_model(model, tmp_path / "tiny", format="hf", tokenizer_src=src)
    crypto = shared_data / "crypto-news/cryptolin/cryptolin_dev.jsonl"
    out = tmp_path / "s"
    evaluate.main(["sentiment-pipeline", "--out", str(out), "--limit", "30", "--checkpoint", str(ckpt),
                   "--train-data", str(shared_data / "crypto-news/twitter_financial_news_sentiment/sent_train.csv"),
                   "--tests", f"crypto={crypto}", "--dtype", "float32",
                   "--train-flags", "--max-steps 1 --micro-batch-size 4 --no-pack --lora-r 4 --val-fraction 0"])
    sampled = random.Random(0).sample(load_cryptolin(crypto), 30)  # as the pipeline samples a --limit run
    report = (out / "results.md").read_text()
    for name, column in (("VADER", "vader"), ("FinBERT", "finbert")):
        m = json.loads((out / "eval" / f"{name.lower()}_predictions_shipped_with_cryptolin" / "crypto"
                        / "metrics.json").read_text())
        ref = sentiment_metrics([r["label"] for r in sampled], [r[column] for r in sampled])
        assert m["f1_weighted"] == pytest.approx(ref["f1_weighted"]) and f"| {name} (predictions shipped" in report
    assert f"Inter-annotator agreement on crypto: {annotator_agreement(sampled):.3f}" in report
    assert "| majority class of the set itself |" in report and "| our LoRA zero-shot |" in report
