"""The GPU precision paths, shown on the CPU: RMSNorm under fp16/bf16 autocast at LLaMA-7B's width, the entry
points' `auto` passing through precision.py, the torch version check, --device auto warning when a GPU is expected
but torch cannot use it, and FSDP validation on a split that does not divide over the ranks."""
import json
import re
import shutil
import subprocess
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import precision
import train_ddp
from data import encode_records, eval_batches, make_rows
from lora import lora_modules
from model import ModelArgs, RMSNorm, Transformer
from tests.gloo import gloo_rank
from tests.test_data import ByteTokenizer, toy_records, write_jsonl
from tests.test_train_ddp import TINY
from train_ddp import TrainArgs


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, "autocast"])
def test_rmsnorm_under_autocast_at_dim_4096_matches_fp32(autocast, x_dtype):
    """Activations in the thousands (LLaMA-7B's first tokens): an fp16 sum of squares overflows at dim 4096 and
    used to zero every output. Forward and backward against fp32 F.rms_norm, for fp32 and low-precision inputs."""
    torch.manual_seed(0)
    dim, dtype = 4096, autocast if x_dtype == "autocast" else x_dtype
    norm = RMSNorm(dim, 1e-5)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    norm.to(dtype)
    x0 = torch.randn(2, 3, dim) * 2000
    x0[:, 0, :8] = 30000.0  # a few outlier channels, as LLaMA has
    x = x0.to(dtype).requires_grad_()
    g = torch.randn(2, 3, dim)
    with torch.autocast("cpu", autocast):
        y = norm(x)
    y.backward(g.to(y.dtype))
    xr, wr = x.detach().float().requires_grad_(), norm.weight.detach().float().requires_grad_()
    ref = F.rms_norm(xr, (dim,), eps=1e-5) * wr
    ref.backward(g)
    assert torch.isfinite(y).all() and y.float().abs().max() > 1
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(y.float(), ref.detach(), **tol)
    # dx is about 1 / rms(x) ~ 5e-4 here: compare relative to its scale
    scale = xr.grad.abs().max()
    torch.testing.assert_close(x.grad.float() / scale, xr.grad / scale, atol=2e-2, rtol=0)
    torch.testing.assert_close(norm.weight.grad.float(), wr.grad, atol=5e-2 * wr.grad.abs().max().item(), rtol=0)
    with torch.no_grad(), torch.autocast("cpu", autocast):  # the inference path too
        torch.testing.assert_close(norm(x).float(), ref.detach(), **tol)


@pytest.mark.parametrize("decided, scaler", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)])
def test_setup_runtime_auto_takes_precision_decide(monkeypatch, decided, scaler):
    """--precision auto is precision.decide's answer (faked here): fp16 brings its GradScaler, bf16/fp32 none."""
    seen = []
    monkeypatch.setattr(precision, "decide", lambda device: (seen.append(str(device)), (decided, "faked"))[1])
    rt = train_ddp.setup_runtime("cpu", "auto")
    assert seen == ["cpu"] and rt.dtype == decided and rt.scaler.is_enabled() == scaler
    if decided == torch.float32:
        assert isinstance(rt.autocast_ctx, nullcontext)
    else:
        assert rt.autocast_ctx.fast_dtype == decided
    monkeypatch.setattr(precision, "decide", lambda device: pytest.fail("an explicit precision must not ask"))
    assert train_ddp.setup_runtime("cpu", "fp32").dtype == torch.float32  # an explicit flag wins


def test_fp16_training_keeps_fp32_adapters_when_auto_picks_fp16(tmp_path, monkeypatch):
    """The V100 answer (fp16) through `auto`: frozen base in fp16, adapters and AdamW state in fp32, loss scaled."""
    monkeypatch.setattr(precision, "decide", lambda device: (torch.float16, "faked V100"))
    write_jsonl(tmp_path / "data.jsonl", toy_records(16))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, max_seq_len=256))
    train_ddp.train(TrainArgs(data=str(tmp_path / "data.jsonl"), out=str(tmp_path / "run"), max_steps=2,
                              max_len=128, val_fraction=0.0, save_every=0, device="cpu"), model,
                    ByteTokenizer(chat=True))
    assert model.layers[0].attention.wq.base.weight.dtype == torch.float16
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in lora_modules(model).values())
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()


def test_old_torch_stops_at_startup_with_the_fix():
    train_ddp.check_torch("2.13.0+cpu")
    train_ddp.check_torch("2.7.1+cu126")
    with pytest.raises(RuntimeError, match=r"torch 2.5.1\+cu121 is older than 2.7.*make setup TORCH="):
        train_ddp.check_torch("2.5.1+cu121")


