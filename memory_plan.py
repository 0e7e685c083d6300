"""Memory plan of a LoRA training step, per rank, from the configuration alone (no weights are loaded): frozen
weights, adapters + AdamW state, gradients, activations (with and without activation checkpointing), the
output/loss chunk and the backward's working set, and whether the total fits the device.

    python memory_plan.py --model llama-7b --precision fp16 --world-size 4 --strategy fsdp --device-gib 32
    python memory_plan.py --model path/to/checkpoint --world-size 8 --activation-checkpointing
    python train_ddp.py --data ... --dry-run          # the same plan for a real run's flags, then exit

    from memory_plan import Setup, plan
    p = plan(Setup(model=ModelArgs(), lora=LoraArgs(), micro_batch=4, seq_len=512, precision="fp16"))
    print("\\n".join(p.lines(device_bytes=32 * 2**30)))

The activation terms follow what train_ddp's step saves for backward (model.py's RMSNorm, RoPE, SDPA, SwiGLU and
chunked loss; lora.py's fused and autocast paths), tensor by tensor; tests/test_memory_plan.py checks them against
the tensors autograd really saves and the whole step against the measured peak (RSS on a CPU, max_memory_allocated
on a GPU, bench/gpu_check.py). The sizes are upper bounds for a step: every row is taken as --max-len tokens long,
every token as a target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from lora import LoraArgs
from model import ModelArgs
from quant import weight_bytes

GiB = 2**30
# bytes per element of the frozen base, by kind. Quantized bases add their kinds here (int8, nf4: bytes per weight
# including their scales), and Setup.base picks one.
BASE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0,  # quant.py: a block matrix's bytes per weight with its scales
              **{k: weight_bytes((4096, 4096), k) / 4096**2 for k in ("int8", "nf4")}}
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per adapter parameter
# shapes for plans without a checkpoint at hand: LLaMA-1 7B and 13B (Meta's params.json), and a 1.1B LLaMA-3.2-1B
# layout (GQA 32/8 heads, FFN 8192) with LLaMA's 32000-token vocabulary, untied
PRESETS = {
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "llama-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=8192),
}


@dataclass
class Setup:
    model: ModelArgs
    lora: LoraArgs
    micro_batch: int = field(default=4, metadata={"help": "rows per forward pass per rank"})
    seq_len: int = field(default=512, metadata={"help": "tokens per row (--max-len)"})
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32: no autocast; else autocast in that dtype
    base: str | None = None  # kind of the frozen base weights (BASE_BYTES); None: the compute dtype
    world_size: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    packed: bool = True  # packed rows carry a document mask: SDPA saves a float copy of it per layer
    attention: Literal["fused", "math"] = "fused"  # math: SDPA saves the (B, heads, T, T) probabilities

    def __post_init__(self):
        base = self.base or self.precision
        if base not in BASE_BYTES:
            raise ValueError(f"base={base!r} is not a known weight kind; choose from {sorted(BASE_BYTES)}")
        if self.precision not in COMPUTE_BYTES:
            raise ValueError(f"precision={self.precision!r} must be one of {sorted(COMPUTE_BYTES)}")
        if self.micro_batch <= 0 or self.seq_len <= 0 or self.world_size <= 0:
            raise ValueError(f"micro_batch={self.micro_batch}, seq_len={self.seq_len} and "
                             f"world_size={self.world_size} must be positive")


def _linear_shapes(m: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of a block, by Meta name."""
    kv = m.kv_heads * m.head_dim
    return {"wq": (m.dim, m.dim), "wk": (m.dim, kv), "wv": (m.dim, kv), "wo": (m.dim, m.dim),
            "w1": (m.dim, m.ffn_hidden), "w3": (m.dim, m.ffn_hidden), "w2": (m.ffn_hidden, m.dim)}


def param_counts(m: ModelArgs, lora: LoraArgs) -> dict[str, int]:
    """Parameters of the frozen base (whole, one block, outside the blocks) and of the adapters."""
    block = sum(i * o for i, o in _linear_shapes(m).values()) + 2 * m.dim
    outside = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.dim
    adapters = m.n_layers * sum(lora.r * sum(_linear_shapes(m)[t]) for t in lora.targets if t != "output")
    if "output" in lora.targets:
        adapters += lora.r * (m.dim + m.vocab_size)
    return {"base": m.n_layers * block + outside, "block": block, "outside": outside, "adapters": adapters}


