"""The decode step in a CUDA graph: static token and position buffers in, static logits and greedy tokens out.
Warm-up runs the step eagerly on a side stream first (the extensions build, the W4A8 workspace is allocated and
cuBLAS picks its kernels outside the capture); the warm-up writes the same K/V into the same slot as the replay."""
from __future__ import annotations

import torch


class StepGraph:
    """step(tok, pos) captured once for the cache's batch and capacity; __call__ copies tok/pos in (where given) and
    replays. advance: the graph itself feeds the greedy tokens back and moves the positions on by one, so that a
    greedy loop only replays and reads the tokens (an ended sequence's own next token is fed rather than its EOS:
    rows are independent, and an ended row's tokens are not kept)."""

    def __init__(self, lm, tok: torch.Tensor, pos: torch.Tensor, warmup: int = 2, advance: bool = False):
        self.lm = lm
        self.tok, self.pos = tok.clone(), pos.clone()
        side = torch.cuda.Stream(device=tok.device)
        side.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                lm.step(self.tok, self.pos)
        torch.cuda.current_stream(tok.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lm.step(self.tok, self.pos)
            self.next = self.logits.argmax(-1)
            if advance:
                self.tok.copy_(self.next)
                self.pos.add_(1)

    def __call__(self, tok: torch.Tensor | None = None, pos: torch.Tensor | None = None):
        """(logits [B, V] float32, greedy tokens [B]) -- static buffers, overwritten by the next call."""
        if tok is not None:
            self.tok.copy_(tok, non_blocking=True)
        if pos is not None:
            self.pos.copy_(pos, non_blocking=True)
        self.graph.replay()
        return self.logits, self.next
