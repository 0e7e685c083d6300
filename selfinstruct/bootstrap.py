"""Step 1, bootstrap: ask the model for new instructions from 8 in-context ones, parse, filter, repeat.

    from selfinstruct.bootstrap import encode_prompt, parse_instructions, filter_reason
    encode_prompt(["Summarise the article.", ...])      # "Come up with a series of tasks:\\n1. ...\\n9."

The rules are the paper's (Wang et al. 2022, yizhongw/self-instruct), with three fixes for crypto text:
capitalise only the first letter (`str.capitalize` turns BTC into Btc), let domain names through the keyword
filter (The Graph, a company that files for bankruptcy), and reject exact duplicates that ROUGE-L cannot see.
"""
from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path

from selfinstruct.rouge import RougeFilter
from selfinstruct.store import append_jsonl, read_jsonl

# Instructions a text-only model cannot serve (the paper's list); matched as whole words, case-insensitively.
KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
            "plot", "go to")
_KEYWORD_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in KEYWORDS) + r")\b", re.IGNORECASE)
# Crypto-news phrases that contain those words but ask for nothing visual: the indexing protocol The Graph (GRT)
# and "files" as a verb (files for bankruptcy, files a lawsuit, files with the SEC).
DOMAIN_EXCEPTIONS = re.compile(
    r"\bthe graph\b(?:\s*\(grt\))?|\bgraph\s*\(grt\)|\bfiles?\s+(?:for|a|an|with|suit|charges|to)\b|"
    r"\bfiled\b", re.IGNORECASE)
# Bootstrap sampling (the paper's): stop at a blank line or at item 16. A chat model may open with a sentence
# and a blank line before its list, so chat requests stop at item 16 only.
SAMPLING = dict(max_tokens=1024, temperature=0.7, top_p=0.5, presence_penalty=2.0, frequency_penalty=0.0)
STOP = ["\n\n", "\n16", "16.", "16 ."]
CHAT_STOP = ["\n16", "16.", "16 ."]
_ITEM_SPLIT = re.compile(r"\n\d+\s?\. ")
_NUMBERED_LINE = re.compile(r"^\s*\d+\s?\.", re.MULTILINE)


def encode_prompt(instructions: list[str]) -> str:
    """The paper's prompt: a numbered list of in-context instructions, ending with the next number to continue."""
    lines = ["Come up with a series of tasks:"]
    for i, inst in enumerate(instructions, 1):
        inst = re.sub(r"\s+", " ", inst).strip().rstrip(":")
        lines.append(f"{i}. {inst}")
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def capitalise_first(text: str) -> str:
    """Upper-case only the first character: `str.capitalize` would also lower BTC to Btc and SEC to Sec."""
    return text[:1].upper() + text[1:]


def parse_instructions(text: str, next_number: int, chat: bool) -> list[str] | None:
    """The instructions of a numbered-list answer, whitespace collapsed; None if there is no numbered list.

    A completion continues the prompt right after "<next_number>."; a chat answer restates the numbers and may
    open with a sentence of its own, which is dropped.
    """
    if chat:
        first = _NUMBERED_LINE.search(text)
        if first is None:
            return None
        text = text[first.start():].lstrip()
    else:
        text = f"{next_number}.{text}"
    items = _ITEM_SPLIT.split("\n" + text)
    # items[0] is "" unless the first item's number is written without the space the split needs ("9.Foo")
    items[0] = re.sub(r"^\s*\d+\s?\.", "", items[0])
    return [capitalise_first(re.sub(r"\s+", " ", item).strip()) for item in items if item.strip()]


def has_blocked_keyword(instruction: str, domain_exceptions: bool = True) -> bool:
    """Whether a keyword of the paper's list occurs as a whole word, ignoring the crypto phrases that contain one."""
    if domain_exceptions:
        instruction = DOMAIN_EXCEPTIONS.sub(" ", instruction)
    return _KEYWORD_RE.search(instruction) is not None


