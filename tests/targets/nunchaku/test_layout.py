"""Nunchaku layouts: qweight, wscales/vectors, NVFP4 micro-scales and the low-rank fragments against slow per-element
goldens of the targets.md 3A formulas (written out again here) and single-element placements derived by hand from the
mma fragment facts; exact round trips at several (also padded) shapes; the padding helpers; shape errors; and the AWQ
W4A16 layout against the targets.md 2A formula and TinyChat's bytes."""
import sys

import pytest
import torch

from dcc.targets.nunchaku import layout_awq
from dcc.targets.nunchaku.layout import (LayoutError, crop, pack_channel_vector, pack_lora_down, pack_lora_up,
                                         pack_micro_scales, pack_qweight, pack_wscales, pad_channel_vector,
                                         pad_codes, pad_group_scales, pad_lora_down, pad_lora_up, padded_dims,
                                         unpack_channel_vector, unpack_lora_down, unpack_lora_up,
                                         unpack_micro_scales, unpack_qweight, unpack_wscales)
from dcc.targets.common import awq_layout as tinychat


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int4(n, k, seed=0):
    return torch.randint(-8, 8, (n, k), generator=_gen(seed), dtype=torch.int8)


def _fp4(n, k, seed=0):
    return torch.randint(0, 16, (n, k), generator=_gen(seed), dtype=torch.int8)


def _u8(t):  # flat byte values 0..255 of an int8 / uint8 / fp8 tensor, as python ints
    if t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return (t.to(torch.int16) & 0xFF).reshape(-1).tolist()


def _bits16(t):  # bit patterns of a 16-bit float tensor (tells -0.0 from +0.0, keeps NaN payloads)
    return t.contiguous().view(torch.int16)


def _halves(n, g, dtype=torch.bfloat16, seed=0):
    return torch.randn(n, g, generator=_gen(seed)).to(dtype)


# ------------------------------------------------------------------------------------------------ qweight

