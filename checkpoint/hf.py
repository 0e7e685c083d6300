"""HF's LLaMA format: `config.json` + `model.safetensors` (or the shards of `model.safetensors.index.json`), read
memory-mapped; names mapped to Meta's (checkpoint/names.py) and q/k rows moved between HF's half-split rotary layout
and Meta's interleaved one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint.files import check_types, read_json
from checkpoint.names import HF_TO_META, expand
from jsonl import atomic_write, write_json
from model import ModelArgs


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows in the half-split rotary layout; return Meta's interleaved layout (DESIGN.md)."""
    d1, d2 = w.shape[0], w.shape[-1]
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's half-split layout (the inverse of unpermute_hf)."""
    d1, d2 = w.shape[0], w.shape[-1]
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def hf_to_meta(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename an HF LLaMA state dict to Meta's names and undo the q/k rotary permutation."""
    names = expand(HF_TO_META, args.n_layers)
    out = {}
    for k, w in state.items():
        if k not in names:
            if k.endswith("rotary_emb.inv_freq"):
                continue
            raise KeyError(f"unexpected HF tensor {k!r}")
        meta = names[k]
        if meta.endswith("attention.wq.weight"):
            w = unpermute_hf(w, args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            w = unpermute_hf(w, args.kv_heads)
        out[meta] = w
    if args.tie_embeddings:  # tied checkpoints usually omit lm_head; the model shares one tensor anyway
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def meta_to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A Meta-named state dict in HF's names and q/k layout (lm_head left out when tied, as transformers re-ties)."""
    out = {}
    for name, meta in expand(HF_TO_META, args.n_layers).items():
        if meta == "output.weight" and args.tie_embeddings:
            continue
        w = state[meta]
        if meta.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads).contiguous()
        elif meta.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.kv_heads).contiguous()
        out[name] = w
    return out


def args_from_hf_config(cfg: dict, path: Path | str = "config.json") -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict."""
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"{path}: model_type={cfg.get('model_type')!r}; only LLaMA-architecture models load")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{path}: rope scaling {rope} is not supported (plain RoPE only)")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if cfg.get(k) is None:
            raise ValueError(f"{path}: key {k!r} is missing")
    check_types(cfg, path, ints=("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                 "intermediate_size", "num_key_value_heads", "max_position_embeddings", "head_dim"),
                floats=("rms_norm_eps", "rope_theta"), bools=("tie_word_embeddings",))
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        raise ValueError(f"{path}: head_dim={cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
    try:
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 2048), tie_embeddings=cfg.get("tie_word_embeddings", False))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The LlamaConfig dict transformers needs to load a model we wrote."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch.")}


def generation_config(tok) -> dict:
    """generation_config.json for a tokenizer.Tokenizer: its EOS first, then every other token that ends a turn
    (SmolLM2: <|im_end|>, <|endoftext|>), so transformers' generate and pipeline stop where generate.py does."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    cfg = {"eos_token_id": eos + sorted(tok.stop_ids - set(eos))}
    if tok.bos_id is not None:
        cfg["bos_token_id"] = tok.bos_id
    if tok.pad_id is not None:
        cfg["pad_token_id"] = tok.pad_id
    return cfg


def _weight_files(folder: Path) -> tuple[list[str], dict | None, Path]:
    """The safetensors files of an HF folder and the index's weight_map (None for a single model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: key 'weight_map' is missing")
        return sorted(set(weight_map.values())), weight_map, index
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"], None, index
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json beside config.json")


def load_hf_state(folder: Path, args: ModelArgs) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """model.safetensors or the shards of model.safetensors.index.json, memory-mapped, in Meta's names and layout."""
    files, weight_map, index = _weight_files(folder)
    names, raw, where = expand(HF_TO_META, args.n_layers), {}, {}
    for name in files:
        f = folder / name
        if not f.is_file():
            held = [k for k, v in weight_map.items() if v == name]
            raise FileNotFoundError(f"{index}: shard {name} is missing (it holds {held[0]} and {len(held) - 1} more)")
        for k, w in read_safetensors(f).items():
            if k not in names and not k.endswith("rotary_emb.inv_freq"):
                raise ValueError(f"{f}: unexpected tensor {k} (not part of a {args.n_layers}-layer LLaMA)")
            raw[k], where[names.get(k, k)] = w, str(f)
    for k, w in raw.items():  # checked here, as the q/k unpermute needs the right shape
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            rows = (args.n_heads if "q_proj" in k else args.kv_heads) * args.head_dim
            if tuple(w.shape) != (rows, args.dim):
                raise ValueError(f"{where[names[k]]}: tensor {k} has shape {tuple(w.shape)} but the config implies "
                                 f"{(rows, args.dim)}")
    return hf_to_meta(raw, args), where


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped; a cut or corrupt file is an error naming it."""
    try:
        with safe_open(str(path), framework="pt") as st:
            return {k: st.get_tensor(k) for k in st.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it was cut short or damaged: download or "
                         "copy it again") from None


def save_hf(args: ModelArgs, state: dict[str, torch.Tensor], out: Path) -> None:
    """config.json + model.safetensors (HF names and q/k layout), each written atomically."""
    hf = meta_to_hf(state, args)
    write_json(out / "config.json", hf_config(args, state["tok_embeddings.weight"].dtype))
    atomic_write(out / "model.safetensors", lambda p: save_file(hf, str(p), metadata={"format": "pt"}))
