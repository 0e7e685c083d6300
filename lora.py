"""LoRA (Hu et al. 2021) for model.py: low-rank adapters on frozen linears, saved as safetensors, exported to peft.

    from lora import LoraArgs, apply_lora, save_adapter, load_adapter, merge_lora
    apply_lora(model, LoraArgs(r=8, targets=("wq", "wv")))    # freezes everything but the adapters
    python lora.py merge --adapter out/run/adapter --out out/merged --format hf    # base = the embedded model
    python lora.py merge --checkpoint llama-2-7b/ --adapter out/run/adapter --out out/merged --format meta
    python lora.py merge --adapter out/run/adapter --out out/merged.gguf --format gguf --quant q8_0  # llama.cpp

An adapter folder holds `adapter.safetensors` (keys `layers.0.attention.wq.lora_A`, ...) and `adapter_config.json`
({"lora": LoraArgs, "model": ModelArgs}), so loading can check that it belongs to the model it is put on.
`export_peft` writes the same weights in the layout `peft.PeftModel.from_pretrained` reads on the HF model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from checkpoint import embedded_model_path, permute_to_hf, save_model
from checkpoint.files import read_json
from checkpoint.hf import read_safetensors
from checkpoint.names import HF_NAMES  # our linear names -> HF module paths (the one table)
from cli import parse_args
from jsonl import atomic_write, write_json
from model import Linear, ModelArgs, Transformer
from quant import KINDS, dequantize_model, load_quantized

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


@dataclass
class LoraArgs:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator: scale = alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    targets: tuple[str, ...] = field(default=("wq", "wv"),
                                     metadata={"help": f"linears to adapt, any of {','.join(HF_NAMES)}"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)"})

    def __post_init__(self):
        self.targets = tuple(self.targets)  # JSON gives lists
        if self.r <= 0:
            raise ValueError(f"LoRA r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in HF_NAMES]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target(s) {unknown or list(self.targets)}; choose from {list(HF_NAMES)}")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def dropout_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask shaped like x for dropout of rate p, and its keep rate 1 - p', p' = p rounded to 1/65536.

    Each 64-bit random draw gives four 16-bit lanes, so the generator (mt19937 on a CPU, one thread) runs a quarter
    as often as for torch.rand_like(x) >= p: the mask costs a third of the time."""
    drop = min(round(p * 65536), 65535)  # a lane (uniform on [-32768, 32767]) is dropped when below drop - 32768
    draws = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
    return (draws.view(torch.int16)[:x.numel()] >= drop - 32768).view(x.shape), 1 - drop / 65536


class _LoRAFunction(torch.autograd.Function):
    """x W^T + scale * ((x * mask) A^T) B^T for a frozen W: the value autograd gives, with fewer passes over the
    (tokens, features) activations. The rank-r update is added into the base output in place, and backward folds
    the mask into the addition of the update's input gradient to the base one."""

    @staticmethod
    def forward(ctx, x, weight, A, B, mask, scale: float):
        xd = x if mask is None else x * mask
        a = F.linear(xd, A) * scale  # (..., r)
        y = F.linear(x, weight)
        y.view(-1, y.shape[-1]).addmm_(a.view(-1, a.shape[-1]), B.t())
        ctx.save_for_backward(xd, a, weight, A, B, mask)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        xd, a, weight, A, B, mask = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        ga = (g2 @ B).mul_(ctx.scale)  # (N, r): gradient of the scaled rank-r product
        grad_A = ga.t() @ xd.reshape(-1, xd.shape[-1]) if ctx.needs_input_grad[2] else None
        grad_B = g2.t() @ a.reshape(-1, a.shape[-1]) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            update = (ga @ A).view_as(grad_x)
            grad_x.add_(update) if mask is None else grad_x.addcmul_(update, mask)
        return grad_x, None, grad_A, grad_B, None, None


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))) with base frozen; A, B in fp32 whatever the base dtype."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        device = next(iter([*base.parameters(), *base.buffers()])).device  # quant.py bases: buffers only
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        # the same init as nn.Linear and peft: A uniform, B zero so training starts from the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale, p, mask = self.scale, self.dropout.p, None
        if self.training and p > 0:
            mask, keep = dropout_mask(x, p)
            scale = scale / keep  # inverted dropout, its 1 / keep folded into the scale of the rank-r product
        base = self.base
        if (torch.is_grad_enabled() and type(base) in (nn.Linear, Linear) and base.bias is None
                and not base.weight.requires_grad and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == base.weight.dtype == self.lora_A.dtype):
            return _LoRAFunction.apply(x, base.weight, self.lora_A, self.lora_B, mask, scale)
        # autocast, a bf16/fp16 base under fp32 adapters, inference: plain autograd, the update in the adapters' dtype
        y = base(x)
        x = x.to(self.lora_A.dtype)
        if mask is not None:
            x = x * mask
        a = F.linear(x, self.lora_A) * scale  # (..., r): scaling here is cheap
        return y + F.linear(a, self.lora_B).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The weight update scale * B @ A, (out, in), fp32."""
        return (self.lora_B @ self.lora_A) * self.scale


def _clean(name: str) -> str:
    """Drop the path parts that wrappers insert (FSDP, activation checkpointing), so names match the bare model."""
    return ".".join(p for p in name.split(".") if not p.endswith("_wrapped_module"))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {_clean(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: Transformer, args: LoraArgs) -> Transformer:
    """Replace every target linear by a LoRALinear and freeze all other parameters (in place; returns model)."""
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters; build or load a fresh base model")
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in args.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, args.r, args.alpha, args.dropout, args.rslora))
    found = {n.rsplit(".", 1)[-1] for n in lora_modules(model)}
    if found != set(args.targets):
        raise ValueError(f"LoRA target(s) {sorted(set(args.targets) - found)} not found in the model")
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, fp32 on CPU: {'layers.0.attention.wq.lora_A': ..., ...}."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().float().cpu().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().float().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, largs: LoraArgs, margs: ModelArgs, out_dir: str | Path) -> Path:
    """Write adapter.safetensors + adapter_config.json into out_dir (each file atomically); return out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model)
    if not state:
        raise ValueError("model has no LoRA adapters to save; call apply_lora first")
    atomic_write(out / ADAPTER_FILE, lambda p: save_file(state, p))
    write_json(out / CONFIG_FILE, {"lora": asdict(largs), "model": asdict(margs)})
    return out


