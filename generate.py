"""Batched text generation with a static KV cache: greedy, temperature, top-k and top-p sampling; repetition, presence
and frequency penalties; stop strings and stop tokens; output constrained to JSON matching a schema; streaming; and
ranking fixed answers by log-likelihood.

    python generate.py --prompt "Bitcoin is"                                   # the embedded SmolLM2, greedy
    python generate.py --prompt "Bitcoin is" --dtype fp32                      # default auto: see precision.py
    python generate.py --prompt "What moved ETH today?" --chat --temperature 0.7 --top-p 0.9
    python generate.py --prompt "..." --checkpoint out/merged --adapter out/adapter --max-new-tokens 64
    python generate.py --prompt "Coins in: ETH fell 3%. As JSON." --chat --json-schema '{"type": "object"}'

    from generate import Generator, GenerateArgs
    gen = Generator.from_checkpoint()                                          # or Generator(model, tokenizer)
    [res] = gen.generate(["Bitcoin is"], GenerateArgs(max_new_tokens=32))     # res.text, res.finish_reason
    logp = gen.score_options(prompts, ["negative", "neutral", "positive"])     # (n_prompts, 3) summed log-probs

Prompts of different lengths share one batch: they are left-padded, the padding gets document id 0 (the model's
attention skips it) and each row keeps its own RoPE positions, so every row decodes as it would alone. A row that
finishes leaves the batch, so it stops costing work. The decode loop is a RunningBatch (add prompts, step every live
row), so rows can also join a batch that is already decoding (continuous batching, as serve.py does):

    batch = RunningBatch(gen.model, gen.tokenizer)
    rows = batch.add(prompts, [args] * len(prompts), seeds)   # prefill; they join the running rows
    for row, text in batch.step(): ...                       # one token for every live row; finished rows leave
"""
from __future__ import annotations

import functools
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from cli import parse_args
from constrain import JsonConstraint, response_format_schema
from precision import CHOICES as PRECISIONS, choose_dtype
from quant import KINDS, load_quantized

# on_text(row, new_text, result): result is None until the row's last call, which passes its Result
OnText = Callable[[int, str, "Result | None"], None]


