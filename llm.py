"""One client for every LLM call the pipeline makes: any OpenAI-compatible API, or the local model in-process.

    from llm import LLM, LLMArgs
    llm = LLM(LLMArgs(model="gpt-3.5-turbo"))       # key from OPENAI_API_KEY, endpoint from OPENAI_BASE_URL
    llm.chat([{"role": "user", "content": "Hi"}]).text
    llm.chat_json(messages, schema)                 # parsed + validated, one repair retry, else LLMOutputError
    llm.map(fn, items, desc="annotate")             # fn over items on `concurrency` threads, results in order
    llm.usage                                       # requests, cached, tokens, cost_usd

    python llm.py --prompt "Say hi in French"                                  # one call, to check an endpoint
    python llm.py --prompt "Say hi" --base-url http://127.0.0.1:8000/v1        # e.g. our serve.py
    python llm.py --prompt "Say hi" --backend local                            # embedded SmolLM2, no network

Every answer is cached in SQLite under a hash of backend + model + prompt/messages + sampling parameters, so a
rerun of a stage sends no request and costs nothing. Pass `seed=` to get distinct cached samples of one prompt.
Transient failures (429, 408/409, 5xx, timeouts, connection errors) are retried with exponential backoff and
full jitter, or after the server's Retry-After. The API key is read from the environment and never logged or cached.
With --backend local, requests that wait for the model while it is busy are generated together as one batch, on
one thread the client owns whichever threads ask, and chat_json answers are constrained: the model reasons freely up
to its ```json fence (or not at all: reasoning=False), then writes the JSON token by token under the schema
(generate.py's json_schema), so even a small local model answers with parseable JSON.
"""
from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from constrain import SCHEMA_LENGTHS, check_schema  # the subset's definition; check_schema is part of this API

log = logging.getLogger("llm")

# List prices in USD per 1M tokens (input, output), from the providers' pricing pages in 2024-2025; they change,
# so treat cost_usd as an estimate. Dated variants ("gpt-4o-2024-08-06") match by the longest prefix.
PRICES = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-3.5-turbo-instruct": (1.50, 2.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
}
# Statuses worth retrying: rate limits, request timeout, conflicts (OpenAI's own client retries these) and 5xx.
RETRY_STATUSES = {408, 409, 429}
SCHEMA_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
JSON_FENCE = "```json"  # a chain-of-thought answer ends with its JSON object after this fence


