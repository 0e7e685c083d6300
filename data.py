"""Instruction data for fine-tuning: Alpaca records -> token ids with loss labels -> rows (packed or one example
each) -> the micro-batches of every optimizer step, in an order fixed by seed and epoch, split across ranks.

    from data import load_records, encode_records, make_rows, StepLoader
    records = load_records("out/selfinstruct/train.jsonl")        # [{"instruction", "input", "output"}, ...]
    examples, dropped = encode_records(records, tokenizer, max_len=512)
    loader = StepLoader(make_rows(examples, 512, pack_rows=True), micro_batch=4, grad_accum=2, pad_id=0)
    micro_batches = loader.next()       # this rank's grad_accum Batches of the next step
    loss_sum, n_tokens = model(**micro_batches[0].inputs("cpu"))

Base models get the Alpaca prompt, chat models (tokenizer.chat_template set) their chat template. Labels are the
already-shifted targets model.forward expects: -100 on the prompt (unless train_on_inputs), EOS always the last
target, even when the output is truncated to max_len. Records may also be Self-Instruct seed tasks
({instruction, instances: [{input, output}, ...]}), one example per instance.
"""
from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from jsonl import parse_jsonl

IGNORE = -100


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object with instruction/input/output, got {type(rec).__name__}")
    for key in ("instruction", "output"):
        if key not in rec:
            raise ValueError(f"{where}: record has no {key!r}; each record needs instruction, output (input optional)")
        if not isinstance(rec[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
    if not isinstance(rec.get("input") or "", str):
        raise ValueError(f"{where}: 'input' must be a string")
    if not isinstance(rec.get("system", ""), str):
        raise ValueError(f"{where}: 'system' must be a string (\"\" = no system turn)")
    out = {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}
    return {**out, "system": rec["system"]} if "system" in rec else out


def _expand(rec, where: str) -> list[dict]:
    """One Alpaca record, or one per instance of a Self-Instruct seed task ({instruction, instances: [...]})."""
    if isinstance(rec, dict) and isinstance(rec.get("instances"), list) and "output" not in rec:
        return [_check_record({"instruction": rec.get("instruction"), **inst}, f"{where} instance {i}")
                for i, inst in enumerate(rec["instances"])]
    return [_check_record(rec, where)]


def load_records(path: str | Path) -> list[dict]:
    """Alpaca records {instruction, input, output} from a JSON array or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}; pass --data with a JSON or JSONL file of Alpaca records")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs Alpaca records {{instruction, input, output}}")
    records = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, rec in enumerate(items):
            records += _expand(rec, f"{path} record {i}")
    else:
        for lineno, rec in parse_jsonl(text, path):
            records += _expand(rec, f"{path}:{lineno}")
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def format_prompt(tokenizer, instruction: str, input: str = "", system: str | None = None) -> str:
    """The text before the response: the chat template for chat models, the Alpaca prompt for base models. A record's
    `system` replaces the template's default system turn (SmolLM2's is 16 tokens that every example pays for)."""
    if tokenizer.chat_template is None:
        return tokenizer.alpaca_prompt(instruction, input)
    content = f"{instruction}\n\n{input}" if input else instruction
    turns = [] if system is None else [{"role": "system", "content": system}]
    return tokenizer.apply_chat_template(turns + [{"role": "user", "content": content}], add_generation_prompt=True)


@dataclass
class Example:
    tokens: list[int]  # model input
    labels: list[int]  # already-shifted targets: labels[t] is what the model should predict at t; -100 = no loss


def encode_example(tokenizer, record: dict, max_len: int, train_on_inputs: bool = False) -> Example | None:
    """BOS + prompt + output + EOS as an Example of at most max_len tokens; None if the prompt leaves no room."""
    prompt = tokenizer.encode(format_prompt(tokenizer, record["instruction"], record.get("input", ""),
                                            record.get("system")))
    if prompt[:1] != [tokenizer.bos_id]:  # chat templates may begin with the BOS token already (ChatML)
        prompt = [tokenizer.bos_id] + prompt
    if len(prompt) >= max_len:
        return None
    ids = prompt + tokenizer.encode(record["output"]) + [tokenizer.eos_id]
    if len(ids) > max_len + 1:
        # keep EOS as the final target: a model that never sees it learns to never stop
        ids = ids[:max_len] + [tokenizer.eos_id]
    labels = ids[1:]
    if not train_on_inputs:
        labels[:len(prompt) - 1] = [IGNORE] * (len(prompt) - 1)
    return Example(ids[:-1], labels)


def encode_records(records: list[dict], tokenizer, max_len: int,
                   train_on_inputs: bool = False) -> tuple[list[Example], int]:
    """(examples, number of records dropped because their prompt alone fills max_len)."""
    examples = [encode_example(tokenizer, r, max_len, train_on_inputs) for r in records]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the examples (at least one if fraction > 0) held out."""
    if fraction <= 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    val = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val])


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group indices into rows of total length <= max_len: best-fit decreasing (few rows, little padding)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))  # the tightest row that still fits
        if j == len(free):
            rows.append([i])
            space, r = max_len - lengths[i], len(rows) - 1
        else:
            space, r = free.pop(j)
            rows[r].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, r))
    return rows


