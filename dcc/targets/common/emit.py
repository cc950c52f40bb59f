"""The emitter every target starts from: streams each finished block into an ArtifactWriter (quantized linears in
the target's format, everything else in 16 bits) and fills the manifest's per-layer entries; the parts outside
the blocks are written once at the end, a head tied to the embeddings only once."""
from __future__ import annotations

import torch

from ..artifact import ArtifactWriter
from ..checksums import settle_hashes


class BaseEmitter:
    """on_block(block, ctx) packs a finished block; finish(lm) writes the parts outside the blocks. A target
    subclasses it and implements quantized(); writes_bias: its quantized() stores the bias (in its own layout);
    store_tied_head: a head tied to the embeddings is stored as a tensor of its own too (for an engine whose loader
    does not tie them)."""
    writes_bias = False
    store_tied_head = False

    def __init__(self, writer: ArtifactWriter, dtype: torch.dtype = torch.float16):
        self.writer, self.dtype = writer, dtype
        self.layers: dict[str, dict] = {}
        self.blocks: dict[str, dict] = {}
        self.tied = False

    def _plain(self, name: str, t: torch.Tensor) -> None:
        self.writer.add(name, t.to(self.dtype) if t.is_floating_point() else t)

    def quantized(self, full: str, lin, mod, entry: dict) -> None:
        """Write one quantized linear's tensors and fill its manifest entry (format, spec, weight checksum)."""
        raise NotImplementedError

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
            if mod.bias is not None and not (self.writes_bias and lin.qtensor is not None):
                self._plain(f"{full}.bias", mod.bias.data)
            done |= {f"{name}.weight", f"{name}.bias"}
            self.layers[full] = entry
        for pname, p in block.module.named_parameters():
            if pname not in done:
                self._plain(f"{block.prefix}.{pname}", p.data)
        if ctx is not None and getattr(ctx, "block_error", None) is not None:
            self.blocks[block.prefix] = {"output_rel_err": ctx.block_error}
        settle_hashes()   # the weights' checksums (hashed by threads) are in before the block's weights go

    def finish(self, lm) -> None:
        """Embeddings, final norm and head stay 16-bit; a head tied to the embeddings is stored once (twice, as a
        copy, where store_tied_head says so)."""
        model = lm.model
        tied_same, head = False, None
        if hasattr(model, "get_input_embeddings"):   # a diffusers model has no token embeddings, nor a head
            emb = model.get_input_embeddings().weight
            head = model.get_output_embeddings()
            if head is not None and getattr(lm.config, "tie_word_embeddings", False):
                tied_same = head.weight.shape == emb.shape and torch.equal(head.weight.data, emb.data)
        for name, p in model.named_parameters(remove_duplicate=False):
            if lm.in_blocks(name):   # the blocks' tensors were written by on_block
                continue
            copy = tied_same and head is not None and p is head.weight and name != _param_name(model, emb)
            if copy and not self.store_tied_head:
                continue
            if name in self.writer:
                continue
            self._plain(name, p.data.clone() if copy else p.data)   # a file cannot hold one storage twice
        self.tied = tied_same


def _param_name(model, param) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is param)
