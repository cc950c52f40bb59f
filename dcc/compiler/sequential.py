"""Sequential calibration: one block's weights and activations in memory at a time. Block i is captured, analysed
and compiled on the outputs of the already-quantized blocks before it (as GPTQ/AWQ/QoQ do).

The blocks get their inputs one of two ways. A chain (causal LMs, encoders): block 0's (args, kwargs) are computed
once and block i+1 takes block i's quantized output in place of args[0]. A model forward (diffusion transformers
and UNets, whose blocks sit in several lists with code between them): the whole model runs once on the
calibration batch, and each block, when the forward calls it, is compiled on the inputs it is called with and
hands its quantized outputs back to the forward -- so whatever the model does between blocks (FLUX's two lists,
Z-Image's refiners joined into one sequence, a UNet's convolutions and skip connections) runs on quantized
outputs, with no table of how blocks connect and no recorded inputs kept. Its memory: the parts outside the blocks
(materialised for the whole run, as for a chain: for a UNet its resnets and convolutions), one block's weights and
linear inputs, and the activations the forward itself holds on the calibration batch between blocks (a UNet's skip
connections; for a transformer, the hidden states of each stream)."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..ir.analysis import analyse
from ..ir.capture import Captures, typed_nodes
from ..ir.fused_linear import read_parts_directly, sliced_linears, split_linears
from ..ir.graph import AnalysisError
from ..ir.rewrite import linear_nodes
from ..ir.program import copy_graph
from ..ir.graph import Block
from .context import BlockContext
from .gpu_memory import is_out_of_memory, out_of_memory
from .launch import write_status
from .pass_manager import PassTiming, Step, check_pipeline, run_block, run_model_steps


@dataclass
class CompileResult:
    timing: PassTiming
    blocks: int
    seconds: float
    peak_rss_mb: float
    messages: list[str] = field(default_factory=list)


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


BlockInputs = tuple[tuple, dict]


@dataclass
class ModelForward:
    """Block inputs as the model's own forward computes them. run() calls the whole model once on the calibration
    batch (the adapter knows how); its blocks are replaced, for that call, by their compilation."""
    run: Callable[[], object]


class _Stop(Exception):
    """Raised once the last block is compiled: what the model computes after it is not needed."""


@dataclass
class _BlockCompiler:
    """Compiles one block on given inputs: capture, analysis, specs, the target's passes, the emitter."""
    lm: object
    steps: list[Step]
    assign_specs: Callable
    on_block: Callable | None
    dumper: object
    device: torch.device
    seed: int
    debug: bool
    verbose: bool
    max_tokens: int | None
    release: bool
    timing: PassTiming
    outputs: str = "first"
    memory: str = "full"   # where the linears' inputs are held: full, lean or spill (compiler/context.py)
    global_batch: int | None = None   # the calibration batch's sequences, of which this process holds a share
    messages: list[str] = field(default_factory=list)
    captures: Captures = field(default_factory=Captures)

    def _analyse(self, block, params) -> None:
        """The dataflow analysis. A diffusion block (outputs "all") is analysed leniently: adaLN modulation sits
        between its norms and linears, and joint attention (FLUX's and Qwen-Image's q = cat(image q, text q)) is
        beyond what the analysis takes today; once every linear is found, such a block is compiled linear by
        linear (what SVDQuant needs) and the note says which groups were not found."""
        if self.outputs == "first":
            analyse(block, block.gm, params)
            return
        try:
            analyse(block, block.gm, params, strict=False)
        except AnalysisError as e:
            if len(block.linears) != len(linear_nodes(block.gm)):
                raise
            msg = str(e).removeprefix(f"block {block.prefix}: ")
            self.messages.append(f"{type(block.module).__name__}: dataflow analysis incomplete ({msg}); its "
                                 f"linears are compiled one by one, passes that need attention or norm groups "
                                 f"find none")

    def compile(self, i: int, prefix: str, args: tuple, kwargs: dict, whole: bool = False):
        """Compile block i (at `prefix`) on (args, kwargs); returns its quantized output as the engine computes it:
        the output passes score (whole=False) or everything the block returns (whole=True). A CUDA out-of-memory
        error becomes one line naming the block (compiler/gpu_memory.py)."""
        try:
            return self._compile(i, prefix, args, kwargs, whole)
        except Exception as e:
            if self.device.type == "cuda" and is_out_of_memory(e):
                raise out_of_memory(self.device, prefix, e) from e
            raise

    def _compile(self, i: int, prefix: str, args: tuple, kwargs: dict, whole: bool):
        t0, before = time.perf_counter(), dict(self.timing.seconds)
        module = self.lm.materialize(prefix)
        block = Block(i, prefix, module)
        # blocks with the same code and shapes share one capture (the graph does not depend on weight values); each
        # block runs its own copy, which graph passes rewrite
        gm, params = self.captures.get(module, args, kwargs)
        # a fused linear read only in slices (Phi-3's qkv_proj, gate_up_proj) becomes its parts, so that the
        # analysis sees each projection; captured again, each slice reading its part directly. Not in a diffusion
        # block (outputs "all"): its analysis is lenient, and Nunchaku's engine stores its fused linears (GEGLU's
        # proj, adaLN modulations) as they are
        fused = sliced_linears(gm) if self.outputs == "first" else {}
        if fused:
            split_linears(module, fused)
            block.splits = fused
            gm, params = self.captures.get(module, args, kwargs)
        block.gm = copy_graph(gm)
        if fused:
            read_parts_directly(block.gm)
            block.rewrites.append(read_parts_directly)
        block.nodes = typed_nodes(block.gm, params)
        self._analyse(block, params)
        self.assign_specs(block)
        ctx = BlockContext(block, args, kwargs, self.device, self.seed + i, max_tokens=self.max_tokens,
                           verbose=self.verbose, captures=self.captures, outputs=self.outputs,
                           global_batch=self.global_batch, memory=self.memory)
        t1 = time.perf_counter()
        run_block(block, self.steps, ctx, self.timing, self.dumper, self.debug)
        t2 = time.perf_counter()
        self.messages += ctx.messages
        full = ctx.forward_full(simulate=True) if whole else None   # as the engine computes it
        out = ctx.forward(simulate=True) if full is None else ctx._first(full)
        if ctx.reference is not None:
            # how far the quantized block's output is from the float block's, on the same (quantized) inputs
            ctx.block_error = round(ctx.rel_error(out, ctx.reference), 6)
        t3 = time.perf_counter()
        if self.on_block is not None:
            self.on_block(block, ctx)
        passes = ", ".join(f"{k} {v - before.get(k, 0.0):.1f}s" for k, v in self.timing.seconds.items()
                           if v - before.get(k, 0.0) >= 0.05)
        logging.getLogger("dcc").debug(f"  [{prefix}] {time.perf_counter() - t0:.1f}s: load and capture "
                                       f"{t1 - t0:.1f}s, passes {t2 - t1:.1f}s ({passes}), output {t3 - t2:.1f}s, "
                                       f"emit {time.perf_counter() - t3:.1f}s")
        block.gm = None
        if self.release:
            self.lm.release(prefix)
        return full if whole else out


