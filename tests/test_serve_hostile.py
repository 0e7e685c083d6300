"""serve.py against hostile but fair clients (issue 14): extreme and malformed fields are 400s naming the field, a
request that fails inside generation fails alone, the batcher survives it, a client that goes away (or a request past
its timeout) frees its rows at the next decode step, a stopped batcher makes /health 503 and serve() exit 1, and
SIGTERM drains and exits. No timing assertion: tests assert on rows, steps and tokens; waits only guard against
hangs."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import generate
import precision
import serve
from generate import GenerateArgs
from serve import Batcher, Job, ServeArgs, create_app
from tests.test_generate import ids_of, tiny_generator
from tests.test_serve import running

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: see tests/test_generate.py
    yield
    torch.set_num_threads(2)


def slow_generator(seconds: float = 0.01):
    """A tiny model that takes `seconds` a forward, so that requests are surely still decoding when a test acts."""
    gen = tiny_generator(seed=3, allowed="abcdefgh ", max_seq_len=1024)
    gen.model.register_forward_pre_hook(lambda m, inp: time.sleep(seconds))
    return gen


def wait_until(cond, what: str, limit: float = 60.0) -> None:
    """Poll cond() until true; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def hostile():
    torch.set_num_threads(1)
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    app = create_app({"tiny": gen}, ServeArgs(max_prompt_tokens=64, max_tokens=40, max_batch=8, batch_wait_ms=0,
                                              max_request_bytes=200_000))
    with running(app) as url:
        yield url, gen, app


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# (fields added to a good completion request, the `param` the 400 names)
BAD_FIELDS = [
    ({"top_k": 10**9, "temperature": 1}, "top_k"),  # issue 14: killed the batcher
    ({"repetition_penalty": 1e-300, "temperature": 1}, "repetition_penalty"),  # issue 14: killed the batcher
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"top_k": -1}, "top_k"),
    ({"seed": 10**30}, "seed"),
    ({"seed": -2**64}, "seed"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 41}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 10**9}, "n"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": ["y" * 257]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": ["a"] * 10_000}, "prompt"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ({"response_format": schema_format({"type": "integer", "minimum": "a", "maximum": 3})}, "response_format"),
    ({"response_format": schema_format({"type": []})}, "response_format"),
    ({"response_format": schema_format({"enum": []})}, "response_format"),
    ({"response_format": schema_format({"type": "integer", "minimum": 5, "maximum": 4})}, "response_format"),
    ({"response_format": schema_format({"type": "object", "required": ["a"], "additionalProperties": False})},
     "response_format"),
    ({"response_format": schema_format(json.loads('{"items": ' * 40 + "{}" + "}" * 40))}, "response_format"),
    ({"response_format": schema_format({"enum": list(range(2000))})}, "response_format"),
]


