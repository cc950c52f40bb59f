"""`dcc generate`'s loop on the fast decoder: the prompt once (prefill), then one token per sequence per step
(a CUDA graph replay on the GPU, an eager step on the CPU); greedy tokens are picked on the device, sampled ones
from the logits on the CPU with runtime/generate.py's sampler. Same Generation record as the reference loop."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..generate import Generation, Sampling, choose


GRAPH_DEVICES = ("cuda",)   # where the decode step runs as a graph (a test adds "cpu" with a stand-in graph)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_fast(lm, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), batch: int = 1,
                  eos: set[int] | frozenset = frozenset(), max_positions: int | None = None,
                  on_tokens: Callable[[list[int]], None] | None = None, graph: bool = True) -> Generation:
    """Generate up to max_new_tokens after `prompt` for `batch` copies of it on the FastLlama `lm` (the contract of
    runtime.generate.generate). graph: replay the decode step as a CUDA graph (GPU only)."""
    if lm.device.type == "cuda":   # the extensions launch on the current device: make it lm's (cuda:N)
        with torch.cuda.device(lm.device):
            return _generate(lm, prompt, max_new_tokens, sampling, batch, eos, max_positions, on_tokens, graph)
    return _generate(lm, prompt, max_new_tokens, sampling, batch, eos, max_positions, on_tokens, graph)


def _generate(lm, prompt, max_new_tokens, sampling, batch, eos, max_positions, on_tokens, graph) -> Generation:
    if not prompt:
        raise ValueError("the prompt has no tokens")
    n = len(prompt)
    if max_positions and n >= max_positions:
        raise ValueError(f"the prompt has {n} tokens; the model takes at most {max_positions} positions")
    dev = lm.device
    capacity = n + max_new_tokens
    if max_positions:
        capacity = min(capacity, max_positions)
    lm.allocate(batch, capacity)
    out = Generation([[] for _ in range(batch)], n, "length", cached=True)
    gen = torch.Generator().manual_seed(sampling.seed)
    greedy = sampling.temperature == 0
    done = torch.zeros(batch, dtype=torch.bool)
    last = torch.full((batch,), prompt[-1], dtype=torch.long)
    step = tok = pos = None
    advance = fed = False
    for i in range(max_new_tokens):
        if max_positions and n + i >= max_positions:
            out.stop = "context"
            break
        _sync(dev)
        t = time.perf_counter()
        if i == 0:
            logits = lm.prefill(torch.tensor([prompt] * batch, dtype=torch.long, device=dev))
            nxt = logits.argmax(-1) if greedy else None
        else:
            if step is None:   # built on the first decode step; the capture is timed apart
                tc = time.perf_counter()
                if graph and dev.type in GRAPH_DEVICES:
                    from . import graph as graphs
                    step = graphs.StepGraph(lm, tok, pos, advance=greedy)
                    out.captures = 1
                    advance = greedy
                else:
                    step = lambda tk, ps: (lambda lg: (lg, lg.argmax(-1)))(lm.step(tk, ps))   # noqa: E731
                _sync(dev)
                out.capture_s = time.perf_counter() - tc
                t = time.perf_counter()
            # greedy on the graph: after its first replay it feeds its tokens and positions back itself
            logits, nxt = step(None, None) if fed else step(tok, pos)
            fed = advance
        chosen = nxt.cpu() if greedy else choose(logits.cpu(), sampling, gen)
        ended = done.clone()
        chosen = torch.where(ended, last, chosen)   # an ended sequence repeats its EOS
        if not fed:
            tok = chosen.to(dev)
            pos = torch.full((batch,), n + i, dtype=torch.long, device=dev)
        spent = time.perf_counter() - t
        if i == 0:
            out.prefill_s = spent
        else:
            out.decode_s += spent
            out.steps += 1
        toks = chosen.tolist()
        for b, tk in enumerate(toks):
            if not ended[b]:
                out.tokens[b].append(tk)
                done[b] = tk in eos
        if on_tokens is not None:
            on_tokens(toks)
        last = chosen
        if bool(done.all()):
            out.stop = "eos"
            break
    return out