@dataclass
class GenerateArgs:
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens to generate per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: smallest set with this probability mass"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "divide positive / multiply negative logits of tokens already in prompt or output (CTRL); 1 = off"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "subtract from the logit of every token already generated (OpenAI), in [-2, 2]"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "subtract this times the count of each generated token (OpenAI), in [-2, 2]"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "comma-separated strings that end the text"})
    seed: int = field(default=0, metadata={"help": "random seed for sampling (row i of a batch uses seed + i)"})
    json_schema: str = field(default="", metadata={
        "help": "constrain the output to one JSON value matching this JSON schema, given as JSON text ('{}': any "
                "JSON value); generation ends when the value does"})
    json_after: str = field(default="", metadata={
        "help": "with json_schema: write freely until this text (a ```json fence, say), then the JSON under the "
                "schema with max_new_tokens more; a row that would end first (stop token or its budget) gets the "
                "text written for it, so every row ends with the JSON"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-2, 2] (OpenAI's range)")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} contains an empty string")
        if self.json_after and not self.json_schema:
            raise ValueError("json_after needs json_schema (the JSON that follows it)")
        if self.json_after and self.stop:
            raise ValueError("json_after and stop do not combine: the text before the JSON ends at json_after")
        self._constraint = None  # compiled once here; every row decodes with its own copy
        if self.json_schema:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not JSON ({e}): {self.json_schema[:80]!r}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"json_schema must be a JSON object (a schema), got {self.json_schema[:80]!r}")
            self._constraint = JsonConstraint(schema)

    @classmethod
    def from_openai(cls, request: dict, vocab_size: int, max_tokens: int | None = None, max_n: int = 1
                    ) -> list[GenerateArgs]:
        """One GenerateArgs per choice (`n`) from an OpenAI request's sampling fields, each bounded here: OpenAI's
        defaults and ranges; top_k (at most the vocabulary) and repetition_penalty as extensions; max_tokens (or
        max_completion_tokens) at most `max_tokens`, also its default (None: no limit, default 256; a row stops at
        max_seq_len anyway); at most 16 stop strings of 256 characters; a
        seed within 64 bits (choice k uses seed + k; none: a fresh one, as OpenAI); response_format as constrain
        reads it. A bad value raises ValueError naming the field, which is also its `param` attribute."""
        def bad(name: str, why: str) -> ValueError:
            err = ValueError(f"{name}={str(request.get(name))[:80]} {why}")
            err.param = name  # serve.py reports it as the error's OpenAI `param`
            return err

        def number(name: str, default, lo, hi, integer: bool = False):
            v = request.get(name)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
                raise bad(name, f"must be {'an integer' if integer else 'a number'}")
            if not (lo <= v <= hi if hi is not None else lo <= v):  # NaN fails too
                raise bad(name, f"must be in [{lo}, {hi}]" if hi is not None else f"must be >= {lo}")
            return v

        budget_name = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
        budget = number(budget_name, max_tokens or 256, 1, None, integer=True)
        if max_tokens is not None and budget > max_tokens:
            raise bad(budget_name, f"exceeds the limit of {max_tokens}")
        n = number("n", 1, 1, max_n, integer=True)
        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise bad("top_p", "must be in (0, 1]")
        stop = request.get("stop")
        stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stop, list) or len(stop) > 16 or \
                not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
            raise bad("stop", "must be a string or a list of at most 16 non-empty strings of at most 256 characters")
        seed = number("seed", None, -2**63, 2**64 - n, integer=True)
        try:
            schema = response_format_schema(request.get("response_format"))
        except ValueError as e:
            raise bad("response_format", f"is not usable: {e}") from None
        first = cls(
            max_new_tokens=budget, temperature=temperature if temperature >= 1e-5 else 0.0,  # tinier: greedy (vLLM)
            top_k=number("top_k", 0, 0, vocab_size, integer=True), top_p=max(top_p, 1e-6),  # float32 keeps 1e-6
            repetition_penalty=number("repetition_penalty", 1.0, 0.01, 100.0),  # past these, logits overflow
            presence_penalty=number("presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=number("frequency_penalty", 0.0, -2.0, 2.0), stop=tuple(stop),
            seed=secrets.randbits(31) if seed is None else seed,
            json_schema="" if schema is None else json.dumps(schema))
        return [first] + [replace(first, seed=first.seed + k) for k in range(1, n)]

    def constraint(self) -> JsonConstraint | None:
        """A fresh JsonConstraint for one row, or None without json_schema."""
        return None if self._constraint is None else self._constraint.copy()


@dataclass
class Result:
    text: str  # the completion, without the stop token or stop string
    token_ids: list[int]  # every sampled token, including the one that ended the row
    finish_reason: str  # "stop" (stop token, stop string or the end of the constrained JSON) or "length"
    prompt_tokens: int
    completion_tokens: int


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
             repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Penalised logits (B, V). seen (B, V) bool marks prompt + output tokens, counts (B, V) the output tokens.
    Repetition (Keskar et al. 2019, CTRL; as transformers): a seen token's logit is divided by the penalty when
    positive, multiplied when negative. Presence/frequency (OpenAI):
    logit -= presence * (count > 0) + frequency * count."""
    if seen is not None:
        pen = repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    if counts is not None:
        logits = logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts
    return logits


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) with -inf outside each row's support: its top_k most likely tokens (0 = all), then the smallest
    set of most likely tokens whose probability reaches top_p (Holtzman et al. 2019; ties as transformers)."""
    if (top_k > 0).any():
        kmax = int(top_k.max())
        kth = logits.topk(kmax, dim=-1).values.gather(1, (torch.where(top_k > 0, top_k, kmax) - 1)[:, None])
        logits = logits.masked_fill((logits < kth) & (top_k > 0)[:, None], float("-inf"))
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def left_pad(seqs: list[list[int]], start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens, doc_ids, positions) of sequences left-padded to one length; doc id 0 marks padding and positions
    count from `start` within each row. doc_ids and positions are None when all lengths are equal (no mask needed)."""
    T = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
    if all(len(s) == T for s in seqs):
        return tokens, None, None
    docs = (torch.arange(T)[None, :] >= torch.tensor([T - len(s) for s in seqs])[:, None]).long()
    return tokens, docs, start + (docs.cumsum(1) - 1).clamp(min=0)


class _Row:
    """One prompt's decoding state: sampled ids, incrementally decoded text, stop checks, what has been streamed."""

    def __init__(self, tokenizer, args: GenerateArgs, prompt_tokens: int, budget: int, seed: int):
        self.tok, self.args, self.prompt_tokens, self.budget = tokenizer, args, prompt_tokens, budget
        self.gen = torch.Generator().manual_seed(seed) if args.temperature > 0 else None
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self._start = self._done = 0  # ids[_start:_done] were decoded last time: context for the next decode
        self.finish_reason: str | None = None
        self.constraint = args.constraint()  # the JSON the output must follow, or None
        self.later = self.forced = None  # with json_after: the constraint it turns on, the tokens that write it
        if args.json_after:
            self.later, self.constraint = self.constraint, None

    def steer(self, choice: int) -> int:
        """The token a json_after row takes in place of `choice` before its JSON: the next token of json_after
        written for it once it chose a stop token or used max_new_tokens, else `choice`."""
        if self.forced is None and (choice in self.tok.stop_ids or len(self.ids) >= self.args.max_new_tokens):
            self.forced = self.tok.encode(f"\n{self.args.json_after}\n")
        return self.forced.pop(0) if self.forced else choice

    def _start_json(self, since: int) -> None:
        """Turn the JSON constraint on once json_after ends after `since` characters of text; what follows it in
        the same token must begin the JSON (else the row ends: its text then holds no valid JSON)."""
        at = self.text.find(self.args.json_after, max(0, since - len(self.args.json_after) + 1))
        if at < 0:
            return
        self.constraint, self.later, self.forced = self.later, None, None
        self.budget = min(self.budget, len(self.ids) + self.args.max_new_tokens)  # the JSON's own max_new_tokens
        rest = self.text[at + len(self.args.json_after):].encode()
        if not self.constraint.feed(rest) or self.constraint.closed:
            self.finish_reason = "stop"

    def allows(self, token: int) -> bool:
        """Whether the row's JSON constraint lets `token` come next: a stop token once the value is complete, else a
        token whose bytes keep the output a prefix of a matching value."""
        if token in self.tok.stop_ids:
            return self.constraint.complete
        data = self.tok.token_bytes()[token]
        return bool(data) and self.constraint.accepts(data)

    def push(self, token: int) -> str:
        """Add a sampled token; return the text that is now safe to stream (finish_reason is set on the last one)."""
        self.ids.append(token)
        if token in self.tok.stop_ids:
            self.finish_reason = "stop"
        else:
            if self.constraint is not None:
                self.constraint.feed(self.tok.token_bytes()[token])  # sampling only picks tokens it allows
                if self.constraint.closed:  # nothing but whitespace could follow: the JSON is the whole answer
                    self.finish_reason = "stop"
            # decode with a little context so SentencePiece spaces and multi-byte characters come out right; an
            # incomplete UTF-8 sequence decodes to U+FFFD, so wait for the token that completes it
            new = self.tok.decode(self.ids[self._start:])
            if not new.endswith("\ufffd"):
                old = self.tok.decode(self.ids[self._start:self._done])
                self._start, self._done = self._done, len(self.ids)
                before = len(self.text)
                self.text += new[len(old):]
                if self.later is not None:
                    self._start_json(before)
                if self._find_stop(before):
                    return self._flush()
            if len(self.ids) >= self.budget and not self.finish_reason:
                self.finish_reason = "length"
        if self.finish_reason:
            ended_by_token = token in self.tok.stop_ids
            self.text = self.tok.decode(self.ids[:-1] if ended_by_token else self.ids)  # pending bytes included
            self._find_stop(self.sent)
            return self._flush()
        return self._flush(self.text[:len(self.text) - self._held()])

    def _find_stop(self, since: int) -> bool:
        """Cut the text at the first stop string that ends after `since` characters."""
        if not self.args.stop:
            return False
        lo = max(0, since - max(map(len, self.args.stop)) + 1)
        hits = [i for i in (self.text.find(s, lo) for s in self.args.stop) if i >= 0]
        if hits:
            self.text, self.finish_reason = self.text[:min(hits)], "stop"
        return bool(hits)

    def _held(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string (not streamed yet)."""
        return max((n for s in self.args.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])), default=0)

    def _flush(self, upto: str | None = None) -> str:
        upto = self.text if upto is None else upto
        out = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return out

    def result(self) -> Result:
        return Result(self.text, self.ids, self.finish_reason, self.prompt_tokens, len(self.ids))


class RunningBatch:
    """Rows decoding together over one static KV cache, for continuous batching: `add` prefills new prompts and joins
    them to the running rows, `step` samples one token for every live row, and finished rows leave. generate_ids
    drives it, and so does serve.py's Batcher, which adds queued requests between steps.

    Rows are right-aligned on a shared cache slot: a row's tokens fill slots [slot - span, slot), where span is pos
    (its next RoPE position) plus any padding between a shared prompt prefix and the row's own rest; every other
    slot has document id 0 (masked), so every row decodes as it would alone. Prompts that share a long prefix (a
    few-shot template, the same instructions) compute it once: it fills the first slots, and each row's rest
    follows it after its left padding."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.slot = self.size = 0  # the next cache slot to write; the cache's slots
        self.pos = torch.zeros(0, dtype=torch.long)  # each live row's next RoPE position
        self.span = torch.zeros(0, dtype=torch.long)  # each live row's slots: pos, plus padding after a shared prefix
        self.logits: torch.Tensor | None = None  # (rows, V) next-token logits of the live rows
        self.state: _SamplingState | None = None  # sampling settings of the live rows; holds the rows

    @property
    def rows(self) -> list[_Row]:
        """The live rows, in cache-row order."""
        return self.state.rows if self.state is not None else []

    def _plan(self, prompts: list[list[int]], args: list[GenerateArgs]) -> tuple[int, int]:
        """(slot, size) of the cache once prompts join: they end at the running slot, a longer prompt moves the
        running rows right, and every row's remaining budget fits after the slot."""
        _check_prompts(prompts, self.model.args.max_seq_len)
        slot = max(self.slot, _shared_prefix(prompts)[1])
        left = [r.budget - len(r.ids) for r in self.rows] + [_budget(p, a, self.model) for p, a in zip(prompts, args)]
        return slot, slot + max(left)

    def fits(self, prompts: list[list[int]], args: list[GenerateArgs]) -> bool:
        """Whether prompts can join now (the cache stays within max_seq_len slots); a ValueError names a prompt
        that never can."""
        return self._plan(prompts, args)[1] <= self.model.args.max_seq_len

    @torch.inference_mode()
    def add(self, prompts: list[list[int]], args: list[GenerateArgs], seeds: list[int]) -> list[_Row]:
        """Prefill prompts as their own batch and join them to the running rows, each with its own GenerateArgs and
        sampling seed; return their rows. If the prefill fails, the running rows are left as they were."""
        slot, size = self._plan(prompts, args)
        if size > self.model.args.max_seq_len:
            raise ValueError(f"these prompts need {size} cache slots beside the running rows (max_seq_len="
                             f"{self.model.args.max_seq_len}); add them when fits() says so")
        model = self.model
        rows = [_Row(self.tokenizer, a, len(p), _budget(p, a, model), s) for p, a, s in zip(prompts, args, seeds)]
        state, lens = _SamplingState(rows, prompts, model.args.vocab_size), torch.tensor([len(p) for p in prompts])
        running = None
        if self.rows:  # move the running rows to end at the new slot, with room for every budget, and set them aside
            self._move(slot, size)
            running = model.take_cache()
        try:
            logits, span = self._prefill(prompts, size - slot)
            model.resize_cache(slot - span, 0)
        except BaseException:
            model.clear_cache()
            raise
        finally:
            if running is not None:
                model.join_cache(running)
        # a row's slots: its own tokens, or after a shared prefix the same for all (the padding sits inside)
        spans = torch.full_like(lens, span) if _shared_prefix(prompts)[0] else lens
        if self.rows:
            self.logits, self.pos = torch.cat([self.logits, logits]), torch.cat([self.pos, lens])
            self.span = torch.cat([self.span, spans])
            self.state.join(state)
        else:
            self.logits, self.pos, self.span, self.state = logits, lens, spans, state
        self.slot, self.size = slot, size
        return rows

    def _prefill(self, prompts: list[list[int]], room: int) -> tuple[torch.Tensor, int]:
        """Set up a cache for prompts alone, with `room` slots after them; (last logits, slots they fill). A long
        shared prefix runs once and its keys and values are copied to every row, as in score_options."""
        model, (prefix, span) = self.model, _shared_prefix(prompts)
        device = model.tok_embeddings.weight.device
        if not prefix:
            tokens, docs, positions = left_pad(prompts)
            model.setup_cache(len(prompts), span + room)
            return model(tokens.to(device), positions=_to(positions, device), doc_ids=_to(docs, device),
                         last_only=True)[:, -1], span
        model.setup_cache(1, span + room)
        model(torch.tensor([prompts[0][:prefix]], device=device), last_only=True)
        model.select_cache_rows(torch.zeros(len(prompts), dtype=torch.long, device=device))
        tokens, docs, positions = left_pad([p[prefix:] for p in prompts], start=prefix)
        if positions is None:
            positions = prefix + torch.arange(tokens.shape[1]).expand_as(tokens)
        return model(tokens.to(device), start_pos=prefix, positions=positions.to(device), doc_ids=_to(docs, device),
                     last_only=True)[:, -1], span

    @torch.inference_mode()
    def step(self) -> list[tuple[_Row, str]]:
        """Sample one token for every live row; return (row, new text) for rows with new text or that finished
        (row.finish_reason is set). Finished rows leave the batch and the others run one token further."""
        if not self.rows:
            return []
        nxt = self.state.sample(self.logits)
        events, keep = [], []
        for j, (row, tok) in enumerate(zip(self.rows, nxt.tolist())):
            text = row.push(tok)
            if text or row.finish_reason:
                events.append((row, text))
            if not row.finish_reason:
                keep.append(j)
        if not keep:
            self.close()
            return events
        if len(keep) < len(self.rows):  # finished rows leave: later steps compute only the live ones
            idx = torch.tensor(keep)
            self.pos, self.span, nxt = self.pos[idx], self.span[idx], nxt[idx]
            self.state.keep(idx)
            self.model.select_cache_rows(idx.to(self.logits.device))
            last = int(self.span.max())
            if last < self.slot:  # the slots before slot - last are nobody's any more
                self._move(last, self.size - self.slot + last)
        device = self.logits.device
        self.logits = self.model(nxt[:, None].to(device), start_pos=self.slot, positions=self.pos[:, None].to(device),
                                 last_only=True)[:, -1]
        self.pos, self.span, self.slot = self.pos + 1, self.span + 1, self.slot + 1
        return events

    def close(self) -> None:
        """Drop every row and the cache."""
        self.model.clear_cache()
        self.slot, self.size, self.logits, self.state = 0, 0, None, None
        self.pos, self.span = self.pos[:0], self.span[:0]

    def _move(self, slot: int, size: int) -> None:
        """Make the running rows end at cache slot `slot` (adding or dropping slots before them) in `size` slots."""
        front = slot - self.slot
        if front or size != self.size + front:
            self.model.resize_cache(front, size - self.size - front)
        self.slot, self.size = slot, size


class Generator:
    """A model and its tokenizer, ready to generate text and score options."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    @classmethod
    def from_checkpoint(cls, checkpoint=None, adapter=None, dtype: str | torch.dtype | None = "auto",
                        device="cpu", base_quant="none") -> Generator:
        """Load a checkpoint (None = the embedded SmolLM2) and its tokenizer, with an optional LoRA adapter.
        dtype "auto" is precision.py's choice for the device; None keeps the checkpoint's own; base_quant int8 / nf4
        keeps the base weights quantized (quant.py)."""
        from checkpoint import load_tokenizer

        dtype = None if dtype is None else choose_dtype(dtype, device)
        model = load_quantized(checkpoint, base_quant, dtype=dtype, device=device)
        if adapter is not None:
            from lora import load_adapter  # only adapters need lora.py

            load_adapter(model, adapter)
        return cls(model, load_tokenizer(checkpoint))

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Prompt ids; a chat string carries its own special tokens, a plain prompt gets BOS if the model wants it."""
        return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos and not chat)

    def chat(self, conversations: list[list[dict]], args: GenerateArgs | list[GenerateArgs],
             on_text: OnText | None = None, prefixes: list[str] | None = None) -> list[Result]:
        """Replies to conversations ([{"role": ..., "content": ...}]) in the tokenizer's chat template. A reply can
        be made to start with a given text (prefixes[i]): generation continues it, and the result leaves it out."""
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        if prefixes is not None:
            if len(prefixes) != len(prompts):
                raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} conversations")
            prompts = [p + x for p, x in zip(prompts, prefixes)]
        return self.generate_ids([self.encode(p, chat=True) for p in prompts], args, on_text)

    def generate(self, prompts: list[str], args: GenerateArgs | list[GenerateArgs],
                 on_text: OnText | None = None) -> list[Result]:
        """Complete prompts in one batch; `args` applies to every row, or give one per row."""
        return self.generate_ids([self.encode(p) for p in prompts], args, on_text)

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], args: GenerateArgs | list[GenerateArgs],
                     on_text: OnText | None = None) -> list[Result]:
        """Complete token-id prompts. Row i samples from its own generator seeded with args.seed + i (or, with one
        GenerateArgs per row, with that row's seed), so its sample does not depend on the rest of the batch. Prompts
        join one RunningBatch in order, as soon as the cache has room (at once, unless near max_seq_len)."""
        per_row = isinstance(args, (list, tuple))
        row_args = list(args) if per_row else [args] * len(prompts)
        if len(row_args) != len(prompts):
            raise ValueError(f"got {len(row_args)} GenerateArgs for {len(prompts)} prompts")
        if not prompts:
            return []
        _check_prompts(prompts, self.model.args.max_seq_len)
        seeds = [a.seed if per_row else a.seed + i for i, a in enumerate(row_args)]
        batch, rows, index = RunningBatch(self.model, self.tokenizer), [], {}
        try:
            while len(rows) < len(prompts) or batch.rows:
                n, end = len(rows), len(rows)
                while end < len(prompts) and batch.fits(prompts[n:end + 1], row_args[n:end + 1]):
                    end += 1
                if end > n:
                    rows += batch.add(prompts[n:end], row_args[n:end], seeds[n:end])
                    index.update((row, i) for i, row in enumerate(rows[n:], n))
                for row, text in batch.step():
                    if on_text is not None:
                        on_text(index[row], text, row.result() if row.finish_reason else None)
        finally:
            batch.close()
        return [r.result() for r in rows]

    @torch.inference_mode()
    def score_options(self, prompts: str | list[str], options: list[str], batch_tokens: int = 4096) -> torch.Tensor:
        """Summed log-probabilities (n_prompts, n_options) of each option's tokens following each prompt.

        An option's tokens are those of prompt + option after the prompt's own tokens (as lm-evaluation-harness), so
        write options as they continue the prompt (" positive" after "Sentiment:"). The prompts' longest common
        token prefix is computed once per batch; options of one token are read from the last prompt position."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not options or any(not o for o in options):
            raise ValueError(f"options={options!r} must be non-empty strings")
        ctx = [self.encode(p) for p in prompts]
        opts = []  # opts[i][o]: token ids of option o after prompt i
        for i, (p, c) in enumerate(zip(prompts, ctx)):
            if not c:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            opts.append([self.encode(p + o)[len(c):] for o in options])
            if not all(opts[-1]):
                raise ValueError(f"an option of {options!r} adds no tokens after prompt {i}")
        prefix = _common_prefix(ctx) if len(ctx) > 1 else 0
        out = torch.empty(len(prompts), len(options))
        order = sorted(range(len(ctx)), key=lambda i: -len(ctx[i]))  # similar lengths share a batch: less padding
        start = 0
        while start < len(order):
            width = len(ctx[order[start]]) - prefix  # the longest remainder in this batch (sorted: the first)
            n = max(1, min(len(order) - start, batch_tokens // width))
            batch = order[start:start + n]
            out[batch] = self._score_batch([ctx[i] for i in batch], [opts[i] for i in batch], prefix)
            start += n
        return out

    def _score_batch(self, ctx: list[list[int]], opts: list[list[list[int]]], prefix: int) -> torch.Tensor:
        model, device = self.model, self.model.tok_embeddings.weight.device
        n, n_opt = len(ctx), len(opts[0])
        rest = [c[prefix:] for c in ctx]
        T = max(map(len, rest))
        longest = max(len(t) for o in opts for t in o)
        if prefix:  # the shared prefix runs once, then its keys and values are copied to every row
            model.setup_cache(1, prefix + T + longest)
            model(torch.tensor([ctx[0][:prefix]], device=device), last_only=True)
            model.select_cache_rows(torch.zeros(n, dtype=torch.long, device=device))
        else:
            model.setup_cache(n, T + longest)
        try:
            tokens, docs, positions = left_pad(rest, start=prefix)
            if positions is None and prefix:
                positions = prefix + torch.arange(T).expand(n, T)
            logp = model(tokens.to(device), start_pos=prefix, positions=_to(positions, device),
                         doc_ids=_to(docs, device), last_only=True)[:, -1].log_softmax(-1).cpu()  # (n, V)
            first = torch.tensor([[t[0] for t in o] for o in opts])  # (n, n_opt)
            scores = logp.gather(1, first)
            if longest > 1:  # the options' later tokens: each prompt row repeated once per option
                model.select_cache_rows(torch.arange(n, device=device).repeat_interleave(n_opt))
                flat = [t for o in opts for t in o]  # row r = prompt r // n_opt, option r % n_opt
                follow = torch.zeros(len(flat), longest - 1, dtype=torch.long)
                target = torch.zeros_like(follow)
                for r, t in enumerate(flat):
                    follow[r, :len(t) - 1] = torch.tensor(t[:-1])
                    target[r, :len(t) - 1] = torch.tensor(t[1:])
                lens = torch.tensor([len(c) for c in ctx]).repeat_interleave(n_opt)
                pos = lens[:, None] + torch.arange(longest - 1)
                lp = model(follow.to(device), start_pos=prefix + T, positions=pos.to(device)).log_softmax(-1).cpu()
                real = torch.arange(longest - 1)[None, :] < torch.tensor([len(t) - 1 for t in flat])[:, None]
                more = (lp.gather(2, target[..., None])[..., 0] * real).sum(1)
                scores = scores + more.view(n, n_opt)
        finally:
            model.clear_cache()
        return scores


class _SamplingState:
    """Per-row sampling parameters and token counts of the live batch rows, as tensors."""
    PARAMS = ("temperature", "top_k", "top_p", "repetition", "presence", "frequency")

    def __init__(self, rows: list[_Row], prompts: list[list[int]], vocab_size: int):
        self.rows, self.vocab_size = rows, vocab_size
        a = [r.args for r in rows]
        self.temperature = torch.tensor([x.temperature for x in a])
        self.top_k = torch.tensor([x.top_k for x in a])
        self.top_p = torch.tensor([x.top_p for x in a])
        self.repetition = torch.tensor([x.repetition_penalty for x in a])
        self.presence = torch.tensor([x.presence_penalty for x in a])
        self.frequency = torch.tensor([x.frequency_penalty for x in a])
        self.hot = (self.temperature > 0).nonzero()[:, 0]  # batch rows that sample (the others are greedy)
        self.seen = self.counts = None
        if (self.repetition != 1).any():
            self.seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
            for i, p in enumerate(prompts):
                self.seen[i, p] = True
        if (self.presence != 0).any() or (self.frequency != 0).any():
            self.counts = torch.zeros(len(rows), vocab_size)

    def keep(self, keep: torch.Tensor) -> None:
        for name in self.PARAMS:
            setattr(self, name, getattr(self, name)[keep])
        self.rows = [self.rows[j] for j in keep.tolist()]
        self.hot = (self.temperature > 0).nonzero()[:, 0]
        self.seen = None if self.seen is None else self.seen[keep]
        self.counts = None if self.counts is None else self.counts[keep]

    def join(self, other: _SamplingState) -> None:
        """Append the rows of `other` (rows joining the batch). A row without penalties gets neutral ones (penalty
        1 or 0), which leave its logits exactly as they were."""
        for name in self.PARAMS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        for name, dtype in (("seen", torch.bool), ("counts", torch.float32)):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None or theirs is not None:
                setattr(self, name, torch.cat([
                    mine if mine is not None else torch.zeros(len(self.rows), self.vocab_size, dtype=dtype),
                    theirs if theirs is not None else torch.zeros(len(other.rows), self.vocab_size, dtype=dtype)]))
        self.rows = self.rows + other.rows
        self.hot = (self.temperature > 0).nonzero()[:, 0]

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token of every live row from its last logits (B, V); also records them for the penalties."""
        logits = logits.float().cpu()
        if self.seen is not None or self.counts is not None:
            logits = penalize(logits, self.seen, self.counts, self.repetition, self.presence, self.frequency)
        nxt = logits.max(-1).indices  # the first maximum, as argmax, but ~3x faster on the CPU
        hot, probs = self.hot, {}
        if len(hot):
            warped = top_k_top_p(logits[hot] / self.temperature[hot, None], self.top_k[hot], self.top_p[hot])
            for b, p in zip(hot.tolist(), warped.softmax(-1)):
                probs[b] = p
                nxt[b] = torch.multinomial(p, 1, generator=self.rows[b].gen)[0]
        for b, row in enumerate(self.rows):
            if row.constraint is not None:
                nxt[b] = _constrained(row, int(nxt[b]), logits[b], probs.get(b))
            elif row.later is not None:
                nxt[b] = row.steer(int(nxt[b]))
        if self.seen is not None:
            self.seen[torch.arange(len(nxt)), nxt] = True
        if self.counts is not None:
            self.counts[torch.arange(len(nxt)), nxt] += 1
        return nxt


