"""demo.py end to end on a tiny random model: every stage runs offline and the report names each of them."""
import json

import pytest

from demo import DemoArgs, run_demo


@pytest.mark.slow
def test_smoke_demo_runs_every_stage_and_resumes(tmp_path, smollm2_gguf):
    args = DemoArgs(out=tmp_path, smoke=True, annotate_limit=2, instructions=2, ground_articles=2, train_steps=3,
                    heldout=3)
    report = run_demo(args, log=lambda *a: None)
    text = report.read_text()
    for stage in ("articles", "annotate", "self-instruct", "train", "index", "evaluate"):
        assert f"| {stage} |" in text
    for system in ("base", "fine-tuned", "base+retrieval", "fine-tuned+retrieval"):
        assert f"| {system} |" in text
    assert (tmp_path / "train" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "train" / "peft" / "adapter_model.safetensors").is_file()
    heldout = [json.loads(x)["url"] for x in (tmp_path / "labels_heldout.jsonl").read_text().splitlines()]
    trained_on = (tmp_path / "articles_train.jsonl").read_text()
    assert len(heldout) == 3 and not any(url in trained_on for url in heldout)  # evaluation is on unseen articles

    # a second run resumes: finished annotations and the trained adapter are kept, not redone
    annotations = (tmp_path / "annotations.jsonl").read_text()
    adapter_mtime = (tmp_path / "train" / "adapter" / "adapter.safetensors").stat().st_mtime_ns
    run_demo(args, log=lambda *a: None)
    assert (tmp_path / "annotations.jsonl").read_text() == annotations
    assert (tmp_path / "train" / "adapter" / "adapter.safetensors").stat().st_mtime_ns == adapter_mtime


def test_bad_heldout_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="heldout=30 leaves none of the 30 articles"):
        DemoArgs(out=tmp_path, heldout=30)
