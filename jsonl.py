"""JSONL files, one JSON object a line: the one reader every stage uses, so all split records the same way and name
the file and line of a bad one. Standard library only (scrape/ and selfinstruct/ do not need torch).

    from jsonl import parse_jsonl, read_jsonl
    for lineno, record in read_jsonl("out/articles.jsonl"):      # blank lines skipped
        ...
    rows = read_jsonl(state, drop_torn_tail=True)   # a state file whose appender may have crashed mid-write
    rows = list(parse_jsonl(text, path))            # text already read (to sniff the format, or another encoding)

Records are split on "\n" only: str.splitlines also breaks at U+2028, U+0085 and other separators, which our
writers (json.dumps(..., ensure_ascii=False)) leave raw inside strings.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def parse_jsonl(text: str, path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `text`, read from `path` (named in errors)."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                             f"JSONL needs one object a line: fix or delete this line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                             f"JSONL needs one object a line")
        yield lineno, record


def read_jsonl(path: str | Path, drop_torn_tail: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a UTF-8 JSONL file. drop_torn_tail first cuts a last line
    that lacks its newline from the file: a write cut off by a crash, so the next append starts on a line of its own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    data = path.read_bytes()
    if drop_torn_tail and data and not data.endswith(b"\n"):
        # Appenders write a record and its newline together, so a line without one never finished. Truncating is a
        # single system call: the file is either as before (repaired on the next read) or ends at a whole line.
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark from a Windows editor is not part of line 1
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    return list(parse_jsonl(text, path))