def _constrained(row: _Row, choice: int, logits: torch.Tensor, probs: torch.Tensor | None) -> int:
    """The next token of a row under its JSON constraint: the unconstrained choice when allowed. Otherwise a greedy
    row takes the most likely allowed token; a sampling row draws again without the rejected tokens, which samples
    from its distribution restricted to the allowed ones (and falls back to the most likely allowed token when its
    top-k / top-p support holds none). Most steps check one token; the others check only the tokens whose first byte
    may come next."""
    if row.allows(choice):
        return choice
    maybe = _first_byte_allowed(row)  # a superset of the allowed tokens, from 256 one-byte checks
    if probs is not None:
        probs = probs * maybe
        for _ in range(32):
            probs[choice] = 0.0
            if not probs.any():
                break
            choice = int(torch.multinomial(probs, 1, generator=row.gen)[0])
            if row.allows(choice):
                return choice
        allowed = [t for t in probs.nonzero()[:, 0].tolist() if row.allows(t)]
        if allowed:
            keep = torch.zeros_like(probs)
            keep[allowed] = probs[allowed]
            return int(torch.multinomial(keep, 1, generator=row.gen)[0])
    order = logits.masked_fill(~maybe, float("-inf")).argsort(descending=True, stable=True)[:int(maybe.sum())]
    for t in order.tolist():
        if row.allows(t):
            return t
    raise RuntimeError(f"no token can continue the constrained JSON {row.text[-80:]!r}")


