"""The fast decoder on the GPU (dcc/runtime/fastlm with csrc/attn, w4a16, w4a8): its greedy tokens are the CPU
reference's (`dcc generate --exact`) for 32 new tokens on tiny TinyChat, QServe (per channel, g128; KV4) and
stories260K artifacts; the CUDA graph's replay gives the eager step's logits; a batch decodes each row as alone; the
prefill's one-launch RoPE + cache write leaves the cache, attention inputs and logits of its torch path."""
from pathlib import Path

import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.runtime.fastlm import FastLlama, generate_fast
from dcc.runtime.generate import generate
from dcc.runtime.reference import build_model
from cuda_util import require_family
from tiny_models import decoder_config, one_thread, sampled_id_files, save_tiny  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STORIES = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K" / "hf"
CASES = {"tinychat": dict(target="tinychat", algo="rtn", group_size=64),
         "tinychat-g128": dict(target="tinychat", algo="rtn", group_size=128),   # K = 128: the SwiGLU GEMV
         "qserve": dict(target="qserve", algo="qoq-rtn", group_size=0),
         "qserve-g128": dict(target="qserve", algo="qoq-rtn", group_size=128),
         "stories-tinychat": dict(target="tinychat", algo="rtn", group_size=64, unsupported="keep"),
         "stories-qserve": dict(target="qserve", algo="qoq-rtn", unsupported="keep")}
PROMPT = [5, 17, 42, 8, 99]


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    for fam in ("attn", "w4a16", "w4a8"):
        require_family(fam)
    d = tmp_path_factory.mktemp("fastlm_cuda")
    out = {}
    for name, kw in CASES.items():
        if name.startswith("stories"):
            if not STORIES.is_dir():
                continue
            src, (calib, _) = STORIES, sampled_id_files(STORIES, d)
        else:
            hidden = 128 if name.endswith("g128") else 64
            src = d / f"m{hidden}"
            save_tiny(src, decoder_config("llama", hidden=hidden, heads=4, kv_heads=2, layers=2,
                                          max_position_embeddings=128), seed=0)
            calib = d / "calib.txt"
            calib.write_text(" ".join(map(str, torch.randint(0, 100, (128,), generator=torch.Generator()
                                                             .manual_seed(0)).tolist())))
        opts = CompileOptions(calib=str(calib), calib_chunks=4, calib_seq_len=32, progress=False, **kw)
        out[name] = load_artifact(compile_model(str(src), str(d / name), opts, log=lambda m: None))
    return out


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_the_cpu_reference(arts, case):
    if case not in arts:
        pytest.skip(f"needs ../shared/assets ({STORIES} is absent)")
    art = arts[case]
    prompt = [1, 403, 407] if case.startswith("stories") else PROMPT
    # approx 0: QServe's fused norm and SiLU with the stand-ins the CPU reference emulates, bit for bit
    got = generate_fast(FastLlama(art, "cuda", approx=0), prompt, 32)
    assert got.captures == 1 and got.steps == 31
    ref = generate(build_model(art), prompt, 32, cache=False, bucket=1)
    if got.tokens != ref.tokens:
        # a difference is a failure unless the reference itself was at a tie there (top-2 logits within 16-bit
        # rounding of each other: the GPU's fp16/bf16 activations may then pick the other one)
        i = next(k for k, (a, b) in enumerate(zip(ref.tokens[0], got.tokens[0])) if a != b)
        with torch.no_grad():
            logits = build_model(art)(input_ids=torch.tensor([prompt + ref.tokens[0][:i]]), use_cache=False).logits
        top = logits[0, -1].topk(2).values
        margin = float(top[0] - top[1])
        assert margin <= 5e-3 * max(1.0, float(top[0].abs())), (
            f"{case}: first difference at new token {i}: cpu {ref.tokens[0][i]}, cuda {got.tokens[0][i]}; the "
            f"reference's top-2 logit margin there is {margin:.3g} (not a tie)")


