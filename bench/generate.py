"""Decoding speed of generate.py on the embedded SmolLM2-135M against transformers' `generate`, in one process with
the same prompt ids, dtype and threads (2). Measurements alternate between the two and the medians are compared.

    python -m bench.generate                       # ~3 minutes on 2 quiet cores
    python -m bench.generate --new-tokens 32 --repeats 3

Targets: single-stream greedy fp32 >= 3x transformers; 16 prompts batched >= 8x transformers' single stream;
bf16 single stream >= 0.7x the memory-bandwidth bound (read bandwidth / weight bytes per token).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from cli import parse_args
from generate import GenerateArgs, Generator

PROMPTS = [  # short crypto-news openings of different lengths (written in-house)
    "Bitcoin rose 4% on Monday after",
    "Ethereum developers said the next network upgrade",
    "The SEC delayed its decision on",
    "Solana's price fell sharply as traders",
    "Stablecoin issuers reported that",
    "A major exchange halted withdrawals on Tuesday, citing",
    "Analysts expect the halving to",
    "On-chain data shows long-term holders",
    "The central bank's rate decision weighed on crypto markets, and",
    "Ripple's legal battle",
    "Miners sold more coins than usual because",
    "DeFi protocols lost",
    "Regulators in Europe published rules that",
    "The token unlock next week could",
    "Institutional demand for spot ETFs",
    "Dogecoin jumped after",
]


@dataclass
class BenchArgs:
    new_tokens: int = field(default=64, metadata={"help": "tokens generated per prompt"})
    repeats: int = field(default=5, metadata={"help": "alternating measurements per variant (medians reported)"})
    threads: int = field(default=2, metadata={"help": "torch threads for both implementations"})

    def __post_init__(self):
        for name in ("new_tokens", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def ours_rate(gen: Generator, prompts: list[list[int]], n: int) -> tuple[float, list[int]]:
    """Aggregate generated tokens per second of one batched greedy call (prefill included), and row 0's tokens."""
    t = time.perf_counter()
    res = gen.generate_ids(prompts, GenerateArgs(max_new_tokens=n))
    return sum(r.completion_tokens for r in res) / (time.perf_counter() - t), res[0].token_ids


def hf_rate(hf, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        dt = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) / dt, out[0, ids.shape[1]:].tolist()


def read_bandwidth(x: torch.Tensor) -> float:
    """Bytes per second that summing x (far larger than the caches) reads, best of 3."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from checkpoint import embedded_model_path, load_model, load_tokenizer

    (bargs,) = parse_args(argv, BenchArgs, description=__doc__)
    torch.set_num_threads(bargs.threads)
    path = embedded_model_path()
    tok = load_tokenizer()
    fp32 = Generator(load_model(dtype=torch.float32), tok)
    bf16 = Generator(load_model(dtype=torch.bfloat16), tok)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [fp32.encode(p) for p in PROMPTS]
    n = bargs.new_tokens

    weight_bytes = sum(p.numel() * p.element_size() for p in bf16.model.parameters())  # tied weights count once
    big = torch.ones(2**28, dtype=torch.float32)  # 1 GiB for the bandwidth probe
    ours_rate(fp32, prompts[:1], 4), hf_rate(hf, prompts[0], 4), ours_rate(bf16, prompts[:1], 4)  # warm up
    # the machine is shared: every round measures all variants back to back, and the ratios of each round are
    # taken before the medians, so that load changes between rounds cancel out
    keys = ("ours fp32", "transformers fp32", "ours fp32 x16", "ours bf16", "bf16 bound")
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(bargs.repeats):
        rate, ours_ids = ours_rate(fp32, prompts[:1], n)
        rates["ours fp32"].append(rate)
        rate, hf_ids = hf_rate(hf, prompts[0], n)
        rates["transformers fp32"].append(rate)
        rates["ours fp32 x16"].append(ours_rate(fp32, prompts, n)[0])
        rates["ours bf16"].append(ours_rate(bf16, prompts[:1], n)[0])
        rates["bf16 bound"].append(read_bandwidth(big) / weight_bytes)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print(f"greedy tokens identical to transformers: {ours_ids == hf_ids[:len(ours_ids)]}")
    print(", ".join(f"{k} {v:.1f}" for k, v in med.items()) + " tokens/s (medians)")
    print(f"bf16 weights {weight_bytes / 1e6:.0f} MB per token; read bandwidth "
          f"{med['bf16 bound'] * weight_bytes / 1e9:.1f} GB/s")
    print(f"decode_1_vs_transformers: {ratio('ours fp32', 'transformers fp32'):.2f}x (goal >= 3x)")
    print(f"decode_16_batched_vs_transformers_1: {ratio('ours fp32 x16', 'transformers fp32'):.2f}x (goal >= 8x)")
    print(f"decode_bf16_of_bandwidth_bound: {ratio('ours bf16', 'bf16 bound'):.2f}x (goal >= 0.7x)")


if __name__ == "__main__":
    main()
