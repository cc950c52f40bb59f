"""dcc:: activation formats: "uint4" (Nunchaku's act_unsigned input after a GELU) parses to the unsigned INT4 op, whose
input the graph has already shifted; fake_quantize_act gives what the main branch effectively multiplies once the
bias has taken the shift back, for the calibration searches."""
import pytest
import torch

from dcc.ir import ops
from dcc.ir.w4a4 import SHIFT_GELU, fake_quantize_act_int4


def test_formats_parse_and_map_to_ops():
    assert ops.parse_act("uint4:bfloat16") == ("uint4", "bfloat16")
    assert ops.act_op("uint4:float16") == (ops.quant_act_int4, (64, True, "float16"))
    assert ops.act_op("int4:float16") == (ops.quant_act_int4, (64, False, "float16"))
    assert ops.is_shifted("uint4:bfloat16") and not ops.is_shifted("int4:bfloat16") and not ops.is_shifted(None)
    for bad in ("uint4", "uint8:bfloat16", "int8:bfloat16"):
        with pytest.raises(ValueError, match="uint4"):
            ops.parse_act(bad)


def test_unsigned_op_takes_the_input_as_already_shifted():
    x = torch.nn.functional.gelu(torch.randn(3, 128, generator=torch.Generator().manual_seed(0)) * 2)
    got = ops.quant_act_int4(x + SHIFT_GELU, 64, True, "bfloat16")
    want = fake_quantize_act_int4(x + SHIFT_GELU, None, 64, True, torch.bfloat16, shift=0.0, out_dtype=torch.float32)
    assert torch.equal(got, want) and float(got.min()) >= 0


def test_effective_uint4_input_takes_the_shift_off():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.gelu(torch.randn(4, 128, generator=g) * 2)
    smooth = torch.rand(128, generator=g) + 0.5
    xs = x / smooth
    eff = ops.fake_quantize_act(xs, "uint4:bfloat16", smooth)
    assert torch.equal(eff, ops.quant_act_int4(xs + SHIFT_GELU / smooth, 64, True, "bfloat16") - SHIFT_GELU / smooth)
    # unsigned codes after the shift: half the step of signed codes, so a smaller error than int4 on GELU outputs
    err = lambda y: float((y - xs).norm() / xs.norm())   # noqa: E731
    assert err(eff) < 0.8 * err(ops.fake_quantize_act(xs, "int4:bfloat16", smooth))
    # signed formats ignore smooth
    assert torch.equal(ops.fake_quantize_act(xs, "int4:bfloat16", smooth), ops.fake_quantize_act(xs, "int4:bfloat16"))
