"""lora.py against peft on transformers' LlamaForCausalLM built from the same tiny weights, and its own equivalences."""
import json

import pytest
import torch

import checkpoint
from checkpoint import hf_to_meta, permute_to_hf
from lora import (HF_NAMES, LoRALinear, LoraArgs, _LoRAFunction, apply_lora, dropout_mask, export_peft, load_adapter,
                  lora_modules, lora_state_dict, main, merge_lora, save_adapter, strip_lora, unmerge_lora)
from model import ModelArgs, Transformer
from tests.test_model import CONFIGS, hf_llama

ALL = tuple(HF_NAMES)


def pair(targets=ALL, r=4, alpha=8.0, rslora=False, config="gqa", seed=0):
    """(our model with random A and B, the HF model with the same base weights, LoraArgs)."""
    args = ModelArgs(**CONFIGS[config])
    hf = hf_llama(args, seed=seed)
    ours = Transformer(args).eval()
    ours.load_state_dict(hf_to_meta(hf.state_dict(), args))
    largs = LoraArgs(r=r, alpha=alpha, dropout=0.0, targets=targets, rslora=rslora)
    apply_lora(ours, largs)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.normal_(0, 0.1)  # B = 0 would hide every mistake in B's layout
    return ours, hf, largs


def peft_model(hf, largs):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=largs.r, lora_alpha=largs.alpha, lora_dropout=0.0, use_rslora=largs.rslora,
                          target_modules=[HF_NAMES[t].rsplit(".", 1)[-1] for t in largs.targets])
    return peft.get_peft_model(hf, cfg).eval()


def peft_pairs(ours, pm):
    """(our LoRALinear, peft's module of the same linear, f) for every adapter, f putting a (out, r) B in HF layout."""
    args = ours.args
    for name, m in lora_modules(ours).items():
        target = name.rsplit(".", 1)[-1]
        if target == "output":
            mod = pm.base_model.model.lm_head
        else:
            mod = pm.base_model.model.model.layers[int(name.split(".")[1])].get_submodule(HF_NAMES[target])
        heads = {"wq": args.n_heads, "wk": args.kv_heads}.get(target)
        yield m, mod, (lambda b, h=heads: b if h is None else permute_to_hf(b, h))


def copy_into_peft(ours, pm):
    """Write our A and B into peft's modules by hand (independent of export_peft's file layout)."""
    with torch.no_grad():
        for m, mod, to_hf in peft_pairs(ours, pm):
            mod.lora_A["default"].weight.copy_(m.lora_A)
            mod.lora_B["default"].weight.copy_(to_hf(m.lora_B))


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


TOKENS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.reference
@pytest.mark.parametrize("targets, rslora", [(("wq", "wv"), False), (ALL, False), (("wk", "w2", "output"), True)])
def test_logits_match_peft(targets, rslora):
    ours, hf, largs = pair(targets, rslora=rslora)
    pm = peft_model(hf, largs)
    copy_into_peft(ours, pm)
    assert (logits(ours, TOKENS) - logits(pm, TOKENS)).abs().max().item() < 1e-4


