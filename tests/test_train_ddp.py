"""train_ddp.py: 2-process gloo DDP / FSDP equal one process, exact resume after SIGTERM, the fp16 + GradScaler
path on CPU, the schedule against torch's, outputs, and the errors users hit first."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import train_ddp
from lora import LoraArgs, load_adapter, lora_modules
from model import ModelArgs, Transformer
from tests.gloo import gloo_rank
from tests.test_data import ByteTokenizer, toy_records, write_jsonl
from train_ddp import TrainArgs, get_lr, main, optimizer_step, setup_runtime, train

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, max_seq_len=256)
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on 2 shared cores: one thread each is several times faster than two fighting over them
    torch.set_num_threads(1)


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**TINY))


def targs(tmp, name, **kw) -> TrainArgs:
    base = dict(data=str(tmp / "data.jsonl"), out=str(tmp / name), max_steps=5, micro_batch_size=4, lr=3e-3,
                warmup_steps=2, max_len=128, lora_dropout=0.0, lora_targets=ALL_TARGETS, val_fraction=0.0,
                eval_every=0, save_every=0, precision="fp32", device="cpu")
    return TrainArgs(**{**base, **kw})


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", toy_records(96))
    return tmp_path


def adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter.safetensors")


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


RUNS = [dict(name="accum1", grad_accum=1), dict(name="accum2", grad_accum=2, pack=False),
        dict(name="fsdp", grad_accum=2, strategy="fsdp", activation_checkpointing=True)]


def _worker(rank, tmp):
    with gloo_rank(rank, tmp):
        for run in RUNS:
            kw = {k: v for k, v in run.items() if k != "name"}
            train(targs(tmp, f"ddp_{run['name']}", micro_batch_size=2, **kw), tiny_model(), ByteTokenizer(chat=True))


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(data):
    mp.spawn(_worker, args=(data,), nprocs=2, join=True)
    for run in RUNS:
        kw = {k: v for k, v in run.items() if k not in ("name", "strategy")}
        single = train(targs(data, f"one_{run['name']}", micro_batch_size=4, **kw), tiny_model(),
                       ByteTokenizer(chat=True))
        ddp = data / f"ddp_{run['name']}"
        assert max_diff(adapter(ddp), adapter(single)) < 1e-5, run
        assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
        assert len(losses(single)) == 5 and max(abs(v).max() for v in adapter(single).values()) > 0


def test_sigterm_then_resume_equals_a_straight_run(data, monkeypatch):
    kw = dict(max_steps=10, lora_dropout=0.1, save_every=3, keep_checkpoints=2, val_fraction=0.1, eval_every=4)
    straight = train(targs(data, "straight", **kw), tiny_model(), ByteTokenizer(chat=True))
    first = losses(straight)
    assert sum(first[-3:]) / 3 < first[0]  # it learns

    real_get_lr = train_ddp.get_lr

    def get_lr_then_sigterm(step, *args):
        if step == 4:  # arrives during the 5th step; the loop finishes it, checkpoints, and returns
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, *args)

    monkeypatch.setattr(train_ddp, "get_lr", get_lr_then_sigterm)
    stopped = train(targs(data, "resumed", **kw), tiny_model(), ByteTokenizer(chat=True))
    assert stopped.name == "step_0000005" and (stopped / "train_state.pt").is_file()
    assert not (data / "resumed" / "adapter").exists()
    assert sorted(p.name for p in (data / "resumed" / "checkpoints").iterdir()) == ["step_0000003", "step_0000005"]
    monkeypatch.setattr(train_ddp, "get_lr", real_get_lr)
    resumed = train(targs(data, "resumed", resume=True, **kw), tiny_model(), ByteTokenizer(chat=True))
    assert max_diff(adapter(resumed), adapter(straight)) < 1e-6
    assert losses(resumed) == pytest.approx(first, rel=1e-6)
    val = [json.loads(line).get("val_loss") for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [i + 1 for i, v in enumerate(val) if v is not None] == [4, 8, 10]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_0000006", "step_0000009"]
    for name in ("loss.png", "args.json", "peft/adapter_model.safetensors", "peft/adapter_config.json"):
        assert (resumed / name).is_file(), name


def test_final_adapter_reproduces_the_trained_model(data):
    model = tiny_model()
    out = train(targs(data, "run", max_steps=3, lora_targets=("wq", "wv"), lora_rslora=True), model,
                ByteTokenizer(chat=True))
    fresh = tiny_model()
    assert load_adapter(fresh, out / "adapter") == LoraArgs(r=8, alpha=16.0, dropout=0.0, targets=("wq", "wv"),
                                                            rslora=True)
    tokens = torch.randint(0, 259, (2, 9))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens), model(tokens), atol=1e-6, rtol=1e-6)
    args = json.loads((out / "args.json").read_text())
    assert args["model"]["dim"] == 64 and args["data"]["train_examples"] == 96


def test_fp16_path_on_cpu(data):
    model = tiny_model()
    out = train(targs(data, "fp16", max_steps=12, precision="fp16"), model, ByteTokenizer(chat=True))
    first = losses(out)
    assert sum(first[-3:]) / 3 < first[0]
    assert model.layers[0].attention.wq.base.weight.dtype == torch.float16  # frozen base in fp16
    assert all(m.lora_A.dtype == torch.float32 for m in lora_modules(model).values())  # adapters in fp32


def test_fp16_step_with_inf_gradients_is_skipped():
    rt = setup_runtime("cpu", "fp16")
    assert rt.scaler.is_enabled() and rt.dtype == torch.float16
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scale = rt.scaler.get_scale()
    rt.scaler.scale((p * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    _, skipped = optimizer_step([p], opt, rt, targs(Path("."), "x"))
    assert skipped and torch.equal(p.detach(), torch.ones(3)) and rt.scaler.get_scale() == scale / 2
    rt.scaler.scale(p.sum()).backward()
    _, skipped = optimizer_step([p], opt, rt, targs(Path("."), "x"))
    assert not skipped and not torch.equal(p.detach(), torch.ones(3))


def test_nan_loss_stops_with_a_clear_message(data):
    model = tiny_model()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 1: loss is nan; lower --lr"):
        train(targs(data, "nan"), model, ByteTokenizer(chat=True))


def test_schedule_matches_torch_warmup_plus_cosine():
    t = TrainArgs(data="x", lr=1e-3, warmup_steps=5, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / 5, end_factor=1.0, total_iters=4),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=45, eta_min=1e-4)], milestones=[5])
    for step in range(50):
        assert get_lr(step, t, 50) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), step
        opt.step()
        sched.step()


def test_bad_input_errors(data, capsys):
    with pytest.raises(SystemExit):
        main(["--data", "x", "--lora-targets", "wq,wqq"])
    assert "unknown LoRA target(s) ['wqq']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", "x", "--micro-batch-size", "0"])
    assert "--micro-batch-size=0 must be positive" in capsys.readouterr().err
    (data / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        train(targs(data, "e", data=str(data / "empty.jsonl")), tiny_model(), ByteTokenizer())
    with pytest.raises(ValueError, match="--max-len=512 exceeds"):
        train(targs(data, "e", max_len=512), tiny_model(), ByteTokenizer())
    with pytest.raises(ValueError, match="all 96 records .* --max-len=128 .* raise --max-len"):
        train(targs(data, "e"), tiny_model(), ByteTokenizer())  # the Alpaca prompt alone is > 128 bytes
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        train(targs(data, "e", resume=True), tiny_model(), ByteTokenizer(chat=True))
    train(targs(data, "other", max_steps=2, save_every=1), tiny_model(), ByteTokenizer(chat=True))
    bigger = Transformer(ModelArgs(**{**TINY, "dim": 128}))
    with pytest.raises(ValueError, match="another model.*dim: adapter 64 vs model 128"):
        train(targs(data, "other", max_steps=4, resume=True), bigger, ByteTokenizer(chat=True))
    with pytest.raises(ValueError, match="r=8 alpha=16.0"):
        train(targs(data, "other", max_steps=4, resume=True, lora_r=4), tiny_model(), ByteTokenizer(chat=True))


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(tmp_path, smollm2_gguf):
    """The real entry point: `torchrun --nproc_per_node=2 train_ddp.py` (env:// rendezvous, gloo) on a saved
    checkpoint equals `python train_ddp.py` with the same global batch."""
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**{**TINY, "vocab_size": 49152}))  # tiny, but with SmolLM2's tokenizer
    checkpoint.save_model(base, tmp_path / "base", format="hf", tokenizer_src=smollm2_gguf)
    write_jsonl(tmp_path / "data.jsonl", toy_records(64))
    common = ["--checkpoint", str(tmp_path / "base"), "--data", str(tmp_path / "data.jsonl"), "--max-steps", "3",
              "--lora-dropout", "0", "--val-fraction", "0", "--save-every", "0", "--max-len", "128",
              "--precision", "fp32", "--device", "cpu", "--lr", "3e-3", "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_ddp.py", *common, "--micro-batch-size", "2", "--out", str(tmp_path / "two")],
                   cwd=Path(train_ddp.__file__).parent, env=env, check=True, timeout=600, capture_output=True)
    main([*common, "--micro-batch-size", "4", "--out", str(tmp_path / "one")])
    assert max_diff(adapter(tmp_path / "two"), adapter(tmp_path / "one")) < 1e-5
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
def test_loss_falls_on_the_embedded_model(tmp_path, shared_data, smollm2_gguf):
    """30 steps on 10 human seed tasks (3 epochs) with the real model and tokenizer."""
    lines = (shared_data / "selfinstruct" / "seed_tasks.jsonl").read_text().splitlines()[:10]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = train(targs(tmp_path, "smol", max_steps=30, micro_batch_size=1, lr=2e-3, warmup_steps=3, max_len=128,
                      lora_targets=("wq", "wv"), lora_dropout=0.05, pack=False))
    first = losses(out)
    assert sum(first[-5:]) / 5 < sum(first[:5]) / 5 - 0.3
