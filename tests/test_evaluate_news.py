"""python -m evaluate news: QA, extraction and event metrics against hand-checked values and rouge-score /
scikit-learn; a tiny-model run of all four systems; oracle models (local and API) that must score 1.0 through the
whole pipeline."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from evaluate import (NewsArgs, coin_counts, event_metrics, evaluate_news, load_news, normalize_answer,
                      parse_extraction, qa_scores, token_f1)
from generate import Result
from llm import Completion

DATA = Path(__file__).resolve().parent.parent / "data"
ARTICLES, LABELS = DATA / "sample_news.jsonl", DATA / "sample_news_labels.jsonl"


@pytest.fixture(scope="module")
def sample():
    if not LABELS.is_file():
        pytest.skip(f"{LABELS} missing")
    return load_news(ARTICLES, LABELS)[1]  # the labelled articles


@pytest.fixture(scope="module")
def hashing_index(tmp_path_factory, sample):
    """A dependency-free index over the sample corpus (the MiniLM one is tested in tests/retrieval)."""
    from retrieval.chunk import ChunkArgs
    from retrieval.index import IndexArgs, build_index

    out = tmp_path_factory.mktemp("news") / "index"
    build_index(IndexArgs(articles=ARTICLES, out=out, embedder="hashing:1024"), ChunkArgs())
    return out


# ---------------------------------------------------------------------------------------------- QA metrics

def test_token_f1_hand_checked():
    assert normalize_answer("The  Meridian, Bitcoin-Trust!") == "meridian bitcointrust"  # SQuAD joins across '-'
    assert token_f1("about 41 million dollars", "About $41 million.") == pytest.approx(6 / 7)  # p=3/4, r=1
    # "the" is dropped: prediction {ceo, is, mara, quist} vs {mara, quist}: p=1/2, r=1
    assert token_f1("The CEO is Mara Quist", "Mara Quist") == pytest.approx(2 / 3)
    assert token_f1("bitcoin bitcoin", "bitcoin") == pytest.approx(2 / 3)  # a repeated token matches once
    assert token_f1("I do not know", "MBTC") == 0.0
    assert token_f1("the", "MBTC") == 0.0 and token_f1("", "") == 1.0  # empty after normalising: SQuAD v2 rule


def test_qa_scores_drop_citations_and_contain_whole_tokens():
    assert qa_scores("About $41 million [1].", "about $41 million") == {"f1": 1.0, "rouge_l": 1.0, "contains": True}
    assert qa_scores("They took 2,300 ETH [1, 2]", "2,300 ETH")["contains"]
    assert not qa_scores("300 coins", "30")["contains"]  # "30" is not a token of "300 coins"
    assert not qa_scores("", "MBTC")["contains"]


@pytest.mark.reference
def test_rouge_l_matches_rouge_score_on_real_and_random_answers(sample):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    pairs = []
    for item in sample:
        words = item["text"].split()
        for p in item["gold"]["qa"]:
            ref = p["answer"]
            shuffled = ref.split()
            rng.shuffle(shuffled)
            start = rng.randrange(len(words))
            pairs += [(f"The answer is {ref} [1].", ref), (" ".join(shuffled), ref),
                      (" ".join(words[start:start + rng.randint(1, 30)]), ref)]
    vocab = "btc eth the a 41 million $ 30% tax quist mara über 2,300".split()
    pairs += [(" ".join(rng.choices(vocab, k=rng.randint(0, 12))), " ".join(rng.choices(vocab, k=rng.randint(0, 6))))
              for _ in range(100)]
    for answer, ref in pairs:
        expected = scorer.score(ref, re.sub(r"\s*\[\d+(?:\s*,\s*\d+)*\]", "", answer).strip())["rougeL"].fmeasure
        assert qa_scores(answer, ref)["rouge_l"] == pytest.approx(expected, abs=1e-12), (answer, ref)


# ---------------------------------------------------------------------------------------------- extraction

def test_parse_extraction_json_validity():
    obj, err = parse_extraction('Sure.\n```json\n{"event_type": "hack", "coins": [{"name": "Ether", "ticker": "ETH"}]}'
                                '\n```')
    assert err is None and obj == {"event_type": "hack", "coins": [{"name": "Ether", "ticker": "ETH"}]}
    assert parse_extraction('{"event_type": "etf", "coins": ["BTC", {"name": "X", "ticker": null}]}')[1] is None
    # an unknown event type is valid JSON, scored as a wrong event; the last valid object wins
    assert parse_extraction('{"a": 1} then {"event_type": "airdrop", "coins": []}')[0]["event_type"] == "airdrop"
    for bad, reason in [('{"coins": []}', "event_type"), ('{"event_type": 3, "coins": []}', "expected string"),
                        ('{"event_type": "hack", "coins": [{"ticker": "ETH"}]}', "name"),
                        ('{"event_type": "hack", "coins": [{"name"', "no JSON object"), ("no json", "no JSON")]:
        obj, err = parse_extraction(bad)
        assert obj is None and reason in err, (bad, err)


def test_coin_counts_hand_checked():
    gold = [{"name": "Ether", "ticker": "ETH"}, {"name": "USD Coin", "ticker": "USDC"}]
    pred = [{"name": "Ethereum", "ticker": "eth"}, "usd coin", "$ETH", {"name": "Bitcoin", "ticker": "BTC"}, "btc",
            {"name": "Solana"}]
    # ETH (by ticker, three times) and USDC (by name) found; BTC (twice) and Solana are false positives
    assert coin_counts(pred, gold) == (2, 2, 0)
    assert coin_counts([], gold) == (0, 0, 2)
    assert coin_counts(["Ether"], gold) == (1, 0, 1)


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(3))
def test_event_metrics_match_sklearn(seed):
    from sklearn.metrics import accuracy_score, f1_score

    from annotate.schema import EVENT_TYPES

    rng = random.Random(seed)
    gold = [rng.choice(EVENT_TYPES[:5]) for _ in range(40)]
    pred = [rng.choice(EVENT_TYPES + [None, "airdrop"]) for _ in range(40)]
    m = event_metrics(gold, pred)
    mapped = [p if p in EVENT_TYPES else "(invalid)" for p in pred]
    present = sorted(set(gold) | (set(mapped) - {"(invalid)"}))
    assert m["event_accuracy"] == pytest.approx(accuracy_score(gold, mapped))
    assert m["event_f1_macro"] == pytest.approx(f1_score(gold, mapped, labels=present, average="macro",
                                                         zero_division=0))


# ---------------------------------------------------------------------------------------------- inputs

def test_load_news_joins_on_url_and_names_bad_lines(tmp_path, sample):
    assert len(sample) == 30 and all(len(it["gold"]["qa"]) == 2 for it in sample)
    arts, labels = tmp_path / "a.jsonl", tmp_path / "l.jsonl"
    arts.write_text(json.dumps({"url": "u1", "title": "T", "text": "x"}) + "\n"
                    + json.dumps({"url": "u2", "text": "unlabelled, still indexed"}) + "\n")
    good = {"url": "u1", "sentiment": "neutral", "event_type": "other", "coins": [], "qa": []}
    labels.write_text(json.dumps(good) + "\n")
    corpus, items = load_news(arts, labels)
    assert len(corpus) == 2 and [it["url"] for it in items] == ["u1"]
    for bad, match in [({**good, "url": "u9"}, r"l\.jsonl:1: url u9 is not in"),
                       ({**good, "event_type": "airdrop"}, r"l\.jsonl:1: event_type='airdrop'"),
                       ({**good, "sentiment": "bullish"}, "sentiment='bullish'"),
                       ({**good, "qa": [{"question": "q"}]}, "`qa` must be")]:
        labels.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match):
            load_news(arts, labels)
    with pytest.raises(FileNotFoundError, match="--labels"):
        load_news(arts, tmp_path / "missing.jsonl")


def test_news_args_validation():
    with pytest.raises(ValueError, match="need --adapter"):
        NewsArgs(systems=("fine-tuned",))
    with pytest.raises(ValueError, match="systems=rag unknown"):
        NewsArgs(systems=("base", "rag"))
    with pytest.raises(ValueError, match="need --api-model"):
        NewsArgs(systems=("api+retrieval",))
    assert NewsArgs().selected() == ["base", "base+retrieval"]
    assert NewsArgs(adapter="a", api_model="m").selected() == list(evaluate.NEWS_SYSTEMS)
    with pytest.raises(SystemExit):
        evaluate.main(["news", "--max-new-tokens", "0"])


# ---------------------------------------------------------------------------------------------- whole runs

def _oracle_answer(prompt: str, items: list[dict]) -> str:
    """What a perfect model would answer to one of the evaluation's prompts."""
    for it in items:
        for p in it["gold"]["qa"]:
            if f"Question: {p['question']}" in prompt:
                return f"{p['answer']} [1]" if "excerpts" in prompt else p["answer"]
    [it] = [it for it in items if it["title"] in prompt]  # an extraction prompt holds its article
    return json.dumps({"event_type": it["gold"]["event_type"], "coins": it["gold"]["coins"]})