def _architecture(m: ModelArgs) -> dict:
    return dict(dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, kv_heads=m.kv_heads, vocab_size=m.vocab_size,
                ffn_hidden=m.ffn_hidden, norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings)


def read_adapter_config(adapter_dir: str | Path, margs: ModelArgs) -> LoraArgs:
    """LoraArgs of an adapter folder, after checking it was trained on a model with exactly these ModelArgs."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {adapter_dir}; pass the folder that save_adapter wrote")
    cfg = read_json(path)
    theirs, largs = _config_section(cfg, path, "model", ModelArgs), _config_section(cfg, path, "lora", LoraArgs)
    # the effective architecture, not every field: a checkpoint saved as HF states hidden_dim that Meta derives
    theirs, ours = _architecture(theirs), _architecture(margs)
    diff = {k: (v, ours[k]) for k, v in theirs.items() if ours[k] != v}
    if diff:
        shown = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(f"adapter {adapter_dir} was trained on another model ({shown}); "
                         f"pass the base checkpoint it was trained on (--checkpoint)")
    return largs


def _config_section(cfg: dict, path: Path, key: str, cls):
    """cls(**cfg[key]) for adapter_config.json's "model" and "lora" objects; each error names the file and key."""
    section = cfg.get(key)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: key {key!r} is {'missing' if section is None else 'not an object'}; "
                         'adapter_config.json holds {"lora": LoraArgs, "model": ModelArgs} (save_adapter writes it)')
    known = {f.name for f in fields(cls)}
    for k in section:
        if k not in known:
            raise ValueError(f"{path}: unknown key {key}.{k}; {cls.__name__} has {sorted(known)}")
    try:
        return cls(**section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {key}: {e}") from None


def load_adapter(model: Transformer, adapter_dir: str | Path) -> LoraArgs:
    """Put the adapter in adapter_dir on model (applying LoRA first unless already applied); return its LoraArgs."""
    largs = read_adapter_config(adapter_dir, model.args)
    modules = lora_modules(model)
    if not modules:
        apply_lora(model, largs)
        modules = lora_modules(model)
    elif any((m.r, m.alpha, m.rslora) != (largs.r, largs.alpha, largs.rslora) for m in modules.values()):
        raise ValueError(f"adapter {adapter_dir} has r={largs.r} alpha={largs.alpha} rslora={largs.rslora}, "
                         f"unlike the LoRA already on the model")
    path = Path(adapter_dir) / ADAPTER_FILE
    state = _read_adapter_weights(path, {f"{n}.lora_{ab}": getattr(m, f"lora_{ab}") for n, m in modules.items()
                                         for ab in "AB"}, largs)
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])
    return largs


