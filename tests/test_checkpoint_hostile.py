"""Bad checkpoints, adapters and tokenizers, as a hostile but fair user hands them over: every error names the file
and, where there is one, the key or tensor, and says what to do (issue 14: every error names its file).

    .venv/bin/python -m pytest tests/test_checkpoint_hostile.py -x -q
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import load_model, load_tokenizer, save_model
from lora import LoraArgs, apply_lora, load_adapter, save_adapter
from model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


@pytest.fixture
def saved(tmp_path):
    """A tiny model saved as HF and Meta folders, and a LoRA adapter for it."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    save_model(model, tmp_path / "hf", format="hf")
    save_model(model, tmp_path / "meta", format="meta")
    apply_lora(model, LoraArgs(r=4, targets=("wq", "wv")))
    save_adapter(model, LoraArgs(r=4, targets=("wq", "wv")), ARGS, tmp_path / "adapter")
    return tmp_path


def cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def raises(exc, *patterns: str):
    """pytest.raises for an error whose message matches every pattern (each a regex)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{p})" for p in patterns))


# ----------------------------------------------------------------------------------------- cut-short files
def test_truncated_safetensors_names_the_file(saved):
    f = saved / "hf" / "model.safetensors"
    cut(f)
    with raises(ValueError, re.escape(str(f)), "not a readable safetensors file", "download or copy it again"):
        load_model(saved / "hf")
    cut(f, keep=0.0001)  # not even the header
    with raises(ValueError, re.escape(str(f)), "not a readable safetensors file"):
        load_model(saved / "hf")


def test_truncated_adapter_names_the_file(saved):
    f = saved / "adapter" / "adapter.safetensors"
    cut(f)
    with raises(ValueError, re.escape(str(f)), "not a readable safetensors file"):
        load_adapter(Transformer(ARGS), saved / "adapter")


def test_truncated_torch_checkpoint_names_the_file(saved):
    f = saved / "meta" / "consolidated.00.pth"
    cut(f)
    with raises(ValueError, re.escape(str(f)), "not a readable torch checkpoint"):
        load_model(saved / "meta")


# ---------------------------------------------------------------------------------------- unsafe pickles
def test_unsafe_pickle_is_refused_in_our_words(saved):
    """torch's own message suggests weights_only=False, i.e. running the file's code; ours must not."""
    f = saved / "meta" / "consolidated.00.pth"
    state = torch.load(f)
    state["evil"] = print  # any global beyond tensors: unpickling it could call anything
    torch.save(state, f)
    with pytest.raises(ValueError) as e:
        load_model(saved / "meta")
    msg = str(e.value)
    assert str(f) in msg and "refused" in msg and "`print`" in msg and "tensors only" in msg
    assert "weights_only" not in msg and "trust" in msg


@pytest.mark.parametrize("content, pattern", [
    ({"model": {"tok_embeddings.weight": torch.zeros(2)}}, r"key 'model' holds a dict, not a tensor"),
    ([torch.zeros(2)], r"holds a list, not a dict of tensors"),
])
def test_pickle_that_is_not_a_flat_state_dict(saved, content, pattern):
    f = saved / "meta" / "consolidated.00.pth"
    torch.save(content, f)
    with raises(ValueError, re.escape(str(f)), pattern):
        load_model(saved / "meta")


# ------------------------------------------------------------------------------- missing and mis-shaped tensors
def test_missing_tensor_names_file_and_tensor(saved):
    f = saved / "hf" / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f)
    with raises(ValueError, re.escape(str(saved / "hf")), r"tensor layers\.1\.feed_forward\.w3\.weight is missing"):
        load_model(saved / "hf")
    g = saved / "meta" / "consolidated.00.pth"
    state = torch.load(g)
    del state["layers.0.attention_norm.weight"]
    torch.save(state, g)
    with raises(ValueError, re.escape(str(g)), r"tensor layers\.0\.attention_norm\.weight is missing"):
        load_model(saved / "meta")


def test_gguf_missing_tensor_names_file_and_tensor(saved, tmp_path):
    """A GGUF export without one tensor (the file our writer makes, less blk.0.ffn_up)."""
    import gguf

    src = save_model(load_model(saved / "hf"), tmp_path / "m.gguf", format="gguf",
                     tokenizer_src=tiny_tokenizer(tmp_path))
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "llama")
    for field in r.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")):
            sub = field.types[-1] if len(field.types) > 1 else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub)
    for t in r.tensors:
        if t.name != "blk.0.ffn_up.weight":
            w.add_tensor(t.name, t.data.reshape([int(n) for n in reversed(t.shape)]), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with raises(ValueError, re.escape(str(tmp_path / "cut.gguf")),
                r"tensor layers\.0\.feed_forward\.w3\.weight is missing"):
        load_model(tmp_path / "cut.gguf")


def tiny_tokenizer(tmp_path):
    """A 256-token byte-level BPE tokenizer.json (no merges) for a 256-row embedding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from tokenizer import _bytes_to_unicode

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_bytes_to_unicode())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_misshaped_adapter_tensor_names_file_and_tensor(saved):
    f = saved / "adapter" / "adapter.safetensors"
    state = load_file(f)
    state["layers.1.attention.wv.lora_A"] = torch.zeros(8, 64)
    save_file(state, f)
    with raises(ValueError, re.escape(str(f)), r"tensor layers\.1\.attention\.wv\.lora_A has shape \(8, 64\)",
                r"needs \(4, 64\)"):
        load_adapter(Transformer(ARGS), saved / "adapter")
    del state["layers.1.attention.wv.lora_A"]
    save_file(state, f)
    with raises(ValueError, re.escape(str(f)), r"tensor layers\.1\.attention\.wv\.lora_A is missing"):
        load_adapter(Transformer(ARGS), saved / "adapter")
    f.unlink()
    with raises(FileNotFoundError, re.escape(str(f)), "is missing"):
        load_adapter(Transformer(ARGS), saved / "adapter")


