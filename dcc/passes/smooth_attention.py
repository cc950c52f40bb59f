"""SmoothAttention (QServe/QoQ, Lin et al., 2024): per KV head and channel, lambda = max|K|^alpha / max|Q|^beta on the
post-RoPE queries and keys; q_proj rows are multiplied and k_proj rows divided by lambda, so Q K^T is unchanged while
K's outlier channels (what the 4-bit KV cache quantizes per token and head) flatten. Function-preserving in float.
alpha is given, or searched per attention on the block's output error with the weights fake-quantized and the
run-time int8 activations and KV cache simulated (the smoothing pass's scorer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.rewrite import kv_nodes
from ._model_parts import norm_offset
from ._scoring import BlockScorer, score_candidates
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class SmoothAttentionConfig(PassConfig):
    """alpha: exponent of K's channel absmax, in [0, 1] (0.5: K's channel ranges become their square roots);
    beta: exponent of Q's, in [0, 1] (QoQ uses 0: the queries are not quantized); search: instead of alpha, try
    alpha = 0 (no smoothing), 1/grid, ..., 1 per attention and keep the one with the smallest block output error on
    `samples` calibration sequences under the target's weight, activation and KV-cache quantization; verify: check
    that the float block's output is unchanged. Example: SmoothAttentionConfig(alpha=0.5, beta=0.0) or
    SmoothAttentionConfig(search=True)."""
    alpha: float = 0.5
    beta: float = 0.0
    search: bool = False
    grid: int = 10
    samples: int = 2
    verify: bool = True

    def __post_init__(self):
        for f in ("alpha", "beta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"smooth_attention: {f} must be in [0, 1], got {v!r}")
        if not isinstance(self.verify, bool) or not isinstance(self.search, bool):
            raise ValueError(f"smooth_attention: verify and search must be bools, got {self.verify!r}, "
                             f"{self.search!r}")
        if not isinstance(self.grid, int) or self.grid < 1 or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"smooth_attention: grid and samples must be ints >= 1, got {self.grid!r}, "
                             f"{self.samples!r}")


def attention_scale(q_max: torch.Tensor, k_max: torch.Tensor, alpha: float, beta: float, rope: bool) -> torch.Tensor:
    """lambda [..., head_dim] from the channel absmaxes of Q and K (same shape). With rotate_half RoPE, channel i is
    rotated with channel i + d/2, and RoPE commutes only with a scaling equal on both: the pair's statistics are
    maxed before the power. A channel whose statistic is 0 (with a non-zero exponent) keeps lambda = 1 rather than
    0 or inf; statistics and lambda are clamped (1e-5, and lambda <= 1e5) so that no folded row becomes 0 or inf."""
    q, k = q_max.double(), k_max.double()
    if rope:
        h = q.shape[-1] // 2
        q, k = (torch.maximum(t[..., :h], t[..., h:]).tile(2) for t in (q, k))   # [max(i, i+h)] * 2
    lam = (k.clamp(min=1e-5).pow(alpha) / q.clamp(min=1e-5).pow(beta)).clamp(1e-5, 1e5)
    dead = ((k == 0) & (alpha > 0)) | ((q == 0) & (beta > 0))
    return torch.where(dead, torch.ones_like(lam), lam)


def _norm_gain(block, node_name: str) -> tuple[str, str] | None:
    """A per-head norm between a q/k linear and attention (Qwen3's q_norm): (its module path, its gain's parameter
    path), found by walking the graph back from the attention's input to the linear. None: no norm on the way."""
    nodes = {n.name: n for n in block.nodes}
    todo, seen, norm, gains = [node_name], set(), None, {}
    while todo:
        n = nodes.get(todo.pop())
        if n is None or n.name in seen or n.kind in ("linear", "input"):
            continue
        seen.add(n.name)
        norm = norm or (n.module if n.kind == "norm" else None)
        for p in (nodes.get(i) for i in n.inputs):
            if n.kind == "mul" and p is not None and p.kind == "param" and p.shape and len(p.shape) == 1:
                gains[n.module] = p.target   # a 1-D parameter multiplied in: the gain, if it is the norm's
        todo.extend(n.inputs)
    if norm is None:
        return None
    if norm not in gains:
        raise ValueError(f"a norm without a gain ({norm}) sits between a q/k linear and attention: nothing can "
                         f"absorb lambda")
    return norm, gains[norm]


