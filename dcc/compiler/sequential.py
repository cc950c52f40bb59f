"""Sequential calibration: one block's weights and activations in memory at a time. Block i is captured, analysed
and compiled on the outputs of the already-quantized blocks before it (as GPTQ/AWQ/QoQ do)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..ir.analysis import analyse
from ..ir.capture import Captures, typed_nodes
from ..ir.program import copy_graph
from ..ir.graph import Block
from .context import BlockContext
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


def compile_blocks(lm, steps: list[Step], inputs: BlockInputs | Callable[[], BlockInputs], assign_specs,
                   on_block=None, dumper=None, device: str = "cpu", seed: int = 0, debug: bool = False,
                   progress: bool = True, verbose: bool = False, max_tokens: int | None = None,
                   release: bool = True) -> CompileResult:
    """Compile every block in order. `inputs`: block 0's (args, kwargs) on the calibration batch, as the model's
    adapter computes them (dcc.models.adapter: block0_inputs), or a function returning them, called after the passes'
    model prologues -- which may change what reaches block 0 (rotated embeddings), so a pair computed before is
    refused then. `assign_specs(block)` sets each Linear's spec (or skip reason) for the target; `on_block(block,
    ctx)` receives the finished block (the emitter packs it) before its weights are released (release=False keeps
    them, for in-memory evaluation of formats that no layout packs)."""
    t0 = time.perf_counter()
    check_pipeline(steps)
    dev = torch.device(device)
    torch.manual_seed(seed)
    timing = PassTiming()
    lm.materialize("")
    ctx0 = BlockContext(None, (), {}, dev, seed)
    # passes that act outside the blocks (rotation of the embeddings, ...), through the manager: timed, dumped
    changed = run_model_steps("prologue", steps, lm, ctx0, timing, dumper)
    if callable(inputs):
        args, kwargs = inputs()
    elif changed:
        raise ValueError(f"compile_blocks: {', '.join(changed)} changed the model before its first block, so block "
                         f"0's inputs must be computed afterwards: pass them as a function")
    else:
        args, kwargs = inputs
    n = len(lm.blocks)
    messages, captures = [], Captures()
    bar = tqdm(range(n), desc="compiling blocks", unit="block", disable=not progress, file=sys.stderr)
    for i in bar:
        prefix = lm.block_prefix(i)
        module = lm.materialize(prefix)
        block = Block(i, prefix, module)
        # blocks with the same code and shapes share one capture (the graph does not depend on weight values); each
        # block runs its own copy, which graph passes rewrite
        gm, params = captures.get(module, args, kwargs)
        block.gm = copy_graph(gm)
        block.nodes = typed_nodes(block.gm, params)
        analyse(block, block.gm, params)
        assign_specs(block)
        ctx = BlockContext(block, args, kwargs, dev, seed + i, max_tokens=max_tokens, verbose=verbose,
                           captures=captures)
        run_block(block, steps, ctx, timing, dumper, debug)
        messages += ctx.messages
        out = ctx.forward(simulate=True)   # as the engine computes it (the graph's run-time numerics on)
        if ctx.reference is not None:
            # how far the quantized block's output is from the float block's, on the same (quantized) inputs
            ref = ctx.reference.float()
            ctx.block_error = round(float((out.float() - ref).norm() / ref.norm().clamp(min=1e-30)), 6)
        args = (out,) + tuple(args[1:])  # quantized outputs feed the next block
        if on_block is not None:
            on_block(block, ctx)
        block.gm = None
        if release:
            lm.release(prefix)
        bar.set_postfix(rss=f"{peak_rss_mb():.0f}MB")
    run_model_steps("epilogue", steps, lm, ctx0, timing, dumper)
    return CompileResult(timing, n, time.perf_counter() - t0, peak_rss_mb(), messages)
