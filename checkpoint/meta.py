"""Meta's checkpoint format: `params.json` + `consolidated.NN.pth` (model-parallel shards merged on load), read
memory-mapped with torch's safe unpickler, and written back as one shard.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

from checkpoint.files import read_json
from jsonl import atomic_write, write_json
from model import ModelArgs

# Meta model-parallel shards are concatenated along these dims (llama/model.py's Parallel layers); 1-D norms are copies
MERGE_DIM_1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
MERGE_DIM_0 = ("output.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
               "feed_forward.w1.weight", "feed_forward.w3.weight")


def args_from_params(path: Path, vocab_size_of: Callable[[Path], int] | None = None) -> ModelArgs:
    """ModelArgs from Meta's params.json; `vocab_size: -1` (LLaMA-1) takes vocab_size_of(folder), the tokenizer's."""
    params = read_json(path)
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    for k, v in params.items():
        if k not in known:
            raise ValueError(f"{path}: unknown key {k!r}; params.json keys are {sorted(known)}")
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"{path}: key {k!r} = {v!r} must be a number")
    for k in ("dim", "n_layers", "n_heads"):
        if k not in params:
            raise ValueError(f"{path}: key {k!r} is missing")
    if params.get("vocab_size", -1) == -1:
        try:
            params["vocab_size"] = vocab_size_of(path.parent) if vocab_size_of else -1
        except FileNotFoundError as e:
            raise ValueError(f"{path}: vocab_size is -1 (the tokenizer's size) but {e}") from None
    try:
        return ModelArgs(**params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def shard_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder}: no consolidated.00.pth beside params.json")
    for n, f in enumerate(files):
        if f.name != f"consolidated.{n:02d}.pth":
            raise FileNotFoundError(f"{folder}: shard consolidated.{n:02d}.pth is missing (found {f.name})")
    return files


def load_meta_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """consolidated.NN.pth memory-mapped; several model-parallel shards are merged one shard at a time, so at most
    the merged model plus one shard is resident. Returns the state and the file each tensor came from."""
    files = shard_files(folder)
    if len(files) == 1:
        state = torch_load(files[0])
        state.pop("rope.freqs", None)  # precomputed RoPE table in LLaMA-1 files; we compute ours
        return state, dict.fromkeys(state, str(files[0]))
    merged: dict[str, torch.Tensor] = {}
    for s, f in enumerate(files):
        shard = torch_load(f)
        shard.pop("rope.freqs", None)
        if s == 0:
            merged = _empty_merged(shard, len(files))
        _copy_shard(merged, shard, s, len(files), f)
        del shard  # unmaps the file: its pages stop counting toward our RSS
    return merged, dict.fromkeys(merged, f"{folder}/consolidated.00-{len(files) - 1:02d}.pth")


def _empty_merged(first: dict[str, torch.Tensor], n_shards: int) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the merged shapes, from the first shard's."""
    merged = {}
    for k, w in first.items():
        shape = list(w.shape)
        if (d := merge_dim(k)) is not None:
            shape[d] *= n_shards
        merged[k] = torch.empty(shape, dtype=w.dtype)
    return merged


def _copy_shard(merged: dict, shard: dict, s: int, n_shards: int, f: Path) -> None:
    """Copy shard number s into its slice of each merged tensor (1-D norms: the first shard's copy)."""
    for k in merged.keys() | shard.keys():
        if k not in shard or k not in merged:
            raise ValueError(f"{f}: tensor {k} is {'missing' if k not in shard else 'not in the first shard'}")
        w, d = shard[k], merge_dim(k)
        step = 0 if d is None else merged[k].shape[d] // n_shards
        part = merged[k] if d is None else merged[k].narrow(d, s * step, step)
        if part.shape != w.shape:
            raise ValueError(f"{f}: tensor {k} has shape {tuple(w.shape)}, other shards {tuple(part.shape)}")
        if d is not None or s == 0:
            part.copy_(w)


def merge_dim(key: str) -> int | None:
    if key.endswith(MERGE_DIM_1):
        return 1
    if key.endswith(MERGE_DIM_0):
        return 0
    return None


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} pickle, read memory-mapped by torch's restricted unpickler (tensors and plain containers
    only: a pickle can run code, so anything else is refused, in our words)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the Python object `{found[1]}`" if found else "Python objects"
        raise ValueError(f"{path}: refused: it holds {what} besides tensors, and loading that could run any code. "
                         "Give a checkpoint of tensors only: re-save the weights from a copy you trust as a plain "
                         "state dict of tensors, or as safetensors") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of tensors (Meta's consolidated.NN.pth)")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: key {k!r} holds a {type(v).__name__}, not a tensor: a consolidated.NN.pth is "
                             "a flat dict of tensors (a training checkpoint keeps the weights under a key: save "
                             "those alone)")
    return state


def save_meta(args: ModelArgs, state: dict[str, torch.Tensor], out: Path) -> None:
    """params.json (the set ModelArgs fields) + consolidated.00.pth, each written atomically."""
    write_json(out / "params.json", {k: v for k, v in dataclasses.asdict(args).items() if v is not None})
    atomic_write(out / "consolidated.00.pth", lambda p: torch.save(state, p))
