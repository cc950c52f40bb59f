"""dcc/runtime/image_metrics.py: PSNR and SSIM against known values, against a direct float64 evaluation of Wang et
al.'s formula (every window summed out, no separable filter), and against scikit-image where it is installed."""
import math

import pytest
import torch

from dcc.runtime.image_metrics import K1, K2, psnr, ssim


def _images(seed=0, shape=(3, 17, 23)):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    b = (a + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)   # correlated: SSIM well inside (0, 1)
    return a, b


def _ssim_direct(a: torch.Tensor, b: torch.Tensor, size=11, sigma=1.5) -> float:
    """SSIM by its definition: at each position where the window fits, the Gaussian-weighted means, variances and
    covariance of the two windows; the mean over positions and channels. Float64 throughout."""
    r = (size - 1) // 2
    ii, jj = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    w = torch.exp(-(ii.double() ** 2 + jj.double() ** 2) / (2 * sigma ** 2))
    w = w / w.sum()
    c1, c2 = K1 ** 2, K2 ** 2
    vals = []
    for ch in range(a.shape[0]):
        x, y = a[ch].double(), b[ch].double()
        for i in range(r, x.shape[0] - r):
            for j in range(r, x.shape[1] - r):
                wx, wy = x[i - r:i + r + 1, j - r:j + r + 1], y[i - r:i + r + 1, j - r:j + r + 1]
                mx, my = (w * wx).sum(), (w * wy).sum()
                vx, vy = (w * (wx - mx) ** 2).sum(), (w * (wy - my) ** 2).sum()
                cxy = (w * (wx - mx) * (wy - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(torch.stack(vals).mean())


def test_identical_images():
    a, _ = _images()
    assert psnr(a, a.clone()) == math.inf
    assert ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_constant_shift():
    a = torch.full((3, 16, 16), 0.25)
    for d in (0.5, 0.1, 1 / 255):
        assert psnr(a, a + d) == pytest.approx(-20 * math.log10(d), abs=1e-6)   # 10 log10(1 / d^2)


def test_ssim_of_two_flat_images():
    # no variance anywhere: SSIM is the luminance term alone, (2pq + C1) / (p^2 + q^2 + C1)
    p, q = 0.25, 0.625   # exact in float32
    want = (2 * p * q + K1 ** 2) / (p * p + q * q + K1 ** 2)
    assert ssim(torch.full((3, 12, 12), p), torch.full((3, 12, 12), q)) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_equals_the_direct_formula(seed):
    a, b = _images(seed)
    got, want = ssim(a, b), _ssim_direct(a, b)
    assert 0.2 < want < 0.99
    assert got == pytest.approx(want, abs=1e-10)
    assert ssim(b, a) == pytest.approx(got, abs=1e-12)   # symmetric


def test_ssim_equals_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed")
    a, b = _images(3, (3, 32, 40))
    want = metrics.structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), channel_axis=-1,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert ssim(a, b) == pytest.approx(float(want), abs=1e-6)


def test_errors():
    a, _ = _images()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], a[:, :10])
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:, :5])