def compile_blocks(lm, steps: list[Step], inputs: BlockInputs | Callable[[], BlockInputs] | ModelForward,
                   assign_specs, on_block=None, dumper=None, device: str = "cpu", seed: int = 0, debug: bool = False,
                   progress: bool = True, verbose: bool = False, max_tokens: int | None = None,
                   release: bool = True, checkpoint=None, memory: str = "full",
                   global_batch: int | None = None) -> CompileResult:
    """Compile every block in order. `inputs`: block 0's (args, kwargs) on the calibration batch, as the model's
    adapter computes them (dcc.models.adapter: block0_inputs), or a function returning them, called after the passes'
    model prologues -- which may change what reaches block 0 (rotated embeddings), so a pair computed before is
    refused then; or a ModelForward, whose run of the whole model feeds every block. `assign_specs(block)` sets each
    Linear's spec (or skip reason) for the target; `on_block(block, ctx)` receives the finished block (the emitter
    packs it) before its weights are released (release=False keeps them, for in-memory evaluation of formats that no
    layout packs). `checkpoint` (compiler/resume.py, a chain only): saved after each block; the blocks it holds as
    done are not compiled again, the next one starting from its saved input and RNG state. memory: where each
    block holds its linears' inputs (compiler/context.py): full (all of them on the device), lean (one linear's at
    a time, for calibration sets too large for the device otherwise) or spill (all of them in host memory,
    compiler/spill.py, the same bytes as full). global_batch: the calibration batch's sequences when this process
    holds a share of them (compiler/dist.py; block 0's inputs are then that share, and every block's outputs stay
    split)."""
    t0 = time.perf_counter()
    check_pipeline(steps)
    dev = torch.device(device)
    torch.manual_seed(seed)
    timing = PassTiming()
    lm.materialize("")
    ctx0 = BlockContext(None, (), {}, dev, seed)
    # passes that act outside the blocks (rotation of the embeddings, ...), through the manager: timed, dumped
    changed = run_model_steps("prologue", steps, lm, ctx0, timing, dumper)
    comp = _BlockCompiler(lm, steps, assign_specs, on_block, dumper, dev, seed, debug, verbose, max_tokens, release,
                          timing, outputs="all" if isinstance(inputs, ModelForward) else "first", memory=memory,
                          global_batch=global_batch)
    n = len(lm.blocks)
    start = checkpoint.start if checkpoint is not None else 0
    bar = tqdm(range(start, n), desc="compiling blocks", unit="block", disable=not progress, file=sys.stderr,
               initial=start, total=n)
    if isinstance(inputs, ModelForward):
        if checkpoint is not None:
            raise ValueError("compile_blocks: a model forward's compile cannot be checkpointed")
        _through_forward(lm, comp, inputs, bar)
    else:
        if callable(inputs):
            args, kwargs = inputs()
        elif changed:
            raise ValueError(f"compile_blocks: {', '.join(changed)} changed the model before its first block, so "
                             f"block 0's inputs must be computed afterwards: pass them as a function")
        else:
            args, kwargs = inputs
        if checkpoint is not None:   # the finished blocks' state, the next block's input, the RNG as they left it
            args, comp.messages = checkpoint.restore(lm, args, dev)
        for i in bar:
            write_status(lm.block_prefix(i))   # a spread compile's launcher names the block a failed process was at
            out = comp.compile(i, lm.block_prefix(i), args, kwargs)
            args = (out,) + tuple(args[1:])  # quantized outputs feed the next block
            if checkpoint is not None:
                checkpoint.save(i, n, lm, out, comp.messages, dev)
            bar.set_postfix(rss=f"{peak_rss_mb():.0f}MB")
    bar.close()
    if checkpoint is not None:
        checkpoint.wait()   # the last block's checkpoint is written by a thread
    run_model_steps("epilogue", steps, lm, ctx0, timing, dumper)
    return CompileResult(timing, n, time.perf_counter() - t0, peak_rss_mb(), comp.messages)


