"""An OpenAI-compatible HTTP server over generate.py (FastAPI + uvicorn): GET /v1/models, POST /v1/completions and
POST /v1/chat/completions, plain or streamed as server-sent events, and GET /health. Requests are batched continuously.

    python serve.py                                             # the embedded SmolLM2 on http://127.0.0.1:8000
    python serve.py --checkpoint out/merged --adapter news=out/run/adapter --port 8080
    LLM_KEY=secret python serve.py --api-key-env LLM_KEY        # clients must send "Authorization: Bearer secret"

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="news", messages=[{"role": "user", "content": "What moved BTC?"}])

Model names: the base model's (--name, else its file or folder name) and one per adapter (NAME=DIR, else the folder's
name); adapters share the base weights. One background thread decodes each model's rows as one running batch (every
row with its own sampling settings and seed) and streams each row to its client as it is decoded. Batching is
continuous: between two decode steps, requests that arrived join the running batch (up to --max-batch rows decoding
at once; a request that does not fit waits, in order, for rows to finish), and finished rows leave it, so a request
never waits for a whole batch to end. When the server is idle, it waits --batch-wait-ms after a request for others
to start with it, sharing one prefill. Every row gets the tokens it would get alone. Sampling follows OpenAI
(temperature 1 by default); `top_k` and `repetition_penalty` are accepted as extensions. `response_format`
{"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}} constrains the reply to JSON
(matching the schema) token by token, as generate.py's --json-schema does.

No request can stop the server: every field is bounded where it is parsed (GenerateArgs.from_openai, as llm.py's
local backend does; a bad value is a 400 naming it), a request that fails inside generation fails alone, and a
client that disconnects, or a request past --request-timeout-s, frees its rows at the next decode step. /health
answers 503 if the batching thread ever stops, and the process then exits with status 1 for a supervisor to restart
it; SIGTERM lets running requests finish for --drain-s seconds, then cancels them and exits. The weights' dtype is
precision.py's choice for the device unless --dtype says otherwise.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cli import parse_args
from generate import GenerateArgs, Generator, Result, RunningBatch
from precision import CHOICES, choose_dtype
from quant import KINDS

log = logging.getLogger("serve")
# OpenAI parameters this server does not implement: asking for them is an error rather than silently ignored
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions")


@dataclass
class ServeArgs:
    checkpoint: str | None = field(default=None, metadata={"help": "model path (Meta, HF or GGUF); none = embedded"})
    adapter: tuple[str, ...] = field(default=(), metadata={
        "help": "LoRA adapters served as extra models: DIR or NAME=DIR, comma-separated"})
    name: str = field(default="", metadata={"help": "the base model's name (default: its file or folder name)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on (0.0.0.0 exposes it)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key_env: str = field(default="", metadata={
        "help": "environment variable holding the bearer key clients must send; empty = no key"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype; auto = precision.py's choice for the device "
                                                         "(bf16 or fp16 on CUDA)", "choices": CHOICES})
    device: str = field(default="cpu", metadata={"help": "where the model runs: cpu, cuda, cuda:1, ..."})
    base_quant: str = field(default="none", metadata={"help": "keep the base weights int8 or nf4 (quant.py)",
                                                      "choices": list(KINDS)})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default (all cores)"})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "longest prompt accepted, in tokens"})
    max_tokens: int = field(default=512, metadata={"help": "most tokens one request may generate"})
    max_batch: int = field(default=16, metadata={"help": "most rows (prompts x n) decoding at once"})
    batch_wait_ms: float = field(default=20.0, metadata={
        "help": "when idle, wait this long after a request for others to start with it (later ones join between "
                "decode steps)"})
    request_timeout_s: float = field(default=0.0, metadata={
        "help": "a request still generating after this many seconds is stopped (its rows freed) and gets a 504; "
                "0 = no limit"})
    drain_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM/SIGINT, seconds running requests get to finish before they are cancelled"})
    max_request_bytes: int = field(default=4 << 20, metadata={"help": "largest request body accepted, in bytes"})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0")
        for name in ("max_prompt_tokens", "max_tokens", "max_batch", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("batch_wait_ms", "request_timeout_s", "drain_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"api_key_env={self.api_key_env}: that environment variable is unset or empty; "
                             f"export {self.api_key_env}=<key> or leave --api-key-env out")


# ------------------------------------------------------------------------------------------------- models
def with_adapter(base: Generator, adapter_dir) -> Generator:
    """A Generator for base + a LoRA adapter: the module tree is copied, the base weights are shared, not copied."""
    from lora import load_adapter  # only adapters need lora.py

    shared = {id(t): t for t in [*base.model.parameters(), *base.model.buffers()]}
    model = copy.deepcopy(base.model, memo=shared)
    load_adapter(model, adapter_dir)
    return Generator(model, base.tokenizer)


def load_generators(sargs: ServeArgs) -> dict[str, Generator]:
    """{model name: Generator} for the base checkpoint and each adapter."""
    base = Generator.from_checkpoint(sargs.checkpoint, dtype=choose_dtype(sargs.dtype, sargs.device),
                                     device=sargs.device, base_quant=sargs.base_quant)
    if sargs.checkpoint is None:
        from checkpoint import embedded_model_path

        source = embedded_model_path()
    else:
        source = Path(sargs.checkpoint)
    gens = {sargs.name or source.name.split(".")[0]: base}
    for spec in sargs.adapter:
        name, _, folder = spec.rpartition("=")
        name = name or Path(folder).name
        if name in gens:
            raise ValueError(f"adapter={spec!r}: the model name {name!r} is taken; name it with NAME=DIR")
        gens[name] = with_adapter(base, folder)
    return gens


# ------------------------------------------------------------------------------------------------- batching
@dataclass(eq=False)  # compared by identity: jobs are keys of dicts and sets
class Job:
    """Rows of one request for one model; `emit(row, text, result)` and `fail(message)` must be thread-safe.
    `cancel()` (any thread) frees its rows at the next decode step; `decoded` counts the tokens its rows got."""
    model: str
    prompts: list[list[int]]
    args: list[GenerateArgs]
    emit: Callable[[int, str, Result | None], None]
    fail: Callable[[str], None]
    decoded: int = 0
    closed: bool = False  # failed or cancelled: it gets no more events (set by the batcher thread)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Batcher:
    """One thread that batches jobs continuously: each model has one RunningBatch, and between its decode steps
    queued jobs join it (in order, while the live rows stay within max_batch and its cache within max_seq_len), and
    finished rows leave. When idle, it waits `wait_s` after a job arrives so that requests sent together share one
    prefill. A job that fails (its prefill, or a decode step) fails alone where it can: a bad prefill is retried
    job by job, rows whose logits are not finite leave alone; a step that raises fails the rows of that step.
    Cancelled jobs leave at the next step. If the thread itself stops on an error, `error` says why, every job
    fails and `on_error` is called (serve() then exits non-zero). Counters: `batches` running batches started from
    idle, `joins` jobs that joined a batch already decoding, `steps` decode steps, `cancelled` jobs cancelled,
    `failed` jobs failed."""

    def __init__(self, generators: dict[str, Generator], max_batch: int, wait_s: float):
        self.generators, self.max_batch, self.wait_s = generators, max_batch, wait_s
        self.batches = self.joins = self.steps = self.cancelled = self.failed = 0
        self.error: str | None = None  # why the thread stopped, when it stopped on an error
        self.on_error: Callable[[], None] | None = None  # called from the thread when it stops on an error
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._lock = threading.Lock()  # orders submit() against the thread's end
        self._ended = False
        self._abort = threading.Event()  # stop() ran out of time: fail what is left and end
        self._running: dict[str, RunningBatch] = {}
        self._waiting: deque[Job] = deque()
        self._owners: dict = {}  # each live row (a generate._Row) -> (its job, its row in the job)

    @property
    def healthy(self) -> bool:
        """The thread is running and can take jobs."""
        return self._thread.is_alive() and self.error is None and not self._ended

    @property
    def live_rows(self) -> int:
        return len(self._owners)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already submitted (those left after `timeout` seconds fail), then end the thread."""
        self._queue.put(None)
        if self._thread.ident is None:  # never started
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join()

    def drain(self, timeout: float) -> None:
        """Jobs still running `timeout` seconds from now fail ("shutting down") and the thread ends (SIGTERM)."""
        timer = threading.Timer(timeout, self._abort.set)
        timer.daemon = True
        timer.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self._ended:
                self._queue.put(job)
                return
        _fail(job, f"the server's batcher stopped ({self.error or 'shut down'}); retry later")

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 -- recorded: /health answers 503 and serve() exits non-zero
            log.exception("the batcher stopped")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self._end()
        if self.error is not None and self.on_error is not None:
            self.on_error()

    def _loop(self) -> None:
        self._running = {name: RunningBatch(g.model, g.tokenizer) for name, g in self.generators.items()}
        open_ = True  # until stop()
        while open_ or self._waiting or self._owners:
            if open_:  # idle: block for a job, then give others wait_s to join it; busy: take what is queued
                open_ = self._collect(self.wait_s if not self._waiting and not self._owners else None)
            if self._abort.is_set():
                return
            self._drop_cancelled()
            self._admit()
            for batch in self._running.values():
                if batch.rows:
                    self._step(batch)

    def _end(self) -> None:
        """Fail every job still here or queued, and free the caches; later submits fail at once."""
        with self._lock:
            self._ended = True
        why = f"the server's batcher stopped ({self.error})" if self.error else "the server is shutting down"
        jobs = {job: None for job, _ in self._owners.values()} | dict.fromkeys(self._waiting)
        while not self._queue.empty():
            jobs.update(dict.fromkeys(j for j in [self._queue.get_nowait()] if j is not None))
        for job in jobs:
            self._close(job, f"{why}; retry later")
        self._owners.clear()
        self._waiting.clear()
        for batch in self._running.values():
            batch.close()

    def _close(self, job: Job, message: str | None) -> None:
        """No more events for `job`: fail it with `message`, or (None) it was cancelled. Its live rows leave at the
        next step."""
        if job.closed:
            return
        job.closed = True
        if message is None:
            self.cancelled += 1
        else:
            self.failed += 1
            _fail(job, message)

    def _collect(self, wait_s: float | None) -> bool:
        """Move queued jobs to `waiting`, up to max_batch rows: those already queued or, with wait_s (when idle),
        the next job to arrive and those arriving within wait_s after it. False once stop() was called."""
        deadline = None
        if wait_s is not None:
            job = self._queue.get()
            if job is None:
                return False
            self._waiting.append(job)
            deadline = time.monotonic() + wait_s
        while sum(len(j.prompts) for j in self._waiting) < self.max_batch:
            try:
                job = self._queue.get(timeout=0.0 if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return True
            if job is None:
                return False
            self._waiting.append(job)
        return True

    def _drop_cancelled(self) -> None:
        """Cancelled jobs leave: waiting ones at once, running ones' rows at the next step (see _step)."""
        for job in [j for j in self._waiting if j.cancelled or j.closed]:
            self._waiting.remove(job)
            self._close(job, None)
        for job, _ in list(self._owners.values()):
            if job.cancelled:
                self._close(job, None)

    def _admit(self) -> None:
        """Join waiting jobs, in order, to their model's running batch while they fit: one prefill per model."""
        for model, jobs in self._pick().items():
            self._prefill(self._running[model], jobs)

    def _pick(self) -> dict[str, list[Job]]:
        """The waiting jobs that join now, by model (taken off `waiting`); a job that can never run fails."""
        live, joining = len(self._owners), {}
        while self._waiting:
            job = self._waiting[0]
            batch, group = self._running.get(job.model), joining.get(job.model, [])
            try:
                if batch is None:
                    raise ValueError(f"model {job.model!r} does not exist; this server has {sorted(self._running)}")
                prompts, args = [p for j in group for p in j.prompts], [a for j in group for a in j.args]
                # the job alone first: a bad prompt's error then gives its index within this job
                fits = batch.fits(job.prompts, job.args) and batch.fits(prompts + job.prompts, args + job.args)
                if not batch.rows and not group and (not fits or len(job.prompts) > self.max_batch):
                    raise ValueError(f"the job's {len(job.prompts)} rows do not fit one batch (max_batch="
                                     f"{self.max_batch}, max_seq_len={batch.model.args.max_seq_len})")
            except ValueError as e:  # this job can never run: fail it alone
                self._waiting.popleft()
                self._close(job, f"generation failed: {e}")
                continue
            if not fits or live + len(job.prompts) > self.max_batch:
                break  # the next step boundary may have room; later jobs keep their place behind it
            joining[job.model] = group + [self._waiting.popleft()]
            live += len(job.prompts)
        return joining

    def _prefill(self, batch: RunningBatch, jobs: list[Job]) -> None:
        """Prefill jobs together into `batch`; if that fails, each job again alone, so only a bad one fails."""
        started = not batch.rows
        try:
            rows = batch.add([p for j in jobs for p in j.prompts], [a for j in jobs for a in j.args],
                             [a.seed for j in jobs for a in j.args])
        except Exception as e:  # noqa: BLE001 -- a failed prefill leaves the running rows as they were
            if len(jobs) > 1:
                for job in jobs:
                    self._prefill(batch, [job])
                return
            log.exception("prefill failed")
            self._close(jobs[0], f"generation failed: {e}")
            return
        self._owners.update(zip(rows, [(j, r) for j in jobs for r in range(len(j.prompts))]))
        self.batches += started
        self.joins += 0 if started else len(jobs)

    def _step(self, batch: RunningBatch) -> None:
        """One decode step of a running batch; streams each row's text to its job. Rows of closed jobs (cancelled
        or failed) have their budget cut to the token sampled now, so they leave the batch with this step."""
        self._quarantine(batch)
        rows = list(batch.rows)
        for row in rows:
            job = self._owners[row][0]
            if job.closed:
                row.budget = min(row.budget, len(row.ids) + 1)
            job.decoded += 1
        try:
            events = batch.step()
        except Exception as e:  # noqa: BLE001 -- a failed step fails the requests in it, not the server
            log.exception("a decode step failed")
            batch.close()
            for job in {self._owners.pop(r)[0]: None for r in rows}:
                self._close(job, f"generation failed: {e}")
            return
        self.steps += 1
        for row, text in events:
            job, r = self._owners.pop(row) if row.finish_reason else self._owners[row]
            if not job.closed:
                try:
                    job.emit(r, text, row.result() if row.finish_reason else None)
                except Exception:  # noqa: BLE001 -- one client's stream must not stop the others
                    log.exception("streaming a row failed")

    def _quarantine(self, batch: RunningBatch) -> None:
        """Fail the jobs of rows whose next-token logits are not finite (the model failed on their tokens): such a
        row samples from zeroed logits and leaves with this step, and the other rows go on unchanged."""
        finite = torch.isfinite(batch.logits).all(-1).tolist()
        if all(finite):
            return
        with torch.inference_mode():  # the logits are an inference tensor
            for j, row in enumerate(batch.rows):
                if not finite[j]:
                    batch.logits[j] = 0
                    self._close(self._owners[row][0], "generation failed: the model computed non-finite logits")


def _fail(job: Job, message: str) -> None:
    try:
        job.fail(message)
    except Exception:  # noqa: BLE001 -- a client that is gone must not stop the batcher
        log.exception("failing a job failed")


# ------------------------------------------------------------------------------------------------- API schema
class _Request(BaseModel):
    """Types only: every sampling field's range is checked by GenerateArgs.from_openai, as for llm.py's local
    backend; the server's limits by _plan."""
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted; UNSUPPORTED ones are refused
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer name for system
    content: str | list[dict]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# ------------------------------------------------------------------------------------------------- the app
@dataclass
class ServerState:
    """What the routes share (app.state.server): the models, the settings, the batching thread, the bearer key."""
    generators: dict[str, Generator]
    sargs: ServeArgs
    batcher: Batcher
    key: str
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(generators: dict[str, Generator], sargs: ServeArgs) -> FastAPI:
    """The FastAPI app serving `generators` by model name; its batching thread runs while the app is up."""
    for name, gen in generators.items():
        room = gen.model.args.max_seq_len
        if sargs.max_prompt_tokens + sargs.max_tokens > room:
            raise ValueError(f"max_prompt_tokens={sargs.max_prompt_tokens} + max_tokens={sargs.max_tokens} exceed "
                             f"model {name!r}'s max_seq_len={room}; lower them")
    key = os.environ.get(sargs.api_key_env, "") if sargs.api_key_env else ""
    state = ServerState(generators, sargs, Batcher(generators, sargs.max_batch, sargs.batch_wait_ms / 1000), key)
    app = FastAPI(title="LLM-training", lifespan=_lifespan, dependencies=[Depends(_authorize)])
    app.state.server, app.state.batcher = state, state.batcher
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(_BodyLimit, limit=sargs.max_request_bytes)
    app.include_router(ROUTES)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    state.batcher.start()
    yield
    await asyncio.to_thread(state.batcher.stop, state.sargs.drain_s)


async def _authorize(request: Request) -> None:
    key, given = request.app.state.server.key, request.headers.get("authorization", "")
    if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error(e.status, e.message, e.param, e.code)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"][1:]) or "body"
    return _error(400, f"{where}: {err['msg']}", param=where)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error(500, f"internal error: {type(e).__name__}: {e}"[:500])


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, before anything reads it whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            response = _error(413, f"the request body is over this server's --max-request-bytes {self.limit}")
            return await response(scope, receive, send)
        seen = 0

        async def bounded():  # a chunked body has no length up front: count it as it comes
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # an HTTPException passes FastAPI's body parsing as it is
                raise HTTPException(413, f"the request body is over this server's --max-request-bytes {self.limit}")
            return message

        return await self.app(scope, bounded, send)


# ------------------------------------------------------------------------------------------------- planning
def _generator(state: ServerState, req: _Request) -> Generator:
    if req.model not in state.generators:
        raise APIError(404, f"model {req.model[:80]!r} does not exist; this server has {sorted(state.generators)}",
                       param="model", code="model_not_found")
    for name in UNSUPPORTED:
        if (req.model_extra or {}).get(name):
            raise APIError(400, f"parameter {name!r} is not supported by this server", param=name)
    return state.generators[req.model]


def _plan(state: ServerState, req: _Request, gen: Generator, prompts: list[list[int]]):
    """Rows (each prompt n times) and their GenerateArgs, after checking the server's limits."""
    sargs = state.sargs
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(400, f"prompt {i} is empty", param="prompt")
        if len(p) > sargs.max_prompt_tokens:
            raise APIError(400, f"prompt {i} has {len(p)} tokens; this server's limit is "
                                f"{sargs.max_prompt_tokens}", param="prompt")
    if len(prompts) * req.n > sargs.max_batch or req.n < 1:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} exceeds this server's {sargs.max_batch} "
                            "rows per request (n must be >= 1)", param="n")
    fields = {**(req.model_extra or {}),
              **req.model_dump(exclude={"model", "stream", "stream_options", "prompt", "messages"})}
    try:
        args = GenerateArgs.from_openai(fields, vocab_size=gen.model.args.vocab_size, max_tokens=sargs.max_tokens,
                                        max_n=sargs.max_batch)
    except ValueError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None)) from None
    return [p for p in prompts for _ in range(req.n)], args * len(prompts)


