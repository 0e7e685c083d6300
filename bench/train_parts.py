"""Where a LoRA training step goes: forward + backward of fixed packed batches with one part of the model replaced by
a no-op at a time, so each part's in-place cost is the time it saves. The sum of the elementwise parts' savings says
how fast the loop could get if those kernels cost nothing; bench/train.py gives the reference's tokens/s to divide by.

    python -m bench.train_parts                # embedded SmolLM2-135M, LoRA q,v r=8, packed rows of 256, ~2 min
    python -m bench.train_parts --micro-batch-size 8 --repeats 3

The no-op variants compute something else (that is the point): only their time is meaningful. Variants alternate
and each keeps its best run, as the machine is shared.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.train import DATA
from cli import parse_args

ELEMENTWISE = ("rope", "norm", "swiglu", "dropout")  # the parts that are memory passes, not matrix products


@dataclass
class PartsArgs:
    data: str = field(default=str(DATA), metadata={"help": "Alpaca JSON/JSONL records"})
    micro_batch_size: int = field(default=4, metadata={"help": "packed rows per step"})
    max_len: int = field(default=256, metadata={"help": "packed row length"})
    steps: int = field(default=8, metadata={"help": "timed steps per run (different batches)"})
    repeats: int = field(default=2, metadata={"help": "runs per variant, alternating; the best one counts"})

    def __post_init__(self):
        if min(self.micro_batch_size, self.max_len, self.steps, self.repeats) < 1:
            raise ValueError("micro_batch_size, max_len, steps and repeats must be >= 1")


def variants(model) -> dict[str, Callable[[], None]]:
    """name -> function that switches the model to that variant: "full" is the real model; "attention" returns the
    queries (so the key/value projections get no gradient either); the others drop their part."""
    import model as M
    from lora import LoRALinear

    real = dict(rope=M.apply_rope, sdpa=M.F.scaled_dot_product_attention, norm=M.RMSNorm.forward,
                ff=M.FeedForward.forward, p=[m.dropout.p for m in model.modules() if isinstance(m, LoRALinear)])
    noop = dict(rope=lambda x, rot: x, sdpa=lambda q, k, v, **kw: q * 1.0, norm=lambda self, x: x,
                ff=lambda self, x: self.w2(self.w1(x) + self.w3(x)))

    def switch(off: str):
        M.apply_rope = noop["rope"] if off == "rope" else real["rope"]
        M.F.scaled_dot_product_attention = noop["sdpa"] if off == "attention" else real["sdpa"]
        M.RMSNorm.forward = noop["norm"] if off == "norm" else real["norm"]
        M.FeedForward.forward = noop["ff"] if off == "swiglu" else real["ff"]
        for m, p in zip((m for m in model.modules() if isinstance(m, LoRALinear)), real["p"]):
            m.dropout.p = 0.0 if off == "dropout" else p

    return {name: (lambda name=name: switch(name)) for name in ("full", "attention", *ELEMENTWISE)}


def main(argv: list[str] | None = None) -> None:
    from checkpoint import load_model, load_tokenizer
    from data import collate, encode_records, load_records, make_rows
    from lora import LoraArgs, apply_lora

    (args,) = parse_args(argv, PartsArgs, description=__doc__)
    model = apply_lora(load_model(), LoraArgs(targets=("wq", "wv"), r=8, alpha=16, dropout=0.05)).train()
    examples, _ = encode_records(load_records(args.data), load_tokenizer(), args.max_len)
    rows = make_rows(examples, args.max_len, pack_rows=True)
    mb = args.micro_batch_size
    batches = [collate(rows[i:i + mb], 0) for i in range(0, mb * (args.steps + 1), mb)]
    switch = variants(model)

    def run(name: str) -> float:
        """Seconds per step of forward + backward for a variant (the first batch warms up)."""
        switch[name]()
        total = 0.0
        for i, b in enumerate(batches):
            t = time.perf_counter()
            loss, _ = model(**b.inputs("cpu"))
            loss.backward()
            total += (time.perf_counter() - t) * (i > 0)
        model.zero_grad(set_to_none=True)
        return total / args.steps

    run("full")  # warm-up: the first passes of a process run slower (allocator, thread pool)
    best = {name: float("inf") for name in switch}
    for _ in range(args.repeats):
        for name in switch:
            best[name] = min(best[name], run(name))
    switch["full"]()
    tokens = sum(b.n_real for b in batches[1:]) / args.steps
    full = best["full"]
    print(f"{tokens:.0f} real tokens a step, micro-batch {mb}, rows of {args.max_len}")
    print(f"full step: {full * 1000:.0f} ms ({tokens / full:.0f} tok/s)")
    for name in ("attention", *ELEMENTWISE):
        print(f"  {name:9s} costs {(full - best[name]) * 1000:5.0f} ms")
    free = full - sum(full - best[name] for name in ELEMENTWISE)
    print(f"with {', '.join(ELEMENTWISE)} free: {free * 1000:.0f} ms a step, {tokens / free:.0f} tok/s "
          f"(divide by bench.train's hf_peft_fp32 for the best ratio those parts leave)")


if __name__ == "__main__":
    main()
