"""Per-block calibration context: the block's inputs, its float outputs, and the inputs of each linear, collected
with forward hooks and collected again whenever a pass has changed the weights."""
from __future__ import annotations

import contextlib
import logging

import torch

from ..ir.capture import first_samples
from ..ir.simulate import attention_module, simulate


class BlockContext:
    """What passes see of the calibration data while one block is compiled."""

    def __init__(self, block, args: tuple, kwargs: dict, device: torch.device, seed: int = 0,
                 max_tokens: int | None = None, verbose: bool = False):
        self.block, self.args, self.kwargs = block, args, kwargs
        self.device, self.seed, self.verbose = device, seed, verbose
        self.max_tokens = max_tokens
        self._acts: dict[str, torch.Tensor] | None = None
        self._float_out: torch.Tensor | None = None
        self.messages: list[str] = []
        self.block_error: float | None = None
        self.reference: torch.Tensor | None = None   # float output of the block just before quantization
        self._last_out: torch.Tensor | None = None

    def forward(self, module: torch.nn.Module | None = None, simulate: bool = False,
                samples: int | None = None) -> torch.Tensor:
        """Run the block (as its weights are now) on the calibration inputs; simulate: as the engine runs it
        (int8 activations, quantized KV cache, where the target set them); samples: on the first n sequences."""
        args, kwargs = self.args, self.kwargs
        if samples is not None and samples < args[0].shape[0]:
            args, kwargs = first_samples(args, kwargs, args[0].shape[0], samples)
        with torch.no_grad(), (self.simulation() if simulate else contextlib.nullcontext()):
            out = (module or self.block.module)(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def simulation(self):
        """A context in which the block computes what the engine computes at run time (see ir.simulate)."""
        act = {n: l.act for n, l in self.block.linears.items() if l.act}
        kv = {attention_module(a.q): a.kv_bits for a in self.block.attentions if a.kv_bits}
        return simulate(self.block.module, act=act, kv=kv)

    def block_io(self):
        """(args, kwargs, float outputs): the outputs as the block computed them before any pass ran."""
        if self._float_out is None:
            self._acts = self._collect()   # one forward gives both the linears' inputs and the output
        return self.args, self.kwargs, self._float_out

    def invalidate(self) -> None:
        """Weights changed: linear inputs must be collected again before a pass reads them."""
        self._acts = None
        self._last_out = None

    def current_output(self) -> torch.Tensor:
        """The block's output with its current weights (reuses the last collection's forward when still valid)."""
        if self._last_out is None:
            self._acts = self._collect()
        return self._last_out

    def rescale_inputs(self, linears: list[str], s: torch.Tensor) -> None:
        """A pass divided these linears' input channels by s exactly (smoothing): update the cached inputs instead of
        running the block again. Without a cache there is nothing to update."""
        if self._acts is None:
            return
        seen = {}
        for name in linears:
            x = self._acts[name]
            if id(x) not in seen:
                seen[id(x)] = x / s.to(x.dtype)
            self._acts[name] = seen[id(x)]

    def inputs(self, linear: str) -> torch.Tensor:
        """[tokens, in_features] float32 inputs that `linear` sees with the block's current weights."""
        if self._acts is None:
            self._acts = self._collect()
        return self._acts[linear]

    def _collect(self) -> dict[str, torch.Tensor]:
        acts, hooks, seen = {}, [], []   # seen: (input tensor, its flattened float32 copy)

        def hook(m, inp, out, name):
            x = inp[0]
            # q/k/v read one tensor: keep one flattened copy of it. Identity (`is`), not the address: a freed
            # 16-bit input's memory can be reused by a later, different input of the same shape.
            for src, flat in seen:
                if src is x:
                    acts[name] = flat
                    return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if self.max_tokens and flat.shape[0] > self.max_tokens:
                flat = flat[: self.max_tokens]
            seen.append((x, flat))
            acts[name] = flat

        for name in self.block.linears:
            mod = self.block.linear_module(name)
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)))
        try:
            out = self.forward()
            self._last_out = out
            if self._float_out is None:
                self._float_out = out
        finally:
            for h in hooks:
                h.remove()
        return acts

    def log(self, msg: str) -> None:
        """A note about this block (e.g. a pass skipped a group): kept for the end-of-run summary, and shown per
        block at debug level (-v)."""
        self.messages.append(msg)
        where = self.block.prefix if self.block is not None else "outside the blocks"   # prologues, epilogues
        logging.getLogger("dcc").debug(f"  [{where}] {msg}")

