"""generate.py: batched decoding equals rows alone and full forwards, sampling filters and penalties against
transformers' logits processors, stops, streaming of multi-byte text, seeds, option scoring, and the CLI."""
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from constrain import JsonConstraint
from generate import GenerateArgs, Generator, RunningBatch, _constrained, _Row, main, penalize, top_k_top_p
from llm import validate
from model import ModelArgs, Transformer


class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258), bos 1, eos 2: small, and multi-byte characters span several tokens."""
    bos_id, eos_id, pad_id, vocab_size, add_bos, chat_template = 1, 2, 0, 259, True, "chatml"

    def __init__(self, stop_ids=(2,)):
        self.stop_ids = set(stop_ids)

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode()] + [2] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def token_bytes(self):
        return [None] * 3 + [bytes([b]) for b in range(256)]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>" * add_generation_prompt


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: a second thread gains nothing and, on a loaded machine, costs an OpenMP barrier per op
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def ids_of(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


def tiny_generator(seed=0, allowed: str | None = None, stop_ids=(2,), **kw) -> Generator:
    """A random tiny LLaMA over bytes. With `allowed`, it only ever prefers those characters' tokens (their output
    rows are scaled up, all others zeroed), so its text is readable and stop strings can be picked from it."""
    torch.manual_seed(seed)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, max_seq_len=256)
    model = Transformer(ModelArgs(**{**args, **kw})).eval()
    if allowed is not None:
        keep = torch.zeros(259, dtype=torch.bool)
        keep[ids_of(allowed)] = True
        with torch.no_grad():
            model.output.weight[~keep] = 0
            model.output.weight[keep] *= 20
    return Generator(model, ByteTokenizer(stop_ids))


def greedy_alone(gen: Generator, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding: argmax of a full forward (no cache) over the whole sequence, token by token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(gen.model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_decoding_equals_argmax_of_full_forwards():
    gen = tiny_generator()
    prompt = ids_of("The market")
    [res] = gen.generate_ids([prompt], GenerateArgs(max_new_tokens=20))
    assert res.finish_reason == "length" and res.completion_tokens == 20
    assert res.token_ids == greedy_alone(gen, prompt, 20)


def test_batched_mixed_lengths_equal_each_prompt_alone():
    gen = tiny_generator(seed=1)
    prompts = ["a", "Bitcoin rose", "ETH fell 5% on Monday", "hi"]
    args = [GenerateArgs(max_new_tokens=n) for n in (12, 3, 12, 7)]  # rows leave the batch at different steps
    sizes = []  # rows in each forward: finished rows must leave the batch
    hook = gen.model.tok_embeddings.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    batched = gen.generate(prompts, args)
    hook.remove()
    # prefill + a forward per token but the last (12 tokens): rows 1 and 3 leave after their 3rd and 7th token
    assert sizes == [4] * 3 + [3] * 4 + [2] * 5
    for p, a, r in zip(prompts, args, batched):
        [alone] = gen.generate([p], a)
        assert r.token_ids == alone.token_ids and r.text == alone.text
        assert r.token_ids == greedy_alone(gen, gen.encode(p), a.max_new_tokens)
        assert r.prompt_tokens == len(p.encode()) + 1  # + BOS


def alone(gen: Generator, prompt: list[int], args: GenerateArgs) -> list[int]:
    return gen.generate_ids([prompt], [args])[0].token_ids


def cache_slots(gen: Generator) -> int:
    return gen.model.layers[0].attention.cache.k.shape[2]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rows_joining_mid_decode_equal_each_prompt_alone(temperature):
    gen = tiny_generator(seed=2, allowed="abcdefgh ")  # no EOS: every row runs its whole budget
    sampled = dict(temperature=temperature, top_k=40 * (temperature > 0))
    first = [(ids_of("bull run"), GenerateArgs(max_new_tokens=24, seed=3, **sampled))]
    longer = (ids_of("a prompt longer than the running rows"), GenerateArgs(max_new_tokens=10, seed=4, **sampled))
    shorter = (ids_of("x"), GenerateArgs(max_new_tokens=5, seed=5, repetition_penalty=1.5, **sampled))
    big = (ids_of("dig"), GenerateArgs(max_new_tokens=60, seed=6, frequency_penalty=0.5, **sampled))
    batch, rows = RunningBatch(gen.model, gen.tokenizer), []

    def join(jobs):
        rows.extend(batch.add([p for p, _ in jobs], [a for _, a in jobs], [a.seed for _, a in jobs]))

    join(first)
    assert (batch.slot, batch.size) == (8, 8 + 24)
    for _ in range(3):
        batch.step()
    assert batch.slot == 8 + 3 < len(longer[0]) == 37
    join([longer, shorter])  # the running row moves right, to end where the longer prompt ends
    assert (batch.slot, batch.size) == (37, 37 + 24 - 3) and cache_slots(gen) == 58
    for _ in range(6):
        batch.step()  # the shorter row finishes and leaves after 5 tokens
    assert len(batch.rows) == 2 and batch.slot == 37 + 6
    join([big])  # its 60-token budget needs more cache slots than the running rows
    assert (batch.slot, batch.size) == (43, 43 + 60) and cache_slots(gen) == 103
    while len(batch.rows) == 3:
        batch.step()  # the longer row leaves after its 10th token: the slots only its prompt used are dropped
    assert batch.slot == int(batch.pos.max()) == 8 + 3 + 6 + 4  # the first row's tokens: prompt + 13 steps
    while batch.rows:
        batch.step()
    for row, (p, a) in zip(rows, first + [longer, shorter, big]):
        assert row.ids == alone(gen, p, a) and len(row.ids) == a.max_new_tokens
        if not temperature and a.repetition_penalty == 1 and not a.frequency_penalty:
            assert row.ids == greedy_alone(gen, p, a.max_new_tokens)  # and as full forwards without a cache
    assert gen.model.layers[0].attention.cache is None  # the last row to leave frees the cache


def test_prompts_that_do_not_fit_the_cache_together_join_later():
    gen = tiny_generator(seed=5, allowed="abcdefgh ", max_seq_len=64)
    prompts = [ids_of("short one."), ids_of("a much longer prompt, of forty tokens...")]
    args = [GenerateArgs(max_new_tokens=60), GenerateArgs(max_new_tokens=20)]  # 40 + 54 slots exceed max_seq_len
    sizes = []
    hook = gen.model.tok_embeddings.register_forward_hook(lambda m, inp, out: sizes.append(tuple(inp[0].shape)))
    res = gen.generate_ids(prompts, args)
    hook.remove()
    # row 1 joins as soon as row 0's 24 tokens left fit beside it (after 30 steps), and leaves first
    assert sizes[0] == (1, 10) and sizes.index((1, 40)) == 1 + 30 and sizes[-1] == (1, 1)
    assert [r.completion_tokens for r in res] == [54, 20]  # row 0 keeps its budget as alone (64 - 10)
    for p, a, r in zip(prompts, args, res):
        assert r.token_ids == alone(gen, p, a)


def test_eos_ends_a_row_and_is_not_in_the_text():
    gen = tiny_generator(seed=0)
    free = gen.generate_ids([ids_of("news")], GenerateArgs(max_new_tokens=16))[0].token_ids
    k = next(k for k in range(3, 16) if free[k] not in free[:k])  # a token first sampled at step k
    gen.tokenizer.stop_ids = {2, free[k]}
    [res] = gen.generate_ids([ids_of("news")], GenerateArgs(max_new_tokens=16))
    assert res.finish_reason == "stop" and res.token_ids == free[:k + 1]
    assert res.text == ByteTokenizer().decode(free[:k])


def test_stop_strings_trim_the_text_and_streaming_matches():
    gen = tiny_generator(seed=3, allowed="abcdefgh ")
    prompts = ["abc", "hello there"]
    free = gen.generate(prompts, GenerateArgs(max_new_tokens=30))
    stop = free[1].text[10:13]  # three characters from the middle of row 1's text
    cut = free[1].text.index(stop)
    streamed = {0: [], 1: []}
    finished = {}

    def on_text(row, text, result):
        assert row not in finished, "no text after a row's final call"
        streamed[row].append(text)
        if result is not None:
            finished[row] = result.finish_reason

    res = gen.generate(prompts, GenerateArgs(max_new_tokens=30, stop=(stop, "zzz")), on_text=on_text)
    assert res[1].text == free[1].text[:cut] and res[1].finish_reason == "stop"
    assert stop not in res[0].text
    for i in (0, 1):
        assert "".join(streamed[i]) == res[i].text and finished[i] == res[i].finish_reason


def test_streaming_multibyte_text_never_splits_a_character():
    text = "Ether €3,000 — up 5%! 🚀 ok"
    row = _Row(ByteTokenizer(), GenerateArgs(stop=("ok",)), prompt_tokens=1, budget=100, seed=0)
    pieces = [row.push(t) for t in ids_of(text) + [2]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "Ether €3,000 — up 5%! 🚀 " == row.text and row.finish_reason == "stop"
    assert pieces[ids_of(text).index(ids_of("€")[0])] == ""  # the first byte of € waits for the rest


def test_seed_reproducibility_and_rows_independent_of_batch():
    gen = tiny_generator(seed=4)
    args = GenerateArgs(max_new_tokens=16, temperature=1.0, seed=7)
    prompts = ["bull", "bear market"]
    a, b = gen.generate(prompts, args), gen.generate(prompts, args)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    other = gen.generate(prompts, GenerateArgs(max_new_tokens=16, temperature=1.0, seed=8))
    assert [r.token_ids for r in a] != [r.token_ids for r in other]
    # row 1 of the batch samples with seed + 1, exactly as the prompt alone with that seed
    [alone] = gen.generate(["bear market"], GenerateArgs(max_new_tokens=16, temperature=1.0, seed=8))
    assert alone.token_ids == a[1].token_ids


def test_top_k_one_is_greedy_and_sampling_stays_in_support():
    gen = tiny_generator(seed=5)
    greedy = gen.generate(["abc", "de"], GenerateArgs(max_new_tokens=10))
    topk1 = gen.generate(["abc", "de"], GenerateArgs(max_new_tokens=10, temperature=1.5, top_k=1))
    assert [r.token_ids for r in topk1] == [r.token_ids for r in greedy]
    # top_p tiny: only the most likely token survives, so sampling is greedy too
    nucleus = gen.generate(["abc", "de"], GenerateArgs(max_new_tokens=10, temperature=1.0, top_p=1e-6))
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


@pytest.mark.reference
@pytest.mark.parametrize("k, p", [(5, 1.0), (0, 0.7), (20, 0.5), (1, 0.9)])
def test_top_k_top_p_match_transformers(k, p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    ours = top_k_top_p(logits, torch.full((4,), k), torch.full((4,), p))
    ref = logits
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[~ours.isinf()], ref[~ref.isinf()])
    probs = ours.softmax(-1)
    assert (probs[ours.isinf()] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(4))
    if k:
        assert ((probs > 0).sum(-1) <= k).all()
    # per-row settings: each row equals the same filter applied alone
    mixed = top_k_top_p(logits, torch.tensor([k, 0, 3, 0]), torch.tensor([p, 1.0, 1.0, 0.3]))
    for r, (kr, pr) in enumerate([(k, p), (0, 1.0), (3, 1.0), (0, 0.3)]):
        assert torch.equal(mixed[r], top_k_top_p(logits[r:r + 1], torch.tensor([kr]), torch.tensor([pr]))[0])


@pytest.mark.reference
def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits, ids = torch.randn(2, 50), torch.randint(0, 50, (2, 12))
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    zero = torch.zeros(2)
    ours = penalize(logits, seen, None, torch.full((2,), 1.3), zero, zero)
    torch.testing.assert_close(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 5)
    counts = torch.tensor([[0.0, 1, 3, 0, 2]])
    out = penalize(logits, None, counts, torch.ones(1), torch.tensor([0.5]), torch.tensor([0.25]))
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence (OpenAI's "Parameter details")
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, -1.0]]


def test_penalties_change_the_next_token_as_defined():
    gen = tiny_generator(seed=6)
    prompt = ids_of("aaab")
    with torch.no_grad():
        logits = gen.model(torch.tensor([prompt]))[0, -1]
    first_free = int(logits.argmax())
    seen = torch.zeros(1, 259, dtype=torch.bool)
    seen[0, prompt] = True
    penalised = penalize(logits[None], seen, None, torch.tensor([5.0]), torch.zeros(1), torch.zeros(1))[0]
    [res] = gen.generate_ids([prompt], GenerateArgs(max_new_tokens=1, repetition_penalty=5.0))
    assert res.token_ids == [int(penalised.argmax())]
    # frequency penalty: after the first token, the next step subtracts 2 from that token's logit
    [res] = gen.generate_ids([prompt], GenerateArgs(max_new_tokens=2, frequency_penalty=2.0))
    assert res.token_ids[0] == first_free
    with torch.no_grad():
        step2 = gen.model(torch.tensor([prompt + [first_free]]))[0, -1]
    step2[first_free] -= 2.0
    assert res.token_ids[1] == int(step2.argmax())


def full_forward_logprob(gen: Generator, prompt: str, option: str) -> float:
    ctx = gen.encode(prompt)
    opt = gen.encode(prompt + option)[len(ctx):]
    with torch.no_grad():
        logp = gen.model(torch.tensor([ctx + opt]))[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(opt))


@pytest.mark.parametrize("options", [["x", "y", "z"], [" negative", " neutral", " positive", " n"]])
def test_score_options_equals_full_forward_log_probs(options):
    gen = tiny_generator(seed=7)
    shared = "Classify the sentiment of the tweet. Tweet: "
    prompts = [shared + t + "\nSentiment:" for t in ("BTC up", "ETH down hard today", "meh", "SOL flat again")]
    prompts.append("a different prompt without the prefix:")
    for batch_tokens in (4096, 40):  # one batch; several batches of sorted lengths
        scores = gen.score_options(prompts, options, batch_tokens=batch_tokens)
        ref = torch.tensor([[full_forward_logprob(gen, p, o) for o in options] for p in prompts])
        torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(scores.argmax(1), ref.argmax(1))
    # a shared prefix across all prompts (the sentiment case) goes through the prefix cache
    scores = gen.score_options(prompts[:4], options)
    torch.testing.assert_close(scores, ref[:4], atol=1e-4, rtol=1e-4)
    one = gen.score_options(prompts[2], options)
    torch.testing.assert_close(one, ref[2:3], atol=1e-4, rtol=1e-4)


def test_bad_inputs_name_the_problem():
    gen = tiny_generator()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate_ids([[5], []], GenerateArgs())
    with pytest.raises(ValueError, match="max_seq_len=256"):
        gen.generate_ids([[5] * 256], GenerateArgs())
    with pytest.raises(ValueError, match="top_p=1.5"):
        GenerateArgs(top_p=1.5)
    with pytest.raises(ValueError, match="options"):
        gen.score_options(["a"], ["x", ""])


def test_cli_streams_a_tiny_saved_checkpoint(tmp_path, smollm2_gguf, capsys):
    from checkpoint import load_tokenizer, save_model

    vocab = load_tokenizer(smollm2_gguf).vocab_size
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                  tie_embeddings=True, max_seq_len=256))
    save_model(model, tmp_path / "tiny", format="hf", tokenizer_src=smollm2_gguf)
    main(["--checkpoint", str(tmp_path / "tiny"), "--prompt", "Bitcoin is", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    [ref] = Generator.from_checkpoint(tmp_path / "tiny").generate(["Bitcoin is"], GenerateArgs(max_new_tokens=8))
    assert out.out == ref.text + "\n" and "finish_reason=" in out.err
    main(["--checkpoint", str(tmp_path / "tiny"), "--prompt", "Hi", "--chat", "--max-new-tokens", "4",
          "--temperature", "0.8", "--top-k", "20", "--stop", "a,b"])
    assert "tokens/s" in capsys.readouterr().err
    # --adapter: a LoRA adapter with non-zero B changes the output, and the CLI applies it like from_checkpoint
    from checkpoint import load_model
    from lora import LoraArgs, apply_lora, save_adapter

    largs = LoraArgs(r=4, targets=("wq", "wv", "w2"))
    model = apply_lora(load_model(tmp_path / "tiny"), largs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    save_adapter(model, largs, model.args, tmp_path / "adapter")
    main(["--checkpoint", str(tmp_path / "tiny"), "--adapter", str(tmp_path / "adapter"), "--prompt", "Bitcoin is",
          "--max-new-tokens", "8"])
    [adapted] = Generator.from_checkpoint(tmp_path / "tiny", adapter=tmp_path / "adapter").generate(
        ["Bitcoin is"], GenerateArgs(max_new_tokens=8))
    assert capsys.readouterr().out == adapted.text + "\n" and adapted.token_ids != ref.token_ids


@pytest.mark.parametrize("argv, message", [(["--prompt", "x", "--top-p", "2"], "top_p=2.0 must be in (0, 1]"),
                                           (["--prompt", "x", "--max-new-tokens", "many"], "--max-new-tokens"),
                                           (["--max-new-tokens", "3"], "--prompt"),
                                           (["--prompt", "x", "--dtype", "int3"], "invalid choice")])
def test_cli_bad_flags_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- JSON constraint
CHOICE = {"type": "object", "required": ["coin", "up"], "additionalProperties": False,
          "properties": {"coin": {"enum": ["BTC", "ETH", "SOL"]}, "up": {"type": "boolean"}, "note": {"type": "null"}}}


def allowed_by_brute_force(tok, c: JsonConstraint) -> list[int]:
    """Every token a constraint allows next, checked over the whole vocabulary (the reference for sampling)."""
    tb = tok.token_bytes()
    return [t for t in range(tok.vocab_size)
            if (c.complete if t in tok.stop_ids else bool(tb[t]) and c.accepts(tb[t]))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_greedy_takes_the_most_likely_allowed_token_of_a_full_forward(seed):
    gen = tiny_generator(seed=seed)
    prompt = ids_of("Answer in JSON:")
    [res] = gen.generate_ids([prompt], GenerateArgs(max_new_tokens=230, json_schema=json.dumps(CHOICE)))
    c, seq = JsonConstraint(CHOICE), list(prompt)
    with torch.no_grad():
        for tok in res.token_ids:
            logits = gen.model(torch.tensor([seq]))[0, -1]
            allowed = allowed_by_brute_force(gen.tokenizer, c)
            assert tok == max(allowed, key=lambda t: logits[t])
            c.feed(bytes([tok - 3]))
            seq.append(tok)
    # the enum and boolean values close the object within the whitespace limits: the text is the whole JSON
    assert res.finish_reason == "stop" and c.closed
    assert validate(json.loads(res.text), CHOICE) == []


def test_json_rows_sample_within_the_schema_beside_free_rows():
    gen = tiny_generator(seed=4)
    constrained = GenerateArgs(max_new_tokens=230, temperature=1.0, json_schema=json.dumps(CHOICE), seed=7)
    free = GenerateArgs(max_new_tokens=12, temperature=1.0, seed=7)
    prompts = [ids_of("JSON please"), ids_of("Anything"), ids_of("More JSON")]
    results = gen.generate_ids(prompts, [constrained, free, constrained])
    for r in results[::2]:
        assert r.finish_reason == "stop" and validate(json.loads(r.text), CHOICE) == []
    assert results[1].token_ids == gen.generate_ids([prompts[1]], free)[0].token_ids  # the free row is untouched


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_constrained_rows_joining_mid_decode_equal_each_prompt_alone(temperature):
    gen = tiny_generator(seed=5)
    schema = json.dumps(CHOICE)
    jobs = [(ids_of("JSON"), GenerateArgs(max_new_tokens=200, temperature=temperature, seed=1, json_schema=schema)),
            (ids_of("free text"), GenerateArgs(max_new_tokens=30, temperature=temperature, seed=2)),
            (ids_of("a longer prompt, then JSON"),
             GenerateArgs(max_new_tokens=200, temperature=temperature, seed=3, json_schema=schema))]
    batch = RunningBatch(gen.model, gen.tokenizer)
    rows = batch.add([jobs[0][0]], [jobs[0][1]], [1])
    for k, job in enumerate(jobs[1:], 2):
        for _ in range(4):
            batch.step()
        rows += batch.add([job[0]], [job[1]], [k])
    while batch.rows:
        batch.step()
    for row, (p, a) in zip(rows, jobs):
        assert row.ids == alone(gen, p, a)
    for row in rows[::2]:
        assert row.finish_reason == "stop" and validate(json.loads(row.text), CHOICE) == []


class _FakeTokenizer:
    stop_ids: set = set()

    def token_bytes(self):
        return [b"A", b"Ax", b"B", b"Bx", b"C"]  # tokens 0 and 1 share a first byte, and so do 2 and 3


class _FakeRow:
    """A row whose constraint allows exactly the tokens in `allowed` (and accepts their first bytes)."""
    tok = _FakeTokenizer()

    def __init__(self, allowed, seed=0):
        self.allowed, self.gen, self.text = set(allowed), torch.Generator().manual_seed(seed), ""
        first = {self.tok.token_bytes()[t][:1] for t in allowed}
        self.constraint = SimpleNamespace(complete=False, accepts=lambda data: data in first)

    def allows(self, token):
        return token in self.allowed


def test_constrained_sampling_is_the_distribution_restricted_to_allowed_tokens():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    row, draws = _FakeRow({1, 3, 4}), torch.Generator().manual_seed(1)
    n = 4000
    counts = Counter(_constrained(row, int(torch.multinomial(probs, 1, generator=draws)), probs.log(), probs)
                     for _ in range(n))
    assert set(counts) == {1, 3}  # a zero-probability token is never drawn, even if allowed
    assert abs(counts[1] / n - 0.75) < 0.03 and abs(counts[3] / n - 0.25) < 0.03
    logits = torch.tensor([3.0, 1.0, 2.0, 0.5, 2.5])
    assert _constrained(_FakeRow({1, 3, 4}), 0, logits, None) == 4  # greedy: the most likely allowed token
    # no allowed token inside the top-k / top-p support: the most likely allowed one outside it
    assert _constrained(_FakeRow({3}), 0, logits, torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0])) == 3


def test_json_after_writes_freely_then_the_fence_then_the_json_under_the_schema():
    """A row that never writes json_after itself: max_new_tokens of free text (as plain greedy decoding), then the
    fence written for it, then the JSON exactly as a constrained row continuing that whole text decodes it, with a
    budget of its own; beside a plain row, which is untouched."""
    gen, schema = tiny_generator(seed=6, max_seq_len=1024), json.dumps(CHOICE)
    prompt, fence = ids_of("Think, then JSON:"), ids_of("\n```json")
    after = GenerateArgs(max_new_tokens=230, json_schema=schema, json_after="```json")
    free = GenerateArgs(max_new_tokens=12)
    row, plain = gen.generate_ids([prompt, ids_of("Anything")], [after, free])
    think = greedy_alone(gen, prompt, 230)
    [ref] = gen.generate_ids([prompt + think + fence], GenerateArgs(max_new_tokens=230, json_schema=schema))
    assert row.token_ids == think + fence + ref.token_ids and row.finish_reason == ref.finish_reason == "stop"
    assert row.text == gen.tokenizer.decode(think + fence) + ref.text and validate(json.loads(ref.text), CHOICE) == []
    assert plain.token_ids == gen.generate_ids([ids_of("Anything")], free)[0].token_ids


def test_json_after_writes_the_fence_in_place_of_a_stop_token():
    first = greedy_alone(tiny_generator(seed=6), ids_of("Think:"), 1)[0]
    gen = tiny_generator(seed=6, stop_ids=(first,))  # the model's first choice now ends the text
    schema, fence = json.dumps(CHOICE), ids_of("\n```json")
    [row] = gen.generate_ids([ids_of("Think:")], GenerateArgs(max_new_tokens=230, json_schema=schema,
                                                              json_after="```json"))
    [ref] = gen.generate_ids([ids_of("Think:") + fence], GenerateArgs(max_new_tokens=230, json_schema=schema))
    assert row.token_ids == fence + ref.token_ids and row.text == "\n```json" + ref.text
    assert validate(json.loads(ref.text), CHOICE) == []


def test_json_schema_argument_errors():
    with pytest.raises(ValueError, match="json_schema is not JSON"):
        GenerateArgs(json_schema="{type: object}")
    with pytest.raises(ValueError, match="anyOf"):
        GenerateArgs(json_schema='{"anyOf": [{"type": "string"}]}')
    with pytest.raises(ValueError, match="json_after needs json_schema"):
        GenerateArgs(json_after="```json")
    with pytest.raises(ValueError, match="json_after and stop do not combine"):
        GenerateArgs(json_after="```json", json_schema="{}", stop=("\n",))


@pytest.mark.slow
def test_json_schema_on_the_embedded_model_gives_valid_answers(smollm2_gguf):
    gen = Generator.from_checkpoint()
    schema = {"type": "object", "required": ["coin", "sentiment"], "additionalProperties": False,
              "properties": {"coin": {"type": "string"}, "sentiment": {"enum": ["positive", "negative", "neutral"]}}}
    chats = [[{"role": "user", "content": f"Which coin does this headline name first, and is it good news? {h} "
                                          "Answer with a JSON object."}]
             for h in ("Ether falls 8% after the Harbor exchange hack.", "Solana and Bitcoin rally on ETF hopes.")]
    free = gen.chat(chats, GenerateArgs(max_new_tokens=64))
    assert not any(text.lstrip().startswith("{") for text in (r.text for r in free))  # unconstrained: prose
    greedy = GenerateArgs(max_new_tokens=64, json_schema=json.dumps(schema))
    sampled = GenerateArgs(max_new_tokens=64, temperature=0.8, seed=3, json_schema=json.dumps(schema))
    results = gen.chat(chats * 2, [greedy, greedy, sampled, sampled])
    for r in results:
        assert r.finish_reason == "stop", r.text
        assert validate(json.loads(r.text), schema) == []
    assert [json.loads(r.text)["coin"] for r in results[:2]] == ["Ether", "Solana"]
