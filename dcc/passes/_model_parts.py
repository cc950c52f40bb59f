"""The parts of a model outside its blocks that passes touch (embeddings, final norm, head), found structurally by a
tiny forward whose blocks pass their input through, and the numeric checks the function-preserving passes share."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..ir import gpu_matmul


class _PassThrough(nn.Module):
    """Stands in for a block (possibly on the meta device): returns its hidden states and records that it ran."""

    def __init__(self, block: nn.Module, index: int, log: list, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_orig", block)   # not a submodule: its parameters stay out of this module
        self._dcc_index, self._dcc_log, self._dcc_as_tuple = index, log, as_tuple

    def __getattr__(self, name):
        # models read attributes of their layers (e.g. attention_type for the mask): answer from the real block
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self._dcc_log.append(("block", self._dcc_index, h.detach()))
        return (h,) if self._dcc_as_tuple else h


@dataclass
class Trace:
    """What runs outside the blocks, in order: (module path) per leaf module, ("block", i, input) per block."""
    events: list
    head: str | None

    def block_input(self) -> torch.Tensor:
        return next(e[2] for e in self.events if isinstance(e, tuple))

    def after_blocks(self) -> list[str]:
        """Leaf modules that ran after the last block and before the head."""
        last = max(i for i, e in enumerate(self.events) if isinstance(e, tuple))
        out = []
        for e in self.events[last + 1:]:
            if e == self.head:
                break
            out.append(e)
        return out


def _forward_kwargs(lm, ids: torch.Tensor) -> dict:
    """How the whole model is called on token ids: the model adapter's rule where the handle has one (a causal LM
    takes use_cache=False, an encoder an attention mask), else a causal LM's."""
    adapter = getattr(lm, "adapter", None)
    return adapter.forward_kwargs(ids) if adapter is not None else {"input_ids": ids, "use_cache": False}


@torch.no_grad()
def trace_outside_blocks(lm, ids: torch.Tensor | None = None) -> Trace:
    """Run lm.model on a few tokens with every block replaced by a pass-through; works while blocks are on meta."""
    model = lm.model
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if ids is None:
        ids = (torch.arange(8) % emb.weight.shape[0]).view(1, -1)
    ids = ids.to(emb.weight.device)
    names = {m: n for n, m in model.named_modules()}
    inside = lm.blocks_prefix + "."
    saved = list(lm.blocks)
    errors = []
    for as_tuple in (False, True):   # transformers 5 layers return a tensor; older ones a tuple
        events, hooks = [], []
        for name, mod in model.named_modules():
            if name.startswith(inside) or name == lm.blocks_prefix or next(mod.children(), None) is not None:
                continue
            hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: events.append(name)))
        try:
            for i, b in enumerate(saved):
                lm.blocks[i] = _PassThrough(b, i, events, as_tuple)
            model(**_forward_kwargs(lm, ids))
        except Exception as e:  # noqa: BLE001 - retried with the other return convention, then reported
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        finally:
            for h in hooks:
                h.remove()
            for i, b in enumerate(saved):
                lm.blocks[i] = b
        if not any(isinstance(e, tuple) for e in events):
            raise RuntimeError("the model's forward never reached its blocks")
        return Trace(events, names.get(head) if head is not None else None)
    raise RuntimeError(f"cannot run the model around its blocks: {'; '.join(errors)}")


def find_final_norm(lm, trace: Trace | None = None) -> tuple[str, nn.Module] | None:
    """The norm between the last block and the head: the one module with parameters that runs there, holding a 1-D
    weight (or bias) of the hidden size. None if no module with parameters runs there."""
    trace = trace or trace_outside_blocks(lm)
    emb = lm.model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    mods = dict(lm.model.named_modules())
    with_params = [n for n in dict.fromkeys(trace.after_blocks()) if mods[n] is not emb
                   and next(mods[n].parameters(recurse=False), None) is not None]
    if not with_params:
        return None
    name = with_params[0]
    params = dict(mods[name].named_parameters(recurse=False))
    norm_like = params and all(p.dim() == 1 and p.shape[0] == hidden for p in params.values())
    if len(with_params) > 1 or not norm_like:
        raise ValueError(f"between the last block and the head run {with_params}; dcc expects a single norm "
                         f"there (a 1-D gain of size {hidden}), so the head cannot be reached through it")
    return name, mods[name]


