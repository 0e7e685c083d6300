"""Writing GGUF (llama.cpp's format) with the `gguf` package's GGUFWriter: a llama-architecture file that llama.cpp,
Ollama and transformers' GGUF loader run as it is.

    save_model(model, "out/merged.gguf", format="gguf", tokenizer_src=base, quant="q8_0")   # checkpoint/__init__.py
    python lora.py merge --adapter out/run/adapter --out out/merged.gguf --format gguf --quant f16

What llama.cpp expects, and we write: the weights in Meta's interleaved rotary layout as they are (llama.cpp's convert
script un-permutes HF's q/k back to it); no `output.weight` when the embeddings are tied (llama.cpp then uses
`token_embd` for the output); 1-D norms in F32 whatever the quant; the `llama.*` hyperparameters; and the tokenizer as
`tokenizer.ggml.*`, from a GGUF (copied), a SentencePiece `tokenizer.model` ("llama") or an HF byte-level BPE
`tokenizer.json` ("gpt2"), with the chat template. Tensors are converted and written one at a time, so the file
costs one tensor of memory beyond the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType, quants

from checkpoint.files import find_sentencepiece, is_gguf, read_json
from checkpoint.gguf_read import read_gguf
from checkpoint.names import GGUF_TO_META, expand
from model import ModelArgs

# --quant -> (type of the 2-D tensors, general.file_type)
QUANTS = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
          "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
          "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
# the tokenizer keys we carry, and the GGUFWriter method that writes each with its GGUF type
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "add_tokenizer_model", "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list", "tokenizer.ggml.token_type": "add_token_types",
    "tokenizer.ggml.scores": "add_token_scores", "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id", "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.unknown_token_id": "add_unk_token_id", "tokenizer.ggml.padding_token_id": "add_pad_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token", "tokenizer.ggml.add_eos_token": "add_add_eos_token",
    "tokenizer.ggml.add_space_prefix": "add_add_space_prefix", "tokenizer.chat_template": "add_chat_template",
}


def save_gguf(args: ModelArgs, state: dict[str, torch.Tensor], path: Path, tokenizer_src, quant: str = "f16",
              name: str = "") -> None:
    """Write the Meta-named `state` of a model with `args` as a llama GGUF at path (a temporary name the caller
    renames), with the tokenizer of tokenizer_src."""
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r} must be one of {list(QUANTS)}")
    tok = tokenizer_metadata(Path(tokenizer_src), args.vocab_size)
    tensors = _tensor_plan(args, state, QUANTS[quant][0])
    w = GGUFWriter(None, "llama")
    _write_hparams(w, args, quant, name)
    for key, value in tok.items():
        getattr(w, TOKENIZER_KEYS[key])(value)
    for gname, t, qtype in tensors:
        block, type_size = GGML_QUANT_SIZES[qtype]
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), t.numel() // block * type_size, raw_dtype=qtype)
    w.write_header_to_file(Path(path))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t, qtype in tensors:
        w.write_tensor_data(encode(t, qtype))
    w.close()


def _write_hparams(w: GGUFWriter, args: ModelArgs, quant: str, name: str) -> None:
    """general.* and llama.* keys, as llama.cpp's convert script writes them for a LlamaForCausalLM."""
    w.add_name(name or "llama")
    w.add_file_type(QUANTS[quant][1])
    if quant not in ("f32", "f16"):
        w.add_quantization_version(2)  # GGML_QUANT_VERSION of the block layouts gguf.quants writes
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)


def _tensor_plan(args: ModelArgs, state: dict[str, torch.Tensor], qtype) -> list[tuple[str, torch.Tensor, object]]:
    """(GGUF name, tensor, GGML type) of each tensor: norms F32; rows that quant blocks do not divide F16."""
    plan = []
    for gname, meta in expand(GGUF_TO_META, args.n_layers).items():
        if meta == "output.weight" and args.tie_embeddings:
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        t = state[meta]
        block = GGML_QUANT_SIZES[qtype][0]
        if t.dim() == 1:
            plan.append((gname, t, GGMLQuantizationType.F32))
        elif t.shape[-1] % block:
            plan.append((gname, t, GGMLQuantizationType.F16))
        else:
            plan.append((gname, t, qtype))
    return plan


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """One tensor as the bytes GGUF stores for qtype (numpy, rows first)."""
    if qtype == GGMLQuantizationType.F16:
        return t.detach().to(torch.float16).cpu().numpy()
    a = t.detach().to(torch.float32).cpu().numpy()
    return a if qtype == GGMLQuantizationType.F32 else quants.quantize(a, qtype)


