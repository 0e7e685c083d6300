"""Steps 2 and 3: is each instruction a classification task, and its instances (input, output).

    from selfinstruct.instances import classify_prompt, instance_prompt, parse_instances
    parse_instances(raw, is_classification=False, truncated=False)   # -> (instances, {reason: count})

As in the paper, classification tasks are generated output-first (a class label, then an input that fits it) so
the labels do not all collapse to one class; other tasks are input-first. The few-shot examples are seed tasks.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from selfinstruct.store import append_jsonl, read_jsonl

CLASSIFY_SAMPLING = dict(max_tokens=3, temperature=0.0, stop=["\n", "Task"])
MAX_INSTANCES = 5
INSTANCE_SAMPLING = dict(temperature=0.0, presence_penalty=1.5, stop=[f"Example {MAX_INSTANCES + 1}", "Task:"])
_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")
_EXAMPLE = re.compile(r"Example\s?\d*\.?")
_SHOT_CHARS = 500  # few-shot examples longer than this cost tokens without teaching the format any better


def _short(task: dict) -> bool:
    if not task["instances"]:
        return False
    inst = task["instances"][0]
    return len(task["instruction"]) + len(inst["input"]) + len(inst["output"]) <= _SHOT_CHARS


def _spread(items: list, n: int) -> list:
    """n items evenly spaced over the list, so few-shot examples cover both the paper's seeds and ours."""
    return items[:: max(1, len(items) // max(n, 1))][:n]


def classify_prompt(seeds: list[dict], instruction: str, n_shots: int = 24) -> str:
    """Few-shot "Is it classification?" prompt: seed tasks with their labels, alternating Yes and No."""
    yes = _spread([t for t in seeds if t["is_classification"]], n_shots // 2)
    no = _spread([t for t in seeds if not t["is_classification"]], n_shots - len(yes))
    shots = [t for pair in zip(no, yes) for t in pair] + no[len(yes):] + yes[len(no):]
    lines = ["Decide whether each task is a classification task, i.e. its answer is one of a small set of labels."]
    for t in shots:
        lines.append(f"\nTask: {t['instruction'].strip()}\nIs it classification? "
                     f"{'Yes' if t['is_classification'] else 'No'}")
    lines.append(f"\nTask: {instruction.strip()}\nIs it classification?")
    return "\n".join(lines)


def parse_classification(text: str) -> bool | None:
    """True for Yes, False for No, None if the answer is neither."""
    word = re.match(r"\W*(\w+)", text)
    answer = word.group(1).lower() if word else ""
    return True if answer == "yes" else False if answer == "no" else None


def instance_prompt(seeds: list[dict], instruction: str, is_classification: bool, n_shots: int = 8) -> str:
    """Output-first prompt for classification tasks, input-first for the others; seed tasks as examples."""
    shots = _spread([t for t in seeds if t["is_classification"] == is_classification and _short(t)], n_shots)
    if is_classification:
        lines = ["For each classification task, give its possible class labels, each followed by an input that "
                 "belongs to that label. If the task needs no input, give only the labels."]
        for t in shots:
            inst = t["instances"][0]
            lines.append(f"\nTask: {t['instruction'].strip()}\nClass label: {inst['output'].strip()}"
                         + (f"\nInput: {inst['input'].strip()}" if inst["input"].strip() else ""))
    else:
        lines = [f"Write examples for each task, up to {MAX_INSTANCES} when the task allows several. If the task "
                 f"needs no input, write the output directly."]
        for t in shots:
            inst = t["instances"][0]
            body = (f"Example 1\nInput: {inst['input'].strip()}\n" if inst["input"].strip() else "")
            lines.append(f"\nTask: {t['instruction'].strip()}\n{body}Output: {inst['output'].strip()}")
    lines.append(f"\nTask: {instruction.strip()}\n")
    return "\n".join(lines)


def _input_output(text: str) -> tuple[str, str] | None:
    """(input, output) of one example's text; None if it has no Output label."""
    parts = _OUTPUT.split(text, maxsplit=1)
    if len(parts) < 2:
        return None
    inp, out = parts
    out = _INPUT.split(out, maxsplit=1)[0]  # a second input/output pair glued on: keep the first
    return re.sub(r"^\s*Input\s*\d*\s*:", "", inp).strip(), out.strip()


def parse_instances(text: str, is_classification: bool, truncated: bool) -> tuple[list[dict], Counter]:
    """Instances of a raw answer and what was dropped, by reason. A truncated answer loses its last instance."""
    dropped: Counter = Counter()
    pairs: list[tuple[str, str]] = []
    if is_classification:
        if "Class label:" not in text:
            dropped["unparseable"] += 1
            return [], dropped
        for chunk in text.split("Class label:")[1:]:
            label, _, inp = chunk.strip().partition("\n")
            pairs.append((re.sub(r"^\s*Input\s*\d*\s*:", "", inp).strip(), label.strip()))
    else:
        chunks = [c for c in _EXAMPLE.split(text) if c.strip()] if _EXAMPLE.search(text) else [text]
        for chunk in chunks:
            pair = _input_output(chunk)
            if pair is None:
                dropped["unparseable"] += 1
            else:
                pairs.append(pair)
    if truncated and pairs:
        pairs.pop()
        dropped["truncated"] += 1
    kept: list[tuple[str, str]] = []
    for inp, out in pairs:
        if not out:
            dropped["empty_output"] += 1
        elif " ".join(inp.lower().split()) == " ".join(out.lower().split()):
            dropped["copies_input"] += 1
        elif inp.endswith(":") or out.endswith(":"):
            dropped["incomplete"] += 1  # a field that ends with a colon was cut off mid-generation
        elif (inp, out) in kept:
            dropped["duplicate"] += 1
        else:
            kept.append((inp, out))
    # one input with two different outputs: the model contradicts itself, so the task's instances are unusable
    inputs = [inp for inp, _ in kept if inp]
    if len(set(inputs)) < len(inputs):
        dropped["conflicting_outputs"] += len(kept)
        kept = []
    return [{"input": i, "output": o} for i, o in kept], dropped


def classify(llm, path: Path, seeds: list[dict], instructions: list[str], chat: bool = True) -> dict[str, bool]:
    """Is-classification for each instruction; one JSONL line per instruction in `path` (resumable)."""
    rows = read_jsonl(path, ("instruction", "is_classification"))
    labels = {row["instruction"]: row["is_classification"] for row in rows}
    todo = [inst for inst in instructions if inst not in labels]

    def ask(inst):
        prompt = classify_prompt(seeds, inst)
        if chat:
            return llm.chat([{"role": "user", "content": prompt}], **CLASSIFY_SAMPLING)
        return llm.complete(prompt, **CLASSIFY_SAMPLING)

    for inst, answer in zip(todo, llm.imap(ask, todo, desc="classify")):
        label = parse_classification(answer.text)
        # the paper counts anything but "Yes" as No; we do too, and record that the answer was unclear
        labels[inst] = bool(label)
        append_jsonl(path, {"instruction": inst, "raw": answer.text, "is_classification": bool(label),
                            "unclear": label is None})
    return labels


def generate_instances(llm, path: Path, seeds: list[dict], labels: dict[str, bool], chat: bool = True) -> list[dict]:
    """Instances for each instruction; one JSONL line per instruction in `path` (resumable)."""
    rows = read_jsonl(path, ("instruction", "instances", "dropped"))
    done = {row["instruction"] for row in rows}
    todo = [inst for inst in labels if inst not in done]

    def ask(inst):
        prompt = instance_prompt(seeds, inst, labels[inst])
        # the classification prompt is longer, so its answer gets fewer tokens (as in the paper)
        params = dict(INSTANCE_SAMPLING, max_tokens=300 if labels[inst] else 350)
        if chat:
            return llm.chat([{"role": "user", "content": prompt}], **params)
        return llm.complete(prompt, **params)

    for inst, answer in zip(todo, llm.imap(ask, todo, desc="instances")):
        instances, dropped = parse_instances(answer.text, labels[inst], answer.finish_reason == "length")
        if not answer.text.strip():
            dropped = Counter(empty_answer=1)
        row = {"instruction": inst, "is_classification": labels[inst], "raw": answer.text,
               "finish_reason": answer.finish_reason, "instances": instances, "dropped": dict(dropped)}
        append_jsonl(path, row)
        rows.append(row)
    return rows
