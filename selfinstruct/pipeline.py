"""Self-Instruct for crypto news: seeds -> bootstrap -> classification check -> instances -> domain grounding ->
Alpaca-format train.jsonl / val.jsonl (Wang et al. 2022, as Stanford Alpaca used it).

    python -m selfinstruct --out out/selfinstruct --num-instructions 200                       # OpenAI gpt-3.5-turbo
    python -m selfinstruct --out out/selfinstruct --articles out/articles.jsonl --mix alpaca --domain-ratio 0.7
    python -m selfinstruct --out out/selfinstruct --backend local --num-instructions 20         # embedded model
    python -m selfinstruct --out out/selfinstruct --seed-tasks data/seed_tasks.jsonl --base-url http://127.0.0.1:8000/v1

Every step appends to a JSONL file in --out (bootstrap, is_classification, instances, grounded) and skips
what is already there, so a rerun after a crash or Ctrl-C resumes where it stopped; with the LLM client's cache a
rerun sends no request twice. stats.json counts what each filter removed.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cli import parse_args
from jsonl import write_json
from llm import LLM, LLMArgs
from scrape.corpus import read_articles
from selfinstruct.bootstrap import bootstrap
from selfinstruct.grounding import KINDS, ground
from selfinstruct.instances import classify, generate_instances
from selfinstruct.prepare import SOURCES, domain_records, load_general, prepare
from selfinstruct.seeds import CRYPTO_SEEDS, SEED_URL, human_seed_tasks, load_seed_tasks
from selfinstruct.store import read_jsonl

log = logging.getLogger("selfinstruct")


@dataclass
class SelfInstructArgs:
    out: Path = field(default=Path("out/selfinstruct"), metadata={"help": "output directory (state + train.jsonl)"})
    num_instructions: int = field(default=100, metadata={"help": "machine instructions to bootstrap"})
    seed_tasks: Path | None = field(default=None, metadata={
        "help": "local copy of the paper's seed_tasks.jsonl (default: download --seed-url once, verified)"})
    seed_url: str = field(default=SEED_URL, metadata={"help": "where the 175 human seed tasks are downloaded from"})
    human_seeds: bool = field(default=True, metadata={
        "help": "use the paper's human seed tasks; --no-human-seeds bootstraps from our crypto seeds alone "
                "(offline, no download)"})
    crypto_seeds: Path = field(default=CRYPTO_SEEDS, metadata={"help": "our crypto-news seed tasks (JSONL)"})
    download_dir: Path = field(default=Path(".cache/selfinstruct"), metadata={
        "help": "cache for downloaded seeds and general instruction sets"})
    chat: bool = field(default=True, metadata={
        "help": "chat endpoint (gpt-3.5-turbo); --no-chat uses /v1/completions (base models, -instruct)"})
    request_batch_size: int = field(default=5, metadata={"help": "bootstrap requests built from one pool state"})
    prompt_instructions: int = field(default=8, metadata={"help": "in-context instructions per bootstrap prompt"})
    machine_in_prompt: int = field(default=2, metadata={"help": "of those, from the machine pool once it has any"})
    crypto_in_prompt: int = field(default=3, metadata={"help": "of those, from our crypto seed tasks"})
    rouge_threshold: float = field(default=0.7, metadata={"help": "drop an instruction whose ROUGE-L to the pool "
                                                                  "exceeds this"})
    patience: int = field(default=5, metadata={"help": "stop bootstrapping after this many batches adding nothing"})
    articles: Path | None = field(default=None, metadata={
        "help": "articles.jsonl from the scrape stage for domain-grounded tasks (default: none)"})
    max_articles: int = field(default=0, metadata={"help": "ground at most this many articles (0 = all)"})
    article_chars: int = field(default=3000, metadata={"help": "article excerpt length shown to the model"})
    ground_tasks: tuple[str, ...] = field(default=KINDS, metadata={"help": "grounded task kinds"})
    max_instances: int = field(default=5, metadata={"help": "instances kept per machine instruction"})
    include_seeds: bool = field(default=True, metadata={"help": "add the seed tasks' own instances to the data"})
    mix: tuple[str, ...] = field(default=(), metadata={
        "help": f"general instruction sets to mix in: {', '.join(SOURCES)} (downloaded on demand)"})
    domain_ratio: float = field(default=0.7, metadata={"help": "share of our own records in train.jsonl when "
                                                                "mixing"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of tasks/articles held out in val.jsonl"})
    seed: int = field(default=0, metadata={"help": "seed of every sampling decision"})

    def __post_init__(self):
        for name in ("num_instructions", "request_batch_size", "prompt_instructions", "patience", "max_instances",
                     "article_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.machine_in_prompt + self.crypto_in_prompt <= self.prompt_instructions:
            raise ValueError(f"machine_in_prompt={self.machine_in_prompt} + crypto_in_prompt="
                             f"{self.crypto_in_prompt} must be within prompt_instructions={self.prompt_instructions}")
        if not 0.0 <= self.rouge_threshold <= 1.0:
            raise ValueError(f"rouge_threshold={self.rouge_threshold} must be in [0, 1]")
        if not 0.0 < self.domain_ratio <= 1.0:
            raise ValueError(f"domain_ratio={self.domain_ratio} must be in (0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        unknown = set(self.ground_tasks) - set(KINDS)
        if unknown:
            raise ValueError(f"ground_tasks has {sorted(unknown)}; choose from {', '.join(KINDS)}")
        unknown = set(self.mix) - set(SOURCES)
        if unknown:
            raise ValueError(f"mix has {sorted(unknown)}; choose from {', '.join(SOURCES)}")
        if self.max_articles < 0:
            raise ValueError(f"max_articles={self.max_articles} must be >= 0 (0 = all)")
        if self.articles is not None and not self.articles.is_file():
            raise FileNotFoundError(f"articles={self.articles} not found; run `make scrape` or drop --articles")


def _stats(boot: list[dict], labels_path: Path, instance_rows: list[dict], grounded: list[dict],
           prep_removed: Counter, counts: dict, usage: dict) -> dict:
    labels = read_jsonl(labels_path, ("is_classification", "unclear"))
    grounded_failed = Counter(r["kind"] for r in grounded if not r["ok"])
    return {
        "bootstrap": {"requests": len(boot), "kept": sum(len(r["kept"]) for r in boot),
                      "removed": dict(sum((Counter(r["rejected"]) for r in boot), Counter()))},
        "classify": {"instructions": len(labels), "classification": sum(r["is_classification"] for r in labels),
                     "unclear_answers": sum(r["unclear"] for r in labels)},
        "instances": {"tasks": len(instance_rows), "instances": sum(len(r["instances"]) for r in instance_rows),
                      "removed": dict(sum((Counter(r["dropped"]) for r in instance_rows), Counter()))},
        "grounding": {"attempts": len(grounded), "records": sum(r["ok"] for r in grounded),
                      "malformed_or_unsupported": dict(grounded_failed)},
        "prepare": {"removed": dict(prep_removed), **counts},
        "llm_usage": usage,
    }


def run(args: SelfInstructArgs, llm: LLM) -> dict:
    """Run (or resume) every step into args.out; returns the stats also written to stats.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    human = human_seed_tasks(args.download_dir, args.seed_url, args.seed_tasks) if args.human_seeds else []
    crypto = load_seed_tasks(args.crypto_seeds)
    seeds = human + crypto

    machine = bootstrap(llm, out / "bootstrap.jsonl", [t["instruction"] for t in human],
                        [t["instruction"] for t in crypto], target=args.num_instructions,
                        batch_size=args.request_batch_size, n_prompt=args.prompt_instructions,
                        n_machine=args.machine_in_prompt, n_crypto=args.crypto_in_prompt,
                        threshold=args.rouge_threshold, chat=args.chat, patience=args.patience, seed=args.seed)
    log.info("bootstrap: %d machine instructions", len(machine))
    labels = classify(llm, out / "is_classification.jsonl", seeds, machine, chat=args.chat)
    instance_rows = generate_instances(llm, out / "instances.jsonl", seeds, labels, chat=args.chat)
    grounded = []
    if args.articles is not None:
        articles = read_articles(args.articles)
        articles = articles[: args.max_articles] if args.max_articles else articles
        grounded = ground(llm, out / "grounded.jsonl", articles, args.ground_tasks, args.article_chars)
    domain, removed = domain_records(instance_rows, grounded, seeds if args.include_seeds else [],
                                     args.max_instances, args.seed)
    general = load_general(args.mix, args.download_dir) if args.mix and args.domain_ratio < 1 else None
    counts = prepare(out, domain, general, args.domain_ratio, args.val_fraction, args.seed)
    boot = read_jsonl(out / "bootstrap.jsonl", ("kept", "rejected"))
    stats = _stats(boot, out / "is_classification.jsonl", instance_rows, grounded, removed, counts, llm.usage)
    write_json(out / "stats.json", stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    args, largs = parse_args(argv, SelfInstructArgs, LLMArgs, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with LLM(largs) as llm:
        stats = run(args, llm)
    print(json.dumps(stats, indent=2))
    print(f"wrote {args.out / 'train.jsonl'} ({stats['prepare']['domain_train']} domain records"
          f"{', plus general ones' if args.mix else ''}) and {args.out / 'val.jsonl'}")
