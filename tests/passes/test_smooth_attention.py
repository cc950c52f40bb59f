"""smooth_attention: on captured one-layer Llama (GQA), Qwen2 (q/k/v biases), Qwen3 (q/k norms) and OPT (no RoPE)
blocks the float output is unchanged; planted outlier channels of post-RoPE K flatten; RoPE pairs share lambda; the
pairing is needed (without it the fold changes a RoPE model); the whole compiler keeps a tiny model's logits."""
import copy
from functools import lru_cache

import pytest
import torch

from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import PassError, PassTiming, Step, run_block
from dcc.passes import smooth_attention as sa
from dcc.passes.base import get_pass
from dcc.passes.smooth_attention import SmoothAttention, SmoothAttentionConfig, attention_scale, collect_qk

from tiny_models import (analysed_block, assert_same_logits, calib_ids, capture_first_layer, decoder_config, logits,
                         one_thread, run_and_rebuild, saved_model)  # noqa: F401 (one_thread: autouse fixture)

D = 16   # head_dim of every tiny layer here (hidden 64, 4 query heads, 2 KV heads; OPT: 4 and 4)


@lru_cache(maxsize=None)
def _layer(family: str):
    cfg = decoder_config(family, vocab=128, layers=1, **({"head_dim": D} if family == "qwen3" else {}))
    return capture_first_layer(cfg, calib_ids(1, vocab=128, shape=(2, 16)))


