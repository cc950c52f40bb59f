"""SVDQuant (Li et al., 2024; research/deepcompressor.md): W = L1·L2 + R per linear, with the low-rank branch L1·L2 kept
in 16 bits and the residual R quantized, after a smoothing x / lambda that moves activation outliers into the weight
(where the branch absorbs the largest directions). For the linears reading one tensor (q/k/v, gate/up: one smoothing
factor, as Nunchaku's fused qkv_proj), per candidate alpha, lambda = max|x|^alpha / max|W|^(1 - alpha); the branch is a
truncated SVD of the smoothed weight W·diag(lambda), refined by alternation (the SVD of W - Q(R) re-fits the branch on
the quantization residual), and alpha is chosen on the group's output error with the weights and the activations
fake-quantized as the target's spec says (the branch sees the raw x, R the smoothed one).

The result is a graph rewrite: the linear reads x / smooth, and a branch linear(linear(x, lora_down), lora_up) is
added to its output, so dumps show it and every later pass and the block's output compute it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..ir.formats import fake_quantize_fast
from ..ir.ops import fake_quantize_act
from ..ir.rewrite import insert_lowrank, linear_nodes
from .base import Pass, PassConfig, PassResult, quantizable, register


EXPONENTS = ("paired", "activation", "both")
SVD_METHODS = ("lowrank", "randomized", "full")
REFITS = ("weight", "output")


@dataclass(frozen=True)
class SvdLowrankConfig(PassConfig):
    """rank: of the 16-bit branch (a multiple of 16, Nunchaku pads it so; 0 disables the branch, leaving smoothing).
    grid: alpha in {0, 1/grid, ..., 1} searched per group (0: no smoothing, lambda = 1). iterations: alternations
    after the first SVD (stopped at the first that does not lower the error). svd: "lowrank" (the top-r singular
    vectors only: exactly from the Gram matrix, or randomized for K > 4096), "randomized" (faster, approximate:
    top_components) or "full" (torch.linalg.svd in float64, the checked option). max_tokens: calibration rows
    the error is measured on (evenly spaced). exponents: the smoothing candidates, lambda = max|x|^alpha /
    max|W|^(1 - alpha) ("paired", SmoothQuant's), lambda = max|x|^alpha ("activation", AWQ's) or both (as
    DeepCompressor's SVDQuant grid, beta = -2). search_iterations: alternations run on every candidate while
    searching (0: candidates scored on the first SVD). refit: what an alternation re-fits the branch to -- "weight"
    (the SVD of W - Q(R)) or "output" (the rank-r linear map of the raw input that best reproduces, on the
    calibration rows, the output error the quantized main branch leaves, activation quantization included: a
    reduced-rank ridge regression with damping `damp` times the mean input energy). search_svd: how the candidates
    are scored -- with the `svd` method ("same") or with the randomized subspace ("randomized": 5-20x faster on
    wide layers; the chosen candidate is then fitted with `svd`). Example:
    SvdLowrankConfig(rank=32, grid=10)."""
    rank: int = 32
    grid: int = 10
    iterations: int = 4
    svd: str = "lowrank"
    max_tokens: int = 1024
    exponents: str = "paired"
    search_iterations: int = 0
    refit: str = "weight"
    damp: float = 0.01
    search_svd: str = "same"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0 or self.rank % 16:
            raise ValueError(f"svd_lowrank: rank must be a multiple of 16 (0: no branch), got {self.rank!r}")
        for name in ("grid", "iterations", "max_tokens", "search_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "max_tokens" and v == 0):
                raise ValueError(f"svd_lowrank: {name} must be a non-negative int, got {v!r}")
        if self.exponents not in EXPONENTS:
            raise ValueError(f"svd_lowrank: exponents must be one of {', '.join(EXPONENTS)}, got {self.exponents!r}")
        if self.search_svd not in ("same", "randomized"):
            raise ValueError(f"svd_lowrank: search_svd must be same or randomized, got {self.search_svd!r}")
        if self.refit not in REFITS:
            raise ValueError(f"svd_lowrank: refit must be one of {', '.join(REFITS)}, got {self.refit!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"svd_lowrank: damp must be a positive number, got {self.damp!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd_lowrank: svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")


def top_components(w: torch.Tensor, rank: int, method: str, seed: int,
                   gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [N, rank] = U·S, down [rank, K] = Vh) of w's best rank-`rank` approximation, in float64.

    "lowrank": the top-r right singular vectors from the eigenvectors of the Gram matrix w^T w [K, K] (exact, K^3
    work; `gram` may be given: one product per group serves every smoothing candidate); "randomized": the same
    subspace by a randomized subspace iteration on the Gram matrix (K^2 r work: 5-20x faster, within 0.2 % of the
    optimal residual norm, but measured 46.23 against 43.31 WikiText-2 perplexity on SmolLM2 W4A4, so not the
    default); both take torch.svd_lowrank on w (randomized, seeded) for K > 4096. "full": torch.linalg.svd, the
    checked option."""
    if rank == 0:
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    if method == "full" or rank * 2 >= min(w.shape):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    if w.shape[1] <= 4096:
        g = w.T @ w if gram is None else gram
        if method == "randomized":
            v = gram_top_eigenvectors(g, rank, seed)
        else:
            _, vecs = torch.linalg.eigh(g)                 # ascending eigenvalues: the top r are the last columns
            v = vecs[:, -rank:].flip(1)
            # a singular vector's sign is arbitrary: fix it (largest entry positive) so the result is reproducible
            v = v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
        return w @ v, v.T
    with torch.random.fork_rng(devices=[]):   # svd_lowrank draws a random test matrix: seeded, reproducible
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=rank + 16, niter=4)
    return u[:, :rank] * s[:rank], v[:, :rank].T


