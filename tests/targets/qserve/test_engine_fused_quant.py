"""QServe's fused activation quantization (dcc/targets/qserve/numerics_fused.py) against the engine's kernels emulated
thread by thread (tests/qserve_engine.py, written from qserve de6a2ec and its sm_90 SASS): rms_norm_general[_fuse_sum]
(a layer norm with per-token int8 quantization and an fp16-accumulated sum) and silu_and_mul; then the CPU reference
of QServe artifacts, whose qkv / gate_up inputs and down_proj input are now computed the engine's way."""
import numpy as np
import pytest
import torch

import qserve_engine as engine
from dcc.targets.qserve import layout, numerics, numerics_fused
from dcc.targets.qserve.reference import QServeLinear, QServeNorm, QServeSiLU


def _bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.asarray(a, dtype=np.float16).reshape(-1).view(np.int16)


def _residual(t: int, h: int, seed: int) -> torch.Tensor:
    """fp16 block inputs like a residual stream: normal channels, a few outlier channels (x 40), a per-token offset
    (so that the mean the engine subtracts is not small), and a token of tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * torch.exp2(torch.randint(-2, 3, (t, 1), generator=g).float())
    x[:, torch.randint(0, h, (max(1, h // 512),), generator=g)] *= 40
    x = x + torch.randn(t, 1, generator=g) * 2
    x[-1] = torch.randn(h, generator=g) * 2.0 ** -12
    return x.to(torch.float16)


def _gain(h: int, seed: int, ones: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.ones(h, dtype=torch.float16) if ones else (0.5 + torch.rand(h, generator=g)).to(torch.float16)


@pytest.mark.parametrize("h,with_sum,ones", [(96, True, False), (1536, True, True), (4096, True, False),
                                             (1536, False, False)])
def test_fused_norm_quant_bit_identical_to_the_engine(h, with_sum, ones):
    """codes, scale, input_sum and the fp16 normed values: H below a warp multiple of threads, with a partial last
    column (1536 over 1024 threads) and four full columns (4096); the sum-free rms_norm_general as well."""
    x, w = _residual(5, h, seed=h), _gain(h, seed=h + 1, ones=ones)
    codes, scale, total, hh = engine.layernorm_quant(x.numpy(), w.numpy(), 1e-5, with_sum)
    got = numerics_fused.rms_norm_general(x.float(), w.float(), 1e-5, with_sum)
    assert np.array_equal(got.codes.numpy().astype(np.int64), codes)
    assert np.array_equal(_bits(got.scale), _bits(scale))
    assert np.array_equal(_bits(got.h), _bits(hh))
    if with_sum:
        assert np.array_equal(_bits(got.sum), _bits(total))
    else:
        assert got.sum is None


def test_silu_and_mul_bit_identical_to_the_engine():
    """fp16 outputs of silu_and_mul over the range where exp2 saturates, overflows or flushes."""
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(6, 512, generator=g) * 4
    gate[0, :10] = torch.tensor([-100.0, -88.5, -87.0, -40.0, -17.0, 0.0, 2.0 ** -20, 11.0, 300.0, 65504.0])
    gate, up = gate.half(), (torch.randn(6, 512, generator=g) * 2).half()
    want = engine.silu_and_mul(gate.numpy(), up.numpy())
    assert np.array_equal(_bits(numerics_fused.silu_and_mul(gate.float(), up.float())), _bits(want))
    # the reference model's split: QServeSiLU, an exact float32 product, the fp16 rounding of the next quantization
    assert np.array_equal(_bits((QServeSiLU()(gate.float()) * up.float()).half()), _bits(want))


def test_the_fused_kernel_is_not_the_standalone_path():
    """What dcc computed before (the model's RMSNorm, then the standalone quant kernel) differs from the engine's
    fused kernel on these inputs, and so does the standalone kernel on the engine's own fp16 normed values: their
    codes differ (taken from float32 y, not fp16 h) and their sums differ (fp16 per-thread accumulation)."""
    h = 4096
    x, w = _residual(8, h, seed=11), _gain(h, seed=12, ones=True)
    codes, scale, total, hh = engine.layernorm_quant(x.numpy(), w.numpy(), 1e-5)
    std_codes, std_scale = engine.quantize(hh)
    assert (std_codes != codes).any()
    assert (_bits(engine.token_sum(hh)) != _bits(total)).any()
    assert np.array_equal(_bits(std_scale), _bits(scale))           # same amax: the scale alone agrees
    xf = x.float()
    rms = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()    # the model's RMSNorm
    old = numerics.quantize_tokens(rms)
    assert (old.codes.numpy().astype(np.int64) != codes).mean() > 0.01   # the mean the engine subtracts
    assert (_bits(old.sum) != _bits(total)).any()


# ---------------------------------------------------------------------------------------- the artifact's reference

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from tiny_lm_artifacts import qserve_engine_artifacts
    return qserve_engine_artifacts(tmp_path_factory)


def _int_weight(art, name: str) -> tuple[np.ndarray, dict]:
    entry = art.manifest["layers"][name]
    n, k = entry["shape"]
    t = {key: art.tensors.get(f"{name}.{key}") for key in ("qweight", "s1_scales", "s1_szeros", "weight",
                                                          "dequant_scale") if f"{name}.{key}" in art.tensors.keys()}
    ints = t["weight"] if "weight" in t else layout.unpack_qweight(t["qweight"], n, k)
    return ints.numpy().astype(np.int64), t


def _engine_linear(art, name, codes, scale, total) -> np.ndarray:
    ints, t = _int_weight(art, name)
    psum = codes @ ints.T
    if "s1_szeros" in t:
        return engine.epilogue_per_channel(psum, t["s1_scales"].numpy(), t["s1_szeros"].numpy(), scale, total)
    return engine.epilogue_scaled(psum, t["dequant_scale"].numpy(), scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_model_computes_the_engines_fused_kernels(artifacts, bits):
    """Layer 0 of the reference model of a W4A8 (per channel) and a W8A8 artifact: q_proj and gate_proj read the
    fused norm's quantization of the embeddings, down_proj silu_and_mul's output through the standalone kernel; each
    output bit-identical to the engine emulated from its inputs, and q_proj's not what the model's RMSNorm followed
    by the standalone quantization gives."""
    from dcc.runtime.artifact import load_artifact
    from dcc.runtime.graph_blocks import linear_outputs
    from dcc.runtime.reference import build_model

    art = load_artifact(artifacts[bits])
    model = build_model(art)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, QServeNorm) and isinstance(layer.mlp.act_fn, QServeSiLU)
    assert layer.self_attn.q_proj.act_input == "norm" and layer.mlp.down_proj.act_input == "quant"
    ids = torch.randint(0, art.config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    with linear_outputs(model) as outs, torch.no_grad():
        model(ids, use_cache=False)
    x = model.model.embed_tokens(ids).reshape(-1, art.config["hidden_size"]).detach()
    assert torch.equal(x, x.half().float())                           # the block input is fp16, as on the engine
    eps = art.config["rms_norm_eps"]
    with_sum = bits == 4
    pre = "model.layers.0"
    # the residual after attention: float32 here, rounded to fp16 by QServeNorm; torch's fp16 add on the engine
    # rounds the same float32 sum once to fp16
    mid = (x + outs[f"{pre}.self_attn.o_proj"].reshape(x.shape)).half()
    for norm, lin, inp in (("input_layernorm", "self_attn.q_proj", x.half()),
                           ("post_attention_layernorm", "mlp.gate_proj", mid)):
        w = art.tensors.get(f"{pre}.{norm}.weight").numpy()
        codes, scale, total, _ = engine.layernorm_quant(inp.numpy(), w, eps, with_sum)
        want = _engine_linear(art, f"{pre}.{lin}", codes, scale, total)
        assert np.array_equal(_bits(outs[f"{pre}.{lin}"].reshape(want.shape).half()), _bits(want)), lin
        entry = art.manifest["layers"][f"{pre}.{lin}"]
        old_lin = QServeLinear(entry["format"], _int_weight(art, f"{pre}.{lin}")[1], *entry["shape"], None)
        xf = inp.float()
        rms = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * torch.from_numpy(w).float()
        assert (_bits(old_lin(rms).half()) != _bits(want)).any(), lin
    gate = outs[f"{pre}.mlp.gate_proj"].reshape(x.shape[0], -1).half().numpy()
    up = outs[f"{pre}.mlp.up_proj"].reshape(x.shape[0], -1).half().numpy()
    act = engine.silu_and_mul(gate, up)
    codes, scale = engine.quantize(act)
    want = _engine_linear(art, f"{pre}.mlp.down_proj", codes, scale, engine.token_sum(act) if with_sum else None)
    assert np.array_equal(_bits(outs[f"{pre}.mlp.down_proj"].reshape(want.shape).half()), _bits(want))


def test_an_artifact_only_dccs_runtime_takes_keeps_the_models_norms(artifacts):
    """The engine's fused kernels are put in only where QServe's engine runs the artifact (manifest engines)."""
    from dcc.runtime.artifact import load_artifact
    from dcc.runtime.reference import build_model

    art = load_artifact(artifacts[4])
    assert "qserve" in art.manifest["engines"]
    art.manifest["engines"] = ["dcc-runtime"]
    layer = build_model(art).model.layers[0]
    assert not isinstance(layer.input_layernorm, QServeNorm) and not isinstance(layer.mlp.act_fn, QServeSiLU)
    assert layer.self_attn.q_proj.act_input == "quant"


def test_the_gpu_model_runs_the_engines_kernels_where_the_engine_runs_the_artifact(artifacts):
    """build_qserve_cuda_model (built here on the CPU, not run): every fused norm, SiLU and W4A8 linear of an
    artifact QServe runs takes the engine's kernels (MUFU instructions); an artifact only dcc's runtime takes none."""
    from dcc.runtime.artifact import load_artifact
    from dcc.targets.qserve.cuda import W4A8Linear, build_qserve_cuda_model

    for engines, want in ((None, True), (["dcc-runtime"], False)):
        art = load_artifact(artifacts[4])
        if engines is not None:
            art.manifest["engines"] = engines
        model = build_qserve_cuda_model(art, "cpu")
        lins = [m for m in model.modules() if isinstance(m, W4A8Linear)]
        fused = [m for m in model.modules() if isinstance(m, (QServeNorm, QServeSiLU))]
        assert len(lins) == 14 and all(m.engine == want for m in lins)
        assert len(fused) == (6 if want else 0) and all(m.engine for m in fused)
        assert {m.act_input for m in lins} == ({"norm", "quant"} if want else {"quant"})