@pytest.mark.parametrize("fields, param", BAD_FIELDS, ids=[str(f)[:40] for f, _ in BAD_FIELDS])
def test_every_bad_field_is_a_400_naming_it(hostile, fields, param):
    body = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": 5, **fields})
    r = httpx.post(hostile[0] + "/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_non_finite_numbers_and_bad_content_parts_are_400s(hostile):
    url = hostile[0]
    for name in ("temperature", "top_p", "presence_penalty", "repetition_penalty"):
        body = '{"model": "tiny", "prompt": "abc", "%s": NaN}' % name  # Python's json reads NaN; it must not pass
        r = httpx.post(url + "/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == name
    for part in ({"type": "image_url", "image_url": {"url": "http://x"}}, {"type": "text", "text": 5}, {"text": "a"}):
        r = httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1"
    r = httpx.post(url + "/chat/completions", json={"model": "tiny", "max_completion_tokens": 99,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_oversized_and_deeply_nested_bodies_are_4xx(hostile):
    url, headers = hostile[0], {"content-type": "application/json"}
    r = httpx.post(url + "/completions", content=b"x" * 300_000, headers=headers)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

    def chunked():  # no content-length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"a" * 10_000
        yield b'"}'

    assert httpx.post(url + "/completions", content=chunked(), headers=headers).status_code == 413
    deep = b'{"model": "tiny", "prompt": "a", "stream_options": {"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
    assert httpx.post(url + "/completions", content=deep, headers=headers).status_code == 400


def test_after_every_bad_request_the_server_still_answers_as_generate_does(hostile):
    url, gen, app = hostile
    for fields, _ in BAD_FIELDS[:2]:  # the two requests that used to stop all generation
        httpx.post(url + "/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 5, **fields})
    [ref] = gen.generate(["abc"], GenerateArgs(max_new_tokens=12))
    r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
    assert httpx.get(url[:-3] + "/health").json()["status"] == "ok" and app.state.batcher.healthy


def test_from_openai_bounds_and_maps_each_field():
    [a] = GenerateArgs.from_openai({"max_tokens": 7, "temperature": 0.5, "top_k": 259, "stop": "x", "seed": 9},
                                   vocab_size=259, max_tokens=40)
    assert (a.max_new_tokens, a.temperature, a.top_k, a.stop, a.seed) == (7, 0.5, 259, ("x",), 9)
    [d] = GenerateArgs.from_openai({}, vocab_size=259, max_tokens=40)  # OpenAI's defaults
    assert (d.max_new_tokens, d.temperature, d.top_p, d.stop, d.json_schema) == (40, 1.0, 1.0, (), "")
    three = GenerateArgs.from_openai({"n": 3, "seed": 2**64 - 3}, vocab_size=259, max_tokens=40, max_n=3)
    assert [x.seed for x in three] == [2**64 - 3, 2**64 - 2, 2**64 - 1]
    [t] = GenerateArgs.from_openai({"temperature": 1e-300, "top_p": 1e-300}, vocab_size=259)
    assert t.temperature == 0.0 and t.top_p > 0  # float32 would make them 0: greedy, and the top token only
    [j] = GenerateArgs.from_openai({"response_format": {"type": "json_object"}}, vocab_size=259)
    assert json.loads(j.json_schema) == {"type": "object"} and j.constraint() is not None
    for fields in ({"n": 4, "seed": 2**64 - 3}, {"top_k": 260}, {"max_tokens": True}, {"seed": 1.5}):
        with pytest.raises(ValueError) as e:
            GenerateArgs.from_openai(fields, vocab_size=259, max_n=4)
        assert e.value.param in fields and str(e.value).startswith(e.value.param)


def test_rows_with_non_finite_logits_fail_alone_and_the_others_decode_as_alone():
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    batcher = Batcher({"tiny": gen}, max_batch=4, wait_s=0.0)
    poisoned = {"done": False}

    def poison(module, inputs, out):  # the prefill of the two rows: row 0's logits become NaN
        if out.shape[0] == 2 and not poisoned["done"]:
            poisoned["done"] = True
            out[0] = float("nan")
        return out

    gen.model.register_forward_hook(poison)
    jobs = [(ids_of("bag"), GenerateArgs(max_new_tokens=10, temperature=1.0, seed=4)),  # sampling NaN would raise
            (ids_of("a head"), GenerateArgs(max_new_tokens=12, temperature=0.8, seed=5))]
    failed, got, done = {}, {}, threading.Event()
    for i, (p, a) in enumerate(jobs):
        batcher.submit(Job("tiny", [p], [a], emit=lambda row, text, res, i=i: res and (got.update({i: res}),
                                                                                        done.set()),
                           fail=lambda msg, i=i: failed.update({i: msg})))
    batcher.start()
    assert done.wait(60)
    batcher.stop()
    assert poisoned["done"] and list(failed) == [0] and "non-finite logits" in failed[0]
    assert got[1].token_ids == gen.generate_ids([jobs[1][0]], [jobs[1][1]])[0].token_ids
    assert (batcher.failed, batcher.live_rows, batcher.error) == (1, 0, None)


def test_a_prefill_shared_with_a_bad_job_is_retried_job_by_job():
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    batcher = Batcher({"tiny": gen}, max_batch=4, wait_s=0.0)
    args = GenerateArgs(max_new_tokens=9)
    failed, got, done = {}, {}, threading.Event()
    for name, prompt in (("good", ids_of("dig")), ("bad", [5, 10**6]), ("also good", ids_of("fade"))):
        batcher.submit(Job("tiny", [prompt], [args], emit=lambda row, text, res, name=name: res and (
            got.update({name: res.token_ids}), len(got) == 2 and done.set()),
            fail=lambda msg, name=name: failed.update({name: msg})))
    batcher.start()  # all three queued: one prefill, which fails, then one each
    assert done.wait(60)
    batcher.stop()
    assert list(failed) == ["bad"] and "index out of range" in failed["bad"]
    assert got == {"good": gen.generate_ids([ids_of("dig")], args)[0].token_ids,
                   "also good": gen.generate_ids([ids_of("fade")], args)[0].token_ids}


def test_a_decode_step_that_raises_fails_its_requests_and_the_batcher_goes_on(monkeypatch):
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    app = create_app({"tiny": gen}, ServeArgs(max_prompt_tokens=32, max_tokens=20, batch_wait_ms=0))
    real, calls = generate.RunningBatch.step, []

    def step(self):  # the third decode step raises, once
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return real(self)

    [ref] = gen.generate(["abc"], GenerateArgs(max_new_tokens=6))
    monkeypatch.setattr(generate.RunningBatch, "step", step)
    with running(app) as url:
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 6,
                                                   "temperature": 0}, timeout=60)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 6,
                                                   "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
        assert httpx.get(url[:-3] + "/health").status_code == 200
    assert app.state.batcher.failed == 1 and app.state.batcher.error is None


def test_abandoned_streams_free_their_rows_and_the_next_request_is_served():
    gen = slow_generator()
    app = create_app({"tiny": gen}, ServeArgs(max_prompt_tokens=32, max_tokens=200, max_batch=4, batch_wait_ms=0))
    batcher = app.state.batcher
    [ref] = gen.generate(["head"], GenerateArgs(max_new_tokens=2))
    with running(app) as url:
        with httpx.Client(timeout=60) as client:
            for prompt in ("bag", "cab", "dab", "fab"):  # four streams of 200 tokens, each left after 3 chunks
                with client.stream("POST", url + "/completions", json={
                        "model": "tiny", "prompt": prompt, "max_tokens": 200, "temperature": 0.9,
                        "stream": True}) as r:
                    assert [line for _, line in zip(range(3), (x for x in r.iter_lines() if x))]
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "head", "max_tokens": 2,
                                                   "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
        wait_until(lambda: batcher.live_rows == 0, "the abandoned rows leaving")
    assert batcher.cancelled == 4
    assert batcher.steps < 200  # the rows left long before their 200 tokens


def test_a_client_that_drops_a_plain_request_frees_its_rows():
    gen = slow_generator()
    app = create_app({"tiny": gen}, ServeArgs(max_prompt_tokens=32, max_tokens=300, batch_wait_ms=0))
    batcher = app.state.batcher
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s; 300 tokens take at least 3 s
            httpx.post(url + "/completions", json={"model": "tiny", "prompt": "bag", "max_tokens": 300}, timeout=0.5)
        wait_until(lambda: batcher.cancelled == 1 and batcher.live_rows == 0, "the dropped request's rows leaving")
    assert batcher.steps < 300


def test_a_request_past_the_timeout_gets_504_and_frees_its_rows():
    gen = slow_generator()
    app = create_app({"tiny": gen}, ServeArgs(max_prompt_tokens=32, max_tokens=300, batch_wait_ms=0,
                                              request_timeout_s=0.3))
    batcher = app.state.batcher
    with running(app) as url:
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "bag", "max_tokens": 300}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert "--request-timeout-s" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/completions", json={"model": "tiny", "prompt": "bag", "max_tokens": 300,
                                                               "stream": True}, timeout=60) as s:
            events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout"
        wait_until(lambda: batcher.live_rows == 0, "the timed-out rows leaving")
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "bag", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
    assert batcher.cancelled == 2 and batcher.steps < 600