def gram_top_eigenvectors(g: torch.Tensor, rank: int, seed: int, iterations: int = 4,
                          oversample: int = 16) -> torch.Tensor:
    """[K, rank] top eigenvectors of a PSD matrix g [K, K] (the Gram matrix of a weight), largest first.

    A randomized range finder (Halko et al., 2011): `iterations` + 1 products g·Q from a seeded Gaussian Q of rank +
    oversample columns, re-orthonormalised each time, then Rayleigh-Ritz (the eigenvectors of Q^T g Q). Each product
    with g is two power steps on the weight itself, so the captured subspace converges as (s_{r+p+1} / s_r)^(4i+2):
    K^2 (r + p) work per step instead of eigh's K^3 (for K = 1536: 8 ms against 1 s)."""
    k = g.shape[0]
    cols = min(k, rank + oversample)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(k, cols, generator=gen, dtype=torch.float64).to(device=g.device, dtype=g.dtype)
    for _ in range(iterations + 1):
        q, _ = torch.linalg.qr(g @ q)
    _, vecs = torch.linalg.eigh(q.T @ g @ q)      # ascending eigenvalues: the top r are the last columns
    v = q @ vecs[:, -rank:].flip(1)
    # an eigenvector's sign is arbitrary: fix it (largest entry positive) so the result is reproducible
    return v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))


