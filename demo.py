"""The whole pipeline on the embedded defaults and the in-house sample corpus, offline, on a laptop CPU:
annotate -> self-instruct (local teacher) -> ROUGE-L filter -> LoRA train -> index -> evaluate -> report.

    python demo.py --out out/demo               # make demo: SmolLM2-135M-Instruct, a few minutes on 2 cores
    python demo.py --smoke --out out/smoke      # make smoke: a tiny random model, under a minute

Every stage is resumable: run it again and finished stages are read back from --out (LLM answers from the
SQLite cache, training from its checkpoints). The 135M teacher is far weaker than gpt-3.5-turbo, so the data it
writes is poor; the demo shows the machinery end to end. Point the same stages at an API (`make selfinstruct
ARGS="--backend openai"`) or a 7B checkpoint for real runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from jsonl import atomic_write

ROOT = Path(__file__).resolve().parent
SHARED_SEEDS = ROOT.parent / "shared" / "data" / "selfinstruct" / "seed_tasks.jsonl"


@dataclass
class DemoArgs:
    out: Path = field(default=Path("out/demo"), metadata={"help": "folder for every stage's output"})
    articles: Path = field(default=ROOT / "data" / "sample_news.jsonl", metadata={"help": "news corpus (JSONL)"})
    labels: Path = field(default=ROOT / "data" / "sample_news_labels.jsonl", metadata={
        "help": "gold labels of the corpus for the evaluation"})
    smoke: bool = field(default=False, metadata={"help": "a tiny random model instead of SmolLM2 (fast check)"})
    annotate_limit: int = field(default=3, metadata={"help": "articles annotated by the local model"})
    instructions: int = field(default=8, metadata={"help": "machine instructions to bootstrap"})
    ground_articles: int = field(default=3, metadata={"help": "articles turned into grounded tasks"})
    train_steps: int = field(default=40, metadata={"help": "LoRA optimizer steps"})
    heldout: int = field(default=10, metadata={"help": "last N articles kept out of annotation and training, "
                                                       "and scored per system in the evaluation"})
    max_tokens: int = field(default=128, metadata={"help": "cap on every answer of the local teacher (time)"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})

    def __post_init__(self):
        for name in ("annotate_limit", "instructions", "ground_articles", "train_steps", "heldout", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("articles", "labels"):
            if not Path(getattr(self, name)).is_file():
                raise FileNotFoundError(f"{name}={getattr(self, name)} not found")
        n = sum(1 for line in Path(self.articles).open(encoding="utf-8") if line.strip())
        if n <= self.heldout:
            raise ValueError(f"heldout={self.heldout} leaves none of the {n} articles of {self.articles} to train on")


def tiny_checkpoint(out: Path) -> Path:
    """A randomly initialised 2-layer LLaMA with the embedded tokenizer, saved as an HF folder (for --smoke)."""
    import torch

    from checkpoint import embedded_model_path, load_tokenizer, save_model
    from model import ModelArgs, Transformer

    path = out / "tiny-model"
    if (path / "config.json").is_file():
        return path
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                                  max_seq_len=2048, tie_embeddings=True))
    for p in model.parameters():  # GPT-2's small init, so the random model's loss starts near ln(vocab)
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)
    save_model(model, path, format="hf", tokenizer_src=embedded_model_path())
    return path


def run_demo(args: DemoArgs, log=print) -> Path:
    """Run (or resume) every stage into args.out; returns the path of the report."""
    from annotate.pipeline import AnnotateArgs, annotate_file
    from evaluate import NewsArgs, evaluate_news
    from llm import LLM, LLMArgs
    from retrieval.chunk import ChunkArgs
    from retrieval.index import IndexArgs, build_index
    from selfinstruct.pipeline import SelfInstructArgs, run as selfinstruct
    from train_ddp import TrainArgs, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = str(tiny_checkpoint(out)) if args.smoke else None
    if args.smoke:  # a random model never stops on its own: keep its answers and training short
        args = dataclasses.replace(args, max_tokens=min(args.max_tokens, 32), train_steps=min(args.train_steps, 8),
                                   instructions=min(args.instructions, 4))
    llm_args = LLMArgs(backend="local", checkpoint=checkpoint, cache=str(out / "llm.sqlite"), concurrency=8,
                       max_tokens_cap=args.max_tokens)
    clock, stats = StageClock(log), {}

    with clock("articles"):  # the offline stand-in for `make scrape`; the last --heldout articles: evaluation only
        articles, train_articles, heldout_labels, stats["articles"] = split_articles(args, out)

    with clock("annotate"):
        stats["annotate"] = annotate_file(AnnotateArgs(articles=str(train_articles),
                                                       out=str(out / "annotations.jsonl"), limit=args.annotate_limit),
                                          llm_args)

    with clock("self-instruct"), LLM(llm_args) as llm:
        seeds = dict(seed_tasks=SHARED_SEEDS) if SHARED_SEEDS.is_file() else dict(human_seeds=False)
        stats["selfinstruct"] = selfinstruct(SelfInstructArgs(
            out=out / "selfinstruct", num_instructions=args.instructions, articles=train_articles,
            max_articles=args.ground_articles, seed=args.seed, **seeds), llm)

    adapter, index_dir = out / "train" / "adapter", out / "index"
    with clock("train"):
        if not (adapter / "adapter.safetensors").is_file():  # written once training has finished
            checkpoints = out / "train" / "checkpoints"
            train(TrainArgs(data=str(out / "selfinstruct" / "train.jsonl"), out=str(out / "train"),
                            checkpoint=checkpoint, max_steps=args.train_steps, micro_batch_size=4, max_len=256,
                            warmup_steps=4, eval_every=args.train_steps, save_every=10, seed=args.seed,
                            resume=checkpoints.is_dir() and any(checkpoints.iterdir())))

    with clock("index"):
        build_index(IndexArgs(articles=articles, out=index_dir), ChunkArgs(), progress=True)

    with clock("evaluate"):
        stats["evaluate"] = evaluate_news(NewsArgs(articles=str(articles), labels=str(heldout_labels),
                                                   checkpoint=checkpoint, adapter=str(adapter), index=str(index_dir),
                                                   out=str(out / "eval"), dtype=eval_dtype(args.smoke)))
    return write_report(out, stats, clock.wall, clock.cpu)


class StageClock:
    """`with clock(name):` logs a stage's header, then its wall and CPU seconds and the load: on a shared machine
    the wall time also measures the others."""

    def __init__(self, log):
        self.log, self.wall, self.cpu = log, {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.log(f"\n== {name} ==")
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name], self.cpu[name] = time.perf_counter() - wall, time.process_time() - cpu
        self.log(f"   {name}: {self.wall[name]:.0f} s ({self.cpu[name]:.0f} CPU s, load {os.getloadavg()[0]:.1f})")


def split_articles(args: DemoArgs, out: Path) -> tuple[Path, Path, Path, int]:
    """Copy the corpus to out; (all articles, those for annotation and training, gold labels of the last --heldout
    articles, the number of articles)."""
    articles = out / "articles.jsonl"
    shutil.copyfile(args.articles, articles)
    # split on "\n", not splitlines: an article may hold a U+2028
    lines = [line for line in articles.read_text(encoding="utf-8").split("\n") if line.strip()]
    train_articles, heldout_urls = out / "articles_train.jsonl", {json.loads(x)["url"] for x in lines[-args.heldout:]}
    write_atomic(train_articles, "".join(x + "\n" for x in lines[:-args.heldout]))
    labels = [x for x in Path(args.labels).read_text(encoding="utf-8").split("\n") if x.strip()]
    heldout_labels = out / "labels_heldout.jsonl"
    write_atomic(heldout_labels, "".join(x + "\n" for x in labels if json.loads(x)["url"] in heldout_urls))
    return articles, train_articles, heldout_labels, len(lines)


def eval_dtype(smoke: bool) -> str:
    """The evaluation's weights dtype: precision.py's choice for the CPU (bf16 only where it is native: emulated
    bf16 made the evaluation 4x slower on an AVX2-only EPYC), fp32 for the smoke run's random model."""
    import torch

    from precision import choose_dtype

    return "float32" if smoke or choose_dtype("auto", "cpu") != torch.bfloat16 else "bfloat16"


