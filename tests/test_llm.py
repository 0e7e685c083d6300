"""llm.py against a scripted OpenAI-compatible server on 127.0.0.1, through the real `openai` client."""
import importlib.util
import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import llm as llm_mod
from llm import LLM, LLMArgs, LLMOutputError, LLMRequestError, find_json_objects, parse_json_answer, validate
from tests.fakeopenai import (FakeOpenAI, chat_response, completion_response, embedding_response, error_response,
                              scripted)

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def echo(path, body):
    """Answers every endpoint deterministically from the request, with token counts from word counts."""
    if path.endswith("/chat/completions"):
        last = body["messages"][-1]["content"]
        return 200, {}, chat_response(f"echo: {last}", prompt_tokens=len(last.split()), completion_tokens=3)
    if path.endswith("/completions"):
        return 200, {}, completion_response(f"done: {body['prompt']}", prompt_tokens=4, completion_tokens=2)
    vectors = [[float(len(t)), float(i), 1.0] for i, t in enumerate(body["input"])]
    return 200, {}, embedding_response(vectors, prompt_tokens=len(body["input"]))


def make(server, tmp_path, **kw) -> LLM:
    kw = dict(dict(base_url=server.base_url, cache=str(tmp_path / "llm.sqlite"), backoff=0.01), **kw)
    return LLM(LLMArgs(**kw))


def user(text):
    return [{"role": "user", "content": text}]


def test_cache_second_run_sends_nothing(tmp_path):
    with FakeOpenAI(echo) as server:
        with make(server, tmp_path) as llm:
            a = llm.chat(user("hello there"), max_tokens=8)
            assert (a.text, a.cached) == ("echo: hello there", False)
            assert llm.chat(user("hello there"), max_tokens=8).cached
            assert llm.complete("p", stop=["\n"]).text == "done: p"
            llm.chat(user("hello there"), max_tokens=8, temperature=0.7)  # other parameters: a new request
            llm.chat(user("hello there"), max_tokens=8, temperature=0.7, seed=1)  # a seed asks for a new sample
            vecs = llm.embed(["a", "bbb"])
            assert llm.usage["requests"] == 5 and llm.usage["cached"] == 1
        assert len(server.requests) == 5
        assert server.paths()[1] == "/v1/completions" and server.paths()[4] == "/v1/embeddings"
        sent = server.requests[1]["body"]
        assert sent["stop"] == ["\n"] and "seed" not in sent  # unset options are not sent
        assert server.requests[3]["body"]["seed"] == 1
    with FakeOpenAI(echo) as server2, make(server2, tmp_path) as llm:  # the rerun: a fresh process, same cache
        assert llm.chat(user("hello there"), max_tokens=8).text == "echo: hello there"
        assert llm.complete("p", stop="\n").cached  # a single stop string is the same request as a list of one
        assert llm.chat(user("hello there"), max_tokens=8, temperature=0.7, seed=1).cached
        np.testing.assert_array_equal(llm.embed(["bbb", "a"]), vecs[::-1])
        assert server2.requests == [] and llm.usage["requests"] == 0 and llm.usage["cached"] == 5


def test_embed_batches_keep_order(tmp_path):
    with FakeOpenAI(echo) as server, make(server, tmp_path, cache=None) as llm:
        texts = ["a", "bb", "ccc", "dddd", "eeeee"]
        vecs = llm.embed(texts, batch_size=2)
        assert vecs.dtype == np.float32 and vecs.shape == (5, 3)
        assert vecs[:, 0].tolist() == [1, 2, 3, 4, 5]  # the fake encodes each text's length
        assert [r["body"]["input"] for r in server.requests] == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]
        assert llm.embed([]).shape == (0, 0) and llm.usage["prompt_tokens"] == 5


def test_rerun_from_cache_needs_no_key(tmp_path, monkeypatch):
    with FakeOpenAI(echo) as server, make(server, tmp_path) as llm:
        llm.chat(user("x"))
    monkeypatch.delenv("OPENAI_API_KEY")
    with LLM(LLMArgs(cache=str(tmp_path / "llm.sqlite"))) as llm:
        assert llm.chat(user("x")).cached
        with pytest.raises(ValueError, match="OPENAI_API_KEY is not set"):
            llm.chat(user("not cached"))


