"""data.py: record loading and its errors, prompt/label layout, packing (including the loss of a packed row),
deterministic, resumable and distributed step order."""
import json
import math
import random

import pytest
import torch

from data import (IGNORE, Example, StepLoader, collate, encode_example, encode_records, eval_batches, load_records,
                  make_rows, pack, split_validation)
from model import ModelArgs, Transformer

ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class ByteTokenizer:
    """A stand-in for tokenizer.Tokenizer: one id per UTF-8 byte (+3), BOS 1, EOS 2, pad 0."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

    def __init__(self, chat: bool = False):
        self.chat_template = "chatml" if chat else None

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 3 for b in text.encode()] + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def alpaca_prompt(self, instruction, input=""):
        ctx = ", paired with an input that provides further context" if input else ""
        return ALPACA.format(ctx=ctx, instruction=instruction, input=f"### Input:\n{input}\n\n" if input else "")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<im_start>{m['role']}\n{m['content']}<im_end>\n" for m in messages)
        return text + ("<im_start>assistant\n" if add_generation_prompt else "")


def toy_records(n: int, seed: int = 0) -> list[dict]:
    """Learnable tasks: reverse / upper-case a random word."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 12)))
        if rng.random() < 0.5:
            out.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        else:
            out.append({"instruction": f"Write {word} in capitals.", "input": "", "output": word.upper()})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_json_jsonl_and_seed_tasks(tmp_path, shared_data):
    recs = toy_records(5)
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=1))
    assert load_records(tmp_path / "a.json") == recs
    assert load_records(write_jsonl(tmp_path / "a.jsonl", recs)) == recs
    seeds = load_records(shared_data / "selfinstruct" / "seed_tasks.jsonl")  # {instruction, instances: [...]}
    assert len(seeds) >= 175 and all(set(r) == {"instruction", "input", "output"} for r in seeds)
    alpaca = load_records(shared_data / "selfinstruct" / "alpaca_data_first100.json")
    assert len(alpaca) == 100


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "out', r"b.jsonl:2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "input": "x"}\n',
     r"b.jsonl:3: record has no 'output'"),
    ('[{"instruction": "a", "output": "b"}, {"output": "b"}]', r"record 1: record has no 'instruction'"),
    ('[1]', "expected a JSON object"),
    ('{"instruction": "a", "output": 3}', "'output' must be a string"),
])
def test_bad_files_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_records(path)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_records(tmp_path / "missing.json")


def reference_alpaca(tok, rec, max_len):
    """Stanford Alpaca's preprocess (train.py): tokenize prompt+output+EOS, mask the prompt's length, truncate;
    shifted here to the model's label convention (labels[t] = target of position t)."""
    prompt = [tok.bos_id] + tok.encode(tok.alpaca_prompt(rec["instruction"], rec["input"]))
    full = prompt + tok.encode(rec["output"]) + [tok.eos_id]
    labels = [IGNORE] * len(prompt) + full[len(prompt):]
    return full[:-1][:max_len], labels[1:][:max_len]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_alpaca_examples_match_reference(train_on_inputs):
    tok = ByteTokenizer()
    for rec in toy_records(20):
        ex = encode_example(tok, rec, 512, train_on_inputs)
        tokens, labels = reference_alpaca(tok, rec, 512)
        assert ex.tokens == tokens and ex.tokens[0] == tok.bos_id and ex.labels[-1] == tok.eos_id
        if train_on_inputs:
            assert ex.labels == tokens[1:] + [tok.eos_id]
        else:
            assert ex.labels == labels
            answer = tok.decode([t for t in ex.labels if t != IGNORE])
            assert answer == rec["output"]
        assert ("### Input:" in tok.decode(ex.tokens)) == bool(rec["input"])


def test_truncation_keeps_eos_and_drops_prompts_that_do_not_fit():
    tok = ByteTokenizer()
    rec = {"instruction": "Say it.", "input": "", "output": "x" * 500}
    ex = encode_example(tok, rec, 256)
    assert len(ex.tokens) == len(ex.labels) == 256 and ex.labels[-1] == tok.eos_id
    assert ex.labels[-2] == tok.encode("x")[0]
    examples, dropped = encode_records([rec, {"instruction": "y" * 300, "input": "", "output": "z"}], tok, 256)
    assert len(examples) == 1 and dropped == 1


def test_chat_template_for_chat_models():
    tok = ByteTokenizer(chat=True)
    ex = encode_example(tok, {"instruction": "Hi", "input": "there", "output": "Hello"}, 256)
    text = tok.decode(ex.tokens)
    assert text.startswith("<im_start>user\nHi\n\nthere<im_end>\n<im_start>assistant\n") and "###" not in text
    assert ex.tokens[0] == tok.bos_id and tok.decode([t for t in ex.labels if t != IGNORE]) == "Hello"


