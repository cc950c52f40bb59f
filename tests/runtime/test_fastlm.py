"""The fast decoder (dcc/runtime/fastlm) on the CPU, where it runs torch ops with the reference's numerics: its
greedy tokens are the reference model's (`dcc generate --exact`: the whole sequence at every step) on tiny TinyChat
(W4A16), QServe (W4A8KV4, per channel and g128) and stories260K artifacts; its KV4 cache reads back exactly what
dcc::quant_kv gives; the loop's stop rules are the reference loop's; unsupported artifacts are named, not run."""
from pathlib import Path

import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.ir.actquant import fake_quantize_kv
from dcc.runtime.artifact import load_artifact
from dcc.runtime.fastlm import FastLlama, fast_path_problem, generate_fast, unsupported
from dcc.runtime.fastlm import ref_ops
from dcc.runtime.generate import Sampling, generate
from dcc.runtime.reference import build_model

from tiny_models import decoder_config, one_thread, sampled_id_files, save_tiny  # noqa: F401 (autouse fixture)

STORIES = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K" / "hf"
TINY = {"tinychat": dict(target="tinychat", algo="rtn", group_size=64),
        "qserve": dict(target="qserve", algo="qoq-rtn", group_size=0),
        "qserve-g128": dict(target="qserve", algo="qoq-rtn", group_size=128)}
PROMPT = [5, 17, 42, 8, 99]