def _read_adapter_weights(path: Path, expected: dict[str, torch.Tensor], largs: LoraArgs) -> dict[str, torch.Tensor]:
    """adapter.safetensors, checked tensor by tensor against the LoRA on the model; errors name the file and tensor."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; pass the folder that save_adapter wrote")
    state = read_safetensors(path)
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        shown = f"tensor {missing[0]} is missing" if missing else f"unexpected tensor {extra[0]}"
        raise ValueError(f"{path}: {shown} ({len(missing)} missing, {len(extra)} unexpected): the adapter does not "
                         f"match the model's LoRA targets {largs.targets}")
    for k, want in expected.items():
        if state[k].shape != want.shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(state[k].shape)} but LoRA r={largs.r} on this "
                             f"model needs {tuple(want.shape)}")
    return state


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (W += scale * B @ A); forward then skips the adapter path."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            if m.merged:
                continue
            if name == "output" and m.base.weight is model.tok_embeddings.weight:
                # tied embeddings: the update belongs to the output projection only, so untie first
                m.base.weight = nn.Parameter(m.base.weight.detach().clone(), requires_grad=False)
                model.args = replace(model.args, tie_embeddings=False)
            m.base.weight += m.delta().to(m.base.weight.dtype)
            m.merged = True
    return model


def unmerge_lora(model: Transformer) -> Transformer:
    """Undo merge_lora (W -= scale * B @ A), so the adapters train or can be swapped again."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            if m.merged:
                m.base.weight -= m.delta().to(m.base.weight.dtype)
                m.merged = False
    return model


def strip_lora(model: Transformer) -> Transformer:
    """Merge the adapters and put the plain linears back, leaving a bare Transformer to save as a checkpoint."""
    merge_lora(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.base)
    return model


def export_peft(model: Transformer, out_dir: str | Path, base_model_name: str = "") -> Path:
    """Write adapter_config.json + adapter_model.safetensors that peft loads on the HF form of the same base."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA adapters to export; call apply_lora first")
    args = model.args
    state, targets = {}, set()
    for name, m in modules.items():
        target = name.rsplit(".", 1)[-1]
        targets.add(HF_NAMES[target].rsplit(".", 1)[-1])
        if target == "output":
            prefix = "base_model.model.lm_head"
        else:
            layer = name.split(".")[1]
            prefix = f"base_model.model.model.layers.{layer}.{HF_NAMES[target]}"
        b = m.lora_B.detach().float().cpu()
        # HF keeps q/k rows in the half-split rotary layout; B's rows are output rows, A acts on inputs
        if target == "wq":
            b = permute_to_hf(b, args.n_heads)
        elif target == "wk":
            b = permute_to_hf(b, args.kv_heads)
        state[f"{prefix}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"{prefix}.lora_B.weight"] = b.contiguous()
    first = next(iter(modules.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout.p, "use_rslora": first.rslora,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", config)
    return out


@dataclass
class MergeArgs:
    adapter: str = field(default="", metadata={"help": "adapter folder written by train_ddp.py", "required": True})
    out: str = field(default="", metadata={"help": "output folder (meta, hf) or .gguf file (gguf) for the merged model",
                                           "required": True})
    checkpoint: str | None = field(default=None, metadata={"help": "base checkpoint (default: the embedded model)"})
    format: Literal["meta", "hf", "gguf"] = field(default="meta", metadata={
        "help": "checkpoint format to write; gguf runs in llama.cpp and Ollama"})
    quant: Literal["f16", "q8_0", "f32"] = field(default="f16", metadata={
        "help": "GGUF type of the weight matrices (--format gguf only)"})
    base_quant: Literal[KINDS] = field(default="none", metadata={
        "help": "the --base-quant the adapter was trained with: merge into that base, dequantized"})

    def __post_init__(self):
        if self.quant != "f16" and self.format != "gguf":
            raise ValueError(f"--quant {self.quant} applies to --format gguf only (got --format {self.format})")


def merge(margs: MergeArgs) -> Path:
    """Base checkpoint + adapter -> a merged checkpoint in margs.out; returns its path."""
    # in the checkpoint's own dtype (dequantized when it was trained quantized); the update is computed in fp32
    model = dequantize_model(load_quantized(margs.checkpoint, margs.base_quant))
    load_adapter(model, margs.adapter)
    return save_model(strip_lora(model), margs.out, format=margs.format,
                      tokenizer_src=margs.checkpoint or embedded_model_path(), quant=margs.quant)


def main(argv: list[str] | None = None) -> None:
    margs, _ = parse_args(argv, MergeArgs, description=__doc__, positional=[("command", {"choices": ["merge"]})])
    print(f"merged checkpoint written to {merge(margs)}")


if __name__ == "__main__":
    main()
