"""Text generation from a causal-LM artifact (`dcc generate`): prefill, then one token per step, greedy or sampled
(temperature, then top-p), on the CPU reference model (runtime/reference.py) or dcc's CUDA model; one loop for both.

The steps. The blocks run as their captured graphs (runtime/graph_blocks.py), and transformers' cache cannot be an
input of those (torch.export: "Unsupported input type DynamicCache"), so the KV cache is runtime/kv_graphs.py: each
block captured once more with its past K/V as graph inputs and outputs, the past padded to 32-slot buckets and
masked. Where it does not apply (sliding-window attention; a block it cannot capture) every step runs the whole
sequence, right-padded to a bucket (NextLogits; attention is causal and quantization per token, so the padding never
reaches a real position). SmolLM2-135M, one CPU thread of a busy 2-core machine, decode tokens/s cached vs
recomputed: W4A16 10.1 vs 2.5 (prompt 4, 64 new), 9.0 vs 0.7 (prompt 156); W4A8KV4 3.7 vs 0.5 (prompt 4).
Graph capture time (about 0.5 s a shape on stories260K, 1.3 s on SmolLM2) is measured apart, left out of tokens/s.

Exactness. Each path computes the reference's function but not bit for bit: a cached step runs one token where the
reference runs the sequence, and padding changes shapes, so attention's float sums can differ in the last bit. On a
W4A8KV4 artifact of a real model such a bit can move an int8 activation or 4-bit KV code across a rounding boundary
and, some tokens on, a near-tie greedy choice (SmolLM2 QServe: at new token 7, where the top two logits are 0.5
apart); W4A16 SmolLM2 and every stories260K artifact gave the reference's tokens (32 of 32, 16 of 16 on SmolLM2).
cache=False with bucket=1 is the reference run on the whole sequence at every step (`dcc generate --exact`)."""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..ir.program import input_key
from .graph_blocks import GraphForward

log = logging.getLogger("dcc")
BUCKET = 32   # padded lengths and cache slots: padding cost (~4 ms a position, SmolLM2) vs a capture (~1.3 s)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (argmax); else softmax(logits / temperature), cut to
    the smallest set of most likely tokens whose mass reaches top_p (nucleus), drawn with a torch.Generator seeded
    by `seed` (the same seed gives the same tokens).

        Sampling()                                   # greedy
        Sampling(temperature=0.8, top_p=0.95, seed=1)
    """
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature}: must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")


def choose(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of `logits` [B, V] (float32 on the CPU): [B] token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        # stable sort: of equal probabilities the lower id comes first, as argmax picks it
        p, order = probs.sort(dim=-1, descending=True, stable=True)
        # drop a token once the tokens before it already hold top_p of the mass (the first is always kept)
        p = p.masked_fill(p.cumsum(-1) - p >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    """What a run produced and how long it took (capture time excluded from prefill_s and decode_s)."""
    tokens: list[list[int]]        # the new tokens of each sequence, up to and including its EOS
    prompt_tokens: int
    stop: str                      # "eos" (every sequence ended), "length" (max_new_tokens) or "context"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    captures: int = 0              # input shapes whose block graphs were captured during the run
    capture_s: float = 0.0
    steps: int = 0                 # decode steps after the prefill
    cached: bool = False           # decoded with the KV cache (runtime/kv_graphs.py), not by recomputing

    @property
    def batch(self) -> int:
        return len(self.tokens)

    def prefill_tps(self) -> float | None:
        """Prompt tokens/s of the prefill, every sequence of the batch counted (None where nothing was timed)."""
        return self.prompt_tokens * self.batch / self.prefill_s if self.prefill_s > 0 else None

    def decode_tps(self) -> float | None:
        """Decode tokens/s of one sequence: steps after the prefill's token, per second."""
        return self.steps / self.decode_s if self.steps and self.decode_s > 0 else None

    def decode_tps_total(self) -> float | None:
        """Decode tokens/s of the batch: the tokens its sequences made after the prefill's, up to their EOS."""
        made = sum(max(len(t) - 1, 0) for t in self.tokens)
        return made / self.decode_s if self.steps and self.decode_s > 0 else None

    def summary(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "batch": self.batch, "new_tokens": [len(t) for t in self.tokens],
                "stop": self.stop, "prefill_tokens_per_s": self.prefill_tps(), "decode_tokens_per_s": self.decode_tps(),
                "decode_tokens_per_s_total": self.decode_tps_total(), "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "graph_captures": self.captures, "capture_s": self.capture_s,
                "kv_cache": self.cached}


