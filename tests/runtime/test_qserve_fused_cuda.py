"""GPU tests of csrc/w4a8/quant_fused.cu, QServe's fused norm + quantization and silu_and_mul executed in the engine's
order, against dcc's CPU emulation (dcc/targets/qserve/numerics_fused.py). With the correctly rounded stand-ins
(approx = 0) every code, scale, sum and fp16 output is bit-identical; with the engine's approximate instructions
(approx = 1, QServe's own bits) only the few values the module docstring counts may differ, and by one step."""
from __future__ import annotations

import json

import pytest
import torch

from dcc.targets.qserve import numerics, numerics_fused
from cuda_util import require_family

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ext():
    from dcc.runtime.cuda import w4a8_ops
    require_family("w4a8")
    return w4a8_ops.ext()


def _residual(t: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * torch.exp2(torch.randint(-2, 3, (t, 1), generator=g).float())
    x[:, torch.randperm(h, generator=g)[:8]] *= 40
    return (x + torch.randn(t, 1, generator=g)).half()


def _norm_quant(ext, x16, w16, eps, with_sum, approx):
    m, h = x16.shape
    x, w = x16.cuda().contiguous(), w16.cuda().contiguous()
    xq = torch.empty(m, h, dtype=torch.int8, device="cuda")
    scale = torch.empty(m, dtype=torch.float16, device="cuda")
    ssum = torch.empty(m, dtype=torch.float16, device="cuda") if with_sum else None
    ext.norm_quant(x.data_ptr(), w.data_ptr(), eps, xq.data_ptr(), scale.data_ptr(),
                   0 if ssum is None else ssum.data_ptr(), m, h, approx, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return xq.cpu().float(), scale.cpu(), None if ssum is None else ssum.cpu()


def _silu_mul(ext, g16, u16, approx):
    m, d = g16.shape
    g, u = g16.cuda().contiguous(), u16.cuda().contiguous()
    out = torch.empty(m, d, dtype=torch.float16, device="cuda")
    ext.silu_mul(g.data_ptr(), u.data_ptr(), out.data_ptr(), m, d, approx, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out.cpu()


def _steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp16 ulps (ordered bit patterns)."""
    def ordered(t):
        v = t.to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
        return torch.where(v >= 0, v, -(v & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("h,with_sum", [(96, True), (1000, True), (1536, True), (4096, True), (4096, False)])
def test_norm_quant_matches_the_cpu_emulation(ext, h, with_sum):
    x, w = _residual(33, h, seed=h), (0.5 + torch.rand(h, generator=torch.Generator().manual_seed(1))).half()
    want = numerics_fused.rms_norm_general(x.float(), w.float(), 1e-5, with_sum)
    codes, scale, total = _norm_quant(ext, x, w, 1e-5, with_sum, approx=0)
    assert torch.equal(codes, want.codes)
    assert torch.equal(scale.view(torch.int16), want.scale.reshape(-1).view(torch.int16))
    if with_sum:
        assert torch.equal(total.view(torch.int16), want.sum.reshape(-1).view(torch.int16))
    codes, scale, total = _norm_quant(ext, x, w, 1e-5, with_sum, approx=1)   # the engine's MUFU instructions
    assert (codes - want.codes).abs().max() <= 1
    assert int((codes != want.codes).sum()) <= max(2, codes.numel() // 10 ** 5)
    assert int(_steps(scale, want.scale.reshape(-1)).max()) <= 1
    if with_sum:
        assert int(_steps(total, want.sum.reshape(-1)).max()) <= 2


def test_silu_mul_matches_the_cpu_emulation(ext):
    g = torch.Generator().manual_seed(7)
    gate = (torch.randn(64, 1536, generator=g) * 4)
    gate[0, :6] = torch.tensor([-100.0, -88.5, -87.0, 0.0, 300.0, 65504.0])
    gate, up = gate.half(), (torch.randn(64, 1536, generator=g) * 2).half()
    want = numerics_fused.silu_and_mul(gate.float(), up.float()).half()
    assert torch.equal(_silu_mul(ext, gate, up, approx=0).view(torch.int16), want.view(torch.int16))
    got = _silu_mul(ext, gate, up, approx=1)
    steps = _steps(got, want)
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 1e-3


def test_engine_instructions_at_scale(ext):
    """4096 tokens x 4096 channels: how many codes (and scales, sums, fp16 activations) the engine's approximate
    instructions change against the correctly rounded stand-ins (printed; the module docstring bounds them)."""
    x, w = _residual(4096, 4096, seed=3), torch.ones(4096, dtype=torch.float16)
    exact = _norm_quant(ext, x, w, 1e-5, True, approx=0)
    engine = _norm_quant(ext, x, w, 1e-5, True, approx=1)
    g = torch.Generator().manual_seed(4)
    gate, up = (torch.randn(4096, 4096, generator=g) * 2).half(), torch.randn(4096, 4096, generator=g).half()
    a0, a1 = _silu_mul(ext, gate, up, approx=0), _silu_mul(ext, gate, up, approx=1)
    q0, q1 = numerics.quantize_tokens(a0.float()), numerics.quantize_tokens(a1.float())
    counts = {"norm_codes": int((exact[0] != engine[0]).sum()), "scales": int((exact[1] != engine[1]).sum()),
              "sums": int((exact[2] != engine[2]).sum()), "silu_fp16": int((a0 != a1).sum()),
              "silu_codes": int((q0.codes != q1.codes).sum()), "of": x.numel(), "tokens": x.shape[0]}
    print("\nQServe fused ops, engine instructions vs stand-ins:", json.dumps(counts))
    assert counts["norm_codes"] <= x.numel() // 10 ** 5 and counts["silu_codes"] <= x.numel() // 10 ** 5


@pytest.mark.parametrize("fmt", ["qserve-w4a8-per-channel", "qserve-w8a8"])
def test_gpu_linear_quantizes_norm_outputs_as_the_reference(ext, fmt):
    """W4A8Linear with act_input "norm" (a QServeNorm's float32 output) gives the CPU reference layer's outputs."""
    from dcc.targets.qserve.cuda import W4A8Linear
    from dcc.targets.qserve.layout import pack_qweight
    from dcc.targets.qserve.reference import QServeLinear

    n, k = 256, 1536
    g = torch.Generator().manual_seed(9)
    s1 = (0.002 + 0.02 * torch.rand(n, generator=g)).half()
    if fmt == "qserve-w8a8":
        t = {"weight": torch.randint(-127, 128, (n, k), generator=g).to(torch.int8), "dequant_scale": s1}
    else:
        t = {"qweight": pack_qweight(torch.randint(0, 16, (n, k), generator=g)), "s1_scales": s1,
             "s1_szeros": (s1.float() * 7.5).half()}
    y = numerics_fused.layernorm_f32(_residual(40, k, seed=5).float(), torch.ones(k), 1e-5)
    ref = QServeLinear(fmt, t, n, k, None)
    ref.act_input = "norm"
    want = ref(y)
    got = W4A8Linear(fmt, t, n, k, None, "cuda", act_input="norm")(y.cuda()).cpu()
    assert torch.equal(got.half().view(torch.int16), want.half().view(torch.int16))


# ------------------------------------------------------------- the runtime's use of them: engine bits on the GPU

@pytest.mark.parametrize("h,with_sum", [(96, True), (1000, True), (4096, True), (1536, False)])
@pytest.mark.parametrize("approx", [0, 1])
def test_norm_cut_in_two_equals_the_fused_kernel(ext, h, with_sum, approx):
    """norm_y then quant_normed (the runtime's graph keeps the norm and the linears apart) give norm_quant's codes,
    scales and sums bit for bit; with the stand-ins, norm_y's float32 values are the CPU emulation's."""
    from dcc.runtime.cuda import qserve_fused_ops as ops
    x, w = _residual(29, h, seed=h + 1), (0.5 + torch.rand(h, generator=torch.Generator().manual_seed(2))).half()
    fused = _norm_quant(ext, x, w, 1e-6, with_sum, approx)
    y = ops.norm_y(x.cuda(), w, 1e-6, approx=bool(approx))
    codes, scale, total = (None if t is None else t.cpu() for t in ops.quant_normed(y, with_sum, approx=bool(approx)))
    assert torch.equal(codes.float(), fused[0])
    assert torch.equal(scale.view(torch.int16), fused[1].view(torch.int16))
    if with_sum:
        assert torch.equal(total.view(torch.int16), fused[2].view(torch.int16))
    if not approx:
        want = numerics_fused.layernorm_f32(x.float(), w.float(), 1e-6)
        assert torch.equal(y.cpu().view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("k", [576, 1536, 4096])
def test_standalone_engine_quantization_matches_the_cpu_emulation(ext, k):
    """quant_engine is QServe's standalone quant_kernel_fuse_sum: with the stand-in reciprocal, codes, scales and the
    float32 sum in the engine's order equal numerics.quantize_tokens; with MUFU.RCP a code moves by at most one."""
    from dcc.runtime.cuda import qserve_fused_ops as ops
    x = _residual(37, k, seed=k)
    want = numerics.quantize_tokens(x.float())
    codes, scale, total = (t.cpu() for t in ops.quant_engine(x.cuda(), True, approx=False))
    assert torch.equal(codes.float(), want.codes)
    assert torch.equal(scale.view(torch.int16), want.scale.reshape(-1).view(torch.int16))
    assert torch.equal(total.view(torch.int16), want.sum.reshape(-1).view(torch.int16))
    codes, scale, _ = (None if t is None else t.cpu() for t in ops.quant_engine(x.cuda(), False, approx=True))
    assert (codes.float() - want.codes).abs().max() <= 1
    assert torch.equal(scale.view(torch.int16), want.scale.reshape(-1).view(torch.int16))


def test_graph_ops_run_the_kernels_on_the_gpu(ext):
    """dcc::qserve_norm / qserve_silu: on a GPU with engine=False the CPU's bits, with engine=True the kernels' MUFU
    results (the norm's bit for bit; the SiLU's within one fp16 step of the stand-ins, which they equalled on every
    value of an H200 run)."""
    from dcc.runtime.cuda import qserve_fused_ops as ops
    from dcc.targets.qserve.ops import qserve_norm, qserve_silu
    x, w = _residual(64, 1536, seed=11).float(), torch.rand(1536, generator=torch.Generator().manual_seed(3)) + 0.5
    cpu = qserve_norm(x, w, 1e-5, False)
    assert torch.equal(qserve_norm(x.cuda(), w.cuda(), 1e-5, False).cpu().view(torch.int32), cpu.view(torch.int32))
    mufu = qserve_norm(x.cuda(), w.cuda(), 1e-5, True)
    assert torch.equal(mufu.view(torch.int32), ops.norm_y(x.cuda(), w, 1e-5, approx=True).view(torch.int32))
    g = torch.randn(4096, 1536, generator=torch.Generator().manual_seed(4)) * 3
    s_cpu, s_mufu = qserve_silu(g, False), qserve_silu(g.cuda(), True).cpu()
    assert torch.equal(qserve_silu(g.cuda(), False).cpu().view(torch.int32), s_cpu.view(torch.int32))
    assert int((s_mufu != s_cpu).sum()) < g.numel() // 1000 and int(_steps(s_mufu, s_cpu).max()) <= 1


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from tiny_lm_artifacts import qserve_engine_artifacts
    return qserve_engine_artifacts(tmp_path_factory)


def _engine_out(art, name, codes, scale, total):
    """fp16 [M, N] of QServe's GEMM on these int8 codes (exact integer GEMM, the engine's float32 epilogue)."""
    from dcc.targets.qserve import layout
    entry = art.manifest["layers"][name]
    n, k = entry["shape"]
    t = {key: art.tensors.get(f"{name}.{key}") for key in ("qweight", "s1_scales", "s1_szeros", "weight",
                                                          "dequant_scale") if f"{name}.{key}" in art.tensors.keys()}
    ints = t["weight"] if "weight" in t else layout.unpack_qweight(t["qweight"], n, k)
    psum = codes.cpu().to(torch.int64) @ ints.to(torch.int64).T
    if "s1_szeros" in t:
        return numerics.epilogue_per_channel(psum, t["s1_scales"].double().view(1, -1),
                                             t["s1_szeros"].double().view(1, -1), scale.cpu().view(-1, 1),
                                             total.cpu().view(-1, 1)).half()
    return numerics.epilogue_scaled(psum, t["dequant_scale"].double().view(1, -1), scale.cpu().view(-1, 1)).half()


@pytest.mark.parametrize("bits", [4, 8])
def test_the_artifacts_gpu_model_computes_the_engines_bits(ext, artifacts, bits):
    """`validate --device cuda`'s model of an artifact QServe runs: layer 0's q_proj, gate_proj and down_proj
    outputs equal QServe's kernels applied to the same layer inputs -- the fused norm (norm_quant with MUFU),
    silu_and_mul (MUFU), the standalone quantization (MUFU.RCP), the integer GEMM and its epilogue -- bit for bit."""
    from dcc.runtime.artifact import load_artifact
    from dcc.runtime.graph_blocks import linear_outputs
    from dcc.runtime.cuda import qserve_fused_ops as ops
    from dcc.targets.qserve.cuda import build_qserve_cuda_model

    art = load_artifact(artifacts[bits])
    model = build_qserve_cuda_model(art, "cuda")
    layer = model.model.layers[0]
    assert layer.input_layernorm.engine and layer.mlp.act_fn.engine and layer.self_attn.q_proj.engine
    ids = torch.randint(0, art.config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5)).cuda()
    with linear_outputs(model) as outs, torch.no_grad():
        model(ids, use_cache=False)
    h = art.config["hidden_size"]
    x = model.model.embed_tokens(ids).reshape(-1, h).detach().half()
    pre, eps, with_sum = "model.layers.0", art.config["rms_norm_eps"], bits == 4
    mid = (x.float() + outs[f"{pre}.self_attn.o_proj"].reshape(x.shape)).half()
    for norm, lin, inp in (("input_layernorm", "self_attn.q_proj", x), ("post_attention_layernorm", "mlp.gate_proj",
                                                                          mid)):
        w = art.tensors.get(f"{pre}.{norm}.weight").half()
        codes, scale, total = _norm_quant(ext, inp.cpu(), w, eps, with_sum, approx=1)
        want = _engine_out(art, f"{pre}.{lin}", codes, scale, total)
        got = outs[f"{pre}.{lin}"].reshape(want.shape).half().cpu()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), lin
    gate = outs[f"{pre}.mlp.gate_proj"].reshape(x.shape[0], -1).half()
    up = outs[f"{pre}.mlp.up_proj"].reshape(x.shape[0], -1).half()
    act = _silu_mul(ext, gate.cpu(), up.cpu(), approx=1).cuda()
    codes, scale, total = ops.quant_engine(act, with_sum, approx=True)
    want = _engine_out(art, f"{pre}.mlp.down_proj", codes, scale, total)
    got = outs[f"{pre}.mlp.down_proj"].reshape(want.shape).half().cpu()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