def test_a_stopped_batcher_makes_health_503_and_requests_fail_at_once(monkeypatch):
    app = create_app({"tiny": tiny_generator()}, ServeArgs(max_prompt_tokens=32, max_tokens=8, batch_wait_ms=0))
    batcher = app.state.batcher
    with running(app) as url:
        assert httpx.get(url[:-3] + "/health").status_code == 200

        def broken():
            raise RuntimeError("a bug in the batcher")

        monkeypatch.setattr(batcher, "_admit", broken)
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and "a bug in the batcher" in r.json()["error"]["message"]
        health = httpx.get(url[:-3] + "/health")
        assert health.status_code == 503 and "a bug in the batcher" in health.json()["error"]["message"]
        # submitted after the thread ended: failed at once
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503


def test_serve_exits_1_when_its_batcher_stops(monkeypatch):
    app = create_app({"tiny": tiny_generator()}, ServeArgs(max_prompt_tokens=32, max_tokens=8, batch_wait_ms=0))
    batcher = app.state.batcher
    monkeypatch.setattr(batcher, "_admit", lambda: 1 / 0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    status = []
    thread = threading.Thread(target=lambda: status.append(serve.serve(app, ServeArgs(), sockets=[sock])))
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_until(lambda: _answers(url + "/v1/models"), "the server starting")
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4}, timeout=60)
    assert r.status_code == 503
    thread.join(60)
    sock.close()
    assert status == [1] and "ZeroDivisionError" in batcher.error


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


