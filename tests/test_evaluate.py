"""evaluate (the package): sentiment loaders, metrics against scikit-learn, option scoring, the sentiment pipeline."""
import json

import numpy as np
import pytest

import evaluate
from evaluate import LABELS, load_sentiment, sentiment_metrics


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_hand_checked():
    # truth: neg neg neu neu neu pos ; predicted: neg neu neu neu pos pos
    truth = ["negative", "negative", "neutral", "neutral", "neutral", "positive"]
    pred = ["negative", "neutral", "neutral", "neutral", "positive", "positive"]
    m = sentiment_metrics(truth, pred)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # negative: p=1, r=1/2, f1=2/3 ; neutral: p=2/3, r=2/3, f1=2/3 ; positive: p=1/2, r=1, f1=2/3
    assert m["per_class"]["negative"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["positive"]["precision"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(2 / 3)
    assert m["f1_weighted"] == pytest.approx(2 / 3)


def test_metrics_class_never_predicted_scores_zero():
    m = sentiment_metrics(["negative", "positive", "neutral"], ["neutral", "neutral", "neutral"])
    assert m["per_class"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["neutral"]["f1"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(0.5 / 3)


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_on_random_labels(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    # skewed and sometimes missing classes, to exercise the zero-division paths
    truth = list(rng.choice(LABELS, n, p=rng.dirichlet([1, 1, 1])))
    pred = list(rng.choice(LABELS, n, p=rng.dirichlet([0.5, 0.5, 0.5])))
    m = sentiment_metrics(truth, pred)
    kw = dict(labels=list(LABELS), zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["f1_weighted"] == pytest.approx(f1_score(truth, pred, average="weighted", **kw))
    assert m["f1_macro"] == pytest.approx(f1_score(truth, pred, average="macro", **kw))
    p, r, f, s = precision_recall_fscore_support(truth, pred, **kw)
    for i, label in enumerate(LABELS):
        assert m["per_class"][label] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert m["confusion"] == confusion_matrix(truth, pred, labels=list(LABELS)).tolist()


# ---------------------------------------------------------------------------------------------- loaders

def test_load_three_formats(tmp_path):
    csv_ = tmp_path / "a.csv"
    csv_.write_text('text,label\n"multi\nline, tweet",0\nup we go,1\nflat,2\n')
    assert load_sentiment(csv_) == [{"text": "multi\nline, tweet", "label": "negative"},
                                    {"text": "up we go", "label": "positive"}, {"text": "flat", "label": "neutral"}]
    fpb = tmp_path / "s.txt"
    # latin-1 like the original release, and an @ inside the sentence: split on the last one
    fpb.write_bytes("Caf\xe9 sales @ EUR 5 mn rose .@positive\nNo change .@neutral\n".encode("latin-1"))
    assert load_sentiment(fpb) == [{"text": "Caf\xe9 sales @ EUR 5 mn rose .", "label": "positive"},
                                   {"text": "No change .", "label": "neutral"}]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "BTC dumps", "label": "Bearish"}) + "\n\n"
                  + json.dumps({"text": "ok", "label": "neutral"}) + "\n")
    assert load_sentiment(jl) == [{"text": "BTC dumps", "label": "negative"}, {"text": "ok", "label": "neutral"}]


@pytest.mark.parametrize("name, content, match", [
    ("e.csv", "", r"e\.csv:1: empty file"),
    ("h.csv", "sentence,label\nx,0\n", r"h\.csv:1: .*`text`"),
    ("l.csv", "text,label\nfine,0\nbad,7\n", r"l\.csv:3: unknown label '7'"),
    ("t.csv", "text,label\nfine,0\n ,1\n", r"t\.csv:3: missing or empty text"),
    ("o.csv", "text,label\n", r"o\.csv:2: no data rows"),
    ("j.jsonl", '{"text": "a", "label": "neutral"}\n{"label": "neutral"}\n', r"j\.jsonl:2: missing or empty text"),
    ("k.jsonl", '{"text": "a", "label": "meh"}\n', r"k\.jsonl:1: unknown label 'meh'"),
    ("m.jsonl", '{"text": "a", "label": "neutral"}\n{oops\n', r"m\.jsonl:2: invalid JSON"),
    ("p.txt", "Fine .@neutral\nNo label here\n", r"p\.txt:2: expected `sentence@label`"),
    ("q.txt", "Fine .@neutral\nOdd .@sideways\n", r"q\.txt:2: unknown label 'sideways'"),
])
def test_load_bad_input_names_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_sentiment(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_sentiment(tmp_path / "nope.csv")


def test_load_real_sets(shared_data):
    base = shared_data / "crypto-news"
    for rel, n, counts in [
        ("twitter_financial_news_sentiment/sent_valid.csv", 2388, (347, 1566, 475)),
        ("financial_phrasebank/Sentences_AllAgree.txt", 2264, (303, 1391, 570)),
    ]:
        rows = load_sentiment(base / rel)
        assert len(rows) == n
        assert tuple(sum(r["label"] == lab for r in rows) for lab in LABELS) == counts


# ---------------------------------------------------------------------------------------------- prompt + scoring

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaMA with the embedded SmolLM2 tokenizer and chat template, saved as an HF folder."""
    import torch

    from checkpoint import embedded_model_path, save_model
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=128,
                                  tie_embeddings=True, max_seq_len=1024))
    try:
        src = embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return save_model(model, tmp_path_factory.mktemp("tiny"), format="hf", tokenizer_src=src)


@pytest.fixture(scope="module")
def tiny_gen(tiny_checkpoint):
    return evaluate.load_generator(str(tiny_checkpoint), dtype="float32")


@pytest.mark.parametrize("native, expected", [(False, "float32"), (True, "bfloat16")])
def test_dtype_auto_follows_the_precision_policy(tiny_checkpoint, monkeypatch, native, expected):
    """Every dtype field defaults to auto, and auto loads the weights in precision.py's choice for this CPU (faked
    here: fp32 without native bf16, as on an AVX2-only CPU); the training flags leave it to train_ddp.py too."""
    import torch

    import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: (native, "faked for the test"))
    assert evaluate.SentimentArgs(data="x").dtype == "auto"
    assert evaluate.NewsArgs().dtype == evaluate.PipelineArgs().dtype == "auto"
    assert "--precision auto" in evaluate.TRAIN_FLAGS
    gen = evaluate.load_generator(str(tiny_checkpoint))
    assert next(gen.model.parameters()).dtype == getattr(torch, expected)
    assert next(evaluate.load_generator(str(tiny_checkpoint), dtype="fp32").model.parameters()).dtype == torch.float32


def test_training_record_renders_to_the_evaluation_prompt(tiny_gen):
    """The converter's Alpaca record, encoded by data.py for training, starts with exactly the tokens the evaluator
    scores after, and its targets are the label word then EOS."""
    from data import IGNORE, encode_example

    tok = tiny_gen.tokenizer
    row = {"text": "$TSLA - Tesla cut at Goldman https://t.co/x", "label": "negative"}
    ex = encode_example(tok, evaluate.to_alpaca(row), max_len=512)
    prompt = tiny_gen.encode(evaluate.sentiment_prompt(row["text"], tok))
    answer = tok.encode("negative")
    assert ex.tokens == prompt + answer
    assert [t for t in ex.labels if t != IGNORE] == answer + [tok.eos_id]
    # the label words are one token each, so score_options reads them from one position
    assert all(len(tok.encode(w)) == 1 for w in LABELS)


def test_training_record_has_no_default_system_turn(tiny_gen, tmp_path):
    """The record's empty `system` replaces SmolLM2's default system turn (16 tokens fewer an example, in training
    and scoring alike); data.py validates the field and keeps it through load_records."""
    from data import encode_example, format_prompt, load_records

    tok = tiny_gen.tokenizer
    rec = evaluate.to_alpaca({"text": "BTC up 5%", "label": "positive"})
    with_default = tok.encode(format_prompt(tok, rec["instruction"], rec["input"]))
    ours = encode_example(tok, rec, max_len=512).tokens
    assert tok.system_prompt not in evaluate.sentiment_prompt(rec["input"], tok)
    assert len(with_default) - (len(ours) - 1) == 16  # ours also holds the label word
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert load_records(path) == [rec]
    path.write_text(json.dumps({**rec, "system": 3}) + "\n")
    with pytest.raises(ValueError, match="'system' must be a string"):
        load_records(path)


def test_shots_share_one_prefix_and_stay_balanced(tiny_gen):
    rows = [{"text": f"{lab} example {i}", "label": lab} for lab in LABELS for i in range(4)]
    shots = evaluate.pick_shots(rows, 3, seed=1)
    assert sorted(s["label"] for s in shots) == sorted(LABELS)
    assert shots == evaluate.pick_shots(rows, 3, seed=1)
    a, b = (evaluate.sentiment_prompt(t, tiny_gen.tokenizer, shots) for t in ("first tweet", "second"))
    instruction = evaluate.sentiment_instruction(shots)
    assert instruction in a and instruction in b and all(s["text"] in instruction for s in shots)
    with pytest.raises(ValueError, match="no 'positive' example"):
        evaluate.pick_shots([r for r in rows if r["label"] != "positive"], 3)


def test_prediction_is_the_best_label_of_a_full_forward(tiny_gen):
    """predict_local (score_options: shared prefix once, batched, bf16-free here) ranks the labels like the summed
    log-probs of prompt + label from one plain forward pass per row."""
    import torch

    texts = ["Stocks rally after earnings beat", "$AAPL flat", "Bank shares plunge on fraud probe",
             "A much longer tweet about the central bank keeping rates unchanged for the third meeting in a row"]
    shots = [{"text": "Up 5%", "label": "positive"}, {"text": "Down 9%", "label": "negative"},
             {"text": "Meeting at 10", "label": "neutral"}]
    for k in (0, 3):
        got = evaluate.predict_local(tiny_gen, texts, shots[:k], chunk=3)
        for text, g in zip(texts, got):
            ids = tiny_gen.encode(evaluate.sentiment_prompt(text, tiny_gen.tokenizer, shots[:k]))
            ref = []
            for word in LABELS:
                full = ids + tiny_gen.tokenizer.encode(word)
                with torch.no_grad():
                    logp = tiny_gen.model(torch.tensor([full]))[0].log_softmax(-1)
                ref.append(sum(logp[t - 1, full[t]].item() for t in range(len(ids), len(full))))
            assert [g["logprobs"][w] for w in LABELS] == pytest.approx(ref, abs=1e-4)
            assert g["pred"] == LABELS[int(np.argmax(ref))]


class _FakeLLM:
    """Duck-typed llm.LLM: answers from a table, in order, like LLM.map."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def chat(self, messages, **params):
        from llm import Completion

        self.seen.append(messages[-1]["content"])
        return Completion(self.answers[len(self.seen) - 1], "stop", 1, 1)

    def map(self, fn, items, desc=None):
        return [fn(x) for x in items]


def test_api_answers_are_parsed_and_unparsed_ones_count_wrong():
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"},
            {"text": "c", "label": "neutral"}, {"text": "d", "label": "neutral"}]
    llm = _FakeLLM(["Positive.", "The sentiment is BEARISH", "I cannot tell", "neutral"])
    preds = evaluate.predict_api(llm, [r["text"] for r in rows])
    assert [p["pred"] for p in preds] == ["positive", "negative", None, "neutral"]
    assert llm.seen[0] == f"{evaluate.INSTRUCTION}\n\na"
    metrics, records = evaluate.score_predictions(rows, preds)
    assert metrics["accuracy"] == pytest.approx(3 / 4) and metrics["unparsed"] == 1
    assert records[2]["answer"] == "I cannot tell" and records[2]["pred"] is None


def test_parse_label():
    assert evaluate.parse_label("Answer: neutral") == "neutral"
    assert evaluate.parse_label("bullish!") == "positive"
    assert evaluate.parse_label("nonnegative") is None
    assert evaluate.parse_label("") is None


# ---------------------------------------------------------------------------------------------- CLI, converter

def _labelled_jsonl(path, n):
    words = {"negative": "plunge cut loss", "neutral": "meeting holds schedule", "positive": "beat rally upgrade"}
    with path.open("w") as f:
        for i in range(n):
            lab = LABELS[i % 3]
            f.write(json.dumps({"text": f"#{i} {words[lab]}", "label": lab}) + "\n")
    return path


def test_cli_sentiment_writes_predictions_and_metrics(tiny_checkpoint, tmp_path, capsys):
    data = _labelled_jsonl(tmp_path / "set.jsonl", 10)
    out = tmp_path / "out"
    evaluate.main(["sentiment", "--data", str(data), "--checkpoint", str(tiny_checkpoint), "--limit", "7",
                   "--shots", "2", "--shots-data", str(data), "--dtype", "float32", "--out", str(out)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"n", "accuracy", "f1_weighted", "f1_macro"} and line["n"] == 7
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7 and all(p["pred"] in LABELS and set(p["logprobs"]) == set(LABELS) for p in preds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.array(metrics["confusion"]).sum() == 7 and set(metrics["per_class"]) == set(LABELS)
    assert metrics["accuracy"] == pytest.approx(np.mean([p["pred"] == p["label"] for p in preds]))


@pytest.mark.parametrize("argv, match", [
    (["--shots", "3"], "needs --shots-data"),
    (["--limit", "-1"], "must be >= 0"),
    (["--api-model", "gpt-4o", "--adapter", "x"], "cannot take"),
])
def test_cli_rejects_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["sentiment", "--data", "x.csv", *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_convert_splits_dev_from_train_only(tmp_path):
    src = _labelled_jsonl(tmp_path / "train.jsonl", 60)
    train_file, dev_file = evaluate.convert(src, tmp_path / "data", dev_fraction=0.2, seed=3)
    train = [json.loads(x) for x in train_file.read_text().splitlines()]
    dev = load_sentiment(dev_file)
    assert len(train) == 48 and len(dev) == 12
    assert all(set(r) == {"system", "instruction", "input", "output"} and r["output"] in LABELS for r in train)
    assert [sum(r["label"] == lab for r in dev) for lab in LABELS] == [4, 4, 4]  # stratified
    assert not {r["input"] for r in train} & {r["text"] for r in dev}
    assert {r["input"] for r in train} | {r["text"] for r in dev} == {r["text"] for r in load_sentiment(src)}


# ---------------------------------------------------------------------------------------------- make sentiment

@pytest.mark.slow
def test_sentiment_pipeline_end_to_end(shared_data, tiny_checkpoint, tmp_path):
    """`make sentiment` on 40 rows of each set with a tiny model and 3 training steps: every stage runs, the report
    has every system and set, and a second run resumes from what is there instead of training again."""
    base = shared_data / "crypto-news"
    argv = ["sentiment-pipeline", "--out", str(tmp_path / "s"), "--limit", "40", "--checkpoint", str(tiny_checkpoint),
            "--train-data", str(base / "twitter_financial_news_sentiment/sent_train.csv"),
            "--tests", f"tfns={base / 'twitter_financial_news_sentiment/sent_valid.csv'},"
                       f"fpb={base / 'financial_phrasebank/Sentences_AllAgree.txt'}",
            "--train-flags", "--max-steps 3 --micro-batch-size 4 --lora-r 4 --val-fraction 0 --save-every 2",
            "--dtype", "float32"]
    evaluate.main(argv)
    out = tmp_path / "s"
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "sentiment.png").stat().st_size > 0
    n_train = len((out / "data" / "train.jsonl").read_text().splitlines())
    n_dev = len((out / "data" / "dev.jsonl").read_text().splitlines())
    # 40 sampled rows, 5% of each label (rounded) held out as dev; a --limit run adds limit // 3 template headlines
    assert n_train + n_dev == 40 + 13 and n_dev >= 1
    report = (out / "results.md").read_text()
    for system in ("majority class", "TF-IDF + logistic regression", "base zero-shot", "base 3-shot",
                   "our LoRA zero-shot", "FinGPT v3.3", "GPT-4"):
        assert f"| {system}" in report
    preds = (out / "eval" / "our_lora_zero_shot" / "tfns" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 40
    trained = (out / "adapter" / "train_time.json").stat().st_mtime_ns
    (out / "results.md").unlink()
    evaluate.main(argv)
    assert (out / "adapter" / "train_time.json").stat().st_mtime_ns == trained
    assert (out / "results.md").read_text() == report



def test_python_m_evaluate_runs_the_package():
    """`python -m evaluate` (evaluate/__main__.py) is the command; without a subcommand it prints the usage."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "evaluate"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "usage: python -m evaluate {sentiment,sentiment-pipeline,news}" in done.stderr