@dataclass
class LLMArgs:
    backend: str = field(default="openai", metadata={"help": "openai (any OpenAI-compatible API) or local",
                                                     "choices": ["openai", "local"]})
    model: str = field(default="gpt-3.5-turbo", metadata={"help": "model name sent to the API"})
    base_url: str | None = field(default=None, metadata={"help": "API base URL, e.g. http://127.0.0.1:8000/v1; "
                                                                 "None = env OPENAI_BASE_URL, else OpenAI's"})
    cache: str | None = field(default=".cache/llm.sqlite", metadata={"help": "SQLite answer cache; none = off"})
    concurrency: int = field(default=4, metadata={"help": "requests in flight at once (threads)"})
    rpm: int = field(default=0, metadata={"help": "max requests per minute; 0 = unlimited"})
    max_retries: int = field(default=6, metadata={"help": "retries of a failed request before giving up"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per request"})
    backoff: float = field(default=1.0, metadata={"help": "first retry delay in seconds; doubles per retry"})
    checkpoint: str | None = field(default=None, metadata={"help": "local backend: model path; "
                                                                   "None = the embedded SmolLM2"})
    adapter: str | None = field(default=None, metadata={"help": "local backend: LoRA adapter directory"})
    max_tokens_cap: int = field(default=0, metadata={"help": "cap every answer at this many tokens, whatever a "
                                                             "stage asks (bounds time or cost); 0 = no cap"})
    dtype: str = field(default="auto", metadata={"help": "local backend: weights dtype (auto, fp32, bf16, fp16); "
                                                         "auto = precision.py's choice for the CPU"})

    def __post_init__(self):
        if self.backend not in ("openai", "local"):
            raise ValueError(f"backend={self.backend!r} must be 'openai' or 'local'")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1")
        for name in ("rpm", "max_retries", "backoff", "max_tokens_cap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout} must be > 0 seconds")
        if self.backend == "local":
            from precision import CHOICES  # torch: the local backend needs it anyway, the API backend must not
            if self.dtype not in CHOICES:
                raise ValueError(f"dtype={self.dtype!r} must be one of {CHOICES}")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" (or what the server said, e.g. "content_filter")
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False


@dataclass
class JSONAnswer:
    """What chat_json_answer returns: the validated object, the text before it (the model's reasoning)."""
    data: dict
    reasoning: str
    raw: str
    repaired: bool


class LLMOutputError(ValueError):
    """The model's answer was not valid JSON for the schema, even after one repair retry."""

    def __init__(self, raw_text: str, reason: str):
        super().__init__(f"invalid LLM output: {reason}")
        self.raw_text = raw_text
        self.reason = reason


class LLMRequestError(RuntimeError):
    """A request failed for good: a non-retryable status, or retries exhausted."""


# ----------------------------------------------------------------------------- JSON answers

def find_json_objects(text: str) -> list[tuple[dict, int, int]]:
    """Every top-level JSON object in `text` as (object, start, end), scanning left to right.

    Tolerates ```json fences and prose around the objects, which is how chain-of-thought answers arrive.
    """
    decoder = json.JSONDecoder()
    found, i = [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append((obj, i, end))
        i = text.find("{", end)
    return found


def decoding_schema(schema: dict) -> dict:
    """The schema a local model's JSON is decoded under: `schema`, with every object that lists properties closed to
    others (additionalProperties false where unset). A small model otherwise wanders into keys of its own and runs out
    of tokens there; whatever it writes under this schema still validates against `schema`."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: decoding_schema(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = decoding_schema(out[key])
    return out


def _is_type(value, name: str) -> bool:
    if name == "integer":  # JSON has one number type: 3.0 is an integer, True is not a number
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, SCHEMA_TYPES[name])


def _json_equal(a, b) -> bool:
    """Equality of JSON values: 1 == 1.0, but True != 1 (Python's bool is an int; JSON's is not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def validate(value, schema: dict, path: str = "$") -> list[str]:
    """Errors of `value` against a schema of the subset constrain.py defines (type, properties, required, enum, items,
    minimum, maximum, additionalProperties, minItems, maxItems, minLength, maxLength), each naming its JSON path; []
    when valid. A string's length is its number of code points, len(value)."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {json.dumps(value)[:60]}"]
    errors = []
    if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
        errors.append(f"{path}: {json.dumps(value)[:60]} is not one of {json.dumps(schema['enum'])}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing required key {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], f"{path}.{k}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {k!r} (allowed: {sorted(props)})")
            elif isinstance(extra, dict):
                errors += validate(v, extra, f"{path}.{k}")
    if isinstance(value, (list, str)):  # items of an array, code points of a string
        (lo, hi), unit = (SCHEMA_LENGTHS[1], "characters") if isinstance(value, str) else (SCHEMA_LENGTHS[0], "items")
        if lo in schema and len(value) < schema[lo]:
            errors.append(f"{path}: {len(value)} {unit}, fewer than {lo} {schema[lo]}")
        if hi in schema and len(value) > schema[hi]:
            errors.append(f"{path}: {len(value)} {unit}, more than {hi} {schema[hi]}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += validate(v, schema["items"], f"{path}[{i}]")
    return errors


def parse_json_answer(text: str, schema: dict, check: Callable[[dict], list[str]] | None = None
                      ) -> tuple[dict, str]:
    """(object, text before it) for the last JSON object in `text` that passes the schema and `check`.

    The last one wins because a chain-of-thought answer ends with its JSON; raises LLMOutputError otherwise.
    """
    candidates = find_json_objects(text)
    if not candidates:
        raise LLMOutputError(text, "no JSON object found in the answer")
    reason = ""
    for obj, start, _ in reversed(candidates):
        errors = validate(obj, schema) or (check(obj) if check else [])
        if not errors:
            reasoning = re.sub(r"```(?:json)?\s*$", "", text[:start].rstrip()).strip()
            return obj, reasoning
        reason = reason or "; ".join(errors[:5])  # report the errors of the last object, the intended answer
    raise LLMOutputError(text, reason)


# ----------------------------------------------------------------------------- plumbing

class _Cache:
    """Answers in SQLite; one connection behind a lock for threads, WAL + busy timeout for other processes."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                             "created REAL NOT NULL)")

    def get(self, key: str):
        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, json.dumps(value), time.time()))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart across threads."""

    def __init__(self, rpm: int):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(start - now)


def _retry_after(err) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, Retry-After seconds or HTTP date), if any."""
    response = getattr(err, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _is_retryable(err) -> bool:
    import openai
    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code in RETRY_STATUSES or err.status_code >= 500)


def _price(model: str) -> tuple[float, float]:
    matches = [m for m in PRICES if model == m or model.startswith(m + "-")]
    return PRICES[max(matches, key=len)] if matches else (0.0, 0.0)


# ----------------------------------------------------------------------------- the client

class LLM:
    """The pipeline's LLM client; thread-safe. Use as a context manager or call close()."""

    def __init__(self, args: LLMArgs | None = None):
        self.args = args or LLMArgs()
        self._cache = _Cache(self.args.cache) if self.args.cache else None
        self._limiter = _RateLimiter(self.args.rpm)
        self._lock = threading.Lock()  # guards the usage totals
        # the openai client or the local Generator, built on first use: a rerun served from the cache needs
        # neither a key nor a model
        self._backend = None
        self._backend_lock = threading.Lock()
        # the local model runs one batch at a time, always on one thread of its own: every thread that runs torch ops
        # gets its own OpenMP team, and batches that hopped between the callers' threads took 1.38x as long on 2 cores
        self._model_thread = None
        self._pending_lock = threading.Lock()
        self._pending: list[tuple] = []  # local requests waiting for the model: (kind, payload, GenerateArgs, Future)
        self._usage = dict(requests=0, cached=0, retries=0, prompt_tokens=0, completion_tokens=0, cost_usd=0.0)
        if self.args.backend == "local":  # the cache key names what actually generates
            self.model_id = f"local:{self.args.checkpoint or 'embedded'}:{self.args.adapter or ''}"
        else:
            self.model_id = self.args.model

    # -- public API

    def complete(self, prompt: str, **params) -> Completion:
        """One text completion (/v1/completions)."""
        return self._generate("completion", prompt, params)

    def chat(self, messages: list[dict], **params) -> Completion:
        """One chat completion (/v1/chat/completions)."""
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        return self._generate("chat", [dict(role=m["role"], content=m["content"]) for m in messages], params)

    def chat_json(self, messages: list[dict], schema: dict, *, check=None, reasoning: bool = True, **params) -> dict:
        """The JSON object the model answers, validated against `schema` (and `check(obj) -> errors`)."""
        return self.chat_json_answer(messages, schema, check=check, reasoning=reasoning, **params).data

    def chat_json_answer(self, messages: list[dict], schema: dict, *, check=None, reasoning: bool = True,
                         **params) -> JSONAnswer:
        """Like chat_json, also returning the reasoning before the JSON; one repair retry, then LLMOutputError.
        reasoning=False is for prompts that ask for the JSON alone: a local model then writes the JSON under the
        schema from its first token instead of reasoning first (an API model follows the prompt either way)."""
        check_schema(schema)
        if self.args.backend == "local":  # reasoning, then JSON decoded under the schema (see _local)
            params = {**params, "json_schema": decoding_schema(schema), **({} if reasoning else {"reasoning": False})}
        answer = self.chat(messages, **params)
        raw = answer.text
        try:
            return JSONAnswer(*parse_json_answer(raw, schema, check), raw=raw, repaired=False)
        except LLMOutputError as first:
            if "json_schema" in params and answer.finish_reason == "length":  # a repair would run out as well
                limit = min(params.get("max_tokens", 256), self.args.max_tokens_cap or float("inf"))
                raise LLMOutputError(raw, f"the JSON answer did not end within max_tokens={limit}") from None
            log.info("invalid JSON answer (%s); asking for a repair", first.reason)
            repair = messages + [
                {"role": "assistant", "content": raw},
                {"role": "user", "content": f"Your answer could not be used: {first.reason}. Reply with the "
                                            f"corrected JSON object only, in a ```json block, matching the format "
                                            f"asked for."}]
            raw = self.chat(repair, **params).text
            return JSONAnswer(*parse_json_answer(raw, schema, check), raw=raw, repaired=True)

    def imap(self, fn: Callable, items: Iterable, desc: str | None = None) -> Iterator:
        """Yield fn(item) for each item in input order while `concurrency` threads work ahead."""
        from tqdm import tqdm
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, disable=desc is None, dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=self.args.concurrency, thread_name_prefix="llm")
        try:
            futures = [pool.submit(fn, item) for item in items]
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
            for f in futures:
                yield f.result()
        finally:  # on an error or an early stop, drop the queued work instead of finishing it
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def map(self, fn: Callable, items: Iterable, desc: str | None = None) -> list:
        """[fn(item) for item in items] on `concurrency` threads, in input order."""
        return list(self.imap(fn, items, desc))

    def embed(self, texts: list[str], model: str = "text-embedding-3-small", batch_size: int = 256) -> np.ndarray:
        """(len(texts), dim) float32 embeddings from the API's /v1/embeddings; cached per text."""
        if self.args.backend != "openai":
            raise ValueError("backend='local' has no embeddings endpoint; embed locally with the retrieval "
                             "stage's MiniLM encoder, or use --backend openai")
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        keys = [self._key("embedding", model, text, {}) for text in texts]
        vectors = [self._cache.get(k) if self._cache else None for k in keys]
        self._count(cached=sum(v is not None for v in vectors))
        missing = [i for i, v in enumerate(vectors) if v is None]
        for lo in range(0, len(missing), batch_size):
            idx = missing[lo:lo + batch_size]
            response = self._with_retries(lambda: self._client().embeddings.create(
                model=model, input=[texts[i] for i in idx]))
            tokens = response.usage.prompt_tokens if response.usage else 0
            self._count(requests=1, prompt_tokens=tokens, cost_usd=tokens * _price(model)[0] / 1e6)
            for i, item in zip(idx, sorted(response.data, key=lambda d: d.index)):
                vectors[i] = list(item.embedding)
                if self._cache:
                    self._cache.put(keys[i], vectors[i])
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)

    @property
    def usage(self) -> dict:
        """Totals so far: requests sent, answers from cache, retries, tokens and estimated cost of sent requests."""
        with self._lock:
            return dict(self._usage)

    def close(self) -> None:
        if self._cache:
            self._cache.close()
        if self.args.backend == "openai" and self._backend is not None:
            self._backend.close()
        if self._model_thread is not None:
            self._model_thread.shutdown(wait=True, cancel_futures=True)
            with self._pending_lock:  # requests whose turn was cancelled: fail them rather than leave them waiting
                left, self._pending = self._pending, []
            for job in left:
                job[3].set_exception(RuntimeError("the LLM client was closed before this request ran"))

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals

    def _key(self, kind: str, model: str, payload, params: dict) -> str:
        blob = json.dumps({"backend": self.args.backend, "model": model, "kind": kind, "input": payload,
                           "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._usage[k] += v

    def _generate(self, kind: str, payload, params: dict) -> Completion:
        params = _sampling_params(**params)
        if "json_schema" in params and self.args.backend != "local":
            raise ValueError("json_schema constrains the local model only; chat_json adds it when the backend is local")
        if self.args.max_tokens_cap:  # before the cache key, so capped answers are cached as what they are
            params["max_tokens"] = min(params["max_tokens"], self.args.max_tokens_cap)
        key = self._key(kind, self.model_id, payload, params)
        hit = self._cache.get(key) if self._cache else None
        if hit is not None:
            self._count(cached=1)
            return Completion(**hit, cached=True)
        if self.args.backend == "local":
            out = self._local(kind, payload, params)
        else:
            out = self._with_retries(lambda: self._openai(kind, payload, params))
        price_in, price_out = _price(self.args.model) if self.args.backend == "openai" else (0.0, 0.0)
        self._count(requests=1, prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    cost_usd=(out.prompt_tokens * price_in + out.completion_tokens * price_out) / 1e6)
        if self._cache:
            self._cache.put(key, {k: v for k, v in dataclasses.asdict(out).items() if k != "cached"})
        return out

    def _client(self):
        with self._backend_lock:
            if self._backend is None:
                from openai import OpenAI
                base_url = self.args.base_url or os.environ.get("OPENAI_BASE_URL") or None
                api_key = os.environ.get("OPENAI_API_KEY")
                if not api_key and base_url is None:
                    raise ValueError("OPENAI_API_KEY is not set: export it, or pass --base-url of a local "
                                     "OpenAI-compatible server (e.g. serve.py), or use --backend local")
                # local servers ignore the key, but the client insists on one
                self._backend = OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=self.args.timeout,
                                       max_retries=0)  # we retry ourselves, with our own backoff and logging
            return self._backend

    def _openai(self, kind: str, payload, params: dict) -> Completion:
        extra = {k: v for k, v in params.items() if v is not None}  # stop/seed only when set
        if kind == "chat":
            r = self._client().chat.completions.create(model=self.args.model, messages=payload, **extra)
            choice, text = r.choices[0], r.choices[0].message.content
        else:
            r = self._client().completions.create(model=self.args.model, prompt=payload, **extra)
            choice, text = r.choices[0], r.choices[0].text
        usage = r.usage
        return Completion(text=text or "", finish_reason=choice.finish_reason or "stop",
                          prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0)

    def _with_retries(self, call: Callable):
        import openai
        for attempt in range(self.args.max_retries + 1):
            self._limiter.wait()
            try:
                return call()
            except openai.OpenAIError as err:
                status = getattr(err, "status_code", None)
                what = f"HTTP {status}" if status else type(err).__name__
                if not _is_retryable(err):
                    raise LLMRequestError(f"{what} from {self.args.backend} model {self.args.model!r}, "
                                          f"not retryable: {err}") from err
                if attempt == self.args.max_retries:
                    raise LLMRequestError(f"{what} from {self.args.backend} model {self.args.model!r}: gave up "
                                          f"after {attempt + 1} attempts (--max-retries {self.args.max_retries})"
                                          ) from err
                server_delay = _retry_after(err)
                # full jitter (AWS architecture blog, "Exponential Backoff and Jitter"), capped at a minute
                delay = server_delay if server_delay is not None else \
                    random.uniform(0, min(60.0, self.args.backoff * 2 ** attempt))
                log.warning("%s; retry %d/%d in %.2fs%s", what, attempt + 1, self.args.max_retries, delay,
                            " (Retry-After)" if server_delay is not None else "")
                self._count(retries=1)
                time.sleep(delay)

    def _local(self, kind: str, payload, params: dict) -> Completion:
        """Generate with the local model. A completion with a json_schema is decoded under it. A chat with one is
        the reply up to its ```json fence (the chain of thought), then the JSON under the schema, with a max_tokens
        budget of its own (generate.py's json_after, one generation; two, the JSON continuing the reply, when a stop
        string may end the reasoning); the text is both, closed by a fence, as an API model would write it. With
        reasoning=False the reply opens with the fence and holds the JSON alone."""
        from generate import GenerateArgs, Generator  # imported here so the API backend needs no torch
        from precision import choose_dtype

        def load():
            if self._backend is None:
                self._backend = Generator.from_checkpoint(self.args.checkpoint, adapter=self.args.adapter,
                                                          dtype=choose_dtype(self.args.dtype, "cpu"))
        if self._backend is None:  # loaded on the model thread too (load() checks again: one load)
            self._on_model_thread(load)
        request = {k: v for k, v in params.items() if k not in ("json_schema", "reasoning")}
        [gargs] = GenerateArgs.from_openai({**request, "seed": params["seed"] or 0},  # unseeded: seed 0, repeatable
                                           vocab_size=self._backend.model.args.vocab_size)
        schema = params.get("json_schema")
        if schema is None or kind != "chat":  # a completion with a schema is the JSON alone
            if schema is not None:
                gargs = dataclasses.replace(gargs, json_schema=json.dumps(schema))
            r = self._submit(kind, payload, gargs)
            return Completion(text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                              completion_tokens=r.completion_tokens)
        if params.get("reasoning") is False:  # the JSON alone: the reply opens with the fence, then the object
            prefix = f"{JSON_FENCE}\n"
            r = self._submit("chat_prefix", (payload, prefix),
                             dataclasses.replace(gargs, json_schema=json.dumps(schema)))
        elif gargs.stop:  # the reasoning ends at a stop string too: two generations, the JSON after the fence
            think = self._submit("chat", payload, dataclasses.replace(gargs, stop=gargs.stop + (JSON_FENCE,)))
            prefix = f"{think.text.rstrip()}\n{JSON_FENCE}\n"
            r = self._submit("chat_prefix", (payload, prefix),
                             dataclasses.replace(gargs, stop=(), json_schema=json.dumps(schema)))
            r = dataclasses.replace(r, prompt_tokens=think.prompt_tokens + r.prompt_tokens,
                                    completion_tokens=think.completion_tokens + r.completion_tokens)
        else:  # one generation: reasoning, the fence (written for the model if it stops first), the JSON
            prefix = ""
            r = self._submit("chat", payload, dataclasses.replace(gargs, json_schema=json.dumps(schema),
                                                                  json_after=JSON_FENCE))
        return Completion(text=f"{prefix}{r.text}\n```", finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                          completion_tokens=r.completion_tokens)

    def _submit(self, kind: str, payload, gargs):
        """One generation on the local model, batched with the requests of other threads waiting for it."""
        future = Future()
        with self._pending_lock:
            self._pending.append((kind, payload, gargs, future))
        # Requests that arrive while the model is busy wait in the queue; the model thread's next turn generates all
        # of them as one batch, and the turns queued behind it find nothing left. Batching is what makes concurrency
        # pay locally.
        self._on_model_thread(self._drain, wait=False)
        return future.result()

    def _drain(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if batch:
            self._run_batch(batch)

    def _on_model_thread(self, fn: Callable, wait: bool = True):
        with self._backend_lock:
            if self._model_thread is None:
                self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-model")
            turn = self._model_thread.submit(fn)
        return turn.result() if wait else turn

    def _run_batch(self, batch: list[tuple]) -> None:
        def chat_prefix(payloads, args):
            return self._backend.chat([p[0] for p in payloads], args, prefixes=[p[1] for p in payloads])

        for kind, run in (("chat", self._backend.chat), ("chat_prefix", chat_prefix),
                          ("completion", self._backend.generate)):
            jobs = [job for job in batch if job[0] == kind]
            if not jobs:
                continue
            try:
                results = run([job[1] for job in jobs], [job[2] for job in jobs])  # per-row sampling args
            except BaseException as e:  # every waiting caller gets the error (even an interrupt: none waits forever)
                for job in jobs:
                    job[3].set_exception(e)
            else:
                for job, r in zip(jobs, results):
                    job[3].set_result(r)


def _sampling_params(max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                     stop: str | list[str] | None = None, presence_penalty: float = 0.0,
                     frequency_penalty: float = 0.0, seed: int | None = None, json_schema: dict | None = None,
                     reasoning: bool = True) -> dict:
    """The sampling parameters in OpenAI's names, normalised (they are part of the cache key); the API checks their
    values, and the local backend checks them as serve.py does (GenerateArgs.from_openai). json_schema (the local
    backend's constrained JSON) is only present when given, and reasoning only when False (a chat under json_schema
    that writes the JSON at once), so the keys of other requests stay what they were."""
    stop = [stop] if isinstance(stop, str) else (list(stop) if stop else None)
    params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed)
    if json_schema is not None:
        params["json_schema"] = json_schema
    if not reasoning:
        if json_schema is None:
            raise ValueError("reasoning=False applies to a chat under json_schema only (chat_json sets both)")
        params["reasoning"] = False
    return params


@dataclass
class PromptArgs:
    prompt: str = field(default="", metadata={"help": "the user message (or raw prompt with --no-chat)",
                                              "required": True})
    system: str | None = field(default=None, metadata={"help": "optional system message"})
    chat: bool = field(default=True, metadata={"help": "chat endpoint; --no-chat uses /v1/completions"})
    max_tokens: int = field(default=256, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})


def main(argv: list[str] | None = None) -> None:
    from cli import parse_args
    pargs, largs = parse_args(argv, PromptArgs, LLMArgs, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with LLM(largs) as llm:
        params = dict(max_tokens=pargs.max_tokens, temperature=pargs.temperature)
        if pargs.chat:
            messages = ([{"role": "system", "content": pargs.system}] if pargs.system else []) + \
                [{"role": "user", "content": pargs.prompt}]
            out = llm.chat(messages, **params)
        else:
            out = llm.complete(pargs.prompt, **params)
        print(out.text)
        print(f"[{out.finish_reason}; cached={out.cached}; usage {llm.usage}]")


if __name__ == "__main__":
    main()