# ------------------------------------------------------------------------------------------------ the tokenizer
def tokenizer_metadata(src: Path, vocab_size: int) -> dict:
    """`tokenizer.*` GGUF metadata for the tokenizer of src (a GGUF, tokenizer.model, tokenizer.json or a folder with
    one), its vocabulary padded with unused tokens to the model's embedding rows, as llama.cpp requires."""
    if not src.exists():
        raise FileNotFoundError(f"no tokenizer source at {src}: pass the base checkpoint (tokenizer_src)")
    folder = src if src.is_dir() else src.parent
    if is_gguf(src):
        meta = {k: v for k, v in read_gguf(src).metadata.items() if k in TOKENIZER_KEYS}
    elif src.name == "tokenizer.model" or (src.is_dir() and find_sentencepiece(src) is not None):
        meta = sentencepiece_metadata(src if src.is_file() else find_sentencepiece(src), folder)
    elif src.name == "tokenizer.json" or (folder / "tokenizer.json").is_file():
        meta = hf_bpe_metadata(folder / "tokenizer.json", folder)
    else:
        raise FileNotFoundError(f"no tokenizer in {src}: expected a GGUF, tokenizer.model (here or one folder up) "
                                "or tokenizer.json")
    return _pad_vocab(meta, vocab_size, src)


def _pad_vocab(meta: dict, vocab_size: int, src: Path) -> dict:
    n = len(meta["tokenizer.ggml.tokens"])
    if n > vocab_size:
        raise ValueError(f"{src}: the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    pad = vocab_size - n
    if pad:
        meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *(f"[PAD{i}]" for i in range(n, vocab_size))]
        meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[int(TokenType.UNUSED)] * pad]
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], *[-1e4] * pad]
    return meta


def _chat_template(folder: Path) -> dict:
    cfg = folder / "tokenizer_config.json"
    template = read_json(cfg).get("chat_template") if cfg.is_file() else None
    return {"tokenizer.chat_template": template} if isinstance(template, str) and template else {}


def sentencepiece_metadata(path: Path, folder: Path) -> dict:
    """A SentencePiece BPE model (LLaMA-1/2's tokenizer.model) as llama.cpp's "llama" vocabulary: pieces, scores
    and piece types (llama.cpp's token types are sentencepiece's)."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    types = []
    for i in range(sp.vocab_size()):
        kind = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
        types.append(int(kind))
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.vocab_size())],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.vocab_size())],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False,
            # the normalizer's add_dummy_prefix, read off its effect: "a" encodes to "\u2581a" when it is on
            "tokenizer.ggml.add_space_prefix": sp.encode_as_pieces("a")[0].startswith("\u2581")}
    for key, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()), ("padding", sp.pad_id())):
        if i >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    return meta | _chat_template(folder)


def hf_bpe_metadata(path: Path, folder: Path) -> dict:
    """An HF byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary: tokens by id, merges, and the added
    tokens typed CONTROL (special) or USER_DEFINED; special ids and template from tokenizer_config.json."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"{path}: only a byte-level BPE tokenizer.json converts to GGUF (found model type "
                         f"{model.get('type')!r}); give the folder's tokenizer.model instead")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)]
    types = [int(TokenType.UNUSED)] * len(tokens)
    for t, i in vocab.items():
        tokens[i], types[i] = t, int(TokenType.NORMAL)
    for t in spec.get("added_tokens", []):
        types[t["id"]] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp's "gpt2" pre-tokenizer is GPT-2's split regex, which a plain ByteLevel step applies; a custom split
    # (LLaMA-3's) has no name we can know here, so llama.cpp's default
    plain = (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2" if plain else "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    for key, field in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        tok = cfg.get(field)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = vocab[tok]
    meta["tokenizer.ggml.add_bos_token"] = bool(cfg.get("add_bos_token", False))
    return meta | _chat_template(folder)
