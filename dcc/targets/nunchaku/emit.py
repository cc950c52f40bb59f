"""Lower compiled blocks to Nunchaku's W4A4 tensors (research/targets.md 3A), per quantized linear: qweight (int4 or
e2m1 codes in mma fragment order), wscales (16-bit per 64, or fp8 e4m3 micro-scales per 16 for NVFP4, with the
per-tensor wtscale and per-channel wcscales), smooth (and smooth_orig, unpacked), lora_down, lora_up and bias, all
padded (N and K to 128, the rank to 16) and packed by layout.py; everything else 16-bit (BaseEmitter)."""
from __future__ import annotations

import torch

from ...ir.ops import is_shifted
from ..checksums import sha256_later
from ..common.emit import BaseEmitter
from . import layout

FORMAT = "nunchaku-w4a4-int4"
# the same tensors, for a layer whose input the kernel quantizes unsigned after the GELU shift (act_unsigned, as
# Nunchaku's mlp_fc2): its stored bias holds the shift compensation, and the CPU reference must shift too
FORMAT_UNSIGNED = "nunchaku-w4a4-int4-unsigned"
FORMAT_NVFP4 = "nunchaku-w4a4-nvfp4"
TENSORS = ("qweight", "wscales", "smooth", "smooth_orig", "lora_down", "lora_up", "bias")
TENSORS_NVFP4 = ("qweight", "wscales", "wtscale", "wcscales", "smooth", "smooth_orig", "lora_down", "lora_up", "bias")


def pack_linear(codes, scales, smooth, down, up, bias, dtype, wtscale: float | None = None
                ) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear from its unpacked parts: codes [N, K] (INT4: in [-8, 7]; NVFP4: e2m1 bit
    patterns 0..15), scales [N, K/64] (NVFP4: e4m3 micro-scales [N, K/16], as float8_e4m3fn or exact floats), smooth
    [K], down [R, K] (the branch on the raw x), up [N, R], bias [N] (None: zeros, Nunchaku always reads one).
    wtscale: NVFP4's per-tensor scale (None: INT4); it is written as float32 [1] (the kernel's alpha is fp32; the
    value is a 16-bit one), with wcscales all ones in the model dtype (what Nunchaku's Python loader fills in)."""
    n, k = codes.shape
    fp4 = wtscale is not None
    if down is None or down.shape[0] == 0:   # no branch: a zero branch of the smallest rank the kernel takes
        down, up = torch.zeros(16, k), torch.zeros(n, 16)
    smooth = torch.ones(k) if smooth is None else smooth
    bias = torch.zeros(n) if bias is None else bias
    out = {"qweight": layout.pack_qweight(layout.pad_codes(codes.to(torch.uint8 if fp4 else torch.int8)), fp4=fp4)}
    if fp4:
        # padded groups get micro-scale 1 (their codes are +0); the fp8 bytes are only permuted
        out["wscales"] = layout.pack_micro_scales(layout.pad_group_scales(scales.to(torch.float32),
                                                                          layout.FP4_GROUP_SIZE))
        out["wtscale"] = torch.tensor([float(wtscale)], dtype=torch.float32)
        out["wcscales"] = layout.pack_channel_vector(layout.pad_channel_vector(torch.ones(n, dtype=dtype)),
                                                     "wcscales")
    else:
        out["wscales"] = layout.pack_wscales(layout.pad_group_scales(scales.to(dtype), layout.INT4_GROUP_SIZE))
    out.update({
        # the kernel divides by smooth: padded channels get 1 (a 0 would make 0/0)
        "smooth": layout.pack_channel_vector(layout.pad_channel_vector(smooth.to(dtype), fill=1.0)),
        "smooth_orig": smooth.to(dtype),     # unpacked: what a LoRA merge reads
        "lora_down": layout.pack_lora_down(layout.pad_lora_down(down.to(dtype))),
        "lora_up": layout.pack_lora_up(layout.pad_lora_up(up.to(dtype))),
        "bias": layout.pack_channel_vector(layout.pad_channel_vector(bias.to(dtype), fill=0.0)),
    })
    return out


def unpack_linear(t: dict, n: int, k: int) -> dict[str, torch.Tensor]:
    """The inverse of pack_linear, cropped to the layer's [n, k] (the rank is kept as padded: zero ranks add 0).
    NVFP4 (fp8 wscales) also gives wtscale (a float) and wcscales [n]."""
    fp4 = t["wscales"].dtype == torch.float8_e4m3fn
    codes = layout.crop(layout.unpack_qweight(t["qweight"], fp4=fp4), (n, k))
    if fp4:
        scales = layout.crop(layout.unpack_micro_scales(t["wscales"]), (n, k // layout.FP4_GROUP_SIZE))
    else:
        scales = layout.crop(layout.unpack_wscales(t["wscales"]), (n, k // layout.INT4_GROUP_SIZE))
    smooth = layout.crop(layout.unpack_channel_vector(t["smooth"]), (k,))
    down = layout.unpack_lora_down(t["lora_down"])
    up = layout.unpack_lora_up(t["lora_up"])
    bias = layout.crop(layout.unpack_channel_vector(t["bias"]), (n,))
    out = {"codes": codes, "scales": scales, "smooth": smooth, "lora_down": down[:, :k], "lora_up": up[:n],
           "bias": bias}
    if fp4:
        if t["wtscale"].numel() != 1:
            raise layout.LayoutError(f"wtscale must hold one value, got shape {tuple(t['wtscale'].shape)}")
        out["wtscale"] = float(t["wtscale"].reshape(()).to(torch.float32))
        out["wcscales"] = layout.crop(layout.unpack_channel_vector(t["wcscales"], "wcscales"), (n,))
    return out


class NunchakuEmitter(BaseEmitter):
    """Nunchaku's tensors for each quantized linear (the bias is one of them: packed, and always present)."""
    writes_bias = True

    def quantized(self, full: str, lin, mod, entry: dict) -> None:
        qt = lin.qtensor
        get = lambda name: getattr(mod, name, None)   # noqa: E731 - the svd_lowrank pass's buffers, if it ran
        bias = mod.bias.data if mod.bias is not None else None
        fp4 = qt.spec.micro_scale is not None
        wtscale = float(qt.scale0.reshape(()).to(torch.float32)) if fp4 else None
        for name, t in pack_linear(qt.codes, qt.scale, get("smooth"), get("lora_down"), get("lora_up"), bias,
                                   self.dtype, wtscale).items():
            self.writer.add(f"{full}.{name}", t)
        rank = 0 if get("lora_down") is None else int(mod.lora_down.shape[0])
        fmt = FORMAT_NVFP4 if fp4 else FORMAT_UNSIGNED if is_shifted(lin.act) else FORMAT
        # the evaluated main branch (codes * scales, exact in float32) is what decode() must give back
        entry.update(format=fmt, spec=qt.spec.to_dict(), rank=rank, has_bias=bias is not None)
        sha256_later(entry, "weight_sha256", mod.weight.data.float())
