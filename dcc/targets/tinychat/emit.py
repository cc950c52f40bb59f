"""Lower compiled blocks to TinyChat's checkpoint tensors (qweight int16 [N/4, K], scales and scaled_zeros
[Kg, N]) and everything else to 16-bit, streamed block by block into an ArtifactWriter."""
from __future__ import annotations

import torch

from ..artifact import ArtifactWriter, sha256_tensor
from .layout import KERNEL_GROUP_SIZES, pack_qweight, pack_scales

FORMAT = "tinychat-w4a16-v2"


def engines_for(group_size: int) -> list[str]:
    """Who can load the artifact: TinyChat's kernels take group 128 only; dcc's runtime takes every group the
    layout defines."""
    return (["tinychat", "dcc-runtime"] if group_size in KERNEL_GROUP_SIZES else ["dcc-runtime"])


class TinyChatEmitter:
    """on_block(block, ctx) packs a finished block; finish(lm) writes the parts outside the blocks."""

    def __init__(self, writer: ArtifactWriter, dtype: torch.dtype = torch.float16):
        self.writer, self.dtype = writer, dtype
        self.layers: dict[str, dict] = {}
        self.blocks: dict[str, dict] = {}

    def _plain(self, name: str, t: torch.Tensor) -> None:
        self.writer.add(name, t.to(self.dtype) if t.is_floating_point() else t)

    def quantized(self, full: str, lin, mod, entry: dict) -> None:
        """Write one quantized linear's tensors and fill its manifest entry (targets override this)."""
        qt = lin.qtensor
        self.writer.add(f"{full}.qweight", pack_qweight(qt.codes))
        scales, szeros = pack_scales(qt.scale, qt.zero, qt.spec.group_size, self.dtype,
                                     float_zero=qt.spec.zero_mode == "float")
        self.writer.add(f"{full}.scales", scales)
        self.writer.add(f"{full}.scaled_zeros", szeros)
        # the fake-quant weight that was evaluated, as the 16-bit values the kernel reconstructs
        entry.update(format=FORMAT, spec=qt.spec.to_dict(), weight_sha256=sha256_tensor(mod.weight.data.to(self.dtype)))

    def on_block(self, block, ctx=None) -> None:
        done = set()
        for name, lin in block.linears.items():
            mod = block.linear_module(name)
            full = f"{block.prefix}.{name}"
            entry = {"shape": [lin.out_features, lin.in_features], **{k: v for k, v in lin.stats.items()
                                                                      if not isinstance(v, torch.Tensor)}}
            if lin.qtensor is not None:
                self.quantized(full, lin, mod, entry)
            else:
                self._plain(f"{full}.weight", mod.weight.data)
                entry.update(format="float16" if self.dtype == torch.float16 else "bfloat16",
                             skip_reason=lin.skip_reason or "no quantization spec")
            if mod.bias is not None:
                self._plain(f"{full}.bias", mod.bias.data)
            done |= {f"{name}.weight", f"{name}.bias"}
            self.layers[full] = entry
        for pname, p in block.module.named_parameters():
            if pname not in done:
                self._plain(f"{block.prefix}.{pname}", p.data)
        if ctx is not None and getattr(ctx, "block_error", None) is not None:
            self.blocks[block.prefix] = {"output_rel_err": ctx.block_error}

    def finish(self, lm) -> None:
        """Embeddings, final norm and head stay 16-bit; a head tied to the embeddings is stored once."""
        model = lm.model
        emb = model.get_input_embeddings().weight
        tied_same = False
        head = model.get_output_embeddings()
        if head is not None and getattr(lm.config, "tie_word_embeddings", False):
            tied_same = head.weight.shape == emb.shape and torch.equal(head.weight.data, emb.data)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.startswith(lm.blocks_prefix + "."):
                continue
            if tied_same and head is not None and p is head.weight and name != _param_name(model, emb):
                continue
            if name in self.writer.weight_map or name in self.writer._pending:
                continue
            self._plain(name, p.data)
        self.tied = tied_same


def _param_name(model, param) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is param)
