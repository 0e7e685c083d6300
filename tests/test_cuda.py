"""The GPU paths the project exists for, on CUDA (marked `cuda`, skipped without a GPU; `make gpu-check` runs them):
fp16 autocast + GradScaler training (finite, backs off on an overflow, close to fp32), bf16, attention on CUDA
against the CPU math kernel, a one-rank NCCL group through train_ddp's real DDP and FSDP2 code, KV-cache decoding
against a full forward. The one-rank group test also runs on the CPU with gloo, so its logic is checked everywhere."""
import json

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

import train_ddp
from model import ModelArgs, Transformer
from tests.test_data import ByteTokenizer, toy_records, write_jsonl
from train_ddp import TrainArgs, train

CUDA = torch.cuda.is_available()
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
TINY = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, max_seq_len=256)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(autouse=True)
def _exact_fp32():
    # setup_runtime turns TF32 on for speed; the comparisons here want true fp32 on both sides
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**TINY))


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", toy_records(96))
    return tmp_path


def run(tmp, name, **kw):
    base = dict(data=str(tmp / "data.jsonl"), out=str(tmp / name), max_steps=8, micro_batch_size=4, lr=2e-3,
                warmup_steps=2, max_len=128, lora_dropout=0.0, lora_targets=ALL, val_fraction=0.0, eval_every=0,
                save_every=0, device="cuda:0" if CUDA else "cpu")  # setup_runtime's set_device needs the index
    out = train(TrainArgs(**{**base, **kw}), tiny_model(), ByteTokenizer(chat=True))
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter.safetensors")


def relative_gap(a: dict, b: dict) -> float:
    """Largest ||a - b|| / ||b|| over the lora_B tensors (they start at zero: the whole learned update)."""
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b if k.endswith("lora_B"))


@pytest.mark.parametrize("precision", ["fp16", pytest.param("bf16", marks=pytest.mark.skipif(
    CUDA and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16"))])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_low_precision_training_tracks_fp32(data, precision):
    ref, ref_recs = run(data, "fp32", precision="fp32")
    out, recs = run(data, precision, precision=precision)
    losses = [r["loss"] for r in recs]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) / 3 < losses[0]
    assert losses == pytest.approx([r["loss"] for r in ref_recs], rel=0.02)
    assert relative_gap(adapter(out), adapter(ref)) < (0.05 if precision == "fp16" else 0.15)  # CPU: .01, .04
    assert not any(r["skipped"] for r in recs)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_scaler_skips_an_overflowing_step_and_backs_off(data, monkeypatch):
    real, calls, scales = train_ddp.forward_backward, [], []

    def overflow_on_step_3(model, batches, n_target, rt):
        loss = real(model, batches, n_target, rt)
        calls.append(1)
        scales.append(rt.scaler.get_scale())
        if len(calls) == 3:  # an fp16 overflow in one gradient
            next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(train_ddp, "forward_backward", overflow_on_step_3)
    out, recs = run(data, "fp16", precision="fp16")
    assert [r["skipped"] for r in recs] == [False, False, True] + [False] * 5
    assert scales[3] == scales[2] / 2  # halved after the overflow, then steady
    assert all(torch.isfinite(v).all() for v in adapter(out).values())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_attention_path_equals_the_cpu_math_kernel_on_cuda():
    model = tiny_model()
    B, T = 2, 96
    tokens = torch.randint(3, 259, (B, T))
    doc_ids = torch.cat([torch.ones(B, 40, dtype=torch.long), torch.full((B, T - 40), 2)], 1)
    positions = torch.cat([torch.arange(40), torch.arange(T - 40)]).expand(B, -1)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        want = {packed: model(tokens, **(dict(doc_ids=doc_ids, positions=positions) if packed else {}))
                for packed in (False, True)}
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)):
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        gpu = tiny_model().to("cuda", dtype)
        gpu.reset_rope("cuda")
        for packed in (False, True):
            kw = dict(doc_ids=doc_ids.cuda(), positions=positions.cuda()) if packed else {}
            with torch.no_grad():
                got = gpu(tokens.cuda(), **kw).float().cpu()
            err = ((got - want[packed]).abs().max() / want[packed].abs().max()).item()
            assert err < tol, (dtype, packed, err)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=needs_cuda)])
def test_a_one_rank_group_through_the_real_ddp_and_fsdp_code(data, backend, strategy, monkeypatch):
    """train() inside a one-rank process group wraps the model (DDP, or FSDP2's fully_shard) and all-reduces, and
    ends where a run without a group does."""
    device = "cuda:0" if backend == "nccl" else "cpu"
    alone, alone_recs = run(data, "alone", precision="fp32", device=device)
    dist.init_process_group(backend, init_method=f"file://{data}/pg", rank=0, world_size=1)
    wrapped, real_wrap = [], train_ddp.wrap_model
    monkeypatch.setattr(train_ddp, "wrap_model", lambda *a: wrapped.append(real_wrap(*a)) or wrapped[-1])
    try:
        grouped, recs = run(data, "grouped", precision="fp32", device=device, strategy=strategy,
                            activation_checkpointing=strategy == "fsdp")
    finally:
        dist.destroy_process_group()
    kind = type(wrapped[0]).__name__
    assert kind == ("DistributedDataParallel" if strategy == "ddp" else "FSDPTransformer"), kind
    assert [r["loss"] for r in recs] == pytest.approx([r["loss"] for r in alone_recs], rel=1e-4)
    assert relative_gap(adapter(grouped), adapter(alone)) < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_cache_decoding_on_cuda_equals_a_full_forward(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model().to("cuda", dtype).eval()
    model.reset_rope("cuda")
    tokens = torch.randint(3, 259, (3, 40), device="cuda")
    with torch.no_grad():
        full = model(tokens).float()
        model.setup_cache(3, 40)
        steps = [model(tokens[:, :24], start_pos=0).float()]  # prefill, then one token at a time
        steps += [model(tokens[:, t:t + 1], start_pos=t).float() for t in range(24, 40)]
        model.clear_cache()
    cached = torch.cat(steps, dim=1)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert ((cached - full).abs().max() / full.abs().max()).item() < tol
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean().item() > (0.999 if dtype == torch.float32 else 0.95)
