"""Single roundings where the engines round once (dcc/targets/common/rounding.py): torch's float64 -> float16 cast
rounds twice (through float32), round_once does not; fma_f32 is the GPU's FFMA (one rounding of a * b + c)."""
from fractions import Fraction

import numpy as np
import torch

from dcc.targets.common.rounding import fma_f32, round_once


def _rne(v: Fraction, mbits: int, emin: int) -> float:
    """Exact rational -> nearest value with mbits fraction bits (ties to even), subnormals below 2^emin."""
    if v == 0:
        return 0.0
    s, a = (-1 if v < 0 else 1), abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    q = Fraction(2) ** (max(e, emin) - mbits)
    r = a / q
    n, rem = r.numerator // r.denominator, r - r.numerator // r.denominator
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    return s * float(n * q)


def test_torch_rounds_twice_and_round_once_does_not():
    x = torch.tensor([1 + 2 ** -11 + 2 ** -40, -(1 + 2 ** -11 + 2 ** -40)], dtype=torch.float64)
    assert x.to(torch.float16).tolist() == [1.0, -1.0]                # float32 drops 2^-40, then a tie to even
    assert round_once(x, torch.float16).tolist() == [1 + 2 ** -10, -(1 + 2 ** -10)]


def test_round_once_matches_exact_rounding():
    g = torch.Generator().manual_seed(0)
    # values near 16-bit ties: a tie plus or minus a small offset, over many binades, and plain random values
    base = torch.randint(-2000, 2000, (4000,), generator=g).double() * 2.0 ** torch.randint(-30, 5, (4000,), generator=g)
    tie = base + 2.0 ** -12 * base.abs().clamp(min=2 ** -20)
    wiggle = torch.randn(4000, generator=g, dtype=torch.float64) * 2.0 ** -40 * base.abs().clamp(min=2 ** -20)
    x = torch.cat([tie + wiggle, tie, torch.randn(2000, generator=g, dtype=torch.float64) * 100])
    for dtype, mbits, emin in ((torch.float16, 10, -14), (torch.bfloat16, 7, -126)):
        got = round_once(x, dtype).double().tolist()
        want = [_rne(Fraction(v), mbits, emin) for v in x.tolist()]
        assert got == want, dtype
    assert (x.to(torch.float16).double() != round_once(x, torch.float16).double()).any()   # torch's cast differs


def test_fma_f32_is_one_rounding():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3000, generator=g).to(torch.float16).float()          # 11-bit operand, as QServe's ascale
    b = (torch.randn(3000, generator=g) * 1000).float()
    c = -(a * b) * (1 + torch.randn(3000, generator=g) * 1e-4)           # near cancellation
    got = fma_f32(a, b, c)
    want = np.array([_rne(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)), 23, -126)
                     for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())], dtype=np.float32)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))
    assert not torch.equal(got, (a * b + c))                            # two roundings differ somewhere
