"""Loading speed and memory: the embedded GGUF against transformers' GGUF loader, and peak RSS for a ~1B fp16 model.

    python -m bench.load                       # both parts; the 1B checkpoints are generated once under --work-dir
    python -m bench.load --no-rss              # only the GGUF timing
    python -m bench.load --no-gguf --dim 1024  # only memory, on a smaller model

(a) load_model() of SmolLM2-135M-Instruct Q4_1 (dequantized to fp32) vs AutoModelForCausalLM.from_pretrained(dir,
    gguf_file=...) in this process, same threads; ours is the median of --repeats runs, transformers' one run (it
    takes 15-30 s here), which comes after ours so both skip the one-time imports.
(b) Each measurement runs in a fresh subprocess: the peak RSS (VmHWM, reset through /proc/self/clear_refs after
    imports) minus the RSS before loading, once the model is loaded and every weight page has been read, divided by
    the checkpoint's size on disk. ~1x means the weights are held once (memory-mapped), 2x means copied.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli import parse_args

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchArgs:
    work_dir: Path | None = field(default=None, metadata={
        "help": "where the 1B checkpoints go (default: a folder in the system's temporary directory)"})
    dim: int = field(default=2048, metadata={"help": "model width of the generated checkpoint"})
    n_layers: int = field(default=16, metadata={"help": "layers of the generated checkpoint"})
    vocab_size: int = field(default=32000, metadata={"help": "vocabulary of the generated checkpoint"})
    repeats: int = field(default=3, metadata={"help": "timed runs of our GGUF load (median reported)"})
    gguf: bool = field(default=True, metadata={"help": "time the embedded GGUF load against transformers"})
    rss: bool = field(default=True, metadata={"help": "measure peak RSS loading Meta / HF checkpoints"})
    reference_rss: bool = field(default=True, metadata={"help": "also measure transformers loading the HF folder"})

    def __post_init__(self):
        for name in ("dim", "n_layers", "vocab_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dim % 128:
            raise ValueError(f"dim={self.dim} must be a multiple of 128 (head_dim 128)")


# ------------------------------------------------------------------------------------------------ (a) GGUF speed
def time_gguf(repeats: int) -> tuple[list[float], float, float]:
    """(our seconds per run, transformers' seconds, max abs logit difference) for the embedded GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from checkpoint import embedded_model_path, load_model

    path = embedded_model_path()
    ours = []
    for _ in range(repeats):
        t = time.perf_counter()
        model = load_model()
        ours.append(time.perf_counter() - t)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = time.perf_counter() - t
    tokens = torch.arange(100, 140)[None]
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    return ours, theirs, diff


# ------------------------------------------------------------------------------------------------- (b) peak RSS
def generate_checkpoints(args: BenchArgs) -> dict[str, Path]:
    """A random fp16 LLaMA written as Meta (1 and 2 shards) and HF folders, once; reused while the files exist."""
    import torch
    from safetensors.torch import save_file

    from checkpoint import HF_TO_META, _expand
    from model import ModelArgs, Transformer

    margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // 128, vocab_size=args.vocab_size)
    tag = f"d{args.dim}-l{args.n_layers}-v{args.vocab_size}"
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / "llm-bench-load"
    out = {k: work_dir / f"{tag}-{k}" for k in ("meta", "meta2", "hf")}
    if all((p / "done").is_file() for p in out.values()):
        return out
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(margs).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=torch.float16).normal_(0, 0.02, generator=gen) for k, s in shapes.items()}
    params = {"dim": margs.dim, "n_layers": margs.n_layers, "n_heads": margs.n_heads, "vocab_size": margs.vocab_size,
              "multiple_of": margs.multiple_of, "norm_eps": margs.norm_eps}
    for p in out.values():
        p.mkdir(parents=True, exist_ok=True)
    (out["meta"] / "params.json").write_text(json.dumps(params))
    torch.save(state, out["meta"] / "consolidated.00.pth")
    (out["meta2"] / "params.json").write_text(json.dumps(params))
    for s in range(2):
        half = {}
        for k, w in state.items():
            d = 1 if k == "tok_embeddings.weight" or k.endswith(("wo.weight", "w2.weight")) else 0
            half[k] = w.chunk(2, dim=d)[s].clone() if w.dim() == 2 else w
        torch.save(half, out["meta2"] / f"consolidated.{s:02d}.pth")
        del half
    # names only: the rotary permutation does not change the size of anything measured here
    hf = {name: state[meta] for name, meta in _expand(HF_TO_META, margs.n_layers).items()}
    save_file(hf, str(out["hf"] / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": margs.dim,
           "intermediate_size": margs.ffn_hidden, "num_hidden_layers": margs.n_layers,
           "num_attention_heads": margs.n_heads, "num_key_value_heads": margs.n_heads,
           "vocab_size": margs.vocab_size, "rms_norm_eps": margs.norm_eps, "torch_dtype": "float16",
           "tie_word_embeddings": False}
    (out["hf"] / "config.json").write_text(json.dumps(cfg))
    for p in out.values():
        (p / "done").touch()
    return out


def _status(field_name: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure_child(kind: str, path: str) -> dict:
    """Run in a fresh process: load, read every weight page, report RSS figures (bytes) and load seconds."""
    import torch

    from checkpoint import load_model

    if kind == "transformers":
        from transformers import LlamaForCausalLM
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the imports' own peak is not the loader's
    base = _status("VmRSS")
    t = time.perf_counter()
    if kind == "transformers":
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float16)
    else:
        model = load_model(path)
    load_s = time.perf_counter() - t
    after_load = _status("VmHWM")
    with torch.no_grad():  # one element per 4 KiB page: every weight byte becomes resident, at no extra memory
        for p in model.parameters():
            p.view(-1)[:: 4096 // p.element_size()].float().sum()
    return {"base": base, "peak_load": after_load - base, "peak_resident": _status("VmHWM") - base, "load_s": load_s}


def measure(kind: str, path: Path) -> dict:
    code = ("import json; from bench.load import measure_child; "
            f"print(json.dumps(measure_child({kind!r}, {str(path)!r})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".pth", ".safetensors"))


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, BenchArgs, description=__doc__)
    lines = []
    if args.gguf:
        runs, theirs, diff = time_gguf(args.repeats)
        ours = sorted(runs)[len(runs) // 2]
        print(f"embedded GGUF (SmolLM2-135M-Instruct Q4_1 -> fp32): ours {ours:.2f} s (median of {args.repeats}; the "
              f"first, {runs[0]:.2f} s, includes torch's one-time import of torch._dynamo for meta-device ops), "
              f"transformers {theirs:.2f} s; max abs logit diff {diff:.2e}")
        lines.append(f"load_gguf_vs_transformers: {theirs / ours:.1f}x (goal >= 10x)")
    if args.rss:
        paths = generate_checkpoints(args)
        print(f"peak RSS while loading, as a ratio of the checkpoint's size on disk ({_size(paths['meta']) / 1e9:.2f} "
              "GB fp16); 'load' = right after loading, 'resident' = after every weight page was read")
        cases = [("meta", "ours", paths["meta"]), ("meta2", "ours", paths["meta2"]), ("hf", "ours", paths["hf"])]
        if args.reference_rss:
            cases.append(("hf", "transformers", paths["hf"]))
        for name, kind, path in cases:
            r, size = measure(kind, path), _size(path)
            print(f"  {kind:12s} {name:6s} load {r['peak_load'] / size:.2f}x  resident {r['peak_resident'] / size:.2f}x"
                  f"  ({r['peak_resident'] / 1e9:.2f} GB over a {r['base'] / 1e9:.2f} GB baseline, "
                  f"{r['load_s']:.1f} s)")
            if kind == "ours" and name in ("meta", "hf"):
                lines.append(f"load_{name}_peak_rss: {r['peak_resident'] / size:.2f}x (goal <= 1.3x)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
