"""The GPU check: one script for a person with one CUDA GPU (at most 8 minutes). It runs the CUDA tests
(tests/test_cuda.py), times LoRA training (tokens/s, peak memory, MFU) and greedy decoding (single stream and 16
batched, and as a share of the memory-bandwidth bound) against transformers + peft in the same process on a 1B- and
a 7B-shaped LLaMA with random weights, and checks the memory plan against the measured peak. It ends with one line
per target, `<target>: <value> (goal ...)`, and writes every figure to a JSON file.

    make gpu-check PY=python3                                   # the GPU box's own python: no .venv, no downloads
    python3 -m bench.gpu_check --precisions fp16                # the V100 path only (fp16 autocast + GradScaler)
    python -m bench.gpu_check --device cpu --tiny               # tiny shapes on the CPU in seconds (CI: no rot)

Needs torch, transformers, peft, safetensors and pytest; nothing is downloaded (the models are random). Every CUDA
call sits behind the device chosen here, so the same code runs on the CPU with --tiny.
"""
from __future__ import annotations

import functools
import math
import platform
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

import train_ddp
from data import Batch
from generate import GenerateArgs, Generator
from jsonl import write_json
from lora import LoraArgs
from memory_plan import PRESETS, GiB, param_counts
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
# dense fp16/bf16 tensor-core peaks (vendor data sheets, SXM parts), for MFU; other GPUs use the measured matmul rate
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "V100": 125, "L40S": 362, "A10": 125, "L4": 121, "T4": 65,
               "RTX 4090": 165, "RTX 3090": 71}
TINY = {"1b": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=160, max_seq_len=128),
        "7b": ModelArgs(dim=96, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=256, max_seq_len=128)}
LORA = LoraArgs(r=8, alpha=16, dropout=0.05, targets=("wq", "wv"))


@dataclass
class CheckArgs:
    device: str = field(default="auto", metadata={"help": "auto: cuda when there is a GPU; cpu needs --tiny"})
    tiny: bool = field(default=False, metadata={"help": "tiny shapes and few steps (the CPU check in CI)"})
    precisions: tuple[str, ...] = field(default=("auto",), metadata={
        "help": "fp16, bf16, fp32; auto: fp16 and (where supported) bf16 on CUDA, fp32 and bf16 on the CPU"})
    models: tuple[str, ...] = field(default=("1b", "7b"), metadata={"help": "model shapes: 1b, 7b"})
    micro_batch_size: int = field(default=4, metadata={"help": "training rows per step (tiny: 2)"})
    seq_len: int = field(default=512, metadata={"help": "training tokens per row (tiny: 32)"})
    train_steps: int = field(default=6, metadata={"help": "timed training steps, after 2 warm-up steps"})
    new_tokens: int = field(default=64, metadata={"help": "greedy tokens per decoding measurement (tiny: 8)"})
    tests: bool = field(default=True, metadata={"help": "run tests/test_cuda.py first"})
    out: str = field(default="out/gpu_check.json", metadata={"help": "JSON file of every figure"})
    mode: Literal["all", "train", "decode"] = field(default="all", metadata={"help": "which benchmarks to run"})
    budget_s: float = field(default=450, metadata={"help": "start no measurement after this many seconds"})

    def __post_init__(self):
        unknown = [m for m in self.models if m not in ("1b", "7b")]
        if unknown:
            raise ValueError(f"--models: unknown shape(s) {unknown}; choose from 1b, 7b")
        bad = [p for p in self.precisions if p not in ("auto", "fp16", "bf16", "fp32")]
        if bad:
            raise ValueError(f"--precisions: unknown {bad}; choose from fp16, bf16, fp32 or auto")
        if self.tiny:
            self.micro_batch_size, self.seq_len, self.new_tokens = 2, 32, 8
            self.train_steps = min(self.train_steps, 2)


# ----------------------------------------------------------------------------------------------- the device
def pick_device(args: CheckArgs) -> torch.device:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); install a "
                         "CUDA build of torch, or run the CPU check with --device cpu --tiny")
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs the index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA GPU here: the full check needs one; run the CPU check with --device cpu --tiny")
    return device


def precisions(args: CheckArgs, device: torch.device) -> list[str]:
    if args.precisions != ("auto",):
        return list(args.precisions)
    if device.type == "cuda":
        return ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])  # V100 (7.0) has no bf16
    return ["fp32", "bf16"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GiB)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