def filter_reason(instruction: str, domain_exceptions: bool = True) -> str | None:
    """None if the instruction passes the paper's heuristic filters, else the name of the first one it fails."""
    n_words = len(instruction.split())
    if n_words <= 3:
        return "too_short"
    if n_words > 150:
        return "too_long"
    if has_blocked_keyword(instruction, domain_exceptions):
        return "keyword"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None


def sample_prompt(rng: random.Random, human: list[str], crypto: list[str], machine: list[str],
                  n_total: int, n_machine: int, n_crypto: int) -> list[str]:
    """In-context instructions: n_machine from the machine pool (once it has them), n_crypto of ours, the rest
    from the paper's human seeds (from more of ours when there are none), shuffled."""
    chosen = rng.sample(machine, min(n_machine, len(machine)))
    n_mine = n_crypto if human else n_total - len(chosen)  # without human seeds, ours fill the prompt
    chosen += rng.sample(crypto, min(n_mine, len(crypto), n_total - len(chosen)))
    chosen += rng.sample(human, n_total - len(chosen)) if human else []
    rng.shuffle(chosen)
    return chosen


def _judge(answer, next_number: int, chat: bool, filt: RougeFilter) -> tuple[list[str], Counter]:
    """The instructions of one answer that pass every filter (added to `filt`), and the rejections by reason."""
    rejected: Counter = Counter()
    if not answer.text.strip():
        rejected["empty_answer"] += 1
        return [], rejected
    if answer.finish_reason == "length":
        rejected["truncated_answer"] += 1  # the paper drops a response cut off by the length limit
        return [], rejected
    items = parse_instructions(answer.text, next_number, chat)
    if items is None:
        rejected["no_numbered_list"] += 1
        return [], rejected
    kept = []
    for inst in items:
        reason = filter_reason(inst) or filt.reject_reason(inst)
        if reason:
            rejected[reason] += 1
        else:
            filt.add(inst)
            kept.append(inst)
    return kept, rejected


def bootstrap(llm, path: Path, human: list[str], crypto: list[str], *, target: int, batch_size: int = 5,
              n_prompt: int = 8, n_machine: int = 2, n_crypto: int = 3, threshold: float = 0.7, chat: bool = True,
              patience: int = 5, seed: int = 0) -> list[str]:
    """Generate machine instructions until `target` are kept; one JSONL line per request in `path` (resumable)."""
    filt = RougeFilter(threshold)
    for inst in human + crypto:
        filt.add(inst)
    machine: list[str] = []
    done = read_jsonl(path, ("kept", "rejected"))
    for row in done:
        for inst in row["kept"]:
            filt.add(inst)
            machine.append(inst)

    def ask(job):
        i, shown = job
        prompt = encode_prompt(shown)
        params = dict(SAMPLING, stop=CHAT_STOP if chat else STOP, seed=seed + i)
        if chat:
            return llm.chat([{"role": "user", "content": prompt}], **params)
        return llm.complete(prompt, **params)

    request = len(done)
    # requests go out in fixed batches whose prompts all sample the pool as it was when the batch started; a
    # resumed run rebuilds the same prompts (and hits the LLM cache) even if it stopped in the middle of a batch
    batch_start = request - request % batch_size
    pool_size = sum(len(r["kept"]) for r in done[:batch_start])
    idle = 0
    while len(machine) < target and idle < patience:
        before = len(machine)
        pool = machine[:pool_size]
        jobs = [(i, sample_prompt(random.Random(f"{seed}:bootstrap:{i}"), human, crypto, pool,
                                  n_prompt, n_machine, n_crypto))
                for i in range(request, batch_start + batch_size)]
        for (i, shown), answer in zip(jobs, llm.imap(ask, jobs)):
            kept, rejected = _judge(answer, len(shown) + 1, chat, filt)
            machine += kept
            append_jsonl(path, {"request": i, "prompt_instructions": shown, "raw": answer.text,
                                "finish_reason": answer.finish_reason, "kept": kept, "rejected": dict(rejected)})
        request = batch_start = batch_start + batch_size
        pool_size = len(machine)
        idle = idle + 1 if len(machine) == before else 0
    return machine
