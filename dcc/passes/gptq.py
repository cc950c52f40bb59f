"""GPTQ (Frantar et al., 2023): quantize columns one at a time and spread each column's error over the columns not yet
quantized through the inverse Hessian H = 2/T X^T X. Act-order, static groups and damping as DeepCompressor runs it.
Integer formats, QoQ's progressive one, and fp element formats (one level, or NVFP4's micro-scales)."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from ..compiler.share import owners, share_qtensor
from ..ir.formats import (QuantizedTensor, compute_qparams, fp_encode, progressive_qparams, round_to_fp,
                          two_level_qparams)
from ..ir.progressive import protective_range
from .base import Pass, PassConfig, PassResult, quantizable, register
from ..ir.gpu_matmul import tf32_part
from ._gptq_graph import sweep_graphed
from .rtn import SQNR_TOKENS, quantize_linear, unshifted

GRAPHED = True                # tests compare the graphed sweep with the eager one by turning this off
GRAPH_DEVICES = ("cuda",)     # where the sweep replays captured blocks (the CPU tests add "cpu", uncaptured)


@dataclass(frozen=True)
class GptqConfig(PassConfig):
    """damp: fraction of mean(diag H) added to the diagonal; block_size: columns per lazy batch update;
    act_order: quantize columns by decreasing diag(H); static_groups: group scales fixed from the whole weight before
    the sweep (needed with act_order so that each group keeps one scale, as engines store it)."""
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True

    def __post_init__(self):
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"gptq: damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq: block_size must be >= 1, got {self.block_size}")
        if self.act_order and not self.static_groups:
            raise ValueError("gptq: act_order needs static_groups (a group's scale must not change mid-sweep)")


def _clip_col(clip, g: int):
    """The clip ratio(s) of group g as a [N, 1] tensor or a scalar."""
    return clip[:, g:g + 1] if isinstance(clip, torch.Tensor) and clip.dim() == 2 else clip


def _inverse_hessian_chol(box: list, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; adds more damping if H is not positive definite. box = [H]: the
    function takes H out of it and damps it in place, so that no caller reference keeps it alive -- a 70B
    down_proj's H is 28672^2 float64, 6.6 GB, and H + c I, its factor, the inverse and the inverse's factor used to
    be alive together (about 40 GB at once on an H100). Only the diagonal changes (h_ii + c, the same bits as
    h + c I), so each retry rewrites the diagonal from a saved copy."""
    h = box.pop()
    diag = torch.diagonal(h).clone()
    mean_diag = float(diag.mean())
    for attempt in range(10):
        torch.diagonal(h).copy_(diag + (damp + 0.01 * attempt) * mean_diag)
        try:
            l = torch.linalg.cholesky(h)
        except torch.linalg.LinAlgError:
            continue
        del h
        hinv = torch.cholesky_inverse(l)
        del l
        return torch.linalg.cholesky(hinv, upper=True)
    raise RuntimeError("Hessian is not positive definite even with 10x damping")


