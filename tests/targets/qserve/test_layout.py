"""QServe layout: qweight against a slow per-element golden of the byte/nibble formula (targets.md 1A) and single-code
placements, the s2 reorder, a byte-level simulation of the g128 kernel's dequant, exact round trips, shape errors,
kernel notes, and the decoded weights."""
from fractions import Fraction

import pytest
import torch

from dcc.targets.qserve.layout import (LayoutError, check_shape, codes_per_channel, decode_w4a8, decode_w8a8,
                                       int8_codes_g128, kernel_notes, pack_qweight, pack_s2, pack_w8, unpack_qweight,
                                       unpack_s2)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _codes(n, k, seed=0):
    return torch.randint(0, 16, (n, k), generator=_gen(seed), dtype=torch.int16)


def _u8(qweight):  # flat byte values 0..255 of an int8 tensor, as python ints
    return (qweight.to(torch.int16) & 0xFF).reshape(-1).tolist()


# ------------------------------------------------------------------------------------------------ qweight goldens

def _golden_bytes(codes):
    """targets.md 1A element by element: byte ((((a0*K/32 + b0)*8 + a3)*4 + b2)*2 + b1)*8 + a2*4 + b3, nibble a1."""
    n_rows, k_cols = len(codes), len(codes[0])
    out = [0] * (n_rows * k_cols // 2)
    for n in range(n_rows):
        a0, a1, a2, a3 = n // 32, (n % 32) // 16, (n % 16) // 8, n % 8
        for k in range(k_cols):
            b0, b1, b2, b3 = k // 32, (k % 32) // 16, (k % 16) // 4, k % 4
            byte = ((((a0 * (k_cols // 32) + b0) * 8 + a3) * 4 + b2) * 2 + b1) * 8 + a2 * 4 + b3
            out[byte] |= codes[n][k] << (4 * a1)
    return out


@pytest.mark.parametrize("shape,seed", [((64, 64), 1), ((32, 96), 2), ((96, 32), 3)])
def test_pack_matches_slow_formula(shape, seed):
    codes = _codes(*shape, seed=seed)
    packed = pack_qweight(codes)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (shape[0], shape[1] // 2)
    assert _u8(packed) == _golden_bytes(codes.tolist())


def _where(n, k, rows=64, cols=64):
    """(flat byte, nibble) holding a lone code 1 at (n, k)."""
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    codes[n, k] = 1
    hits = [(i, bit // 4) for i, v in enumerate(_u8(pack_qweight(codes))) for bit in range(8) if v >> bit & 1]
    assert len(hits) == 1
    return hits[0]


def test_single_code_placement():
    assert _where(0, 0) == (0, 0)
    assert _where(16, 0) == (0, 1)     # a1 = 1: row 16 is the high nibble of row 0's byte
    assert _where(8, 0) == (4, 0)      # a2 = 1: bytes 4..7 of the lane
    assert _where(24, 0) == (4, 1)     # a1 = a2 = 1
    assert _where(0, 1) == (1, 0)      # b3: 4 consecutive k in consecutive bytes
    assert _where(0, 16) == (8, 0)     # b1 = 1: second 8 bytes of the lane
    assert _where(0, 4) == (16, 0)     # b2 = 1: next lane (lane = a3*4 + b2, 16 bytes each)
    assert _where(1, 0) == (64, 0)     # a3 = 1: lane 4
    assert _where(0, 32) == (512, 0)   # b0 = 1: next 32x32 tile = 512 bytes
    assert _where(32, 0) == (1024, 0)  # a0 = 1: after the K/32 = 2 tiles of the first 32 rows
    assert _where(24, 20) == (28, 1)   # a1=a2=1, b1=b2=1: byte ((0*4+1)*2+1)*8 + 4 = 28
    assert _where(63, 63) == (2047, 1)


def test_byte_sign_and_values():
    codes = torch.full((32, 32), 15, dtype=torch.int16)
    assert torch.equal(pack_qweight(codes), torch.full((32, 16), -1, dtype=torch.int8))  # 0xFF
    c = torch.zeros(32, 32, dtype=torch.int16)
    c[16, 0] = 8                        # high nibble 8 -> byte 0x80 = -128
    c[0, 0] = 7
    p = pack_qweight(c)
    assert int(p[0, 0]) == -128 + 7 and torch.equal(unpack_qweight(p, 32, 32), c)


@pytest.mark.parametrize("n,k", [(32, 32), (96, 160), (64, 256), (160, 64)])
def test_qweight_round_trip(n, k):
    codes = _codes(n, k, seed=n + 3 * k)
    back = unpack_qweight(pack_qweight(codes), n, k)
    assert back.dtype == torch.int16 and torch.equal(back, codes)
    assert torch.equal(codes_per_channel(pack_qweight(codes), n, k), codes)
    assert torch.equal(pack_qweight(codes.to(torch.int64)), pack_qweight(codes.to(torch.uint8)))


def test_pack_qweight_rejects():
    with pytest.raises(LayoutError, match=r"\[0, 15\]"):
        pack_qweight(torch.full((32, 32), 16))
    with pytest.raises(LayoutError, match=r"\[0, 15\]"):
        pack_qweight(torch.full((32, 32), -1))
    with pytest.raises(LayoutError, match="integers"):
        pack_qweight(torch.full((32, 32), 0.5))
    with pytest.raises(LayoutError, match="out_features 48"):
        pack_qweight(torch.zeros(48, 32, dtype=torch.int16))
    with pytest.raises(LayoutError, match=r"expected \[32, 32\]"):
        unpack_qweight(torch.zeros(32, 16, dtype=torch.int8), 32, 64)


# ------------------------------------------------------------------------------------------------ s2

@pytest.mark.parametrize("n,g", [(32, 1), (96, 5), (256, 3)])
def test_s2_round_trip(n, g):
    t = torch.randint(-128, 128, (n, g), generator=_gen(n + g), dtype=torch.int16)
    t[0, 0], t[-1, -1] = -128, 127
    packed = pack_s2(t)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (g, n)
    back = unpack_s2(packed)
    assert back.dtype == torch.int16 and torch.equal(back, t)


def test_s2_reorder_golden():
    n = 64
    t = torch.stack([torch.arange(n), torch.arange(n) + 64], dim=1)  # channel n holds n (group 0), n + 64 (group 1)
    packed = pack_s2(t)
    # derived from "stored position p = 4*(n%8) + (n%32)//8 holds channel n", block by block of 32
    expected = [0] * n
    for ch in range(n):
        expected[32 * (ch // 32) + 4 * (ch % 8) + (ch % 32) // 8] = ch
    assert expected[:12] == [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26]
    assert expected[28:36] == [7, 15, 23, 31, 32, 40, 48, 56]
    assert packed[0].tolist() == expected                      # group-major: row g is group g
    assert packed[1].tolist() == [c + 64 for c in expected]


def test_pack_s2_rejects():
    with pytest.raises(LayoutError, match=r"\[-128, 127\]"):
        pack_s2(torch.full((32, 1), 128))
    with pytest.raises(LayoutError, match="multiple of 32"):
        pack_s2(torch.zeros(48, 1, dtype=torch.int16))


# ------------------------------------------------------------------------------------------------ g128 kernel

def _kernel_w8(qweight, s2_scales, s2_zeros, n, k):
    """w8 [n][k] rebuilt the way w4a8_per_group/gemm_cuda.cu's share_to_reg_one_stage_B does, byte by byte: lane
    a3*4 + b2 of tile (a0, b0) holds 16 bytes = uint32 words x, y, z, w; it loads the uint32 of s2 / zeros at column
    32*a0 + 4*a3. x and z pair with scale byte 0 (low nibbles) and 2 (high), y and w with bytes 1 and 3; z and w
    are k-half 1. The mma then takes x-low as n-tile 0-7, y-low 8-15, x-high 16-23, y-high 24-31. q*s2 is an unsigned
    byte product and __vadd4 adds bytes mod 256; the mma reads the byte as int8."""
    qb, sb, zb = _u8(qweight), (s2_scales.to(torch.int16) & 0xFF).tolist(), (s2_zeros.to(torch.int16) & 0xFF).tolist()
    out = [[None] * k for _ in range(n)]
    for a0 in range(n // 32):
        for b0 in range(k // 32):
            g = (32 * b0) // 128
            for lane in range(32):
                a3, b2 = lane // 4, lane % 4
                base = ((a0 * (k // 32) + b0) * 32 + lane) * 16
                for word in range(4):
                    for bi in range(4):
                        v = qb[base + 4 * word + bi]
                        for nib, j in ((v & 0xF, word % 2), (v >> 4, word % 2 + 2)):
                            col = 32 * a0 + 4 * a3 + j
                            byte = (nib * sb[g][col] + zb[g][col]) & 0xFF
                            ch = 32 * a0 + a3 + 8 * j
                            out[ch][32 * b0 + 16 * (word // 2) + 4 * b2 + bi] = byte - 256 if byte >= 128 else byte
    return out


def _g128_data(n, k, seed):
    gen = _gen(seed)
    g = k // 128
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int16)
    s2 = torch.randint(1, 18, (n, g), generator=gen, dtype=torch.int16)          # q*s2 <= 15*17 = 255
    z = torch.randint(0, 128, (n, g), generator=gen, dtype=torch.int16)          # w8 = q*s2 - z in [-127, 255-z]
    qs = q.view(n, g, 128) * s2.unsqueeze(-1)
    z = torch.maximum(z, (qs.amax(-1) - 127).clamp(min=0))                       # keep every w8 <= 127
    w8 = (qs - z.unsqueeze(-1)).reshape(n, k)
    s1 = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    return q, s2, z, w8, s1


def test_g128_layout_matches_kernel_simulation():
    n, k = 64, 256
    q, s2, z, w8, _ = _g128_data(n, k, seed=7)
    qweight, s2p, zp = pack_qweight(q), pack_s2(s2), pack_s2(-z)
    assert _kernel_w8(qweight, s2p, zp, n, k) == w8.tolist()
    assert torch.equal(int8_codes_g128(qweight, s2p, zp, n, k), w8)


def test_decode_g128():
    n, k = 96, 256
    q, s2, z, w8, s1 = _g128_data(n, k, seed=11)
    w = decode_w4a8(pack_qweight(q), s1, n, k, s2_scales=pack_s2(s2), s2_zeros=pack_s2(-z))
    assert w.dtype == torch.float32
    ref = s1.to(torch.float64).unsqueeze(1) * w8.to(torch.float64)   # exact; equal to float32 means no rounding
    assert torch.equal(w.to(torch.float64), ref)


def test_g128_bounds():
    n, k = 32, 128
    q = torch.full((n, k), 15, dtype=torch.int16)
    qweight = pack_qweight(q)
    zero = torch.zeros(1, n, dtype=torch.int8)
    with pytest.raises(LayoutError, match="s2_scales.*270"):
        int8_codes_g128(qweight, torch.full((1, n), 18, dtype=torch.int8), zero, n, k)
    with pytest.raises(LayoutError, match="s2_scales"):   # int8 -1 is the unsigned byte 255 to the kernel
        int8_codes_g128(qweight, torch.full((1, n), -1, dtype=torch.int8), zero, n, k)
    with pytest.raises(LayoutError, match="s2_zeros.*255"):   # 15*17 + 0 = 255 wraps to -1 in the kernel
        int8_codes_g128(qweight, torch.full((1, n), 17, dtype=torch.int8), zero, n, k)
    ok = int8_codes_g128(qweight, torch.full((1, n), 17, dtype=torch.int8), torch.full((1, n), -128,
                                                                                        dtype=torch.int8), n, k)
    assert torch.equal(ok, torch.full((n, k), 127, dtype=torch.int16))
    with pytest.raises(LayoutError, match="expected"):
        int8_codes_g128(qweight, torch.zeros(2, n, dtype=torch.int8), zero, n, k)


# ------------------------------------------------------------------------------------------------ per channel

def test_decode_per_channel():
    n, k = 32, 64
    gen = _gen(5)
    q = _codes(n, k, seed=5)
    s1 = (torch.rand(n, generator=gen) * 0.05 + 1e-4).to(torch.float16)
    szeros = (torch.rand(n, generator=gen) * 0.5 - 0.1).to(torch.float16)
    w = decode_w4a8(pack_qweight(q), s1, n, k, s1_szeros=szeros)
    assert w.dtype == torch.float32 and tuple(w.shape) == (n, k)
    for r in range(0, n, 7):
        for c in range(0, k, 5):
            exact = int(q[r, c]) * Fraction(float(s1[r])) - Fraction(float(szeros[r]))
            assert Fraction(float(q[r, c]) * float(s1[r]) - float(szeros[r])) == exact   # float64 is exact
            assert float(w[r, c]) == float(torch.tensor(float(exact), dtype=torch.float64).to(torch.float32))


def test_decode_w4a8_rejects():
    q = pack_qweight(_codes(32, 128))
    s1 = torch.ones(32, dtype=torch.float16)
    with pytest.raises(LayoutError, match="not both"):
        decode_w4a8(q, s1, 32, 128)
    with pytest.raises(LayoutError, match="s1_scales must be float16"):
        decode_w4a8(q, s1.float(), 32, 128, s1_szeros=s1)


# ------------------------------------------------------------------------------------------------ shapes, notes

def test_check_shape():
    check_shape("l", 4096, 4096, 0)
    check_shape("l", 32, 128, 128)
    check_shape("l", 96, 160, 0)
    with pytest.raises(LayoutError, match=r"^model\.layers\.3\.mlp\.down_proj: out_features 48 .* 32"):
        check_shape("model.layers.3.mlp.down_proj", 48, 64, 0)
    with pytest.raises(LayoutError, match="in_features 40 is not a multiple of 32"):
        check_shape("l", 32, 40, 0)
    with pytest.raises(LayoutError, match="in_features 160 is not a multiple of the group size 128"):
        check_shape("l", 32, 160, 128)
    with pytest.raises(LayoutError, match=r"group size 64 .* per-channel \(0\) or 128"):
        check_shape("l", 32, 128, 64)
    with pytest.raises(LayoutError, match="out_features 48.*; in_features 40"):   # every problem, on one line
        check_shape("l", 48, 40, 0)
    check_shape("l", 30, 50, 0, bits=8)
    with pytest.raises(LayoutError, match="W8A8 is per channel"):
        check_shape("l", 32, 128, 128, bits=8)


def test_kernel_notes():
    assert kernel_notes(4096, 4096, 0) == [] and kernel_notes(4096, 4096, 128) == []
    assert kernel_notes(4096, 4096, 0, bits=8) == []
    (note,) = kernel_notes(96, 4096, 0)
    assert "multiple of 64" in note and "32 output columns" in note
    (note,) = kernel_notes(192, 4096, 0)
    assert "multiple of 128" in note and "M > 256" in note
    assert "M > 128" in kernel_notes(192, 4096, 128)[0]
    assert "every tile" in kernel_notes(4096, 4064, 0)[0]
    assert "M < 128 tile" in kernel_notes(4096, 4032, 0)[0]
    assert "prologue" in kernel_notes(4096, 128, 128)[0]
    assert "multiple of 256" in kernel_notes(320, 4096, 0, bits=8)[0]


# ------------------------------------------------------------------------------------------------ W8A8

def test_w8a8():
    codes = torch.randint(-127, 128, (64, 96), generator=_gen(3), dtype=torch.int16)
    codes[0, 0], codes[0, 1] = -127, 127
    w = pack_w8(codes)
    assert w.dtype == torch.int8 and torch.equal(w.to(torch.int16), codes)
    scale = (torch.rand(64, generator=_gen(4)) * 0.01).to(torch.float16)
    d = decode_w8a8(w, scale)
    assert torch.equal(d.to(torch.float64), codes.to(torch.float64) * scale.to(torch.float64).unsqueeze(1))
    with pytest.raises(LayoutError, match=r"\[-127, 127\]"):
        pack_w8(torch.full((32, 32), -128))
