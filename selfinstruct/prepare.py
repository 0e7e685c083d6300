"""Step 5, prepare: Alpaca-format train.jsonl / val.jsonl from the generated instances, the grounded records and
(optionally) the seeds, mixed with general instruction data at a chosen domain ratio, plus stats.json.

    from selfinstruct.prepare import prepare, load_general
    domain, removed = domain_records(instance_rows, grounded_rows, seeds)
    prepare(out_dir, domain, general=load_general(["alpaca"], cache_dir), domain_ratio=0.7)

General data (downloaded on demand, verified by git blob id, cached): the Stanford Alpaca 52K
(tatsu-lab/stanford_alpaca, CC BY-NC 4.0: research only) and the Self-Instruct 82K instances (Apache-2.0).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from jsonl import parse_jsonl, write_jsonl
from selfinstruct.store import download

SOURCES = {
    "alpaca": ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
               "3779ddbc040543ab1834ef216c983d6fcc06cc9a"),
    "self-instruct": ("https://raw.githubusercontent.com/yizhongw/self-instruct/main/data/gpt3_generations/"
                      "batch_221203/all_instances_82K.jsonl", "ccceb2677cbafcac4c996be47520b5581dd10295"),
}


def _records(path: Path) -> list[dict]:
    """Alpaca-style records from a JSON list or a JSONL file, each with instruction, input, output."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [r for _, r in parse_jsonl(text, path)]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); delete the file "
                         f"to download it again") from None
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("instruction", "input", "output")):
            raise ValueError(f"{path}: record {i} lacks string fields instruction, input, output")
        out.append({"instruction": r["instruction"].strip(), "input": r["input"].strip(),
                    "output": r["output"].strip()})
    return out


def load_general(names, cache_dir: Path) -> dict[str, list[dict]]:
    """The general instruction sets named in `names` (keys of SOURCES), downloaded once into cache_dir."""
    sets = {}
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"mix source {name!r} is unknown; choose from {sorted(SOURCES)}")
        url, blob = SOURCES[name]
        sets[name] = _records(download(url, Path(cache_dir) / url.rsplit("/", 1)[1], git_blob=blob))
    return sets


def _in_val(group: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split by group (an instruction, or an article), so val has unseen tasks and articles."""
    h = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:12], 16)
    return h / 16 ** 12 < val_fraction


def domain_records(instance_rows: list[dict], grounded_rows: list[dict], seeds: list[dict],
                   max_instances: int = 5, seed: int = 0) -> tuple[list[tuple[str, dict]], Counter]:
    """(group, record) pairs of our own data, deduplicated, and how many each rule removed."""
    removed: Counter = Counter()
    pairs: list[tuple[str, dict]] = []
    for task in seeds:
        for inst in task["instances"]:
            pairs.append((task["instruction"], {"instruction": task["instruction"].strip(),
                                                "input": inst["input"].strip(), "output": inst["output"].strip()}))
    for row in instance_rows:
        instances = row["instances"]
        if len(instances) > max_instances:  # the paper keeps at most 5 per task, sampled
            removed["over_max_instances"] += len(instances) - max_instances
            instances = random.Random(f"{seed}:{row['instruction']}").sample(instances, max_instances)
        if not instances:
            removed["task_without_instances"] += 1
        for inst in instances:
            pairs.append((row["instruction"], {"instruction": row["instruction"], **inst}))
    for row in grounded_rows:
        if row["ok"]:
            pairs.append((row["url"], row["record"]))
    seen, unique = set(), []
    for group, rec in pairs:
        key = (rec["instruction"], rec["input"], rec["output"])
        if key in seen:
            removed["duplicate_record"] += 1
            continue
        seen.add(key)
        unique.append((group, rec))
    return unique, removed


def prepare(out_dir: Path, domain: list[tuple[str, dict]], general: dict[str, list[dict]] | None = None,
            domain_ratio: float = 1.0, val_fraction: float = 0.05, seed: int = 0) -> dict:
    """Write train.jsonl and val.jsonl; general records fill (1 - domain_ratio) of the training set."""
    train = [rec for group, rec in domain if not _in_val(group, val_fraction, seed)]
    val = [rec for group, rec in domain if _in_val(group, val_fraction, seed)]
    counts = {"domain_train": len(train), "domain_val": len(val)}
    if general and domain_ratio < 1.0:
        rng = random.Random(f"{seed}:mix")
        want = round(len(train) * (1 - domain_ratio) / domain_ratio)
        names = sorted(general)
        for k, name in enumerate(names):
            n = want // len(names) + (k < want % len(names))
            pool = general[name]
            if n > len(pool):
                raise ValueError(f"domain_ratio={domain_ratio} needs {n} records of {name!r}, which has "
                                 f"{len(pool)}; raise --domain-ratio")
            train += rng.sample(pool, n)
            counts[f"general_{name}"] = n
    random.Random(f"{seed}:shuffle").shuffle(train)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "val.jsonl", val)
    return counts
