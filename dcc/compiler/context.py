"""Per-block calibration context: the block's inputs, its float outputs, and the inputs of each linear, all computed
by the block's captured graph (ir.program), collected again whenever a pass has changed the weights. What passes
score a block on is its output: the first one (a decoder layer's hidden states), or every tensor it returns, joined
(a diffusion block with two streams, FLUX's (encoder_hidden_states, hidden_states))."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..ir import program
from . import dist, spill
from .chunks import chunk_sizes, run_chunked
from .stats import InputStats
from ..ir.capture import Captures, first_samples, typed_nodes
from ..ir.program import copy_graph, input_key
from ..ir.rewrite import linear_nodes


class BlockContext:
    """What passes see of the calibration data while one block is compiled."""

    def __init__(self, block, args: tuple, kwargs: dict, device: torch.device, seed: int = 0,
                 max_tokens: int | None = None, verbose: bool = False, captures: Captures | None = None,
                 outputs: str = "first", global_batch: int | None = None, memory: str = "full"):
        if outputs not in ("first", "all"):
            raise ValueError(f"outputs {outputs!r}: 'first' or 'all'")
        if memory not in ("full", "lean", "spill"):
            raise ValueError(f"memory {memory!r}: 'full', 'lean' or 'spill'")
        self.block, self.args, self.kwargs = block, args, kwargs
        self.outputs = outputs   # "first": the block's first output; "all": every tensor it returns, joined
        self.device, self.seed, self.verbose = device, seed, verbose
        self.max_tokens = max_tokens
        # where the linears' inputs are held (api.plan_memory chooses): "full", every linear's on the device;
        # "lean", one linear's (and those reading the same tensor) at a time, a run per input read; "spill", every
        # linear's in host memory, read back a block of rows at a time (compiler/spill.py; the same runs and bits
        # as full)
        self.lean, self.spill = memory == "lean", memory == "spill"
        self.captures = captures if captures is not None else Captures()
        self._acts: dict[str, torch.Tensor] | None = None
        self._float_out: torch.Tensor | None = None
        self.messages: list[str] = []
        self.block_error: float | None = None
        self.reference: torch.Tensor | None = None   # float output of the block just before quantization
        self._last_out: torch.Tensor | None = None
        self._main_key: tuple | None = None
        self._variants: dict[tuple, tuple] = {}      # input key -> (graph, number of rewrites replayed on it)
        # the calibration batch may be split over processes (compiler/dist.py): this one holds its share of the
        # global_batch sequences; passes reduce what they read through self.stats (compiler/stats.py)
        self.world = dist.current()
        local = _batch(args, kwargs) if block is not None else 0
        self.global_batch = local if global_batch is None else global_batch
        self.stats = InputStats(self.world, self.global_batch, local, device) if block is not None else None
        self._samples: dict[tuple, tuple[tuple, dict]] = {}   # (samples, hidden given) -> the batch's first ones
        # statistics a later pass asked to be read off the float runs that collect inputs anyway (track)
        self._tracks: dict[str, Callable[[], dict[str, Callable]]] = {}
        self._tracked: set[str] = set()

    def graph(self, args: tuple, kwargs: dict):
        """The block's graph for these inputs: block.gm for the calibration batch; for another shape (the first
        samples), a capture of that shape with the block's rewrites replayed on it."""
        if self.block is None or self.block.gm is None:
            raise RuntimeError("the block has no captured graph to run")
        if args is self.args and kwargs is self.kwargs:
            return self.block.gm
        if self._main_key is None:
            self._main_key = input_key(self.args, self.kwargs)
        key = input_key(args, kwargs)
        if key == self._main_key:
            return self.block.gm
        gm, replayed = self._variants.get(key, (None, -1))
        if replayed != len(self.block.rewrites):
            gm = copy_graph(self.captures.get(self.block.module, args, kwargs)[0])
            for fn in self.block.rewrites:
                fn(gm)
            self._variants[key] = (gm, len(self.block.rewrites))
        return gm

    def rewrite(self, fn: Callable) -> object:
        """Apply a graph rewrite fn(gm) to the block's graph (and, later, to its other captures); returns fn's
        result. The dumps' node listing follows."""
        out = fn(self.block.gm)
        self.block.rewrites.append(fn)
        self.block.nodes = typed_nodes(self.block.gm)
        return out

    def _inputs(self, hidden: torch.Tensor | None, samples: int | None) -> tuple[tuple, dict]:
        args, kwargs = self.args, self.kwargs
        if hidden is not None:
            args = (hidden,) + tuple(args[1:])
        if samples is not None and self.world.distributed:
            return self._global_first(args, kwargs, samples, hidden is not None)
        if samples is not None:
            batch = _batch(args, kwargs)
            if samples < batch:
                args, kwargs = first_samples(args, kwargs, batch, samples)
        return args, kwargs

    def _global_first(self, args: tuple, kwargs: dict, samples: int, hidden: bool) -> tuple[tuple, dict]:
        """The batch's first `samples` sequences, wherever they are held, gathered into every process (the probe
        and search runs on them then compute the same values everywhere); the block's inputs are gathered once."""
        key = (samples, hidden)
        if hidden or key not in self._samples:
            local, start = _batch(args, kwargs), self.stats.start
            take = max(0, min(local, samples - start))

            def cut(v):
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == local:
                    return self.world.cat_rows(v[:take].contiguous())
                if isinstance(v, tuple):
                    return tuple(cut(t) for t in v)
                return v
            got = tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
            if hidden:
                return got
            self._samples[key] = got
        return self._samples[key]

    def _first(self, out):
        """The output passes score: the first (as a decoder layer's hidden states), or all tensors joined."""
        if out is None:
            return None
        if self.outputs == "all":
            return join_outputs(out)
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward_full(self, simulate: bool = True) -> object:
        """The block's whole output (a tensor or a tuple of them, as its forward returns it) on the calibration
        inputs: what the model's forward passes on to the next block."""
        with torch.no_grad():
            return self._run(self.args, self.kwargs, simulate)

    def forward(self, simulate: bool = False, samples: int | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run the block's graph (with the weights as they are now) on the calibration inputs. simulate: as the engine
        computes it (the dcc:: run-time numerics in the graph: int8 activations, quantized KV cache); else the float
        function. samples: on the first n sequences; hidden: other hidden states in place of the block's input."""
        args, kwargs = self._inputs(hidden, samples)
        with torch.no_grad():
            return self._first(self._run(args, kwargs, simulate))

    def record(self, watch: dict[str, Callable[[torch.Tensor], None]], stop: bool = False) -> torch.Tensor | None:
        """Run the float block once, handing the named graph nodes' values to their callbacks; returns its output
        (stop: the run ends after the last watched node, and returns None)."""
        with torch.no_grad():
            return self._first(self._run(self.args, self.kwargs, False, watch or None, stop))   # none: a plain run

    def _run(self, args: tuple, kwargs: dict, engine: bool, watch: dict | None = None, stop: bool = False):
        """The block's graph on (args, kwargs), a few sequences at a time where the batch is large (chunks.py: the
        same outputs and watched values, the intermediates of one chunk); watch as in program.run_recording; stop:
        each run ends once the watched values are computed (no output: returns None)."""
        def one(a, k, w):
            gm = self.graph(a, k)
            if w is None:
                return program.run(gm, self.block.module, a, k, engine=engine)
            if not stop:
                return program.run_recording(gm, self.block.module, a, k, w, engine=engine)
            try:   # the run ends once every watched value is in: what follows is not needed
                left = set(w)
                program.run_recording(gm, self.block.module, a, k, {n: _then_stop(fn, n, left) for n, fn in w.items()},
                                      engine=engine)
            except _StopRun:
                pass
            return None

        batch = _batch(args, kwargs)
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self.outputs != "first" or hidden is None or hidden.dim() != 3 or hidden.shape[0] != batch:
            return one(args, kwargs, watch)   # a chain block's hidden states [batch, seq, width] only
        return run_chunked(one, args, kwargs, batch, chunk_sizes(batch, hidden.shape[1]), watch)

    def rel_error(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        """||out - ref|| / ||ref|| over the whole batch (outputs [local batch, ...] of this process's share), the
        squared norms summed over the canonical leaves (the same number in any number of processes)."""
        ref = ref.to(out.device)   # a spilled context holds the reference in host memory until here
        d = (out.float() - ref.float()).reshape(ref.shape[0], -1)
        r = ref.float().reshape(ref.shape[0], -1)
        num = self.stats.tree(d, lambda v: v.square().sum(dtype=torch.float64))
        den = self.stats.tree(r, lambda v: v.square().sum(dtype=torch.float64))
        return float(num.sqrt() / den.sqrt().clamp(min=1e-30))

    def block_io(self):
        """(args, kwargs, float outputs): the outputs as the block computed them before any pass ran."""
        if self._float_out is None:
            self._acts = self._collect()   # one forward gives both the linears' inputs and the output
        return self.args, self.kwargs, self._float_out

    def invalidate(self) -> None:
        """Weights changed: linear inputs must be collected again before a pass reads them."""
        self._acts = None
        self._last_out = None
        self._tracked.clear()

    def track(self, key: str, make_watch: Callable[[], dict[str, Callable]]) -> None:
        """Have the float runs that collect linear inputs also hand graph nodes' values to callbacks: make_watch()
        gives {node name: callback} at each such run (names of the graph as it is then). tracked(key) says whether
        a run since the last change of the function has done so (a pass that preserves the function and keeps the
        inputs keeps these too), sparing the tracking pass a run of its own."""
        self._tracks[key] = make_watch

    def tracked(self, key: str) -> bool:
        return key in self._tracked

    def untrack(self, key: str) -> None:
        self._tracks.pop(key, None)
        self._tracked.discard(key)

    def current_output(self) -> torch.Tensor:
        """The block's output with its current weights (reuses the last collection's forward when still valid)."""
        if self._last_out is None:
            self._acts = self._collect()
        return self._last_out

    def rescale_inputs(self, linears: list[str], s: torch.Tensor) -> None:
        """A pass divided these linears' input channels by s exactly (smoothing): update the cached inputs instead of
        running the block again. Without a cache there is nothing to update; inputs not held (lean) are collected
        afresh when read."""
        if self._acts is None:
            return
        seen = {}
        for name in linears:
            if name not in self._acts:
                continue
            x = self._acts[name]
            if id(x) not in seen:
                # a spilled input is divided on the device a block of rows at a time (the same bits)
                seen[id(x)] = spill.divide(x, s.to(x.dtype)) if self.spill else x / s.to(x.dtype)
            self._acts[name] = seen[id(x)]

    def inputs(self, linear: str) -> torch.Tensor:
        """[tokens, in_features] float32 inputs that `linear` sees with the block's current weights."""
        if self._acts is None or linear not in self._acts:
            self._acts = None   # lean: the inputs held are another linear's; drop them before the run
            self._acts = self._collect(linear if self.lean else None)
        return self._acts[linear]

    def feed_of(self, linear: str) -> str:
        """The graph node whose value `linear` reads: linears with the same feed share one input tensor."""
        return linear_nodes(self.block.gm)[linear].args[0].name

    def fresh_inputs(self, linear: str) -> torch.Tensor:
        """inputs(linear), collected now by a run that ends once that input is computed and holding nothing else
        (GPTQ's true-sequential stages: each stage's inputs change with the stage before, so the later ones are
        collected again anyway; the run of an early stage is a fraction of the block's)."""
        self._acts, self._last_out = None, None
        self._acts = self._collect(linear, stop=True)
        return self._acts[linear]

    def _collect(self, only: str | None = None, stop: bool = False) -> dict[str, torch.Tensor]:
        """One float run of the graph, keeping each linear's input (read off the node feeding it: linears reading
        one tensor, q/k/v, share one flattened float32 copy); lean, only `only`'s input (none for the output);
        stop: only `only`'s, by a run that ends there (no output)."""
        flat: dict[str, torch.Tensor] = {}

        def flatten(x):
            return x.detach().reshape(-1, x.shape[-1]).float()

        def keep(name):
            def fn(x):
                x = flatten(x)
                if self.spill and x.device.type != "cpu":   # one chunk (not gathered by run_chunked): copied here
                    x = spill.to_host(x)
                flat[name] = x[: self.max_tokens] if self.max_tokens and x.shape[0] > self.max_tokens else x
            if self.spill:
                fn.host_prep = flatten   # run_chunked gathers the chunks' flattened rows in host memory
            return fn

        feeds = {lin: node.args[0].name for lin, node in linear_nodes(self.block.gm).items()
                 if lin in self.block.linears}
        if self.lean or stop:
            feeds = {lin: name for lin, name in feeds.items() if only is not None and name == feeds.get(only)}
        watch = {name: keep(name) for name in set(feeds.values())}
        tracks = {} if stop else {key: make() for key, make in self._tracks.items()}
        for extra in tracks.values():
            for name, fn in extra.items():
                # a tracked statistic reads the device tensor: that input is then gathered on the device
                watch[name] = _both(watch[name], fn) if name in watch else fn
        out = self.record(watch, stop=stop)
        if self.spill and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            # the float output (the reference the block's error is measured against, and block_io's) waits in host
            # memory too: on the GPU it would sit beside the passes' work for the whole block
            out = spill.to_host(out)
        self._tracked |= set(tracks)
        # the output of the first run since the weights changed, as when every input is held (one run); a lean
        # context runs again for each input, after passes that kept the function (smoothing), and those later
        # runs' outputs must not become the reference the block's error is measured against
        if self._last_out is None:
            self._last_out = out
        if self._float_out is None:
            self._float_out = out
        return {lin: flat[name] for lin, name in feeds.items()}

    def log(self, msg: str) -> None:
        """A note about this block (e.g. a pass skipped a group): kept for the end-of-run summary, and shown per
        block at debug level (-v)."""
        self.messages.append(msg)
        where = self.block.prefix if self.block is not None else "outside the blocks"   # prologues, epilogues
        logging.getLogger("dcc").debug(f"  [{where}] {msg}")


def _both(f: Callable, g: Callable) -> Callable:
    def fn(v):
        f(v)
        g(v)
    return fn


class _StopRun(Exception):
    """Raised by a watch callback once every watched value of a stopping run is in."""


def _then_stop(fn: Callable, name: str, left: set) -> Callable:
    def wrapped(v):
        fn(v)
        left.discard(name)
        if not left:
            raise _StopRun
    return wrapped


def _batch(args: tuple, kwargs: dict) -> int:
    """The calibration batch size: the first dimension of the block's hidden states (its first tensor input)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is None:
        raise ValueError("the block has no tensor input to take the calibration batch from")
    return first.shape[0]


def join_outputs(out) -> torch.Tensor:
    """Every floating-point tensor of a block's output, flattened and concatenated (one tensor when it returns one)."""
    import torch.utils._pytree as pytree
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(leaves) == 1:
        return leaves[0]
    return torch.cat([t.reshape(-1) for t in leaves])