def test_ddp_gets_the_buffer_flag_this_torch_knows(monkeypatch):
    """forward_sync_buffers exists only in recent torch; older ones get broadcast_buffers (same meaning here)."""
    got = {}

    class FakeOldDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            got.update(broadcast_buffers=broadcast_buffers)

        _set_params_and_buffers_to_ignore_for_model = staticmethod(lambda *a: None)

    monkeypatch.setattr(train_ddp, "DDP", FakeOldDDP)
    monkeypatch.setattr(train_ddp.dist, "is_initialized", lambda: True)  # wrap as if under torchrun
    rt = train_ddp.Runtime(0, 2, torch.device("cpu"), True, torch.float32, nullcontext(), None)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=259, max_seq_len=64))
    train_ddp.wrap_model(model, TrainArgs(data="x"), rt)
    assert got == {"broadcast_buffers": False}


@pytest.mark.parametrize("cuda_build", [None, "12.6"])
def test_device_auto_warns_when_a_gpu_is_there_but_torch_cannot_use_it(monkeypatch, capsys, cuda_build):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_ddp.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    assert train_ddp.pick_device("auto", 0) == torch.device("cpu")
    err = capsys.readouterr().err
    assert "WARNING: --device auto falls back to the CPU" in err and "make setup TORCH=" in err
    assert ("is a CPU build" in err) == (cuda_build is None)
    assert train_ddp.pick_device("cpu", 0) == torch.device("cpu") and not capsys.readouterr().err
    monkeypatch.setattr(train_ddp.shutil, "which", lambda name: None)  # no NVIDIA driver: the CPU is expected
    assert train_ddp.pick_device("auto", 0) == torch.device("cpu") and not capsys.readouterr().err


def _val_rows(n):
    examples, _ = encode_records(toy_records(n, seed=3), ByteTokenizer(chat=True), 128)
    return make_rows(examples, 128, pack_rows=False)


def _fsdp_eval(rank):
    rt = train_ddp.setup_runtime("cpu", "fp32")
    args = TrainArgs(data="x", strategy="fsdp", lora_dropout=0.0)
    torch.manual_seed(0)
    raw = train_ddp.prepare_model(Transformer(ModelArgs(**TINY)), args.lora_args(), args, rt)
    model = train_ddp.wrap_model(raw, args, rt)
    return [train_ddp.evaluate(model, eval_batches(_val_rows(n), 4, 2, rank, 0), rt) for n in (17, 1)]


def _fsdp_eval_worker(rank, tmp):
    with gloo_rank(rank, tmp):
        got = _fsdp_eval(rank)  # the FSDP model is gone before the group is torn down
        if rank == 0:
            (tmp / "fsdp_val.json").write_text(json.dumps(got))


@pytest.mark.slow
def test_fsdp_validation_on_a_split_that_does_not_divide_over_the_ranks(tmp_path):
    """17 rows on 2 ranks at micro-batch 4 (3 batches against 2), and 1 row on 2 ranks: every rank runs the same
    number of batches, and the loss is the one-process loss."""
    mp.spawn(_fsdp_eval_worker, args=(tmp_path,), nprocs=2, join=True)
    rt = train_ddp.setup_runtime("cpu", "fp32")
    args = TrainArgs(data="x", lora_dropout=0.0)
    torch.manual_seed(0)
    model = train_ddp.prepare_model(Transformer(ModelArgs(**TINY)), args.lora_args(), args, rt)
    one = [train_ddp.evaluate(model, eval_batches(_val_rows(n), 4, 1, 0, 0), rt) for n in (17, 1)]
    assert json.loads((tmp_path / "fsdp_val.json").read_text()) == pytest.approx(one, rel=1e-5)


def test_every_rank_gets_the_same_number_of_validation_batches():
    rows = _val_rows(17)
    for world, micro in ((2, 4), (4, 4), (3, 2), (20, 4)):
        shares = [eval_batches(rows, micro, world, r, 0) for r in range(world)]
        assert len({len(s) for s in shares}) == 1, (world, micro)
        assert sum((b.labels != -100).sum().item() for s in shares for b in s) == \
            sum(sum(x != -100 for e in row for x in e.labels) for row in rows)
    model = Transformer(ModelArgs(**TINY))
    filler = eval_batches(rows[:1], 4, 2, 1, 0)  # rank 1 has no row: one ignored token
    assert len(filler) == 1 and filler[0].n_real == 0
    with torch.no_grad():
        loss, n = model(**filler[0].inputs("cpu"))
    assert loss.item() == 0 and n.item() == 0