def test_retry_429_with_retry_after_then_500_then_success(tmp_path, caplog):
    replies = [error_response(429, retry_after=0.05), error_response(500), (200, {}, chat_response("ok"))]
    with FakeOpenAI(scripted(replies)) as server, make(server, tmp_path) as llm:
        with caplog.at_level(logging.WARNING, logger="llm"):
            assert llm.chat(user("q")).text == "ok"
        assert len(server.requests) == 3
        assert llm.usage["retries"] == 2 and llm.usage["requests"] == 1
    assert "HTTP 429; retry 1/6 in 0.05s (Retry-After)" in caplog.text  # the server's delay, not our backoff
    assert "HTTP 500; retry 2/6" in caplog.text


def test_retries_stop_after_max_retries(tmp_path):
    with FakeOpenAI(lambda p, b: error_response(503)) as server, make(server, tmp_path, max_retries=2) as llm:
        with pytest.raises(LLMRequestError, match=r"HTTP 503 .* gave up after 3 attempts \(--max-retries 2\)"):
            llm.chat(user("q"))
        assert len(server.requests) == 3
    with FakeOpenAI(lambda p, b: error_response(400, "bad model")) as server, make(server, tmp_path) as llm:
        with pytest.raises(LLMRequestError, match="HTTP 400 .* not retryable"):
            llm.chat(user("q"))
        assert len(server.requests) == 1  # a client error is not retried


def test_timeout_is_retried(tmp_path):
    calls = []

    def slow_first(path, body):
        calls.append(path)
        if len(calls) == 1:
            time.sleep(2.0)
        return 200, {}, chat_response("late but fine")

    with FakeOpenAI(slow_first) as server, make(server, tmp_path, timeout=0.5) as llm:
        assert llm.chat(user("q")).text == "late but fine"
        assert llm.usage["retries"] >= 1 and llm.usage["requests"] == 1


