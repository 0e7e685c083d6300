"""bench/gpu_check.py on the CPU with tiny shapes (`--device cpu --tiny`), so the GPU check cannot rot: every target
line has the `<target>: <value> (goal ...)` form, the JSON holds every figure, and nothing errors."""
import json
import re

import pytest

from bench import gpu_check

LINE = re.compile(r"^[a-z0-9_]+: .+ \(goal .+\)$")


def check(tmp_path, capsys, *flags) -> tuple[dict, list[str]]:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out.splitlines()
    figures = json.loads(out.read_text())
    lines = figures["lines"]
    assert printed[-1] == f"every figure: {out}" and printed[-1 - len(lines):-1] == lines
    assert all(LINE.match(line) for line in lines), [line for line in lines if not LINE.match(line)]
    assert lines[-1].startswith("gpu_check_seconds: ")
    return figures, lines


def test_tiny_cpu_check_of_one_shape(tmp_path, capsys):
    figures, lines = check(tmp_path, capsys, "--models", "1b", "--precisions", "fp32", "--no-tests")
    names = [line.split(":")[0] for line in lines]
    assert names == ["train_1b_fp32_tok_s_vs_transformers", "train_1b_fp32_mfu",
                     "train_1b_fp32_peak_memory_vs_transformers", "memory_plan_1b_fp32_vs_measured",
                     "decode_1b_fp32_single_vs_transformers", "decode_1b_fp32_batch16_vs_transformers",
                     "decode_1b_fp32_single_of_bandwidth_bound", "decode_1b_fp32_batch16_of_bandwidth_bound",
                     "gpu_check_seconds"]
    train, decode = figures["train_1b_fp32"], figures["decode_1b_fp32"]
    assert train["ours"]["tok_s"] > 0 and train["theirs"]["tok_s"] > 0 and train["ours"]["plan_bytes"] > 0
    assert train["ours"]["peak_bytes"] is None  # max_memory_allocated exists on CUDA only
    assert decode["ours_16"] > 0 and decode["theirs_1"] > 0 and 0 < decode["ours_1_of_bound"] < 1
    assert figures["environment"]["device"] == "cpu" and figures["args"]["tiny"] is True


@pytest.mark.slow
def test_tiny_cpu_check_runs_every_part(tmp_path, capsys):
    figures, lines = check(tmp_path, capsys)
    assert lines[0].startswith("cuda_tests: 0 passed, 0 failed, ") and "skipped" in lines[0]
    assert {k for k in figures if k.startswith(("train_", "decode_"))} == {
        f"{part}_{m}_{p}" for part in ("train", "decode") for m in ("1b", "7b") for p in ("fp32", "bf16")}


def test_a_cpu_without_tiny_is_refused():
    with pytest.raises(SystemExit, match="--device cpu --tiny"):
        gpu_check.main(["--device", "cpu"])
