"""Seed tasks: the 175 human-written tasks of Self-Instruct (downloaded once, verified, cached) plus our own
crypto-news tasks in `crypto_seed_tasks.jsonl` (same format: id, name, instruction, instances, is_classification).

    from selfinstruct.seeds import load_seed_tasks, human_seed_tasks
    tasks = human_seed_tasks(cache_dir) + load_seed_tasks(CRYPTO_SEEDS)
"""
from __future__ import annotations

from pathlib import Path

from jsonl import read_jsonl
from selfinstruct.store import download

SEED_URL = "https://raw.githubusercontent.com/yizhongw/self-instruct/main/data/seed_tasks.jsonl"
SEED_SHA256 = "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48"
CRYPTO_SEEDS = Path(__file__).with_name("crypto_seed_tasks.jsonl")


def load_seed_tasks(path: Path) -> list[dict]:
    """Seed tasks from a JSONL file, each checked for an instruction, instances and is_classification."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no seed tasks at {path}; pass --seed-tasks PATH to a Self-Instruct seed_tasks.jsonl")
    tasks = []
    for lineno, task in read_jsonl(path):
        if not isinstance(task.get("instruction"), str) or not task["instruction"].strip():
            raise ValueError(f"{path}:{lineno}: missing 'instruction' (expected the Self-Instruct seed format)")
        instances = task.get("instances")
        if not isinstance(instances, list) or not all(
                isinstance(i, dict) and isinstance(i.get("input"), str) and isinstance(i.get("output"), str)
                for i in instances):
            raise ValueError(f"{path}:{lineno}: 'instances' must be a list of {{'input': str, 'output': str}}")
        if not isinstance(task.get("is_classification"), bool):
            raise ValueError(f"{path}:{lineno}: 'is_classification' must be true or false")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no seed tasks in the file")
    return tasks


def human_seed_tasks(cache_dir: Path, url: str = SEED_URL, path: Path | None = None) -> list[dict]:
    """The paper's 175 human seed tasks: `path` if given, else downloaded from `url` into `cache_dir` once."""
    if path is None:
        path = download(url, Path(cache_dir) / "seed_tasks.jsonl", sha256=SEED_SHA256)
    return load_seed_tasks(path)