def test_retry_after_header_forms():
    class Err:
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    assert llm_mod._retry_after(Err({"retry-after": "7"})) == 7.0
    assert llm_mod._retry_after(Err({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < llm_mod._retry_after(Err({"retry-after": future})) <= 31
    assert llm_mod._retry_after(Err({"retry-after": "soon"})) is None
    assert llm_mod._retry_after(Err({})) is None


def test_rate_limiter_spaces_requests(monkeypatch):
    slept, clock = [], [100.0]
    monkeypatch.setattr(llm_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(llm_mod.time, "sleep", slept.append)
    limiter = llm_mod._RateLimiter(rpm=120)  # one start every 0.5 s
    for _ in range(3):
        limiter.wait()
    assert slept == [0.0, 0.5, 1.0]
    clock[0] += 10  # idle for a while: no wait
    limiter.wait()
    assert slept[-1] == 0.0


JSON_SCHEMA = {"type": "object", "required": ["sentiment", "score"],
               "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                              "score": {"type": "number", "minimum": -1, "maximum": 1}}}


def test_chat_json_repaired_on_retry(tmp_path):
    replies = [(200, {}, chat_response('Thinking... {"sentiment": "bullish", "score": 0.9}')),
               (200, {}, chat_response('Sorry.\n```json\n{"sentiment": "positive", "score": 0.9}\n```'))]
    with FakeOpenAI(scripted(replies)) as server, make(server, tmp_path) as llm:
        answer = llm.chat_json_answer(user("judge"), JSON_SCHEMA)
        assert answer.data == {"sentiment": "positive", "score": 0.9} and answer.repaired
        assert answer.reasoning == "Sorry."
        repair = server.requests[1]["body"]["messages"]
        assert repair[1] == {"role": "assistant", "content": replies[0][2]["choices"][0]["message"]["content"]}
        assert "$.sentiment: \"bullish\" is not one of" in repair[2]["content"]  # the model is told what was wrong
    with FakeOpenAI(echo) as server, make(server, tmp_path) as llm:  # the rerun replays both answers from cache
        assert llm.chat_json(user("judge"), JSON_SCHEMA)["sentiment"] == "positive"
        assert server.requests == []


def test_chat_json_gives_up_with_raw_text(tmp_path):
    replies = [(200, {}, chat_response("no json here")), (200, {}, chat_response('{"sentiment": "positive"}'))]
    with FakeOpenAI(scripted(replies)) as server, make(server, tmp_path) as llm:
        with pytest.raises(LLMOutputError) as e:
            llm.chat_json(user("judge"), JSON_SCHEMA, check=lambda obj: [])
        assert e.value.raw_text == '{"sentiment": "positive"}' and "missing required key 'score'" in e.value.reason
        assert len(server.requests) == 2  # exactly one repair retry


def test_chat_json_check_hook(tmp_path):
    replies = [(200, {}, chat_response('{"sentiment": "neutral", "score": 0.5}')),
               (200, {}, chat_response('{"sentiment": "neutral", "score": 0}'))]
    check = lambda obj: [] if obj["sentiment"] != "neutral" or obj["score"] == 0 else ["neutral must score 0"]  # noqa
    with FakeOpenAI(scripted(replies)) as server, make(server, tmp_path) as llm:
        assert llm.chat_json(user("judge"), JSON_SCHEMA, check=check)["score"] == 0
        assert "neutral must score 0" in server.requests[1]["body"]["messages"][-1]["content"]


def test_parse_json_answer_forms():
    schema = {"type": "object", "required": ["a"]}
    assert parse_json_answer('{"a": 1}', schema) == ({"a": 1}, "")
    text = 'Step 1: the set {x} is odd. {"b": 2}\nSo the answer:\n```json\n{"a": {"n": [1, {"c": 3}]}}\n```\nDone.'
    assert parse_json_answer(text, schema) == ({"a": {"n": [1, {"c": 3}]}},
                                               'Step 1: the set {x} is odd. {"b": 2}\nSo the answer:')
    assert [o for o, _, _ in find_json_objects(text)] == [{"b": 2}, {"a": {"n": [1, {"c": 3}]}}]
    # the last object that validates wins, and an invalid trailing one is skipped
    assert parse_json_answer('{"a": 1} then {"b": 2}', schema)[0] == {"a": 1}
    with pytest.raises(LLMOutputError, match="no JSON object"):
        parse_json_answer("[1, 2]", schema)


def test_unsupported_schema_keyword_is_rejected(tmp_path):
    with FakeOpenAI(echo) as server, make(server, tmp_path) as llm:
        with pytest.raises(ValueError, match=r"schema.properties.x: unsupported JSON-schema keywords \['pattern'\]"):
            llm.chat_json(user("q"), {"type": "object", "properties": {"x": {"pattern": "^a"}}})
        assert server.requests == []


def test_validate_length_keywords_name_the_path():
    items = {"type": "string", "minLength": 1, "maxLength": 2}
    coins = {"type": "array", "minItems": 1, "maxItems": 2, "items": items}
    schema = {"type": "object", "properties": {"coins": coins}}
    llm_mod.check_schema(schema)
    assert validate({"coins": ["a", "😀é"]}, schema) == []  # code points, not bytes or UTF-16 units
    assert validate({"coins": ["a", "b", "c"]}, schema) == ["$.coins: 3 items, more than maxItems 2"]
    assert validate({"coins": []}, schema) == ["$.coins: 0 items, fewer than minItems 1"]
    assert validate({"coins": ["", "abc"]}, schema) == ["$.coins[0]: 0 characters, fewer than minLength 1",
                                                        "$.coins[1]: 3 characters, more than maxLength 2"]
    assert validate(12345, {"maxLength": 1}) == [] and validate({"a": 1, "b": 2}, {"maxItems": 0}) == []


def test_check_schema_refuses_bad_length_bounds():
    for bad in ({"maxItems": -1}, {"minLength": 1.5}, {"maxLength": True}, {"minItems": "2"}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=rf"schema\.properties\.x\.items\.{key}: .* must be an integer >= 0"):
            llm_mod.check_schema({"type": "object", "properties": {"x": {"items": bad}}})
    with pytest.raises(ValueError, match=r"schema\.properties\.x: minItems 3 is more than maxItems 2"):
        llm_mod.check_schema({"properties": {"x": {"minItems": 3, "maxItems": 2}}})
    llm_mod.check_schema({"minItems": 0, "maxItems": 0, "minLength": 2, "maxLength": 2})


def test_map_keeps_order_and_loses_nothing(tmp_path):
    rng = random.Random(0)
    delays = {str(i): rng.random() * 0.03 for i in range(40)}

    def jittery(path, body):
        time.sleep(delays[body["messages"][-1]["content"]])  # finish out of order
        return echo(path, body)

    with FakeOpenAI(jittery) as server, make(server, tmp_path, concurrency=8) as llm:
        out = llm.map(lambda i: llm.chat(user(str(i))).text, range(40))
        assert out == [f"echo: {i}" for i in range(40)]
        assert sorted(r["body"]["messages"][0]["content"] for r in server.requests) == sorted(map(str, range(40)))
        assert list(llm.imap(lambda i: i * i, range(5), desc=None)) == [0, 1, 4, 9, 16]


def test_map_propagates_errors(tmp_path):
    def fn(i):
        if i == 3:
            raise KeyError("item 3")
        return i

    with FakeOpenAI(echo) as server, make(server, tmp_path, concurrency=2) as llm:
        with pytest.raises(KeyError, match="item 3"):
            llm.map(fn, range(10))


def test_two_clients_write_one_cache_concurrently(tmp_path):
    with FakeOpenAI(echo) as server:
        a, b = make(server, tmp_path, concurrency=4), make(server, tmp_path, concurrency=4)
        threads = [threading.Thread(target=c.map, args=(lambda i, c=c, tag=tag: c.chat(user(f"{tag}{i}")), range(20)))
                   for c, tag in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.close(), b.close()
        assert len(server.requests) == 40
        with make(server, tmp_path) as c:
            assert all(c.chat(user(f"{tag}{i}")).cached for tag in "ab" for i in range(20))
        assert len(server.requests) == 40


def test_usage_totals_add_up(tmp_path):
    with FakeOpenAI(echo) as server, make(server, tmp_path, concurrency=4) as llm:
        texts = [" ".join(["w"] * n) for n in range(1, 11)]
        llm.map(lambda t: llm.chat(user(t)), texts)
        llm.map(lambda t: llm.chat(user(t)), texts[:4])  # cached: no tokens, no cost
        u = llm.usage
        assert (u["requests"], u["cached"], u["prompt_tokens"], u["completion_tokens"]) == (10, 4, 55, 30)
        assert u["cost_usd"] == pytest.approx((55 * 0.50 + 30 * 1.50) / 1e6)  # gpt-3.5-turbo list price
    assert llm_mod._price("gpt-4o-mini-2024-07-18") == llm_mod.PRICES["gpt-4o-mini"]
    assert llm_mod._price("gpt-4o-2024-08-06") == llm_mod.PRICES["gpt-4o"]
    assert llm_mod._price("my-local-llama") == (0.0, 0.0)


def test_api_key_never_logged_or_cached(tmp_path, caplog):
    replies = [error_response(429, retry_after=0), (200, {}, chat_response("fine")),
               error_response(401, "Incorrect API key provided")]
    with caplog.at_level(logging.DEBUG):  # every logger, the openai client's and httpx's included
        with FakeOpenAI(scripted(replies)) as server, make(server, tmp_path) as llm:
            llm.chat(user("q"))
            with pytest.raises(LLMRequestError) as e:
                llm.chat(user("q2"))
            assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"  # it was used
    assert caplog.text and KEY not in caplog.text and KEY not in str(e.value) and KEY not in repr(llm.args)
    for f in tmp_path.iterdir():  # the database and its WAL/SHM side files
        assert KEY.encode() not in f.read_bytes()


def test_args_validation_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="concurrency=0"):
        LLMArgs(concurrency=0)
    with pytest.raises(SystemExit):
        llm_mod.main(["--prompt", "x", "--backend", "gpt"])
    with FakeOpenAI(echo) as server:
        llm_mod.main(["--prompt", "hi", "--base-url", server.base_url, "--cache", str(tmp_path / "c.sqlite")])
        assert "echo: hi" in capsys.readouterr().out
        llm_mod.main(["--prompt", "hi", "--no-chat", "--base-url", server.base_url, "--cache", "none"])
        assert "done: hi" in capsys.readouterr().out
        assert not (tmp_path / "none").exists()


def _random_schema(rng, depth=0):
    kind = rng.choice(["string", "number", "integer", "boolean", "null", "enum", "multi"] +
                      (["object", "array"] * 2 if depth < 3 else []))
    if kind == "enum":
        return {"enum": rng.sample(["a", "b", 1, 2.0, True, None, 0], 3)}
    if kind == "multi":
        return {"type": rng.sample(["string", "number", "null", "boolean"], 2)}
    if kind == "object":
        props = {k: _random_schema(rng, depth + 1) for k in rng.sample("pqrs", rng.randint(0, 3))}
        s = {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, len(props)))}
        if rng.random() < 0.3:
            s["additionalProperties"] = False
        return s
    if kind == "array":
        s = {"type": "array", "items": _random_schema(rng, depth + 1)}
        if rng.random() < 0.5:
            s.update(minItems=rng.choice([0, 1, 2]), maxItems=rng.choice([2, 3]))
        return s
    s = {"type": kind}
    if kind == "string" and rng.random() < 0.5:
        s.update(minLength=rng.choice([0, 1, 2]), maxLength=rng.choice([2, 3]))
    if kind in ("number", "integer") and rng.random() < 0.7:
        s.update(minimum=rng.choice([-1, 0, 0.5]), maximum=rng.choice([1, 2, 10]))
    return s


def _random_value(rng, depth=0):
    kind = rng.choice(["s", "i", "f", "b", "n", "e"] + (["o", "a"] * 2 if depth < 3 else []))
    if kind == "o":
        return {k: _random_value(rng, depth + 1) for k in rng.sample("pqrst", rng.randint(0, 4))}
    if kind == "a":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"s": lambda: rng.choice(["a", "b", "x", "", "abc", "é😀"]), "i": lambda: rng.randint(-2, 12),
            "f": lambda: rng.choice([0.5, 1.0, 2.0, -1.5, 3.0]), "b": lambda: rng.random() < 0.5,
            "n": lambda: None, "e": lambda: rng.choice(["a", 1, 2, True, 0])}[kind]()


@pytest.mark.reference
def test_validate_matches_jsonschema_on_random_inputs():
    jsonschema = pytest.importorskip("jsonschema")
    rng = random.Random(0)
    agree = valid = 0
    for _ in range(3000):
        schema = _random_schema(rng)
        value = _random_value(rng)
        if rng.random() < 0.3 and schema.get("type") == "object":  # steer some values into the schema's shape
            value = {k: _random_value(rng, 2) for k in schema["properties"]}
        ours = not validate(value, schema)
        ref = jsonschema.Draft202012Validator(schema).is_valid(value)
        assert ours == ref, (schema, value, validate(value, schema))
        agree += 1
        valid += ref
    assert agree == 3000 and 100 < valid < 2900  # both outcomes were exercised


def _mutations(value, rng):
    """`value` and copies with one random change each: a key dropped, a value of the wrong type or out of range."""
    yield value
    for _ in range(6):
        copy = json.loads(json.dumps(value))
        node = copy
        while True:  # walk down to a random container
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            if not children:
                break
            key, child = rng.choice(children)
            if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
                node = child
                continue
            if isinstance(node, dict) and rng.random() < 0.3:
                del node[key]
            else:
                node[key] = rng.choice(["bullish", -5, 2.5, None, True, [], {}, "2026-01-01"])
            break
        yield copy


@pytest.mark.reference
def test_validate_matches_jsonschema_on_annotation_schemas():
    """Real inputs: answers built from the sample corpus's gold labels, and mutated copies, on the stage's schemas."""
    jsonschema = pytest.importorskip("jsonschema")
    from annotate import schema as S
    labels = [json.loads(line) for line in
              (Path(__file__).resolve().parent.parent / "data" / "sample_news_labels.jsonl").open()]
    rng = random.Random(0)
    checked = valid = 0
    for gold in labels:
        answers = [
            (S.CLEAN_SCHEMA, {"drop": gold["boilerplate_paragraphs"]}),
            (S.SENTIMENT_SCHEMA, {"market": {"sentiment": gold["sentiment"], "reason": "r"},
                                  "coins": [dict(c, reason="r") for c in gold["coins"]]}),
            (S.EXTRACT_SCHEMA, {"coins": [{"name": c["name"], "ticker": c["ticker"]} for c in gold["coins"]],
                                "organizations": ["Org"], "people": [{"name": "P", "role": None}],
                                "events": [{"type": gold["event_type"], "summary": qa["question"], "date": None,
                                            "amounts": [{"value": 1.5, "currency": "USD", "what": qa["answer"]}]}
                                           for qa in gold["qa"]]}),
        ]
        for schema, answer in answers:
            for value in _mutations(answer, rng):
                ref = jsonschema.Draft202012Validator(schema).is_valid(value)
                assert (not validate(value, schema)) == ref, (value, validate(value, schema))
                checked, valid = checked + 1, valid + ref
    assert checked == 30 * 3 * 7 and 90 <= valid < checked  # every unmutated answer is valid, most mutants not
    for schema in (S.CLEAN_SCHEMA, S.EXTRACT_SCHEMA, S.SENTIMENT_SCHEMA, S.ANNOTATION_SCHEMA):
        jsonschema.Draft202012Validator.check_schema(schema)
        llm_mod.check_schema(schema)


needs_generate = pytest.mark.skipif(importlib.util.find_spec("generate") is None,
                                    reason="generate.py (the generate helper's module) is missing; the local "
                                           "backend runs on it")


@needs_generate
def test_local_backend_matches_generator_and_batches(tmp_path, smollm2_gguf, monkeypatch):
    """The local backend maps parameters onto generate.py, loads the model once and batches the requests that
    wait for it; a tiny random model keeps it fast (the embedded tokenizer, so the chat template is real)."""
    import torch

    import generate
    from checkpoint import load_tokenizer
    from model import ModelArgs, Transformer
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    tiny = generate.Generator(Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size)), tok)
    expected = [tiny.chat([user(f"q{i}")], generate.GenerateArgs(max_new_tokens=5))[0] for i in range(6)]
    sampled = tiny.generate(["hi there"], generate.GenerateArgs(max_new_tokens=4, temperature=0.8, top_p=0.9,
                                                                 seed=3, stop=("\n",)))[0]
    loads, batches, threads_used = [], [], set()

    def from_checkpoint(cls, checkpoint=None, adapter=None, dtype=None, device="cpu"):
        loads.append((checkpoint, adapter))
        threads_used.add(threading.get_ident())
        return tiny

    def spy(name):
        method = getattr(tiny, name)

        def run(rows, args):
            batches.append((name, len(rows)))
            threads_used.add(threading.get_ident())
            return method(rows, args)
        return run

    monkeypatch.setattr(generate.Generator, "from_checkpoint", classmethod(from_checkpoint))
    monkeypatch.setattr(tiny, "chat", spy("chat"))
    monkeypatch.setattr(tiny, "generate", spy("generate"))
    args = LLMArgs(backend="local", cache=str(tmp_path / "llm.sqlite"), checkpoint="ckpt", adapter="lora",
                   concurrency=3)
    with LLM(args) as llm:
        outs = llm.map(lambda i: llm.chat(user(f"q{i}"), max_tokens=5), range(3))  # loads the model
        assert loads == [("ckpt", "lora")] and llm.model_id == "local:ckpt:lora"
        # while the model is busy, four requests queue up; then they run as one chat batch and one completion
        batches.clear()
        results = {}
        calls = [lambda i=i: llm.chat(user(f"q{i}"), max_tokens=5) for i in range(3, 6)] + \
            [lambda: llm.complete("hi there", max_tokens=4, temperature=0.8, top_p=0.9, seed=3, stop="\n")]
        busy = threading.Event()
        llm._on_model_thread(busy.wait, wait=False)  # the model thread's current turn
        threads = [threading.Thread(target=lambda k=k, c=c: results.__setitem__(k, c()))
                   for k, c in enumerate(calls)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(llm._pending) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        busy.set()
        for t in threads:
            t.join()
        assert sorted(batches) == [("chat", 3), ("generate", 1)]
        # the load and every batch ran on one thread, whichever thread asked: one OpenMP team
        assert len(threads_used) == 1 and threading.get_ident() not in threads_used
        outs += [results[k] for k in range(3)]
        assert [(o.text, o.completion_tokens, o.finish_reason) for o in outs] == \
            [(e.text, e.completion_tokens, e.finish_reason) for e in expected]
        assert (results[3].text, results[3].prompt_tokens) == (sampled.text, sampled.prompt_tokens)
        assert llm.chat(user("q0"), max_tokens=5).cached
        assert llm.usage["requests"] == 7 and llm.usage["cost_usd"] == 0
        with pytest.raises(ValueError, match="no embeddings endpoint"):
            llm.embed(["x"])
        monkeypatch.setattr(tiny, "chat", lambda rows, args: 1 / 0)
        with pytest.raises(ZeroDivisionError):  # a failed batch fails its callers instead of hanging them
            llm.chat(user("new"))


@needs_generate
@pytest.mark.slow
def test_local_backend_embedded_model(tmp_path, smollm2_gguf):
    with LLM(LLMArgs(backend="local", cache=str(tmp_path / "llm.sqlite"))) as llm:
        a = llm.chat(user("Name a colour."), max_tokens=6)
        b = llm.chat(user("Name a colour."), max_tokens=6)
        assert a.text.strip() and a.completion_tokens <= 6 and a.finish_reason in ("stop", "length")
        assert b.cached and b.text == a.text and llm.usage["requests"] == 1


@needs_generate
def test_local_chat_json_reasons_then_decodes_the_json_under_the_schema(tmp_path, smollm2_gguf, monkeypatch):
    """With the local backend, chat_json writes the reply up to its ```json fence, then the JSON decoded under the
    schema, in one generation (json_after); with a stop string, as two (the reply, then the JSON continuing it): the
    same texts as the Generator calls, and a valid object even from a random model (an enum-only schema, so it must
    end)."""
    import torch

    import generate
    from checkpoint import load_tokenizer
    from model import ModelArgs, Transformer
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    tiny = generate.Generator(Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size)), tok)
    monkeypatch.setattr(generate.Generator, "from_checkpoint", classmethod(lambda cls, *a, **k: tiny))
    schema = {"type": "object", "required": ["move"], "additionalProperties": False,
              "properties": {"move": {"enum": ["up", "down"]}}}
    messages = user("Will BTC go up? Think, then answer in a ```json block.")
    [one] = tiny.chat([messages], generate.GenerateArgs(max_new_tokens=96, json_schema=json.dumps(schema),
                                                        json_after="```json"))
    think, answer = one.text.split("```json")  # the random model never writes the fence: it was written for it
    with LLM(LLMArgs(backend="local", cache=str(tmp_path / "llm.sqlite"))) as llm:
        got = llm.chat_json_answer(messages, schema, max_tokens=96)
        assert got.raw == one.text + "\n```" and not got.repaired and got.reasoning == think.strip()
        assert got.data == json.loads(answer) and got.data["move"] in ("up", "down")
        assert llm.usage["completion_tokens"] == one.completion_tokens
        assert llm.chat_json(messages, schema, max_tokens=96) == got.data and llm.usage["cached"] == 1
        # a stop string may end the reasoning: two generations
        [think] = tiny.chat([messages], generate.GenerateArgs(max_new_tokens=96, stop=("!", "```json")))
        prefix = think.text.rstrip() + "\n```json\n"
        [answer] = tiny.chat([messages], generate.GenerateArgs(max_new_tokens=96, json_schema=json.dumps(schema)),
                             prefixes=[prefix])
        got = llm.chat_json_answer(messages, schema, max_tokens=96, stop="!")
        assert got.raw == prefix + answer.text + "\n```" and got.reasoning == think.text.strip()
        with pytest.raises(ValueError, match="local model only"):
            LLM(LLMArgs(backend="openai", cache=None)).chat(messages, json_schema=schema)
        # reasoning=False (a prompt that asks for the JSON alone): the reply opens with the fence, no thinking pass
        [direct] = tiny.chat([messages], generate.GenerateArgs(max_new_tokens=96, json_schema=json.dumps(schema)),
                             prefixes=["```json\n"])
        requests, tokens = llm.usage["requests"], llm.usage["completion_tokens"]
        got = llm.chat_json_answer(messages, schema, reasoning=False, max_tokens=96)
        assert got.raw == "```json\n" + direct.text + "\n```" and got.reasoning == ""
        assert got.data == json.loads(direct.text) and llm.usage["requests"] == requests + 1  # its own cache key
        assert llm.usage["completion_tokens"] == tokens + direct.completion_tokens  # the JSON's tokens only
        with pytest.raises(ValueError, match="reasoning=False applies to a chat under json_schema"):
            llm.chat(messages, reasoning=False)
        # a completion with a schema is the JSON alone, as generate decodes it
        [ref] = tiny.generate(["BTC:"], generate.GenerateArgs(max_new_tokens=96, json_schema=json.dumps(schema)))
        done = llm.complete("BTC:", max_tokens=96, json_schema=schema)
        assert done.text == ref.text and json.loads(done.text)["move"] in ("up", "down")
        # a JSON that runs out of tokens fails at once: a repair by the same model would run out as well
        requests = llm.usage["requests"]
        with pytest.raises(LLMOutputError, match="did not end within max_tokens=3"):
            llm.chat_json_answer(messages, {"type": "object", "required": ["why"],
                                            "properties": {"why": {"type": "string"}}}, max_tokens=3)
        assert llm.usage["requests"] == requests + 1