def _golden_qweight(codes):
    """targets.md 3A element by element: n = 128nt + 16np + 8ns + nl, k = 64kt + 32ks + 8kl + j; int32 word
    ((((nt*K/64 + kt)*8 + np)*8 + nl)*4 + kl)*4 + 2ns + ks, nibble j = (value & 0xF) << 4j; words written out
    little endian with int.to_bytes."""
    n_rows, k_cols = len(codes), len(codes[0])
    words = [0] * (n_rows * k_cols // 8)
    for n in range(n_rows):
        nt, np_, ns, nl = n // 128, (n % 128) // 16, (n % 16) // 8, n % 8
        for k in range(k_cols):
            kt, ks, kl, j = k // 64, (k % 64) // 32, (k % 32) // 8, k % 8
            word = ((((nt * (k_cols // 64) + kt) * 8 + np_) * 8 + nl) * 4 + kl) * 4 + 2 * ns + ks
            words[word] |= (codes[n][k] & 0xF) << (4 * j)
    return list(b"".join(w.to_bytes(4, "little") for w in words))


@pytest.mark.parametrize("n,k", [(128, 128), (256, 256), (128, 384)])
@pytest.mark.parametrize("fp4", [False, True])
def test_qweight_matches_golden_formula(n, k, fp4):
    codes = _fp4(n, k, seed=n + k) if fp4 else _int4(n, k, seed=n + k)
    packed = pack_qweight(codes, fp4=fp4)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (n, k // 2)
    assert _u8(packed) == _golden_qweight(codes.tolist())


# Hand-derived placements in a [256, 256] weight (K/64 = 4, so one (nt, kt) tile = 128 x 64 codes = 1024 words):
# a word is 4 bytes with nibble j in byte j // 2 (low nibble for even j); lane 4*nl + kl owns words 16*lane .. +15
# of its n-pack (4 words per n-pack np: (ns, ks) = (0,0), (0,1), (1,0), (1,1)).
QWEIGHT_PLACEMENTS = [
    # (n, k, byte, shift, why)
    (0, 0, 0, 0, "word 0, nibble 0"),
    (0, 1, 0, 4, "nibble j = 1 is the high half of byte 0"),
    (0, 2, 1, 0, "nibble 2 -> byte 1"),
    (0, 7, 3, 4, "nibble 7 -> byte 3, high half"),
    (0, 32, 4, 0, "ks = 1: the second k-half register of lane 0 -> word 1"),
    (8, 0, 8, 0, "ns = 1: the second n8 tile of the pack -> word 2"),
    (8, 32, 12, 0, "ns = ks = 1 -> word 3"),
    (0, 8, 16, 0, "kl = 1 -> lane 1 -> word 4"),
    (1, 0, 64, 0, "nl = 1 -> lane 4 -> word 16"),
    (16, 0, 512, 0, "np = 1 -> the next n-pack: 8 lanes x 4 kl x 4 words = 128 words"),
    (0, 64, 4096, 0, "kt = 1 -> the next (nt, kt) tile: 1024 words"),
    (128, 0, 16384, 0, "nt = 1 -> after K/64 = 4 tiles: 4096 words"),
    (255, 255, 32767, 4, "last code -> the last nibble of the buffer"),
]


@pytest.mark.parametrize("n,k,byte,shift,why", QWEIGHT_PLACEMENTS, ids=[p[4] for p in QWEIGHT_PLACEMENTS])
@pytest.mark.parametrize("value,nibble", [(5, 5), (-1, 0xF), (-8, 0x8), (7, 0x7)])
def test_qweight_single_code_placement(n, k, byte, shift, why, value, nibble):
    codes = torch.zeros(256, 256, dtype=torch.int8)
    codes[n, k] = value
    flat = _u8(pack_qweight(codes))
    assert flat[byte] == nibble << shift, why
    assert sum(1 for b in flat if b) == 1


def test_qweight_lane_holds_mma_b_fragment():
    """The 16 bytes of lane 4*nl + kl in n-pack 0 are n = nl (words 0, 1) and n = nl + 8 (words 2, 3), each with
    k = 8kl..8kl+7 then 32 + 8kl..: the B registers of mma.m16n8k64 for n8 tiles 0 and 1."""
    n_idx = torch.arange(128).view(-1, 1).expand(128, 128)
    k_idx = torch.arange(128).view(1, -1).expand(128, 128)
    for nl, kl in [(0, 0), (3, 2), (7, 3)]:
        words = []
        for ns in range(2):
            for ks in range(2):
                # mark exactly the 8 codes this register should hold with j - 8 (nibbles 8..15), everything else 0
                sel = (n_idx == nl + 8 * ns) & (k_idx >= 32 * ks + 8 * kl) & (k_idx < 32 * ks + 8 * kl + 8)
                codes = torch.where(sel, k_idx % 8 - 8, 0).to(torch.int8)
                lane = 4 * nl + kl
                flat = _u8(pack_qweight(codes))
                word = flat[4 * (4 * lane + 2 * ns + ks): 4 * (4 * lane + 2 * ns + ks) + 4]
                words.append(int.from_bytes(bytes(word), "little"))
                assert sum(flat) == sum(word)  # nothing landed elsewhere
        expect = sum((j + 8) << (4 * j) for j in range(8))  # (j - 8) & 0xF
        assert words == [expect] * 4


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (384, 256), (512, 1024)])
def test_qweight_round_trip(n, k):
    codes = _int4(n, k, seed=7)
    assert torch.equal(unpack_qweight(pack_qweight(codes)), codes)
    raw = _fp4(n, k, seed=8)
    assert torch.equal(unpack_qweight(pack_qweight(raw, fp4=True), fp4=True), raw)


def test_qweight_int4_is_twos_complement_of_raw_nibbles():
    codes = _int4(256, 256, seed=3)
    assert torch.equal(pack_qweight(codes), pack_qweight(codes.to(torch.int16) & 0xF, fp4=True))
    # and reading INT4 bytes as raw nibbles gives value & 0xF
    assert torch.equal(unpack_qweight(pack_qweight(codes), fp4=True).to(torch.int16), codes.to(torch.int16) & 0xF)


@pytest.mark.parametrize("n,k", [(100, 60), (129, 130), (1, 1), (3072, 200)])
def test_qweight_padded_round_trip(n, k):
    codes = _int4(n, k, seed=n)
    padded = pad_codes(codes)
    n2, k2, _ = padded_dims(n, k)
    assert tuple(padded.shape) == (n2, k2) and n2 % 128 == 0 and k2 % 128 == 0
    assert not padded[n:].any() and not padded[:, k:].any()
    back = unpack_qweight(pack_qweight(padded))
    assert torch.equal(back, padded)
    assert torch.equal(crop(back, (n, k)), codes)


@pytest.mark.parametrize("shape,match", [
    ((100, 128), r"qweight has shape \(100, 128\): N = 100"),
    ((128, 64), r"qweight has shape \(128, 64\): K = 64"),
    ((128, 130), r"qweight has shape \(128, 130\): K = 130"),
])
def test_qweight_shape_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        pack_qweight(torch.zeros(shape, dtype=torch.int8))


def test_qweight_value_and_dtype_errors():
    codes = torch.zeros(128, 128, dtype=torch.int16)
    codes[0, 0] = 8
    with pytest.raises(LayoutError, match=r"blk\.qweight of shape \(128, 128\): signed int4 codes .* \[0, 8\]"):
        pack_qweight(codes, name="blk.qweight")
    codes[0, 0] = 16
    with pytest.raises(LayoutError, match=r"e2m1 codes must lie in \[0, 15\]"):
        pack_qweight(codes, fp4=True)
    codes[0, 0] = -1
    with pytest.raises(LayoutError, match=r"e2m1 codes must lie in \[0, 15\], got \[-1, 0\]"):
        pack_qweight(codes, fp4=True)
    with pytest.raises(LayoutError, match=r"qweight must be an integer tensor, got torch.float32"):
        pack_qweight(torch.zeros(128, 128))
    with pytest.raises(LayoutError, match=r"qweight must be int8, got torch.int32 with shape \(128, 64\)"):
        unpack_qweight(torch.zeros(128, 64, dtype=torch.int32))
    with pytest.raises(LayoutError, match=r"qweight has shape \(128, 32\): K/2 = 32"):
        unpack_qweight(torch.zeros(128, 32, dtype=torch.int8))
    with pytest.raises(LayoutError, match=r"qweight must be \[N, K\] codes, got shape \(128,\)"):
        pack_qweight(torch.zeros(128, dtype=torch.int8))


# ------------------------------------------------------------------------------------------------ wscales and vectors

def _golden_wscales(values, n_rows, groups):
    """targets.md 3A: n = 128nt + 16a + 8b + 2c + d; position ((nt*G + g)*8 + a)*16 + 4c + 2b + d."""
    out = [None] * (n_rows * groups)
    for n in range(n_rows):
        nt, a, b, c, d = n // 128, (n % 128) // 16, (n % 16) // 8, (n % 8) // 2, n % 2
        for g in range(groups):
            out[((nt * groups + g) * 8 + a) * 16 + 4 * c + 2 * b + d] = values[n][g]
    return out


@pytest.mark.parametrize("n,g", [(128, 1), (256, 4), (384, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wscales_match_golden_formula(n, g, dtype):
    scales = _halves(n, g, dtype, seed=n * g)
    packed = pack_wscales(scales)
    assert packed.dtype == dtype and tuple(packed.shape) == (g, n)
    golden = _golden_wscales(_bits16(scales).tolist(), n, g)
    assert _bits16(packed).reshape(-1).tolist() == golden


def test_wscales_lane_facts():
    """Channel ids as values (exact in fp16): Nunchaku's table, 4 halves per lane."""
    ids = torch.arange(256, dtype=torch.float16).view(-1, 1)
    flat = pack_wscales(ids).reshape(-1).tolist()
    lane = [flat[4 * i: 4 * i + 4] for i in range(64)]
    assert lane[0] == [0, 1, 8, 9]
    assert lane[1] == [2, 3, 10, 11]
    assert lane[3] == [6, 7, 14, 15]
    assert lane[4] == [16, 17, 24, 25]
    assert lane[31] == [118, 119, 126, 127]
    assert lane[32] == [128, 129, 136, 137]  # the second 128-channel block starts over
    # and in general lane l holds {0, 1, 8, 9} + 16*(l // 4) + 2*(l % 4)
    for i in range(32):
        base = 16 * (i // 4) + 2 * (i % 4)
        assert lane[i] == [base, base + 1, base + 8, base + 9]


@pytest.mark.parametrize("n,g,pos,why", [
    (0, 1, 128, "group 1 of block 0: (0*G + 1)*128"),
    (0, 3, 384, "group 3 of block 0"),
    (128, 0, 512, "block 1 starts after G = 4 groups of 128"),
    (129, 2, 512 + 256 + 1, "block 1, group 2, channel 1 -> lane 0, second half"),
])
def test_wscales_group_placement(n, g, pos, why):
    scales = torch.zeros(256, 4, dtype=torch.bfloat16)
    scales[n, g] = 3.0
    flat = pack_wscales(scales).reshape(-1)
    assert flat[pos].item() == 3.0, why
    assert int((flat != 0).sum()) == 1


@pytest.mark.parametrize("n,g", [(128, 1), (256, 48), (640, 6)])
def test_wscales_round_trip_bits(n, g):
    scales = _halves(n, g, torch.float16, seed=g)
    scales[0, 0] = -0.0
    scales[-1, -1] = float("inf")
    back = unpack_wscales(pack_wscales(scales))
    assert torch.equal(_bits16(back), _bits16(scales))


def test_channel_vector_is_the_one_group_case():
    v = _halves(384, 1, torch.bfloat16, seed=5).view(-1)
    packed = pack_channel_vector(v, name="smooth")
    assert tuple(packed.shape) == (384,)
    assert torch.equal(_bits16(packed), _bits16(pack_wscales(v.view(-1, 1)).view(-1)))
    assert torch.equal(_bits16(unpack_channel_vector(packed)), _bits16(v))
    ids = torch.arange(128, dtype=torch.float16)
    assert pack_channel_vector(ids)[:8].tolist() == [0, 1, 8, 9, 2, 3, 10, 11]


def test_padded_vector_and_scales_round_trip():
    bias = _halves(200, 1, torch.bfloat16, seed=1).view(-1)
    padded = pad_channel_vector(bias, name="bias")
    assert tuple(padded.shape) == (256,) and bool((padded[200:] == 1).all())
    assert torch.equal(crop(unpack_channel_vector(pack_channel_vector(padded)), (200,)), bias)
    scales = _halves(200, 3, torch.bfloat16, seed=2)  # K = 192, group 64 -> K' = 256 -> 4 groups
    padded = pad_group_scales(scales, 64)
    assert tuple(padded.shape) == (256, 4) and bool((padded[200:] == 1).all()) and bool((padded[:, 3] == 1).all())
    assert torch.equal(crop(unpack_wscales(pack_wscales(padded)), (200, 3)), scales)


def test_wscales_errors():
    with pytest.raises(LayoutError, match=r"blk\.wscales has shape \(100, 2\): N = 100 is not a positive multiple"):
        pack_wscales(torch.zeros(100, 2, dtype=torch.bfloat16), name="blk.wscales")
    with pytest.raises(LayoutError, match=r"wscales must be float16 or bfloat16 .*float32 with shape \(128, 2\)"):
        pack_wscales(torch.zeros(128, 2))
    with pytest.raises(LayoutError, match=r"wscales has shape \(2, 100\): N = 100"):
        unpack_wscales(torch.zeros(2, 100, dtype=torch.float16))
    with pytest.raises(LayoutError, match=r"bias must be a 1-D per-channel vector, got shape \(128, 1\)"):
        pack_channel_vector(torch.zeros(128, 1, dtype=torch.float16))
    with pytest.raises(LayoutError, match=r"smooth has shape \(200, 1\): N = 200"):
        pack_channel_vector(torch.zeros(200, dtype=torch.float16), name="smooth")


# ------------------------------------------------------------------------------------------------ NVFP4 micro-scales

def _golden_micro(raw, n_rows, groups):
    """targets.md 3A: n = 128nt + 32sp + 8a + b, g = 4kt + q; byte ((((nt*K/64 + kt)*8 + b)*4 + a)*4 + sp)*4 + q."""
    out = [None] * (n_rows * groups)
    for n in range(n_rows):
        nt, sp, a, b = n // 128, (n % 128) // 32, (n % 32) // 8, n % 8
        for g in range(groups):
            kt, q = g // 4, g % 4
            out[((((nt * (groups // 4) + kt) * 8 + b) * 4 + a) * 4 + sp) * 4 + q] = raw[n][g]
    return out


def _e4m3(n, g, seed=0):
    raw = torch.randint(0, 256, (n, g), generator=_gen(seed), dtype=torch.int16).to(torch.uint8)
    return raw.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("n,g", [(128, 8), (256, 16), (384, 24)])
def test_micro_scales_match_golden_formula(n, g):
    scales = _e4m3(n, g, seed=n + g)
    packed = pack_micro_scales(scales)
    assert packed.dtype == torch.float8_e4m3fn and tuple(packed.shape) == (g, n)
    assert _u8(packed) == _golden_micro(scales.view(torch.uint8).to(torch.int16).tolist(), n, g)


# [256, 16] micro-scales (K = 256: 4 steps of 64 k); lane 4b + a owns bytes 16*lane .. +15 of its (nt, kt) block of
# 512 bytes, 4 bytes (q = 0..3) per channel b + 8a + 32sp.
MICRO_PLACEMENTS = [
    (0, 0, 0, "lane 0, sp 0, q 0"),
    (0, 3, 3, "subgroup q = 3 of the first 64 k"),
    (32, 0, 4, "lane 0 holds channels {0, 32, 64, 96}: sp = 1"),
    (96, 2, 14, "lane 0, sp 3, q 2"),
    (8, 0, 16, "lane 1 holds channel 8 (a = 1)"),
    (1, 0, 64, "lane 4 holds channel 1 (b = 1)"),
    (31, 0, 7 * 64 + 3 * 16, "channel 31: b = 7, a = 3 -> lane 31"),
    (0, 4, 512, "the next 64 k (kt = 1): the next 512-byte block"),
    (128, 0, 4 * 512, "the next 128 channels: after K/64 = 4 blocks"),
]


@pytest.mark.parametrize("n,g,byte,why", MICRO_PLACEMENTS, ids=[p[3] for p in MICRO_PLACEMENTS])
def test_micro_scale_single_placement(n, g, byte, why):
    raw = torch.zeros(256, 16, dtype=torch.uint8)
    raw[n, g] = 0x38  # e4m3 1.0
    flat = _u8(pack_micro_scales(raw.view(torch.float8_e4m3fn)))
    assert flat[byte] == 0x38, why
    assert sum(1 for b in flat if b) == 1


@pytest.mark.parametrize("n,g", [(128, 8), (256, 16), (128, 24)])
def test_micro_scales_round_trip_and_float_input(n, g):
    scales = _e4m3(n, g, seed=g)
    back = unpack_micro_scales(pack_micro_scales(scales))
    assert back.dtype == torch.float8_e4m3fn and _u8(back) == _u8(scales)
    # a bf16 tensor holding e4m3 values exactly packs to the same bytes
    finite = torch.where(torch.isnan(scales.to(torch.float32)), 1.0, scales.to(torch.float32))
    as_bf16 = finite.to(torch.bfloat16)
    assert _u8(pack_micro_scales(as_bf16)) == _u8(pack_micro_scales(finite.to(torch.float8_e4m3fn)))


def test_micro_scales_padded_and_errors():
    scales = torch.full((200, 12), 2.0).to(torch.float8_e4m3fn)  # K = 192 -> K' = 256 -> 16 groups
    padded = pad_group_scales(scales.to(torch.float32), 16)
    assert tuple(padded.shape) == (256, 16)
    back = unpack_micro_scales(pack_micro_scales(padded))
    assert _u8(crop(back, (200, 12))) == _u8(scales)
    with pytest.raises(LayoutError, match=r"wscales has shape \(128, 4\): K/16 = 4 is not a positive multiple of 8"):
        pack_micro_scales(torch.ones(128, 4).to(torch.float8_e4m3fn))
    with pytest.raises(LayoutError, match=r"blk\.wscales has shape \(64, 8\): N = 64"):
        pack_micro_scales(torch.ones(64, 8).to(torch.float8_e4m3fn), name="blk.wscales")
    with pytest.raises(LayoutError, match=r"not exactly representable in float8_e4m3fn"):
        pack_micro_scales(torch.full((128, 8), 1.1))
    with pytest.raises(LayoutError, match=r"wscales must be float8_e4m3fn, got torch.bfloat16"):
        unpack_micro_scales(torch.ones(8, 128, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------------ low-rank branch

def _golden_lora_up(values, n_rows, rank):
    """targets.md 3A: ((((n/16*R/16 + r/16)*8 + n%8)*4 + (r%8)/2)*2 + (n%16)/8)*4 + 2*((r%16)/8) + r%2."""
    out = [None] * (n_rows * rank)
    for n in range(n_rows):
        for r in range(rank):
            pos = ((((n // 16 * (rank // 16) + r // 16) * 8 + n % 8) * 4 + (r % 8) // 2) * 2 + (n % 16) // 8) * 4 \
                + 2 * ((r % 16) // 8) + r % 2
            out[pos] = values[n][r]
    return out


def _golden_lora_down(values, rank, k_cols):
    """targets.md 3A, from [R, K]: ((((k/16*R/16 + r/16)*8 + r%8)*4 + (k%8)/2)*2 + (r%16)/8)*4 + 2*((k%16)/8) + k%2."""
    out = [None] * (rank * k_cols)
    for r in range(rank):
        for k in range(k_cols):
            pos = ((((k // 16 * (rank // 16) + r // 16) * 8 + r % 8) * 4 + (k % 8) // 2) * 2 + (r % 16) // 8) * 4 \
                + 2 * ((k % 16) // 8) + k % 2
            out[pos] = values[r][k]
    return out


@pytest.mark.parametrize("n,r", [(16, 16), (48, 32), (128, 64)])
def test_lora_up_matches_golden_formula(n, r):
    up = _halves(n, r, torch.bfloat16, seed=n + r)
    packed = pack_lora_up(up)
    assert tuple(packed.shape) == (n, r) and packed.dtype == torch.bfloat16
    assert _bits16(packed).reshape(-1).tolist() == _golden_lora_up(_bits16(up).tolist(), n, r)


@pytest.mark.parametrize("r,k", [(16, 16), (32, 48), (64, 128)])
def test_lora_down_matches_golden_formula(r, k):
    down = _halves(r, k, torch.float16, seed=r + k)
    packed = pack_lora_down(down)
    assert tuple(packed.shape) == (k, r) and packed.dtype == torch.float16
    assert _bits16(packed).reshape(-1).tolist() == _golden_lora_down(_bits16(down).tolist(), r, k)


# In a [32, 48] operand (rows u, columns v; 2 x 3 tiles of 256): lane 4*(u%8) + (v%8)//2 holds 8 halves,
# (u, v), (u, v+1), (u, v+8), (u, v+9), (u+8, v), (u+8, v+1), (u+8, v+8), (u+8, v+9).
LORA_PLACEMENTS = [
    (0, 1, 1, "column pair (0, 1): b0, b1"),
    (0, 8, 2, "column + 8: b2 of the same lane"),
    (8, 0, 4, "row + 8: the second n8 tile, same lane"),
    (8, 9, 7, "row + 8, column + 9: the lane's last half"),
    (0, 2, 8, "column 2 -> lane 1"),
    (1, 0, 32, "row 1 -> lane 4"),
    (7, 15, 251, "row 7, column 15: lane 31, first n8 tile, last half"),
    (15, 15, 255, "the last half of tile 0 (lane 31)"),
]


UP_TILES = [(0, 16, 256, "column tile 1 -> tile 1 (up: tiles row-major)"),
            (16, 0, 3 * 256, "row tile 1 -> tile 3 (3 column tiles)")]
DOWN_TILES = [(16, 0, 256, "rank tile 1 -> tile 1"),
              (0, 16, 2 * 256, "k tile 1 -> tile 2 (K-block-major, R/16 = 2)")]


@pytest.mark.parametrize("u,v,pos,why", LORA_PLACEMENTS + UP_TILES, ids=[p[3] for p in LORA_PLACEMENTS + UP_TILES])
def test_lora_up_single_placement(u, v, pos, why):
    up = torch.zeros(32, 48, dtype=torch.bfloat16)  # [N = 32, R = 48]: rows n, columns r
    up[u, v] = 2.0
    flat = pack_lora_up(up).reshape(-1)
    assert flat[pos].item() == 2.0, why
    assert int((flat != 0).sum()) == 1


@pytest.mark.parametrize("u,v,pos,why", LORA_PLACEMENTS + DOWN_TILES,
                         ids=[p[3] for p in LORA_PLACEMENTS + DOWN_TILES])
def test_lora_down_single_placement(u, v, pos, why):
    down = torch.zeros(32, 48, dtype=torch.bfloat16)  # [R = 32, K = 48]: rows r, columns k
    down[u, v] = 2.0
    packed = pack_lora_down(down)
    assert tuple(packed.shape) == (48, 32)
    flat = packed.reshape(-1)
    assert flat[pos].item() == 2.0, why
    assert int((flat != 0).sum()) == 1


@pytest.mark.parametrize("n,r", [(16, 16), (256, 32), (3072, 48)])
def test_lora_round_trips(n, r):
    up = _halves(n, r, torch.float16, seed=1)
    assert torch.equal(_bits16(unpack_lora_up(pack_lora_up(up))), _bits16(up))
    down = _halves(r, n, torch.bfloat16, seed=2)
    assert torch.equal(_bits16(unpack_lora_down(pack_lora_down(down))), _bits16(down))


def test_lora_padded_round_trips():
    up = _halves(200, 20, torch.bfloat16, seed=3)     # N = 200, rank 20
    down = _halves(20, 300, torch.bfloat16, seed=4)   # rank 20, K = 300
    up_p, down_p = pad_lora_up(up), pad_lora_down(down)
    assert tuple(up_p.shape) == (256, 32) and tuple(down_p.shape) == (32, 384)
    assert not up_p[200:].any() and not up_p[:, 20:].any() and not down_p[20:].any() and not down_p[:, 300:].any()
    assert tuple(pack_lora_down(down_p).shape) == (384, 32)
    assert torch.equal(crop(unpack_lora_up(pack_lora_up(up_p)), (200, 20)), up)
    assert torch.equal(crop(unpack_lora_down(pack_lora_down(down_p)), (20, 300)), down)
    # the padded branch computes the same product on the real rows/columns
    assert torch.equal((up_p.float() @ down_p.float())[:200, :300], up.float() @ down.float())


def test_lora_errors():
    with pytest.raises(LayoutError, match=r"blk\.lora_up has shape \(128, 20\): R = 20 is not a positive multiple"):
        pack_lora_up(torch.zeros(128, 20, dtype=torch.bfloat16), name="blk.lora_up")
    with pytest.raises(LayoutError, match=r"lora_down has shape \(20, 128\): R = 20"):
        pack_lora_down(torch.zeros(20, 128, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match=r"lora_down has shape \(100, 32\): K = 100"):
        unpack_lora_down(torch.zeros(100, 32, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match=r"lora_up must be float16 or bfloat16 .*float32 with shape \(16, 16\)"):
        pack_lora_up(torch.zeros(16, 16))
    with pytest.raises(LayoutError, match=r"lora_up must be \[N, R\], got shape \(16,\)"):
        pack_lora_up(torch.zeros(16, dtype=torch.float16))


# ------------------------------------------------------------------------------------------------ padding helpers

def test_padded_dims():
    assert padded_dims(3072, 3072, 32) == (3072, 3072, 32)
    assert padded_dims(200, 300, 20) == (256, 384, 32)
    assert padded_dims(128, 64, 0) == (128, 128, 0)  # K to 128, not 64: the GEMM reads k in pairs of 64


def test_pad_and_crop_errors():
    with pytest.raises(LayoutError, match=r"blk of shape \(4, 4\) cannot be cropped to \(5, 4\)"):
        crop(torch.zeros(4, 4), (5, 4), name="blk")
    with pytest.raises(LayoutError, match=r"group size 48 does not divide 128"):
        pad_group_scales(torch.ones(4, 4), 48)


# ------------------------------------------------------------------------------------------------ AWQ W4A16

def _golden_awq(codes):
    """targets.md 2A element by element (TinyChat v2): p = k%32 = 8a+2b+c -> p' = 8b+2a+c; p'%8 = 2d+e ->
    P = 8(p'//8)+4e+d; kr = 32(k//32)+P, kt = kr//64, f = 64(n%4)+kr%64; nibble f%4 of int16 word [n//4][64kt + f//4].
    Nunchaku stores int16 words 2c and 2c+1 as the low and high half of int32 word c (deepcompressor .view(int32))."""
    n_rows, k_cols = len(codes), len(codes[0])
    w16 = [[0] * k_cols for _ in range(n_rows // 4)]
    for n in range(n_rows):
        for k in range(k_cols):
            p = k % 32
            a, b, c = p // 8, (p % 8) // 2, p % 2
            p1 = 8 * b + 2 * a + c
            d, e = (p1 % 8) // 2, p1 % 2
            kr = 32 * (k // 32) + 8 * (p1 // 8) + 4 * e + d
            f = 64 * (n % 4) + kr % 64
            w16[n // 4][64 * (kr // 64) + f // 4] |= codes[n][k] << (4 * (f % 4))
    out = []
    for row in w16:
        words = [row[2 * i] | (row[2 * i + 1] << 16) for i in range(k_cols // 2)]
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return out


@pytest.mark.parametrize("n,k", [(8, 64), (16, 128), (24, 192)])
def test_awq_qweight_matches_golden_formula(n, k):
    codes = torch.randint(0, 16, (n, k), generator=_gen(n), dtype=torch.int16)
    packed = layout_awq.pack_qweight(codes)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (n // 4, k // 2)
    assert packed.tolist() == _golden_awq(codes.tolist())


# (n, k) -> int32 word (row, column) and nibble: TinyChat's int16 word [n//4, 64kt + 16(n%4) + 8h + 2b + c], nibble a
# (k = 64kt + 32h + 8a + 2b + c); int32 column = int16 column // 2, nibble + 4 for the odd int16 word.
AWQ_PLACEMENTS = [
    (0, 0, 0, 0, 0, "first code"),
    (0, 1, 0, 0, 4, "k = 1 (c = 1): int16 word 1 -> high half, nibble 4: (nibble i, i + 4) = elements (2i, 2i+1)"),
    (0, 8, 0, 0, 1, "k = 8 (a = 1): nibble 1 of the same word"),
    (0, 2, 0, 1, 0, "k = 2 (b = 1): int16 word 2 -> int32 word 1"),
    (0, 32, 0, 4, 0, "k = 32 (h = 1): int16 word 8"),
    (1, 0, 0, 8, 0, "n = 1: the next row's run of 16 int16 words"),
    (4, 0, 1, 0, 0, "n = 4: the next int32 row"),
    (0, 64, 0, 32, 0, "k = 64: the next 64-k block of 4 x 16 int16 words"),
]


@pytest.mark.parametrize("n,k,row,col,nibble,why", AWQ_PLACEMENTS, ids=[p[5] for p in AWQ_PLACEMENTS])
def test_awq_single_code_placement(n, k, row, col, nibble, why):
    codes = torch.zeros(8, 128, dtype=torch.int16)
    codes[n, k] = 9
    packed = layout_awq.pack_qweight(codes)
    assert (packed[row, col].item() & 0xFFFFFFFF) == 9 << (4 * nibble), why
    assert int((packed != 0).sum()) == 1


@pytest.mark.skipif(sys.byteorder != "little", reason="compares memory bytes of a little-endian layout")
def test_awq_qweight_has_tinychat_bytes():
    codes = torch.randint(0, 16, (64, 256), generator=_gen(1), dtype=torch.int16)
    assert torch.equal(layout_awq.pack_qweight(codes).view(torch.int16), tinychat.pack_qweight(codes))


@pytest.mark.parametrize("n,k", [(8, 64), (3072 * 6 // 64, 3072), (64, 192)])
def test_awq_round_trip(n, k):
    codes = torch.randint(0, 16, (n, k), generator=_gen(k), dtype=torch.int16)
    assert torch.equal(layout_awq.unpack_qweight(layout_awq.pack_qweight(codes)), codes)


def test_awq_scales_unpadded_with_scaled_zeros():
    n, g = 16, 3  # K = 192: TinyChat would pad the rows to 16, Nunchaku allocates ceil(K/64) = 3
    scale = torch.rand(n, g, generator=_gen(2)).to(torch.bfloat16)
    zero = torch.full((n, g), layout_awq.DEFAULT_ZERO)
    wscales, wzeros = layout_awq.pack_scales(scale, zero, dtype=torch.bfloat16)
    assert tuple(wscales.shape) == (3, 16) and tuple(wzeros.shape) == (3, 16)
    assert tinychat.pack_scales(scale, zero, 64, dtype=torch.bfloat16)[0].shape[0] == 16
    assert torch.equal(wscales, scale.t())
    # 7 * s of a bf16 s is exact in float64, so -(7 s) is rounded once to bf16
    assert torch.equal(wzeros, (-(7 * scale.double())).to(torch.bfloat16).t())
    s_back, z_back = layout_awq.unpack_scales(wscales, wzeros)
    assert torch.equal(s_back, scale) and torch.equal(z_back, wzeros.t())


def test_awq_errors():
    with pytest.raises(layout_awq.LayoutError, match=r"img_mod\.1\.qweight codes of shape \(12, 64\): out_features 12"):
        layout_awq.pack_qweight(torch.zeros(12, 64, dtype=torch.int16), name="img_mod.1.qweight")
    with pytest.raises(layout_awq.LayoutError, match=r"in_features 96 is not a multiple of 64"):
        layout_awq.pack_qweight(torch.zeros(8, 96, dtype=torch.int16))
    with pytest.raises(layout_awq.LayoutError, match=r"qweight must be int32, got torch.int16 with shape \(2, 64\)"):
        layout_awq.unpack_qweight(torch.zeros(2, 64, dtype=torch.int16))
    with pytest.raises(layout_awq.LayoutError, match=r"wscales scale of shape \(12, 1\)"):
        layout_awq.pack_scales(torch.ones(12, 1), torch.zeros(12, 1))
