"""Lower compiled blocks to Nunchaku's W4A4 tensors (research/targets.md 3A), per quantized linear: qweight (int4
codes in mma fragment order), wscales, smooth (and smooth_orig, unpacked), lora_down, lora_up and bias, all padded
(N and K to 128, the rank to 16) and packed by layout.py; everything else 16-bit (BaseEmitter)."""
from __future__ import annotations

import torch

from ..artifact import sha256_tensor
from ..common.emit import BaseEmitter
from . import layout

FORMAT = "nunchaku-w4a4-int4"
TENSORS = ("qweight", "wscales", "smooth", "smooth_orig", "lora_down", "lora_up", "bias")


def pack_linear(codes, scales, smooth, down, up, bias, dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear from its unpacked parts: codes [N, K] in [-8, 7], scales [N, K/64], smooth
    [K], down [R, K] (the branch on the raw x), up [N, R], bias [N] (None: zeros, Nunchaku always reads one)."""
    n, k = codes.shape
    if down is None or down.shape[0] == 0:   # no branch: a zero branch of the smallest rank the kernel takes
        down, up = torch.zeros(16, k), torch.zeros(n, 16)
    smooth = torch.ones(k) if smooth is None else smooth
    bias = torch.zeros(n) if bias is None else bias
    return {
        "qweight": layout.pack_qweight(layout.pad_codes(codes.to(torch.int8))),
        "wscales": layout.pack_wscales(layout.pad_group_scales(scales.to(dtype), 64)),
        # the kernel divides by smooth: padded channels get 1 (a 0 would make 0/0)
        "smooth": layout.pack_channel_vector(layout.pad_channel_vector(smooth.to(dtype), fill=1.0)),
        "smooth_orig": smooth.to(dtype),     # unpacked: what a LoRA merge reads
        "lora_down": layout.pack_lora_down(layout.pad_lora_down(down.to(dtype))),
        "lora_up": layout.pack_lora_up(layout.pad_lora_up(up.to(dtype))),
        "bias": layout.pack_channel_vector(layout.pad_channel_vector(bias.to(dtype), fill=0.0)),
    }


def unpack_linear(t: dict, n: int, k: int) -> dict[str, torch.Tensor]:
    """The inverse of pack_linear, cropped to the layer's [n, k] (the rank is kept as padded: zero ranks add 0)."""
    codes = layout.crop(layout.unpack_qweight(t["qweight"]), (n, k))
    scales = layout.crop(layout.unpack_wscales(t["wscales"]), (n, k // 64))
    smooth = layout.crop(layout.unpack_channel_vector(t["smooth"]), (k,))
    down = layout.unpack_lora_down(t["lora_down"])
    up = layout.unpack_lora_up(t["lora_up"])
    bias = layout.crop(layout.unpack_channel_vector(t["bias"]), (n,))
    return {"codes": codes, "scales": scales, "smooth": smooth, "lora_down": down[:, :k], "lora_up": up[:n],
            "bias": bias}


class NunchakuEmitter(BaseEmitter):
    """Nunchaku's tensors for each quantized linear (the bias is one of them: packed, and always present)."""
    writes_bias = True

    def quantized(self, full: str, lin, mod, entry: dict) -> None:
        qt = lin.qtensor
        get = lambda name: getattr(mod, name, None)   # noqa: E731 - the svd_lowrank pass's buffers, if it ran
        bias = mod.bias.data if mod.bias is not None else None
        for name, t in pack_linear(qt.codes, qt.scale, get("smooth"), get("lora_down"), get("lora_up"), bias,
                                   self.dtype).items():
            self.writer.add(f"{full}.{name}", t)
        rank = 0 if get("lora_down") is None else int(mod.lora_down.shape[0])
        # the evaluated main branch (codes * scales, exact in float32) is what decode() must give back
        entry.update(format=FORMAT, spec=qt.spec.to_dict(), rank=rank, has_bias=bias is not None,
                     weight_sha256=sha256_tensor(mod.weight.data.float()))