def _norm_copy(norm: nn.Module) -> nn.Module:
    return copy.deepcopy(norm).double().eval()


def _probe_input(hidden: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(16, hidden, generator=g, dtype=torch.float64) * 2 + 0.3).to(device)


@torch.no_grad()
def norm_offset(norm: nn.Module, hidden: int) -> float:
    """The constant c in y = (c + weight) * f(x) + bias, measured on a float64 copy (Gemma: 1, most norms: 0)."""
    m = _norm_copy(norm)
    if getattr(m, "bias", None) is not None:
        m.bias.zero_()
    x = _probe_input(hidden, m.weight.device)
    m.weight.fill_(0.0)
    y0 = m(x)
    m.weight.fill_(1.0)
    f = m(x) - y0                       # f(x): the normalised input
    c = float((y0 * f).sum() / (f * f).sum())   # least squares for y0 = c f
    w = torch.rand(hidden, dtype=torch.float64, device=x.device) + 0.5
    m.weight.copy_(w)
    # norms may compute in float32 whatever the input dtype (Gemma: x.float()), hence float32-level tolerances
    if not torch.allclose(m(x), (c + w) * f, rtol=1e-5, atol=1e-5):
        raise ValueError(f"norm {type(norm).__name__}: its output is not (c + weight) * f(x) + bias, so its gain "
                         f"cannot be folded into the next linear")
    return round(c, 5)   # a structural constant (0 or 1 in practice), measured to float32 precision


@torch.no_grad()
def commutes_with(norm: nn.Module, R: torch.Tensor, unit_gain: bool = False) -> bool:
    """Whether norm(x R) == norm(x) R (float64 copy); unit_gain first sets the gain to the value meaning 1."""
    m = _norm_copy(norm)
    if unit_gain:
        if getattr(m, "weight", None) is not None:
            m.weight.fill_(1.0 - norm_offset(norm, R.shape[0]))
        if getattr(m, "bias", None) is not None:
            m.bias.zero_()
    R = R.to(dtype=torch.float64, device=next(m.parameters(), R).device)
    x = _probe_input(R.shape[0], R.device)
    return torch.allclose(m(x @ R), m(x) @ R, rtol=1e-4, atol=1e-4)   # float32 inside some norms


def untie_head(lm) -> nn.Module | None:
    """Give the head its own Parameter (before one of head/embeddings changes) and record that they are untied."""
    emb, head = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    if head is None:
        return None
    w = head.weight
    if w is emb.weight or (w.device == emb.weight.device and w.data_ptr() == emb.weight.data_ptr()):
        head.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (lm.config, getattr(lm.model, "config", None)) if c is not None}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return head


VERIFY_SAMPLES = 2   # sequences a function-preservation check runs on: a structural mistake shows on any input


def call_block(block, ctx, hidden: torch.Tensor | None = None, samples: int | None = VERIFY_SAMPLES) -> torch.Tensor:
    """The block's float output (its graph, run-time numerics off) on the first `samples` calibration sequences
    (None: all), optionally with other hidden states (for the full batch) in place of args[0]; float32 products
    whatever --gpu-matmul says (the preservation checks compare two of these runs to 1e-3)."""
    with gpu_matmul.exact():
        return ctx.forward(samples=samples, hidden=hidden)


def check_preserved(ref: torch.Tensor, out: torch.Tensor, where: str, what: str = "the block's output") -> float:
    """Relative L2 distance of out from ref; raises if it is above rounding noise for the dtype (16-bit weights
    rounded after a transform move a block's output by about 1e-2, a structural mistake by far more)."""
    err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))
    tol = 1e-3 if ref.dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= tol:
        raise ValueError(f"{where}: {what} changed by {err:.2e} (relative L2, tolerance {tol:g}), so this "
                         f"transform does not preserve the function of this architecture")
    return err
