"""An OpenAI-compatible HTTP server over generate.py (FastAPI + uvicorn): GET /v1/models, POST /v1/completions and
POST /v1/chat/completions, plain or streamed as server-sent events. Requests are batched continuously.

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
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cli import parse_args
from constrain import JsonConstraint
from generate import GenerateArgs, Generator, Result, RunningBatch
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
    dtype: str = field(default="float32", metadata={"help": "weights dtype",
                                                    "choices": ["float32", "bfloat16", "float16"]})
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

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0")
        for name in ("max_prompt_tokens", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms={self.batch_wait_ms} must be >= 0")
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
    base = Generator.from_checkpoint(sargs.checkpoint, dtype=getattr(torch, sargs.dtype), device=sargs.device,
                                     base_quant=sargs.base_quant)
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
@dataclass
class Job:
    """Rows of one request for one model; `emit(row, text, result)` and `fail(message)` must be thread-safe."""
    model: str
    prompts: list[list[int]]
    args: list[GenerateArgs]
    emit: Callable[[int, str, Result | None], None]
    fail: Callable[[str], None]


class Batcher:
    """One thread that batches jobs continuously: each model has one RunningBatch, and between its decode steps
    queued jobs join it (in order, while the live rows stay within max_batch and its cache within max_seq_len), and
    finished rows leave. When idle, it waits `wait_s` after a job arrives so that requests sent together share one
    prefill. Counters: `batches` running batches started from idle, `joins` jobs that joined a batch already
    decoding, `steps` decode steps."""

    def __init__(self, generators: dict[str, Generator], max_batch: int, wait_s: float):
        self.generators, self.max_batch, self.wait_s = generators, max_batch, wait_s
        self.batches = self.joins = self.steps = 0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the jobs already submitted, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        running = {name: RunningBatch(g.model, g.tokenizer) for name, g in self.generators.items()}
        owners: dict = {}  # each live row (a generate._Row) -> (its job, its row in the job)
        waiting: deque[Job] = deque()
        open_ = True  # until stop()
        while open_ or waiting or owners:
            if open_:  # idle: block for a job, then give others wait_s to join it; busy: take what is queued
                open_ = self._collect(waiting, self.wait_s if not waiting and not owners else None)
            self._admit(waiting, running, owners)
            for batch in running.values():
                if batch.rows:
                    self._step(batch, owners)

    def _collect(self, waiting: deque[Job], wait_s: float | None) -> bool:
        """Move queued jobs to `waiting`, up to max_batch rows: those already queued or, with wait_s (when idle),
        the next job to arrive and those arriving within wait_s after it. False once stop() was called."""
        deadline = None
        if wait_s is not None:
            job = self._queue.get()
            if job is None:
                return False
            waiting.append(job)
            deadline = time.monotonic() + wait_s
        while sum(len(j.prompts) for j in waiting) < self.max_batch:
            try:
                job = self._queue.get(timeout=0.0 if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return True
            if job is None:
                return False
            waiting.append(job)
        return True

    def _admit(self, waiting: deque[Job], running: dict[str, RunningBatch], owners: dict) -> None:
        """Join waiting jobs, in order, to their model's running batch while they fit: one prefill per model."""
        live, joining = len(owners), {}
        while waiting:
            job = waiting[0]
            batch, group = running.get(job.model), joining.get(job.model, [])
            try:
                if batch is None:
                    raise ValueError(f"model {job.model!r} does not exist; this server has {sorted(running)}")
                prompts, args = [p for j in group for p in j.prompts], [a for j in group for a in j.args]
                # the job alone first: a bad prompt's error then gives its index within this job
                fits = batch.fits(job.prompts, job.args) and batch.fits(prompts + job.prompts, args + job.args)
                if not batch.rows and not group and (not fits or len(job.prompts) > self.max_batch):
                    raise ValueError(f"the job's {len(job.prompts)} rows do not fit one batch (max_batch="
                                     f"{self.max_batch}, max_seq_len={batch.model.args.max_seq_len})")
            except ValueError as e:  # this job can never run: fail it alone
                waiting.popleft()
                job.fail(f"generation failed: {e}")
                continue
            if not fits or live + len(job.prompts) > self.max_batch:
                break  # the next step boundary may have room; later jobs keep their place behind it
            joining[job.model] = group + [waiting.popleft()]
            live += len(job.prompts)
        for model, jobs in joining.items():
            batch, started = running[model], not running[model].rows
            try:
                rows = batch.add([p for j in jobs for p in j.prompts], [a for j in jobs for a in j.args],
                                 [a.seed for j in jobs for a in j.args])
            except Exception as e:  # noqa: BLE001 -- a failed prefill fails its jobs; the running rows go on
                log.exception("prefill failed")
                for j in jobs:
                    j.fail(f"generation failed: {e}")
                continue
            owners.update(zip(rows, [(j, r) for j in jobs for r in range(len(j.prompts))]))
            self.batches += started
            self.joins += 0 if started else len(jobs)

    def _step(self, batch: RunningBatch, owners: dict) -> None:
        """One decode step of a running batch; streams each row's text to its job."""
        rows = list(batch.rows)
        try:
            events = batch.step()
        except Exception as e:  # noqa: BLE001 -- a failed step fails the requests in this batch, not the server
            log.exception("generation failed")
            batch.close()
            for job in dict.fromkeys(owners.pop(r)[0] for r in rows):
                job.fail(f"generation failed: {e}")
            return
        self.steps += 1
        for row, text in events:
            job, r = owners.pop(row) if row.finish_reason else owners[row]
            try:
                job.emit(r, text, row.result() if row.finish_reason else None)
            except Exception:  # noqa: BLE001 -- one client's stream must not stop the others
                log.exception("streaming a row failed")