@pytest.mark.parametrize("case,sdpa", [("tinychat", False), ("tinychat", True), ("qserve", False)])
def test_graph_replay_equals_the_eager_step(arts, case, sdpa):
    from dcc.runtime.fastlm.graph import StepGraph
    lm = FastLlama(arts[case], "cuda", sdpa=sdpa)
    lm.allocate(3, 16)
    ids = torch.tensor([PROMPT, PROMPT[::-1], [7] * 5], device="cuda")
    first = lm.prefill(ids).argmax(-1)
    pos = torch.full((3,), 5, device="cuda")
    eager = lm.step(first, pos).clone()
    graph = StepGraph(lm, first, pos)
    for _ in range(2):   # replays rewrite the same slot with the same K/V
        logits, nxt = graph(first, pos)
        torch.cuda.synchronize()
        assert torch.allclose(logits, eager, rtol=0, atol=1e-3 * float(eager.abs().max()))
        assert torch.equal(nxt, eager.argmax(-1))
    cpu = FastLlama(arts[case], "cpu")   # the same step on the CPU (float32): the GPU's 16-bit rounding apart
    cpu.allocate(3, 16)
    cpu.prefill(ids.cpu())
    want = cpu.step(first.cpu(), pos.cpu())
    assert torch.allclose(eager.cpu(), want, rtol=0, atol=3e-2 * float(want.abs().max()))


def test_swiglu_epilogue_leaves_prefill_and_step_logits(arts, monkeypatch):
    """TinyChat's gate_up with SwiGLU in the GEMV (the step, M = 2) or the GEMM and silu_mul over the interleaved
    output (the prefill, M = 10) gives the logits of the plain gate_up GEMM and silu_mul (DCC_FASTLM_GLU=0) bit for
    bit."""
    got = {}
    for glu in ("0", "1"):
        monkeypatch.setenv("DCC_FASTLM_GLU", glu)
        lm = FastLlama(arts["tinychat-g128"], "cuda")
        assert (lm.layers[0].glu is None) == (glu == "0")
        lm.allocate(2, 16)
        first = lm.prefill(torch.tensor([PROMPT, PROMPT[::-1]], device="cuda"))
        step = lm.step(first.argmax(-1), torch.full((2,), 5, device="cuda"))
        got[glu] = (first, step)
    assert all(torch.equal(a, b) for a, b in zip(got["0"], got["1"]))


def test_norm_in_the_gemv_leaves_step_logits(arts, monkeypatch):
    """TinyChat's o and down GEMVs ending in the residual add + RMSNorm (DCC_FASTLM_NORM_GEMV=1: one launch each)
    give the step logits of the GEMVs followed by add_rmsnorm, bit for bit, over two steps (the residual carries)."""
    from dcc.runtime.cuda.build import load
    assert load().gemv_add_rmsnorm_fits(2, 128, 128, "float16"), "the case's o projection should take the kernel"
    got = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("DCC_FASTLM_NORM_GEMV", fused)
        lm = FastLlama(arts["tinychat-g128"], "cuda")
        assert lm.layers[0].o.fuse_norm == (fused == "1")
        lm.allocate(2, 16)
        first = lm.prefill(torch.tensor([PROMPT, PROMPT[::-1]], device="cuda"))
        a = lm.step(first.argmax(-1), torch.full((2,), 5, device="cuda"))
        b = lm.step(a.argmax(-1), torch.full((2,), 6, device="cuda"))
        got[fused] = (a, b)
    assert all(torch.equal(x, y) for x, y in zip(got["0"], got["1"]))


@pytest.mark.parametrize("case", ["tinychat", "qserve"])
def test_a_batch_decodes_each_row_as_alone(arts, case):
    """Every row of a batch of one prompt decodes the same tokens; the first matches batch 1's (later ones may part
    only where batch 1's GEMMs, another kernel choice, round a near-tie the other way)."""
    lm = FastLlama(arts[case], "cuda")
    alone = generate_fast(lm, PROMPT, 12).tokens[0]
    rows = generate_fast(lm, PROMPT, 12, batch=5).tokens
    assert rows == [rows[0]] * 5 and rows[0][0] == alone[0] and len(rows[0]) == 12