def _block(family: str, k_outliers: float | None = None):
    """A fresh copy of the family's layer with random biases (Qwen2, OPT) as an analysed Block, and its context.
    k_outliers: k_proj rows of channels 3 and 3 + D/2 of every KV head (a RoPE pair) scaled by this factor."""
    layer, gm, params, args, kwargs = _layer(family)
    block = analysed_block(copy.deepcopy(layer), gm, params)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in block.linears:
            b = block.linear_module(name).bias
            if b is not None:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        if k_outliers is not None:
            a = block.attentions[0]
            w = block.linear_module(a.k).weight.view(a.num_kv_heads, D, -1)
            w[:, [3, 3 + D // 2]] *= k_outliers
    return block, BlockContext(block, args, kwargs, torch.device("cpu"))


def _weights(block) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.module.state_dict().items()}


def _row_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per output row: |after| / |before| (the factor a row was scaled by)."""
    return after.double().norm(dim=-1) / before.double().norm(dim=-1)


def test_registered_and_config():
    assert get_pass("smooth_attention") is SmoothAttention and "attention_smoothed" in SmoothAttention.ensures
    c = SmoothAttentionConfig(alpha=0.3, beta=0.2, verify=False)
    assert SmoothAttentionConfig.from_dict(c.to_dict()) == c
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"beta": 2}, {"alpha": True}, {"beta": "0"}, {"verify": 1}):
        with pytest.raises(ValueError, match="smooth_attention"):
            SmoothAttentionConfig(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        SmoothAttentionConfig.from_dict({"groups": ["qk"]})


def test_attention_scale_formula():
    k, q = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 1.0, 1.0])
    # no RoPE: sqrt(k) per channel; a dead K channel keeps 1
    torch.testing.assert_close(attention_scale(q, k, 0.5, 0.0, rope=False), torch.tensor([2.0, 1.0, 1.0, 3.0],
                                                                                           dtype=torch.float64))
    # RoPE (d = 4): channels 0/2 and 1/3 are pairs, their maxima 4 and 9
    torch.testing.assert_close(attention_scale(q, k, 0.5, 0.0, rope=True), torch.tensor([2.0, 3.0, 2.0, 3.0],
                                                                                          dtype=torch.float64))
    # beta divides by max|Q|^beta
    torch.testing.assert_close(attention_scale(q, k, 0.5, 0.5, rope=False), torch.tensor([2.0, 0.5, 1.0, 3.0],
                                                                                           dtype=torch.float64))
    # per KV head (leading dimensions are kept)
    assert attention_scale(q.expand(3, 4), k.expand(3, 4), 0.5, 0.0, rope=True).shape == (3, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "opt"])
def test_preserves_block_output(family):
    block, ctx = _block(family)
    a = block.attentions[0]
    assert a.rope is (family != "opt")
    if family == "llama":
        assert a.num_kv_heads < a.num_heads   # GQA: lambda is expanded to the query heads of each KV head
    ref, w0 = ctx.forward().clone(), _weights(block)
    res = SmoothAttention().run(block, SmoothAttentionConfig(), ctx)
    assert res.changed
    torch.testing.assert_close(ctx.forward(), ref, rtol=1e-5, atol=1e-5)
    w1 = _weights(block)
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    if family == "qwen3":   # lambda goes into the per-head norm gains, the projections stay as they are
        assert res.details["attentions"]["self_attn"]["fold"] == "norm gains"
        assert changed == {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
        lam = w1["self_attn.q_norm.weight"].double() / w0["self_attn.q_norm.weight"].double()
        torch.testing.assert_close(w0["self_attn.k_norm.weight"].double() / w1["self_attn.k_norm.weight"].double(),
                                   lam)
        torch.testing.assert_close(lam[: D // 2], lam[D // 2:])
        return
    q, k = (f"{n}.weight" for n in (a.q, a.k))
    assert {q, k} <= changed and not changed & {f"{a.v}.weight", f"{a.o}.weight"}
    if family == "qwen2":   # q/k biases move with their rows
        assert {f"{a.q}.bias", f"{a.k}.bias"} <= changed
        for n in (a.q, a.k):
            torch.testing.assert_close(w1[f"{n}.bias"].double() / w0[f"{n}.bias"].double(),
                                       _row_ratio(w0[f"{n}.weight"], w1[f"{n}.weight"]))


def _lambda_from_weights(a, w0, w1) -> torch.Tensor:
    """lambda [kv, d] as folded: k_proj rows were divided by it."""
    return (1.0 / _row_ratio(w0[f"{a.k}.weight"], w1[f"{a.k}.weight"])).view(a.num_kv_heads, D)


def test_rope_pairs_share_lambda_and_gqa_expansion():
    block, ctx = _block("llama", k_outliers=30.0)
    a, w0 = block.attentions[0], _weights(block)
    SmoothAttention().run(block, SmoothAttentionConfig(), ctx)
    w1 = _weights(block)
    lam = _lambda_from_weights(a, w0, w1)
    torch.testing.assert_close(lam[:, : D // 2], lam[:, D // 2:])
    assert float(lam.max() / lam.min()) > 3   # not a trivial, uniform scale
    # the query heads reading KV head j had their rows multiplied by lambda[j]
    rep = a.num_heads // a.num_kv_heads
    q_ratio = _row_ratio(w0[f"{a.q}.weight"], w1[f"{a.q}.weight"]).view(a.num_kv_heads, rep, D)
    torch.testing.assert_close(q_ratio, lam.view(a.num_kv_heads, 1, D).expand_as(q_ratio))


def test_without_rope_lambda_is_per_channel():
    # OPT has no RoPE: nothing ties channel i to i + d/2, so their lambdas differ
    block, ctx = _block("opt")
    a, w0 = block.attentions[0], _weights(block)
    SmoothAttention().run(block, SmoothAttentionConfig(), ctx)
    lam = _lambda_from_weights(a, w0, _weights(block))
    assert not torch.allclose(lam[:, : D // 2], lam[:, D // 2:], rtol=1e-2)


def test_pairing_is_needed_with_rope(monkeypatch):
    # scaling channel i and i + d/2 differently does not commute with RoPE: the verification catches it
    block, ctx = _block("llama", k_outliers=30.0)
    orig = sa.attention_scale
    monkeypatch.setattr(sa, "attention_scale", lambda q, k, al, be, rope: orig(q, k, al, be, False))
    with pytest.raises(PassError, match="smooth_attention on block .* does not preserve"):
        run_block(block, [Step("smooth_attention", SmoothAttentionConfig())], ctx, PassTiming())


def test_k_outlier_channels_flatten():
    block, ctx = _block("llama", k_outliers=30.0)
    a = block.attentions[0]
    _, k0 = collect_qk(block, ctx, [a])[a.q]
    flatness = lambda k: k.amax(-1) / k.median(-1).values   # per KV head: largest channel over the median one
    assert (flatness(k0) > 8).all()   # the planted pair dominates every KV head
    res = SmoothAttention().run(block, SmoothAttentionConfig(alpha=0.5, beta=0.0), ctx)
    _, k1 = collect_qk(block, ctx, [a])[a.q]
    assert (flatness(k1) < flatness(k0) / 3).all()
    # alpha = 0.5, beta = 0: the largest channel of each KV head ends at the square root of its absmax
    torch.testing.assert_close(k1.amax(-1), k0.amax(-1).sqrt(), rtol=1e-4, atol=1e-6)
    d = res.details["attentions"][a.q.rpartition(".")[0]]
    assert d["k_absmax_after"] == pytest.approx(d["k_absmax"] ** 0.5, rel=1e-5)


def test_attention_without_statistics_is_skipped(monkeypatch):
    # an attention whose nodes the graph does not show (no statistics) is named, not guessed at
    block, ctx = _block("llama")
    w0 = _weights(block)
    monkeypatch.setattr(sa, "collect_qk", lambda block, ctx, attentions: {})
    res = SmoothAttention().run(block, SmoothAttentionConfig(), ctx)
    assert not res.changed and res.message == "no attention smoothed"
    assert "self_attn" in res.details["skipped"][0] and "no single attention node" in res.details["skipped"][0]
    assert all(torch.equal(v, _weights(block)[k]) for k, v in w0.items())


def test_compiler_preserves_logits(tmp_path):
    # through the sequential compiler on a two-layer Llama (GQA): the rebuilt model computes the same logits
    model, path = saved_model(tmp_path, "llama")
    lm, out, states, blocks = run_and_rebuild(path, [Step("smooth_attention", SmoothAttentionConfig())])
    assert_same_logits(logits(model), logits(out))
    p = blocks[1].prefix
    assert not torch.equal(states[1]["self_attn.k_proj.weight"], model.get_parameter(f"{p}.self_attn.k_proj.weight"))


def _kv4_block():
    """The Llama layer with planted K outliers, W4A8 weights (per channel) and a 4-bit KV cache, as QServe runs it."""
    from dcc.ir.formats import QuantSpec
    block, ctx = _block("llama", k_outliers=30.0)
    spec = QuantSpec("int4", symmetric=False, group_size=0, zero_mode="offset")
    for lin in block.linears.values():
        lin.spec, lin.act = spec, "int8"
    for a in block.attentions:
        a.kv_bits = 4
    return block, ctx


def test_search_picks_the_smallest_kv4_block_error():
    from dcc.passes._scoring import BlockScorer
    block, ctx = _kv4_block()
    ref = ctx.forward().clone()
    res = SmoothAttention().run(block, SmoothAttentionConfig(search=True, grid=4, samples=2), ctx)
    (d,) = [v for v in res.details["attentions"].values()]
    assert d["alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0) and d["error"] is not None
    torch.testing.assert_close(ctx.forward(), ref, rtol=1e-4, atol=1e-4)   # still the same float function
    errs = {}
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):   # every fixed alpha of the grid, re-scored on a fresh block
        b, c = _kv4_block()
        SmoothAttention().run(b, SmoothAttentionConfig(alpha=alpha, verify=False), c)
        errs[alpha] = BlockScorer(b, c, 2).error(list(b.linears))
    assert errs[d["alpha"]] == pytest.approx(min(errs.values()), rel=1e-6), (d, errs)
    assert min(errs.values()) < errs[0.0]   # the planted outliers make some smoothing pay under a 4-bit cache


def test_search_config_is_checked():
    assert SmoothAttentionConfig.from_dict(SmoothAttentionConfig(search=True, grid=5).to_dict()).grid == 5
    for bad in ({"search": 1}, {"grid": 0}, {"samples": 0}, {"grid": 2.5}):
        with pytest.raises(ValueError, match="smooth_attention"):
            SmoothAttentionConfig(**bad)


def test_after_smoothing_it_reads_q_and_k_off_the_smoothing_run(monkeypatch):
    # smooth collects the linears' inputs; SmoothAttention asked (prepare -> ctx.track) to read q/k maxima off that
    # run, so it makes no run of its own, and the maxima it uses equal those of a fresh run (smoothing preserves q, k)
    from dcc.passes.smooth import SmoothConfig
    block, ctx = _block("llama", k_outliers=8.0)
    own = []
    real = sa.collect_qk
    monkeypatch.setattr(sa, "collect_qk", lambda *a: own.append(1) or real(*a))
    seen = {}
    orig = sa.reduce_qk
    monkeypatch.setattr(sa, "reduce_qk", lambda c, stats: seen.update(orig(c, stats)) or orig(c, stats))
    run_block(block, [Step("smooth", SmoothConfig(alpha=0.5)), Step("smooth_attention", SmoothAttentionConfig())],
              ctx, PassTiming())
    assert own == [] and seen and not ctx._tracks   # no run of its own; the tracking ends with the pass
    # the tracked maxima were read before smoothing: the same as after it, up to float rounding
    block2, ctx2 = _block("llama", k_outliers=8.0)
    run_block(block2, [Step("smooth", SmoothConfig(alpha=0.5))], ctx2, PassTiming())
    fresh = real(block2, ctx2, block2.attentions)
    for key, (q, k) in fresh.items():
        assert torch.allclose(seen[key][0], q, rtol=1e-5) and torch.allclose(seen[key][1], k, rtol=1e-5)