# where each group of adapted linears sits in a block, in forward order (see block_parts)
GROUPS = {"attn": (1, ("wq", "wk", "wv")), "wo": (3, ("wo",)), "ffn": (5, ("w1", "w3")), "w2": (7, ("w2",))}


def block_parts(s: Setup) -> list[tuple[int, int]]:
    """(position in the block, bytes) of each tensor group a block saves for backward at micro-batch x seq_len
    tokens, following model.py and lora.py; positions order the block's steps (GROUPS)."""
    m, targets, c = s.model, set(s.lora.targets), COMPUTE_BYTES[s.precision]
    B, T = s.micro_batch, s.seq_len
    N, D, H, kv = B * T, m.dim, m.ffn_hidden, m.kv_heads * m.head_dim
    sdpa = N * (2 * D + 2 * kv) * c + B * m.n_heads * T * 4  # q, k, v, output and the log-sum-exp
    if s.packed:
        sdpa += B * T * T * c  # the boolean document mask, converted to a float mask inside SDPA
    if s.attention == "math":
        rep = m.n_heads // m.kv_heads
        sdpa += B * m.n_heads * T * T * c + (2 * N * kv * rep * c if rep > 1 else 0)  # probabilities; GQA k, v
    parts = [(0, N * D * c + N * 4), (2, sdpa), (4, N * D * c + N * 4), (6, 3 * N * H * c)]  # RMSNorm x, 1/rms
    shapes = _linear_shapes(m)
    for position, names in GROUPS.values():
        mine = [t for t in names if t in targets]
        inputs = N * shapes[names[0]][0]
        if s.lora.dropout > 0:  # each adapter keeps its own dropped-out input and boolean mask
            saved = len(mine) * inputs * (c + 1)
        elif s.precision != "fp32":  # each adapter keeps the autocast copy of its input (lora.py's plain path)
            saved = len(mine) * inputs * c
        elif names == ("wo",) and s.attention == "fused":
            saved = 0  # the fused path saves wo's input, a view of the SDPA output already counted
        else:  # the fused path saves the group's input once (attention_norm's output for wq, wk, wv, ...)
            saved = inputs * c if mine else 0
        if s.precision != "fp32":  # autocast's copies of A and B in the compute dtype
            saved += sum(s.lora.r * sum(shapes[t]) * c for t in mine)
        parts.append((position, saved + len(mine) * N * s.lora.r * c))  # + the rank-r product x A^T
    return parts


def first_block_bytes(s: Setup, parts: list[tuple[int, int]]) -> int:
    """What the first block saves: nothing before its first adapter, whose input (the embedding) needs no grad."""
    targets = set(s.lora.targets)
    first = min((pos for pos, names in GROUPS.values() if targets & set(names)), default=None)
    if first is None:
        return 0
    total = sum(b for pos, b in parts if pos >= first and pos != 6)
    N, H, c = s.micro_batch * s.seq_len, s.model.ffn_hidden, COMPUTE_BYTES[s.precision]
    if first == 5:  # silu(w1 x) * w3 x keeps only the factors whose partner needs a gradient
        return total + N * H * c * (("w1" in targets) * 2 + ("w3" in targets))
    return total + (dict(parts)[6] if first < 5 else 0)