@torch.no_grad()
def _scale_rows(lin, s: torch.Tensor) -> None:
    """Output rows (and bias) of a linear times s, in float64."""
    lin.weight.data = (lin.weight.data.double() * s.view(-1, 1).to(lin.weight.device)).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.double() * s.to(lin.bias.device)).to(lin.bias.dtype)


@torch.no_grad()
def _scale_gain(block, gain: tuple[str, str], s: torch.Tensor) -> None:
    """A norm gain used as (offset + w): the effective gain is what gets scaled."""
    w = block.param(gain[1])
    off = norm_offset(block.module.get_submodule(gain[0]), w.shape[0])
    w.data = ((w.data.double() + off) * s.to(w.device) - off).to(w.dtype)


TRACK = "smooth_attention: post-RoPE q/k channel maxima"


def collect_qk(block, ctx, attentions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per attention (keyed by its q linear): channel absmax of post-RoPE Q [heads, d] and K [kv_heads, d, as the
    cache holds it: before the GQA repeat] over the calibration data, read off the graph in one float run."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ctx.record(qk_watch(block, attentions, stats))
    return reduce_qk(ctx, stats)


def reduce_qk(ctx, stats: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The channel maxima over the whole batch, wherever its sequences are held (compiler/dist.py; max is exact)."""
    return {key: (ctx.world.max(q), None if k is None else ctx.world.max(k)) for key, (q, k) in stats.items()}


def qk_watch(block, attentions, stats: dict) -> dict:
    """Callbacks on the graph's post-RoPE q and k nodes that put their channel maxima into stats."""
    watch = {}
    for a in attentions:
        try:
            k_node = kv_nodes(block.gm, a.path)[0].name
        except ValueError:
            continue   # reported by the caller: no statistics for this attention

        def q_seen(x, key=a.q):
            stats[key] = (x.detach().abs().amax((0, 2)).double(), None)

        def k_seen(x, key=a.q):
            stats[key] = (stats[key][0], x.detach().abs().amax((0, 2)).double())

        # the graph computes the query before the key (both feed the same attention node)
        watch[a.q_node], watch[k_node] = q_seen, k_seen
    return watch


@register
class SmoothAttention(Pass):
    """Without RoPE any per-channel lambda preserves Q K^T (no pairing); where a per-head norm sits between q/k_proj
    and attention (Qwen3's q_norm/k_norm), lambda is one vector for every head and goes into the norms' gains."""
    Config = SmoothAttentionConfig
    uses_activations = True
    preserves_function = True   # checked by the pass manager (verify, or --debug)
    ensures = ("attention_smoothed",)
    forbids = ("clipped", "quantized")   # it changes weights: ranges and codes taken before it would be stale

    def prepare(self, block, config, ctx) -> None:
        # the passes before this one (smoothing, rotation) preserve q and k: their statistics can be read off the
        # run that collects the linears' inputs for those passes, sparing this pass a run of the block
        self._seen: dict = {}
        if block.attentions:
            ctx.track(TRACK, lambda: qk_watch(block, block.attentions, self._seen))

    @torch.no_grad()
    def run(self, block, config, ctx) -> PassResult:
        if not block.attentions:
            return PassResult(False, "no attention to smooth")
        seen = getattr(self, "_seen", {})
        stats = reduce_qk(ctx, seen) if ctx.tracked(TRACK) and seen else collect_qk(block, ctx, block.attentions)
        ctx.untrack(TRACK)
        details, skipped, scorer = {}, [], None
        for a in block.attentions:
            if a.q not in stats:
                skipped.append(f"{a.path}: no single attention node runs inside it in the block's graph, so there "
                               f"are no post-RoPE statistics")
                continue
            q_max, k_max = stats[a.q]
            kv, rep, d = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
            if tuple(q_max.shape) != (a.num_heads, d) or tuple(k_max.shape) != (kv, d):
                raise ValueError(f"{a.q}: attention saw Q {tuple(q_max.shape)} / K {tuple(k_max.shape)} per head, "
                                 f"the graph says {a.num_heads} / {kv} heads of {d}")
            try:
                gains = {a.q: _norm_gain(block, a.q_node), a.k: _norm_gain(block, a.k_node)}
            except ValueError as e:
                skipped.append(f"{a.path}: {e}")
                continue
            q_kv = q_max.view(kv, rep, d).amax(1)      # Q's statistic per KV head: over the query heads reading it
            shared = any(gains.values())   # a norm gain is one [d] vector shared by every head: so must lambda be

            def lam_for(alpha: float, a=a, q_kv=q_kv, k_max=k_max, shared=shared, kv=kv, d=d) -> torch.Tensor:
                if shared:
                    return attention_scale(q_kv.amax(0), k_max.amax(0), alpha, config.beta, a.rope).expand(kv, d)
                return attention_scale(q_kv, k_max, alpha, config.beta, a.rope)

            alpha, err = config.alpha, None
            if config.search:
                scorer = scorer or BlockScorer(block, ctx, config.samples)
                alpha, err = self._search(block, a, gains, lam_for, config.grid, scorer, ctx.world)
            lam = lam_for(alpha)
            _apply(block, a, gains, lam)
            if scorer is not None:
                scorer.forget([a.q, a.k])
            details[a.path] = {
                "fold": "norm gains" if shared else "q/k rows", "rope": a.rope, "alpha": alpha, "error": err,
                "lambda_min": float(lam.min()), "lambda_max": float(lam.max()),
                "k_absmax": float(k_max.max()), "k_absmax_after": float((k_max / lam).max())}
        for s in skipped:
            ctx.log(f"smooth_attention: skipped {s}")
        if not details:
            return PassResult(False, "no attention smoothed", {"skipped": skipped})
        out = {"attentions": details, "skipped": skipped}
        how = (f"alpha searched: {[d['alpha'] for d in details.values()]}" if config.search
               else f"alpha {config.alpha}")
        msg = f"{len(details)} attention(s) smoothed ({how}, beta {config.beta})"
        # q and k change, q k^T does not: every linear's input is the same (in real arithmetic), so the cached inputs
        # stay (a later pass reading them needs no new run of the block)
        return PassResult(True, msg + (f", {len(skipped)} skipped" if skipped else ""), out, facts=self.ensures,
                          keep_activations=True)

    @staticmethod
    def _search(block, a, gains, lam_for, grid: int, scorer, world=None) -> tuple[float, float]:
        """(best alpha, its error) over alpha = 0 (lambda = 1 when beta = 0), 1/grid, ..., 1: each candidate is folded,
        scored and undone. Row scaling leaves per-row (and per-group) weight quantization unchanged up to the fp16
        scales, so what the score sees is mostly the 4-bit cache's error on the rescaled keys."""
        errs = score_candidates(scorer, _qk_params(block, a, gains), [a.q, a.k], grid + 1,
                                lambda i: _apply(block, a, gains, lam_for(i / grid)), world)
        best = None
        for i, err in enumerate(errs):   # in order: ties keep the earlier
            best = min(best or (err, i / grid), (err, i / grid), key=lambda t: t[0])
        scorer.forget([a.q, a.k])
        return best[1], round(best[0], 9)


def _qk_params(block, a, gains) -> list[torch.Tensor]:
    """The tensors _apply changes (saved and restored around each search candidate)."""
    out = []
    for name in (a.q, a.k):
        if gains[name] is not None:
            out.append(block.param(gains[name][1]))
        else:
            lin = block.linear_module(name)
            out += [p for p in (lin.weight, lin.bias) if p is not None]
    return out


def _apply(block, a, gains, lam: torch.Tensor) -> None:
    """Fold lambda [kv_heads, d]: q rows (every query head of a KV head) times lambda, k rows divided by it."""
    kv, d = lam.shape
    rep = a.num_heads // a.num_kv_heads
    for name, s in ((a.q, lam.unsqueeze(1).expand(kv, rep, d)), (a.k, 1.0 / lam)):
        if gains[name] is not None:
            _scale_gain(block, gains[name], s.reshape(-1, d)[0])
        else:
            _scale_rows(block.linear_module(name), s.reshape(-1))