def _through_forward(lm, comp: _BlockCompiler, inputs: ModelForward, bar) -> None:
    """Run the model once with each block's forward standing in for its compilation, in the order the forward calls
    them. A block the forward calls twice, or never, is refused by name (each is compiled once, on its inputs)."""
    n = len(lm.blocks)
    prefixes = {id(b): lm.block_prefix(i) for i, b in enumerate(lm.blocks)}
    done: list[str] = []

    def stand_in(module):
        def forward(*args, **kwargs):
            prefix = prefixes[id(module)]
            if prefix in done:
                raise ValueError(f"{prefix}: the model's forward calls this block twice; dcc compiles each block "
                                 f"once, on the inputs of its one call")
            del module.forward   # the class's forward again: what torch.export captures
            out = comp.compile(len(done), prefix, args, kwargs, whole=True)
            done.append(prefix)
            bar.update(1)
            bar.set_postfix(rss=f"{peak_rss_mb():.0f}MB")
            if len(done) == n:
                raise _Stop
            module.forward = lambda *a, **k: stand_in(module)(*a, **k)   # a second call is refused above
            return out
        return forward

    for b in lm.blocks:
        b.forward = stand_in(b)
    try:
        with torch.no_grad():
            inputs.run()
    except _Stop:
        pass
    finally:
        for b in lm.blocks:
            b.__dict__.pop("forward", None)
    if len(done) < n:
        missing = [p for p in (lm.block_prefix(i) for i in range(n)) if p not in done]
        raise ValueError(f"{missing[0]}: the model's forward never called this block on the calibration inputs "
                         f"({len(missing)} of {n} blocks not reached), so it has no inputs to be compiled on")