def head_bytes(s: Setup) -> tuple[int, int]:
    """(saved, working set) of the final norm + output projection + loss (model.forward's labels path)."""
    m, c = s.model, COMPUTE_BYTES[s.precision]
    N, V = s.micro_batch * s.seq_len, m.vocab_size
    saved = N * m.dim * (c + 4) + N * 4 + N  # normed targets' hidden states, the fp32 gradient for them, 1/rms, mask
    if "output" in s.lora.targets:  # an adapted output projection: full logits, no chunking; log_softmax keeps fp32
        return saved + N * V * 4, N * V * c
    pieces = -(-N // max(1, 2**23 // V))  # model.py's chunking: <= 32 MB of fp32 logits at a time
    chunk = -(-N // pieces)
    return saved, chunk * V * (4 + (c if c != 4 else 0))  # fp32 logits (and their bf16/fp16 original)


@dataclass
class Plan:
    setup: Setup
    frozen: int  # frozen base weights on this rank (FSDP: its shard plus the gathered blocks)
    adapters_optimizer: int  # fp32 adapters + AdamW state
    gradients: int
    activations: int  # saved for backward (blocks and loss head), without activation checkpointing
    activations_checkpointed: int  # with it
    output_chunk: int  # the loss head's logits chunk: working set at the end of forward
    backward: int  # the largest working set of backward beyond what is saved (one block's gradients)

    @property
    def total(self) -> int:
        """The peak: what persists, what forward saves, and the larger of the two working sets (they never meet:
        the loss chunk is freed before backward starts)."""
        acts = self.activations_checkpointed if self.setup.activation_checkpointing else self.activations
        return (self.frozen + self.adapters_optimizer + self.gradients + acts
                + max(self.output_chunk, self.backward))

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes

    def advice(self) -> str:
        """What to change when the plan does not fit."""
        s, tips = self.setup, []
        if s.world_size > 1 and s.strategy == "ddp":
            tips.append("--strategy fsdp")
        if not s.activation_checkpointing:
            tips.append("--activation-checkpointing")
        return " or ".join(tips or ["a lower --micro-batch-size or --max-len"])

    def lines(self, device_bytes: int | None = None, device_name: str = "the device") -> list[str]:
        """The plan as printed: one line per part, then fits / does not fit."""
        s, n = self.setup, param_counts(self.setup.model, self.setup.lora)
        base = s.base or s.precision
        ac = "on" if s.activation_checkpointing else "off"
        rows = [f"memory plan per rank: {s.strategy} x {s.world_size}, {s.precision} compute, {base} base, "
                f"micro-batch {s.micro_batch} x {s.seq_len} tokens, activation checkpointing {ac}",
                f"  frozen weights           {self.frozen / GiB:8.2f} GiB  ({n['base'] / 1e9:.2f} B params x "
                f"{BASE_BYTES[base]:g} bytes{', sharded' if s.strategy == 'fsdp' and s.world_size > 1 else ''})",
                f"  adapters + AdamW state   {self.adapters_optimizer / GiB:8.2f} GiB  ({n['adapters'] / 1e6:.2f} M "
                f"params x {4 + ADAM_STATE_BYTES} bytes)",
                f"  gradients                {self.gradients / GiB:8.2f} GiB",
                f"  activations              {self.activations / GiB:8.2f} GiB  (checkpointed: "
                f"{self.activations_checkpointed / GiB:.2f} GiB)",
                f"  output/loss chunk        {self.output_chunk / GiB:8.2f} GiB",
                f"  backward working set     {self.backward / GiB:8.2f} GiB",
                f"  total                    {self.total / GiB:8.2f} GiB"]
        if device_bytes:
            verdict = "fits" if self.fits(device_bytes) else "does not fit"
            tail = "" if self.fits(device_bytes) else f": use {self.advice()}"
            rows.append(f"{verdict}: {self.total / GiB:.1f} of {device_bytes / GiB:.1f} GiB on {device_name}{tail}")
        return rows

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("frozen", "adapters_optimizer", "gradients", "activations",
                                              "activations_checkpointed", "output_chunk", "backward", "total")}


def plan(s: Setup) -> Plan:
    """The memory plan of one training step of `s`, per rank."""
    m, c = s.model, COMPUTE_BYTES[s.precision]
    n, bpw = param_counts(m, s.lora), BASE_BYTES[s.base or s.precision]
    rope = 2 * m.max_seq_len * (m.head_dim // 2) * 4
    frozen = n["base"] * bpw
    if s.strategy == "fsdp" and s.world_size > 1:
        # each rank keeps its shard; forward and backward gather one block and prefetch the next, and the root
        # (embeddings, output, final norm) stays gathered from its forward to its backward
        frozen = n["base"] * bpw / s.world_size + 2 * n["block"] * bpw + n["outside"] * bpw
    grads = n["adapters"] * 4 * (2 if s.strategy == "ddp" and s.world_size > 1 else 1)  # DDP: + its buckets
    parts = block_parts(s)
    block, first = sum(b for _, b in parts), first_block_bytes(s, parts)
    later = block if first else 0  # no adapter in any block (output only): the blocks save nothing
    N, D, H = s.micro_batch * s.seq_len, m.dim, m.ffn_hidden
    head_saved, head_work = head_bytes(s)
    # backward of one block holds the incoming gradient, the SwiGLU gradients and the outgoing one at once
    backward = N * (2 * H + 2 * D) * c if first else 0
    checkpointed = (m.n_layers * N * D * c + block) if first else 0  # block inputs, one block recomputed
    return Plan(s, frozen=int(frozen + rope), adapters_optimizer=n["adapters"] * (4 + ADAM_STATE_BYTES),
                gradients=grads, activations=first + (m.n_layers - 1) * later + head_saved,
                activations_checkpointed=checkpointed + head_saved, output_chunk=head_work, backward=backward)


def attention_kernel(device: torch.device, dtype: torch.dtype, m: ModelArgs, masked: bool) -> str:
    """'fused' or 'math': which SDPA backward the model's attention gets on `device` (a tiny probe call)."""
    q = torch.zeros(1, m.n_heads, 16, m.head_dim, device=device, dtype=dtype, requires_grad=True)
    kv = torch.zeros(1, m.kv_heads, 16, m.head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device).tril() if masked else None
    out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, is_causal=not masked,
                                         enable_gqa=m.kv_heads != m.n_heads)
    name = type(out.grad_fn).__name__.lower()
    return "fused" if any(k in name for k in ("flash", "efficient", "cudnn", "fused")) else "math"


def model_args_of(path: str | None) -> ModelArgs:
    """The ModelArgs of a checkpoint from its config alone (params.json, config.json, GGUF metadata; None: the
    embedded model): no weight is read."""
    import json
    from pathlib import Path

    from checkpoint import (args_from_gguf, args_from_hf_config, args_from_params, detect_format,  # lazy: the
                            embedded_model_path, read_gguf)  # plan itself needs only the shapes

    p = Path(path) if path else embedded_model_path()
    fmt = detect_format(p)
    if fmt == "meta":
        return args_from_params(p / "params.json")
    if fmt == "hf":
        return args_from_hf_config(json.loads((p / "config.json").read_text()), p / "config.json")
    return args_from_gguf(read_gguf(p))


def device_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, name) of the memory a run on `device` can use: the GPU's total, or the machine's RAM."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, props.name
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):  # not every OS names these
        return 0, "this machine"


