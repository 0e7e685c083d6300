"""The whole Self-Instruct pipeline against a scripted OpenAI-compatible server on 127.0.0.1 (real openai client)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data import load_records
from llm import LLM, LLMArgs, LLMRequestError
from selfinstruct import prepare as prepare_mod
from selfinstruct.pipeline import SelfInstructArgs, main, run
from selfinstruct.store import file_digests
from tests.conftest import SHARED_DATA
from tests.fakeopenai import FakeOpenAI
from tests.selfinstruct import scripted_llm

ARTICLES = [  # written for these tests
    {"url": "https://news.example/a1", "title": "Bitcoin rose after ETF inflows",
     "text": "Bitcoin rose 5 percent on Tuesday after record inflows into spot ETFs. Analysts said BTC could test "
             "its previous high. Trading volume doubled on major exchanges."},
    {"url": "https://news.example/a2", "title": "Validator upgrade ships",
     "text": "HALLUCINATE The ETH validator upgrade shipped on mainnet without incident. Fees on rollups fell "
             "sharply in the first hour. Developers thanked the testers."},
    {"url": "https://news.example/a3", "title": "Exchange outage",
     "text": "BROKEN A large exchange paused SOL withdrawals for two hours. The company blamed a node bug. "
             "Withdrawals resumed in the afternoon."},
]


class _Files(BaseHTTPRequestHandler):
    """Serves the real seed file; the first request of a run can be a 503 with Retry-After (a retry test)."""

    def do_GET(self):  # noqa: N802
        server = self.server
        server.hits += 1
        if server.fail_first and server.hits == 1:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = server.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def file_server():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.hits, httpd.fail_first = 0, False
    httpd.files = {"/seed_tasks.jsonl": (SHARED_DATA / "selfinstruct" / "seed_tasks.jsonl").read_bytes()}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def articles(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("articles") / "articles.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in ARTICLES))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, file_server, articles) -> Path:
    """An uninterrupted run without cache: what every resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with FakeOpenAI(scripted_llm.respond) as server, _llm(server.base_url, None) as llm:
        run(_args(out, file_server, articles), llm)
    return out


def _args(out: Path, file_server, articles: Path, **kw) -> SelfInstructArgs:
    return SelfInstructArgs(out=out, num_instructions=16, request_batch_size=3, seed_url=file_server.url +
                            "/seed_tasks.jsonl", download_dir=out.parent / "downloads", articles=articles, **kw)


def _llm(base_url: str, cache: Path | None, concurrency: int = 2) -> LLM:
    return LLM(LLMArgs(base_url=base_url, cache=str(cache) if cache else None, concurrency=concurrency,
                       max_retries=0, backoff=0.01))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_end_to_end(tmp_path, file_server, articles):
    file_server.hits, file_server.fail_first = 0, True  # the seed download retries after the server's Retry-After
    out = tmp_path / "run"
    with FakeOpenAI(scripted_llm.respond) as server, _llm(server.base_url, tmp_path / "cache.sqlite") as llm:
        stats = run(_args(out, file_server, articles), llm)
    train, val = _read(out / "train.jsonl"), _read(out / "val.jsonl")
    for rec in train + val:
        assert set(rec) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in rec.values())
        assert rec["instruction"] and rec["output"]
    assert load_records(out / "train.jsonl") == train and val  # what the fine-tuning stage reads
    boot = stats["bootstrap"]
    assert boot["kept"] >= 16
    # every kind of bad output was met, skipped and counted
    for reason in ("keyword", "too_short", "duplicate", "rouge", "no_numbered_list", "empty_answer",
                   "truncated_answer"):
        assert boot["removed"].get(reason, 0) > 0, reason
    for reason in ("unparseable", "copies_input", "duplicate", "empty_answer"):
        assert stats["instances"]["removed"].get(reason, 0) > 0, reason
    assert stats["classify"]["classification"] > 0 and stats["classify"]["instructions"] == boot["kept"]
    assert stats["grounding"]["malformed_or_unsupported"] == {"qa": 1, "extract": 1, "sentiment": 1, "summary": 1}
    assert stats["grounding"]["records"] == 8
    # the crypto trap: tickers keep their capitals (str.capitalize would give "Btc")
    machine = [i for row in _read(out / "bootstrap.jsonl") for i in row["kept"]]
    assert any(t in i for i in machine for t in scripted_llm.TICKERS)
    assert not any(t.capitalize() in i.split() for i in machine for t in scripted_llm.TICKERS)
    texts = {r["instruction"] for r in train + val}
    assert set(machine) & texts and "Suggest some games that can be played by a group of people." in texts
    # the repaired answer (first answer not in the article) made it; the broken article did not
    grounded = [r["input"] for r in train + val if r["input"].startswith("Article: ")]
    assert any("HALLUCINATE" in g for g in grounded) and not any("BROKEN" in r["input"] for r in train + val)
    assert json.loads((out / "stats.json").read_text())["bootstrap"] == boot
    file_server.fail_first = False
    assert file_server.hits == 2  # one 503, then the download
    with FakeOpenAI(scripted_llm.respond) as server, _llm(server.base_url, tmp_path / "cache.sqlite") as llm:
        assert run(_args(out, file_server, articles), llm)["llm_usage"]["requests"] == 0  # all state on disk
    assert file_server.hits == 2  # the verified cached seeds are reused