@functools.cache  # once per dtype: every model of that precision shares the reference
def matmul_tflops(device: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    """The best measured rate of a square matmul in dtype (the MFU reference where the GPU is not in the table)."""
    n = 256 if tiny else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best / 1e12


def peak_tflops(env: dict, device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[float, str]:
    """(peak TFLOPS, where it came from): the data sheet for a known GPU, else the measured matmul rate."""
    name = env.get("gpu", "")
    for key, tf in PEAK_TFLOPS.items():
        if key in name and not (key == "V100" and dtype == torch.bfloat16):
            return float(tf), f"{key} data sheet"
    return matmul_tflops(device, dtype, tiny), "measured matmul"


def copy_bandwidth(device: torch.device, tiny: bool) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of 5."""
    x = torch.ones(2**22 if tiny else 2**28, device=device)  # 16 MiB / 1 GiB of fp32
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * x.element_size() / best


# ------------------------------------------------------------------------------------------- random models
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shape(name: str, tiny: bool) -> ModelArgs:
    return TINY[name] if tiny else PRESETS[f"llama-{name}"]


def build(fn, device: torch.device, dtype: torch.dtype):
    """fn() built straight on the device in dtype (a 7B model never exists in fp32 first), default dtype restored."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return fn()
    finally:
        torch.set_default_dtype(old)


def ours(margs: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    model = build(lambda: Transformer(margs), device, dtype)
    model.reset_rope(device)
    return model


def theirs(margs: ModelArgs, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM of the same shape, random weights, SDPA attention."""
    import transformers  # lazy: only the benchmarks compare with it

    from checkpoint import hf_config

    cfg = {k: v for k, v in hf_config(margs, dtype).items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.LlamaConfig(**cfg, attn_implementation="sdpa")
    torch.manual_seed(0)
    return build(lambda: transformers.LlamaForCausalLM(config), device, dtype)


def with_peft(model):
    """peft LoRA of the same rank, alpha, dropout and targets as ours, adapters in fp32 over the low-precision base."""
    import peft  # lazy: as above

    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def train_flops_per_token(margs: ModelArgs, T: int) -> float:
    """Forward + backward FLOPs per token of LoRA training: 2 x the matmul weights forward, 2 x for the activation
    gradients (the frozen weights get none), causal attention 2 T dim per layer forward and twice that backward."""
    counts = param_counts(margs, LORA)
    matmul = counts["base"] - margs.vocab_size * margs.dim * (0 if margs.tie_embeddings else 1) \
        - margs.n_layers * 2 * margs.dim - margs.dim  # minus the embedding lookup and the norms
    return 4 * matmul + 6 * margs.n_layers * T * margs.dim


# ------------------------------------------------------------------------------------------------- training
def random_batch(margs: ModelArgs, B: int, T: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, margs.vocab_size, (B, T + 1), generator=g).to(device)


def timed_steps(step, n: int, device: torch.device) -> tuple[float, int | None]:
    """(seconds per step, peak bytes) over n steps after 2 warm-up steps (which also create the AdamW state)."""
    for _ in range(2):
        step()
    sync(device)
    reset_peak(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t) / n, peak_bytes(device)


def train_ours(margs: ModelArgs, precision: str, device: torch.device, args: CheckArgs) -> dict:
    """train_ddp's own step (forward_backward + optimizer_step) on random rows; its memory plan beside it."""
    B, T = args.micro_batch_size, args.seq_len
    targs = train_ddp.TrainArgs(data="unused", micro_batch_size=B, max_len=T, precision=precision,
                                device=str(device), lora_r=LORA.r, lora_alpha=LORA.alpha,
                                lora_dropout=LORA.dropout, lora_targets=LORA.targets, pack=False)
    rt = train_ddp.setup_runtime(str(device), precision)
    model = train_ddp.prepare_model(ours(margs, device, rt.dtype), targs.lora_args(), targs, rt)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = random_batch(margs, B, T, device)
    batch = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), None, None, B * T)

    def step():
        train_ddp.forward_backward(model, [batch], float(B * T), rt)
        train_ddp.optimizer_step(params, optimizer, rt, targs)

    seconds, peak = timed_steps(step, args.train_steps, device)
    plan = train_ddp.memory_plan(targs, margs, rt)
    del model, optimizer, params
    free(device)
    return {"tok_s": B * T / seconds, "peak_bytes": peak, "plan_bytes": plan.total, "plan": plan.as_dict()}


def train_theirs(margs: ModelArgs, precision: str, device: torch.device, args: CheckArgs) -> dict:
    """The same rows through transformers + peft: autocast, GradScaler for fp16, clipping, AdamW."""
    B, T = args.micro_batch_size, args.seq_len
    dtype = DTYPES[precision]
    model = with_peft(theirs(margs, device, dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    ids = random_batch(margs, B, T, device)[:, :-1]  # HF shifts inside: T inputs, T - 1 targets

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed_steps(step, args.train_steps, device)
    del model, optimizer, params
    free(device)
    return {"tok_s": B * T / seconds, "peak_bytes": peak}


def train_pair(name: str, precision: str, device: torch.device, args: CheckArgs, env: dict) -> dict:
    """Ours and theirs on one shape and precision, with MFU against the device's peak."""
    margs = shape(name, args.tiny)
    fig = {"ours": train_ours(margs, precision, device, args), "theirs": train_theirs(margs, precision, device, args)}
    peak, source = peak_tflops(env, device, DTYPES[precision], args.tiny)
    flops = train_flops_per_token(margs, args.seq_len)
    for side in ("ours", "theirs"):
        fig[side]["mfu"] = fig[side]["tok_s"] * flops / (peak * 1e12)
    fig.update(peak_tflops=peak, peak_source=source, flops_per_token=flops)
    return fig


# ------------------------------------------------------------------------------------------------- decoding
class IdTokenizer:
    """What generate.py needs of a tokenizer for token-id prompts: no stop tokens, so every row decodes all its
    tokens (random weights would reach an EOS at random), and a one-byte text per token."""
    stop_ids: frozenset = frozenset()
    add_bos = False

    def __init__(self, vocab_size: int):
        self._bytes = [b"x"] * vocab_size

    def token_bytes(self) -> list[bytes]:
        return self._bytes

    def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)


def prompts(margs: ModelArgs, n: int, length: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, margs.vocab_size, (n, length), generator=g).tolist()


def decode_ours(model: Transformer, rows: list[list[int]], n: int, device: torch.device) -> float:
    """Generated tokens per second of one greedy generate_ids call (prefill included), best of 2."""
    gen, best = Generator(model, IdTokenizer(model.args.vocab_size)), 0.0
    gen.generate_ids(rows, GenerateArgs(max_new_tokens=2))  # warm up
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        res = gen.generate_ids(rows, GenerateArgs(max_new_tokens=n))
        sync(device)
        best = max(best, sum(r.completion_tokens for r in res) / (time.perf_counter() - t))
    return best


def decode_theirs(model, rows: list[list[int]], n: int, device: torch.device) -> float:
    """The same with transformers' generate (greedy, no early stop), best of 2."""
    ids = torch.tensor(rows, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    best = 0.0
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        for _ in range(2):
            sync(device)
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            sync(device)
            best = max(best, (out.shape[1] - ids.shape[1]) * len(rows) / (time.perf_counter() - t))
    return best


def decode_pair(name: str, precision: str, device: torch.device, args: CheckArgs, bandwidth: float) -> dict:
    """Single-stream and 16-row greedy decoding, ours and transformers', and the memory-bandwidth bound: every
    token reads every weight once (16 rows share one read), so bound = bandwidth / weight bytes per step."""
    margs, dtype, n = shape(name, args.tiny), DTYPES[precision], args.new_tokens
    one, sixteen = prompts(margs, 1), prompts(margs, 16)
    model = ours(margs, device, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fig = {"ours_1": decode_ours(model, one, n, device), "ours_16": decode_ours(model, sixteen, n, device)}
    del model
    free(device)
    hf = theirs(margs, device, dtype).eval()
    fig.update(theirs_1=decode_theirs(hf, one, n, device), theirs_16=decode_theirs(hf, sixteen, n, device))
    del hf
    free(device)
    bound = bandwidth / weight_bytes
    fig.update(weight_bytes=weight_bytes, bound_1=bound, bound_16=16 * bound,
               ours_1_of_bound=fig["ours_1"] / bound, theirs_1_of_bound=fig["theirs_1"] / bound,
               ours_16_of_bound=fig["ours_16"] / (16 * bound))
    return fig


# ---------------------------------------------------------------------------------------------------- tests
def run_cuda_tests() -> dict:
    """tests/test_cuda.py in a fresh process (pytest -m cuda); counts of passed, failed, skipped."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True, timeout=420)
    tail = (done.stdout + done.stderr).strip().splitlines()[-40:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", "\n".join(tail[-3:]))}
    counts = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
              + counts.get("errors", 0), "skipped": counts.get("skipped", 0)}
    return {**counts, "returncode": done.returncode, "seconds": time.perf_counter() - t,
            "tail": tail if done.returncode not in (0, 5) else tail[-3:]}


# -------------------------------------------------------------------------------------------------- report
def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def train_lines(key: str, fig: dict) -> list[str]:
    o, t = fig["ours"], fig["theirs"]
    lines = [f"train_{key}_tok_s_vs_transformers: {o['tok_s'] / t['tok_s']:.2f}x (goal >= 1.0x; ours "
             f"{o['tok_s']:.0f} tok/s, transformers+peft {t['tok_s']:.0f})",
             f"train_{key}_mfu: {o['mfu']:.3f} (goal >= transformers+peft's {t['mfu']:.3f}; peak "
             f"{fig['peak_tflops']:.3g} TFLOPS, {fig['peak_source']})"]
    if o["peak_bytes"] is None:
        lines += [f"train_{key}_peak_memory_vs_transformers: n/a on the cpu (goal <= 1.0x)",
                  f"memory_plan_{key}_vs_measured: n/a on the cpu (goal 0.85-1.15x; plan {gib(o['plan_bytes'])})"]
    else:
        lines += [f"train_{key}_peak_memory_vs_transformers: {o['peak_bytes'] / t['peak_bytes']:.2f}x (goal <= "
                  f"1.0x; ours {gib(o['peak_bytes'])}, transformers+peft {gib(t['peak_bytes'])})",
                  f"memory_plan_{key}_vs_measured: {o['plan_bytes'] / o['peak_bytes']:.2f}x (goal 0.85-1.15x; "
                  f"plan {gib(o['plan_bytes'])}, max_memory_allocated {gib(o['peak_bytes'])})"]
    return lines


def decode_lines(key: str, fig: dict) -> list[str]:
    return [f"decode_{key}_single_vs_transformers: {fig['ours_1'] / fig['theirs_1']:.2f}x (goal >= 1.0x; ours "
            f"{fig['ours_1']:.1f} tok/s, transformers generate {fig['theirs_1']:.1f})",
            f"decode_{key}_batch16_vs_transformers: {fig['ours_16'] / fig['theirs_16']:.2f}x (goal >= 1.0x; ours "
            f"{fig['ours_16']:.1f} tok/s, transformers generate {fig['theirs_16']:.1f})",
            f"decode_{key}_single_of_bandwidth_bound: {fig['ours_1_of_bound']:.2f} (goal >= 0.5; transformers "
            f"{fig['theirs_1_of_bound']:.2f}; bound {fig['bound_1']:.1f} tok/s)",
            f"decode_{key}_batch16_of_bandwidth_bound: {fig['ours_16_of_bound']:.2f} (goal >= 0.3; bound "
            f"{fig['bound_16']:.1f} tok/s)"]


def section(figures: dict, lines: list[str], key: str, fn, to_lines, deadline: float = math.inf) -> None:
    """Run one measurement; a failure (out of memory, a missing package) is recorded and the check goes on. Past
    the deadline (a slow GPU) the measurement is left out, and says so."""
    t = time.perf_counter()
    if t > deadline:
        figures[key] = {"skipped": "over --budget-s"}
        lines.append(f"{key}: skipped, over --budget-s (goal all measured; raise it or pass fewer --models)")
        return
    try:
        fig = fn()
    except Exception as e:  # noqa: BLE001 - one failed part must not hide the figures of the others
        figures[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        lines.append(f"{key}: error ({figures[key]['error']})")
        free(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        return
    fig["seconds"] = time.perf_counter() - t
    figures[key] = fig
    lines.extend(to_lines(fig))
    print(f"  {key}: {fig['seconds']:.0f} s", file=sys.stderr, flush=True)


def run(args: CheckArgs) -> tuple[dict, list[str]]:
    """Every measurement: (figures, target lines)."""
    t0 = time.perf_counter()
    device = pick_device(args)
    env = environment(device)
    figures, lines = {"args": asdict(args), "environment": env}, []
    if args.tests:
        section(figures, lines, "cuda_tests", run_cuda_tests, lambda f: [
            f"cuda_tests: {f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped (goal all pass; "
            f"skipped without CUDA)"])
    bandwidth = copy_bandwidth(device, args.tiny)
    env["copy_bandwidth_gb_s"] = bandwidth / 1e9
    for name in args.models:
        for precision in precisions(args, device):
            key = f"{name}_{precision}"
            if args.mode in ("all", "train"):
                section(figures, lines, f"train_{key}", lambda: train_pair(name, precision, device, args, env),
                        lambda f, key=key: train_lines(key, f), t0 + args.budget_s)
            if args.mode in ("all", "decode"):
                section(figures, lines, f"decode_{key}", lambda: decode_pair(name, precision, device, args,
                                                                              bandwidth),
                        lambda f, key=key: decode_lines(key, f), t0 + args.budget_s)
    figures["seconds"] = time.perf_counter() - t0
    lines.append(f"gpu_check_seconds: {figures['seconds']:.0f} (goal <= 480 on one GPU)")
    return figures, lines


def main(argv: list[str] | None = None) -> int:
    from cli import parse_args  # lazy: the measurement functions need no CLI

    (args,) = parse_args(argv, CheckArgs, description=__doc__)
    figures, lines = run(args)
    figures["lines"] = lines
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, figures)
    print("\n".join(lines))
    print(f"every figure: {out}")
    failed = any("error" in v for v in figures.values() if isinstance(v, dict)) or \
        figures.get("cuda_tests", {}).get("failed", 0) > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