@dataclass
class PlanArgs:
    model: str = field(default="llama-7b", metadata={
        "help": f"a shape ({', '.join(sorted(PRESETS))}) or a checkpoint (its config only is read)"})
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp16", metadata={"help": "compute dtype"})
    base: str = field(default="", metadata={"help": f"frozen base kind {sorted(BASE_BYTES)}; empty = --precision"})
    world_size: int = field(default=1, metadata={"help": "ranks"})
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata={"help": "ddp or fsdp"})
    micro_batch_size: int = field(default=4, metadata={"help": "rows per forward pass per rank"})
    max_len: int = field(default=512, metadata={"help": "tokens per row"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    lora_targets: tuple[str, ...] = field(default=LoraArgs.targets, metadata={"help": "linears to adapt"})
    lora_r: int = field(default=LoraArgs.r, metadata={"help": "LoRA rank"})
    lora_dropout: float = field(default=LoraArgs.dropout, metadata={"help": "LoRA dropout"})
    pack: bool = field(default=True, metadata={"help": "packed rows (a document mask)"})
    device_gib: float = field(default=32.0, metadata={"help": "memory of one device, GiB"})

    def model_args(self) -> ModelArgs:
        if self.model in PRESETS:
            return PRESETS[self.model]
        try:
            return model_args_of(self.model)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--model={self.model!r}: not a shape ({', '.join(sorted(PRESETS))}) nor a readable "
                             f"checkpoint ({e})") from None


def main(argv: list[str] | None = None) -> None:
    from cli import parse_args  # lazy: the library part needs no CLI

    (a,) = parse_args(argv, PlanArgs, description=__doc__)
    s = Setup(a.model_args(), LoraArgs(r=a.lora_r, targets=a.lora_targets, dropout=a.lora_dropout),
              a.micro_batch_size, a.max_len, a.precision, a.base or None, a.world_size, a.strategy,
              a.activation_checkpointing, a.pack)
    print("\n".join(plan(s).lines(int(a.device_gib * GiB), f"one {a.device_gib:g} GiB device")))


if __name__ == "__main__":
    main()
