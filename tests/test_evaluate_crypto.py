"""CryptoLin (crypto-news headlines labelled by three people) in evaluate: the loader, the inter-annotator agreement,
the pipeline's rows for the predictions the file ships (VADER, FinBERT) and for one annotator, and the label-prior
calibration chosen on a dev set (evaluate/calibrate.py)."""
import json
import random

import numpy as np
import pytest
import torch

import evaluate
import evaluate.calibrate as calibrate_module
from checkpoint import embedded_model_path, save_model
from evaluate.calibrate import apply_offsets, fit_offsets, logprob_matrix, out_of_fold, read_offsets
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
    calibration = json.loads((out / "calibration_crypto.json").read_text())
    assert set(calibration["offsets"]) == set(evaluate.LABELS) and calibration["rows"] == 30
    assert "| our LoRA + crypto label prior (fitted on crypto, out-of-fold) |" in report
    assert "Label prior for crypto: offsets" in report


# ---------------------------------------------------------------------------------------------- calibration

def _shifted_logprobs(n, shift, seed=0):
    """Label log-probs whose truth is the argmax after adding `shift`: a model with a wrong prior."""
    rng = np.random.default_rng(seed)
    logprobs = rng.normal(size=(n, 3)) * 2
    truth = [evaluate.LABELS[i] for i in np.argmax(logprobs + np.array(shift), axis=1)]
    return logprobs, truth


def test_fit_offsets_recovers_a_prior_shift_and_keeps_none_when_none_is_needed():
    logprobs, truth = _shifted_logprobs(300, [1.0, 0.0, 2.5])
    offsets = fit_offsets(logprobs, truth)
    assert sentiment_metrics(truth, apply_offsets(logprobs, offsets))["f1_weighted"] == pytest.approx(1.0)
    assert offsets["neutral"] == 0.0 and abs(offsets["positive"] - 2.5) <= 0.5 and abs(offsets["negative"] - 1) <= 0.5
    plain, plain_truth = _shifted_logprobs(300, [0.0, 0.0, 0.0], seed=1)
    assert fit_offsets(plain, plain_truth) == {"negative": 0.0, "neutral": 0.0, "positive": 0.0}
    preds = [{"logprobs": dict(zip(evaluate.LABELS, row))} for row in logprobs.tolist()]
    assert np.array_equal(logprob_matrix(preds), logprobs)


def test_out_of_fold_predicts_every_row_from_the_other_folds(monkeypatch):
    logprobs, truth = _shifted_logprobs(200, [0.0, 0.0, 3.0])
    oof = out_of_fold(logprobs, truth, folds=4)
    assert len(oof) == 200 and set(oof) <= set(evaluate.LABELS)
    assert sentiment_metrics(truth, oof)["f1_weighted"] > 0.9  # a shift fitted on 150 rows holds on the other 50
    seen = []
    real = calibrate_module.fit_offsets
    monkeypatch.setattr(calibrate_module, "fit_offsets",
                        lambda lp, labels: seen.append(len(labels)) or real(lp, labels))
    out_of_fold(logprobs, truth, folds=4)
    assert seen == [150] * 4  # each fit leaves its fold out


def test_read_offsets_and_sentiment_cli_applies_them(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"offsets": {"negative": -1, "positive": 2.5}}))
    assert read_offsets(path) == {"negative": -1.0, "neutral": 0.0, "positive": 2.5}
    path.write_text(json.dumps({"offsets": {"bullish": 1}}))
    with pytest.raises(ValueError, match="`offsets` must map labels"):
        read_offsets(path)
    with pytest.raises(FileNotFoundError, match="no calibration file"):
        read_offsets(tmp_path / "none.json")
    with pytest.raises(ValueError, match="--offsets shifts a local model"):
        evaluate.SentimentArgs(data="x", api_model="gpt", offsets=str(path))


def test_sentiment_with_offsets_moves_every_label(tmp_path, capsys):
    """A huge positive offset makes every prediction positive; the log-probs saved stay the model's own."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=128,
                                  tie_embeddings=True, max_seq_len=1024))
    try:
        src = embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ckpt = save_model(model, tmp_path / "tiny", format="hf", tokenizer_src=src)
    data = _write(tmp_path / "d.jsonl", [{"text": f"headline {i}", "label": evaluate.LABELS[i % 3]} for i in range(6)])
    (tmp_path / "c.json").write_text(json.dumps({"offsets": {"positive": 100.0}}))
    runs = {}
    for name, extra in (("plain", []), ("shifted", ["--offsets", str(tmp_path / "c.json")])):
        evaluate.main(["sentiment", "--data", str(data), "--checkpoint", str(ckpt), "--dtype", "float32",
                       "--out", str(tmp_path / name), *extra])
        runs[name] = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert [p["pred"] for p in runs["shifted"]] == ["positive"] * 6
    assert [p["logprobs"] for p in runs["shifted"]] == [p["logprobs"] for p in runs["plain"]]
