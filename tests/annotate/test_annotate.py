"""annotate/ end to end on the sample corpus, against a scripted OpenAI-compatible server on 127.0.0.1 that
answers like a perfect annotator (from the gold labels), with the real `openai` client underneath llm.py."""
import hashlib
import json
import random
import re
import threading
import time
from pathlib import Path

import pytest

from annotate import pipeline
from annotate.pipeline import AnnotateArgs, annotate_file, split_paragraphs
from annotate.schema import ANNOTATION_SCHEMA, EVENT_TYPES, SENTIMENTS
from llm import LLMArgs, LLMRequestError, validate
from tests.fakeopenai import FakeOpenAI, chat_response, error_response

ROOT = Path(__file__).resolve().parents[2]
NEWS, LABELS = ROOT / "data" / "sample_news.jsonl", ROOT / "data" / "sample_news_labels.jsonl"


def load(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


ARTICLES = load(NEWS)
GOLD = {g["url"]: g for g in load(LABELS)}
BY_TITLE = {a["title"]: a for a in ARTICLES}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-annotate")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


class Annotator:
    """A scripted model: reasons in prose, then answers from the gold labels. `tweak(step, url, n)` may return
    a different answer text for the n-th request of that step and article (n = 0 first, 1 repair)."""

    def __init__(self, tweak=None, jitter=0.0):
        self.tweak, self.jitter = tweak, jitter
        self.seen, self.lock = {}, threading.Lock()
        self.rng = random.Random(0)

    def __call__(self, path, body):
        prompt = body["messages"][1]["content"]
        article = BY_TITLE[re.search(r"^Title: (.*)$", prompt, re.M).group(1)]
        gold = GOLD[article["url"]]
        step = ("clean" if "numbered paragraphs" in prompt else
                "extract" if prompt.startswith("Extract") else "sentiment")
        with self.lock:
            n = self.seen[step, article["url"]] = self.seen.get((step, article["url"]), -1) + 1
            delay = self.rng.random() * self.jitter
        time.sleep(delay)  # answers finish out of order under concurrency
        text = self.tweak(step, article["url"], n) if self.tweak else None
        if text is None:
            text = f"Let me think about the {step} step. " + "```json\n" + json.dumps(self.answer(step, gold)) + "\n```"
        return 200, {}, chat_response(text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()))

    @staticmethod
    def answer(step, gold):
        if step == "clean":
            return {"drop": gold["boilerplate_paragraphs"]}
        if step == "extract":
            return {"coins": [{"name": c["name"], "ticker": "$" + c["ticker"].lower()} for c in gold["coins"]],
                    "organizations": ["Example Org"], "people": [{"name": "Jane Roe", "role": None}],
                    "events": [{"type": gold["event_type"], "summary": "What happened.", "date": None,
                                "amounts": [{"value": 1e6, "currency": "USD"}]}]}
        return {"market": {"sentiment": gold["sentiment"], "reason": "Because."},
                "coins": [{"ticker": c["ticker"], "sentiment": c["sentiment"], "reason": "Why."}
                          for c in reversed(gold["coins"])]}  # another order than asked: matched by ticker


def run(server, tmp_path, cache=True, concurrency=4, **kw):
    aargs = AnnotateArgs(**dict(dict(articles=str(NEWS), out=str(tmp_path / "annotations.jsonl")), **kw))
    largs = LLMArgs(base_url=server.base_url, cache=str(tmp_path / "llm.sqlite") if cache else None,
                    concurrency=concurrency, backoff=0.01, max_retries=1)
    return annotate_file(aargs, largs)


def test_sample_corpus_end_to_end_in_order(tmp_path):
    with FakeOpenAI(Annotator(jitter=0.01)) as server:
        stats = run(server, tmp_path, concurrency=6)
        assert len(server.requests) == 90  # clean + extract + sentiment for each of the 30 articles
    assert (stats["articles"], stats["annotated"], stats["failed"], stats["skipped"]) == (30, 30, 0, 0)
    records = load(tmp_path / "annotations.jsonl")
    assert [r["url"] for r in records] == [a["url"] for a in ARTICLES]  # input order despite concurrency
    for r, article in zip(records, ARTICLES):
        gold = GOLD[r["url"]]
        assert not validate(r, ANNOTATION_SCHEMA) and r["ok"] and r["model"] == "gpt-3.5-turbo"
        assert r["sentiment"] == gold["sentiment"] and r["events"][0]["type"] == gold["event_type"]
        assert [(c["name"], c["ticker"], c["sentiment"]) for c in r["coins"]] == \
            [(c["name"], c["ticker"], c["sentiment"]) for c in gold["coins"]]  # "$eth" normalised to "ETH"
        assert r["removed_paragraphs"] == gold["boilerplate_paragraphs"]
        paragraphs = article["text"].split("\n\n")
        assert r["clean_text"] == "\n\n".join(p for i, p in enumerate(paragraphs, 1)
                                              if i not in gold["boilerplate_paragraphs"])
        assert r["reasoning"] == {s: f"Let me think about the {s} step." for s in ("clean", "extract", "sentiment")}
    jsonschema = pytest.importorskip("jsonschema")  # the reference validator agrees on the real records
    for r in records:
        jsonschema.Draft202012Validator(ANNOTATION_SCHEMA).validate(r)
    assert stats["usage"]["requests"] == 90 and stats["usage"]["prompt_tokens"] > 0