def write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(out: Path, stats: dict, timings: dict, cpu: dict) -> Path:
    """out/report.md: what each stage produced and how long it took, then the evaluation table."""
    si, ann = stats["selfinstruct"], stats["annotate"]
    results = {"articles": f"{stats['articles']} articles (in-house sample corpus)",
               "annotate": f"{ann['annotated']} annotated, {ann['failed']} failures",
               "self-instruct": f"{si['bootstrap']['kept']} instructions kept, {si['prepare']['domain_train']} train "
                                f"/ {si['prepare']['domain_val']} val records",
               "train": "adapter in `train/`", "index": "`index/`", "evaluate": "`eval/report.md`"}
    lines = ["# Demo report", "", "| stage | seconds | CPU seconds | result |", "|---|---|---|---|",
             *(f"| {name} | {timings[name]:.0f} | {cpu[name]:.0f} | {text} |" for name, text in results.items()), ""]
    report = Path(stats["evaluate"]["report"]).read_text(encoding="utf-8") if "report" in stats["evaluate"] else ""
    lines += ["## Evaluation", "", report, "", "Filter statistics (what each self-instruct filter removed):", "",
              "```json", json.dumps({k: si[k] for k in ("bootstrap", "instances", "prepare")}, indent=2), "```", ""]
    path = out / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    from cli import parse_args
    (args,) = parse_args(argv, DemoArgs, description=__doc__)
    t0 = time.perf_counter()
    report = run_demo(args)
    print(f"\nreport: {report} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
