"""The precision policy: the one function every entry point calls when its dtype or precision is `auto`.

    from precision import choose_dtype
    dtype = choose_dtype("auto", "cuda:0")   # -> torch.bfloat16 on an A100, float16 on a V100
    dtype = choose_dtype("bf16")             # an explicit choice always wins

Rules: CUDA compute capability 7.x -> fp16 (V100: no bf16; training adds a GradScaler and keeps adapters in fp32),
8.0 and up -> bf16; a CPU -> bf16 only where it has native bf16 instructions (AMX or AVX512_BF16, with PyTorch's
AVX-512 kernels in use), fp32 otherwise: without them a bf16 matmul is emulated and runs about 4x slower than fp32
(an AVX2-only AMD EPYC: 45 ms against 10.6 ms for 64x576 @ 576x1536). Other devices get fp32.
The choice is printed once per process, with its reason, to stderr.
"""
from __future__ import annotations

import functools
import platform
import sys

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CHOICES = ["auto", *DTYPES]  # for a CLI field's metadata


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16(capability: str | None = None, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(native bf16?, why) for this CPU; the arguments fake the machine in tests."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    flags = cpu_flags() if flags is None else flags
    native = sorted({"amx_bf16", "avx512_bf16"} & flags)
    if not native:
        return False, f"this CPU has no native bf16 ({capability})"
    if not capability.startswith("AVX512"):
        # ATEN_CPU_CAPABILITY or an old build can hold PyTorch to AVX2 kernels even on a bf16-capable CPU
        return False, f"PyTorch runs {capability} kernels here, which emulate bf16"
    return True, f"this CPU has native bf16 ({', '.join(native)}, {capability})"


def decide(device: str | torch.device = "cpu", cuda_capability: tuple[int, int] | None = None,
           cpu: tuple[bool, str] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) that `auto` means on `device`; the keyword arguments fake the hardware in tests."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = cuda_capability or torch.cuda.get_device_capability(dev)
        if major >= 8:
            return torch.bfloat16, f"CUDA compute capability {major}.{minor} has bf16"
        return torch.float16, f"CUDA compute capability {major}.{minor} has no bf16 (training adds a loss scaler)"
    if dev.type == "cpu":
        native, why = cpu if cpu is not None else cpu_bf16()
        return (torch.bfloat16 if native else torch.float32), f"{why} [{platform.machine()}]"
    return torch.float32, f"no policy for {dev.type} devices"


def choose_dtype(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype for `requested` ('auto', 'fp32'/'float32', 'bf16'/'bfloat16', 'fp16'/'float16')."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"precision {requested!r} is not one of {CHOICES}")
        return DTYPES[requested]
    dtype, why = decide(device)
    _announce(NAMES[dtype], str(torch.device(device)), why)
    return dtype


@functools.cache
def _announce(name: str, device: str, why: str) -> None:
    print(f"precision {name} on {device}: {why}", file=sys.stderr)
