"""Lower compiled blocks to QServe's checkpoint tensors (research/targets.md 1A): W4A8 per channel (qweight, s1_scales,
s1_szeros), W4A8 progressive groups (qweight, s1_scales, s2_scales, s2_zeros) or W8A8 (int8 weight, dequant_scale),
HF parameter names kept; everything else 16-bit (BaseEmitter). Streamed block by block into an ArtifactWriter."""
from __future__ import annotations

import torch

from ..common.hf4_config import to_hf4
from ..artifact import ArtifactWriter
from ..checksums import sha256_later
from ..common.emit import BaseEmitter
from .layout import kernel_notes, pack_qweight, pack_s2, pack_w8

FORMATS = {"per_channel": "qserve-w4a8-per-channel", "group": "qserve-w4a8-group", "w8": "qserve-w8a8"}


def format_of(spec) -> str:
    if spec.bits == 8:
        return FORMATS["w8"]
    return FORMATS["group"] if spec.group_size > 0 else FORMATS["per_channel"]


def lower_linear(qt) -> dict[str, torch.Tensor]:
    """The QServe tensors of one quantized linear (without its name prefix)."""
    spec = qt.spec
    if spec.bits == 8:
        return {"weight": pack_w8(qt.codes), "dequant_scale": qt.scale.reshape(-1).to(torch.float16)}
    if spec.progressive:
        return {"qweight": pack_qweight(qt.codes), "s1_scales": qt.scale0.reshape(-1).to(torch.float16),
                # the kernel rebuilds w8 = q * s2 + s2_zeros, so the post-scale zero z is stored negated
                "s2_scales": pack_s2(qt.scale), "s2_zeros": pack_s2(-qt.zero.to(torch.int16))}
    # per channel, zero_mode 'offset': w = q*s + z with z the fp16 zero; QServe subtracts s1_szeros, so store -z
    return {"qweight": pack_qweight(qt.codes), "s1_scales": qt.scale.reshape(-1).to(torch.float16),
            "s1_szeros": (-qt.zero.reshape(-1)).to(torch.float16)}


class QServeEmitter(BaseEmitter):
    """on_block(block, ctx) packs a finished block; finish(lm) writes the parts outside the blocks (16-bit), the head
    as its own tensor even where it is tied (QServe's load_weights never ties lm_head to embed_tokens:
    loader_spec.py)."""
    store_tied_head = True

    def __init__(self, writer: ArtifactWriter, dtype: torch.dtype = torch.float16):
        if dtype != torch.float16:
            raise ValueError("QServe's kernels take fp16 activations: use --dtype float16")
        super().__init__(writer, dtype)
        self.kernel_notes: list[str] = []
        self.kv_bits: int | None = None
        self.model_type: str | None = None
        self.source_config: dict | None = None
        self.kv_cache: dict[str, int] = {}   # attention module -> KV cache bits the engine applies

    def quantized(self, full: str, lin, mod, entry: dict) -> None:
        qt = lin.qtensor
        for key, t in lower_linear(qt).items():
            self.writer.add(f"{full}.{key}", t)
        # the weight the compiler evaluated, in float32: what the decoder must give back bit for bit
        entry.update(format=format_of(qt.spec), spec=qt.spec.to_dict(), act=lin.act)
        sha256_later(entry, "weight_sha256", mod.weight.data.to(torch.float32))
        if qt.spec.bits == 4:
            self.kernel_notes += [f"{full}: {n}" for n in kernel_notes(lin.out_features, lin.in_features,
                                                                       qt.spec.group_size)]

    def finish(self, lm) -> None:
        super().finish(lm)
        self.model_type = lm.config.model_type
        self.source_config = to_hf4(lm.config.to_dict(), "float16")   # as QServe reads it (engine's transformers)

    def on_block(self, block, ctx=None) -> None:
        super().on_block(block, ctx)
        for a in block.attentions:
            if a.kv_bits:
                self.kv_bits = a.kv_bits
                self.kv_cache[f"{block.prefix}.{a.path}"] = a.kv_bits