# ------------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("change, pattern", [
    ({"hidden_size": "64"}, r"key 'hidden_size' = '64' must be an integer"),
    ({"rope_theta": "x"}, r"key 'rope_theta' = 'x' must be a number"),
    ({"vocab_size": None}, r"key 'vocab_size' is missing"),
    ({"tie_word_embeddings": "no"}, r"key 'tie_word_embeddings' = 'no' must be true or false"),
    ({"num_attention_heads": 5}, r"n_heads=5 must divide dim=64"),
])
def test_bad_config_json_names_file_and_key(saved, change, pattern):
    f = saved / "hf" / "config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | change))
    with raises(ValueError, re.escape(str(f)), pattern):
        load_model(saved / "hf")


def test_bad_params_json_names_file_and_key(saved):
    f = saved / "meta" / "params.json"
    params = json.loads(f.read_text())
    f.write_text(json.dumps(params | {"norm_eps": [1e-5]}))
    with raises(ValueError, re.escape(str(f)), r"key 'norm_eps' = \[1e-05\] must be a number"):
        load_model(saved / "meta")
    f.write_text("{not json")
    with raises(ValueError, re.escape(str(f)), "invalid JSON"):
        load_model(saved / "meta")


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: {"lora": c["lora"]}, r"key 'model' is missing"),
    (lambda c: c | {"lora": [4]}, r"key 'lora' is not an object"),
    (lambda c: c | {"lora": c["lora"] | {"rank": 4}}, r"unknown key lora\.rank; LoraArgs has"),
    (lambda c: c | {"model": c["model"] | {"dimm": 4}}, r"unknown key model\.dimm; ModelArgs has"),
    (lambda c: c | {"lora": c["lora"] | {"r": 0}}, r"lora: LoRA r=0 must be a positive integer"),
    (lambda c: c | {"lora": c["lora"] | {"targets": ["wz"]}}, r"lora: unknown LoRA target\(s\) \['wz'\]"),
])
def test_bad_adapter_config_names_file_and_key(saved, edit, pattern):
    f = saved / "adapter" / "adapter_config.json"
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))
    with raises(ValueError, re.escape(str(f)), pattern):
        load_adapter(Transformer(ARGS), saved / "adapter")


# ------------------------------------------------------------------------------------------------- tokenizers
def test_bad_tokenizer_files_name_the_file(saved):
    f = saved / "hf" / "tokenizer.json"
    f.write_text('{"version": "1.0", "model": ')
    with raises(ValueError, re.escape(str(f)), "not a tokenizers tokenizer.json"):
        load_tokenizer(saved / "hf")
    tiny = tiny_tokenizer(saved)
    (tiny / "tokenizer_config.json").write_text("[1, 2")
    with raises(ValueError, re.escape(str(tiny / "tokenizer_config.json")), "invalid JSON"):
        load_tokenizer(tiny)
    sp = saved / "sp" / "tokenizer.model"
    sp.parent.mkdir()
    sp.write_bytes(b"\x00garbage")
    with raises(ValueError, re.escape(str(sp)), "not a SentencePiece model"):
        load_tokenizer(sp)