class OracleGenerator:
    """Stands in for generate.Generator: answers from the gold labels, so every score must be 1.0."""

    def __init__(self, tokenizer, items):
        self.tokenizer, self.items = tokenizer, items

    def encode(self, prompt, chat=False):
        return self.tokenizer.encode(prompt)

    def generate_ids(self, ids, args):
        return [Result(_oracle_answer(self.tokenizer.decode(i), self.items), [], "stop", len(i), 0) for i in ids]

    def score_options(self, prompts, options):
        rows = []
        for prompt in prompts:
            [it] = [it for it in self.items if it["title"] in prompt]
            rows.append([0.0 if o == it["gold"]["sentiment"] else -5.0 for o in options])
        return torch.tensor(rows)


class OracleLLM:
    """Stands in for llm.LLM (chat + map) with the same perfect answers."""

    def __init__(self, items):
        self.items = items

    def chat(self, messages, **params):
        content = messages[-1]["content"]
        if content.startswith(evaluate.INSTRUCTION):  # the sentiment question: answered in words
            [it] = [it for it in self.items if it["text"] in content]
            return Completion(f"It is {it['gold']['sentiment']}.", "stop", 0, 0)
        return Completion(_oracle_answer(content, self.items), "stop", 0, 0)

    def map(self, fn, items, desc=None):
        return [fn(x) for x in items]