def make_rows(examples: list[Example], max_len: int, pack_rows: bool) -> list[list[Example]]:
    """Rows of one or more examples: one each, or packed into rows of at most max_len tokens."""
    if not pack_rows:
        return [[e] for e in examples]
    return [[examples[i] for i in row] for row in pack([len(e.tokens) for e in examples], max_len)]


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) right-padded input ids
    labels: torch.Tensor  # (B, T) shifted targets, -100 on prompts and padding
    positions: torch.Tensor | None  # (B, T) per-document RoPE positions (packed rows only)
    doc_ids: torch.Tensor | None  # (B, T) document of every token, 0 = padding (packed rows only)
    n_real: int  # tokens that are not padding

    def inputs(self, device) -> dict[str, torch.Tensor]:
        """Keyword arguments for model.forward, on `device`."""
        names = ("tokens", "labels", "positions", "doc_ids")
        return {k: getattr(self, k).to(device, non_blocking=True) for k in names if getattr(self, k) is not None}


def collate(rows: list[list[Example]], pad_id: int) -> Batch:
    """Right-padded (B, T) tensors. Packed rows get per-document positions and doc ids, so no token attends across
    examples; plain rows need neither (causal attention never looks at the right padding)."""
    lengths = [sum(len(e.tokens) for e in row) for row in rows]
    T = max(lengths)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    doc_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, e in enumerate(row, 1):
            n = len(e.tokens)
            tokens[b, t:t + n] = torch.tensor(e.tokens)
            labels[b, t:t + n] = torch.tensor(e.labels)
            positions[b, t:t + n] = torch.arange(n)
            doc_ids[b, t:t + n] = d
            t += n
    packed = any(len(row) > 1 for row in rows)
    return Batch(tokens, labels, positions if packed else None, doc_ids if packed else None, sum(lengths))


class StepLoader:
    """The micro-batches of each optimizer step for one rank, resumable from (epoch, step).

    Every rank computes the same plan: each epoch the rows are shuffled with (seed, epoch) and cut into steps of
    micro_batch * grad_accum * world_size rows (the tail that does not fill a step is skipped that epoch). Rows of
    a step are sorted by length and dealt out to (micro-step, rank), so each rank gets its own share, no row twice,
    and the rows a step trains on do not depend on how it is split: DDP equals one process with the same global
    batch. Without packing, steps are drawn from length-sorted chunks of 32 steps to cut padding."""

    def __init__(self, rows: list[list[Example]], micro_batch: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, pad_id: int = 0, group_by_length: bool = True):
        self.rows, self.micro, self.accum, self.world, self.rank = rows, micro_batch, grad_accum, world_size, rank
        self.seed, self.pad_id, self.group_by_length = seed, pad_id, group_by_length
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = len(rows) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(rows)} training rows cannot fill one step of {self.global_batch} rows "
                             f"(micro-batch x grad-accum x world size); lower --micro-batch-size or --grad-accum")
        self.lengths = [sum(len(e.tokens) for e in row) for row in rows]
        self.epoch, self.step = 0, 0  # position of the next step
        self._plan: tuple[int, list[list[int]]] | None = None

    def plan(self, epoch: int) -> list[list[int]]:
        """Row indices of every step of `epoch` (the same on every rank)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        G = self.global_batch
        order = order[:self.steps_per_epoch * G]
        if self.group_by_length:
            chunk = 32 * G
            order = [i for c in range(0, len(order), chunk)
                     for i in sorted(order[c:c + chunk], key=lambda i: -self.lengths[i])]
        steps = [order[s:s + G] for s in range(0, len(order), G)]
        rng.shuffle(steps)
        return steps

    def step_batches(self, epoch: int, step: int) -> list[Batch]:
        """This rank's grad_accum micro-batches of one step."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.plan(epoch))
        ids = sorted(self._plan[1][step], key=lambda i: (-self.lengths[i], i))
        out = []
        for k in range(self.accum):
            start = (k * self.world + self.rank) * self.micro
            out.append(collate([self.rows[i] for i in ids[start:start + self.micro]], self.pad_id))
        return out

    def next(self) -> list[Batch]:
        batches = self.step_batches(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "global_batch": self.global_batch,
                "n_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "global_batch", "n_rows"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: the checkpoint's data plan has {key}={state[key]}, this run "
                                 f"{mine[key]}; resume with the same --data, --seed, --max-len, --pack and "
                                 f"global batch")
        self.epoch, self.step = state["epoch"], state["step"]


def eval_batches(rows: list[list[Example]], micro_batch: int, world_size: int, rank: int,
                 pad_id: int) -> list[Batch]:
    """This rank's share of the validation rows in fixed, length-sorted batches (sums are reduced across ranks).
    Every rank gets the same number of batches: under FSDP each forward is a set of collectives, so a rank with one
    batch fewer would leave its peers waiting forever. The shortfall is made up with one-token batches whose only
    label is ignored: they add nothing to the loss sum or the token count, so the mean stays exact."""
    mine = sorted(rows[rank::world_size], key=lambda row: -sum(len(e.tokens) for e in row))
    batches = [collate(mine[i:i + micro_batch], pad_id) for i in range(0, len(mine), micro_batch)]
    most = -(-(-(-len(rows) // world_size)) // micro_batch)  # the batches of the rank with the most rows
    filler = Batch(torch.full((1, 1), pad_id, dtype=torch.long), torch.full((1, 1), IGNORE, dtype=torch.long),
                   None, None, 0)
    return batches + [filler] * (most - len(batches))
