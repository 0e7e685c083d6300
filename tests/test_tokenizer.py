"""tokenizer.py against transformers (GGUF byte-level BPE, chat template) and sentencepiece (LLaMA's tokenizer.model).

    .venv/bin/python -m pytest tests/test_tokenizer.py -x -q
"""
import json

import pytest

from checkpoint import embedded_model_path, load_tokenizer
from tokenizer import Tokenizer

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def real_texts(shared_data) -> list[str]:
    """300 real texts: seed tasks (instruction, input, output), user-oriented tasks and Alpaca-GPT4 answers."""
    d = shared_data / "selfinstruct"
    texts = []
    for line in (d / "seed_tasks.jsonl").read_text().splitlines()[:100]:
        r = json.loads(line)
        texts.append(f"{r['instruction']}\n{r['instances'][0]['input']}\n{r['instances'][0]['output']}")
    for line in (d / "user_oriented_instructions.jsonl").read_text().splitlines()[:100]:
        r = json.loads(line)
        texts.append(f"{r['instruction']}\n\n{r['instances'][0]['input']}  {r['instances'][0]['output']}")
    texts += [r["output"] for r in json.loads((d / "alpaca_gpt4_en_demo999.json").read_text())[:100]]
    return texts


EDGE_CASES = ["", " ", "  two  spaces\n\n\ttab\r\n", "naïve café 日本語 😀 ∑", "1234567 + 3.14159 = ?",
              "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|><|im_end|><|endoftext|>", "don't we'll I'M",
              "BTC/USD fell 4.2% to $61,250; ETH 0x1f9840a85d5aF5bf1D1762F925BDADdC4201F984"]


def test_bpe_encodes_real_text_like_transformers(ours, hf_tok, shared_data):
    texts = real_texts(shared_data) + EDGE_CASES
    assert len(texts) >= 300
    mismatched = [t[:60] for t in texts if ours.encode(t) != hf_tok.encode(t, add_special_tokens=False)]
    assert not mismatched
    assert all(ours.decode(ours.encode(t)) == t for t in texts)
    assert all(ours.decode(ids := ours.encode(t)) == hf_tok.decode(ids) for t in texts[::10])


def test_token_bytes_spell_the_encoded_text(ours, shared_data):
    tb = ours.token_bytes()
    assert len(tb) == ours.vocab_size and tb[ours.token_to_id("<|im_end|>")] is None and tb[ours.eos_id] is None
    for text in real_texts(shared_data) + [t for t in EDGE_CASES if "<|" not in t]:
        assert b"".join(tb[i] for i in ours.encode(text)) == text.encode()


def test_token_bytes_of_the_saved_tokenizer_json(ours, tmp_path):
    ours.save_hf(tmp_path)
    assert load_tokenizer(tmp_path).token_bytes() == ours.token_bytes()


def test_special_tokens(ours, hf_tok):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert ours.vocab_size == len(hf_tok) == 49152
    assert ours.encode("<|im_start|>") == [1] and ours.token_to_id("<|im_end|>") == 2
    assert {ours.eos_id, ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")} <= ours.stop_ids
    assert ours.encode("hi", bos=True, eos=True) == [ours.bos_id, *ours.encode("hi"), ours.eos_id]
    assert not ours.add_bos  # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Is BTC up today?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_matches_the_gguf_template(ours, hf_tok, add_generation_prompt):
    assert ours.chat_template == "chatml"
    for conv in CONVERSATIONS:
        want = hf_tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
        got = ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        assert got == want
        assert ours.encode(got) == hf_tok.encode(want, add_special_tokens=False)


def test_alpaca_prompt(ours):
    """Stanford Alpaca's PROMPT_DICT, spelled out here from tatsu-lab/stanford_alpaca train.py."""
    assert ours.alpaca_prompt("Name a coin.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a coin.\n\n### Response:")
    assert ours.alpaca_prompt("Classify the sentiment.", "BTC soars") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nClassify the sentiment.\n\n"
        "### Input:\nBTC soars\n\n### Response:")


def test_bad_messages(ours):
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        ours.apply_chat_template([{"role": "bot", "content": "x"}])
    base = load_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        base.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="chat_template='x'"):
        load_tokenizer(chat_template="x")


# ------------------------------------------------------------------------------------------------- SentencePiece
@pytest.fixture(scope="module")
def sp_path(tmp_path_factory, shared_data_dir):
    """A small BPE SentencePiece model trained with LLaMA's options (byte fallback, split digits, no normalization)."""
    spm = pytest.importorskip("sentencepiece")
    lines = []
    for line in (shared_data_dir / "selfinstruct" / "seed_tasks.jsonl").read_text().splitlines():
        r = json.loads(line)
        lines += [r["instruction"], r["instances"][0]["output"]]
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    return d / "tokenizer.model"


@pytest.fixture(scope="module")
def shared_data_dir():
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def test_sentencepiece_matches_sentencepiece(sp_path, shared_data):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    tok = load_tokenizer(sp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 400)
    assert tok.add_bos and tok.stop_ids == {2} and tok.chat_template is None
    for text in real_texts(shared_data)[::3] + EDGE_CASES[2:5]:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_sentencepiece_token_bytes_spell_the_encoded_text(sp_path, shared_data):
    tok = load_tokenizer(sp_path)
    tb = tok.token_bytes()
    assert tb[tok.bos_id] is None and tb[tok.eos_id] is None
    assert {tb[tok.token_to_id(f"<0x{b:02X}>")] for b in (10, 195, 255)} == {b"\n", b"\xc3", b"\xff"}
    for text in real_texts(shared_data)[::3] + EDGE_CASES[2:5]:
        # SentencePiece marks the start of the text as a word start (U+2581): one space more than the text
        assert b"".join(tb[i] for i in tok.encode(text)) == b" " + text.encode()


def test_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_text("SGVsbG8= 0\n")  # a line of a LLaMA-3 tiktoken file
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_llama2_chat_matches_metas_encoding(sp_path):
    """Meta's chat_completion: bos + "[INST] user [/INST] answer " + eos per turn, the system text in the first turn."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    tok = load_tokenizer(sp_path, chat_template="llama2")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Price of BTC?"}]
    first = "<<SYS>>\nBe brief.\n<</SYS>>\n\nHi there"
    want = [1] + sp.encode(f"[INST] {first} [/INST] Hello! ") + [2] + [1] + sp.encode("[INST] Price of BTC? [/INST]")
    assert tok.encode(tok.apply_chat_template(conv)) == want
    with pytest.raises(ValueError, match="alternating"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_gguf_sentencepiece_vocab_matches_sentencepiece(sp_path, shared_data, tmp_path):
    """A LLaMA-2 style GGUF ("llama" tokenizer: pieces, scores, types) encodes like the tokenizer.model it came from."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    n = sp.vocab_size()
    kind = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)  # noqa: E731
                      else 5 if sp.is_unused(i) else 1)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "t.gguf")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, n, True)
    for text in real_texts(shared_data) + EDGE_CASES[2:5]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
