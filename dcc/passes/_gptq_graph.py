"""GPTQ's column sweep on a GPU as CUDA-graph replays: the sweep is thousands of tiny kernels (about fifteen per
column: the column's quantization, its error, the rank-1 update of the columns after it), so on a GPU it is bound by
launches (6.7 s of a 10 s Llama-3-8B block on an H200 at 16 x 256 tokens). One lazy-update block of columns is
captured once per shape and replayed for every block: the same kernels on the same values as the eager loop in
gptq._sweep, so the same bits.

What changes between replays is copied into static buffers first: the block's weight columns and its corner of the
inverse Hessian's factor, and every per-group parameter of the column quantizer gathered to the block's columns (a
column's group is a Python index in the eager loop; here column i of a gathered [N, B] buffer). The codes come out in
the block's order and are scattered to their columns after the replay."""
from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger("dcc")
_GRAPHS: dict[tuple, "_Graph"] = {}   # (device, rows, block, quantizer kind and shapes) -> captured graph
_FAILED: set[tuple] = set()


class _Graph:
    """The captured body of one block: static inputs w1 [N, B], u1 [B, B], the quantizer's parameters; outputs the
    updated w1, err1 [N, B] and the codes qb [N, B]."""

    def __init__(self, cols, n: int, b: int, device):
        self.b = b
        self.w1 = torch.zeros(n, b, dtype=torch.float32, device=device)
        self.u1 = torch.eye(b, dtype=torch.float32, device=device)
        self.err1 = torch.zeros(n, b, dtype=torch.float32, device=device)
        self.qb = torch.zeros(n, b, dtype=torch.float32, device=device)
        self.cols = copy.copy(cols)   # its tensors replaced by static buffers of the block's columns
        self.params = {}
        for name, t in vars(cols).items():
            if isinstance(t, torch.Tensor):
                buf = torch.empty((n, b) if t.dim() == 2 else t.shape, dtype=t.dtype, device=device)
                setattr(self.cols, name, buf)
                self.params[name] = buf
        self.graph = None

    def replay(self) -> None:
        if self.graph is None:   # not captured (the CPU tests of the block logic): the same body, eagerly
            self.body()
        else:
            self.graph.replay()

    def fill(self, w1, u1, cols, gidx: torch.Tensor) -> None:
        self.w1.copy_(w1)
        self.u1.copy_(u1)
        for name, buf in self.params.items():
            t = getattr(cols, name)
            buf.copy_(t.index_select(1, gidx) if t.dim() == 2 else t)

    def body(self) -> None:
        w1, u1, err1 = self.w1, self.u1, self.err1
        for i in range(self.b):   # gptq._sweep's inner loop, column i quantized with the gathered column i
            q, deq = self.cols(w1[:, i], i)
            self.qb[:, i] = q
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e

    def capture(self) -> None:
        side = torch.cuda.Stream(self.w1.device)
        side.wait_stream(torch.cuda.current_stream(self.w1.device))
        with torch.cuda.stream(side):   # warm-up off the capture, as CUDA graphs require
            self.body()
        torch.cuda.current_stream(self.w1.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.body()


def _key(cols, n: int, b: int, device) -> tuple:
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(vars(cols).items()) if isinstance(v, torch.Tensor))
    others = tuple((k, repr(v)) for k, v in sorted(vars(cols).items()) if not isinstance(v, torch.Tensor))
    return (str(device), n, b, type(cols).__name__, shapes, others)


def sweep_graphed(w, u, cols, block: int, perm_l: list[int], group_of: list[int], qcols) -> bool:
    """gptq._sweep with static groups on a CUDA device, block by block through a captured graph (a last partial
    block runs eagerly by the caller's loop: returns the column where it starts, or False where nothing could be
    captured and the caller must run the whole sweep itself)."""
    n, k = w.shape
    full = k - k % block
    if not full:
        return False
    key = _key(cols, n, block, w.device)
    if key in _FAILED:
        return False
    g = _GRAPHS.get(key)
    if g is None:
        try:
            g = _Graph(cols, n, block, w.device)
            g.fill(w[:, :block], u[:block, :block], cols, torch.tensor(group_of[:block], device=w.device))
            g.capture()
        except Exception as e:   # a quantizer whose ops cannot be captured: the eager loop computes the same
            log.debug(f"gptq: sweep not captured as a CUDA graph ({type(e).__name__}: {e}); running it eagerly")
            _FAILED.add(key)
            return False
        _GRAPHS[key] = g
    gidx = torch.tensor(group_of, device=w.device)
    perm = torch.tensor(perm_l, device=w.device)
    for i1 in range(0, full, block):
        i2 = i1 + block
        g.fill(w[:, i1:i2], u[i1:i2, i1:i2], cols, gidx[i1:i2])
        g.replay()
        qcols.index_copy_(1, perm[i1:i2], g.qb)
        w[:, i2:] -= g.err1 @ u[i1:i2, i2:]
    return full
