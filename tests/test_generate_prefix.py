"""generate.RunningBatch with prompts that share a long prefix (a few-shot template, the same instructions): the
prefix is prefilled once, and every row still decodes as it would alone, also joining and leaving a running batch."""
import pytest
import torch

from generate import MIN_SHARED_PREFIX, GenerateArgs, RunningBatch
from tests.test_generate import alone, greedy_alone, ids_of, tiny_generator

SHARED = "Classify the sentiment of each headline as positive or negative. "  # 66 byte tokens, more than 32


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def forward_shapes(gen):
    shapes = []
    hook = gen.model.tok_embeddings.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
    return shapes, hook


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_shared_prefix_is_prefilled_once_and_rows_equal_each_prompt_alone(temperature):
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    rests = ["BTC up", "ETH falls after the Harbor hack", "x"]
    prompts = [ids_of(SHARED + r) for r in rests]
    prefix = len(ids_of(SHARED))
    assert prefix >= MIN_SHARED_PREFIX
    args = [GenerateArgs(max_new_tokens=n, temperature=temperature, top_k=40 * (temperature > 0), seed=7 + i)
            for i, n in enumerate((9, 4, 14))]  # rows leave at different steps: the cache is trimmed under them
    shapes, hook = forward_shapes(gen)
    batched = gen.generate_ids(prompts, args)
    hook.remove()
    longest_rest = max(len(p) - prefix for p in prompts)
    assert shapes[:2] == [(1, prefix), (3, longest_rest)]  # the prefix once, then each row's rest
    for p, a, r in zip(prompts, args, batched):
        assert r.token_ids == alone(gen, p, a) and r.completion_tokens == a.max_new_tokens
        if not temperature:
            assert r.token_ids == greedy_alone(gen, p, a.max_new_tokens)


def test_shared_prefix_rows_joining_a_running_batch_equal_each_prompt_alone():
    gen = tiny_generator(seed=4, allowed="abcdefgh ")
    running = (ids_of("dig deeper"), GenerateArgs(max_new_tokens=40))
    group = [(ids_of(SHARED + r), GenerateArgs(max_new_tokens=n)) for r, n in (("SOL", 6), ("DOGE rallies", 20))]
    late = [(ids_of(SHARED + r), GenerateArgs(max_new_tokens=n)) for r, n in (("a", 3), ("bb", 5))]
    batch, rows = RunningBatch(gen.model, gen.tokenizer), []

    def join(jobs):
        rows.extend(batch.add([p for p, _ in jobs], [a for _, a in jobs], [0] * len(jobs)))

    join([running])
    for _ in range(2):
        batch.step()
    join(group)  # longer than the running row: it moves right; the group's prefix fills slots once
    assert batch.slot == len(ids_of(SHARED)) + len(ids_of("DOGE rallies"))
    for _ in range(8):
        batch.step()  # the SOL row leaves: its span, not its position count, bounds the slots kept
    join(late)
    while batch.rows:
        batch.step()
    for row, (p, a) in zip(rows, [running] + group + late):
        assert row.ids == alone(gen, p, a) == greedy_alone(gen, p, a.max_new_tokens)


def test_a_short_shared_prefix_is_prefilled_with_each_row():
    gen = tiny_generator(seed=5)
    prompts = [ids_of("The market " + r) for r in ("rose", "fell sharply")]
    shapes, hook = forward_shapes(gen)
    gen.generate_ids(prompts, GenerateArgs(max_new_tokens=2))
    hook.remove()
    assert shapes[0] == (2, max(map(len, prompts)))
