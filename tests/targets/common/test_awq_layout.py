"""TinyChat v2 layout: pack_qweight against two slow, independent goldens (the index formula of targets.md 2A and
deepcompressor's word/permute description), exact round trips, scale padding, the decoded weight, shape errors."""
import pytest
import torch

from dcc.ir.formats import QuantSpec, quantize_tensor
from dcc.targets.common.awq_layout import (GROUP_SIZES, KERNEL_GROUP_SIZES, LayoutError, check_shape, decode_weight,
                                         pack_qweight, pack_scales, padded_groups, unpack_qweight, unpack_scales)


def _codes(n, k, seed=0, dtype=torch.int16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, k), generator=g).to(dtype)


def _u16(qweight):  # the 16-bit patterns of an int16 tensor, as python ints 0..65535
    return (qweight.to(torch.int32) & 0xFFFF).tolist()


def _bits(t):  # bit-exact comparison of 16-bit floats (tells -0.0 from +0.0)
    return t.contiguous().view(torch.int16)


# ------------------------------------------------------------------------------------------------ goldens

def _golden_index_formula(codes):
    """targets.md 2A, element by element: p = k%32 = 8a+2b+c -> p' = 8b+2a+c; p'%8 = 2d+e -> P = 8(p'//8)+4e+d;
    kr = 32(k//32)+P, kt = kr//64, f = 64(n%4)+kr%64; the code is nibble f%4 of word [n//4][64kt + f//4]."""
    n_rows, k_cols = len(codes), len(codes[0])
    out = [[0] * k_cols for _ in range(n_rows // 4)]
    for n in range(n_rows):
        for k in range(k_cols):
            p = k % 32
            a, b, c = p // 8, (p % 8) // 2, p % 2
            p1 = 8 * b + 2 * a + c
            d, e = (p1 % 8) // 2, p1 % 2
            big_p = 8 * (p1 // 8) + 4 * e + d
            kr = 32 * (k // 32) + big_p
            kt = kr // 64
            f = 64 * (n % 4) + kr % 64
            out[n // 4][64 * kt + f // 4] |= codes[n][k] << (4 * (f % 4))
    return out


def _golden_words_then_permute(codes):
    """deepcompressor.md 3.2: per 32-chunk, word j = e[j] | e[8+j]<<4 | e[16+j]<<8 | e[24+j]<<12 giving [N, K/4];
    then view (N/4, 4, K/64, 16), permute (0, 2, 1, 3), reshape (N/4, K)."""
    n_rows, k_cols = len(codes), len(codes[0])
    words = []
    for n in range(n_rows):
        row = []
        for chunk in range(k_cols // 32):
            e = codes[n][32 * chunk: 32 * chunk + 32]
            for j in range(8):
                row.append(e[j] | (e[8 + j] << 4) | (e[16 + j] << 8) | (e[24 + j] << 12))
        words.append(row)
    t = torch.tensor(words, dtype=torch.int64)  # [N, K/4], 0..65535
    t = t.reshape(n_rows // 4, 4, k_cols // 64, 16).permute(0, 2, 1, 3).reshape(n_rows // 4, k_cols)
    return t.tolist()


@pytest.mark.parametrize("shape,seed", [((8, 128), 1), ((4, 64), 2), ((12, 192), 3)])
def test_pack_matches_both_goldens(shape, seed):
    codes = _codes(*shape, seed=seed)
    packed = pack_qweight(codes)
    assert packed.dtype == torch.int16 and tuple(packed.shape) == (shape[0] // 4, shape[1])
    g1 = _golden_index_formula(codes.tolist())
    g2 = _golden_words_then_permute(codes.tolist())
    assert g1 == g2
    assert _u16(packed) == g1


def test_golden_spot_checks():
    # the documented orders: a code at k=1 goes to nibble 2 of word 0 ... check the placement of single codes
    def where(n, k):
        codes = [[0] * 64 for _ in range(4)]
        codes[n][k] = 1
        got = _u16(pack_qweight(torch.tensor(codes)))
        hits = [(w, bit) for w, v in enumerate(got[0]) for bit in range(16) if v >> bit & 1]
        assert len(hits) == 1
        return hits[0][0], hits[0][1] // 4

    assert where(0, 0) == (0, 0)
    assert where(0, 8) == (0, 1)    # word 0 = e[0] | e[8]<<4 | e[16]<<8 | e[24]<<12
    assert where(0, 24) == (0, 3)
    assert where(0, 1) == (1, 0)
    assert where(0, 31) == (7, 3)
    assert where(0, 32) == (8, 0)   # second 32-run of the same row follows
    assert where(1, 0) == (16, 0)   # row 1's 16 words follow row 0's within the 64-k block
    assert where(3, 63) == (63, 3)


# ------------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("n", [4, 12, 576, 1536])
@pytest.mark.parametrize("k", [64, 576, 1536])
def test_unpack_inverts_pack(n, k):
    codes = _codes(n, k, seed=n * 7 + k)
    packed = pack_qweight(codes)
    assert tuple(packed.shape) == (n // 4, k) and packed.dtype == torch.int16
    back = unpack_qweight(packed)
    assert back.dtype == torch.int16 and torch.equal(back, codes)


def test_all_fifteen_sets_the_sign_bit():
    codes = torch.full((8, 128), 15, dtype=torch.int16)
    packed = pack_qweight(codes)
    assert torch.equal(packed, torch.full((2, 128), -1, dtype=torch.int16))
    assert torch.equal(unpack_qweight(packed), codes)
    # nibble 3 >= 8 alone also makes the word negative
    c = torch.zeros(4, 64, dtype=torch.int16)
    c[0, 24] = 8
    p = pack_qweight(c)
    assert int(p[0, 0]) == -0x8000 and torch.equal(unpack_qweight(p), c)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_int_dtype(dtype):
    codes = _codes(8, 128, seed=5)
    assert torch.equal(pack_qweight(codes.to(dtype)), pack_qweight(codes))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="0..15"):
        pack_qweight(torch.full((4, 64), 16))
    with pytest.raises(ValueError, match="0..15"):
        pack_qweight(torch.full((4, 64), -1))
    with pytest.raises(ValueError, match="integer"):
        pack_qweight(torch.zeros(4, 64))
    with pytest.raises(LayoutError):
        pack_qweight(torch.zeros(6, 64, dtype=torch.int16))
    with pytest.raises(LayoutError):
        pack_qweight(torch.zeros(4, 96, dtype=torch.int16))


# ------------------------------------------------------------------------------------------------ scales

def _round_up(x, m):
    r = 0
    while r < x:
        r += m
    return r


def test_padded_groups():
    for g in range(0, 70):
        assert padded_groups(g, 128) == _round_up(g, 8)
        assert padded_groups(g, 256) == _round_up(g, 8)
        assert padded_groups(g, 64) == _round_up(g, 16)
        assert padded_groups(g, 32) == _round_up(g, 32)
    with pytest.raises(ValueError):
        padded_groups(4, 48)


def _qparams(n, groups, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(dtype)
    zero = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.int16)
    return scale, zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size,k,rows", [(128, 1152, 16), (128, 1024, 8), (64, 576, 16), (64, 2048, 32),
                                               (32, 576, 32), (32, 1088, 64)])
def test_pack_scales_layout(group_size, k, rows, dtype):
    n, groups = 12, k // group_size
    scale, zero = _qparams(n, groups, seed=k + group_size, dtype=dtype)
    scales, szeros = pack_scales(scale, zero, group_size, dtype)
    assert tuple(scales.shape) == tuple(szeros.shape) == (rows, n)
    assert scales.dtype == szeros.dtype == dtype
    assert rows % (8 * {128: 1, 64: 2, 32: 4}[group_size]) == 0
    # group-major (transposed), no interleave
    for gi in range(groups):
        for ni in range(n):
            assert _bits(scales[gi, ni]) == _bits(scale[ni, gi])
            want = torch.tensor(-(float(scale[ni, gi]) * int(zero[ni, gi])), dtype=torch.float64).to(dtype)
            assert _bits(szeros[gi, ni]) == _bits(want)
    # padding rows are +0
    assert not bool(_bits(scales[groups:]).any()) and not bool(_bits(szeros[groups:]).any())
    s_back, sz_back = unpack_scales(scales, szeros, groups)
    assert tuple(s_back.shape) == tuple(sz_back.shape) == (n, groups)
    assert torch.equal(_bits(s_back), _bits(scale))
    assert torch.equal(_bits(sz_back), _bits(szeros[:groups].t()))


def test_pack_scales_matches_fp32_product_rounding():
    # the reference converter forms s*z in float32 (exact for 16-bit s and z <= 15) and rounds once to fp16
    scale, zero = _qparams(64, 9, seed=11)
    _, szeros = pack_scales(scale, zero, 128)
    ref = (-(scale.float() * zero.float())).half()
    assert torch.equal(_bits(szeros[:9].t()), _bits(ref))


def test_pack_scales_rejects_unrounded_scale():
    scale = torch.full((4, 1), 0.1, dtype=torch.float32)  # 0.1 is not an fp16 value
    with pytest.raises(ValueError, match="representable"):
        pack_scales(scale, torch.zeros(4, 1, dtype=torch.int16), 128)
    with pytest.raises(ValueError, match="integer"):
        pack_scales(torch.ones(4, 1, dtype=torch.float16), torch.full((4, 1), 0.5), 128)


# ------------------------------------------------------------------------------------------------ decode

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group_size", [(8, 128, 128), (12, 576, 64), (16, 256, 32), (64, 1152, 128)])
def test_decode_weight_exact(n, k, group_size, dtype):
    codes = _codes(n, k, seed=n + k)
    scale, zero = _qparams(n, k // group_size, seed=k, dtype=dtype)
    scales, szeros = pack_scales(scale, zero, group_size, dtype)
    w = decode_weight(pack_qweight(codes), scales, szeros, group_size, k)
    assert w.dtype == dtype and tuple(w.shape) == (n, k)
    # reference: rnd(q*s + rnd(-s*z)), q*s + sz exact in float64, one rounding at the end
    s64 = scale.to(torch.float64).repeat_interleave(group_size, dim=1)
    sz64 = (-(scale.to(torch.float64) * zero.to(torch.float64))).to(dtype).to(torch.float64)
    ref = (codes.to(torch.float64) * s64 + sz64.repeat_interleave(group_size, dim=1)).to(dtype)
    assert torch.equal(_bits(w), _bits(ref))


def test_decode_weight_equals_fake_quant():
    # the compiler's fake quantization (zero_mode "scaled") is exactly what the packed tensors decode to
    w = torch.randn(32, 384, generator=torch.Generator().manual_seed(3)) * 0.05
    spec = QuantSpec(dtype="int4", symmetric=False, group_size=128, scale_dtype="float16", zero_mode="scaled")
    qt = quantize_tensor(w, spec)
    scales, szeros = pack_scales(qt.scale, qt.zero, 128)
    got = decode_weight(pack_qweight(qt.codes), scales, szeros, 128, 384)
    assert torch.equal(_bits(got), _bits(qt.dequantize(torch.float16)))


def test_decode_weight_rejects_mismatches():
    codes = _codes(8, 256)
    scale, zero = _qparams(8, 2)
    scales, szeros = pack_scales(scale, zero, 128)
    q = pack_qweight(codes)
    with pytest.raises(LayoutError):
        decode_weight(q, scales, szeros, 128, 128)  # wrong in_features
    with pytest.raises(LayoutError):
        decode_weight(q, scales[:2], szeros[:2], 128, 256)  # scale rows not padded
    with pytest.raises(LayoutError):
        decode_weight(q, scales, szeros.to(torch.bfloat16), 128, 256)


# ------------------------------------------------------------------------------------------------ shapes

def test_check_shape_accepts_good_shapes():
    for g in GROUP_SIZES:
        check_shape("model.layers.0.mlp.up_proj", 1536, 576 if g != 128 else 1024, g)
    assert KERNEL_GROUP_SIZES == (128,)


@pytest.mark.parametrize("n,k,g,needle", [
    (1536, 576, 128, "in_features 576 is not a multiple of group size 128"),
    (1538, 1024, 128, "out_features 1538 is not a multiple of 4"),
    (1536, 96, 32, "in_features 96 is not a multiple of 64"),
    (1536, 1024, 256, "group size 256 is not one of"),
    (1536, 1024, 16, "group size 16"),
])
def test_check_shape_errors_name_the_layer(n, k, g, needle):
    name = "model.layers.3.self_attn.k_proj"
    with pytest.raises(LayoutError) as ei:
        check_shape(name, n, k, g)
    msg = str(ei.value)
    assert msg.startswith(name + ":") and needle in msg
    assert isinstance(ei.value, ValueError)


def test_check_shape_reports_every_problem():
    with pytest.raises(LayoutError) as ei:
        check_shape("lm.fc", 6, 96, 128)
    msg = str(ei.value)
    assert "out_features 6" in msg and "multiple of 64" in msg and "group size 128" in msg


def test_float_zero_is_stored_as_the_scaled_zero_and_decodes_exactly():
    from dcc.ir.formats import QuantSpec, quantize_tensor
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 128, generator=g) * 0.02
    qt = quantize_tensor(w, QuantSpec("int4", False, 64, "float16", "float"))
    scales, szeros = pack_scales(qt.scale, qt.zero, 64, torch.float16, float_zero=True)
    assert torch.equal(szeros[:2].t(), qt.zero)
    dec = decode_weight(pack_qweight(qt.codes), scales, szeros, 64, 128)
    assert torch.equal(dec.float(), qt.dequantize())
    with pytest.raises(ValueError):
        pack_scales(qt.scale, qt.zero.float() + 1e-4, 64, torch.float16, float_zero=True)


def test_the_cuda_runtime_pads_scale_rows_as_the_layout_does():
    """dcc.runtime.cuda.ops checks scale shapes without importing the target: its padding rule must agree."""
    from dcc.runtime.cuda.ops import _scale_rows
    from dcc.targets.common.awq_layout import GROUP_SIZES, padded_groups
    for g in GROUP_SIZES:
        for n in range(0, 80):
            assert _scale_rows(n, g) == padded_groups(n, g), (n, g)
