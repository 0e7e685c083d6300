"""LoRA training throughput: our loop (train_ddp.train) vs a transformers + peft loop, real (non-pad) tokens/s.

    python -m bench.train                     # embedded SmolLM2-135M, LoRA q,v r=8, max length 256, ~4 min
    python -m bench.train --steps 6 --micro-batch-size 2

Both sides train the same base weights on the same real instruction data (../shared/data/selfinstruct, Alpaca-GPT4
demo records in the chat template, prompt masked), with the same micro-batch, AdamW, clipping and precision. The
reference is the usual HF recipe: LlamaForCausalLM + peft.get_peft_model, batches in random order padded to their
longest example, logits over every position. Ours runs without packing (length-grouped batches) and with
packing (rows of --max-len tokens). Tokens/s counts only real tokens and skips the first --warmup steps.
fp32 decides the targets; bf16 (autocast, frozen base in bf16) is reported for both sides. Each side runs
--repeats times, alternating with the other, and its best run counts: the reference speeds up over the first runs
of a process (235 -> 274 tok/s in three runs here) while ours does not, so one cold run flatters us.
It also prints the matmul bound: the real tokens/s our forward + backward matrix products alone would allow at
the GEMM rate this CPU reaches on the model's shapes, and the best packed ratio that bound leaves.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli import parse_args
from precision import NAMES, choose_dtype

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "selfinstruct" / "alpaca_gpt4_en_demo999.json"


@dataclass
class BenchArgs:
    data: str = field(default=str(DATA), metadata={"help": "Alpaca JSON/JSONL records"})
    steps: int = field(default=10, metadata={"help": "optimizer steps per run"})
    warmup: int = field(default=2, metadata={"help": "steps left out of the timing"})
    micro_batch_size: int = field(default=4, metadata={"help": "rows per step (both sides)"})
    max_len: int = field(default=256, metadata={"help": "max tokens per example / packed row"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: PyTorch's default, one per core)"})
    repeats: int = field(default=2, metadata={"help": "runs per side, alternating; the best one counts"})
    precisions: tuple[str, ...] = field(default=("fp32", "auto"), metadata={
        "help": "fp32 and/or bf16; auto adds bf16 where precision.py picks it (a CPU with native bf16)"})

    def __post_init__(self):
        if self.steps <= self.warmup:
            raise ValueError(f"--steps={self.steps} must exceed --warmup={self.warmup}")
        if self.repeats < 1 or self.threads < 0:
            raise ValueError(f"--repeats={self.repeats} must be >= 1 and --threads={self.threads} >= 0")
        if "auto" in self.precisions:  # emulated bf16 (AVX2) is 4x slower than fp32: not worth a run there
            auto = NAMES[choose_dtype("auto", "cpu")]
            self.precisions = tuple(dict.fromkeys(auto if p == "auto" else p for p in self.precisions))
        if not set(self.precisions) <= {"fp32", "bf16"} or "fp32" not in self.precisions:
            raise ValueError(f"--precisions={self.precisions}: fp32 is required, bf16 optional")


def ours(args: BenchArgs, precision: str, pack: bool, out: Path) -> float:
    """Real tokens/s of train_ddp.train, from its own per-step metrics."""
    from checkpoint import load_model, load_tokenizer
    from train_ddp import TrainArgs, train

    targs = TrainArgs(data=args.data, out=str(out), max_steps=args.steps, micro_batch_size=args.micro_batch_size,
                      max_len=args.max_len, pack=pack, precision=precision, device="cpu", lora_targets=("wq", "wv"),
                      lora_r=8, val_fraction=0.0, eval_every=0, save_every=0, warmup_steps=2)
    train(targs, load_model(), load_tokenizer())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    return sum(r["tokens"] for r in recs) / sum(r["tokens"] / r["tok_s"] for r in recs)


def hf_peft(args: BenchArgs, precision: str, hf_dir: Path) -> float:
    """Real tokens/s of a plain transformers + peft loop on right-padded batches."""
    import peft
    import transformers

    from checkpoint import load_tokenizer
    from data import encode_records, load_records

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for p in model.parameters():  # adapters in fp32 over a bf16 base, as ours
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    examples, _ = encode_records(load_records(args.data), load_tokenizer(), args.max_len)
    random.Random(0).shuffle(examples)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    tokens, seconds = 0, 0.0
    for step in range(args.steps):
        batch = examples[step * args.micro_batch_size:(step + 1) * args.micro_batch_size]
        # HF shifts inside the model: give it the whole sequence and unshifted labels
        seqs = [e.tokens + e.labels[-1:] for e in batch]
        labels = [[-100] + e.labels for e in batch]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        lab = torch.tensor([x + [-100] * (T - len(x)) for x in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            tokens, seconds = tokens + sum(map(len, seqs)) - len(seqs), seconds + time.perf_counter() - t0
    return tokens / seconds


def matmul_bound(args: BenchArgs) -> dict[str, float]:
    """What matrix multiplication alone allows: our forward + backward matmul FLOPs per real token (base frozen, so
    activation gradients only; vocabulary projection at target positions only; attention excluded) over the GEMM
    rate this CPU reaches on the model's own shapes, and the reference's padding factor on the batches it timed."""
    from checkpoint import load_model, load_tokenizer
    from data import encode_records, load_records

    model = load_model()
    a = model.args
    layer = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)  # the 7 projections
    examples, _ = encode_records(load_records(args.data), load_tokenizer(), args.max_len)
    n_tok = sum(len(e.tokens) for e in examples)
    target_share = sum(sum(t != -100 for t in e.labels) for e in examples) / n_tok
    flops = 2 * 2 * (a.n_layers * layer + a.vocab_size * a.dim * target_share)  # 2 flops per MAC, fwd + bwd
    rate = 0.0
    for m, k, n in ((1024, a.dim, a.ffn_hidden), (1024, a.ffn_hidden, a.dim), (1024, a.dim, a.dim)):
        x, w = torch.randn(m, k), torch.randn(k, n)
        best = min(_timed(torch.mm, x, w) for _ in range(5))
        rate = max(rate, 2 * m * k * n / best)
    random.Random(0).shuffle(examples)  # the reference's batches, as hf_peft draws them
    timed = examples[args.warmup * args.micro_batch_size:args.steps * args.micro_batch_size]
    batches = [timed[i:i + args.micro_batch_size] for i in range(0, len(timed), args.micro_batch_size)]
    padded = sum(len(b) * max(len(e.tokens) for e in b) for b in batches)
    return {"gemm_gflops": rate / 1e9, "ours_bound_tok_s": rate / flops,
            "hf_pad_factor": padded / sum(len(e.tokens) for e in timed)}


def _timed(fn, *xs) -> float:
    t = time.perf_counter()
    fn(*xs)
    return time.perf_counter() - t


def run(args: BenchArgs) -> dict[str, float]:
    """Tokens/s of every (side, precision) pair."""
    from checkpoint import load_model, save_model

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(load_model(), tmp / "hf", format="hf")
        for precision in args.precisions:
            for rep in range(args.repeats):
                runs = {"hf_peft": lambda: hf_peft(args, precision, tmp / "hf"),
                        "ours_nopack": lambda: ours(args, precision, False, tmp / f"nopack_{precision}_{rep}"),
                        "ours_pack": lambda: ours(args, precision, True, tmp / f"pack_{precision}_{rep}")}
                for side, fn in runs.items():
                    key, tok_s = f"{side}_{precision}", fn()
                    print(f"{key} run {rep + 1}/{args.repeats}: {tok_s:.0f} real tokens/s", flush=True)
                    results[key] = max(results.get(key, 0.0), tok_s)
    return results


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, BenchArgs, description=__doc__)
    r = run(args)
    print(f"{torch.get_num_threads()} threads, micro-batch {args.micro_batch_size}, best of {args.repeats} runs each:")
    for name, tok_s in r.items():
        print(f"{name}: {tok_s:.0f} real tokens/s")
    b = matmul_bound(args)
    print(f"matmul bound: {b['gemm_gflops']:.0f} GFLOP/s GEMM (this CPU, model shapes) -> ours at most "
          f"{b['ours_bound_tok_s']:.0f} real tokens/s; packed fp32 reaches {r['ours_pack_fp32'] / b['ours_bound_tok_s']:.0%}"
          f" of it; the reference pads {b['hf_pad_factor']:.2f}x; best possible packed ratio here "
          f"{b['ours_bound_tok_s'] / r['hf_peft_fp32']:.2f}x")
    if "bf16" in args.precisions:
        for side in ("hf_peft", "ours_nopack", "ours_pack"):
            print(f"{side}_bf16_vs_fp32: {r[f'{side}_bf16'] / r[f'{side}_fp32']:.2f}x")
    for p in sorted(args.precisions, key=lambda p: p != "fp32"):  # the targets in fp32, then bf16 if measured
        name = "" if p == "fp32" else f"_{p}"
        print(f"train_vs_hf_peft_nopack{name}: {r[f'ours_nopack_{p}'] / r[f'hf_peft_{p}']:.2f}x (goal >= 1.2x)")
        print(f"train_vs_hf_peft_pack{name}: {r[f'ours_pack_{p}'] / r[f'hf_peft_{p}']:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
