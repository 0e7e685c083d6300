"""The template crypto headlines (evaluate/headlines.py) that `make sentiment` mixes into its training rows: distinct,
balanced, seeded, never a CryptoLin headline, and carrying signal a plain reference classifier (scikit-learn's TF-IDF
+ logistic regression) can carry over to the headlines people labelled."""
import json

import pytest

import evaluate
from evaluate.headlines import TEMPLATES, headlines, main
from evaluate.loaders import LABELS, load_cryptolin
from evaluate.metrics import sentiment_metrics


def test_distinct_balanced_and_seeded():
    rows = headlines(600, seed=1)
    assert len({r["text"] for r in rows}) == 600
    assert [sum(r["label"] == lab for r in rows) for lab in LABELS] == [200, 200, 200]
    assert rows == headlines(600, seed=1) and rows != headlines(600, seed=2)
    assert all(not r["text"][0].islower() or r["text"][1].isupper() for r in rows)  # eToro, dYdX stay
    assert not any("{" in r["text"] or "}" in r["text"] for r in rows)


def test_every_template_fills_and_every_label_has_many():
    assert {lab for lab, _ in TEMPLATES} == set(LABELS)
    assert min(sum(lab == x for x, _ in TEMPLATES) for lab in LABELS) >= 25
    texts = {r["text"] for r in headlines(3000)}
    # each template's fixed words show up: none is dead (a typo'd slot would raise KeyError in _fill)
    for _, template in TEMPLATES:
        fixed = max(template.replace("{", "}").split("}")[::2], key=len).strip(" ,.:").lower()
        assert any(fixed in t.lower() for t in texts), template


def test_too_many_rows_is_a_clear_error(monkeypatch):
    import evaluate.headlines as module
    monkeypatch.setattr(module, "TEMPLATES", tuple((lab, f"{lab} news") for lab in LABELS))
    with pytest.raises(ValueError, match="cannot give 100 distinct headlines"):
        headlines(100)  # 3 fixed texts x 9 source tags x 2 cases


def test_cli_writes_jsonl(tmp_path):
    main(["--rows", "30", "--out", str(tmp_path / "h.jsonl")])
    rows = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(set(r) == {"text", "label"} for r in rows)


def test_convert_mixes_headlines_into_train_only(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"tweet {i}", "label": LABELS[i % 3]}) + "\n" for i in range(60)))
    train_file, dev_file = evaluate.convert(src, tmp_path / "data", dev_fraction=0.2, crypto_headlines=30)
    train = [json.loads(x) for x in train_file.read_text().splitlines()]
    dev = [json.loads(x) for x in dev_file.read_text().splitlines()]
    assert len(train) == 48 + 30 and len(dev) == 12
    heads = [r for r in train if not r["input"].startswith("tweet ")]
    assert len(heads) == 30 and {r["instruction"] for r in heads} == {evaluate.HEADLINE_INSTRUCTION}
    assert {r["instruction"] for r in train if r not in heads} == {evaluate.INSTRUCTION}
    assert all(r["text"].startswith("tweet ") for r in dev)  # dev stays the training file's own rows


def test_never_a_cryptolin_headline_and_the_signal_carries_over(shared_data):
    """No generated headline is a dev headline, and a TF-IDF classifier trained on the templates alone beats the dev
    set's own majority class by a wide margin (0.569 against 0.339 weighted F1 when written): the templates teach
    something about the register people labelled, not a copy of it."""
    sk = pytest.importorskip("sklearn.linear_model")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    dev = load_cryptolin(shared_data / "crypto-news/cryptolin/cryptolin_dev.jsonl")
    rows = headlines(3000)
    assert not {r["text"].lower() for r in rows} & {r["text"].lower() for r in dev}
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                        sk.LogisticRegression(C=10.0, max_iter=2000))
    clf.fit([r["text"] for r in rows], [r["label"] for r in rows])
    f1 = sentiment_metrics([r["label"] for r in dev], list(clf.predict([r["text"] for r in dev])))["f1_weighted"]
    majority = sentiment_metrics([r["label"] for r in dev], ["positive"] * len(dev))["f1_weighted"]
    assert f1 > majority + 0.15, (f1, majority)


def test_headline_prompt_is_its_own_instruction():
    assert evaluate.sentiment_instruction(prompt="headline") == evaluate.HEADLINE_INSTRUCTION
    assert evaluate.sentiment_instruction() == evaluate.INSTRUCTION != evaluate.HEADLINE_INSTRUCTION
    shots = [{"text": "BTC up", "label": "positive"}]
    assert evaluate.sentiment_instruction(shots, "headline").startswith(evaluate.HEADLINE_INSTRUCTION + "\n\nExamples")
    assert evaluate.to_alpaca({"text": "a", "label": "neutral"}, "headline")["instruction"] == \
        evaluate.HEADLINE_INSTRUCTION
    with pytest.raises(ValueError, match="prompt='tweet' must be one of news, headline"):
        evaluate.sentiment_instruction(prompt="tweet")


def test_the_headline_sets_are_scored_with_the_headline_prompt(monkeypatch):
    """The pipeline's scorer asks a set named in --headline-sets with the headline prompt and the others with the
    news prompt: the prompt each was trained under."""
    import evaluate.pipeline as pipeline
    seen = []
    monkeypatch.setattr(pipeline, "load_generator", lambda *a: object())
    monkeypatch.setattr(pipeline, "predict_local", lambda gen, texts, shots, desc, prompt: seen.append(prompt) or
                        [{"pred": "neutral"} for _ in texts])
    scorer = pipeline._Scorer(evaluate.PipelineArgs(), [{"text": "t", "label": "neutral"}])
    rows = [{"text": "x", "label": "neutral"}]
    for name in ("tfns", "crypto", "fpb"):
        scorer.predict("our LoRA", ("adapter", ()), rows, name)
    assert seen == ["news", "headline", "news"]