def test_rerun_resumes_and_sends_nothing(tmp_path):
    with FakeOpenAI(Annotator()) as server:
        run(server, tmp_path, cache=False, limit=10)
        out = tmp_path / "annotations.jsonl"
        with out.open("a") as f:
            f.write('{"url": "https://example.com/sample-news/11-kest')  # a crash in the middle of a write
        server.requests.clear()
        stats = run(server, tmp_path, cache=False)
        assert stats["skipped"] == 10 and stats["annotated"] == 20
        assert len(server.requests) == 60  # only the 20 new articles; the cut-off line is redone
        server.requests.clear()
        assert run(server, tmp_path, cache=False)["skipped"] == 30 and server.requests == []
    records = load(out)
    assert [r["url"] for r in records] == [a["url"] for a in ARTICLES]


def test_invalid_answer_repaired_or_recorded_as_failure(tmp_path):
    bad_event = ARTICLES[2]["url"]
    hopeless = ARTICLES[5]["url"]

    def tweak(step, url, n):
        if url == bad_event and step == "extract" and n == 0:  # wrong enum value, fixed on the repair request
            return '{"coins": [], "organizations": [], "people": [], "events": [{"type": "tax", "summary": "x", ' \
                   '"amounts": [], "date": "2 Feb"}]}'
        if url == hopeless and step == "sentiment":
            return f"I cannot decide (attempt {n})."
        return None

    with FakeOpenAI(Annotator(tweak)) as server:
        stats = run(server, tmp_path, limit=8)
        repair = [r["body"]["messages"] for r in server.requests if len(r["body"]["messages"]) == 4]
    assert (stats["annotated"], stats["failed"]) == (7, 1)
    assert len(repair) == 2  # one repair request for each of the two articles
    reasons = " | ".join(m[-1]["content"] for m in repair)  # in either order: arrival order varies under concurrency
    assert "$.events[0].type: \"tax\" is not one of" in reasons and "no JSON object" in reasons
    records = {r["url"]: r for r in load(tmp_path / "annotations.jsonl")}
    assert records[bad_event]["ok"] and records[bad_event]["events"][0]["type"] == "regulation"
    failure = records[hopeless]
    assert not validate(failure, ANNOTATION_SCHEMA)
    assert (failure["ok"], failure["step"], failure["raw"]) == (False, "sentiment", "I cannot decide (attempt 1).")
    assert "no JSON object" in failure["error"]

    # --retry-failed: the failure is annotated again, nothing else is redone (with the cache, the same model would
    # replay the same answers: retry with another --model, or without the cache as here)
    with FakeOpenAI(Annotator()) as server:
        stats = run(server, tmp_path, cache=False, limit=8, retry_failed=True)
        assert (stats["skipped"], stats["annotated"], stats["failed"]) == (7, 1, 0)
        assert all(m["body"]["messages"][1]["content"].count(ARTICLES[5]["title"]) for m in server.requests)
    records = load(tmp_path / "annotations.jsonl")
    assert len(records) == 8 and all(r["ok"] for r in records)


def test_sentiment_must_cover_every_coin(tmp_path):
    url = ARTICLES[0]["url"]  # Harbor Exchange: ETH and USDC

    def tweak(step, u, n):
        if u == url and step == "sentiment" and n == 0:
            return '{"market": {"sentiment": "negative", "reason": "r"}, ' \
                   '"coins": [{"ticker": "ETH", "sentiment": "negative", "reason": "r"}]}'
        return None

    with FakeOpenAI(Annotator(tweak)) as server:
        run(server, tmp_path, limit=1)
        assert "no entry for USD Coin (USDC)" in server.requests[-1]["body"]["messages"][-1]["content"]
    record = load(tmp_path / "annotations.jsonl")[0]
    assert record["ok"] and [c["ticker"] for c in record["coins"]] == ["ETH", "USDC"]


def test_request_failure_stops_the_run_and_keeps_finished_records(tmp_path):
    fifth = ARTICLES[4]["title"]
    annotator = Annotator()

    def respond(path, body):
        if fifth in body["messages"][1]["content"]:
            return error_response(400, "context length exceeded")
        return annotator(path, body)

    with FakeOpenAI(respond) as server:
        with pytest.raises(LLMRequestError, match="HTTP 400"):
            run(server, tmp_path, limit=8, concurrency=1)
    assert [r["url"] for r in load(tmp_path / "annotations.jsonl")] == [a["url"] for a in ARTICLES[:4]]