class _CrashAfter:
    """Answers like the scripted model until `n` requests were answered, then fails every request with HTTP 400
    (not retryable: the run stops there, as after a crash or Ctrl-C)."""

    def __init__(self, n: int):
        self.n, self.answered, self.lock = n, [], threading.Lock()

    def __call__(self, path, body):
        with self.lock:
            if len(self.answered) >= self.n:
                return 400, {}, {"error": {"message": "injected crash"}}
            self.answered.append(json.dumps(body, sort_keys=True))
        return scripted_llm.respond(path, body)


# the reference run sends 12 bootstrap, 21 classification, 21 instance and 17 grounding requests: crash in
# bootstrap (mid-batch), classification and grounding, with the LLM cache (2 threads) and without it (1 thread:
# the JSONL state alone must avoid repeats)
@pytest.mark.parametrize("crash_after,cached,concurrency", [(4, True, 2), (25, False, 1), (62, False, 1)])
def test_resume_after_crash_repeats_no_request(tmp_path, file_server, articles, reference, crash_after, cached,
                                               concurrency):
    out = tmp_path / "resumed"
    cache = tmp_path / "cache.sqlite" if cached else None
    crash = _CrashAfter(crash_after)
    with FakeOpenAI(crash) as server, _llm(server.base_url, cache, concurrency) as llm:
        with pytest.raises(LLMRequestError):
            run(_args(out, file_server, articles), llm)
    with FakeOpenAI(scripted_llm.respond) as server, _llm(server.base_url, cache, concurrency) as llm:
        run(_args(out, file_server, articles), llm)
        again = [json.dumps(r["body"], sort_keys=True) for r in server.requests]
    assert crash.answered and not set(crash.answered) & set(again)
    for name in ("train.jsonl", "val.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()


def test_completion_endpoint(tmp_path, file_server, articles):
    """--no-chat: /v1/completions with the paper's continue-the-list prompt."""
    out = tmp_path / "run"
    with FakeOpenAI(scripted_llm.respond) as server, _llm(server.base_url, None) as llm:
        stats = run(_args(out, file_server, None, chat=False), llm)
        assert {r["path"] for r in server.requests} == {"/v1/completions"}
        first = server.requests[0]["body"]  # the paper's bootstrap request
        assert first["prompt"].startswith("Come up with a series of tasks:\n1. ")
        assert first["prompt"].endswith("\n9.")
        assert (first["temperature"], first["top_p"], first["presence_penalty"], first["max_tokens"]) == (
            0.7, 0.5, 2.0, 1024) and first["stop"] == ["\n\n", "\n16", "16.", "16 ."]
    assert stats["bootstrap"]["kept"] >= 8 and stats["instances"]["instances"] > 0
    assert _read(out / "train.jsonl")


def test_mixing_with_general_data(tmp_path, file_server, articles, monkeypatch):
    """--mix downloads a general set (verified by git blob id) and fills (1 - domain_ratio) of train.jsonl."""
    sample = SHARED_DATA / "selfinstruct" / "alpaca_data_first100.json"
    file_server.files["/alpaca_data.json"] = sample.read_bytes()
    monkeypatch.setitem(prepare_mod.SOURCES, "alpaca",
                        (file_server.url + "/alpaca_data.json", file_digests(sample)["git_blob"]))
    out = tmp_path / "run"
    with FakeOpenAI(scripted_llm.respond) as server, _llm(server.base_url, None) as llm:
        stats = run(_args(out, file_server, articles, mix=("alpaca",), domain_ratio=0.8), llm)
    n_domain, n_general = stats["prepare"]["domain_train"], stats["prepare"]["general_alpaca"]
    assert n_general == round(n_domain * (1 - 0.8) / 0.8)
    general = {json.dumps(r, sort_keys=True) for r in prepare_mod._records(sample)}
    train = [json.dumps(r, sort_keys=True) for r in _read(out / "train.jsonl")]
    assert len(train) == n_domain + n_general and sum(t in general for t in train) == n_general
    monkeypatch.setitem(prepare_mod.SOURCES, "alpaca", (file_server.url + "/alpaca_data.json", "0" * 40))
    (tmp_path / "downloads" / "alpaca_data.json").unlink()
    with pytest.raises(ValueError, match="checksum mismatch"):
        prepare_mod.load_general(["alpaca"], tmp_path / "downloads")


def test_cli(tmp_path, file_server, articles, capsys):
    out = tmp_path / "run"
    with FakeOpenAI(scripted_llm.respond) as server:
        main(["--out", str(out), "--num-instructions", "3", "--seed-url", file_server.url + "/seed_tasks.jsonl",
              "--download-dir", str(tmp_path / "dl"), "--base-url", server.base_url, "--cache", "none",
              "--articles", str(articles), "--ground-tasks", "qa,summary"])
    assert "train.jsonl" in capsys.readouterr().out and _read(out / "train.jsonl")
    for bad in (["--domain-ratio", "0"], ["--ground-tasks", "poem"], ["--articles", str(tmp_path / "none.jsonl")],
                ["--machine-in-prompt", "5", "--crypto-in-prompt", "5"]):
        with pytest.raises(SystemExit):
            main(bad)
        assert bad[0].lstrip("-").replace("-", "_") in capsys.readouterr().err
