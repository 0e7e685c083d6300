"""Small file helpers the format modules share: sniffing a GGUF, reading a JSON config and checking its value types,
finding tokenizer.model."""
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


def check_types(values: dict, path, ints: tuple[str, ...] = (), floats: tuple[str, ...] = (),
                bools: tuple[str, ...] = (), prefix: str = "") -> None:
    """Each present key of `values` has its type (an int is a float too; a bool is not a number); the error names
    the file and the key."""
    kinds = ((ints, (int,), "an integer"), (floats, (int, float), "a number"), (bools, (bool,), "true or false"))
    for keys, ok, kind in kinds:
        for k in keys:
            v = values.get(k)
            if v is not None and (not isinstance(v, ok) or (isinstance(v, bool) and bool not in ok)):
                raise ValueError(f"{path}: key {prefix}{k!r} = {v!r} must be {kind}")


def find_sentencepiece(folder: Path) -> Path | None:
    """tokenizer.model beside the weights or one folder up (Meta's original download layout)."""
    for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if p.is_file():
            return p
    return None
