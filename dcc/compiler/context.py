"""Per-block calibration context: the block's inputs, its float outputs, and the inputs of each linear, collected
with forward hooks and collected again whenever a pass has changed the weights."""
from __future__ import annotations

import sys

import torch


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

    def forward(self, module: torch.nn.Module | None = None) -> torch.Tensor:
        """Run the block (as its weights are now) on the calibration inputs."""
        with torch.no_grad():
            out = (module or self.block.module)(*self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def block_io(self):
        """(args, kwargs, float outputs): the outputs as the block computed them before any pass ran."""
        if self._float_out is None:
            self._acts = self._collect()   # one forward gives both the linears' inputs and the output
        return self.args, self.kwargs, self._float_out

    def invalidate(self) -> None:
        """Weights changed: linear inputs must be collected again before a pass reads them."""
        self._acts = None

    def inputs(self, linear: str) -> torch.Tensor:
        """[tokens, in_features] float32 inputs that `linear` sees with the block's current weights."""
        if self._acts is None:
            self._acts = self._collect()
        return self._acts[linear]

    def _collect(self) -> dict[str, torch.Tensor]:
        acts, hooks, by_id = {}, [], {}
        for name in self.block.linears:
            mod = self.block.linear_module(name)

            def hook(m, inp, out, name=name):
                x = inp[0]
                # q/k/v read one tensor: keep one flattened copy of it
                key = (x.data_ptr(), tuple(x.shape))
                if key not in by_id:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                    if self.max_tokens and flat.shape[0] > self.max_tokens:
                        flat = flat[: self.max_tokens]
                    by_id[key] = flat
                acts[name] = by_id[key]

            hooks.append(mod.register_forward_hook(hook))
        try:
            out = self.forward()
            if self._float_out is None:
                self._float_out = out
        finally:
            for h in hooks:
                h.remove()
        return acts

    def log(self, msg: str) -> None:
        self.messages.append(msg)
        if self.verbose:
            print(f"  [{self.block.prefix}] {msg}", file=sys.stderr)
