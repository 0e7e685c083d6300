"""The precision policy: each branch, with the hardware faked."""
import pytest
import torch

import precision
from precision import choose_dtype, cpu_bf16, decide


@pytest.mark.parametrize("cap, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                        ((9, 0), torch.bfloat16)])
def test_cuda_capability_picks_fp16_before_ampere_and_bf16_after(cap, dtype):
    got, why = decide("cuda:0", cuda_capability=cap)
    assert got == dtype and f"{cap[0]}.{cap[1]}" in why


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX512", {"avx512f", "avx512_bf16"}, True),        # AMD Zen 4/5, Intel Cooper Lake
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),  # Intel Sapphire Rapids and later
    ("AVX512", {"avx512f"}, False),                       # Skylake-X: AVX-512 without bf16
    ("AVX2", {"avx2", "fma"}, False),                     # AVX2-only EPYC / laptops
    ("AVX2", {"avx2", "avx512_bf16"}, False),             # PyTorch held to AVX2 kernels (ATEN_CPU_CAPABILITY)
    ("DEFAULT", set(), False),
])
def test_cpu_bf16_only_where_native(capability, flags, native):
    got, why = cpu_bf16(capability, frozenset(flags))
    assert got is native and capability in why
    dtype, _ = decide("cpu", cpu=(got, why))
    assert dtype == (torch.bfloat16 if native else torch.float32)


def test_explicit_choice_wins_and_bad_names_are_refused():
    assert choose_dtype("fp32", "cuda:0") == torch.float32  # no CUDA query for an explicit choice
    assert choose_dtype("bfloat16") == choose_dtype("bf16") == torch.bfloat16
    assert choose_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="'fp8'"):
        choose_dtype("fp8")


def test_auto_says_once_what_it_chose_and_why(capsys, monkeypatch):
    precision._announce.cache_clear()
    monkeypatch.setattr(precision, "cpu_bf16", lambda: (False, "this CPU has no native bf16 (AVX2)"))
    assert choose_dtype("auto", "cpu") == torch.float32
    assert choose_dtype("auto", "cpu") == torch.float32
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precision fp32 on cpu: this CPU has no native bf16 (AVX2)" in err
    precision._announce.cache_clear()