def _recording(cache):
    """Wrap cache._causal so that every prefill attention's inputs (as SDPA takes them) are kept."""
    seen, causal = [], cache._causal

    def rec(q, k, v, dtype):
        seen.append([x.to(dtype) for x in (q, k, v)])
        return causal(q, k, v, dtype)

    cache._causal = rec
    return seen


def _cache_tensors(cache):
    return [cache.kc, cache.ks, cache.kz, cache.vc, cache.vs, cache.vz] if hasattr(cache, "kc") else [cache.k, cache.v]


def _same_bits(a, b):
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(
        a.view(torch.int16) if a.element_size() == 2 else a, b.view(torch.int16) if b.element_size() == 2 else b)


@pytest.mark.parametrize("kind,dt", [("kv4", torch.float16), ("kv4", torch.bfloat16), ("kv16", torch.float16),
                                     ("kv16", torch.bfloat16)])
@pytest.mark.parametrize("fused", [True, False], ids=["one-gemm", "three-gemms"])
def test_prefill_kernel_gives_the_torch_paths_cache_and_attention(kind, dt, fused):
    """KVCache.prefill_rows through rope_write_rows (one launch a layer) against its torch path (cache.kernels off):
    the cache, the attention's inputs and its output are the same bits; q/k/v as torch.split views of one GEMM output
    (read in place) or as three tensors (concatenated)."""
    from dcc.runtime.fastlm.cache import KV4Cache, KV16Cache
    require_family("attn")
    layers, b, s, h, kvh, d, cap = 2, 3, 37, 8, 2, 64, 48
    g = torch.Generator(device="cuda").manual_seed(3)
    ang = torch.rand(cap, d // 2, generator=g, device="cuda") * 6.3
    ang[0] = 0
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    out = (torch.randn(b * s, (h + 2 * kvh) * d, generator=g, device="cuda") * 2).to(dt)
    out[0, h * d:(h + 1) * d] = 0.5                     # a flat K vector (position 0)
    q, k, v = torch.split(out, [h * d, kvh * d, kvh * d], -1)
    if not fused:
        q, k, v = q.clone(), k.clone(), v.clone()
    make = (lambda: KV4Cache(layers, b, kvh, cap, d, h, "cuda")) if kind == "kv4" else \
        (lambda: KV16Cache(layers, b, kvh, cap, d, h, "cuda", dt))
    caches, outs, seen = [make(), make()], [], []
    caches[0].prefill_kernel = True                     # the kernel (opt-in by default)
    caches[1].kernels = caches[1].prefill_kernel = False   # the torch path, on the same GPU
    for c in caches:
        assert c.kernels or c is caches[1]
        seen.append(_recording(c))
        outs.append([c.prefill_rows(i, q, k, v, b, cos, sin) for i in range(layers)])
    torch.cuda.synchronize()
    for x, y in zip(_cache_tensors(caches[0]), _cache_tensors(caches[1])):
        assert _same_bits(x, y)
    for got, want in zip(seen[0], seen[1]):
        assert all(_same_bits(x, y) for x, y in zip(got, want))
    for x, y in zip(outs[0], outs[1]):
        assert torch.isfinite(x).all() and _same_bits(x, y)


@pytest.mark.parametrize("case", ["tinychat", "qserve"])
def test_prefill_with_the_kernel_fills_the_cache_as_the_torch_path(arts, case):
    """FastLlama.prefill (RoPE + cache write in one launch a layer) leaves the cache the torch path leaves, bit for
    bit, and gives its logits; a batch of 3 prompts of 5 tokens."""
    ids = torch.tensor([PROMPT, PROMPT[::-1], [7] * 5], device="cuda")
    runs = []
    for kernel in (True, False):
        lm = FastLlama(arts[case], "cuda")
        lm.allocate(3, 16)
        lm.cache.kernels = lm.cache.prefill_kernel = lm.cache.kernels and kernel
        assert lm.cache.kernels == kernel
        runs.append((lm.prefill(ids), _cache_tensors(lm.cache)))
    torch.cuda.synchronize()
    assert torch.equal(runs[0][0], runs[1][0])
    for x, y in zip(runs[0][1], runs[1][1]):
        assert _same_bits(x, y)
