"""PSNR and SSIM of two images in [0, 1], as torchmetrics and scikit-image define them (Wang et al. 2004, "Image
Quality Assessment: From Error Visibility to Structural Similarity"): SSIM with an 11-tap Gaussian window of sigma 1.5,
K1 = 0.01, K2 = 0.03, data range 1, population (not sample) variances, computed per channel over the positions where
the whole window fits (both libraries pad and then crop those borders away) and averaged; PSNR with data range 1."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"images must be [C, H, W] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """10 log10(1 / MSE) in dB (data range 1); inf for identical images."""
    _check(a, b)
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (taps at -(size-1)/2 .. (size-1)/2), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x / sigma) ** 2 / 2)
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[C, H-10, W-10] local SSIM, float64: the window's weighted means, variances and covariance by a separable
    Gaussian filter (valid positions only)."""
    _check(a, b)
    c, h, w = a.shape
    if h < WINDOW or w < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {h}x{w}")
    g = gaussian_window()
    kh, kw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def filt(x):   # [1, C, H, W] -> the Gaussian-weighted local mean per channel
        return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)

    x, y = a.double().unsqueeze(0), b.double().unsqueeze(0)
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = K1 ** 2, K2 ** 2   # (K * data range)^2, data range 1
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s[0]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean SSIM over channels and positions: 1 for identical images."""
    return float(ssim_map(a, b).mean())
