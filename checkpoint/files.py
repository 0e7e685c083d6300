"""Small file helpers the format modules share: sniffing a GGUF, reading a JSON config, finding tokenizer.model."""
from __future__ import annotations

import json
from pathlib import Path


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_json(path: Path) -> dict:
    """A JSON object from path; every error names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def find_sentencepiece(folder: Path) -> Path | None:
    """tokenizer.model beside the weights or one folder up (Meta's original download layout)."""
    for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if p.is_file():
            return p
    return None
