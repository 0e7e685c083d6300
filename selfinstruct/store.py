"""Files of the Self-Instruct stage: append-only JSONL state, atomic writes, and checked downloads.

    from selfinstruct.store import read_jsonl, append_jsonl, download
    rows = read_jsonl(out / "bootstrap.jsonl", keys=("kept",))   # [] if missing; a torn last line is dropped
    download(url, cache / "seed_tasks.jsonl", sha256="7779...")
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import jsonl  # the module, not `from jsonl import read_jsonl`: this file defines its own read_jsonl

USER_AGENT = "LLM-training-selfinstruct/1.0 (dataset download)"


def read_jsonl(path: Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL state file, [] if it is missing; each must hold `keys` (an error names the file, line and
    key). A last line without its newline is a write cut off by a crash: it is removed from the file so the next
    append starts clean."""
    path = Path(path)
    if not path.exists():
        return []
    rows = jsonl.read_jsonl(path, drop_torn_tail=True)
    for lineno, row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: state record lacks {missing[0]!r} (a step writes {', '.join(keys)}); "
                             f"delete the line to redo that item, or the file to redo the step")
    return [row for _, row in rows]


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as a single write + flush + fsync, so a crash leaves whole lines (or a torn last one)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def file_digests(path: Path) -> dict:
    """sha256 and the git blob id (sha1 of "blob <size>\\0" + content, what `git hash-object` prints)."""
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {Path(path).stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            blob.update(chunk)
    return {"sha256": sha256.hexdigest(), "git_blob": blob.hexdigest()}


def _retry_delay(response, attempt: int, backoff: float) -> float:
    """Server's Retry-After (seconds or HTTP date) if given, else exponential backoff with full jitter."""
    value = response.headers.get("Retry-After") if response is not None else None
    if value:
        try:
            return min(300.0, max(0.0, float(value)))
        except ValueError:
            try:
                return min(300.0, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
            except (TypeError, ValueError):
                pass
    return random.uniform(0, backoff * 2 ** attempt)


def download(url: str, dest: Path, *, sha256: str | None = None, git_blob: str | None = None,
             timeout: float = 30.0, retries: int = 4, backoff: float = 1.0) -> Path:
    """Fetch `url` to `dest` once (atomically), verifying its checksum; a cached file that verifies is reused."""
    import requests  # lazy: only a download needs it, and most runs reuse the cached file

    dest = Path(dest)
    expected = {k: v for k, v in (("sha256", sha256), ("git_blob", git_blob)) if v}
    if not expected:
        raise ValueError(f"download of {url}: give sha256= or git_blob= so the file can be verified")

    def verified(path: Path) -> bool:
        digests = file_digests(path)
        return all(digests[k] == v for k, v in expected.items())

    if dest.is_file() and verified(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        response = None
        try:
            response = requests.get(url, timeout=timeout, stream=True, headers={"User-Agent": USER_AGENT})
            if response.status_code == 200:
                with open(tmp, "wb") as f:
                    for chunk in response.iter_content(1 << 20):
                        f.write(chunk)
                break
            if response.status_code not in (408, 429) and response.status_code < 500:
                raise OSError(f"download of {url} failed: HTTP {response.status_code}")
        except (requests.ConnectionError, requests.Timeout) as e:
            if attempt == retries:
                raise OSError(f"download of {url} failed after {retries + 1} attempts: {e}") from e
        if attempt == retries:
            raise OSError(f"download of {url} failed after {retries + 1} attempts: HTTP {response.status_code}")
        time.sleep(_retry_delay(response, attempt, backoff))
    if not verified(tmp):
        got = file_digests(tmp)
        tmp.unlink()
        raise ValueError(f"{url}: checksum mismatch (expected {expected}, got "
                         f"{ {k: got[k] for k in expected} }); the upstream file changed or the download was "
                         f"corrupted; pass a local copy instead")
    os.replace(tmp, dest)
    return dest
