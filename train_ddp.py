"""Fine-tune LLaMA with LoRA: one hand-written loop for a CPU, a GPU, or many GPUs (DDP or FSDP through torchrun).

    python train_ddp.py --data ../shared/data/selfinstruct/seed_tasks.jsonl --out out/run --max-steps 30
    torchrun --standalone --nproc_per_node=2 train_ddp.py --data out/selfinstruct/train.jsonl --out out/run
    torchrun --nnodes=2 --node-rank=0 --master-addr=HOST --nproc_per_node=4 train_ddp.py --strategy fsdp ...
    python train_ddp.py --data ... --out out/run --resume        # continue from the newest intact checkpoint
    python train_ddp.py --data ... --out out/run --overwrite     # delete the run in out/run and start again
    make train NPROC=2 ARGS="--data out/selfinstruct/train.jsonl --out out/run"

--out receives adapter/ (native), peft/ (loads with peft.PeftModel.from_pretrained on the HF base), metrics.jsonl,
loss.png, args.json and checkpoints/step_NNNNNNN/ (adapter + optimizer + scaler + data position + RNG). A run never
destroys another: an --out that holds one is refused without --resume or --overwrite, pruning keeps the highest
steps, and --resume skips a damaged newest checkpoint (renamed step_N.damaged) and a torn last metrics line.
Precision (DESIGN.md, precision.py): `auto` is fp16 on V100 (frozen base in fp16, adapters and AdamW state in fp32,
autocast, GradScaler), bf16 on newer GPUs and on CPUs with native bf16 (AMX, AVX512_BF16), fp32 on other CPUs.
The loss of a step is the sum of its token losses over the global number of target tokens, so any split over
micro-steps and ranks gives the same update.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import StepLoader, encode_records, eval_batches, load_records, make_rows, split_validation
from jsonl import read_jsonl, write_json, write_jsonl
from lora import LoraArgs, apply_lora, export_peft, load_adapter, save_adapter
from memory_plan import Plan, Setup, attention_kernel, device_bytes, model_args_of, plan
from model import ModelArgs, Transformer, TransformerBlock
from precision import choose_dtype
from quant import KINDS, load_quantized, quantize_model, quantized_kind


@dataclass
class TrainArgs:
    data: str = field(default="", metadata={"help": "Alpaca JSON/JSONL training records", "required": True})
    out: str = field(default="out/train", metadata={"help": "output folder"})
    checkpoint: str | None = field(default=None, metadata={"help": "base model (default: the embedded SmolLM2)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = --epochs over the data"})
    epochs: int = field(default=1, metadata={"help": "passes over the data when --max-steps is 0"})
    micro_batch_size: int = field(default=4, metadata={"help": "rows per forward pass per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of --lr"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, data order and split"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto: fp16 on V100, bf16 on newer GPUs and on CPUs with native bf16, "
                                         "else fp32 (precision.py)"})
    device: str = field(default="auto", metadata={"help": "auto: cuda:LOCAL_RANK when CUDA is there, else cpu"})
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata={"help": "fsdp shards the frozen base"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    base_quant: Literal[KINDS] = field(default="none", metadata={
        "help": "frozen base weights kept int8 or nf4 (QLoRA), dequantized in each linear (quant.py)"})
    lora_targets: tuple[str, ...] = field(default=LoraArgs.targets, metadata={"help": "linears to adapt"})
    lora_r: int = field(default=LoraArgs.r, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=LoraArgs.alpha, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=LoraArgs.dropout, metadata={"help": "dropout on the adapter input"})
    lora_rslora: bool = field(default=LoraArgs.rslora, metadata={"help": "scale = alpha / sqrt(r)"})
    max_len: int = field(default=512, metadata={"help": "max tokens per example (and per packed row)"})
    pack: bool = field(default=True, metadata={"help": "pack examples into rows of --max-len tokens"})
    train_on_inputs: bool = field(default=False, metadata={"help": "also train on the prompt tokens"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of the examples held out for validation"})
    eval_every: int = field(default=50, metadata={"help": "validation loss every N steps (and at the end); 0 = end"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps; 0 = never"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run already in --out and start again"})
    dry_run: bool = field(default=False, metadata={"help": "print the memory plan and exit (loads no weights)"})

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum", "max_len", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be positive")
        for name in ("max_steps", "epochs", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("--max-steps and --epochs are both 0; set one of them")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--lr={self.lr} must be > 0 and --min-lr-ratio={self.min_lr_ratio} in [0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction={self.val_fraction} must be in [0, 1)")
        self.lora_args()  # validates the LoRA flags

    def lora_args(self) -> LoraArgs:
        return LoraArgs(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets,
                        rslora=self.lora_rslora)


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    is_main: bool
    dtype: torch.dtype
    autocast_ctx: object  # a reusable context manager
    scaler: torch.amp.GradScaler


MIN_TORCH = (2, 7)  # FSDP2's fully_shard(ignored_params=...) and SDPA's enable_gqa


def check_torch(version: str | None = None) -> None:
    """Stop at startup, with the fix, on a torch older than MIN_TORCH (instead of a TypeError deep in wrap_model)."""
    version = version or torch.__version__
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(f"torch {version} is older than {need}, which train_ddp.py needs (FSDP2 fully_shard with "
                           f"ignored_params); install a newer one: make setup TORCH=\"torch>={need} --index-url "
                           f"https://download.pytorch.org/whl/cu126\" (V100 needs cu126), or "
                           f"pip install 'torch>={need}'")


def cuda_expected() -> str | None:
    """Why this machine looks like it has an NVIDIA GPU that torch cannot use (None when nothing is amiss)."""
    if torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    if torch.version.cuda is None:
        return f"nvidia-smi is here but torch {torch.__version__} is a CPU build"
    return f"nvidia-smi is here but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU " \
           f"(a driver older than that CUDA, or CUDA_VISIBLE_DEVICES hides it)"


def pick_device(device: str, local_rank: int) -> torch.device:
    """--device auto: cuda:LOCAL_RANK when CUDA works, else the CPU, saying so loudly where a GPU was expected."""
    if device != "auto":
        dev = torch.device(device)
        # a bare "cuda" means this rank's GPU (torch.cuda.set_device refuses a device without an index)
        return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    why = cuda_expected()
    if why:
        print(f"WARNING: --device auto falls back to the CPU: {why}. Training there is orders of magnitude slower. "
              f"Reinstall torch for your CUDA, e.g. make setup TORCH=\"torch --index-url "
              f"https://download.pytorch.org/whl/cu126\", or pass --device cpu to silence this.", file=sys.stderr)
    return torch.device("cpu")


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """The one place with device-specific code: process group, device, precision, autocast and loss scaler.
    Under torchrun (WORLD_SIZE > 1) joins the group (NCCL on CUDA, gloo on CPU) unless it is already set up.
    precision auto is precision.decide's: fp16 (+ GradScaler, adapters stay fp32) on compute capability 7.x, bf16
    on 8.0+ and on CPUs with native bf16, fp32 on other CPUs."""
    check_torch()
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dtype = choose_dtype(precision, dev)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype=dtype)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    return Runtime(rank, world, dev, rank == 0, dtype, autocast, scaler)


def prepare_model(model: Transformer, largs: LoraArgs, targs: TrainArgs, rt: Runtime) -> Transformer:
    """Frozen base in the compute dtype on the device, fp32 adapters with the same init on every rank."""
    quantize_model(model.to(device=rt.device, dtype=rt.dtype), targs.base_quant)  # no-op if loaded quantized
    model.reset_rope(rt.device)  # .to(dtype) also cast the rotary tables; keep them fp32
    torch.manual_seed(targs.seed)
    apply_lora(model, largs)
    return model.train()


def wrap_model(model: Transformer, targs: TrainArgs, rt: Runtime) -> nn.Module:
    """Optional activation checkpointing; then DDP over the adapters only, or FSDP sharding the frozen base."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    if targs.activation_checkpointing:
        # non-reentrant: works with frozen inputs and with DDP/FSDP hooks; recomputes each block in backward
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock),
                                       checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                     checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    if rt.world_size == 1 and not dist.is_initialized():  # one process; a one-rank group still wraps (gpu-check)
        return model
    if targs.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # FSDP2 shards each original parameter (what FSDP1 called use_orig_params): every block, then the rest.
        # The adapters stay whole on every rank (ignored); optimizer_step all-reduces their gradients.
        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        lora = {p for p in model.parameters() if p.requires_grad}
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=lora)
        return fully_shard(model, mesh=mesh, ignored_params=lora)
    # the frozen base is identical on every rank: skip broadcasting it and reducing anything but the adapters;
    # no buffer syncing either (torch 2.13 renamed broadcast_buffers=False to forward_sync_buffers=False and
    # deprecated the old name; older versions know only the old one)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=[rt.device] if rt.device.type == "cuda" else None, **{sync: False})