def test_decoding_schema_closes_objects_that_list_properties():
    schema = {"type": "object", "required": ["coins"], "properties": {
        "coins": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "notes": {"type": "object", "additionalProperties": {"type": "object", "properties": {"x": {}}}},
        "free": {"type": "object"}}}
    closed = llm_mod.decoding_schema(schema)
    good = {"coins": [{"name": "Bitcoin"}], "notes": {"a": {"x": 1}}, "free": {"anything": 1}}
    assert validate(good, closed) == [] and validate(good, schema) == []
    for extra in ({**good, "other": 1}, {**good, "coins": [{"name": "B", "ticker": "BTC"}]},
                  {**good, "notes": {"a": {"x": 1, "y": 2}}}):
        assert validate(extra, schema) == [] and validate(extra, closed)  # stricter, never looser
    assert "additionalProperties" not in closed["properties"]["free"] and "additionalProperties" not in schema


def test_max_tokens_cap_bounds_every_request(tmp_path):
    with FakeOpenAI(echo) as server, make(server, tmp_path, max_tokens_cap=16) as llm:
        llm.chat(user("long answer please"), max_tokens=1024)
        llm.complete("short", max_tokens=8)
        assert [r["body"]["max_tokens"] for r in server.requests] == [16, 8]
        assert llm.chat(user("long answer please"), max_tokens=512).cached  # capped to the same request