def test_pack_fills_rows_and_uses_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(500)]
    rows = pack(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert sum(lengths) / (256 * len(rows)) > 0.95  # best-fit decreasing wastes little
    assert pack(lengths, 256) == rows


def test_packed_row_loss_equals_examples_one_by_one():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259)).eval()
    tok = ByteTokenizer()
    examples, _ = encode_records(toy_records(12), tok, 512)
    rows = make_rows(examples, 512, pack_rows=True)
    assert any(len(r) > 1 for r in rows)
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        packed_sum, packed_n = model(**batch.inputs("cpu"))
        alone = [model(torch.tensor([e.tokens]), labels=torch.tensor([e.labels])) for e in examples]
    ref_sum, ref_n = sum(s for s, _ in alone), sum(n for _, n in alone)
    assert packed_n == ref_n
    assert math.isclose(packed_sum.item() / packed_n.item(), ref_sum.item() / ref_n.item(), rel_tol=1e-5)
    assert batch.n_real == sum(len(e.tokens) for e in examples)
    row = batch.positions[0][batch.doc_ids[0] == 2]
    assert row.tolist() == list(range(len(row)))  # positions restart in each document


def test_unpacked_batches_are_right_padded_without_doc_ids():
    tok = ByteTokenizer()
    examples, _ = encode_records(toy_records(3), tok, 512)
    batch = collate(make_rows(examples, 512, pack_rows=False), tok.pad_id)
    assert batch.doc_ids is None and batch.positions is None
    assert batch.tokens.shape[1] == max(len(e.tokens) for e in examples)
    assert batch.n_real == sum(len(e.tokens) for e in examples)


def test_order_is_deterministic_and_changes_with_epoch():
    tok = ByteTokenizer()
    examples, _ = encode_records(toy_records(40), tok, 512)
    rows = make_rows(examples, 512, pack_rows=False)
    a, b = StepLoader(rows, 2, 2, seed=1), StepLoader(rows, 2, 2, seed=1)
    for _ in range(a.steps_per_epoch + 2):
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a.next(), b.next()))
    assert a.plan(0) == b.plan(0) and a.plan(0) != a.plan(1) and a.plan(0) != StepLoader(rows, 2, 2, seed=2).plan(0)
    assert sorted(i for s in a.plan(0) for i in s) == sorted(set(i for s in a.plan(0) for i in s))  # no repeats
    assert len(a.plan(0)) == 40 // 4 == a.steps_per_epoch


def test_ranks_split_each_step_without_duplicates():
    rows = [[Example(list(range(3, 3 + (i % 17) + 1)), [5] * ((i % 17) + 1))] for i in range(50)]
    for i, r in enumerate(rows):
        r[0].tokens[0] = 1000 + i  # tag each row
    single = StepLoader(rows, micro_batch=4, grad_accum=2, world_size=1, seed=3)
    ranks = [StepLoader(rows, micro_batch=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in range(2)]
    for _ in range(single.steps_per_epoch * 2):  # across an epoch boundary too
        want = sorted(t for b in single.next() for t in b.tokens[:, 0].tolist())
        got = [t for ld in ranks for b in ld.next() for t in b.tokens[:, 0].tolist()]
        assert sorted(got) == want and len(set(got)) == len(got)


def test_resume_position_gives_the_same_batches():
    rows = [[Example([3 + i] * (1 + i % 9), [5] * (1 + i % 9))] for i in range(30)]
    a = StepLoader(rows, 2, 1, seed=0)
    for _ in range(20):
        a.next()
    b = StepLoader(rows, 2, 1, seed=0)
    b.load_state_dict(a.state_dict())
    for _ in range(15):
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a.next(), b.next()))
    with pytest.raises(ValueError, match="seed=0, this run 1"):
        StepLoader(rows, 2, 1, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="lower --micro-batch-size"):
        StepLoader(rows[:3], 2, 2)


def test_validation_split_and_eval_shares():
    items = list(range(100))
    train, val = split_validation(items, 0.1, seed=0)
    assert len(val) == 10 and set(train).isdisjoint(val) and sorted(train + val) == items
    assert split_validation(items, 0.1, seed=0) == (train, val) and split_validation(items, 0.0, 0) == (items, [])
    rows = [[Example([3 + i] * 4, [5] * 4)] for i in range(7)]
    shares = [eval_batches(rows, 2, 2, r, 0) for r in range(2)]
    seen = [t for s in shares for b in s for t in b.tokens[:, 0].tolist()]
    assert sorted(seen) == [3 + i for i in range(7)]


@pytest.mark.reference
def test_chat_examples_match_transformers_on_real_records(shared_data, smollm2_gguf):
    """Our SmolLM2 examples are HF's tokenization of the conversation, and the loss starts at the answer."""
    transformers = pytest.importorskip("transformers")
    from checkpoint import load_tokenizer

    tok = load_tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for rec in load_records(shared_data / "selfinstruct" / "seed_tasks.jsonl")[:40]:
        ex = encode_example(tok, rec, 2048)
        user = f"{rec['instruction']}\n\n{rec['input']}" if rec["input"] else rec["instruction"]
        msgs = [{"role": "user", "content": user}]
        prompt = hf(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
        full = hf(hf.apply_chat_template(msgs + [{"role": "assistant", "content": rec["output"]}], tokenize=False),
                  add_special_tokens=False).input_ids
        assert ex.tokens + [tok.eos_id] == full[:len(ex.tokens) + 1]
        assert full[len(ex.tokens) + 1:] == hf("\n", add_special_tokens=False).input_ids  # only the turn's newline
        assert next(i for i, t in enumerate(ex.labels) if t != IGNORE) == len(prompt) - 1


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = {"instruction": "i", "input": "a\u0085b\u2028c", "output": "o"}
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r["input"] for r in load_records(path)] == ["a\u0085b\u2028c"]
