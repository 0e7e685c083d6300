"""train_ddp.py against a hostile but fair user: a new run into a used --out, torn and corrupt files left by a
crash, checkpoints past 7 digits, bad data behind a slow model load. Training never destroys a run."""
import json
import shutil

import pytest
import torch

import checkpoint
import train_ddp
from tests.test_data import ByteTokenizer
from tests.test_train_ddp import adapter, data, losses, max_diff, targs, tiny_model  # noqa: F401 (fixture)
from train_ddp import checkpoints, prune_checkpoints, train

KW = dict(max_steps=8, save_every=3, keep_checkpoints=2, lora_dropout=0.1)


def run(tmp, name, **kw):
    return train(targs(tmp, name, **{**KW, **kw}), tiny_model(), ByteTokenizer(chat=True))


def snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_new_run_into_a_used_out_refuses_and_leaves_it_untouched(data):
    out = run(data, "run")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=rf"--out {out} holds a run .*--resume .*--overwrite"):
        run(data, "run", max_steps=3)
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        run(data, "run", resume=True, overwrite=True)


def test_overwrite_starts_again_from_nothing(data, capsys):
    run(data, "run", max_steps=10, save_every=5)  # checkpoints 5 and 10
    out = run(data, "run", max_steps=4, save_every=2, overwrite=True)
    assert "--overwrite: deleted the previous run" in capsys.readouterr().err
    assert [p.name for p in checkpoints(out)] == ["step_0000002", "step_0000004"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    fresh = run(data, "fresh", max_steps=4, save_every=2)
    assert max_diff(adapter(out), adapter(fresh)) == 0


def test_checkpoints_are_ordered_and_pruned_by_step_never_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 3, 10_000_000, 20):  # by name, step_10000000 sorts before step_0000020
        (root / (f"step_{step:07d}")).mkdir(parents=True)
    (root / "step_0000050.tmp").mkdir()  # an interrupted write
    (root / "step_0000060.damaged").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000003", "step_0000020", "step_0000100",
                                                       "step_10000000"]
    prune_checkpoints(tmp_path, keep=2, newest=root / "step_0000003")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000003", "step_10000000"]
    prune_checkpoints(tmp_path, keep=1, newest=root / "step_0000003")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000003"]


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_a_torn_metrics_line(data, capsys):
    straight = run(data, "straight")
    out = run(data, "run")
    assert [p.name for p in checkpoints(out)] == ["step_0000003", "step_0000006"]
    state = out / "checkpoints" / "step_0000006" / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a crash mid-write, a full disk
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.')  # torn: no newline
    resumed = run(data, "run", resume=True)
    err = capsys.readouterr().err
    assert "step_0000006/train_state.pt is damaged" in err and "resuming from the previous intact checkpoint" in err
    assert "step_0000003" in err
    assert (out / "checkpoints" / "step_0000006.damaged").is_dir()
    assert max_diff(adapter(resumed), adapter(straight)) < 1e-6  # exact resume from step 3
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)


def test_resume_with_every_checkpoint_damaged_says_so(data):
    out = run(data, "run", max_steps=3)
    for ckpt in checkpoints(out):
        (ckpt / "adapter.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"every checkpoint .* damaged .*adapter.safetensors is damaged .*--overwrite"):
        run(data, "run", resume=True)


def test_resume_repairs_a_torn_metrics_tail_left_after_the_last_checkpoint(data):
    out = run(data, "run", max_steps=7)  # checkpoints 3 and 6; then as if it crashed writing step 7's record
    shutil.rmtree(out / "adapter")
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: text.rindex("{") + 7])
    resumed = run(data, "run", max_steps=7, resume=True)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("line, match", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"data.jsonl:2: record has no 'output'"),
    ('{"instruction": "a", "output": 3}\n', r"data.jsonl:1: 'output' must be a string"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', r"data.jsonl:2: invalid JSON"),
])
def test_bad_data_fails_before_the_model_is_loaded(tmp_path, monkeypatch, line, match):
    def never(*_, **__):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(checkpoint, "load_model", never)
    (tmp_path / "data.jsonl").write_text(line)
    with pytest.raises(ValueError, match=match):
        train(targs(tmp_path, "run"))


def test_a_missing_data_file_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "load_model", lambda *_, **__: pytest.fail("model loaded first"))
    with pytest.raises(FileNotFoundError, match=r"no data file at .*missing.jsonl; pass --data"):
        train(targs(tmp_path, "run", data=str(tmp_path / "missing.jsonl")))


def test_a_used_out_refuses_before_the_model_is_loaded(data, monkeypatch):
    run(data, "run", max_steps=3)
    monkeypatch.setattr(checkpoint, "load_model", lambda *_, **__: pytest.fail("model loaded first"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(targs(data, "run"))
    assert torch.is_tensor(train_ddp.read_checkpoint(checkpoints(data / "run")[-1])["rng"][0]["cpu"])