@needs_generate
def test_local_backend_maps_and_bounds_parameters_as_the_server_does(tmp_path, monkeypatch):
    """The local backend's GenerateArgs come from GenerateArgs.from_openai (serve.py's mapping), so a value the
    server refuses is refused here too, naming the field; its dtype is precision.py's `auto` unless given."""
    import torch

    import generate
    import precision
    from tests.test_generate import tiny_generator
    tiny, loads, seen = tiny_generator(seed=1), [], []
    monkeypatch.setattr(generate.Generator, "from_checkpoint", classmethod(
        lambda cls, checkpoint=None, adapter=None, dtype=None, device="cpu": loads.append(dtype) or tiny))
    real = tiny.generate
    monkeypatch.setattr(tiny, "generate", lambda rows, args: seen.extend(args) or real(rows, args))
    with LLM(LLMArgs(backend="local", cache=None)) as llm:
        llm.complete("ab", max_tokens=3, temperature=0.5, top_p=0.8, stop=["x"], presence_penalty=1.0)
        [a] = seen
        assert (a.max_new_tokens, a.temperature, a.top_p, a.stop, a.presence_penalty, a.seed) == \
            (3, 0.5, 0.8, ("x",), 1.0, 0)  # unseeded: seed 0, so a rerun repeats
        for params, field in (({"top_p": 0}, "top_p"), ({"temperature": 3}, "temperature"),
                              ({"max_tokens": 0}, "max_tokens"), ({"seed": 2**70}, "seed"),
                              ({"stop": [""]}, "stop")):
            with pytest.raises(ValueError, match=f"^{field}="):
                llm.complete("ab", **params)
    assert loads == [precision.choose_dtype("auto", "cpu")]
    with LLM(LLMArgs(backend="local", cache=None, dtype="fp32")) as llm:
        llm.complete("ab", max_tokens=2)
    assert loads[-1] == torch.float32
    with pytest.raises(ValueError, match="dtype='fp64'"):
        LLMArgs(backend="local", dtype="fp64")