def _check_outputs(result: dict, systems: list[str], n_articles: int):
    assert list(result["systems"]) == systems
    table = Path(result["report"]).read_text()
    for s in systems:
        assert f"| {s} |" in table
    for _, header in evaluate.NEWS_METRICS:
        assert f" {header} |" in table
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preds = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    for s in systems:
        tasks = [p["task"] for p in preds if p["system"] == s]
        expected = {"qa": 2 * n_articles} if "+" in s else {"sentiment": n_articles, "extraction": n_articles,
                                                          "qa": 2 * n_articles}
        assert {t: tasks.count(t) for t in set(tasks)} == expected
    assert json.loads(Path(result["metrics"]).read_text())["systems"] == result["systems"]
    return preds


def test_oracle_models_score_one_through_the_pipeline(tmp_path, sample, hashing_index):
    from checkpoint import embedded_model_path, load_tokenizer

    try:
        embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    items = sample[:5]
    oracle = OracleGenerator(load_tokenizer(), items)
    # a small budget splits 5 articles / 10 questions into several batches: answers must find their way back from
    # length-sorted batches
    args = NewsArgs(articles=str(ARTICLES), labels=str(LABELS), out=str(tmp_path / "local"), index=str(hashing_index),
                    limit=5, batch_tokens=1000, api_model="oracle", systems=("base", "base+retrieval", "api",
                                                                             "api+retrieval"))
    result = evaluate_news(args, llm=OracleLLM(items), generators={"base": oracle})
    preds = _check_outputs(result, ["base", "base+retrieval", "api", "api+retrieval"], 5)
    for system in ("base", "api"):
        assert all(v == 1.0 for k, v in result["systems"][system].items() if k != "seconds"), system
    for system in ("base+retrieval", "api+retrieval"):
        m = result["systems"][system]
        assert m["qa_f1"] == m["qa_rouge_l"] == m["qa_contains"] == 1.0  # the [1] citation is not held against it
        hits = [p["hit"] for p in preds if p["system"] == system]
        assert m["retrieval_hit"] == pytest.approx(np.mean(hits)) and m["retrieval_hit"] > 0.5
    assert "| base+retrieval | — | — |" in Path(result["report"]).read_text()