def test_generate_auto_dtype_takes_precision_decide(monkeypatch, capsys):
    """Generator.from_checkpoint and the generate.py CLI default to auto, resolved by precision.decide (faked);
    an explicit --dtype wins; None keeps the checkpoint's own dtype."""
    import checkpoint
    import generate
    from tests.test_generate import ByteTokenizer as GenTokenizer

    loaded = []
    tiny = Transformer(ModelArgs(**TINY))
    monkeypatch.setattr(checkpoint, "load_model", lambda path, dtype, device: (loaded.append(dtype), tiny)[1])
    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda path: GenTokenizer())
    monkeypatch.setattr(precision, "decide", lambda device: (torch.bfloat16, "faked"))
    generate.Generator.from_checkpoint()
    generate.Generator.from_checkpoint(dtype="fp32")
    generate.Generator.from_checkpoint(dtype=None)
    generate.main(["--prompt", "hi", "--max-new-tokens", "1"])
    generate.main(["--prompt", "hi", "--max-new-tokens", "1", "--dtype", "float16"])
    assert loaded == [torch.bfloat16, torch.float32, None, torch.bfloat16, torch.float16]
    capsys.readouterr()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_setup_reinstalls_torch_when_the_torch_spec_changes(tmp_path):
    """A new TORCH spec over an existing .venv force-reinstalls torch (pip alone keeps the CPU build that is
    there); the same spec again does nothing. A stub python records what make asks of pip."""
    venv, log = tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (venv / "bin" / "python").chmod(0o755)
    root = Path(__file__).resolve().parents[1]

    def setup(torch_spec):
        log.write_text("")
        subprocess.run(["make", "-s", "setup", f"VENV={venv}", "PYTHON=true", f"TORCH={torch_spec}"], cwd=root,
                       check=True, capture_output=True, timeout=60)
        return [line for line in log.read_text().splitlines() if "torch" in line and "pip" in line]

    assert setup("torch==2.13.0")[0] == "-m pip install -q --force-reinstall --no-deps torch==2.13.0"
    assert setup("torch==2.13.0") == []
    cuda = "torch --index-url https://download.pytorch.org/whl/cu126"
    assert setup(cuda) == [f"-m pip install -q --force-reinstall --no-deps {cuda}", f"-m pip install -q {cuda}"]
    assert setup(cuda) == []


def test_the_minimum_torch_is_pinned_where_torch_gets_installed():
    root = Path(__file__).resolve().parents[1]
    need = ".".join(map(str, train_ddp.MIN_TORCH))
    assert f"torch>={need}" in (root / "requirements.txt").read_text()
    base = re.search(r"FROM pytorch/pytorch:(\d+)\.(\d+)", (root / "Dockerfile").read_text())
    assert (int(base[1]), int(base[2])) >= train_ddp.MIN_TORCH


def _bool_mask(doc_q, doc_k, start_pos, dtype):
    """The mask as it was: boolean, turned into an additive one by SDPA in every layer."""
    T, Tk = doc_q.shape[1], doc_k.shape[1]
    causal = torch.arange(start_pos, start_pos + T)[:, None] >= torch.arange(Tk)[None, :]
    return (causal & (doc_q[:, :, None] == doc_k[:, None, :])).unsqueeze(1)


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gqa_attention_equals_the_boolean_mask_path(monkeypatch, expand, dtype):
    """The additive mask made once per forward, and (expand) the CUDA branch that copies k/v up to n_heads instead
    of enable_gqa, give the old path's logits and gradients (packed rows: doc ids and per-document positions)."""
    import model as model_module
    from model import Transformer as T_

    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**TINY, "n_heads": 8, "n_kv_heads": 2})).to(dtype)
    tokens = torch.randint(0, 259, (2, 40))
    docs = torch.tensor([[1] * 15 + [2] * 20 + [0] * 5, [1] * 33 + [2] * 7])
    pos = torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)]).repeat(2, 1)

    def run():
        model.zero_grad()
        logits = model(tokens, positions=pos, doc_ids=docs)
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    if expand:
        monkeypatch.setattr(model_module, "EXPAND_KV_WITH_MASK", {"cpu"})
    new = run()
    monkeypatch.setattr(model_module, "EXPAND_KV_WITH_MASK", set())
    monkeypatch.setattr(T_, "_mask", staticmethod(_bool_mask))
    old = run()
    # the mask alone changes no bit; expanded heads sum k/v gradients in another order
    tol = dict(atol=1e-2, rtol=1e-2) if dtype != torch.float32 else dict(atol=1e-7, rtol=1e-5) if expand else \
        dict(atol=0, rtol=0)
    torch.testing.assert_close(new[0], old[0], **tol)
    for a, b in zip(new[1], old[1]):
        torch.testing.assert_close(a, b, **tol)


def test_a_bare_cuda_device_means_this_ranks_gpu():
    assert train_ddp.pick_device("cuda", 3) == torch.device("cuda", 3)
    assert train_ddp.pick_device("cuda:1", 3) == torch.device("cuda", 1)
    assert train_ddp.pick_device("cpu", 3) == torch.device("cpu")
