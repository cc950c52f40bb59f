"""Runs a pipeline's passes on one block: checks requires/ensures, verifies the block between passes, times each
pass, writes dumps, and re-raises any failure naming the pass, the block, the passes before it and the dump path."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..passes._model_parts import call_block, check_preserved
from ..passes.base import PassConfig, PassResult, get_pass


class PassError(RuntimeError):
    """A pass failed; the message says which pass, on which block, after which passes, and where the dump is."""


@dataclass
class Step:
    """One pipeline entry: a registered pass name and its config."""
    name: str
    config: PassConfig

    def to_dict(self) -> dict:
        return {"pass": self.name, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        p = get_pass(d["pass"])
        return cls(d["pass"], p.Config.from_dict(d.get("config")))


@dataclass
class PassTiming:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, s: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + s


def check_pipeline(steps: list[Step]) -> None:
    """Every pass's `requires` must be ensured by a pass earlier in the list, and none of its `forbids` may be:
    e.g. rotate needs fused norms, reorder comes before clip, nothing changes weights after quantization."""
    from ..passes.base import REGISTRY
    facts: dict[str, str] = {}   # fact -> the step that established it
    for i, s in enumerate(steps):
        p = get_pass(s.name)
        missing = [r for r in p.requires if r not in facts]
        if missing:
            providers = sorted(n for n, c in REGISTRY.items() if set(missing) & set(c.ensures))
            raise PassError(f"pipeline step {i} ({s.name}) requires {missing}, which no earlier pass ensures"
                            + (f" (list {' or '.join(providers)} before it)" if providers else ""))
        late = [f for f in p.forbids if f in facts]
        if late:
            raise PassError(f"pipeline step {i} ({s.name}) must come before {facts[late[0]]}, which established "
                            f"'{late[0]}' (a pass that changes weights after it would make its result stale)")
        for f in p.ensures:
            facts.setdefault(f, f"step {i} ({s.name})")


def verify_block(block, where: str) -> None:
    """Debug verifier run between passes: weights finite, quantized tensors match their specs."""
    for name, lin in block.linears.items():
        w = block.linear_module(name).weight
        if not torch.isfinite(w).all():
            raise PassError(f"{where}: {name}.weight has NaN/inf after the pass")
        if lin.qtensor is not None and tuple(lin.qtensor.shape) != tuple(w.shape):
            raise PassError(f"{where}: {name} quantized shape {tuple(lin.qtensor.shape)} != weight {tuple(w.shape)}")


def run_block(block, steps: list[Step], ctx, timing: PassTiming, dumper=None, debug: bool = False) -> list[PassResult]:
    """Run every step on `block`, in order."""
    results = []
    if dumper is not None:
        dumper.dump(block, 0, "capture", None)
    passes = [get_pass(step.name)() for step in steps]
    for p, step in zip(passes, steps):
        p.prepare(block, step.config, ctx)
    for i, (p, step) in enumerate(zip(passes, steps)):
        if "quantized" in p.ensures and ctx.reference is None:
            # the float function as the quantizers receive it (after rotation/smoothing, which preserve it)
            ctx.reference = ctx.current_output()
        t0 = time.perf_counter()
        try:
            # function preservation is the manager's instrument: the reference is taken before the pass, the
            # block's output on the same probe samples compared after it (config.verify, or always under --debug)
            check = p.preserves_function and (debug or getattr(step.config, "verify", False))
            ref = p.preservation_reference(block, step.config, ctx) if check else None
            res = p.run(block, step.config, ctx)
            if ref is not None and res.changed:
                res.details["output_rel_err"] = check_preserved(ref, call_block(block, ctx),
                                                                f"{step.name} on block {block.prefix}")
            if res.changed and not res.keep_activations:
                ctx.invalidate()
            if debug:
                verify_block(block, f"pass {step.name} on block {block.prefix}")
        except PassError:
            raise
        except Exception as e:
            before = [s.name for s in steps[:i]] or ["(none)"]
            where = dumper.path_for(block, i) if dumper is not None else "(no --dump-dir)"
            raise PassError(f"pass {step.name} failed on block {block.prefix} after {', '.join(before)}: "
                            f"{type(e).__name__}: {e} (last dump: {where})") from e
        dt = time.perf_counter() - t0
        timing.add(step.name, dt)
        res.details.setdefault("seconds", round(dt, 4))
        results.append(res)
        if dumper is not None:
            dumper.dump(block, i + 1, step.name, res)
    return results


def run_model_steps(phase: str, steps: list[Step], lm, ctx, timing: PassTiming, dumper=None) -> list[str]:
    """Run every step's model prologue (phase "prologue", before the first block) or epilogue ("epilogue", after the
    last): timed with the pass, dumped under dump_dir/model/, and any failure re-raised naming the pass and phase.
    Returns the names of the passes that changed the model."""
    changed = []
    for i, step in enumerate(steps):
        p = get_pass(step.name)()
        fn = p.model_prologue if phase == "prologue" else p.model_epilogue
        t0 = time.perf_counter()
        try:
            res = fn(lm, step.config, ctx)
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"pass {step.name} failed in its model {phase} (outside the blocks): "
                            f"{type(e).__name__}: {e}") from e
        timing.add(step.name, time.perf_counter() - t0)
        if res is not None and dumper is not None:
            dumper.dump_model(phase, i + 1, step.name, res)
        if res is not None and res.changed:
            changed.append(step.name)
    return changed
