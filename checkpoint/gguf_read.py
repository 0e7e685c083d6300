"""Reading GGUF (llama.cpp's format, spec: ggml/docs/gguf.md): a small parser of our own for the header, metadata and
tensor index (gguf.GGUFReader builds one numpy view per vocabulary string: seconds for a 49k vocabulary), the
`llama.*` metadata as ModelArgs, and the tensors in Meta's names. Q8_0, Q4_0 and Q4_1 are dequantized in torch (2x
gguf's numpy kernels on the embedded model), every other type by `gguf.quants.dequantize`. Of the project it imports
only model.py, checkpoint/names.py and checkpoint/files.py, so tokenizer.py can read a GGUF's vocabulary from here.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from checkpoint.files import check_types
from checkpoint.names import GGUF_TO_META, expand
from model import ModelArgs


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


def _map(path: Path) -> mmap.mmap:
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: empty file, not a GGUF")
        # private copy-on-write map: torch.frombuffer wants a writable buffer; nothing is ever written
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _read_metadata(cur: _Cursor) -> tuple[int, dict]:
    """The header and the metadata key/values; returns (number of tensors, metadata)."""
    magic, version = cur.unpack("4sI", "header")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{cur.path}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
    n_tensors, n_kv = cur.unpack("QQ", "header")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i + 1} of {n_kv}")
        (vtype,) = cur.unpack("I", f"metadata {key}")
        metadata[key] = cur.value(vtype, f"metadata {key}")
    return n_tensors, metadata


def _tensor(path: Path, name: str, dims: tuple[int, ...], ttype: int, start: int, size: int) -> GGUFTensor:
    try:
        qtype = GGMLQuantizationType(ttype)
    except ValueError:
        raise ValueError(f"{path}: tensor {name} has unknown GGML quant type id {ttype}; update the gguf package "
                         "or re-quantize the model to a common type (Q8_0, Q4_K, ...)") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    t = GGUFTensor(name, ttype, tuple(reversed(dims)), start, int(np.prod(dims)) // block * type_size)
    if t.offset + t.n_bytes > size:
        raise ValueError(f"{path}: truncated GGUF: tensor {name} needs bytes {t.offset}..{t.offset + t.n_bytes} "
                         f"but the file has {size}; download or convert it again")
    return t


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor index; tensor data stays mapped."""
    path = Path(path)
    buf = _map(path)
    cur = _Cursor(buf, path)
    n_tensors, metadata = _read_metadata(cur)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i + 1} of {n_tensors}")
        (n_dims,) = cur.unpack("I", f"tensor {name}")
        dims = cur.unpack(f"{n_dims}Q", f"tensor {name}")
        ttype, offset = cur.unpack("IQ", f"tensor {name}")
        infos.append((name, dims, ttype, offset))
    align = metadata.get("general.alignment", 32)
    start = -(-cur.pos // align) * align
    tensors = {name: _tensor(path, name, dims, ttype, start + offset, len(buf)) for name, dims, ttype, offset in infos}
    return GGUFFile(path, metadata, tensors, buf)


LLAMA_INTS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "rope.dimension_count", "vocab_size", "context_length")
LLAMA_FLOATS = ("attention.layer_norm_rms_epsilon", "rope.freq_base")


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
    check_types(meta, path, ints=tuple(f"llama.{k}" for k in LLAMA_INTS),
                floats=tuple(f"llama.{k}" for k in LLAMA_FLOATS))
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
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def gguf_state(gg: GGUFFile) -> dict[str, torch.Tensor]:
    """Every tensor of a llama GGUF in Meta's names, dequantized (unquantized ones stay memory-mapped)."""
    names = expand(GGUF_TO_META, gg.metadata.get("llama.block_count", 0))
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


FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML F32, F16, BF16


def gguf_tensor(gg: GGUFFile, t: GGUFTensor) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in its torch shape: float types zero-copy, quantized ones dequantized."""
    if t.type in FLOAT_TYPES:
        dt = FLOAT_TYPES[t.type]
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


def gguf_default_dtype(gg: GGUFFile) -> torch.dtype:
    """An all-float GGUF keeps its matrices' dtype; a quantized one becomes float32."""
    return FLOAT_TYPES.get(gg.tensors["token_embd.weight"].type, torch.float32) if all(
        t.type in FLOAT_TYPES for t in gg.tensors.values()) else torch.float32


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