class _Columns:
    """Per-column quantization with a group's (scale, zero), inlined for the sweep: the same codes as
    formats.quantize (w / s in float32, + z, round half to even, clamp) and the same values as formats.dequantize."""

    def __init__(self, spec, scale: torch.Tensor, zero: torch.Tensor | None, n: int):
        self.spec, self.n = spec, n
        self.set(scale, zero)

    def set(self, scale, zero) -> None:
        sp = self.spec
        self.s32 = scale.to(torch.float32).expand(self.n, -1)
        self.s64 = scale.to(torch.float64).expand(self.n, -1)
        self.z32 = None if zero is None else zero.to(torch.float32).expand(self.n, -1)
        if zero is not None and sp.zero_mode == "scaled":   # sz = -(z * s) stored in the scale dtype
            self.sz64 = (-(zero.to(torch.float64) * scale.to(torch.float64))).to(sp.torch_scale_dtype) \
                .to(torch.float64).expand(self.n, -1)
        if zero is not None and sp.zero_mode in ("float", "offset"):    # the zero is itself the 16-bit offset
            self.sz64 = zero.to(torch.float64).expand(self.n, -1)

    def __call__(self, wcol: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        sp = self.spec
        if self.z32 is not None and sp.zero_mode in ("float", "offset"):
            x = (wcol.float() - self.z32[:, g]) / self.s32[:, g]
        else:
            x = wcol.float() / self.s32[:, g]
            if self.z32 is not None:
                x = x + self.z32[:, g]
        q = torch.round(x).clamp(sp.qmin, sp.qmax)
        if self.z32 is None:
            deq = q.double() * self.s64[:, g]
        elif sp.zero_mode == "offset":   # q*s + z applied exactly by an epilogue: float64, one rounding to float32
            deq = q.double() * self.s64[:, g] + self.sz64[:, g]
        elif sp.zero_mode in ("scaled", "float"):   # one rounding of q*s + sz to the scale dtype (the kernel's fma)
            deq = (q.double() * self.s64[:, g] + self.sz64[:, g]).to(sp.torch_scale_dtype).double()
        else:
            deq = ((q - self.z32[:, g]) * self.s32[:, g]).double()
        return q, deq.float()


class _ProgressiveColumns:
    """Per-column quantization for QoQ's two-level spec with static groups: x0 = clamp(w / s1, -P, P), then
    q = round((x0 + z) / s2) clamped, and the weight s1 * (q * s2 - z), as formats.quantize_tensor computes them."""

    def __init__(self, spec, s1: torch.Tensor, s2: torch.Tensor, z: torch.Tensor):
        self.qmax, self.p = spec.qmax, float(protective_range(spec.bits))
        self.s1 = s1.to(torch.float32).view(-1)
        self.s2, self.z = s2.to(torch.float32), z.to(torch.float32)

    def __call__(self, wcol: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = (wcol.float() / self.s1).clamp(-self.p, self.p)
        q = torch.round((x0 + self.z[:, g]) / self.s2[:, g]).clamp(0, self.qmax)
        return q, (q * self.s2[:, g] - self.z[:, g]) * self.s1   # exact: an 8-bit integer times a 16-bit scale


class _FpColumns:
    """Per-column quantization for fp element formats with static group scales (one level in scale_dtype, or NVFP4's
    e4m3 micro-scale times the per-tensor scale): the element nearest w / s (RNE, saturating), as formats.quantize
    and quantize_two_level compute it; its value times s is exact in float32."""

    def __init__(self, spec, scale: torch.Tensor):
        self.dtype, self.s = spec.dtype, scale.to(torch.float32)

    def __call__(self, wcol: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s[:, g]
        q = round_to_fp(wcol.float() / s, self.dtype)   # the element's value; codes are taken from it at the end
        return q, q * s


@torch.no_grad()
def hessian(x: torch.Tensor, stats=None) -> torch.Tensor:
    """GPTQ's H = 2 X^T X / T of inputs x [T, K]: the sum of T outer products in float32, then float64 (where it is
    factorised). stats (compiler/stats.py): x is this process's share of the calibration batch, and X^T X is summed
    over the batch's canonical leaves (the same bits however the batch is split)."""
    # in place: the float64 copy is the only K x K matrix left (the same bits as a new product)
    if stats is None:
        return gram(x).double().mul_(2.0 / x.shape[0])
    return stats.tree(x, gram).double().mul_(2.0 / stats.tokens(x))


def gram(v: torch.Tensor) -> torch.Tensor:
    """X^T X of rows v [t, K] in float32. On a GPU by three TF32 tensor-core products (the H of an 8B block's
    linears at 128 x 2048 tokens: 8 s -> 6.7 s of GPTQ's time per block, H100): v = hi + lo exactly, hi its TF32
    part (10 mantissa bits), and X^T X = hi^T hi + hi^T lo + lo^T hi, dropping lo^T lo and TF32's rounding of lo --
    about 2^-20 of each product (relative error ~1e-6, against ~1e-4 for one plain TF32 product and ~1e-7 for
    float32), accumulated in float32. The CPU computes it in float32."""
    v = v.float()
    if not v.is_cuda:
        return v.T @ v
    hi = tf32_part(v)
    lo = v - hi   # exact: the bits hi dropped
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        cross = hi.T @ lo
        return hi.T @ hi + (cross + cross.T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, x: torch.Tensor | None, spec, config: GptqConfig, clip=1.0,
                  h: torch.Tensor | None = None) -> QuantizedTensor:
    """GPTQ on weight w [N, K] with inputs x [T, K] (or their hessian(x), h, which is not changed); returns the
    QuantizedTensor (codes in the original column order)."""
    if spec.is_fp and (spec.group_size <= 0 or not config.static_groups):
        raise ValueError(f"gptq: {spec.dtype} weights need groups (group_size > 0) and static_groups")
    n, k = w.shape
    # the sweep runs in float32 as in GPTQ
    h = hessian(x) if h is None else h   # not changed here: the permuted copy below is the one damped
    w = w.float().clone()
    diag = torch.diagonal(h).clone()
    dead = diag == 0
    diag[dead] = 1.0   # a column no token reads: H's diagonal entry set to 1, the weights zeroed
    w[:, dead] = 0.0
    gs = k if spec.group_size <= 0 else spec.group_size
    s1 = None
    if spec.progressive:   # static groups: both levels fixed from the whole weight before the sweep
        if not config.static_groups:
            raise ValueError("gptq: a progressive (two-level) spec needs static_groups")
        s1, _, scale, zero = progressive_qparams(w, spec, clip)
        cols = _ProgressiveColumns(spec, s1, scale, zero)
    elif spec.micro_scale is not None:   # NVFP4: both levels fixed from the whole weight before the sweep
        s1, scale = two_level_qparams(w, spec, clip)
        zero = None
        cols = _FpColumns(spec, scale * s1.to(torch.float32))   # exact: <= 4 + 11 significant bits
    elif spec.is_fp:
        scale, zero = compute_qparams(w.float(), spec, clip)
        cols = _FpColumns(spec, scale.expand(n, -1))
    else:
        scale, zero = compute_qparams(w.float(), spec, clip)   # static groups: fixed before the sweep
        cols = _Columns(spec, scale, zero, n)
    perm = torch.argsort(diag, descending=True) if config.act_order else torch.arange(k, device=h.device)
    # H permuted (a new matrix: the caller's H is shared by the linears reading one input), then its dead diagonal
    # entries set, which is H[dead, dead] = 1 before the permutation
    hp = h.index_select(0, perm).index_select(1, perm)
    dead_p = dead[perm]
    hp[dead_p, dead_p] = 1.0
    w = w[:, perm]
    box = [hp]
    del hp, h
    u = _inverse_hessian_chol(box, config.damp).float()
    group_of = (perm // gs).tolist() if spec.group_size > 0 else [0] * k
    perm_l = perm.tolist()
    qcols = torch.zeros(n, k, dtype=torch.float32, device=w.device)
    with _one_thread():
        _sweep(w, u, cols, scale, zero, spec, config, clip, perm_l, group_of, gs, qcols)
    codes = fp_encode(qcols, spec.dtype) if spec.is_fp else qcols.to(torch.int16)
    return QuantizedTensor(codes, scale, zero, spec, scale0=s1)


@contextlib.contextmanager
def _one_thread():
    """The sweep is thousands of small vector ops: threads only add synchronisation (measured 2-50x slower with two
    threads on a busy 2-core machine), so it runs on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sweep(w, u, cols, scale, zero, spec, config, clip, perm_l, group_of, gs, qcols) -> None:
    """Quantize column by column in `perm` order, feeding each column's error forward (lazy batch updates). On a GPU
    with static groups, whole blocks replay a captured CUDA graph of this loop (_gptq_graph.py: the same kernels)."""
    n, k = w.shape
    start = 0
    if w.device.type in GRAPH_DEVICES and config.static_groups and GRAPHED:
        start = sweep_graphed(w, u, cols, config.block_size, perm_l, group_of, qcols) or 0
    for i1 in range(start, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, g = perm_l[i1 + i], group_of[i1 + i]
            if not config.static_groups and spec.group_size > 0 and col % gs == 0:
                # dynamic groups (no act-order): the group's range from the weights as updated so far
                if i + gs > w1.shape[1]:
                    raise ValueError(f"gptq: block_size {config.block_size} must be a multiple of the group size "
                                     f"{gs} for dynamic groups")
                gsc, gz = compute_qparams(w1[:, i:i + gs].float(), dataclasses.replace(spec, group_size=0),
                                          _clip_col(clip, g))
                scale[:, g:g + 1] = gsc
                if zero is not None:
                    zero[:, g:g + 1] = gz
                cols.set(scale, zero)
            q, deq = cols(w1[:, i], g if scale.shape[0] > 1 or scale.shape[1] > 1 else 0)
            qcols[:, col] = q
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]


@register
class Gptq(Pass):
    Config = GptqConfig
    uses_activations = True
    ensures = ("quantized",)
    forbids = ("quantized",)   # one quantization per linear

    def run(self, block, config, ctx) -> PassResult:
        details = {}
        lins = [l for l in quantizable(block) if l.qtensor is None]
        # stages: runs of linears reading the same feed (q/k/v, then o, gate/up, down); with several processes the
        # GPTQ sweeps of a stage's linears are split among them (compiler/share.py) and their results shared
        stages: list[list] = []
        for lin in lins:
            if stages and ctx.feed_of(lin.name) == ctx.feed_of(stages[-1][-1].name):
                stages[-1].append(lin)
            else:
                stages.append([lin])
        for i, stage in enumerate(stages):
            # true-sequential: a later stage sees the inputs produced by the layers already quantized
            x = ctx.inputs(stage[0].name) if i == 0 else ctx.fresh_inputs(stage[0].name)
            xu = [unshifted(block, lin, x) for lin in stage]
            hs, seen = [], {}
            for u in xu:   # linears reading one tensor share one H (the same numbers); every process takes part
                if id(u) not in seen:
                    seen[id(u)] = hessian(u, ctx.stats)
                hs.append(seen[id(u)])
            ws = [block.linear_module(lin.name).weight for lin in stage]
            # a sweep costs about N K^2 (K = the input width)
            owner = owners([w.shape[0] * float(w.shape[1]) ** 2 for w in ws], ctx.world.size)
            for lin, w, h, src in zip(stage, ws, hs, owner):
                qt = None
                if src == ctx.world.rank:
                    qt = gptq_quantize(w.data.float(), None, lin.spec, config,
                                       (1.0 if lin.clip is None else lin.clip), h=h)
                qt = share_qtensor(ctx.world, qt, src, lin.spec)
                # the output error statistic reads the batch's first tokens
                details[lin.name] = round(quantize_linear(block, lin, codes_from=qt, x=ctx.stats.head(x, SQNR_TOKENS))
                                          ["sqnr_db"], 2)
            del x, xu, hs, seen
        return PassResult(bool(lins), f"GPTQ on {len(lins)} linears", {"sqnr_db": details})
