"""The single-file side of the Nunchaku target for diffusers models (assign.py, emit_file.py): the plan (which
models are written as Nunchaku's file, and why not), the per-layer kinds, the manifest's row mapping for every row
order of expected_keys (concat, AdaNorm interleave, SANA's padded sections), and decode_stored against packed
tensors (W4A4 INT4 / NVFP4 and AWQ W4A16, exact)."""
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import tiny_diffusers as td  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse)

from dcc.ir.formats import dequantize, quantize_tensor  # noqa: E402
from dcc.models.loader import LazyModel  # noqa: E402
from dcc.targets.nunchaku import expected_keys as ek  # noqa: E402
from dcc.targets.nunchaku import layout_awq, naming  # noqa: E402
from dcc.targets.nunchaku.assign import awq_spec, make_plan, unsplit  # noqa: E402
from dcc.targets.nunchaku.emit import FORMAT, pack_linear  # noqa: E402
from dcc.targets.nunchaku.stored import FORMAT_AWQ, decode_stored, row_runs  # noqa: E402
from dcc.targets.nunchaku.pipeline import weight_spec  # noqa: E402


def _lm(tmp_path, cls, **over):
    _, folder = td.save(tmp_path / cls, cls, **over)
    return LazyModel(str(folder))


# ---------------------------------------------------------------------------------------------- the plan

def test_plan_of_a_class_with_a_loader(tmp_path):
    plan = make_plan(_lm(tmp_path, "FluxTransformer2DModel"), "int4", 32)
    assert plan.active and plan.why is None and plan.names.model_class == "NunchakuFluxTransformer2dModel"
    assert plan.kinds["transformer_blocks.0.norm1.linear"] == ek.AWQ
    assert plan.kinds["single_transformer_blocks.1.proj_out"] == ek.W4A4
    assert "proj_out" not in plan.kinds   # outside the blocks: 16-bit
    # the split parts of proj_out: the attention columns are out_proj, the MLP's mlp_fc2
    p = "single_transformer_blocks.0"
    assert plan.stored_of(f"{p}.proj_out_cat0").prefix == f"{p}.out_proj"
    assert plan.stored_of(f"{p}.proj_out_cat1").prefix == f"{p}.mlp_fc2"
    assert plan.stored_of(f"{p}.attn.to_k").prefix == f"{p}.qkv_proj"
    assert unsplit(f"{p}.proj_out_cat1") == f"{p}.proj_out" and unsplit("a.b_catx") == "a.b_catx"
    v2 = make_plan(_lm(tmp_path / "v2", "FluxTransformer2DModel"), "int4", 32, "v2")
    assert v2.names.model_class == "NunchakuFluxTransformer2DModelV2"
    assert v2.stored_of(f"{p}.proj_out_cat0").prefix == f"{p}.attn.to_out"


def test_plan_says_why_a_model_stays_dcc_runtime(tmp_path):
    sana = make_plan(_lm(tmp_path, "SanaTransformer2DModel"), "int4", 32)
    assert not sana.active and "ff.conv_inverted: NunchakuSanaTransformer2DModel stores this convolution" in sana.why
    zimage = make_plan(_lm(tmp_path, "ZImageTransformer2DModel"), "int4", 32)   # dim 128: SwiGLU hidden 341
    assert not zimage.active and "N = 682 and K = 128 must be multiples of 128" in zimage.why
    # a causal LM (or any other kind): today's dcc-runtime artifact, nothing to explain
    llm = make_plan(SimpleNamespace(model=torch.nn.Linear(64, 64), adapter=SimpleNamespace(kind="causal-lm")),
                    "int4", 32)
    assert not llm.active and llm.why is None


def test_awq_spec_is_gemv_awqs():
    spec = awq_spec("bfloat16")
    assert (spec.dtype, spec.symmetric, spec.group_size, spec.zero_mode) == ("int4", False, 64, "scaled")


# ---------------------------------------------------------------------------------------------- row mapping

