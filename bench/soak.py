"""Soak: drive one serve.py process on 127.0.0.1 for --seconds with a bounded mix of good, bad and abandoned requests
from --clients threads, then report the requests served, the answers by HTTP status, and the latency (p50/p95) of the
same good requests sent one at a time before and after the soak, and the server's resident memory over it.

    python -m bench.soak                      # ~3 minutes + start-up, the embedded SmolLM2
    python -m bench.soak --tiny --seconds 30  # a tiny random model: the harness itself, in seconds

The mix (seeded): good completions and chats, plain and streamed; bad requests that must be 4xx (the fields that used
to stop the server, non-finite numbers, unsupported parts, an oversized body, malformed JSON); abandoned requests (a
stream closed after two chunks, a plain request whose client gives up). Targets: soak_5xx: 0 and the server alive
with no live rows afterwards; nothing leaked that slows later requests: soak_cpu_per_request_after_vs_before <= 1.2x
(the server's CPU seconds per good request, from /proc: steady on a shared machine) and soak_p95_after_vs_before
<= 1.5x (latency, which other work on the machine moves). Memory is read every --sample-s seconds: the growth per 1,000
requests in the soak's second half against its first tells a leak (steady growth) from the allocator's warm-up
(levelling off).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli import parse_args

ROOT = Path(__file__).resolve().parent.parent
GOOD_PROMPTS = ["Bitcoin fell 3% today after", "The SEC said on Monday that", "Ethereum's next upgrade will",
                "Solana validators reported", "Stablecoin supply grew as", "Crypto markets opened the week"]
BAD_FIELDS = [{"top_k": 10**9, "temperature": 1}, {"repetition_penalty": 1e-300, "temperature": 1},
              {"seed": 10**30}, {"max_tokens": 10**9}, {"n": 10**6}, {"stop": ["x"] * 100}, {"temperature": -1},
              {"top_p": 0}, {"logprobs": 5}, {"model": "nope"},
              {"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": []}}}}]
TINY_SERVER = """
import sys, torch, serve
from checkpoint import load_tokenizer
from cli import parse_args
from generate import Generator
from model import ModelArgs, Transformer
(sargs,) = parse_args(sys.argv[1:], serve.ServeArgs)
tok = load_tokenizer(None)
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=1024))
sys.exit(serve.serve(serve.create_app({"tiny": Generator(model, tok)}, sargs), sargs))
"""


@dataclass
class SoakArgs:
    seconds: float = field(default=180.0, metadata={"help": "how long the mixed load runs"})
    clients: int = field(default=4, metadata={"help": "concurrent client threads"})
    tiny: bool = field(default=False, metadata={"help": "serve a tiny random model (the embedded tokenizer)"})
    probes: int = field(default=12, metadata={"help": "good requests timed one at a time before and after"})
    max_tokens: int = field(default=16, metadata={"help": "tokens per good request"})
    seed: int = field(default=0, metadata={"help": "seed of the request mix"})
    sample_s: float = field(default=5.0, metadata={"help": "seconds between readings of the server's resident memory"})

    def __post_init__(self):
        for name in ("seconds", "sample_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("clients", "probes", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def start_server(args: SoakArgs) -> tuple[subprocess.Popen, str, str]:
    """(process, base URL, model name) of a fresh server on a free 127.0.0.1 port, once it answers /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--port", str(port), "--max-batch", "8", "--max-tokens", "128", "--max-prompt-tokens", "512",
             "--request-timeout-s", "60", "--drain-s", "5"]
    cmd = [sys.executable, "-c", TINY_SERVER, *flags] if args.tiny else \
        [sys.executable, "serve.py", "--name", "soak", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    return proc, url, "tiny" if args.tiny else "soak"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def good_request(client: httpx.Client, url: str, model: str, rng: random.Random, max_tokens: int) -> int:
    """One good completion or chat, plain or streamed; its HTTP status (a stream must end with [DONE])."""
    prompt, stream = rng.choice(GOOD_PROMPTS), rng.random() < 0.5
    common = {"model": model, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]), "stream": stream}
    if rng.random() < 0.5:
        path, body = "/v1/completions", {**common, "prompt": prompt}
    else:
        path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    if not stream:
        r = client.post(url + path, json=body)
        return r.status_code if r.status_code != 200 or r.json()["choices"] else 599
    with client.stream("POST", url + path, json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    return r.status_code if r.status_code != 200 or lines[-1] == "data: [DONE]" else 598  # 598: a broken stream


def bad_request(client: httpx.Client, url: str, model: str, rng: random.Random) -> int:
    """One request the server must refuse with a 4xx; its HTTP status."""
    kind = rng.randrange(5)
    headers = {"content-type": "application/json"}
    if kind == 0:
        return client.post(url + "/v1/completions", content=b"{not json", headers=headers).status_code
    if kind == 1:  # over the 4 MiB default of --max-request-bytes
        return client.post(url + "/v1/completions", content=b" " * (5 << 20), headers=headers).status_code
    if kind == 2:
        body = '{"model": "%s", "prompt": "a", "temperature": NaN}' % model
        return client.post(url + "/v1/completions", content=body, headers=headers).status_code
    if kind == 3:
        return client.post(url + "/v1/chat/completions", json={"model": model, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}).status_code
    body = {"model": model, "prompt": "a", "max_tokens": 4, **rng.choice(BAD_FIELDS)}
    return client.post(url + "/v1/completions", json=body).status_code


def abandoned_request(client: httpx.Client, url: str, model: str, rng: random.Random) -> str:
    """A long request its client leaves: a stream closed after two chunks, or a plain request given up after
    0.3 s."""
    body = {"model": model, "prompt": rng.choice(GOOD_PROMPTS), "max_tokens": 128, "temperature": 0.8}
    if rng.random() < 0.5:
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            for i, _ in enumerate(x for x in r.iter_lines() if x):
                if i == 1:
                    break
        return "abandoned stream"
    try:
        client.post(url + "/v1/completions", json=body, timeout=0.3)
        return "abandoned plain (answered first)"
    except httpx.TimeoutException:
        return "abandoned plain"


def probe(url: str, model: str, n: int, max_tokens: int) -> list[float]:
    """Seconds of n good greedy requests sent one at a time to an otherwise idle server."""
    times = []
    with httpx.Client(timeout=300) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/completions", json={"model": model, "prompt": GOOD_PROMPTS[i % 6],
                                                           "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
    return times


def server_usage(pid: int) -> tuple[float, float] | None:
    """(CPU seconds so far, resident MiB) of the server process from /proc (None where there is none): CPU time per
    request hardly depends on what else runs on a shared machine, unlike latency."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(stat[11]) + int(stat[12])) / ticks, int(rss.split()[1]) / 1024


def timed_probe(proc: subprocess.Popen, url: str, model: str, args: SoakArgs) -> dict:
    """probe() latencies, with the server's CPU seconds per request and resident MiB over it (None without /proc)."""
    start = server_usage(proc.pid)
    times = probe(url, model, args.probes, args.max_tokens)
    end = server_usage(proc.pid)
    cpu, rss = ((end[0] - start[0]) / args.probes, end[1]) if start and end else (None, None)
    return {"times": times, "cpu": cpu, "rss": rss}


def soak(url: str, model: str, args: SoakArgs, pid: int) -> tuple[Counter, Counter, list[float], list[tuple]]:
    """Run the mix on `clients` threads for `seconds`: (HTTP statuses, request kinds, good latencies under load,
    RSS samples). A sampler reads the server's resident MiB every `sample_s` as (seconds in, requests finished, MiB):
    memory that levels off is the allocator keeping freed blocks; memory that grows with the requests is a leak."""
    statuses, kinds, loaded, lock = Counter(), Counter(), [], threading.Lock()
    samples, done = [], threading.Event()
    t_start = time.monotonic()
    stop_at = t_start + args.seconds

    def sample() -> None:
        use = server_usage(pid)
        with lock:
            finished = sum(kinds.values())
        if use is not None:
            samples.append((time.monotonic() - t_start, finished, use[1]))

    def sampler() -> None:
        sample()
        while not done.wait(args.sample_s):
            sample()
        sample()  # the end: every client has finished

    def client_loop(k: int) -> None:
        rng = random.Random(args.seed * 1000 + k)
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < stop_at:
                pick = rng.random()
                t0 = time.perf_counter()
                try:
                    if pick < 0.4:
                        kind, status = "good", good_request(client, url, model, rng, args.max_tokens)
                    elif pick < 0.7:
                        kind, status = "bad", bad_request(client, url, model, rng)
                    else:
                        kind, status = abandoned_request(client, url, model, rng), None
                except httpx.TransportError as e:
                    kind, status = "transport error", type(e).__name__
                with lock:
                    kinds[kind] += 1
                    if status is not None:
                        statuses[status] += 1
                    if kind == "good" and status == 200:
                        loaded.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
    watch = threading.Thread(target=sampler)
    for t in [watch, *threads]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    return statuses, kinds, loaded, samples


def rss_trend(samples: list[tuple]) -> dict | None:
    """Resident MiB at the start and at each quarter of the soak, and the growth in MiB per 1,000 requests over its
    first half and its second (None with fewer than 3 samples). A second-half rate near 0 against the first says the
    memory levelled off."""
    if len(samples) < 3:
        return None
    end = samples[-1][0]

    def at(frac: float) -> tuple:
        return min(samples, key=lambda s: abs(s[0] - frac * end))

    def rate(a: tuple, b: tuple) -> float:
        return (b[2] - a[2]) / max(b[1] - a[1], 1) * 1000

    first, mid, last = at(0), at(0.5), samples[-1]
    return {"quarters": [at(q)[2] for q in (0, 0.25, 0.5, 0.75)] + [last[2]],
            "first_half": rate(first, mid), "second_half": rate(mid, last), "peak": max(s[2] for s in samples)}


def percentiles(xs: list[float]) -> str:
    if len(xs) < 2:
        return "n/a"
    q = statistics.quantiles(xs, n=20)
    return f"p50 {statistics.median(xs):.3f} s, p95 {q[-1]:.3f} s (n={len(xs)})"


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, SoakArgs, description=__doc__)
    proc, url, model = start_server(args)
    try:
        probe(url, model, 2, args.max_tokens)  # warm-up
        before = timed_probe(proc, url, model, args)
        t0 = time.perf_counter()
        statuses, kinds, loaded, samples = soak(url, model, args, proc.pid)
        took = time.perf_counter() - t0
        deadline = time.monotonic() + 120  # abandoned rows leave at the next decode step
        while (health := httpx.get(url + "/health", timeout=30)).status_code == 200 and \
                health.json()["live_rows"] and time.monotonic() < deadline:
            time.sleep(0.2)
        after = timed_probe(proc, url, model, args)
        health = httpx.get(url + "/health", timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    report(args, took, statuses, kinds, loaded, before, after, health, code, rss_trend(samples))


def report(args, took, statuses, kinds, loaded, before: dict, after: dict, health, code, trend=None) -> None:
    served = sum(statuses.values()) + sum(v for k, v in kinds.items() if k.startswith("abandoned"))
    five = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)
    print(f"soak: {served} requests in {took:.0f} s from {args.clients} clients ({'tiny' if args.tiny else 'SmolLM2'})")
    print(f"soak: kinds {dict(sorted(kinds.items()))}")
    print(f"soak: statuses {dict(sorted(statuses.items(), key=str))}")
    for name, p in (("before", before), ("after", after)):
        use = "" if p["cpu"] is None else f"; server CPU {p['cpu']:.3f} s a request, RSS {p['rss']:.0f} MiB"
        print(f"soak: good requests one at a time, {name:6s} {percentiles(p['times'])}{use}")
    print(f"soak: good requests under the mixed load: {percentiles(loaded)}")
    print(f"soak: /health after: {health.status_code} {health.text}; exit status after SIGTERM: {code}")
    print(f"soak_5xx: {five} (goal 0)")
    p95 = [statistics.quantiles(p["times"], n=20)[-1] for p in (before, after)]
    print(f"soak_p95_after_vs_before: {p95[1] / p95[0]:.2f}x (goal <= 1.5x; latency: noisy on a shared machine)")
    if before["cpu"] and after["cpu"]:
        print(f"soak_cpu_per_request_after_vs_before: {after['cpu'] / before['cpu']:.2f}x (goal <= 1.2x)")
    if trend:
        print(f"soak: server RSS at start, 1/4, 1/2, 3/4, end of the soak: "
              f"{', '.join(f'{m:.0f}' for m in trend['quarters'])} MiB (peak {trend['peak']:.0f})")
        print(f"soak_rss_growth_per_1k_requests: first half {trend['first_half']:.1f} MiB, second half "
              f"{trend['second_half']:.1f} MiB (a leak keeps growing in the second half; allocator reuse levels off)")


if __name__ == "__main__":
    main()
