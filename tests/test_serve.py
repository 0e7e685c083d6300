"""serve.py on 127.0.0.1 with a tiny model: the official `openai` client, plain and streaming, adapters by model name,
OpenAI-shaped 4xx errors, the bearer key, concurrent clients batched into one generation, and continuous batching:
requests joining a running batch between decode steps, each answered as alone, and a failing job failing alone."""
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from constrain import JsonConstraint
from generate import GenerateArgs
from serve import Batcher, Job, ServeArgs, create_app, with_adapter
from tests.test_generate import ids_of, tiny_generator

openai = pytest.importorskip("openai")


@pytest.fixture(autouse=True)
def _one_thread():
    # a tiny model: one thread is faster on the shared machine (see tests/test_generate.py)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@contextmanager
def running(app):
    """Serve app with uvicorn in a thread on a free 127.0.0.1 port; yield its /v1 base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def make_adapter(gen, out):
    from lora import LoraArgs, apply_lora, save_adapter
    import copy

    model = apply_lora(copy.deepcopy(gen.model), LoraArgs(r=4, targets=("wq", "wv", "w2")))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_adapter(model, LoraArgs(r=4, targets=("wq", "wv", "w2")), model.args, out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    base = tiny_generator(seed=3, allowed="abcdefgh ")
    news = with_adapter(base, make_adapter(base, tmp_path_factory.mktemp("adapter")))
    gens = {"tiny": base, "tiny-news": news}
    app = create_app(gens, ServeArgs(max_prompt_tokens=64, max_tokens=40, max_batch=8, batch_wait_ms=20))
    with running(app) as url:
        yield url, gens, app


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_base_and_each_adapter(client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-news"]


def test_completion_plain_and_streaming_equal_generate(client, served):
    gens = served[1]
    [ref] = gens["tiny"].generate(["abc"], GenerateArgs(max_new_tokens=20))
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref.prompt_tokens, 20)
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    # a stop string ends the text early, without the stop string itself
    stop = ref.text[6:8]
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == ref.text[:ref.text.index(stop)] and out.choices[0].finish_reason == "stop"


def test_chat_plain_and_streaming_equal_generate(client, served):
    gens = served[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "bag"}]
    [ref] = gens["tiny"].chat([messages], GenerateArgs(max_new_tokens=12))
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == ref.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


PICK = {"enum": ["bag", "cab"]}


@pytest.mark.parametrize("fmt, schema", [({"type": "json_object"}, {"type": "object"}),
                                         ({"type": "json_schema", "json_schema": {"name": "pick", "schema": PICK}},
                                          PICK)])
def test_response_format_decodes_json_as_generate_does(client, served, fmt, schema):
    messages = [{"role": "user", "content": "bag or cab?"}]
    [ref] = served[1]["tiny"].chat([messages], GenerateArgs(max_new_tokens=40, json_schema=json.dumps(schema)))
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                         response_format=fmt)
    text = out.choices[0].message.content
    assert text == ref.text and JsonConstraint(schema).feed(text.encode())  # a prefix of a matching value
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                 response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason == ref.finish_reason
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict) if schema == {"type": "object"} else json.loads(text) in PICK["enum"]


def test_adapter_is_chosen_by_model_name_and_shares_base_weights(client, served):
    gens = served[1]
    base_w = gens["tiny"].model.layers[0].attention.wq.weight
    assert gens["tiny-news"].model.layers[0].attention.wq.base.weight is base_w  # shared, not copied
    [ref_base] = gens["tiny"].generate(["fade"], GenerateArgs(max_new_tokens=16))
    [ref_news] = gens["tiny-news"].generate(["fade"], GenerateArgs(max_new_tokens=16))
    assert ref_base.text != ref_news.text
    for name, ref in (("tiny-news", ref_news), ("tiny", ref_base)):
        out = client.completions.create(model=name, prompt="fade", max_tokens=16, temperature=0)
        assert out.choices[0].text == ref.text


def test_seeded_sampling_repeats_and_n_gives_several_choices(client):
    kw = dict(model="tiny", prompt="dig", max_tokens=16, temperature=1.0, seed=5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    three = client.completions.create(**kw, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2] and three.choices[0].text == a.choices[0].text
    assert three.usage.completion_tokens == sum(len(c.text) for c in three.choices)  # one token per character


@pytest.mark.parametrize("path, body, status, words", [
    ("/completions", {"prompt": "abc"}, 400, "model"),
    ("/completions", {"model": "tiny", "prompt": "abc", "temperature": 5}, 400, "temperature"),
    ("/completions", {"model": "nope", "prompt": "abc"}, 404, "nope"),
    ("/completions", {"model": "tiny", "prompt": "x" * 80}, 400, "limit is 64"),
    ("/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 41}, 400, "limit of 40"),
    ("/completions", {"model": "tiny", "prompt": "abc", "logprobs": 3}, 400, "logprobs"),
    ("/completions", {"model": "tiny", "prompt": "abc", "n": 9}, 400, "n=9"),
    ("/completions", {"model": "tiny", "prompt": []}, 400, "empty"),
    ("/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/completions", {"model": "tiny", "prompt": "abc", "response_format": {"type": "yaml"}}, 400, "json_object"),
    ("/completions", {"model": "tiny", "prompt": "abc", "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"anyOf": [{"type": "string"}]}}}}, 400, "anyOf"),
])
def test_bad_requests_get_4xx_in_openai_error_shape(served, path, body, status, words):
    r = httpx.post(served[0] + path, json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"]


def test_malformed_json_and_unknown_route(served, client):
    r = httpx.post(served[0] + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.get(served[0] + "/nowhere").status_code == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="abc", temperature=3)


def test_bearer_key_is_required_when_configured(monkeypatch):
    monkeypatch.setenv("TEST_SERVE_KEY", "s3cret")
    app = create_app({"tiny": tiny_generator()}, ServeArgs(api_key_env="TEST_SERVE_KEY", max_prompt_tokens=64,
                                                            max_tokens=8))
    with running(app) as url:
        r = httpx.get(url + "/models")
        assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        out = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).completions.create(
            model="tiny", prompt="a", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
    monkeypatch.delenv("TEST_SERVE_KEY")
    with pytest.raises(ValueError, match="TEST_SERVE_KEY"):
        ServeArgs(api_key_env="TEST_SERVE_KEY")


def test_eight_concurrent_clients_all_get_complete_answers(client, served):
    gens = served[1]
    prompts = ["a", "bb cc", "dig a hole", "e", "fade", "gag", "hedge bag", "cab"]
    limits = [5, 30, 12, 40, 8, 20, 16, 25]
    refs = [gens["tiny"].generate([p], GenerateArgs(max_new_tokens=n))[0].text for p, n in zip(prompts, limits)]
    answers = [None] * 8

    def ask(i):
        if i % 2:  # half stream, half wait for the whole answer
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=limits[i], temperature=0,
                                               stream=True)
            answers[i] = "".join(c.choices[0].text for c in stream)
        else:
            answers[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=limits[i],
                                                   temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == refs


def test_batcher_runs_waiting_jobs_as_one_batch():
    gen = tiny_generator(seed=1)
    batcher = Batcher({"tiny": gen}, max_batch=8, wait_s=0.0)
    prompts = [ids_of(p) for p in ("a", "bull run", "ETH/BTC", "x", "flat", "SOL up", "down bad", "q")]
    args = [GenerateArgs(max_new_tokens=n) for n in (3, 9, 5, 12, 7, 1, 10, 4)]
    got, done = {}, threading.Event()

    def emit(i, row, text, result):
        if result is not None:
            got[i] = result.token_ids
            if len(got) == 8:
                done.set()

    for i, (p, a) in enumerate(zip(prompts, args)):  # all queued before the thread starts
        batcher.submit(Job("tiny", [p], [a], emit=lambda row, text, res, i=i: emit(i, row, text, res),
                           fail=pytest.fail))
    batcher.start()
    assert done.wait(60)
    batcher.stop()
    assert batcher.batches == 1
    for i, (p, a) in enumerate(zip(prompts, args)):
        assert got[i] == gen.generate_ids([p], a)[0].token_ids


def test_a_job_submitted_while_another_decodes_joins_its_batch():
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    batcher = Batcher({"tiny": gen}, max_batch=8, wait_s=0.0)
    first = (ids_of("bull run"), GenerateArgs(max_new_tokens=30, temperature=0.9, seed=11))
    second = (ids_of("a longer prompt than the first"), GenerateArgs(max_new_tokens=8))
    events, got, done = [], {}, threading.Event()

    def emit(name, row, text, result):
        events.append((name, result is not None))
        if name == "first" and len(events) == 1:  # first's first token: submit second while first decodes
            batcher.submit(Job("tiny", [second[0]], [second[1]], emit=lambda *ev: emit("second", *ev),
                               fail=pytest.fail))
        if result is not None:
            got[name] = result.token_ids
            if len(got) == 2:
                done.set()

    batcher.submit(Job("tiny", [first[0]], [first[1]], emit=lambda *ev: emit("first", *ev), fail=pytest.fail))
    batcher.start()
    assert done.wait(60)
    batcher.stop()
    # one running batch, which second joined; its tokens stream, and it ends, while first is still decoding
    assert (batcher.batches, batcher.joins, batcher.steps) == (1, 1, 30)
    assert events.index(("second", False)) < events.index(("second", True)) < events.index(("first", True))
    for name, (p, a) in (("first", first), ("second", second)):
        assert got[name] == gen.generate_ids([p], [a])[0].token_ids


def test_a_failing_job_fails_alone_while_others_decode():
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    batcher = Batcher({"tiny": gen}, max_batch=4, wait_s=0.0)
    args = GenerateArgs(max_new_tokens=20)
    bad = {"bad id": [[5, 10**6]], "empty": [[]], "too many": [[5]] * 5}  # a prefill that raises; never valid
    got, failed, done = [], {}, threading.Event()

    def emit(row, text, result):
        if len(got) == 0:  # while "ok" decodes
            for name, prompts in bad.items():
                batcher.submit(Job("tiny", prompts, [args] * len(prompts), emit=lambda *ev: None,
                                   fail=lambda message, name=name: failed.update({name: message})))
        got.append(result)
        if result is not None:
            done.set()

    batcher.submit(Job("tiny", [ids_of("dig")], [args], emit=emit, fail=pytest.fail))
    batcher.start()
    assert done.wait(60)
    batcher.stop()
    assert sorted(failed) == sorted(bad)
    assert "index out of range" in failed["bad id"] and "prompt 0 is empty" in failed["empty"]
    assert "max_batch=4" in failed["too many"]
    assert got[-1].token_ids == gen.generate_ids([ids_of("dig")], args)[0].token_ids


def test_a_request_sent_while_another_streams_joins_it_over_http():
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    # a slow model (10 ms a forward), so that the second request surely arrives while the first decodes
    gen.model.register_forward_pre_hook(lambda m, inp: time.sleep(0.01))
    app = create_app({"tiny": gen}, ServeArgs(max_prompt_tokens=32, max_tokens=64, batch_wait_ms=0))
    refs = [gen.generate(["bag"], GenerateArgs(max_new_tokens=60))[0].text,
            gen.generate(["head"], GenerateArgs(max_new_tokens=5))[0].text]
    with running(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        texts, second = [], {}
        ask = threading.Thread(target=lambda: second.update(text=client.completions.create(
            model="tiny", prompt="head", max_tokens=5, temperature=0).choices[0].text))
        for chunk in client.completions.create(model="tiny", prompt="bag", max_tokens=60, temperature=0,
                                               stream=True):
            texts.append(chunk.choices[0].text)
            if len(texts) == 1:
                ask.start()
            if "text" in second and "answered_at" not in second:
                second["answered_at"] = len(texts)
        ask.join(timeout=60)
    assert "".join(texts) == refs[0] and second["text"] == refs[1]
    assert second["answered_at"] < 60  # answered while the first was still streaming its 60 tokens
    batcher = app.state.batcher
    assert (batcher.batches, batcher.joins) == (1, 1)


def test_cli_bad_flags_exit_with_a_clear_message(capsys):
    from serve import main

    with pytest.raises(SystemExit) as e:
        main(["--port", "70000"])
    assert e.value.code == 2 and "port=70000 must be in [0, 65535]" in capsys.readouterr().err
