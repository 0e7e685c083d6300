"""Peak memory of a quantized frozen base (quant.py) against transformers + peft in bf16: loading + one LoRA step on
a 1B-shaped LLaMA, and loading a 7B-shaped one, for our fp32 / bf16 / int8 / nf4.

    python -m bench.memory                   # the 1B step, then the 7B load where the free memory allows
    python -m bench.memory --no-run-7b       # only the 1B step
    python -m bench.memory --no-run-1b       # only the 7B load
    python -m bench.memory --tiny            # small shapes, seconds (a smoke run)

Random bf16 weights are written once per shape to a temporary folder (an HF safetensors folder for transformers and
the same tensors as a Meta consolidated.00.pth for ours: the HF loader copies the q/k rows while it undoes the
rotary permutation, which would measure that copy, not the quantization) and deleted right after that shape's
measurements. Each measurement runs in a fresh subprocess: the peak RSS (VmHWM, reset through /proc/self/clear_refs
after the imports) minus the RSS before loading, after every weight page was read (so memory-mapped weights count),
and for the 1B step after one AdamW step of r=16 adapters on wq/wv (q_proj/v_proj) over --seq-len tokens, with
activation checkpointing on both sides unless --no-checkpointing.
A 7B measurement runs only when /proc/meminfo's MemAvailable exceeds its need + 4 GiB; fp32-7B (27 GB) is skipped.
Prints `<target>: <ratio>x (goal <= n)`: int8 <= 0.55x and nf4 <= 0.35x of the bf16 reference's bytes.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, apply_activation_checkpointing,
                                                                         checkpoint_wrapper)

from checkpoint.hf import hf_config
from checkpoint.names import HF_TO_META, expand
from cli import parse_args
from lora import LoraArgs, apply_lora
from model import ModelArgs, Transformer, TransformerBlock
from quant import frozen_bytes, load_quantized

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
SHAPES = {  # TinyLlama-1.1B and LLaMA-2-7B; --tiny: a few seconds each
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000),
    "tiny-1B": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=704, vocab_size=4000),
    "tiny-7B": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=8, hidden_dim=1376, vocab_size=4000),
}
GOALS = {"int8": 0.55, "nf4": 0.35}


@dataclass
class BenchArgs:
    seq_len: int = field(default=128, metadata={"help": "tokens in the one LoRA training step"})
    run_1b: bool = field(default=True, metadata={"help": "measure loading + one LoRA step on a 1B-shaped model"})
    run_7b: bool = field(default=True, metadata={"help": "also measure loading a 7B-shaped model (memory allowing)"})
    tiny: bool = field(default=False, metadata={"help": "small shapes for a quick smoke run"})
    work_dir: str = field(default="", metadata={"help": "where the temporary checkpoints go (default: system temp)"})
    threads: int = field(default=2, metadata={"help": "torch threads in each measurement"})
    checkpointing: bool = field(default=True, metadata={
        "help": "activation checkpointing in the step, on both sides (QLoRA's recipe; without it the saved "
                "activations, equal on both sides, weigh on every ratio)"})

    def __post_init__(self):
        if self.seq_len < 2 or self.threads < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 and threads={self.threads} >= 1")


# ------------------------------------------------------------------------------------------------ checkpoints
def _shapes(margs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(margs).state_dict().items()}


def _random(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:  # norms: ones, as a fresh model has
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file written one tensor at a time (save_file needs them all in memory: 13 GB for 7B)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors.items():
            f.write(_random(name, shape).view(-1).view(torch.uint8).numpy())


def write_checkpoints(shape: str, root: Path) -> tuple[Path, Path]:
    """(HF folder, Meta folder) of one random bf16 model: the same tensors, the Meta copy memory-mapped from the HF
    file while torch.save writes it (q/k layouts differ by a permutation, irrelevant to memory)."""
    margs = ModelArgs(**SHAPES[shape])
    hf, meta = root / f"{shape}-hf", root / f"{shape}-meta"
    hf.mkdir(parents=True)
    meta.mkdir()
    names = {m: h for h, m in expand(HF_TO_META, margs.n_layers).items()}
    write_safetensors(hf / "model.safetensors", {names[k]: s for k, s in _shapes(margs).items()})
    (hf / "config.json").write_text(json.dumps(hf_config(margs, torch.bfloat16)))
    with safe_open(str(hf / "model.safetensors"), framework="pt") as st:
        torch.save({m: st.get_tensor(h) for m, h in names.items()}, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(SHAPES[shape]))
    return hf, meta


# ------------------------------------------------------------------------------------------------ measuring
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _touch(tensors) -> None:
    """Read one byte per 4 KiB page of every tensor: memory-mapped weights become resident, at no extra memory."""
    with torch.no_grad():
        for t in tensors:
            if t.numel():
                t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def _ours(path: str, kind: str, dtype: str, step: bool, seq_len: int, checkpointing: bool) -> None:
    model = load_quantized(path, kind, dtype=getattr(torch, dtype))
    _touch([*model.parameters(), *model.buffers()])
    if step:
        apply_lora(model, LoraArgs(r=16, alpha=32, dropout=0.0, targets=("wq", "wv")))
        if checkpointing:  # as train_ddp.wrap_model does for --activation-checkpointing
            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock),
                                           checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                         checkpoint_impl=CheckpointImpl.NO_REENTRANT))
        tokens = torch.randint(0, model.args.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
        _step(model.train(), lambda: (lambda s, n: s / n)(*model(tokens[:, :-1], labels=tokens[:, 1:])))


def _reference(path: str, step: bool, seq_len: int, checkpointing: bool) -> None:
    from peft import LoraConfig, get_peft_model  # lazy: the reference libraries, heavy, needed in its child only
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    _touch([*model.parameters(), *model.buffers()])
    if step:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
        _step(model.train(), lambda: model(input_ids=tokens, labels=tokens).loss)


def _step(model, loss_fn) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_child(spec: dict) -> dict:
    """In a fresh process: imports, reset the peak, load (+ step), report the peak RSS growth in bytes."""
    if spec["impl"] == "transformers":  # imported before the baseline: only loading and the step are measured
        import peft  # noqa: F401
        import transformers  # noqa: F401
    torch.set_num_threads(spec["threads"])
    _step(torch.nn.Linear(2, 2), lambda: torch.nn.Linear(2, 2)(torch.ones(2)).sum())  # one-time lazy imports
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the imports' own peak is not counted
    base, t = _status("VmRSS"), time.perf_counter()
    if spec["impl"] == "transformers":
        _reference(spec["path"], spec["step"], spec["seq_len"], spec["checkpointing"])
    else:
        _ours(spec["path"], spec["kind"], spec["dtype"], spec["step"], spec["seq_len"], spec["checkpointing"])
    return {"peak": _status("VmHWM") - base, "base": base, "seconds": time.perf_counter() - t}


def measure(spec: dict) -> dict:
    code = f"import json; from bench.memory import measure_child; print(json.dumps(measure_child({spec!r})))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


# ------------------------------------------------------------------------------------------------ the runs
CASES = [("transformers+peft bf16", "transformers", "none", "bfloat16"), ("ours fp32", "ours", "none", "float32"),
         ("ours bf16", "ours", "none", "bfloat16"), ("ours int8", "ours", "int8", "bfloat16"),
         ("ours nf4", "ours", "nf4", "bfloat16")]


def _need(shape: str, kind: str, dtype: str) -> int:
    """Bytes a load of this shape should take (weights only), to decide whether the box can afford it."""
    return frozen_bytes(ModelArgs(**SHAPES[shape]), kind, getattr(torch, dtype))


def run_shape(shape: str, step: bool, args: BenchArgs, root: Path) -> dict[str, dict]:
    """Every case on one shape; the checkpoints are deleted before returning."""
    results = {}
    hf, meta = write_checkpoints(shape, root)
    try:
        for label, impl, kind, dtype in CASES:
            need = _need(shape, kind, dtype)
            if not step and dtype == "float32" and not args.tiny:
                print(f"  {label}: skipped ({need / 1e9:.0f} GB of fp32 weights do not fit this 24 GiB box)", flush=True)
                continue
            if mem_available() < need + 4 * GiB:
                print(f"  {label}: skipped (needs {need / GiB:.1f} GiB + 4 GiB, MemAvailable "
                      f"{mem_available() / GiB:.1f} GiB)", flush=True)
                continue
            spec = {"impl": impl, "path": str(hf if impl == "transformers" else meta), "kind": kind, "dtype": dtype,
                    "step": step, "seq_len": args.seq_len, "threads": args.threads,
                    "checkpointing": args.checkpointing}
            results[label] = measure(spec)
            r = results[label]
            print(f"  {label:24s} peak {r['peak'] / GiB:6.2f} GiB  (weights {need / GiB:5.2f} GiB, "
                  f"{r['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(hf, ignore_errors=True)
        shutil.rmtree(meta, ignore_errors=True)
    return results


def goal_lines(target: str, shape: str, results: dict[str, dict]) -> list[str]:
    """The goal lines; without a measured reference (it did not fit), against the bytes of its bf16 weights, which
    it holds at the least."""
    ref = results.get("transformers+peft bf16")
    denominator, against = (ref["peak"], "") if ref else (_need(shape, "none", "bfloat16"), ", against the bf16 "
                                                          "weights' bytes: the reference did not fit")
    lines = []
    for kind, goal in GOALS.items():
        ours = results.get(f"ours {kind}")
        if ours is None:
            lines.append(f"{target}_{kind}: not measured (goal <= {goal}x)")
        else:
            lines.append(f"{target}_{kind}: {ours['peak'] / denominator:.2f}x (goal <= {goal}x{against})")
    return lines


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, BenchArgs, description=__doc__)
    root = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.work_dir or None))
    prefix = "tiny-" if args.tiny else ""
    lines = []
    try:
        if args.run_1b:
            print(f"1B-shaped LLaMA: load + one LoRA step ({args.seq_len} tokens, activation checkpointing "
                  f"{'on' if args.checkpointing else 'off'}), peak RSS growth", flush=True)
            lines += goal_lines("memory_1b_step", prefix + "1B", run_shape(prefix + "1B", True, args, root))
        if args.run_7b:
            print("7B-shaped LLaMA: load, peak RSS growth", flush=True)
            lines += goal_lines("memory_7b_load", prefix + "7B", run_shape(prefix + "7B", False, args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