class _Group:
    """Linears reading one tensor: their stacked weight [N, K], the inputs [T, K] and the float outputs."""

    def __init__(self, block, names: list[str], ctx, max_tokens: int):
        self.names = names
        self.lins = [block.linears[n] for n in names]
        self.rows = [l.out_features for l in self.lins]
        self.w = torch.cat([block.linear_module(n).weight.data.double() for n in names])
        x = ctx.inputs(names[0])
        t = ctx.stats.tokens(x)
        # evenly spaced tokens of the whole batch (compiler/stats.py): every sequence and position represented
        x = ctx.stats.rows(x, torch.linspace(0, t - 1, max_tokens).round().long() if t > max_tokens else None)
        self.x = x.double()
        self.ref = self.x @ self.w.T
        self.act = self.lins[0].act
        self.gram = self.w.T @ self.w if self.w.shape[1] <= 4096 else None

    def quantize_weight(self, r: torch.Tensor) -> torch.Tensor:
        parts = r.split(self.rows)
        return torch.cat([fake_quantize_fast(p.float(), l.spec, 1.0 if l.clip is None else l.clip).double()
                          for p, l in zip(parts, self.lins)])

    def main_input(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / lam, what the quantized main branch multiplies instead: Q(x / lam))."""
        xs = self.x / lam
        # lam: a "uint4" input (after GELU) is quantized shifted before the division, the bias taking the shift back
        return xs, fake_quantize_act(xs.float(), self.act, lam.float()).double() if self.act else xs

    def error(self, lam: torch.Tensor, rq: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
        """Relative squared output error of Q(x / lam) Q(R)^T + (x / lam) down^T up^T against x W^T."""
        xs, xq = self.main_input(lam)
        y = xq @ rq.T + (xs @ down.T) @ up.T
        return float(((y - self.ref) ** 2).sum() / (self.ref ** 2).sum().clamp(min=1e-30))

    def output_fit(self, lam: torch.Tensor, rq: torch.Tensor, rank: int, damp: float):
        """(up [N, r], down [r, K]) of the rank-r map B minimising ||(x / lam) B^T - (x W^T - Q(x / lam) Q(R)^T)||
        + ridge: the branch absorbs what the quantized main branch gets wrong on these rows, activation rounding
        included. Reduced-rank regression: the ridge solution B0, then the fitted outputs' top-r right singular
        vectors V (an [N, r] basis) give B = V V^T B0; down's rows are made orthonormal (QR), up carries the size."""
        xs, xq = self.main_input(lam)
        target = self.ref - xq @ rq.T                                   # [T, N]: the main branch's output error
        c = xs.T @ xs
        c.diagonal().add_(damp * c.diagonal().mean().clamp(min=1e-30))
        b0t = torch.linalg.solve(c, xs.T @ target)                      # [K, N]
        fitted = xs @ b0t                                               # [T, N]
        # its top-r right singular vectors, from the eigenvectors of the smaller Gram matrix (ascending: the top r
        # are the last columns); through F F^T, V = F^T U / |F^T U|
        if fitted.shape[0] < fitted.shape[1]:
            _, u = torch.linalg.eigh(fitted @ fitted.T)
            v = fitted.T @ u[:, -rank:].flip(1)
            v = v / v.norm(dim=0, keepdim=True).clamp(min=1e-300)
        else:
            _, vecs = torch.linalg.eigh(fitted.T @ fitted)
            v = vecs[:, -rank:].flip(1)
        v = v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))   # a fixed sign: reproducible
        q, r = torch.linalg.qr(b0t @ v)                                 # B^T = (B0^T V) V^T = Q R V^T
        return v @ r.T, q.T


def smoothing(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float, beta: float | None = None) -> torch.Tensor:
    """lambda = max|x|^alpha / max|W|^beta (beta None: 1 - alpha), centred (geometric mean of its range 1) so that
    neither side's 16-bit values drift in magnitude; alpha 0 gives 1 / max|W| centred, not 1: the grid's 'no
    smoothing' is None."""
    beta = 1 - alpha if beta is None else beta
    lam = x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** beta
    return lam / (lam.max() * lam.min()).sqrt()


def candidates(x_max: torch.Tensor, w_max: torch.Tensor, config) -> list[tuple[str | None, torch.Tensor]]:
    """(label, lambda) of every smoothing tried: none first, then the grid of each exponent pattern."""
    out = [(None, torch.ones_like(x_max))]
    alphas = [a / config.grid for a in range(config.grid + 1)] if config.grid else []
    if config.exponents in ("paired", "both"):
        out += [(a, smoothing(x_max, w_max, a)) for a in alphas]
    if config.exponents in ("activation", "both"):   # alpha 0 is "none" again
        out += [(f"x^{a}", smoothing(x_max, w_max, a, 0.0)) for a in alphas if a > 0]
    return out


def fit(g: _Group, lam: torch.Tensor, config: SvdLowrankConfig, seed: int, iterations: int, method: str | None = None):
    """The branch and residual for one smoothing: SVD of W·diag(lam), then alternations. (error, up, down, R)."""
    ws = g.w * lam
    # the Gram matrix of W·diag(lam) is diag(lam) (W^T W) diag(lam): one product per group, not per candidate
    gram = g.gram * lam.view(-1, 1) * lam.view(1, -1) if g.gram is not None else None
    up, down = top_components(ws, config.rank, method or config.svd, seed, gram)
    r = ws - up @ down
    rq = g.quantize_weight(r)
    best = (g.error(lam, rq, up, down), up, down, r)
    for _ in range(iterations if config.rank else 0):
        if config.refit == "output":
            up, down = g.output_fit(lam, rq, config.rank, config.damp)
        else:
            up, down = top_components(ws - rq, config.rank, config.svd, seed)
        r = ws - up @ down
        rq = g.quantize_weight(r)
        err = g.error(lam, rq, up, down)
        if not err < best[0]:
            break
        best = (err, up, down, r)
    return best