def _first_byte_allowed(row: _Row) -> torch.Tensor:
    """(V,) bool: the tokens whose first byte the row's constraint accepts next, and its stop tokens once the JSON is
    complete."""
    ok = torch.tensor([row.constraint.accepts(bytes([b])) for b in range(256)] + [False])
    maybe = ok[_first_bytes(row.tok)]
    if row.constraint.complete:
        maybe[list(row.tok.stop_ids)] = True
    return maybe


@functools.lru_cache(maxsize=4)
def _first_bytes(tokenizer) -> torch.Tensor:
    """(V,) the first byte of every token's bytes; 256 for special and empty tokens."""
    return torch.tensor([b[0] if b else 256 for b in tokenizer.token_bytes()])


def _check_prompts(prompts: list[list[int]], max_len: int) -> None:
    """Raise ValueError for an empty list or prompt, or one that leaves no room to generate."""
    if not prompts:
        raise ValueError("no prompts: give at least one")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(p) >= max_len:
            raise ValueError(f"a prompt of {len(p)} tokens leaves no room to generate (max_seq_len={max_len})")


def _budget(prompt: list[int], args: GenerateArgs, model) -> int:
    """Most tokens a row may generate: max_new_tokens (twice with json_after, and room for the text written for
    it), within max_seq_len positions (as the prompt alone)."""
    most = 2 * args.max_new_tokens + JSON_AFTER_ROOM if args.json_after else args.max_new_tokens
    return min(most, model.args.max_seq_len - len(prompt))


