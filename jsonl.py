"""JSON and JSONL files: the one reader and the one pair of atomic writers every stage uses, so all split records
the same way, name the file and line of a bad one, and never leave a half-written file. Standard library only
(scrape/ and selfinstruct/ do not need torch).

    from jsonl import parse_jsonl, read_jsonl
    for lineno, record in read_jsonl("out/articles.jsonl"):      # blank lines skipped
        ...
    rows = read_jsonl(state, drop_torn_tail=True)   # a state file whose appender may have crashed mid-write
    rows = list(parse_jsonl(text, path))            # text already read (to sniff the format, or another encoding)
    write_jsonl("out/x.jsonl", records)             # whole files: a temporary file, then os.replace
    write_json("out/x.json", obj)
    atomic_write("out/x.md", lambda tmp: tmp.write_text(text))   # any other format, written by a callback

Records are split on "\n" only: str.splitlines also breaks at U+2028, U+0085 and other separators, which our
writers (json.dumps(..., ensure_ascii=False)) leave raw inside strings.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
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


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`: readers and a crash see the old
    file or the new one, never a part. The temporary file keeps the suffix, so writers that sniff it (a plot) work."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_jsonl(path: str | Path, records: Iterable[dict], ensure_ascii: bool = False) -> Path:
    """Write `records` one a line, atomically. Non-ASCII stays raw unless ensure_ascii (the reader splits on "\n" only,
    so a raw U+2028 inside a string is safe here, but not for every other tool)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=ensure_ascii) + "\n")
    return atomic_write(path, write)


def write_json(path: str | Path, obj, indent: int | None = 2, ensure_ascii: bool = False) -> Path:
    """Write one JSON document (indented, with a final newline), atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(
        json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n", encoding="utf-8"))