def _chat_prompt(gen: Generator, req: ChatRequest) -> list[int]:
    """The conversation's prompt ids; content parts must be text (this server serves text models)."""
    messages = []
    for i, m in enumerate(req.messages):
        parts = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        for j, part in enumerate(parts):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages.{i}.content.{j}: a part must be {{'type': 'text', 'text': <string>}}; "
                                    f"got {str(part)[:80]} (this server takes text only)",
                               param=f"messages.{i}.content.{j}")
        messages.append({"role": "system" if m.role == "developer" else m.role,
                         "content": "".join(part["text"] for part in parts)})
    try:
        prompt = gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e)[:500], param="messages") from e
    return gen.encode(prompt, chat=True)


# ------------------------------------------------------------------------------------------------- answering
async def _events(state: ServerState, model: str, rows: list[list[int]], args: list[GenerateArgs]
                  ) -> AsyncIterator[tuple]:
    """Submit rows to the batcher; yield (row, text, result) events as they are decoded. Leaving early (the client
    went away) or running past --request-timeout-s cancels the job: its rows leave at the next decode step."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(model, rows, args, emit=lambda *ev: loop.call_soon_threadsafe(events.put_nowait, ev),
              fail=lambda msg: loop.call_soon_threadsafe(events.put_nowait, (None, msg, None)))
    timeout = state.sargs.request_timeout_s or None
    deadline = None if timeout is None else loop.time() + timeout
    state.batcher.submit(job)
    left = len(rows)
    try:
        while left:
            try:
                row, text, result = await asyncio.wait_for(
                    events.get(), None if deadline is None else max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise APIError(504, f"the request ran past this server's --request-timeout-s {timeout:g}; its "
                                    "generation was stopped", code="timeout") from None
            if row is None:
                raise APIError(500 if state.batcher.healthy else 503, text)
            left -= result is not None
            yield row, text, result
    finally:
        if left:
            job.cancel()


async def _results(events: AsyncIterator[tuple], request: Request) -> dict[int, Result] | None:
    """Every row's Result, or None if the client disconnected first (which cancels the job)."""
    async def collect():
        async with aclosing(events):
            return {row: result async for row, _, result in events if result is not None}

    task, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # its events close: the job is cancelled
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone: the body was read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prompts: list[list[int]], results: list[Result]) -> dict:
    p, c = sum(map(len, prompts)), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(events, prompts, head: dict, choice: Callable, include_usage: bool) -> AsyncIterator[str]:
    """The events as server-sent events; an error ends the stream with an error event."""
    results = []
    async with aclosing(events):  # closing this stream early closes the events, which cancels the job
        try:
            async for row, text, result in events:
                if text:
                    yield _sse({**head, "choices": [choice(row, text, None)]})
                if result is not None:
                    results.append(result)
                    yield _sse({**head, "choices": [choice(row, None, result.finish_reason)]})
        except APIError as e:
            yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": e.code}})
            return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompts, results)})
    yield "data: [DONE]\n\n"