def _compile(src, calib, out, **kw):
    opts = CompileOptions(calib=str(calib), calib_chunks=4, calib_seq_len=32, progress=False, **kw)
    return load_artifact(compile_model(str(src), str(out), opts, log=lambda m: None))


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """{case: artifact} of tiny Llamas (GQA 4/2 heads; hidden 128 where g128 needs K % 128)."""
    d = tmp_path_factory.mktemp("fastlm")
    out = {}
    for name, kw in TINY.items():
        hidden = 128 if name.endswith("g128") else 64
        cfg = decoder_config("llama", hidden=hidden, heads=4, kv_heads=2, layers=2, max_position_embeddings=64)
        save_tiny(d / f"m{hidden}", cfg, seed=0)
        ids = torch.randint(0, cfg.vocab_size, (4 * 32,), generator=torch.Generator().manual_seed(0))
        (d / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
        out[name] = _compile(d / f"m{hidden}", d / "calib.txt", d / name, **kw)
    return out


def _reference_tokens(art, prompt, n, **kw):
    return generate(build_model(art), prompt, n, cache=False, bucket=1, **kw)


@pytest.mark.parametrize("case", TINY)
def test_greedy_tokens_are_the_exact_reference_tokens(arts, case):
    art = arts[case]
    assert unsupported(art) is None
    res = generate_fast(FastLlama(art, "cpu"), PROMPT, 16, batch=2)
    ref = _reference_tokens(art, PROMPT, 16)
    assert res.tokens == [ref.tokens[0]] * 2 and res.stop == "length" and res.steps == 15 and res.cached
    assert res.prefill_tps() > 0 and res.decode_tps() > 0


@pytest.mark.parametrize("case", TINY)
def test_prefill_and_steps_give_the_reference_logits(arts, case):
    """Prefill of the prompt, then one step per token: the reference's last-position logits (float32 sums in
    another order: 1e-4 of the logits' scale)."""
    art = arts[case]
    model, lm = build_model(art), FastLlama(art, "cpu")
    seq = PROMPT + [3, 71, 64, 12]
    lm.allocate(1, len(seq))
    got = [lm.prefill(torch.tensor([PROMPT]))[0]]
    for i, tok in enumerate(seq[len(PROMPT):-1]):
        got.append(lm.step(torch.tensor([tok]), torch.tensor([len(PROMPT) + i]))[0])
    with torch.no_grad():
        for i, g in enumerate(got):
            ref = model(input_ids=torch.tensor([seq[:len(PROMPT) + i]]), use_cache=False).logits[0, -1]
            assert torch.allclose(g, ref, atol=1e-4 * float(ref.abs().max()), rtol=0), (case, i)
    if art.manifest["runtime"]["kv_bits"] == 4:   # the cache holds 4-bit codes, and what they read back is used
        assert lm.cache.kc.dtype == torch.uint8 and lm.cache.kc.shape[-1] == lm.spec.head_dim // 2


def test_the_loop_stops_as_the_reference_loop(arts):
    art = arts["qserve"]
    lm = FastLlama(art, "cpu")
    free = _reference_tokens(art, PROMPT, 6).tokens[0]
    eos = {free[2]}
    res = generate_fast(lm, PROMPT, 6, eos=eos)
    ref = _reference_tokens(art, PROMPT, 6, eos=eos)
    assert res.tokens == ref.tokens and res.stop == ref.stop == "eos" and len(res.tokens[0]) == 3
    res = generate_fast(lm, PROMPT, 20, max_positions=9)
    ref = _reference_tokens(art, PROMPT, 20, max_positions=9)
    assert res.tokens == ref.tokens and res.stop == ref.stop == "context"
    seen = []
    sampled = generate_fast(lm, PROMPT, 5, Sampling(temperature=0.9, seed=3), on_tokens=seen.append)
    assert seen == [[t] for t in sampled.tokens[0]]
    assert generate_fast(lm, PROMPT, 5, Sampling(temperature=0.9, seed=3)).tokens == sampled.tokens


def test_a_graph_that_feeds_itself_gives_the_same_tokens(arts, monkeypatch):
    """The greedy loop's graph path (graph.StepGraph with advance: tokens and positions fed back on the device), run
    with an eager stand-in of the graph on the CPU: the same tokens as host-fed steps."""
    from dcc.runtime.fastlm import graph, run

    class EagerGraph:
        def __init__(self, lm, tok, pos, advance=False):
            self.lm, self.tok, self.pos, self.advance = lm, tok.clone(), pos.clone(), advance

        def __call__(self, tok=None, pos=None):
            if tok is not None:
                self.tok.copy_(tok)
                self.pos.copy_(pos)
            logits = self.lm.step(self.tok, self.pos)
            nxt = logits.argmax(-1)
            if self.advance:
                self.tok.copy_(nxt)
                self.pos.add_(1)
            return logits, nxt

    lm = FastLlama(arts["tinychat"], "cpu")
    want = generate_fast(lm, PROMPT, 10, batch=2).tokens
    monkeypatch.setattr(run, "GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(graph, "StepGraph", EagerGraph)
    got = generate_fast(lm, PROMPT, 10, batch=2)
    assert got.tokens == want and got.captures == 1
    sampled = generate_fast(lm, PROMPT, 6, Sampling(temperature=0.8, seed=1))   # sampled: fed from the host
    monkeypatch.setattr(run, "GRAPH_DEVICES", ("cuda",))
    assert generate_fast(lm, PROMPT, 6, Sampling(temperature=0.8, seed=1)).tokens == sampled.tokens


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs ../shared/assets ({STORIES} is absent)")
@pytest.mark.parametrize("target", ["tinychat", "qserve"])
def test_stories260k_greedy_tokens_are_the_reference_tokens(tmp_path, target):
    """A real model (head_dim 8, intermediate 172: some layers stay 16-bit with --unsupported keep)."""
    calib, _ = sampled_id_files(STORIES, tmp_path)
    kw = dict(algo="rtn", group_size=64) if target == "tinychat" else dict(algo="qoq-rtn")
    art = _compile(STORIES, calib, tmp_path / target, target=target, unsupported="keep", **kw)
    assert unsupported(art) is None
    prompt = [1, 403, 407]
    assert generate_fast(FastLlama(art, "cpu"), prompt, 24).tokens == _reference_tokens(art, prompt, 24).tokens


def test_kv4_codes_read_back_as_quant_kv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, 16, generator=g) * torch.rand(3, 2, 40, 1, generator=g) * 8
    x[0, 0, 0] = 0.75                                  # a flat vector: quant_kv returns it unchanged
    x[0, 0, 1, :8] = -2.5                              # min at several channels
    codes, scale, zero = ref_ops.kv4_quantize(x)
    assert int(codes.max()) <= 15 and scale.dtype == zero.dtype == torch.float16
    packed = ref_ops.kv4_pack(codes)
    assert packed.shape[-1] == 8 and torch.equal(ref_ops.kv4_unpack(packed), codes)
    assert torch.equal(packed[..., 0] & 0xF, codes[..., 0])   # the even channel in the low nibble
    got = ref_ops.kv4_dequantize(packed, scale, zero)
    assert torch.equal(got, fake_quantize_kv(x, 4))


def test_decode_attention_is_softmax_over_the_valid_slots():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8,
                                                                                                    generator=g)
    lengths = torch.tensor([4, 10])
    got = ref_ops.decode_attention(q, k, v, lengths)
    for b in range(2):
        for h in range(6):
            kk, vv = k[b, h // 2, :lengths[b]], v[b, h // 2, :lengths[b]]
            want = torch.softmax(kk @ q[b, h] / 8 ** 0.5, 0) @ vv
            assert torch.allclose(got[b, h], want, atol=1e-6)


def test_unsupported_artifacts_are_named(arts):
    art = arts["tinychat"]
    assert fast_path_problem(art, exact=True).startswith("--exact")

    class Edited:   # the same artifact with one manifest or config field changed
        def __init__(self, manifest=None, config=None):
            self.manifest, self.config = manifest or art.manifest, config or art.config
    assert "target" in unsupported(Edited({**art.manifest, "target": "nunchaku"}))
    assert "architecture" in unsupported(Edited(config={**art.config, "model_type": "qwen2"}))
    assert "rope" in unsupported(Edited(config={**art.config, "rope_parameters": {"rope_type": "dynamic",
                                                                                   "rope_theta": 1e4}}))
    assert "KV cache bits" in unsupported(Edited({**art.manifest, "runtime": {"kv_cache": {"a": 8}}}))


def test_the_benchmarks_random_artifacts_run(monkeypatch):
    """bench/e2e.py's in-memory random artifacts (the targets' own packers, a manifest as load_artifact reads one)
    are ones the fast decoder takes, decoded here on the CPU at a tiny shape; its byte count covers every tensor."""
    import importlib.util
    import sys
    bench = Path(__file__).resolve().parents[2] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_e2e", bench / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_e2e", e2e)
    spec.loader.exec_module(e2e)
    shape = dict(hidden=128, intermediate=256, layers=1, heads=4, kv_heads=2, vocab=300, rope_theta=1e4)
    for target in ("tinychat", "qserve"):
        art = e2e.random_artifact(shape, target, device="cpu")
        assert unsupported(art) is None
        lm = FastLlama(art, "cpu")
        assert lm.spec.engine == (target == "qserve") and lm.spec.kv_bits == (4 if target == "qserve" else None)
        res = generate_fast(lm, [3, 4, 5], 4, batch=2)
        assert len(res.tokens) == 2 and res.tokens[0] == res.tokens[1] and len(res.tokens[0]) == 4
        weights = sum(t.numel() * t.element_size() for t in art.tensors.t.values())
        assert e2e.step_bytes(art, shape, 1, 0) == weights - 300 * 128 * 2 + 128 * 2


def test_silu_mul_blocks_reads_gate_and_up_interleaved_by_block():
    from dcc.runtime.fastlm.ops import silu_mul_blocks
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    gu = torch.stack([gate.reshape(3, 4, 8), up.reshape(3, 4, 8)], 2).reshape(3, 64)   # gate block, up block, ...
    assert torch.equal(silu_mul_blocks(gu, 8, torch.float32), ref_ops.silu_mul(gate, up, torch.float32))
