"""Quantized frozen base for LoRA: int8 and NF4 weights that stay quantized in memory and are dequantized into the
compute dtype inside each linear, forward and backward; the LoRA adapters on top stay fp32.

    from quant import quantize_model, dequantize_model, weight_bytes
    quantize_model(model, "nf4")             # every linear and the token embeddings, in place
    load_quantized(path, "nf4")              # checkpoint.load_model, each tensor quantized as it is read
    python train_ddp.py --base-quant nf4 ... ; python generate.py --base-quant int8 ... ; serve.py --base-quant nf4
    weight_bytes((4096, 11008), "nf4")       # bytes a frozen weight takes (the memory plan uses it)

int8: per-output-channel absmax, weight-only (LLM.int8()'s vector-wise scale without its outlier split):
w ~= q * absmax_row / 127, q in [-127, 127]. nf4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): each block of 64
inputs of a row is divided by its absmax and rounded to the nearest of 16 fixed values (NF4_CODE); two codes a byte,
the first in the high nibble (bitsandbytes' layout, so its dequantize_4bit reads our bytes; tests/test_quant.py).
The block absmaxes are quantized too (QLoRA's double quantization, bitsandbytes' compress_statistics=True): minus
their mean, in blocks of 256, to 8-bit codes of the dynamic map, so a weight costs 4.127 bits instead of 4.5.
The quantized tensors are buffers, not parameters: DDP and FSDP leave them alone (replicated on every rank), and
`model.to(dtype)` changes the compute dtype but never the codes or scales (scales are kept as integer bit patterns).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import Transformer

KINDS = ("none", "int8", "nf4")
NF4_BLOCK = 64
# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, appendix E; the same
# numbers as bitsandbytes' get_4bit_type("nf4"))
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # value x rounds to code i when midpoint[i-1] < x <= midpoint[i]
# byte b -> (code[b >> 4], code[b & 15]) as one 64-bit word: one gather of 8 bytes dequantizes two weights
# (index_select over this table is ~8x faster on a CPU than indexing a (16,) code table twice; measured)
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1).view(torch.int64).view(-1)
SCALE_BLOCK = 256  # nf4 absmaxes per second-level scale


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map the nf4 absmaxes are quantized to (Dettmers 2016, "8-bit approximations for
    parallelism"; bitsandbytes' create_dynamic_map()): for each decade 10^-6 .. 10^0, 2^i values (i = 0..6) at the
    midpoints of 2^i equal steps of [0.1, 1], of each sign; then 0 and 1: 256 sorted values in [-0.993, 1]."""
    values = [0.0, 1.0]
    for i in range(7):
        steps = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (10 ** (i - 6)) * ((steps[:-1] + steps[1:]) / 2)
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()
_CHUNK = 1 << 18  # elements per pass when dequantizing: fp32 temporaries of 1 MB
# elements per pass when quantizing (once, at load): temporaries of 256 KB stay below the sizes malloc serves from
# the heap, and the codes kept (MBs) come from mmap; with 4 MB temporaries the heap interleaved them with the codes
# and kept up to 25% of an int8 1B model as free holes in RSS (measured)
_QCHUNK = 1 << 16


_BLOCK_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_VOCAB_NAMES = ("tok_embeddings", "output")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"base_quant={kind!r} must be one of {', '.join(KINDS)}")
    return kind


def kind_of(name: str, kind: str) -> str:
    """The quantization a model weight gets under --base-quant kind ("none" for norms): the vocabulary matrices
    (tok_embeddings, output) get int8 under nf4, as 4 bits there cost the small models most of their accuracy
    (QLoRA keeps them in 16 bits; int8 halves that at a small error)."""
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return "int8" if check_kind(kind) == "nf4" and module in _VOCAB_NAMES else kind