@register
class SvdLowrank(Pass):
    Config = SvdLowrankConfig
    uses_activations = True
    preserves_function = True   # R + branch == W·diag(lambda) exactly in float64, read by x / lambda
    ensures = ("lowrank",)
    forbids = ("clipped", "quantized")   # it replaces the weights: ranges and codes taken before would be stale

    @torch.no_grad()
    def run(self, block, config, ctx) -> PassResult:
        lins = [l for l in quantizable(block) if l.act is not None]
        if not lins:
            return PassResult(False, "no linear with quantized activations: nothing to smooth or to branch")
        # linears reading one tensor share one smoothing factor and one branch (the SVD of their stacked weights, as
        # Nunchaku's fused qkv_proj) -- within the engine's fused layer where the target names one (Linear.group: a
        # FLUX single block's qkv and mlp_fc1 read one tensor but are two stored layers)
        feeds = {name: node.args[0].name for name, node in linear_nodes(block.gm).items()}
        groups: dict[tuple, list[str]] = {}
        for l in lins:
            groups.setdefault((feeds[l.name], l.group), []).append(l.name)
        details = {}
        for i, names in enumerate(groups.values()):
            g = _Group(block, names, ctx, config.max_tokens)
            x_max, w_max = g.x.abs().amax(0), g.w.abs().amax(0)
            # the smoothing searched with the first SVD (or search_iterations alternations); the alternations then
            # refine the chosen one
            method = None if config.search_svd == "same" else config.search_svd
            scored = [(fit(g, lam, config, ctx.seed, config.search_iterations, method)[0], k, a, lam)
                      for k, (a, lam) in enumerate(candidates(x_max, w_max, config))]
            err0, _, alpha, lam = min(scored, key=lambda t: (t[0], t[1]))
            err, up, down, r = fit(g, lam, config, ctx.seed, config.iterations)
            self._apply(block, g, lam, up, down, r)
            # errors: relative squared output error of the group, unsmoothed (first candidate), chosen alpha with the
            # first SVD, and after the alternations
            details[",".join(names)] = {"alpha": alpha, "rank": config.rank, "error_unsmoothed": round(scored[0][0], 8),
                                        "error_first_svd": round(err0, 8), "error": round(err, 8)}
        for names in groups.values():
            for name in names:
                ctx.rewrite(partial(insert_lowrank, path=name))
        return PassResult(True, f"{sum(map(len, groups.values()))} linear(s) in {len(groups)} group(s): rank "
                          f"{config.rank} branch, smoothing alpha {[d['alpha'] for d in details.values()]}",
                          details, facts=self.ensures)

    @staticmethod
    def _apply(block, g: _Group, lam, up, down, r) -> None:
        """Each linear: weight R (in the smoothed basis), buffers smooth = lambda, lora_down = Vh / lambda (so that
        the branch reads the raw x), lora_up = its rows of U·S. The three are rounded to the 16-bit dtype the
        engine stores them in (the spec's scale dtype) and R is taken against the rounded ones, so the artifact
        holds exactly the branch that was evaluated and R + branch stays W·diag(lambda) (to R's rounding)."""
        dt16 = g.lins[0].spec.torch_scale_dtype
        lam = lam.to(dt16).double()
        down_x = (down / lam).to(dt16).double()             # the stored lora_down, read by the raw x
        up = up.to(dt16).double()
        r = g.w * lam - up @ (down_x * lam)                  # (x / lam) R^T + x down_x^T up^T == x W^T
        start = 0
        for name, rows in zip(g.names, g.rows):
            mod = block.linear_module(name)
            dt, dev = mod.weight.dtype, mod.weight.device
            mod.weight.data = r[start:start + rows].to(dt)
            mod.register_buffer("smooth", lam.to(dt).to(dev))
            mod.register_buffer("lora_down", down_x.to(dt).to(dev))
            mod.register_buffer("lora_up", up[start:start + rows].to(dt).to(dev))
            start += rows