JSON_AFTER_ROOM = 16  # cache slots for json_after written after a row's free text (a ```json fence is ~4 tokens)


# a shared prompt prefix shorter than this is prefilled with each row: one more forward pass would cost more
MIN_SHARED_PREFIX = 32


def _shared_prefix(prompts: list[list[int]]) -> tuple[int, int]:
    """(shared prefix computed once, or 0; cache slots the prompts fill: prefix + the longest rest)."""
    prefix = _common_prefix(prompts) if len(prompts) > 1 else 0
    prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    return prefix, prefix + max(len(p) - prefix for p in prompts)


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token of every sequence after it."""
    n = min(map(len, seqs)) - 1
    for s in seqs[1:]:
        n = next((k for k in range(n) if s[k] != seqs[0][k]), n)
    return n


def _to(x: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


@dataclass
class CliArgs:
    prompt: str = field(default="", metadata={"help": "the text to complete (or the user message with --chat)",
                                              "required": True})
    checkpoint: str | None = field(default=None, metadata={"help": "model path (Meta, HF or GGUF); none = embedded"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder to apply"})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the model's chat template"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype; auto: precision.py's choice for the device "
                                                         "(bf16 where it is native, fp16 on V100, else fp32)",
                                                 "choices": PRECISIONS})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    base_quant: str = field(default="none", metadata={"help": "keep the base weights int8 or nf4 (quant.py)",
                                                      "choices": list(KINDS)})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default (all cores)"})

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("prompt is empty: pass --prompt \"some text\"")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0")


def main(argv: list[str] | None = None) -> None:
    cargs, gargs = parse_args(argv, CliArgs, GenerateArgs, description=__doc__)
    if cargs.threads:
        torch.set_num_threads(cargs.threads)
    gen = Generator.from_checkpoint(cargs.checkpoint, adapter=cargs.adapter, dtype=cargs.dtype,
                                    device=cargs.device, base_quant=cargs.base_quant)

    def show(row: int, text: str, result: Result | None) -> None:
        print(text, end="", flush=True)

    t0 = time.perf_counter()
    if cargs.chat:
        [res] = gen.chat([[{"role": "user", "content": cargs.prompt}]], gargs, on_text=show)
    else:
        [res] = gen.generate([cargs.prompt], gargs, on_text=show)
    dt = time.perf_counter() - t0
    print()
    print(f"[{res.completion_tokens} tokens in {dt:.2f} s, {res.completion_tokens / dt:.1f} tokens/s, "
          f"finish_reason={res.finish_reason}]", file=sys.stderr)


if __name__ == "__main__":
    main()