SERVER = textwrap.dedent("""
    import sys, time
    import torch
    import serve
    from tests.test_generate import tiny_generator
    torch.set_num_threads(1)
    gen = tiny_generator(seed=3, allowed="abcdefgh ", max_seq_len=2048)
    gen.model.register_forward_pre_hook(lambda m, inp: time.sleep(0.02))
    sargs = serve.ServeArgs(port=int(sys.argv[1]), max_prompt_tokens=32, max_tokens=2000, drain_s=1.0)
    sys.exit(serve.serve(serve.create_app({"tiny": gen}, sargs), sargs))
""")


def test_sigterm_drains_running_requests_then_exits(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is None and _answers(url + "/health"), "the server starting", 120)
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "bag",
                                                                 "max_tokens": 2000, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)  # 2000 tokens at 20 ms: far more than the 1 s drain
        # after its clean shutdown uvicorn re-raises the signal: the status of a process stopped by SIGTERM
        assert proc.wait(timeout=60) == -signal.SIGTERM, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert "shutting down" in events[-1]["error"]["message"]  # the drain ran out: the request failed, cleanly
    assert 3 <= len(events) < 2000


def test_dtype_is_auto_and_resolved_for_the_device(monkeypatch):
    seen = []
    monkeypatch.setattr(generate.Generator, "from_checkpoint", classmethod(
        lambda cls, checkpoint=None, adapter=None, dtype=None, device="cpu", **kw: seen.append((dtype, device)) or
        tiny_generator()))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100
    assert ServeArgs().dtype == "auto"
    for dtype, device, want in (("auto", "cuda", torch.float16), ("auto", "cpu", precision.choose_dtype("auto")),
                                ("float32", "cuda", torch.float32), ("bf16", "cpu", torch.bfloat16)):
        seen.clear()
        serve.load_generators(ServeArgs(dtype=dtype, device=device))
        assert seen == [(want, device)]