def get_lr(step: int, targs: TrainArgs, total_steps: int) -> float:
    """Linear warmup to --lr, then cosine decay to min_lr_ratio * lr at total_steps (step counts from 0)."""
    if step < targs.warmup_steps:
        return targs.lr * (step + 1) / targs.warmup_steps
    progress = (step - targs.warmup_steps) / max(1, total_steps - targs.warmup_steps)
    floor = targs.min_lr_ratio * targs.lr
    return floor + (targs.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def all_reduce(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few numbers over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def optimizer_step(params: list[nn.Parameter], optimizer, rt: Runtime, targs: TrainArgs) -> tuple[float, bool]:
    """Sync (FSDP), unscale, clip, step, zero; (grad norm, skipped). A skipped step is an fp16 overflow: the scaler
    drops the step and halves its scale; a non-finite norm at full precision stops training."""
    if rt.world_size > 1 and targs.strategy == "fsdp":
        for p in params:  # adapters are outside FSDP: average their gradients like DDP would
            dist.all_reduce(p.grad)
            p.grad /= rt.world_size
    rt.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, targs.grad_clip if targs.grad_clip > 0 else math.inf).item()
    scale = rt.scaler.get_scale()
    rt.scaler.step(optimizer)
    rt.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    skipped = rt.scaler.is_enabled() and rt.scaler.get_scale() < scale
    if not math.isfinite(norm) and not rt.scaler.is_enabled():
        raise FloatingPointError(f"gradient norm is {norm}; lower --lr, check the data, or use --precision fp32")
    if rt.scaler.is_enabled() and rt.scaler.get_scale() < 1.0:
        raise FloatingPointError("fp16 gradients overflow even with a loss scale below 1; use --precision bf16 "
                                 "or fp32, or lower --lr")
    return norm, skipped


@torch.no_grad()
def evaluate(model: nn.Module, batches, rt: Runtime) -> float | None:
    """Validation loss: summed token losses over all ranks / all target tokens (None without validation data)."""
    model.eval()
    loss, n = 0.0, 0.0
    for batch in batches:
        with rt.autocast_ctx:
            loss_sum, count = model(**batch.inputs(rt.device))
        loss, n = loss + loss_sum.item(), n + count.item()
    model.train()
    loss, n = all_reduce([loss, n], rt)
    return loss / n if n else None


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders in out, oldest first by step number (a name sort breaks past step_9999999)."""
    found = [p for p in (out / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_out(out: Path, targs: TrainArgs, rt: Runtime) -> None:
    """Refuse to start a new run over an old one: --resume continues it, --overwrite deletes it first."""
    used = checkpoints(out)[-1:] + [p for p in [out / "adapter" / "adapter.safetensors"] if p.is_file()]
    if targs.resume and targs.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them")
    # one decision for all ranks (each sees its own disk on several nodes), taken before rank 0 empties the folder
    if targs.resume or not all_reduce([float(bool(used))], rt)[0]:
        return
    if not targs.overwrite:
        where = used[0] if used else "seen by another rank"
        raise FileExistsError(f"--out {out} holds a run ({where}); pass --resume to continue it or --overwrite to "
                              f"delete it and start again (or choose another --out)")
    if rt.is_main:
        for name in ("checkpoints", "adapter", "peft", "metrics.jsonl", "loss.png"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"--overwrite: deleted the previous run in {out}", file=sys.stderr)


def save_checkpoint(out: Path, step: int, model: Transformer, largs: LoraArgs, optimizer, loader: StepLoader,
                    rt: Runtime, keep: int) -> Path:
    """Adapter + optimizer + scaler + step + data position + every rank's RNG, written to a tmp dir then renamed.
    The learning-rate schedule is a function of the step (get_lr), so the step is its whole state."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda"
           else torch.empty(0, dtype=torch.uint8)}
    rngs = [rng]
    if rt.world_size > 1:
        rngs = [None] * rt.world_size
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
    final = out / "checkpoints" / f"step_{step:07d}"
    if rt.is_main:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, largs, model.args, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict(),
                    "loader": loader.state_dict(), "rng": rngs}, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(out, keep, final)
    if rt.world_size > 1:
        dist.barrier()
    return final