def frozen_bytes(args, kind: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of all frozen base weights of a model with these ModelArgs under --base-quant kind (tied counted once)."""
    with torch.device("meta"):
        state = Transformer(args).state_dict()
    if args.tie_embeddings:
        state.pop("output.weight")
    return sum(weight_bytes(tuple(t.shape), kind_of(k, kind), dtype) if t.dim() > 1 else t.numel() * dtype.itemsize
               for k, t in state.items())


def weight_bytes(shape: tuple[int, ...], kind: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one frozen (rows, cols) weight takes: unquantized in dtype, int8 (+ an fp32 scale a row) or nf4
    (half a byte a weight, + a byte per 64 of a row for its absmax, + an fp32 per 256 of those and their mean)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if check_kind(kind) == "none":
        return rows * cols * dtype.itemsize
    if kind == "int8":
        return rows * cols + rows * 4
    blocks = rows * -(-cols // NF4_BLOCK)
    return blocks * (NF4_BLOCK // 2 + 1) + _absmax_head_bytes(blocks)


# ------------------------------------------------------------------------------------------------ the codes
def _row_chunks(rows: int, cols: int, chunk: int | None = None):
    step = max(1, (chunk or _CHUNK) // max(1, cols))
    for s in range(0, rows, step):
        yield slice(s, min(rows, s + step))


def quantize_int8(w: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (rows, cols), absmax fp32 (rows,)) with w ~= q * absmax / 127. release: drop each chunk of w's
    memory-mapped pages once read (release_pages), so a checkpoint tensor never becomes resident whole."""
    w2 = w.reshape(w.shape[0], -1)
    q = torch.empty(w2.shape, dtype=torch.int8, device=w.device)
    absmax = torch.empty(w2.shape[0], dtype=torch.float32, device=w.device)
    for rs in _row_chunks(*w2.shape, _QCHUNK):
        x = w2[rs].float()  # may be w itself: nothing below writes into it
        amax = x.abs().amax(dim=1)
        absmax[rs] = amax
        scale = torch.where(amax > 0, amax, 1.0) / 127  # an all-zero row stays zero
        q[rs] = (x / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        if release:
            release_pages(w2[rs])
    return q, absmax


def dequantize_int8(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for rs in _row_chunks(*q.shape):
        out[rs] = q[rs].float().mul_((absmax[rs] / 127)[:, None])
    return out


def quantize_nf4(w: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (rows, ceil(cols/64)*32), absmax fp32 (rows, ceil(cols/64))): blocks of 64 along each row
    (a short last block is zero-padded), two 4-bit codes a byte, the first in the high nibble. release: as for
    quantize_int8."""
    w2 = w.reshape(w.shape[0], -1)
    rows, cols = w2.shape
    blocks = -(-cols // NF4_BLOCK)
    packed = torch.empty(rows, blocks * NF4_BLOCK // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(rows, blocks, dtype=torch.float32, device=w.device)
    mids = _NF4_MIDPOINTS.to(w.device)
    for rs in _row_chunks(rows, cols, _QCHUNK):
        x = F.pad(w2[rs].float(), (0, blocks * NF4_BLOCK - cols)).view(-1, blocks, NF4_BLOCK)  # (r, blocks, 64)
        amax = x.abs().amax(dim=2)
        absmax[rs] = amax
        x = x / torch.where(amax > 0, amax, 1.0)[..., None]
        codes = torch.bucketize(x, mids).to(torch.uint8).view(x.shape[0], -1, 2)  # (r, blocks * 32, 2)
        packed[rs] = codes[..., 0] << 4 | codes[..., 1]
        if release:
            release_pages(w2[rs])
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, cols) weight in dtype: code * absmax in fp32, rounded once to dtype."""
    rows, blocks = absmax.shape
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    pairs = _NF4_PAIRS.to(packed.device)
    for rs in _row_chunks(rows, blocks * NF4_BLOCK):
        x = torch.index_select(pairs, 0, packed[rs].reshape(-1).int()).view(torch.float32)
        x = x.view(-1, blocks, NF4_BLOCK)  # (r, blocks, 64)
        out[rs] = x.mul_(absmax[rs][..., None]).view(x.shape[0], -1)[:, :cols]
    return out


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the value of the sorted code nearest to each x in [-1, 1]; a tie goes to the lower value (as in
    bitsandbytes' quantizer: the code value at or below x unless the one above is strictly closer)."""
    low = (torch.searchsorted(code, x, right=True) - 1).clamp_(0, len(code) - 1)
    high = (low + 1).clamp_(max=len(code) - 1)
    return torch.where((x - code[high]).abs() < (x - code[low]).abs(), high, low)


def _absmax_head_bytes(n: int) -> int:
    """Bytes before the codes in compress_absmax's packing of n absmaxes: the fp32 mean and one fp32 a group."""
    return 4 * (-(-n // SCALE_BLOCK) + 1)


def compress_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """nf4's fp32 block absmaxes, double-quantized into one uint8 tensor: [mean, fp32][the absmax of each 256 of
    (absmax - mean), fp32][one code of DYNAMIC_CODE per absmax]. The same numbers as bitsandbytes'
    quantize_4bit(compress_statistics=True), whose absmaxes run in this order too (tests/test_quant.py)."""
    flat = absmax.reshape(-1)
    n, groups = flat.numel(), -(-flat.numel() // SCALE_BLOCK)
    offset = flat.mean()
    x = F.pad(flat - offset, (0, groups * SCALE_BLOCK - n)).view(groups, SCALE_BLOCK)
    amax = x.abs().amax(dim=1)
    codes = _nearest(x / torch.where(amax > 0, amax, 1.0)[:, None], DYNAMIC_CODE.to(x.device))
    head = torch.cat([offset.view(1), amax]).view(torch.uint8)
    return torch.cat([head, codes.view(-1)[:n].to(torch.uint8)])


def expand_absmax(packed: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """The (rows, blocks) fp32 absmaxes of compress_absmax's bytes: code * its group's absmax + mean, in fp32."""
    n, groups, cut = rows * blocks, -(-rows * blocks // SCALE_BLOCK), _absmax_head_bytes(rows * blocks)
    head = packed[:cut].view(torch.float32)
    x = F.pad(DYNAMIC_CODE.to(packed.device)[packed[cut:].int()], (0, groups * SCALE_BLOCK - n))
    return (x.view(groups, SCALE_BLOCK) * head[1:, None]).view(-1)[:n].add_(head[0]).view(rows, blocks)


# ------------------------------------------------------------------------------------------------ the modules
@dataclass(frozen=True)
class QSpec:
    """What a quantized weight is: its kind and its unquantized (rows, cols)."""
    kind: str
    rows: int
    cols: int


def quantize(w: torch.Tensor, kind: str, release: bool = False) -> tuple[torch.Tensor, torch.Tensor, QSpec]:
    """(codes, scales, spec) of a 2-D weight; scales as they are held (integer bit patterns: int8's fp32 absmax a
    row viewed as int32, nf4's compress_absmax bytes)."""
    if check_kind(kind) == "int8":
        codes, absmax = quantize_int8(w, release)
        return codes, absmax.view(torch.int32), QSpec(kind, w.shape[0], w.shape[1])
    codes, absmax = quantize_nf4(w, release)
    return codes, compress_absmax(absmax), QSpec(kind, w.shape[0], w.shape[1])


def row_scales(scales: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """The fp32 scales of every row, (rows,) for int8 or (rows, blocks) for nf4, from the held form."""
    if spec.kind == "int8":
        return scales.view(torch.float32)
    return expand_absmax(scales, spec.rows, -(-spec.cols // NF4_BLOCK))


def _dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, spec: QSpec, dtype: torch.dtype) -> torch.Tensor:
    if spec.kind == "int8":
        return dequantize_int8(codes, absmax, dtype)
    return dequantize_nf4(codes, absmax, spec.cols, dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: QSpec, dtype: torch.dtype,
               rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """The weight in dtype, or only the rows wanted (a slice or an index tensor)."""
    absmax = row_scales(scales, spec)
    if rows is not None:
        codes, absmax = codes[rows], absmax[rows]
    return _dequantize_rows(codes, absmax, spec, dtype)


_SPLIT = 1 << 23  # a weight of more elements (a vocabulary projection) is dequantized a block of rows at a time


def _row_blocks(codes: torch.Tensor, scales: torch.Tensor, spec: QSpec, dtype: torch.dtype):
    """(rows, dequantized rows) blocks of about 4M weights: the whole weight never exists in full precision."""
    absmax = row_scales(scales, spec)
    step = max(1, 4 * _CHUNK // spec.cols)
    for s in range(0, spec.rows, step):
        rs = slice(s, min(spec.rows, s + step))
        yield rs, _dequantize_rows(codes[rs], absmax[rs], spec, dtype)


class _QuantLinearFunction(torch.autograd.Function):
    """x W^T for a frozen quantized W. W is dequantized in forward and again in backward (for the input gradient)
    instead of being saved: autograd through F.linear would keep the full-precision W of every layer alive until
    backward, as much memory as an unquantized model. A large W (the output projection: 125 MiB in bf16 for a
    32k vocabulary at dim 2048) is processed a block of output rows at a time; its input gradient sums the blocks
    in fp32."""

    @staticmethod
    def forward(ctx, x, codes, scales, spec: QSpec):
        ctx.save_for_backward(codes, scales)
        ctx.spec = spec
        if spec.rows * spec.cols <= _SPLIT:
            return F.linear(x, dequantize(codes, scales, spec, x.dtype))
        return torch.cat([F.linear(x, w) for _, w in _row_blocks(codes, scales, spec, x.dtype)], dim=-1)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        codes, scales = ctx.saved_tensors
        spec = ctx.spec
        if spec.rows * spec.cols <= _SPLIT:
            return g @ dequantize(codes, scales, spec, g.dtype), None, None, None
        grad = torch.zeros(*g.shape[:-1], spec.cols, dtype=torch.float32, device=g.device)
        for rs, w in _row_blocks(codes, scales, spec, torch.float32):
            grad += g[..., rs].float() @ w
        return grad.to(g.dtype), None, None, None


class _Quantized(nn.Module):
    """Holds a quantized weight as buffers: codes, scales (integer bit patterns, so .to(dtype) leaves them exact) and
    an empty tensor whose dtype and device are the compute dtype and device (.to() moves and casts it)."""

    def _hold(self, codes: torch.Tensor, scales: torch.Tensor, spec: QSpec, dtype: torch.dtype) -> None:
        if scales.is_floating_point():
            raise TypeError("scales must be held as quant.quantize returns them (integer bit patterns)")
        self.spec = spec
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("compute", torch.empty(0, dtype=dtype, device=codes.device), persistent=False)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.spec, dtype or self.compute.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, a fresh tensor each time (read-only: merge into dequantize_model's copy)."""
        return self.dequantize()

    @weight.setter
    def weight(self, value) -> None:
        raise TypeError(f"the weight of {type(self).__name__} is quantized and cannot be assigned or merged into; "
                        f"call quant.dequantize_model(model) first (e.g. before lora.merge_lora)")


class QuantLinear(_Quantized, nn.Linear):
    """A bias-free nn.Linear whose weight is int8 or nf4: dequantized into the input's dtype (or autocast's) in each
    forward and backward. An nn.Linear so that lora.apply_lora wraps it like any other linear."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, spec: QSpec, dtype: torch.dtype):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the full weight
        self.in_features, self.out_features = spec.cols, spec.rows
        self.register_parameter("bias", None)
        self._hold(codes, scales, spec, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _QuantLinearFunction.apply(x, self.codes, self.scales, self.spec)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.spec.kind}"


class QuantEmbedding(_Quantized):
    """Token embeddings whose table is int8 or nf4; a lookup dequantizes only the rows it reads."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, spec: QSpec, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = spec.rows, spec.cols
        self._hold(codes, scales, spec, dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = dequantize(self.codes, self.scales, self.spec, self.compute.dtype, rows=tokens.reshape(-1))
        return out.view(*tokens.shape, self.spec.cols)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, quant={self.spec.kind}"


# ------------------------------------------------------------------------------------------ whole models
def _quantizable(module: nn.Module) -> bool:
    return ((type(module) is nn.Embedding or isinstance(module, nn.Linear) and module.bias is None)
            and not isinstance(module, _Quantized))


def _swap(model: nn.Module, make) -> nn.Module:
    """Replace every child c for which make(qualified name, c) returns a module (in place; returns model)."""
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = make(f"{prefix}.{name}" if prefix else name, child)
            if new is not None:
                setattr(parent, name, new)
    return model


def quantize_model(model: nn.Module, kind: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize every bias-free linear and every nn.Embedding in place, one at a time, each original freed once
    replaced (tied weights stay shared). dtype: the compute dtype (default: each weight's own). kind "none": no-op."""
    if check_kind(kind) == "none":
        return model
    done: dict[int, tuple] = {}  # id of a weight -> its quantized parts, so tied weights are quantized once

    def make(name, m):
        if not _quantizable(m):
            return None
        w = m.weight
        if id(w) not in done:
            with torch.no_grad():
                done[id(w)] = quantize(w, kind_of(name, kind))
            release_pages(w)
        cls = QuantEmbedding if isinstance(m, nn.Embedding) else QuantLinear
        return cls(*done[id(w)], dtype or w.dtype)

    return _swap(model, make)


def quantized_kind(module: nn.Module) -> str | None:
    """The kind of the first quantized weight in module ("int8" / "nf4"), None when nothing in it is quantized."""
    return next((m.spec.kind for m in module.modules() if isinstance(m, _Quantized)), None)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Put plain nn.Linear / nn.Embedding modules holding the dequantized weights back (in place; tied weights stay
    tied): the base an adapter trained on a quantized model merges into (lora.merge_lora, strip_lora)."""
    done: dict[int, nn.Parameter] = {}

    def make(name, m):
        if not isinstance(m, _Quantized):
            return None
        if id(m.codes) not in done:
            done[id(m.codes)] = nn.Parameter(m.dequantize(), requires_grad=False)
        w = done[id(m.codes)]
        with torch.device("meta"):  # the module's own init would allocate a weight only to throw it away
            new = nn.Embedding(*w.shape) if isinstance(m, QuantEmbedding) else nn.Linear(w.shape[1], w.shape[0],
                                                                                       bias=False)
        new.weight = w
        return new

    return _swap(model, make)


class LoadQuantizer:
    """The per-tensor transform of checkpoint.load_model: each linear / embedding weight is quantized as it is read
    (its memory-mapped pages dropped) and replaced by an empty meta tensor; install() then swaps the quantized
    modules in. The peak is the quantized model plus one tensor, never the full-precision model."""

    def __init__(self, kind: str, dtype: torch.dtype | None = None):
        self.kind, self.dtype = check_kind(kind), dtype
        self.parts: dict[str, tuple] = {}

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        module = key.removesuffix(".weight").rsplit(".", 1)[-1]
        if self.kind == "none" or not key.endswith(".weight") or module not in _BLOCK_NAMES + _VOCAB_NAMES:
            return tensor
        with torch.no_grad():
            codes, scales, spec = quantize(tensor, kind_of(key, self.kind), release=True)
        release_pages(tensor)  # again, whole: pages the kernel mapped around a chunk's (fault-around) go too
        self.parts[key] = (codes, scales, spec, self.dtype or tensor.dtype)
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")  # a placeholder until install()

    def install(self, model: nn.Module) -> nn.Module:
        """Swap in the quantized modules (in place; returns model); a tied output shares the embedding's codes."""
        if getattr(getattr(model, "args", None), "tie_embeddings", False) and "tok_embeddings.weight" in self.parts:
            self.parts.setdefault("output.weight", self.parts["tok_embeddings.weight"])

        def make(name, m):
            parts = self.parts.get(f"{name}.weight")
            if parts is None:
                return None
            return (QuantEmbedding if isinstance(m, nn.Embedding) else QuantLinear)(*parts)

        return _swap(model, make)


def load_quantized(path=None, kind: str = "none", dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """checkpoint.load_model with the base weights quantized tensor by tensor as they are read (kind "none": as is)."""
    from checkpoint import load_model  # lazy: checkpoint reads files; quant's modules need none of it

    if check_kind(kind) == "none":
        return load_model(path, dtype=dtype, device=device)
    quantizer = LoadQuantizer(kind, dtype)
    return quantizer.install(load_model(path, dtype=dtype, device=device, transform=quantizer))


_MADV_PAGEOUT = 21  # Linux >= 5.4


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


_LIBC = None


def release_pages(t: torch.Tensor) -> None:
    """Ask the kernel to drop t's pages from this process's resident set (madvise MADV_PAGEOUT). For a memory-mapped
    checkpoint tensor that was just quantized, its file pages would otherwise count in RSS until every tensor of the
    file is freed: the whole checkpoint. Non-destructive (pages are read back on the next access) and a no-op for
    memory that cannot be paged out; best effort: skipped off Linux and on GPUs."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux") or t.numel() == 0:
        return
    start = t.data_ptr() & ~(mmap.PAGESIZE - 1)
    end = t.data_ptr() + t.numel() * t.element_size()
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)  # errors ignored: best effort
