"""model.py against transformers' LlamaForCausalLM, and its own equivalences (cache, packing, RoPE)."""
import math

import pytest
import torch

from checkpoint import hf_to_meta
from model import ChunkedCrossEntropy, ModelArgs, RMSNorm, Transformer, _RMSNormFunction, apply_rope, rope_tables

CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, vocab_size=256),
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, rope_theta=500000.0),
    "ffn_mult": dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=300, multiple_of=32,
                     ffn_dim_multiplier=1.3),
    "tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, tie_embeddings=True),
}


def tiny(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**CONFIGS["gqa"], **kw}))
    for p in model.parameters():  # non-trivial norms, so that a wrong norm weight would show
        if p.ndim == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    return model.eval()


def hf_llama(args: ModelArgs, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab_size, intermediate_size=args.ffn_hidden,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings, attention_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        if p.ndim == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    return hf


@pytest.mark.reference
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    args = ModelArgs(**CONFIGS[name])
    hf = hf_llama(args)
    model = Transformer(args).eval()
    model.load_state_dict(hf_to_meta(hf.state_dict(), args), strict=True)
    tokens = torch.randint(0, args.vocab_size, (2, 17))
    with torch.no_grad():
        ours, ref = model(tokens), hf(tokens).logits
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_training_backward_matches_autograd(dtype):
    """The hand-written backward (used whenever a gradient is needed) against autograd through F.rms_norm, and its
    forward against the inference path."""
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(dtype)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 64).to(dtype)
    y = norm(x)
    y.backward(g)
    ours = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    ref = torch.nn.functional.rms_norm(x.float(), (64,), eps=1e-5).type_as(x) * norm.weight
    ref.backward(g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(ours[0], x.grad, **tol)
    torch.testing.assert_close(ours[1], norm.weight.grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), y.detach(), **tol)
    xd, wd = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True), torch.rand(8, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(_RMSNormFunction.apply, (xd, wd.requires_grad_(), 1e-5))


def test_rope_matches_complex_formula():
    cos, sin = rope_tables(16, 32, 10000.0)
    x = torch.randn(2, 32, 3, 16)
    ours = apply_rope(x, torch.complex(cos, sin)[None, :, None])
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    rot = torch.polar(torch.ones(32, 8), torch.outer(torch.arange(32).float(), freqs))  # e^(i * m * theta_k)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot[None, :, None]).flatten(-2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_ffn_width_follows_meta_rule():
    # LLaMA-2-7B: 11008; LLaMA-2-70B: dim 8192, multiplier 1.3, multiple_of 4096 -> 28672
    assert ModelArgs(dim=4096).ffn_hidden == 11008
    assert ModelArgs(dim=8192, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096).ffn_hidden == 28672


@pytest.mark.parametrize("bad, match", [(dict(dim=60, n_heads=8), "n_heads=8 must divide dim=60"),
                                        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads=3"),
                                        (dict(vocab_size=0), "vocab_size")])
def test_bad_args_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**{**CONFIGS["gqa"], **bad})


