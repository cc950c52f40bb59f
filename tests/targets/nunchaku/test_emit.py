"""The Nunchaku emitter's per-linear tensors: an NVFP4 linear packs (e2m1 qweight, e4m3 wscales [K/16, N], wtscale,
wcscales, smooth, lora, bias) and unpacks to exactly its parts; the target's decode gives back the fake-quant
weight bit for bit and its reference is the NVFP4 (or unsigned INT4) kernel; options and preflight take the
precision's group size."""
import pytest
import torch

from dcc.ir.formats import quantize_tensor
from dcc.targets.base import TargetError, get_format, get_target
from dcc.targets.nunchaku.emit import (FORMAT, FORMAT_NVFP4, FORMAT_UNSIGNED, TENSORS, TENSORS_NVFP4, pack_linear,
                                       unpack_linear)
from dcc.targets.nunchaku.layout import LayoutError
from dcc.targets.nunchaku.pipeline import check, weight_spec
from dcc.targets.nunchaku.reference import NunchakuLinear, w4a4_nvfp4_linear

DT = torch.bfloat16


def _nvfp4_linear(n=72, k=80, rank=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, :16] = 0.0
    qt = quantize_tensor(w, weight_spec("nvfp4", "bfloat16"))
    smooth = (torch.rand(k, generator=g) + 0.5).to(DT)
    down = (torch.randn(rank, k, generator=g) * 0.1).to(DT)
    up = (torch.randn(n, rank, generator=g) * 0.1).to(DT)
    bias = (torch.randn(n, generator=g) * 0.1).to(DT)
    return qt, smooth, down, up, bias


def test_nvfp4_pack_unpack_round_trip():
    qt, smooth, down, up, bias = _nvfp4_linear()
    t = pack_linear(qt.codes, qt.scale, smooth, down, up, bias, DT, float(qt.scale0))
    assert set(t) == set(TENSORS_NVFP4)
    # N and K padded to 128 (K/16 = 8 micro-scale groups), the shapes Nunchaku's GEMM_W4A4 allocates for fp4
    assert t["qweight"].dtype == torch.int8 and tuple(t["qweight"].shape) == (128, 64)
    assert t["wscales"].dtype == torch.float8_e4m3fn and tuple(t["wscales"].shape) == (8, 128)
    assert t["wtscale"].dtype == torch.float32 and tuple(t["wtscale"].shape) == (1,)
    assert t["wcscales"].dtype == DT and tuple(t["wcscales"].shape) == (128,) and bool((t["wcscales"] == 1).all())
    u = unpack_linear(t, 72, 80)
    assert torch.equal(u["codes"].to(torch.uint8), qt.codes)
    assert torch.equal(u["scales"].float(), qt.scale) and u["wtscale"] == float(qt.scale0)
    assert torch.equal(u["smooth"], smooth) and torch.equal(u["bias"], bias)
    assert torch.equal(u["lora_down"], down) and torch.equal(u["lora_up"], up)


def test_nvfp4_decode_is_the_fake_quant_weight_and_reference_is_the_kernel():
    qt, smooth, down, up, bias = _nvfp4_linear(seed=1)
    t = pack_linear(qt.codes, qt.scale, smooth, down, up, bias, DT, float(qt.scale0))
    target, fmt = get_format(FORMAT_NVFP4)
    assert target.name == "nunchaku" and fmt.tensors == TENSORS_NVFP4
    stored = {f"x.{name}": v for name, v in t.items()}
    w = fmt.decode(stored, "x", {"shape": [72, 80], "format": FORMAT_NVFP4})
    assert torch.equal(w.view(torch.int32), qt.dequantize().view(torch.int32))   # -0.0 included
    ref = fmt.reference(t, 72, 80, bias)
    assert isinstance(ref, NunchakuLinear) and ref.precision == "nvfp4" and ref.dtype == DT
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(2))
    u = unpack_linear(t, 72, 80)
    want = w4a4_nvfp4_linear(x, u["codes"], u["scales"], smooth, u["lora_down"], u["lora_up"], bias,
                             wtscale=u["wtscale"], wcscales=u["wcscales"], dtype=DT)
    assert torch.equal(ref(x), want.float())
    # its float view: the main branch / smooth plus the branch, what the layer stands for in x's domain
    torch.testing.assert_close(ref.weight, (w.double() / smooth.double() + up.double() @ down.double()).float())


def test_unsigned_format_reference_shifts():
    g = torch.Generator().manual_seed(3)
    qt = quantize_tensor(torch.randn(8, 128, generator=g) * 0.05, weight_spec("int4", "bfloat16"))
    t = pack_linear(qt.codes, qt.scale, None, None, None, None, DT)
    assert set(t) == set(TENSORS)
    signed = get_format(FORMAT)[1].reference(t, 8, 128, None)
    unsigned = get_format(FORMAT_UNSIGNED)[1].reference(t, 8, 128, None)
    assert not signed.unsigned and unsigned.unsigned and get_format(FORMAT_UNSIGNED)[1].tensors == TENSORS
    x = torch.nn.functional.gelu(torch.randn(4, 128, generator=g) * 2)
    assert not torch.equal(signed(x), unsigned(x))


def test_precision_options_and_groups():
    nunchaku = get_target("nunchaku")
    opts = nunchaku.options(precision="nvfp4")
    assert nunchaku.spec(opts) == weight_spec("nvfp4", "bfloat16") and nunchaku.spec(opts).group_size == 16
    assert nunchaku.options(precision="nvfp4", group_size=16).group_size == 16
    with pytest.raises(TargetError, match="--group-size 64: Nunchaku's NVFP4 kernels take groups of 16 only"):
        nunchaku.options(precision="nvfp4", group_size=64)
    with pytest.raises(TargetError, match="--group-size 16: Nunchaku's INT4 kernels take groups of 64 only"):
        nunchaku.options(group_size=16)
    with pytest.raises(TargetError, match="--precision fp8"):
        nunchaku.options(precision="fp8")
    check("l", 64, 176, 16)                               # 176 % 16 == 0: NVFP4 takes it, INT4 does not
    with pytest.raises(LayoutError, match="l: in_features 176 is not a multiple of the group size 64 \\(W4A4 INT4\\)"):
        check("l", 64, 176, 64)
    with pytest.raises(LayoutError, match="multiple of the group size 16 \\(W4A4 NVFP4\\)"):
        check("l", 64, 172, 16)
