"""Sequential calibration: one block's weights and activations in memory at a time. Block i is captured, analysed
and compiled on the outputs of the already-quantized blocks before it (as GPTQ/AWQ/QoQ do)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..ir.analysis import analyse
from ..ir.capture import capture, signature, typed_nodes
from ..ir.graph import Block
from .context import BlockContext
from .pass_manager import PassTiming, Step, check_pipeline, run_block
from ..passes.base import get_pass


class _Stop(Exception):
    pass


@dataclass
class CompileResult:
    timing: PassTiming
    blocks: int
    seconds: float
    peak_rss_mb: float
    messages: list[str] = field(default_factory=list)


def block_inputs(lm, ids: torch.Tensor, device) -> tuple[tuple, dict]:
    """Run the model up to its first block and catch that block's (args, kwargs)."""
    caught = {}

    def hook(mod, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Stop

    h = lm.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(input_ids=ids.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    if "args" not in caught:
        raise RuntimeError("the model's forward never reached its first block")
    kwargs = {k: v for k, v in caught["kwargs"].items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    args = caught["args"]
    if not args:  # hidden states passed by keyword
        args = (kwargs.pop("hidden_states"),)
    return args, kwargs


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def compile_blocks(lm, steps: list[Step], ids: torch.Tensor, assign_specs, on_block=None, dumper=None,
                   device: str = "cpu", seed: int = 0, debug: bool = False, progress: bool = True,
                   verbose: bool = False, max_tokens: int | None = None, release: bool = True) -> CompileResult:
    """Compile every block in order. `assign_specs(block)` sets each Linear's spec (or skip reason) for the target;
    `on_block(block, ctx)` receives the finished block (the emitter packs it) before its weights are released
    (release=False keeps them, for in-memory evaluation of formats that no layout packs)."""
    t0 = time.perf_counter()
    check_pipeline(steps)
    dev = torch.device(device)
    torch.manual_seed(seed)
    timing = PassTiming()
    lm.materialize("")
    ctx0 = BlockContext(None, (), {}, dev, seed)
    for s in steps:  # passes that act outside the blocks (rotation of the embeddings, ...)
        get_pass(s.name)().model_prologue(lm, s.config, ctx0)
    args, kwargs = block_inputs(lm, ids, dev)
    n = len(lm.blocks)
    messages, captures = [], {}
    bar = tqdm(range(n), desc="compiling blocks", unit="block", disable=not progress, file=sys.stderr)
    for i in bar:
        prefix = lm.block_prefix(i)
        module = lm.materialize(prefix)
        block = Block(i, prefix, module)
        # blocks with the same code and shapes share one capture (the graph does not depend on weight values)
        sig = signature(module)
        if sig not in captures:
            captures[sig] = capture(module, args, kwargs)
        gm, params = captures[sig]
        block.gm = gm
        block.nodes = typed_nodes(gm, params)
        analyse(block, gm, params)
        assign_specs(block)
        ctx = BlockContext(block, args, kwargs, dev, seed + i, max_tokens=max_tokens, verbose=verbose)
        run_block(block, steps, ctx, timing, dumper, debug)
        messages += ctx.messages
        out = ctx.forward(simulate=True)   # as the engine computes it (run-time activation/KV quantization)
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
    for s in steps:
        get_pass(s.name)().model_epilogue(lm, s.config, ctx0)
    return CompileResult(timing, n, time.perf_counter() - t0, peak_rss_mb(), messages)
