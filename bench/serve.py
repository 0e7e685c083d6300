"""Serving throughput: 8 concurrent streaming clients against the same 8 requests sent one after another, on one
`python serve.py` process on 127.0.0.1 with the embedded SmolLM2 (aggregate generated tokens per second).

    python -m bench.serve                            # ~3 minutes on 2 quiet cores
    python -m bench.serve --max-tokens 32 --repeats 2 --dtype float32

Target: serve_8_concurrent_vs_sequential >= 4x (the server decodes concurrent requests in one running batch).
"""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.generate import PROMPTS
from cli import parse_args
from precision import choose_dtype

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchArgs:
    max_tokens: int = field(default=64, metadata={"help": "tokens per request"})
    clients: int = field(default=8, metadata={"help": "concurrent clients (and requests per round)"})
    repeats: int = field(default=3, metadata={"help": "rounds of each mode (medians reported)"})
    dtype: str = field(default="auto", metadata={"help": "the server's weights dtype; auto: precision.py's choice "
                                                         "for the CPU", "choices": ["auto", "float32", "bfloat16"]})
    batch_wait_ms: float = field(default=50.0, metadata={
        "help": "the server's --batch-wait-ms: clients started together reach a loaded server tens of ms apart"})

    def __post_init__(self):
        for name in ("max_tokens", "clients", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms={self.batch_wait_ms} must be >= 0")


def stream_completion(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> int:
    """Stream one completion; return its completion tokens (from the usage chunk)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    with client.stream("POST", f"{url}/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


def run_round(url: str, model: str, prompts: list[str], max_tokens: int, concurrent: bool) -> float:
    """Aggregate completion tokens per second of all prompts, sent at once or one after another."""
    counts = [0] * len(prompts)
    with httpx.Client(timeout=600) as client:
        def ask(i: int) -> None:
            counts[i] = stream_completion(client, url, model, prompts[i], max_tokens)

        t = time.perf_counter()
        if concurrent:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        else:
            for i in range(len(prompts)):
                ask(i)
        return sum(counts) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    (bargs,) = parse_args(argv, BenchArgs, description=__doc__)
    if bargs.dtype == "auto":  # resolved here, so the server gets a dtype name whatever its own default
        bargs.dtype = str(choose_dtype("auto", "cpu")).removeprefix("torch.")
    with socket.socket() as s:  # a free port for the server (it is released just before the server binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")  # the server's log, shown if it fails to start
    server = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--dtype", bargs.dtype,
                               "--max-batch", str(max(16, bargs.clients)), "--batch-wait-ms", str(bargs.batch_wait_ms)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"serve.py exited:\n{log.read()}")
            try:
                model = httpx.get(f"{url}/models", timeout=5).json()["data"][0]["id"]
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("serve.py did not answer within 300 s") from None
                time.sleep(0.5)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bargs.clients)]
        run_round(url, model, prompts[:2], 4, concurrent=True)  # warm up
        rates: dict[str, list[float]] = {"concurrent": [], "sequential": []}
        for r in range(bargs.repeats):
            rates["concurrent"].append(run_round(url, model, prompts, bargs.max_tokens, concurrent=True))
            rates["sequential"].append(run_round(url, model, prompts, bargs.max_tokens, concurrent=False))
            print(f"round {r + 1}: {bargs.clients} concurrent {rates['concurrent'][-1]:.1f} tokens/s, "
                  f"one after another {rates['sequential'][-1]:.1f} tokens/s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    conc, seq = statistics.median(rates["concurrent"]), statistics.median(rates["sequential"])
    print(f"median: concurrent {conc:.1f} tokens/s, sequential {seq:.1f} tokens/s ({bargs.dtype})")
    print(f"serve_{bargs.clients}_concurrent_vs_sequential: {conc / seq:.2f}x (goal >= 4x)")


if __name__ == "__main__":
    main()