def test_tiny_model_run_of_all_four_systems(tmp_path, smollm2_gguf, hashing_index, capsys):
    """A tiny random LLaMA (saved with checkpoint.save_model) and a random LoRA adapter, through the CLI."""
    from checkpoint import load_tokenizer, save_model
    from lora import LoraArgs, apply_lora, lora_modules, save_adapter
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True,
                                  vocab_size=load_tokenizer(smollm2_gguf).vocab_size, max_seq_len=2048))
    checkpoint = save_model(model, tmp_path / "tiny", format="meta", tokenizer_src=smollm2_gguf)
    largs = LoraArgs(r=2)
    apply_lora(model, largs)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)  # a non-zero update, so the fine-tuned answers differ
    adapter = save_adapter(model, largs, model.args, tmp_path / "adapter")
    out = tmp_path / "news"
    evaluate.main(["news", "--checkpoint", str(checkpoint), "--adapter", str(adapter), "--index", str(hashing_index),
                   "--out", str(out), "--limit", "2", "--max-new-tokens", "6", "--extract-tokens", "6",
                   "--dtype", "float32"])
    result = json.loads(capsys.readouterr().out)
    systems = ["base", "fine-tuned", "base+retrieval", "fine-tuned+retrieval"]
    preds = _check_outputs(result, systems, 2)
    assert all(0.0 <= v <= 1.0 for m in result["systems"].values() for k, v in m.items() if k != "seconds")
    logprobs = {s: [p["logprobs"] for p in preds if p["system"] == s and p["task"] == "sentiment"] for s in systems}
    assert logprobs["base"] != logprobs["fine-tuned"]  # the adapter was applied


def test_constrained_extraction_decodes_under_the_schema(tmp_path, smollm2_gguf, capsys):
    """--constrained: a tiny random model's extraction answers are prefixes of JSON the decoding schema allows, and
    every answer that ended is a valid extraction (an event type from annotate's list)."""
    from annotate.schema import EVENT_TYPES
    from checkpoint import save_model
    from constrain import JsonConstraint
    from model import ModelArgs, Transformer
    from tokenizer import Tokenizer

    torch.manual_seed(1)
    tok = Tokenizer.from_gguf(smollm2_gguf)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  max_seq_len=2048))
    checkpoint = save_model(model, tmp_path / "tiny", format="meta", tokenizer_src=smollm2_gguf)
    out = tmp_path / "news"
    evaluate.main(["news", "--checkpoint", str(checkpoint), "--systems", "base", "--out", str(out), "--limit", "3",
                   "--max-new-tokens", "4", "--extract-tokens", "64", "--dtype", "float32", "--constrained"])
    json.loads(capsys.readouterr().out)
    answers = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    answers = [a for a in answers if a["task"] == "extraction"]
    assert len(answers) == 3 and "decoded under its schema" in (out / "report.md").read_text()
    for a in answers:
        c = JsonConstraint(evaluate.extraction_decoding_schema())
        assert c.feed(a["answer"].encode())
        assert a["valid"] == c.complete
        if a["valid"]:
            assert a["event_type"] in EVENT_TYPES
