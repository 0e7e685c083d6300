"""LLaMA in plain PyTorch, in the order of the paper: ModelArgs -> RMSNorm -> RoPE -> Attention -> FeedForward
-> TransformerBlock -> Transformer. Meta's parameter names, so Meta checkpoints load without a key map.

    from checkpoint import load_model
    model = load_model()                      # the embedded SmolLM2-135M-Instruct, or a Meta / HF / GGUF path
    logits = model(tokens)                    # (B, T, vocab) float32

Covers LLaMA-1/2/3-style models: grouped-query attention (n_kv_heads), FFN width from multiple_of and
ffn_dim_multiplier (or given), rope_theta, tied embeddings. The model holds no runtime policy: no device, dtype,
optimizer or loss state. A static KV cache is set up explicitly for decoding (setup_cache), and forward takes
per-token positions and document ids so packed rows attend only within their own document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    vocab_size: int = 32000
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this (Meta)
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit FFN width (HF intermediate_size, GGUF); None: Meta's formula
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # output projection shares tok_embeddings.weight (SmolLM2)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name}={getattr(self, name)} must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        # Meta's rule (llama/model.py): 2/3 of 4*dim, scaled, rounded up to multiple_of
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class Linear(nn.Linear):
    """nn.Linear, except that one input row on the CPU goes through torch.mv: PyTorch's CPU bf16 GEMM is far
    below memory bandwidth for a single row (decoding at batch 1), its GEMV is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and x.device.type == "cpu" and self.bias is None:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight  # one fused kernel


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm for training: the values of RMSNorm.forward, and a backward of four passes over x where autograd
    through F.rms_norm chains pow, mean, rsqrt and several mul kernels. With xh = x r, r = 1 / rms(x), u = g weight:
    dx = r (u - xh mean(u xh)), dweight = sum of g xh over the rows.
    The sums run in fp32 with autocast off: autocast would run linalg.vecdot in fp16, whose sum of squares overflows
    at dim 4096 once rms(x) > 4 (r becomes 0, and so does every output)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math for bf16/fp16; fp64 stays (gradcheck)
            r = torch.rsqrt(torch.linalg.vecdot(xf, xf).div_(x.shape[-1]).add_(eps)).unsqueeze(-1)  # (..., 1)
            ctx.save_for_backward(x, weight, r)
            return (xf * r).type_as(x) * weight

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            xf, grad_x, grad_w = x.to(torch.promote_types(x.dtype, torch.float32)), None, None
            gf = g.to(xf.dtype)  # a loss-scaled fp16 gradient times the weight, summed over rows, can overflow fp16
            if ctx.needs_input_grad[0]:
                u = gf * weight.to(xf.dtype)
                c = torch.linalg.vecdot(u, xf).unsqueeze(-1).mul_(r * r / x.shape[-1])  # r^2 mean(u x)
                grad_x = torch.addcmul(u, xf, c, value=-1).mul_(r).type_as(x)
            if ctx.needs_input_grad[1]:
                grad_w = (gf * (xf * r).type_as(x)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), each (max_len, head_dim // 2), fp32 (Su et al. 2021)."""
    # on the CPU even when a loader builds the model on the meta device (arange has no meta kernel there)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device="cpu"), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by their angle: Meta's layout, the complex product x * e^(i*angle)
    (one complex multiply: fewer kernels forward and backward than four real ones).
    x: (B, T, H, head_dim); rot = cos + i*sin: (B or 1, T, 1, head_dim // 2) complex64."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, head_dim // 2)
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h @ weight.T, a chunk of rows at a time, for a frozen weight.

    The (N, vocab) logits never exist in full: each chunk's logits give its loss and, while they are still in cache,
    the gradient for h (softmax - one-hot, times weight), which backward only scales. Same values as
    F.cross_entropy(F.linear(h, weight), targets, reduction="sum"), less memory, and on a CPU faster."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_grad: bool, chunk: int):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h, dtype=torch.float32) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            t = targets[s:s + chunk]
            logits = F.linear(h[s:s + chunk], weight).float()  # (chunk, vocab)
            target_logit = logits.gather(1, t[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: no second (chunk, vocab) buffer
            total = exp.sum(dim=-1, keepdim=True)
            loss += (top + total.log() - target_logit).sum()  # log-sum-exp minus the target's logit
            if need_grad:
                probs = exp.div_(total)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
                grad_h[s:s + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.h_dtype), None, None, None, None


# devices whose SDPA lacks a kernel for GQA with a mask (see Attention.forward); the CPU's flash kernel has one
EXPAND_KV_WITH_MASK = {"cuda"}


class KVCache(nn.Module):
    """Static per-layer key/value storage for decoding; slots [0, max_len) are filled left to right."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, rot, mask, start_pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, n_kv_heads, start_pos + T, head_dim)
        # a causal mask is only implied when queries and keys cover the same positions (no earlier cache)
        is_causal = mask is None and T > 1 and k.shape[2] == T
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None and T > 1 and q.device.type in EXPAND_KV_WITH_MASK:
            # CUDA's flash kernel takes no mask and its memory-efficient one no GQA: SDPA would fall back to the
            # math kernel, which stores (B, n_heads, T, Tk) scores in every layer. Copying k and v up to n_heads
            # keeps the memory-efficient kernel (decoding, T = 1, has tiny scores and keeps the cache unexpanded)
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, n_heads, Tk, head_dim)
            v, gqa = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1), False
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:  # fp32 adapters in autocast
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, mask, start_pos: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rot, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if not self.tok_embeddings.weight.is_meta:  # normal_ on the meta device would import torch._dynamo
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # cos/sin are derived, not learned: kept out of the state dict, real values even for a meta-device model
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        default = torch.empty(0).device
        if default.type != "meta":
            cos, sin = cos.to(default), sin.to(default)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._cache_docs: torch.Tensor | None = None  # (B, max_len) document id of every cached slot
        self._cache_masked = False  # True once a doc_ids was given since setup_cache: decoding needs the mask

    def tie_weights(self) -> None:
        """Share the output projection with the embeddings (call again after load_state_dict(assign=True))."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self, device=None) -> None:
        """Recompute the rotary tables (after building the model on the meta device)."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        """Allocate a static KV cache of max_len slots for each layer (for decoding)."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds max_seq_len={self.args.max_seq_len}")
        p = self.tok_embeddings.weight
        dtype, device = dtype or p.dtype, device or p.device
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, self.args.kv_heads, max_len, self.args.head_dim, dtype, device)
        self._cache_docs = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        self._cache_masked = False

    def select_cache_rows(self, rows: torch.Tensor) -> None:
        """Make cache row i a copy of old row rows[i]: drops finished rows, or repeats one prompt for several options."""
        for layer in self.layers:
            cache = layer.attention.cache
            cache.k, cache.v = cache.k[rows], cache.v[rows]
        self._cache_docs = self._cache_docs[rows]

    def resize_cache(self, front: int, back: int) -> None:
        """Add empty slots (document id 0: never attended to) before and after the cached ones, or drop slots where
        negative: aligns separately prefilled rows before join_cache, grows the cache, trims slots no row uses."""
        if self._cache_docs.shape[1] + front + back > self.args.max_seq_len:
            raise ValueError(f"a cache of {self._cache_docs.shape[1] + front + back} slots exceeds "
                             f"max_seq_len={self.args.max_seq_len}")
        for layer in self.layers:
            cache = layer.attention.cache
            cache.k, cache.v = F.pad(cache.k, (0, 0, front, back)), F.pad(cache.v, (0, 0, front, back))
        self._cache_docs = F.pad(self._cache_docs, (front, back))
        self._cache_masked = self._cache_masked or front > 0

    def take_cache(self) -> tuple:
        """Remove the KV cache and return it, to put back with join_cache (e.g. around a separate prefill)."""
        taken = ([layer.attention.cache for layer in self.layers], self._cache_docs, self._cache_masked)
        self.clear_cache()
        return taken

    def join_cache(self, taken: tuple) -> None:
        """Put a taken cache back; the rows of a cache set up meanwhile (same number of slots) follow its rows."""
        caches, docs, masked = taken
        if self._cache_docs is not None:
            for layer, old in zip(self.layers, caches):
                new = layer.attention.cache
                old.k, old.v = torch.cat([old.k, new.k]), torch.cat([old.v, new.v])
            docs, masked = torch.cat([docs, self._cache_docs]), masked or self._cache_masked
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache
        self._cache_docs, self._cache_masked = docs, masked

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
        self._cache_docs = None

    @staticmethod
    def _mask(doc_q: torch.Tensor, doc_k: torch.Tensor, start_pos: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, Tq, Tk) mask in `dtype` (0 or -inf): causal over cache slots, and within the same
        document. SDPA would turn a boolean mask into this in every layer; one conversion serves them all."""
        T, Tk = doc_q.shape[1], doc_k.shape[1]
        slot_q = torch.arange(start_pos, start_pos + T, device=doc_q.device)
        causal = slot_q[:, None] >= torch.arange(Tk, device=doc_q.device)[None, :]  # (Tq, Tk)
        same_doc = doc_q[:, :, None] == doc_k[:, None, :]  # (B, Tq, Tk)
        allowed = (causal & same_doc).unsqueeze(1)  # (B, 1, Tq, Tk); the diagonal is always allowed: no row is empty
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def _compute_dtype(self) -> torch.dtype:
        """The dtype attention will run in: autocast's where it is on, else the weights'."""
        device = self.tok_embeddings.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else self.tok_embeddings.weight.dtype

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, last_only: bool = False):
        """Logits (B, T, vocab) in fp32, or (loss_sum, n_tokens) when labels are given.

        labels are already shifted: labels[:, t] is the target of the prediction at position t; -100 is ignored
        and its output projection is never computed. positions (B, T) are RoPE positions (default
        start_pos + t); doc_ids (B, T) restrict attention to the same document (packing, left padding)."""
        B, T = tokens.shape
        if positions is None:
            if start_pos + T > self.args.max_seq_len:
                raise ValueError(f"sequence end {start_pos + T} exceeds max_seq_len={self.args.max_seq_len}")
            cos, sin = self.rope_cos[start_pos:start_pos + T][None], self.rope_sin[start_pos:start_pos + T][None]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim // 2)
        rot = torch.complex(cos.float(), sin.float())[:, :, None]  # (B or 1, T, 1, head_dim // 2)

        mask = None
        if self._cache_docs is not None:
            docs = doc_ids if doc_ids is not None else torch.ones_like(tokens)
            self._cache_docs[:, start_pos:start_pos + T] = docs
            self._cache_masked = self._cache_masked or doc_ids is not None
            # without doc ids or a chunked prefill, SDPA's own causal flag (or no mask for one query) suffices
            if self._cache_masked or (T > 1 and start_pos > 0):
                mask = self._mask(docs, self._cache_docs[:, :start_pos + T], start_pos, self._compute_dtype())
        elif doc_ids is not None:
            mask = self._mask(doc_ids, doc_ids, 0, self._compute_dtype())

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rot, mask, start_pos)

        if labels is not None:
            keep = labels != -100
            hs = self.norm(h[keep])  # (N, dim): only the positions that carry a target
            w = self.output.weight if type(self.output) is Linear else None  # an adapted output: plain path
            if w is None or w.requires_grad:
                return F.cross_entropy(self.output(hs).float(), labels[keep], reduction="sum"), keep.sum()
            need_grad, n = torch.is_grad_enabled() and hs.requires_grad, hs.shape[0]
            pieces = max(1, -(-n // max(1, 2**23 // w.shape[0])))  # chunks of <= 32 MB of fp32 logits, of even
            chunk = max(1, -(-n // pieces))  # size: a short last chunk would read the whole weight for a few rows
            return ChunkedCrossEntropy.apply(hs, w, labels[keep], need_grad, chunk), keep.sum()
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