def test_cli(tmp_path, capsys):
    with FakeOpenAI(Annotator()) as server:
        pipeline.main(["--articles", str(NEWS), "--out", str(tmp_path / "a.jsonl"), "--limit", "2", "--no-clean",
                       "--base-url", server.base_url, "--cache", "none"])
        assert len(server.requests) == 4  # --no-clean: extract + sentiment only
    out = capsys.readouterr().out
    assert "articles 2, skipped 0, annotated 2, failed 0" in out and "4 requests" in out
    with pytest.raises(SystemExit):
        pipeline.main(["--limit", "-1"])


def test_extract_check_wants_iso_dates():
    event = {"type": "hack", "summary": "s", "amounts": []}
    facts = {"events": [dict(event, date="2026-03-13"), dict(event, date=None), dict(event, date="13 March")]}
    assert pipeline._check_extract(facts) == ["$.events[2].date: '13 March' is not YYYY-MM-DD (or null)"]


def test_a_local_model_is_held_to_existing_paragraphs():
    from constrain import JsonConstraint
    from llm import LLM

    local, api = LLM(LLMArgs(backend="local", cache=None)), LLM(LLMArgs(backend="openai", cache=None))
    assert pipeline._clean_schema(api, 5) is pipeline.CLEAN_SCHEMA  # API requests (and their cache keys) unchanged
    schema = pipeline._clean_schema(local, 5)
    assert validate({"drop": [5]}, schema) == [] and validate({"drop": [6]}, schema)
    c = JsonConstraint(schema)
    assert c.feed(b'{"drop": [4, ') and c.accepts(b"5]}") and not c.accepts(b"6") and not c.accepts(b"9")


def test_split_paragraphs():
    assert split_paragraphs("a\n\n b \n\n\nc", 100) == ["a", "b", "c"]
    assert split_paragraphs("one line\nanother line", 100) == ["one line", "another line"]
    assert split_paragraphs("x" * 50 + "\n\n" + "y" * 50 + "\n\n" + "z" * 50, 120) == ["x" * 50, "y" * 50]
    assert split_paragraphs("w" * 500, 200) == ["w" * 200]


def test_sample_corpus_is_well_formed():
    assert len(ARTICLES) == 30 and [g["url"] for g in load(LABELS)] == [a["url"] for a in ARTICLES]
    fields = ["url", "source", "title", "published", "author", "text", "fetched_at", "sha256"]
    for a in ARTICLES:
        assert list(a) == fields and a["source"] == "sample (invented)" and a["url"].startswith("https://example.com/")
        assert 120 <= len(a["text"].split()) <= 250
        assert a["sha256"] == hashlib.sha256(" ".join(a["text"].split()).encode()).hexdigest()
        assert a["published"].startswith("2026-")
        gold = GOLD[a["url"]]
        assert gold["sentiment"] in SENTIMENTS and gold["event_type"] in EVENT_TYPES and gold["coins"]
        assert len(gold["qa"]) == 2 and all(qa["answer"] in a["text"] for qa in gold["qa"])
        paragraphs = a["text"].split("\n\n")
        assert all(1 <= i <= len(paragraphs) for i in gold["boilerplate_paragraphs"])
    assert {g["event_type"] for g in GOLD.values()} == set(EVENT_TYPES)
    assert {g["sentiment"] for g in GOLD.values()} == set(SENTIMENTS)
    assert "invented" in (ROOT / "data" / "README.md").read_text()


def test_done_file_keeps_records_whose_text_holds_line_separators(tmp_path):
    out = tmp_path / "annotations.jsonl"
    recs = [{"url": "u1", "ok": True, "title": "a\u2028b"}, {"url": "u2", "ok": True, "title": "c\u0085d"}]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs) + '{"url": "u3", "o',
                   encoding="utf-8")  # the last write was cut off by a crash
    assert pipeline._load_done(out, retry_failed=False) == {"u1", "u2"}
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]] == recs


def test_done_file_without_urls_names_file_and_line(tmp_path):
    out = tmp_path / "annotations.jsonl"
    out.write_text('{"url": "u1", "ok": false}\n{"ok": true}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"annotations.jsonl:2: an annotation needs a string 'url'"):
        pipeline._load_done(out, retry_failed=True)
    out.write_text('{"url": "u1", "ok": false}\n{"url": "u2", "ok": true}\n', encoding="utf-8")
    assert pipeline._load_done(out, retry_failed=True) == {"u2"}  # the failure is dropped, to be redone
    assert [json.loads(line)["url"] for line in out.read_text().splitlines()] == ["u2"]
