"""Random W4A4 (Nunchaku INT4) test operands shared by the GPU tests tests/runtime/test_cuda_w4a4.py and
test_cuda_w4a4_wgmma.py: activations over a wide range of magnitudes with outlier channels, and a layer's codes,
scales, smoothing, low-rank branch and bias."""
from __future__ import annotations

import torch


def make_x(m: int, k: int, dtype, gen, unsigned: bool = False) -> torch.Tensor:
    """Activations with per-token magnitudes over 2^-8..2^8, outlier channels (x30), an all-zero token, and an
    unsigned layer's GELU outputs (>= -0.17)."""
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-8, 9, (m, 1), generator=gen).float())
    x[:, torch.randint(0, k, (max(1, k // 32),), generator=gen)] *= 30
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    if m > 2:
        x[m // 2] = 0
    return x.to(dtype)


def make_layer(n: int, k: int, rank: int, dtype, gen, bias: bool = True) -> dict:
    return {"wcodes": torch.randint(-8, 8, (n, k), generator=gen).to(torch.int8),
            "wscales": (torch.rand(n, k // 64, generator=gen) * 0.02 + 0.001).to(dtype),
            "smooth": (torch.rand(k, generator=gen) * 4 + 0.25).to(dtype),
            "lora_down": (torch.randn(rank, k, generator=gen) * 0.05).to(dtype) if rank else None,
            "lora_up": (torch.randn(n, rank, generator=gen) * 0.05).to(dtype) if rank else None,
            "bias": (torch.randn(n, generator=gen) * 0.5).to(dtype) if bias else None}