def _text_choice(row: int, text: str | None, finish_reason: str | None) -> dict:
    return {"index": row, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def _delta_choice(started: set, row: int, text: str | None, finish_reason: str | None) -> dict:
    d = {} if text is None else {"content": text}
    if row not in started:  # the first chunk of a choice names the role, as OpenAI's do
        started.add(row)
        d["role"] = "assistant"
    return {"index": row, "delta": d, "logprobs": None, "finish_reason": finish_reason}


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ------------------------------------------------------------------------------------------------- routes
ROUTES = APIRouter()


@ROUTES.get("/v1/models")
async def list_models(request: Request):
    state = _state(request)
    return {"object": "list", "data": [{"id": name, "object": "model", "created": state.created,
                                        "owned_by": "llm-training"} for name in state.generators]}


@ROUTES.get("/health")
async def health(request: Request):
    batcher = _state(request).batcher
    if not batcher.healthy:
        return _error(503, f"the batching thread is not running ({batcher.error or 'stopped'}); the server exits")
    return {"status": "ok", "live_rows": batcher.live_rows, "steps": batcher.steps, "cancelled": batcher.cancelled,
            "failed": batcher.failed}


@ROUTES.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = _state(request)
    gen = _generator(state, req)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not texts or len(texts) > state.sargs.max_batch:
        raise APIError(400, f"prompt: give 1 to {state.sargs.max_batch} prompts, got {len(texts)} (an empty list?)",
                       param="prompt")
    prompts = [gen.encode(t) for t in texts]
    rows, args = _plan(state, req, gen, prompts)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model}
    events = _events(state, req.model, rows, args)
    if req.stream:
        include = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(events, prompts, head, _text_choice, include), media_type="text/event-stream")
    results = await _results(events, request)
    if results is None:
        return _error(499, "the client closed the request")
    return {**head, "choices": [_text_choice(i, results[i].text, results[i].finish_reason) for i in sorted(results)],
            "usage": _usage(prompts, list(results.values()))}