def prune_checkpoints(out: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` highest steps, never `newest` (the one just written)."""
    others = [p for p in checkpoints(out) if p != newest]
    for old in others[:max(0, len(others) + 1 - keep)]:
        shutil.rmtree(old)


def read_checkpoint(path: Path) -> dict:
    """train_state.pt of a checkpoint, after checking that each of its files is whole (a crash or a full disk can
    leave a truncated one); raises ValueError naming the file."""
    readers = {"adapter_config.json": lambda f: json.loads(f.read_text()), "adapter.safetensors": safe_open_all,
               "train_state.pt": lambda f: torch.load(f, map_location="cpu", weights_only=True)}
    for name, read in readers.items():
        if not (path / name).is_file():
            raise ValueError(f"{path / name} is missing")
        try:
            state = read(path / name)
        except Exception as e:  # noqa: BLE001 - torch, safetensors and json each raise their own kind for a torn file
            raise ValueError(f"{path / name} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
                from None
    missing = {"step", "optimizer", "scaler", "loader", "rng"} - set(state)
    if missing:
        raise ValueError(f"{path / 'train_state.pt'} lacks {sorted(missing)}")
    return state


def safe_open_all(path: Path) -> None:
    """Read every tensor of a safetensors file (a truncated file fails here, not halfway through loading)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            f.get_tensor(key)


def newest_intact_checkpoint(out: Path, rt: Runtime) -> tuple[Path, dict]:
    """The newest checkpoint whose files are whole, and its train state. Damaged newer ones are renamed
    step_N.damaged (kept for a look, out of the way of pruning and of the next resume), saying so."""
    found = checkpoints(out)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start")
    damaged: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = read_checkpoint(path)
        except ValueError as e:
            damaged.append((path, str(e)))
            continue
        if damaged:
            if rt.world_size > 1:
                dist.barrier()  # every rank has read its checkpoint before rank 0 moves the damaged ones
            if rt.is_main:
                for bad, _ in damaged:
                    os.replace(bad, bad.with_name(bad.name + ".damaged"))
                print(f"--resume: {'; '.join(why for _, why in damaged)}; resuming from the previous intact "
                      f"checkpoint {path} (the damaged one is kept as *.damaged)", file=sys.stderr)
        return path, state
    raise ValueError(f"--resume: every checkpoint in {out / 'checkpoints'} is damaged "
                     f"({'; '.join(why for _, why in damaged)}); start again with --overwrite")


def load_checkpoint(out: Path, model: Transformer, optimizer, loader: StepLoader, rt: Runtime) -> int:
    """Restore the newest intact checkpoint in out; returns its step."""
    path, state = newest_intact_checkpoint(out, rt)
    load_adapter(model, path)  # checks that the checkpoint belongs to this base model and these LoRA flags
    if len(state["rng"]) != rt.world_size:
        raise ValueError(f"--resume: {path} was written by {len(state['rng'])} ranks, this run has "
                         f"{rt.world_size}; resume with the same number of processes")
    optimizer.load_state_dict(state["optimizer"])
    rt.scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"][rt.rank]["cpu"])
    if rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"][rt.rank]["cuda"], rt.device)
    return state["step"]


def start_outputs(out: Path, start_step: int, targs: TrainArgs, largs: LoraArgs, model: Transformer, counts: dict):
    """Write args.json; open metrics.jsonl for appending, without records past start_step (left by a run that
    died after its last checkpoint) and without a torn last line (a crash mid-write)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "args.json", {"train": asdict(targs), "lora": asdict(largs), "model": asdict(model.args),
                                   "data": counts})
    path = out / "metrics.jsonl"
    kept = [rec for _, rec in read_jsonl(path, drop_torn_tail=True) if rec.get("step", 0) <= start_step] \
        if path.exists() else []
    write_jsonl(path, kept)
    return path.open("a")


def plot_losses(out: Path) -> Path | None:
    """loss.png: training and validation loss per step, from metrics.jsonl (None without matplotlib: a GPU box's
    bare python may lack it, and the run's outputs must not depend on a plot)."""
    try:
        import matplotlib  # lazy: only the end of a run draws
    except ImportError:
        print(f"no loss.png in {out}: matplotlib is not installed (the metrics are in metrics.jsonl)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [rec for _, rec in read_jsonl(out / "metrics.jsonl")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=key)
    ax.set(xlabel="step", ylabel="loss (nats per target token)", title="LoRA fine-tuning")
    ax.legend()
    fig.savefig(out / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out / "loss.png"


def load_data(targs: TrainArgs, tokenizer, rt: Runtime) -> tuple[StepLoader, list, dict]:
    """(train loader for this rank, this rank's validation batches, counts for args.json). Records whose prompt
    alone fills --max-len are dropped and counted."""
    examples, dropped = encode_records(load_records(targs.data), tokenizer, targs.max_len, targs.train_on_inputs)
    if not examples:
        raise ValueError(f"all {dropped} records of {targs.data} have prompts of --max-len={targs.max_len} tokens "
                         f"or more; raise --max-len")
    train_ex, val_ex = split_validation(examples, targs.val_fraction, targs.seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    loader = StepLoader(make_rows(train_ex, targs.max_len, targs.pack), targs.micro_batch_size, targs.grad_accum,
                        rt.world_size, rt.rank, targs.seed, pad_id, group_by_length=not targs.pack)
    val = eval_batches(make_rows(val_ex, targs.max_len, targs.pack), targs.micro_batch_size, rt.world_size, rt.rank,
                       pad_id)
    counts = {"records": len(examples) + dropped, "dropped_too_long": dropped, "train_examples": len(train_ex),
              "val_examples": len(val_ex), "train_rows": len(loader.rows), "steps_per_epoch": loader.steps_per_epoch}
    return loader, val, counts


@dataclass
class Run:
    """What the loop works on: the bare model (saved) and the wrapped one (trained), and where it stands."""
    raw: Transformer
    model: nn.Module
    largs: LoraArgs
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: StepLoader
    val_batches: list
    total: int
    step: int
    out: Path
    metrics: object  # metrics.jsonl opened for appending (rank 0), else None


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def base_kind(model: Transformer) -> str | None:
    """The kind of the frozen block weights (memory_plan.BASE_BYTES), from the first frozen weight of a block."""
    if quantized_kind(model.layers[0]):
        return quantized_kind(model.layers[0])
    frozen = next(p for p in model.layers[0].parameters() if not p.requires_grad)
    return DTYPE_NAMES.get(frozen.dtype)


def memory_plan(targs: TrainArgs, margs: ModelArgs, rt: Runtime, base: str | None = None) -> Plan:
    """The per-rank memory plan of this run's flags; base: the frozen weights' kind (memory_plan.BASE_BYTES), by
    default --base-quant or else the compute dtype, which prepare_model casts the base to."""
    precision = DTYPE_NAMES[rt.dtype]
    base = base or (targs.base_quant if targs.base_quant != "none" else precision)
    return plan(Setup(margs, targs.lora_args(), targs.micro_batch_size, targs.max_len, precision, base,
                      rt.world_size, targs.strategy, targs.activation_checkpointing, targs.pack,
                      attention_kernel(rt.device, rt.dtype, margs, masked=targs.pack)))


def print_plan(p: Plan, rt: Runtime) -> None:
    if rt.is_main:
        total, name = device_bytes(rt.device)
        print("\n".join(p.lines(total, name)), flush=True)


def start_run(targs: TrainArgs, rt: Runtime, model: Transformer | None, tokenizer, mem: Plan) -> Run:
    """The data (every error in them before the weights load), the model with LoRA, optimizer, the resumed state
    if --resume, the wrapper, and the outputs."""
    from checkpoint import load_tokenizer  # lazy: tests and benches pass their own model

    out, largs = Path(targs.out), targs.lora_args()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(targs.checkpoint)
    loader, val_batches, counts = load_data(targs, tokenizer, rt)
    if model is None:
        model = load_quantized(targs.checkpoint, targs.base_quant, dtype=rt.dtype, device=str(rt.device))
    raw = prepare_model(model, largs, targs, rt)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay)
    total = targs.max_steps or targs.epochs * loader.steps_per_epoch
    torch.manual_seed(targs.seed + 1 + rt.rank)  # dropout differs across ranks, the LoRA init (above) does not
    step = load_checkpoint(out, raw, optimizer, loader, rt) if targs.resume else 0
    model = wrap_model(raw, targs, rt)
    metrics = start_outputs(out, step, targs, largs, raw, {**counts, "memory_plan": mem.as_dict()}) \
        if rt.is_main else None
    return Run(raw, model, largs, params, optimizer, loader, val_batches, total, step, out, metrics)


def forward_backward(model: nn.Module, batches: list, n_target: float, rt: Runtime) -> float:
    """Accumulate the gradients of one step's micro-batches; returns this rank's summed token loss."""
    loss_sum = torch.zeros((), device=rt.device)
    for k, batch in enumerate(batches):
        # DDP all-reduces on the last micro-step only. Scaling by world / n_target makes DDP's average over
        # ranks the gradient of (sum of token losses) / (target tokens of the whole step)
        skip_sync = isinstance(model, DDP) and k < len(batches) - 1
        with model.no_sync() if skip_sync else nullcontext():
            with rt.autocast_ctx:
                loss, _ = model(**batch.inputs(rt.device))
            rt.scaler.scale(loss * (rt.world_size / n_target)).backward()
        loss_sum += loss.detach()
    return loss_sum.item()


def log_step(run: Run, record: dict, targs: TrainArgs, rt: Runtime, bar) -> None:
    """Validation loss when due, then the record in metrics.jsonl and on the progress bar."""
    if run.step == run.total or (targs.eval_every and run.step % targs.eval_every == 0):
        val_loss = evaluate(run.model, run.val_batches, rt)
        if val_loss is not None:
            record["val_loss"] = val_loss
    if run.metrics:
        run.metrics.write(json.dumps(record) + "\n")  # record and newline in one write: a crash tears one line
        run.metrics.flush()
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tok_s']:.0f}",
                    refresh=False)
    bar.update(1)


def finish(run: Run, targs: TrainArgs, rt: Runtime) -> Path:
    """The final adapter, its peft copy and loss.png (rank 0); all ranks leave together."""
    if rt.is_main:
        save_adapter(run.raw, run.largs, run.raw.args, run.out / "adapter")
        export_peft(run.raw, run.out / "peft", base_model_name=targs.checkpoint or "")
        plot_losses(run.out)
    if rt.world_size > 1:  # ranks leave together: the outputs exist, and no rank tears gloo down under a busy peer
        dist.barrier()
    return run.out


def train(targs: TrainArgs, model: Transformer | None = None, tokenizer=None) -> Path:
    """Fine-tune (the model and tokenizer of --checkpoint unless given). Returns the output folder when done, or the
    checkpoint written when SIGTERM stopped the run."""
    from tqdm import tqdm  # lazy: only a run draws a progress bar

    rt = setup_runtime(targs.device, targs.precision)
    load_records(targs.data)  # names the file, line and field of a bad record, before minutes of model loading
    margs = model.args if model is not None else model_args_of(targs.checkpoint)  # the config only: no weights
    if targs.max_len > margs.max_seq_len:
        raise ValueError(f"--max-len={targs.max_len} exceeds the model's max_seq_len={margs.max_seq_len}")
    mem = memory_plan(targs, margs, rt)
    print_plan(mem, rt)  # the first lines of every run
    if targs.dry_run:  # the plan alone: nothing loaded, nothing written
        return Path(targs.out)
    check_out(Path(targs.out), targs, rt)
    run = start_run(targs, rt, model, tokenizer, mem)
    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    G = targs.micro_batch_size * targs.grad_accum * rt.world_size
    bar = tqdm(total=run.total, initial=run.step, disable=not rt.is_main, dynamic_ncols=True,
               desc=f"train (global batch {G} = {targs.micro_batch_size}x{targs.grad_accum}x{rt.world_size})")
    try:
        while run.step < run.total:
            t0 = time.perf_counter()
            batches = run.loader.next()
            n_target, n_real = all_reduce([sum((b.labels != -100).sum().item() for b in batches),
                                           sum(b.n_real for b in batches)], rt)
            lr = get_lr(run.step, targs, run.total)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = forward_backward(run.model, batches, n_target, rt)
            loss_sum, stop_votes = all_reduce([loss_sum, float(stop["signal"])], rt)
            loss = loss_sum / n_target
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {run.step + 1}: loss is {loss}; lower --lr, check the data, or use "
                                         f"--precision bf16/fp32 (pure fp16 overflows)")
            grad_norm, skipped = optimizer_step(run.params, run.optimizer, rt, targs)
            run.step += 1
            log_step(run, {"step": run.step, "epoch": run.loader.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "skipped": skipped, "tokens": int(n_real), "tok_s": n_real / (time.perf_counter() - t0)},
                     targs, rt, bar)
            if stop_votes or (targs.save_every and run.step % targs.save_every == 0):
                path = save_checkpoint(run.out, run.step, run.raw, run.largs, run.optimizer, run.loader, rt,
                                       targs.keep_checkpoints)
                if stop_votes:  # every rank sees the same sum, so all of them stop after this step
                    return path
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        if run.metrics:
            run.metrics.close()
    return finish(run, targs, rt)


def main(argv: list[str] | None = None) -> None:
    from cli import parse_args

    (targs,) = parse_args(argv, TrainArgs, description=__doc__)
    path = train(targs)
    if (not dist.is_initialized() or dist.get_rank() == 0) and not targs.dry_run:
        if path.name.startswith("step_"):
            print(f"stopped by SIGTERM; checkpoint {path}; continue with the same flags plus --resume")
        else:
            print(f"adapter in {path / 'adapter'}, peft copy in {path / 'peft'}, loss curve {path / 'loss.png'}")
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while a peer still has traffic in flight (gloo aborts then)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
