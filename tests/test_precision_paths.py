"""The GPU precision paths, shown on the CPU: RMSNorm under fp16/bf16 autocast at LLaMA-7B's width, the entry
points' `auto` passing through precision.py, the torch version check, --device auto warning when a GPU is expected
but torch cannot use it, and FSDP validation on a split that does not divide over the ranks."""
import pytest
import torch
import torch.nn.functional as F

from model import RMSNorm


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