_LAYERS = [sl for spec in ek.MODELS.values() for block in spec.blocks.values() for sl in block.layers
           if sl.kind in (ek.W4A4, ek.AWQ, ek.DENSE)]


@pytest.mark.parametrize("rows", ["concat", "adanorm", "sana_qkv", "sana_glu"])
def test_row_runs_pick_each_part_back_out_of_the_stored_rows(rows):
    layer = next(sl for sl in _LAYERS if sl.rows == rows)
    d = 160 if rows.startswith("sana") else 96       # SANA: 5 heads of 32, padded to 256 (and H' to 128 for glu)
    outs = [d] * len(layer.parts) if rows != "adanorm" else [d * layer.splits]
    if rows == "sana_glu":
        outs = [2 * d]
    sl = naming.StoredLayer("blk." + layer.name, layer, tuple(f"blk.{p}" for p in layer.parts))
    parts = [torch.randn(n, 3) for n in outs]
    stored = naming.stored_rows(sl, parts)
    runs = row_runs(sl, outs)
    for part, r in zip(parts, runs):
        got = stored[torch.cat([torch.arange(a, b, s) for a, b, s in r])]
        assert torch.equal(got, part)
    if rows == "adanorm":   # row d*S + j = diffusers row j*D + d: one strided run per chunk
        assert runs == [[[j, 96 * layer.splits + j, layer.splits] for j in range(layer.splits)]]


# ---------------------------------------------------------------------------------------------- decode_stored

class _Index(dict):
    def get(self, key, dtype=None):   # the runtime's TensorIndex.get
        return self[key]


def test_decode_stored_w4a4_gives_each_parts_rows():
    torch.manual_seed(0)
    spec = weight_spec("int4", "bfloat16")
    ws = [torch.randn(128, 256), torch.randn(64, 256)]
    qts = [quantize_tensor(w, spec) for w in ws]
    codes, scales = torch.cat([q.codes for q in qts]), torch.cat([q.scale for q in qts])
    t = pack_linear(codes, scales, None, None, None, None, torch.bfloat16)
    idx = _Index({f"s.to_qkv.{k}": v for k, v in t.items()})
    tensors = {k: f"s.to_qkv.{k}" for k in ("qweight", "wscales")}
    for i, (q, rows) in enumerate(zip(qts, [[[0, 128, 1]], [[128, 192, 1]]])):
        entry = {"format": FORMAT, "stored": {"prefix": "s.to_qkv", "shape": [192, 256], "rows": rows,
                                              "tensors": tensors}}
        assert torch.equal(decode_stored(idx, f"part{i}", entry), q.dequantize(torch.float32))


def test_decode_stored_awq_is_gemv_awqs_16_bit_weight():
    torch.manual_seed(0)
    spec = awq_spec("bfloat16")
    w = torch.randn(96, 128)
    qt = quantize_tensor(w, spec)
    want = dequantize(qt.codes, qt.scale, qt.zero, spec, torch.bfloat16)   # q * s + (-(z * s)) in bf16
    sl = naming.StoredLayer("b.norm.linear", ek.Layer("norm.linear", ek.AWQ, ("norm.linear",), rows="adanorm",
                                                      splits=3), ("b.norm.linear",))
    stored = [naming.stored_rows(sl, [x]) for x in (qt.codes, qt.scale, qt.zero)]
    wscales, wzeros = layout_awq.pack_scales(stored[1], stored[2], dtype=torch.bfloat16)
    idx = _Index({"b.norm.linear.qweight": layout_awq.pack_qweight(stored[0]), "b.norm.linear.wscales": wscales,
                  "b.norm.linear.wzeros": wzeros})
    entry = {"format": FORMAT_AWQ, "stored": {"prefix": "b.norm.linear", "shape": [96, 128],
                                              "rows": row_runs(sl, [96])[0],
                                              "tensors": {k: f"b.norm.linear.{k}" for k in
                                                          ("qweight", "wscales", "wzeros")}}}
    got = decode_stored(idx, "b.norm.linear", entry)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