# ------------------------------------------------------------------------------------------------- API schema
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted; UNSUPPORTED ones are refused
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer name for system
    content: str | list[dict]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


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
def _response_schema(fmt) -> str:
    """OpenAI's response_format as GenerateArgs.json_schema: "" for text, any JSON object for json_object, the given
    schema for json_schema (the subset constrain.py follows; other keywords are a 400 naming them)."""
    if not fmt:
        return ""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise APIError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'",
                       param="response_format")
    if kind == "text":
        return ""
    schema = {"type": "object"} if kind == "json_object" else (fmt.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format")
    try:
        JsonConstraint(schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None
    return json.dumps(schema)


def create_app(generators: dict[str, Generator], sargs: ServeArgs) -> FastAPI:
    """The FastAPI app serving `generators` by model name; its batching thread runs while the app is up."""
    for name, gen in generators.items():
        room = gen.model.args.max_seq_len
        if sargs.max_prompt_tokens + sargs.max_tokens > room:
            raise ValueError(f"max_prompt_tokens={sargs.max_prompt_tokens} + max_tokens={sargs.max_tokens} exceed "
                             f"model {name!r}'s max_seq_len={room}; lower them")
    batcher = Batcher(generators, sargs.max_batch, sargs.batch_wait_ms / 1000)
    key = os.environ.get(sargs.api_key_env, "") if sargs.api_key_env else ""
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    async def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    app = FastAPI(title="LLM-training", lifespan=lifespan, dependencies=[Depends(authorize)])
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"][1:]) or "body"
        return _error(400, f"{where}: {err['msg']}", param=where)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    def generator(req: _Request) -> Generator:
        if req.model not in generators:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {sorted(generators)}",
                           param="model", code="model_not_found")
        for name in UNSUPPORTED:
            if (req.model_extra or {}).get(name):
                raise APIError(400, f"parameter {name!r} is not supported by this server", param=name)
        return generators[req.model]

    def plan(req: _Request, gen: Generator, prompts: list[list[int]], max_tokens: int | None):
        """Rows (each prompt n times) and their GenerateArgs, after checking the server's limits."""
        max_tokens = max_tokens or sargs.max_tokens
        if max_tokens > sargs.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {sargs.max_tokens}",
                           param="max_tokens")
        for i, p in enumerate(prompts):
            if not p:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
            if len(p) > sargs.max_prompt_tokens:
                raise APIError(400, f"prompt {i} has {len(p)} tokens; this server's limit is "
                                    f"{sargs.max_prompt_tokens}", param="prompt")
        if len(prompts) * req.n > sargs.max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} exceeds this server's {sargs.max_batch} "
                                "rows per request", param="n")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        seed = req.seed if req.seed is not None else uuid.uuid4().int % 2**31  # OpenAI samples afresh each time
        schema = _response_schema((req.model_extra or {}).get("response_format"))
        try:
            args = [GenerateArgs(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                                 top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                                 presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                 stop=stop, seed=seed + k, json_schema=schema) for k in range(req.n)]
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return [p for p in prompts for _ in range(req.n)], args * len(prompts)

    async def run(model: str, rows: list[list[int]], args: list[GenerateArgs]) -> AsyncIterator[tuple]:
        """Submit rows to the batcher; yield (row, text, result) events as they are decoded."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        batcher.submit(Job(model, rows, args, emit=lambda *ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                           fail=lambda msg: loop.call_soon_threadsafe(events.put_nowait, (None, msg, None))))
        left = len(rows)
        while left:
            row, text, result = await events.get()
            if row is None:
                raise APIError(500, text)
            left -= result is not None
            yield row, text, result

    def usage(prompts: list[list[int]], results: list[Result]) -> dict:
        p, c = sum(map(len, prompts)), sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(events, prompts, head: dict, choice: Callable, include_usage: bool) -> AsyncIterator[str]:
        results = []
        try:
            async for row, text, result in events:
                if text:
                    yield sse({**head, "choices": [choice(row, text, None)]})
                if result is not None:
                    results.append(result)
                    yield sse({**head, "choices": [choice(row, None, result.finish_reason)]})
        except APIError as e:
            yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            return
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompts, results)})
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "llm-training"} for name in generators]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        gen = generator(req)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        prompts = [gen.encode(t) for t in texts]
        rows, args = plan(req, gen, prompts, req.max_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}

        def choice(row, text, finish_reason):
            return {"index": row, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        events = run(req.model, rows, args)
        if req.stream:
            include = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(events, prompts, head, choice, include), media_type="text/event-stream")
        results = {row: result async for row, _, result in events if result is not None}
        return {**head, "choices": [choice(i, results[i].text, results[i].finish_reason) for i in sorted(results)],
                "usage": usage(prompts, list(results.values()))}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        gen = generator(req)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else
                     "".join(part.get("text", "") for part in m.content if part.get("type") == "text")}
                    for m in req.messages]
        try:
            prompt = gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        prompts = [gen.encode(prompt, chat=True)]
        rows, args = plan(req, gen, prompts, req.max_completion_tokens or req.max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model}
        events = run(req.model, rows, args)
        if req.stream:
            started = set()

            def delta(row, text, finish_reason):
                d = {} if text is None else {"content": text}
                if row not in started:  # the first chunk of a choice names the role, as OpenAI's do
                    started.add(row)
                    d["role"] = "assistant"
                return {"index": row, "delta": d, "logprobs": None, "finish_reason": finish_reason}

            include = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(events, prompts, {**head, "object": "chat.completion.chunk"}, delta,
                                            include), media_type="text/event-stream")
        results = {row: result async for row, _, result in events if result is not None}
        return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": results[i].text},
                                     "logprobs": None, "finish_reason": results[i].finish_reason}
                                    for i in sorted(results)],
                "usage": usage(prompts, list(results.values()))}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    (sargs,) = parse_args(argv, ServeArgs, description=__doc__)
    if sargs.threads:
        torch.set_num_threads(sargs.threads)
    generators = load_generators(sargs)
    app = create_app(generators, sargs)
    print(f"serving {', '.join(generators)} on http://{sargs.host}:{sargs.port}/v1"
          + (f" (bearer key from ${sargs.api_key_env})" if sargs.api_key_env else ""))
    uvicorn.run(app, host=sargs.host, port=sargs.port, log_level="info")


if __name__ == "__main__":
    main()