def padded_length(n: int, bucket: int, limit: int | None) -> int:
    """n rounded up to a multiple of bucket, never beyond the model's positions (limit) unless n itself is."""
    up = -(-n // bucket) * bucket
    return max(n, min(up, limit)) if limit else up


class _Clock:
    """Seconds spent capturing block graphs while a run is timed: each watched GraphForward's _capture, wrapped
    (the model's blocks from the start, the KV-cache graphs once they exist)."""

    def __init__(self, model):
        self.seconds, self.shapes, self.watched = 0.0, set(), []
        self.model = model

    def watch(self, forward: GraphForward) -> None:
        capture = forward._capture

        def timed(args, kwargs):
            t = time.perf_counter()
            try:
                return capture(args, kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.shapes.add(input_key(args, kwargs))
        forward._capture = timed
        self.watched.append(forward)

    @contextlib.contextmanager
    def running(self):
        for m in self.model.modules():
            if isinstance(m.__dict__.get("forward"), GraphForward):
                self.watch(m.__dict__["forward"])
        try:
            yield self
        finally:
            for f in self.watched:
                f.__dict__.pop("_capture", None)


class NextLogits:
    """The logits after the last token of each row of ids [B, n] ([B, V] float32 on the CPU): the whole sequence
    run right-padded to a multiple of `bucket` (the real positions never read the padding)."""

    def __init__(self, model, bucket: int, limit: int | None):
        self.model, self.bucket, self.limit = model, bucket, limit
        self.device = next(model.parameters()).device
        self.keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        pad = padded_length(n, self.bucket, self.limit) - n
        x = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1) if pad else ids   # any id pads: none is read
        if self.keep:   # only the last real position goes through the head
            out = self.model(input_ids=x, use_cache=False, logits_to_keep=torch.tensor([n - 1], device=self.device))
            logits = out.logits[:, -1]
        else:
            logits = self.model(input_ids=x, use_cache=False).logits[:, n - 1]
        return logits.float().cpu()


class _Recompute:
    """Steps without a cache: every step runs the whole sequence (NextLogits)."""
    cached = False

    def __init__(self, model, bucket: int, limit: int | None):
        self.next = NextLogits(model, bucket, limit)
        self.device = self.next.device

    def __call__(self, ids: torch.Tensor, first: bool) -> torch.Tensor:
        return self.next(ids)


class _Cached:
    """Steps with the KV cache of runtime/kv_graphs.py: the prompt once, then one token per row."""
    cached = True

    def __init__(self, model, bucket: int, limit: int | None, clock: _Clock | None = None):
        self.model, self.bucket, self.limit, self.clock = model, bucket, limit, clock
        self.device = next(model.parameters()).device

    def __call__(self, ids: torch.Tensor, first: bool) -> torch.Tensor:
        if first:   # built here, where a block it cannot take falls back to recomputing (generate)
            from .kv_graphs import CachedSteps
            self.steps = CachedSteps(self.model, self.bucket)
            for w in self.steps.wrappers if self.clock is not None else ():
                self.clock.watch(w.forward)
            return self.steps.prefill(ids, padded_length(ids.shape[1], self.bucket, self.limit))
        return self.steps.step(ids[:, -1])


def can_cache(model) -> bool:
    """Whether the KV-cached steps apply: full causal attention in every layer (a sliding window would need its own
    mask) and a model forward that takes position ids and logits_to_keep."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)   # where given, it says which layers slide (Qwen2 names a window unused)
    if any("sliding" in str(t) for t in types) if types else getattr(cfg, "sliding_window", None):
        return False
    params = inspect.signature(type(model).forward).parameters
    return "position_ids" in params and "logits_to_keep" in params


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), batch: int = 1,
             eos: set[int] | frozenset = frozenset(), bucket: int = BUCKET, max_positions: int | None = None,
             on_tokens: Callable[[list[int]], None] | None = None, cache: bool = True) -> Generation:
    """Generate up to max_new_tokens after `prompt` (token ids), repeated `batch` times, on `model` (a causal LM
    from build_model or build_cuda_model). A sequence ends at its first token in `eos`; the run ends when every
    sequence has, or at max_new_tokens, or when the sequence fills max_positions. on_tokens(list of B new ids) is
    called as each step's tokens arrive (ids of ended sequences are repeats of their EOS). cache: decode with the
    KV cache where the model allows it (can_cache; else, or if its first capture fails, every step recomputes)."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if max_positions and len(prompt) >= max_positions:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model takes at most {max_positions} positions")
    model.eval()
    clock = _Clock(model)
    step = (_Cached(model, bucket, max_positions, clock) if cache and can_cache(model)
            else _Recompute(model, bucket, max_positions))
    gen = torch.Generator().manual_seed(sampling.seed)
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=step.device)
    out = Generation([[] for _ in range(batch)], len(prompt), "length")
    done = torch.zeros(batch, dtype=torch.bool)
    with clock.running():
        for i in range(max_new_tokens):
            if max_positions and ids.shape[1] >= max_positions:
                out.stop = "context"
                break
            t, c = time.perf_counter(), clock.seconds
            if i == 0 and step.cached:
                try:
                    logits = step(ids, True)
                except Exception as e:  # noqa: BLE001 - a block the cached capture cannot take: recompute instead
                    log.info(f"note: no KV cache for this model ({type(e).__name__}: {str(e).splitlines()[0][:120]}"
                             f"); every step recomputes the sequence")
                    step = _Recompute(model, bucket, max_positions)
                    logits = step(ids, True)
            else:
                logits = step(ids, i == 0)
            nxt = choose(logits, sampling, gen)
            ended = done.clone()
            nxt = torch.where(ended, ids[:, -1].cpu(), nxt)   # an ended sequence repeats its EOS
            spent = time.perf_counter() - t - (clock.seconds - c)
            if i == 0:
                out.prefill_s = spent
            else:
                out.decode_s += spent
                out.steps += 1
            for b, tok in enumerate(nxt.tolist()):
                if not ended[b]:
                    out.tokens[b].append(tok)
                    done[b] = tok in eos
            if on_tokens is not None:
                on_tokens(nxt.tolist())
            ids = torch.cat([ids, nxt.to(step.device)[:, None]], dim=1)
            if bool(done.all()):
                out.stop = "eos"
                break
    out.captures, out.capture_s, out.cached = len(clock.shapes), clock.seconds, step.cached
    return out