@ROUTES.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    state = _state(request)
    gen = _generator(state, req)
    prompts = [_chat_prompt(gen, req)]
    rows, args = _plan(state, req, gen, prompts)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model}
    events = _events(state, req.model, rows, args)
    if req.stream:
        include = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(events, prompts, {**head, "object": "chat.completion.chunk"},
                                         functools.partial(_delta_choice, set()), include),
                                 media_type="text/event-stream")
    results = await _results(events, request)
    if results is None:
        return _error(499, "the client closed the request")
    return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": results[i].text},
                                 "logprobs": None, "finish_reason": results[i].finish_reason}
                                for i in sorted(results)],
            "usage": _usage(prompts, list(results.values()))}


# ------------------------------------------------------------------------------------------------- running
class _Server(uvicorn.Server):
    """uvicorn's server; SIGINT/SIGTERM also start the batcher's drain clock, so that requests still running when
    it ends fail with an error event or response (rather than a cut connection) before uvicorn closes them."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher, drain_s: float):
        super().__init__(config)
        self.batcher, self.drain_s = batcher, drain_s

    def handle_exit(self, sig, frame) -> None:
        self.batcher.drain(self.drain_s)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, sargs: ServeArgs, sockets: list | None = None) -> int:
    """Run the app with uvicorn until SIGINT/SIGTERM (running requests get --drain-s seconds to finish, then they
    fail; uvicorn then re-raises the signal, the usual status of a process it stopped) or until its batching thread
    stops on an error: then it returns 1, so that a supervisor restarts the server."""
    batcher: Batcher = app.state.batcher
    config = uvicorn.Config(app, host=sargs.host, port=sargs.port, log_level="info",
                            timeout_graceful_shutdown=sargs.drain_s + 5)  # + time to send the failures
    server = _Server(config, batcher, sargs.drain_s)
    batcher.on_error = lambda: setattr(server, "should_exit", True)
    server.run(sockets=sockets)
    return 1 if batcher.error is not None else 0


def main(argv: list[str] | None = None) -> None:
    (sargs,) = parse_args(argv, ServeArgs, description=__doc__)
    if sargs.threads:
        torch.set_num_threads(sargs.threads)
    generators = load_generators(sargs)
    app = create_app(generators, sargs)
    print(f"serving {', '.join(generators)} on http://{sargs.host}:{sargs.port}/v1"
          + (f" (bearer key from ${sargs.api_key_env})" if sargs.api_key_env else ""))
    sys.exit(serve(app, sargs))


if __name__ == "__main__":
    main()