def test_kv_cache_decoding_equals_full_forward():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 16)
        steps = [model(tokens[:, :5], start_pos=0)]  # prefill
        steps.append(model(tokens[:, 5:8], start_pos=5))  # chunked prefill after a cache
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_rows_alone():
    model = tiny()
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 5))
    pad = 4
    tokens = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    docs = torch.ones_like(tokens)
    docs[1, :pad] = 0
    positions = (torch.cumsum(docs, 1) - 1).clamp(min=0)
    with torch.no_grad():
        model.setup_cache(2, 12)
        out = model(tokens, positions=positions, doc_ids=docs)
        nxt = torch.randint(0, 256, (2, 1))
        step = model(nxt, start_pos=9, positions=positions[:, -1:] + 1)
        model.clear_cache()
        ref_a, ref_b = model(torch.cat([a, nxt[:1]], 1)), model(torch.cat([b, nxt[1:]], 1))
    torch.testing.assert_close(out[0], ref_a[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, pad:], ref_b[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[:, 0], torch.stack([ref_a[0, -1], ref_b[0, -1]]), atol=1e-5, rtol=1e-5)


def test_resized_and_joined_caches_decode_each_row_as_alone():
    """resize_cache (empty slots before and after the cached ones), take_cache and join_cache (two separately
    prefilled caches as one batch): each row's next logits equal a full forward of its tokens alone."""
    model = tiny()
    a, b, nxt = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (2, 1))
    with torch.no_grad():
        model.setup_cache(1, 8)
        model(a)  # row a ends at slot 6
        model.resize_cache(3, 1)  # 3 masked slots before it: it now ends at slot 9, like b; 12 slots in all
        assert model.layers[0].attention.cache.k.shape[2] == 12 and model._cache_docs[0, :3].eq(0).all()
        taken = model.take_cache()
        assert model.layers[0].attention.cache is None
        model.setup_cache(1, 12)
        model(b)
        model.join_cache(taken)  # rows: a, then b
        step = model(nxt, start_pos=9, positions=torch.tensor([[6], [9]]))
        model.clear_cache()
        ref_a, ref_b = model(torch.cat([a, nxt[:1]], 1)), model(torch.cat([b, nxt[1:]], 1))
        torch.testing.assert_close(step[:, 0], torch.stack([ref_a[0, -1], ref_b[0, -1]]), atol=1e-5, rtol=1e-5)
        model.setup_cache(1, 8)
        with pytest.raises(ValueError, match="max_seq_len"):
            model.resize_cache(0, model.args.max_seq_len)
        model.clear_cache()


def test_packed_row_equals_documents_alone():
    model = tiny()
    lens = [5, 7, 4]
    docs = [torch.randint(0, 256, (1, n)) for n in lens]
    tokens = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, n), i + 1) for i, n in enumerate(lens)], 1)
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = model(tokens, positions=positions, doc_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_labels_give_the_masked_cross_entropy():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 10))
    labels = torch.randint(0, 256, (2, 10))
    labels[0, :4] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        loss_sum, n = model(tokens, labels=labels)
        ref = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    assert n.item() == 13
    assert math.isclose(loss_sum.item(), ref.item(), rel_tol=1e-5)


def test_chunked_cross_entropy_matches_the_full_one():
    h = torch.randn(11, 16, requires_grad=True)
    w, t = torch.randn(50, 16), torch.randint(0, 50, (11,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.5, h)
    loss = ChunkedCrossEntropy.apply(h, w, t, True, 3)  # chunks of 3 rows: 4 chunks, the last one short
    (grad,) = torch.autograd.grad(loss * 0.5, h)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_frozen_output_takes_the_chunked_loss_with_the_same_gradients():
    model = tiny().requires_grad_(False)
    wq = model.layers[0].attention.wq.weight.requires_grad_(True)
    tokens, labels = torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (2, 10))
    labels[0, :4] = -100
    loss, n = model(tokens, labels=labels)  # the output weight is frozen: ChunkedCrossEntropy
    assert loss.grad_fn is not None and "ChunkedCrossEntropy" in type(loss.grad_fn).__name__
    (grad,) = torch.autograd.grad(loss, wq)
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(model(tokens)[keep], labels[keep], reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, wq)
    assert n.item() == 16
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_tied_embeddings_share_storage():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" in dict(model.named_parameters(remove_duplicate=False))


def test_low_precision_forward_keeps_fp32_logits():
    model = tiny().to(torch.bfloat16)
    logits = model(torch.randint(0, 256, (1, 6)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_single_row_linear_equals_nn_linear():
    from model import Linear
    lin = Linear(48, 40, bias=False)
    ref = torch.nn.Linear(48, 40, bias=False)
    ref.weight = lin.weight
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 1, 48, dtype=dtype)
        torch.testing.assert_close(lin.to(dtype)(x), ref.to(dtype)(x), atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
