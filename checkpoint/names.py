"""The one table of tensor names: Meta's (model.py), HF LlamaForCausalLM's and GGUF's (llama.cpp), and the expansion
of their per-layer `{i}` entries. lora.py takes HF_NAMES from here for the peft export.
"""
from __future__ import annotations

# our linear names -> their HF LlamaForCausalLM module paths (relative to the decoder layer, or the top for output)
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj", "output": "lm_head"}
# our linear names -> their module paths in a TransformerBlock (model.py)
META_LINEARS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}

# HF LlamaForCausalLM names -> Meta names (per layer entries use {i})
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.layers.{{i}}.{HF_NAMES[n]}.weight": f"layers.{{i}}.{path}.weight" for n, path in META_LINEARS.items()},
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
# GGUF (llama.cpp) names -> Meta names; GGUF keeps Meta's interleaved rotary layout, so no q/k permutation
GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
}


def expand(table: dict[str, str], n_layers: int) -> dict[str, str]:
    """A name table with its `{i}` entries written out for layers 0..n_layers-1."""
    out = {}
    for src, meta in table.items():
        if "{i}" in src:
            out.update({src.format(i=i): meta.format(i=i) for i in range(n_layers)})
        else:
            out[src] = meta
    return out