@pytest.mark.reference
@pytest.mark.parametrize("targets", [("wq", "wv"), ALL])
def test_training_gradients_match_peft(targets):
    """The training path (fp32: _LoRAFunction, the hand-written RMSNorm backward, chunked cross-entropy) gives
    peft's loss and adapter gradients on transformers."""
    ours, hf, largs = pair(targets)
    pm = peft_model(hf, largs)
    copy_into_peft(ours, pm)
    ours.train(), pm.train()
    tokens = torch.randint(0, 256, (3, 13), generator=torch.Generator().manual_seed(1))
    loss_sum, n = ours(tokens[:, :-1], labels=tokens[:, 1:])
    (loss_sum / n).backward()
    ref = pm(input_ids=tokens, labels=tokens).loss
    ref.backward()
    assert abs((loss_sum / n).item() - ref.item()) < 1e-5
    for m, mod, to_hf in peft_pairs(ours, pm):
        torch.testing.assert_close(m.lora_A.grad, mod.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(to_hf(m.lora_B.grad), mod.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_lora_function_matches_autograd_of_the_formula():
    """_LoRAFunction (the fp32 training path, dropout mask included) against autograd of the plain expression."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=False)
    m = LoRALinear(lin, r=4, alpha=8, dropout=0.3).train()
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(2, 7, 48, requires_grad=True)
    g = torch.randn(2, 7, 40)
    torch.manual_seed(5)
    m(x).backward(g)
    ours = [t.grad.clone() for t in (x, m.lora_A, m.lora_B)]
    x.grad = m.lora_A.grad = m.lora_B.grad = None
    torch.manual_seed(5)
    mask, keep = dropout_mask(x, 0.3)  # the same draw as the forward above
    y = lin(x) + ((x * mask) @ m.lora_A.T * (m.scale / keep)) @ m.lora_B.T
    y.backward(g)
    for a, b in zip(ours, (x.grad, m.lora_A.grad, m.lora_B.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    d = dict(dtype=torch.float64)
    args = (torch.randn(2, 3, 6, **d, requires_grad=True), torch.randn(5, 6, **d), torch.randn(2, 6, **d,
            requires_grad=True), torch.randn(5, 2, **d, requires_grad=True), torch.rand(2, 3, 6) > 0.3, 1.7)
    assert torch.autograd.gradcheck(_LoRAFunction.apply, args)
    assert torch.autograd.gradcheck(_LoRAFunction.apply, args[:4] + (None, 1.7))


def test_dropout_mask_rate_and_rounding():
    torch.manual_seed(0)
    x = torch.empty(1000, 1000)
    for p in (0.05, 0.1, 0.5):
        mask, keep = dropout_mask(x, p)
        assert mask.shape == x.shape and mask.dtype == torch.bool
        assert abs(keep - (1 - p)) <= 0.5 / 65536  # p rounded to a multiple of 2^-16
        assert abs(mask.float().mean().item() - keep) < 0.002  # 4 sigma at 10^6 draws
    mask, keep = dropout_mask(torch.empty(7, 3), 0.0)  # odd sizes; p = 0 keeps everything
    assert mask.all() and keep == 1.0
    assert dropout_mask(x, 0.999999)[1] > 0  # the largest p still keeps a lane in 65536


@pytest.mark.reference
def test_merged_equals_peft_merge_and_unload():
    ours, hf, largs = pair()
    pm = peft_model(hf, largs)
    copy_into_peft(ours, pm)
    merged_hf = pm.merge_and_unload()
    bare = strip_lora(ours)
    assert not lora_modules(bare)
    ref = hf_to_meta(merged_hf.state_dict(), bare.args)
    for k, w in bare.state_dict().items():
        assert (w - ref[k]).abs().max().item() < 1e-5, k
    assert (logits(bare, TOKENS) - logits(merged_hf, TOKENS)).abs().max().item() < 1e-4


@pytest.mark.reference
@pytest.mark.parametrize("config", ["gqa", "mha"])
def test_exported_adapter_loads_in_peft(tmp_path, config):
    peft = pytest.importorskip("peft")
    ours, hf, largs = pair(ALL, config=config)
    export_peft(ours, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    assert (logits(ours, TOKENS) - logits(pm, TOKENS)).abs().max().item() < 1e-4


def test_b_zero_equals_base_and_only_adapters_train():
    ours, _, _ = pair()
    base = Transformer(ours.args).eval()
    base.load_state_dict({k.replace(".base.", "."): v for k, v in ours.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.zero_()
    assert torch.equal(logits(ours, TOKENS), logits(base, TOKENS))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * (2 * 7 + 1)  # 7 linears per layer, 2 layers, plus output


def test_init_is_kaiming_a_and_zero_b():
    lin = torch.nn.Linear(64, 32, bias=False)
    m = LoRALinear(lin, r=4, alpha=8, dropout=0.1)
    bound = 1 / 64 ** 0.5  # kaiming_uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
    assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 3
    assert not m.lora_B.any() and m.scale == 2.0 and not m.base.weight.requires_grad
    assert LoRALinear(lin, r=4, alpha=8, rslora=True).scale == 4.0


def test_dropout_zeroes_inputs_at_rate_p_and_keeps_the_mean():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, bias=False)
    m = LoRALinear(lin, r=64, alpha=64, dropout=0.25)
    m.lora_A.data, m.lora_B.data = torch.eye(64), torch.eye(64)  # the update is scale * dropout(x): visible directly
    x = torch.randn(1, 64) + 3.0
    with torch.no_grad():
        delta = torch.stack([m(x) - lin(x) for _ in range(4000)])  # (4000, 1, 64)
        assert torch.allclose(m.eval()(x) - lin(x), x, atol=1e-5)  # eval: no dropout
    kept = delta != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # P(keep) = 1 - p
    torch.testing.assert_close(delta[kept], (x / 0.75).expand_as(delta)[kept], atol=1e-5, rtol=1e-5)  # x / (1 - p)
    assert (delta.mean(0) - x).abs().max().item() < 0.2  # unbiased


def test_merge_unmerge_round_trip():
    ours, _, _ = pair()
    before = logits(ours, TOKENS)
    merge_lora(ours)
    assert all(m.merged for m in lora_modules(ours).values())
    torch.testing.assert_close(logits(ours, TOKENS), before, atol=1e-5, rtol=1e-5)
    unmerge_lora(ours)
    torch.testing.assert_close(logits(ours, TOKENS), before, atol=1e-5, rtol=1e-5)


def test_merge_unties_a_tied_output():
    ours, _, _ = pair(("wq", "output"), config="tied")
    before, emb = logits(ours, TOKENS), ours.tok_embeddings.weight.clone()
    merge_lora(ours)
    assert torch.equal(ours.tok_embeddings.weight, emb) and not ours.args.tie_embeddings
    torch.testing.assert_close(logits(ours, TOKENS), before, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    ours, _, largs = pair(("wq", "wk", "w3"))
    save_adapter(ours, largs, ours.args, tmp_path / "a")
    state = lora_state_dict(ours)
    assert len(state) == 12 and all(v.abs().sum() > 0 for k, v in state.items())  # never saved empty
    fresh = Transformer(ours.args).eval()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in ours.state_dict().items() if "lora_" not in k})
    assert load_adapter(fresh, tmp_path / "a") == largs
    assert torch.equal(logits(fresh, TOKENS), logits(ours, TOKENS))


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target.*'wqq'"):
        LoraArgs(targets=("wq", "wqq"))
    with pytest.raises(ValueError, match="r=0"):
        LoraArgs(r=0)
    ours, _, largs = pair()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(ours, largs)
    save_adapter(ours, largs, ours.args, tmp_path / "a")
    other = Transformer(ModelArgs(**CONFIGS["mha"]))
    with pytest.raises(ValueError, match="another model.*n_heads: adapter 8 vs model 4"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(other, tmp_path / "missing")


def test_merge_cli_writes_a_merged_checkpoint(tmp_path):
    if not hasattr(checkpoint, "save_model") or not hasattr(checkpoint, "load_model"):
        pytest.skip("checkpoint.save_model / load_model not written yet")
    ours, _, largs = pair(("wq", "wk"))
    base = Transformer(ours.args)
    base.load_state_dict({k.replace(".base.", "."): v for k, v in ours.state_dict().items() if "lora_" not in k})
    checkpoint.save_model(base, tmp_path / "base", format="meta")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")  # merge copies the base's tokenizer files
    save_adapter(ours, largs, ours.args, tmp_path / "adapter")
    for fmt in ("meta", "hf"):
        main(["merge", "--checkpoint", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
              "--out", str(tmp_path / fmt), "--format", fmt])
        merged = checkpoint.load_model(str(tmp_path / fmt)).eval()
        assert (tmp_path / fmt / "tokenizer.json").is_file()
        torch.testing.assert_close(logits(merged, TOKENS), logits(ours, TOKENS), atol=1e-4, rtol=1e-4)


def test_adapter_loads_on_the_same_model_saved_as_hf(tmp_path):
    # Meta derives the FFN width; an HF config states it: the same architecture, so the adapter must load
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256)).eval()
    checkpoint.save_model(model, tmp_path / "hf", format="hf")
    largs = LoraArgs(targets=("wq", "w1"))
    apply_lora(model, largs)
    save_adapter(model, largs, model.args, tmp_path / "a")
    reloaded = checkpoint.load_model(tmp_path / "hf")
    assert reloaded.args.hidden_dim is not None and model.args.hidden_dim is None
    load_adapter(reloaded, tmp_path / "a")
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=1e-5, rtol=1e-5)
