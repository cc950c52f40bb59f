"""dcc/targets/tinychat/fastlm.py on the CPU: the interleaved gate_up layout of the SwiGLU GEMV."""
import pytest
import torch

from dcc.targets.common.awq_layout import decode_weight, pack_qweight, pack_scales
from dcc.targets.tinychat.fastlm import interleave_gate_up


def _layer(n, k, g, gen):
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scale = (0.002 + 0.02 * torch.rand(n, k // g, generator=gen)).to(torch.float16)
    zero = torch.randint(0, 16, (n, k // g), generator=gen)
    scales, szeros = pack_scales(scale, zero, g, torch.float16)
    return {"qweight": pack_qweight(codes), "scales": scales, "scaled_zeros": szeros}


def test_interleaved_gate_up_decodes_to_the_rows_in_blocks_of_eight():
    gen = torch.Generator().manual_seed(0)
    inter, k, g = 48, 128, 64
    t = _layer(2 * inter, k, g, gen)
    w = decode_weight(t["qweight"], t["scales"], t["scaled_zeros"], g, k)
    got = interleave_gate_up(t, inter)
    wi = decode_weight(got["qweight"], got["scales"], got["scaled_zeros"], g, k)
    # block j: gate rows 8j..8j+7, then up rows 8j..8j+7
    want = torch.stack([w[:inter].reshape(-1, 8, k), w[inter:].reshape(-1, 8, k)], 1).reshape(2 * inter, k)
    assert torch.equal(wi, want)
    assert all(got[n].shape == t[n].shape and got[n].is_contiguous() for n in t)


def test_interleave_refuses_a_gate_not_in_whole_blocks():
    t = _layer(2 * 12, 64, 64, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="blocks of 8"):
        interleave_gate_up(t, 12)
