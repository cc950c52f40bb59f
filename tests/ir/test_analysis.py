"""Dataflow analysis on captured blocks: tiny random-init decoder layers of six families, hand-written blocks that the
analysis must refuse, typed nodes and the IR dumps (text, JSON, ONNX)."""
import functools
import json

import pytest
import torch

from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.ir.analysis import analyse
from dcc.ir.capture import capture
from dcc.ir.dump import Dumper
from dcc.ir.graph import AnalysisError, Block
from dcc.passes.rtn import RtnConfig

from tiny_models import (INT4_G32, analysed_block, calib_ids, capture_first_layer, decoder_config,  # noqa: F401
                         one_thread)

VOCAB = 64

# family -> (config, expected activation of the MLP)
CONFIGS = {
    "llama": lambda: (decoder_config("llama", vocab=VOCAB, hidden=64, heads=4, kv_heads=2), "silu"),
    "qwen2": lambda: (decoder_config("qwen2", vocab=VOCAB, hidden=32, heads=4, kv_heads=1), "silu"),
    "mistral": lambda: (decoder_config("mistral", vocab=VOCAB, hidden=64, heads=8, kv_heads=4), "silu"),
    "gemma": lambda: (decoder_config("gemma", vocab=VOCAB, hidden=32, heads=4, kv_heads=4, head_dim=16), "gelu"),
    # head_dim * heads (64) differs from hidden (32): the head geometry must come from the captured shapes
    "qwen3": lambda: (decoder_config("qwen3", vocab=VOCAB, hidden=32, heads=4, kv_heads=2, head_dim=16), "silu"),
    "opt": lambda: (decoder_config("opt", vocab=VOCAB, hidden=32, heads=4), "relu"),
}


def _captured(family, batch=2, seq=8):
    cfg, act = CONFIGS[family]()
    layer, gm, params, args, kwargs = capture_first_layer(cfg, calib_ids(1, vocab=VOCAB, shape=(batch, seq)))
    block = analysed_block(layer, gm, params)
    return block, cfg, act, (args, kwargs)


@pytest.fixture(scope="module")
def captured():
    return functools.cache(_captured)


def _names(family):
    if family == "opt":
        return dict(norm1="self_attn_layer_norm", norm2="final_layer_norm", o="self_attn.out_proj", ups=["fc1"],
                    gate=None, down="fc2", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj")
    return dict(norm1="input_layernorm", norm2="post_attention_layernorm", o="self_attn.o_proj", ups=["mlp.up_proj"],
                gate="mlp.gate_proj", down="mlp.down_proj", q="self_attn.q_proj", k="self_attn.k_proj",
                v="self_attn.v_proj")


FAMILIES = list(CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_groups(captured, family):
    block, cfg, _, _ = captured(family)
    n = _names(family)
    groups = {g.norm: g for g in block.norms}
    assert set(groups) == {n["norm1"], n["norm2"]}
    assert sorted(groups[n["norm1"]].linears) == sorted([n["q"], n["k"], n["v"]])
    assert sorted(groups[n["norm2"]].linears) == sorted(n["ups"] + ([n["gate"]] if n["gate"] else []))
    for g in groups.values():
        assert g.weight == f"{g.norm}.weight"
        assert block.param(g.weight).shape == (cfg.hidden_size,)
        if family == "opt":
            assert (g.kind, g.bias, g.offset) == ("layer", f"{g.norm}.bias", 0.0)
        else:
            assert g.kind == "rms" and g.bias is None
            # Gemma's norm multiplies by (1 + w): the analysis must read the constant from the graph
            assert g.offset == (1.0 if family == "gemma" else 0.0)
    for lin in n["q"], n["k"], n["v"]:
        assert block.norm_of(lin) is groups[n["norm1"]]
    assert block.norm_of(n["o"]) is None and block.norm_of(n["down"]) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_group(captured, family):
    block, cfg, _, _ = captured(family)
    n = _names(family)
    assert len(block.attentions) == 1
    a = block.attentions[0]
    assert (a.q, a.k, a.v, a.o) == (n["q"], n["k"], n["v"], n["o"])
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (heads, kv, head_dim)
    assert block.linears[a.q].out_features == a.num_heads * a.head_dim
    assert block.linears[a.v].out_features == a.num_kv_heads * a.head_dim
    assert block.linears[a.o].in_features == a.num_heads * a.head_dim
    assert a.rope is (family != "opt")
    names = {nd.name for nd in block.nodes}
    assert a.q_node in names and a.k_node in names


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_group(captured, family):
    block, cfg, act, _ = captured(family)
    n = _names(family)
    assert len(block.mlps) == 1
    m = block.mlps[0]
    assert (m.ups, m.gate, m.down, m.act) == (n["ups"], n["gate"], n["down"], act)
    # gated MLPs scale the up side; relu is positively homogeneous, so OPT's fc1 -> fc2 is smoothable too
    assert m.smoothable is True
    assert block.linears[m.down].in_features == block.linears[m.ups[0]].out_features


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream(captured, family):
    block, _, _, _ = captured(family)
    n = _names(family)
    assert block.residual is not None
    assert block.residual.writers == [n["o"], n["down"]]
    assert block.residual.readers == [n["norm1"], n["norm2"]]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_every_linear_found_with_shapes(captured, family):
    block, _, _, _ = captured(family)
    mods = {name: m for name, m in block.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(block.linears) == set(mods)
    for name, lin in block.linears.items():
        assert (lin.out_features, lin.in_features) == tuple(mods[name].weight.shape)
        assert lin.has_bias == (mods[name].bias is not None)


# ---------------------------------------------------------------------------------------- blocks it must refuse

class _CumsumBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(torch.cumsum(x, -1))


class _Conv1DBlock(torch.nn.Module):
    """GPT-2 style: the weight is a bare parameter [in, out] multiplied with @, no nn.Linear."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x + x @ self.weight


class _AddmmBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))
        self.bias = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, 16), self.weight).view(x.shape)


class _TransposedParamBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x + x @ self.weight.T


def _analyse_module(module, prefix="custom.0"):
    x = torch.randn(2, 4, 16)
    gm, params = capture(module, (x,), {})
    block = Block(0, prefix, module)
    analyse(block, gm, params)
    return block


def test_unplaceable_linear_raises_naming_it():
    with pytest.raises(AnalysisError) as e:
        _analyse_module(_CumsumBlock())
    msg = str(e.value)
    assert "custom.0" in msg and "linear fc" in msg and "cumsum" in msg


def test_unplaceable_linear_allowed_when_not_strict():
    module = _CumsumBlock()
    x = torch.randn(2, 4, 16)
    gm, params = capture(module, (x,), {})
    block = Block(0, "custom.0", module)
    analyse(block, gm, params, strict=False)
    assert list(block.linears) == ["fc"] and block.norms == [] and block.mlps == []


@pytest.mark.parametrize("cls", [_Conv1DBlock, _AddmmBlock])
def test_parameter_matmul_outside_linear_raises(cls):
    with pytest.raises(AnalysisError, match="multiplies by a parameter outside nn.Linear") as e:
        _analyse_module(cls())
    assert "custom.0" in str(e.value)


def test_transposed_parameter_matmul_raises():
    with pytest.raises(AnalysisError):
        _analyse_module(_TransposedParamBlock())


# ------------------------------------------------------------------------------------------------ typed nodes

def test_typed_nodes(captured):
    block, _, _, _ = captured("llama")
    kinds = {n.kind for n in block.nodes}
    assert {"linear", "norm", "attention", "activation", "input", "param", "output"} <= kinds
    call_nodes = [n for n in block.gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(block.nodes) == len(list(block.gm.graph.nodes)) > 0
    assert sum(n.kind == "output" for n in block.nodes) == 1
    linear_nodes = [n for n in block.nodes if n.kind == "linear"]
    assert len(linear_nodes) == len(block.linears) == 7
    # the owning module (nn_module_stack) of each linear call is the linear itself
    assert sorted(n.module for n in linear_nodes) == sorted(block.linears)
    params = {n.target for n in block.nodes if n.kind == "param"}
    assert {f"{name}.weight" for name in block.linears} <= params
    by_name = {n.name: n for n in block.nodes}
    for n in block.nodes:
        assert all(i in by_name for i in n.inputs)
    hidden = next(n for n in block.nodes if n.kind == "input" and n.name == "hidden_states")
    assert hidden.shape == (2, 8, 64) and hidden.dtype == "float32"
    assert len(call_nodes) == sum(n.kind not in ("input", "param", "output") for n in block.nodes)


# ------------------------------------------------------------------------------------------------------ dumps

def test_dumper_writes_text_json_per_step_and_onnx(captured, tmp_path):
    import onnx

    block, _, _, (args, kwargs) = captured("llama")
    spec = INT4_G32
    for lin in block.linears.values():
        lin.spec = spec
    float_state = {k: v.clone() for k, v in block.module.state_dict().items()}
    try:
        ctx = BlockContext(block, args, kwargs, torch.device("cpu"))
        dumper = Dumper(tmp_path / "dump")
        run_block(block, [Step("rtn", RtnConfig())], ctx, PassTiming(), dumper)
    finally:  # the block is shared by other tests of this module: restore its float state
        for lin in block.linears.values():
            lin.spec = lin.qtensor = None
            lin.stats.clear()
        block.module.load_state_dict(float_state)

    d = tmp_path / "dump" / block.prefix
    assert sorted(p.name for p in d.iterdir()) == ["00_capture.json", "00_capture.txt", "01_rtn.json", "01_rtn.txt"]
    rec0 = json.loads((d / "00_capture.json").read_text())
    rec1 = json.loads((d / "01_rtn.json").read_text())
    assert rec0["step"] == 0 and rec0["pass"] == "capture" and rec0["result"] is None
    assert rec1["step"] == 1 and rec1["pass"] == "rtn" and rec1["result"]["changed"] is True
    assert set(rec1["linears"]) == set(block.linears)
    # specs are assigned before the pipeline runs: the capture dump shows them, not yet quantized
    assert all(not l["quantized"] and l["spec"] == spec.short() for l in rec0["linears"].values())
    assert all("weight_sqnr_db" not in l for l in rec0["linears"].values())
    assert all(l["quantized"] and l["spec"] == spec.short() for l in rec1["linears"].values())
    assert all("weight_sqnr_db" in l for l in rec1["linears"].values())
    assert len(rec1["nodes"]) == len(block.nodes)
    assert [g["norm"] for g in rec1["norms"]] == [g.norm for g in block.norms]
    assert rec1["residual"]["writers"] == block.residual.writers

    txt = (d / "01_rtn.txt").read_text()
    assert txt.startswith(f"# {block.prefix} after step 1: rtn")
    assert "attention q=self_attn.q_proj" in txt and "heads 4/2 x 16" in txt
    # the listing's spec column is 28 characters wide (the full spec is in the JSON)
    assert all(spec.short()[:28] in line for line in txt.splitlines() if line.startswith("self_attn.q_proj "))
    for lin in block.linears:
        assert lin in txt

    onnx_files = list((tmp_path / "dump").glob("*.onnx"))
    assert [p.name for p in onnx_files] == [f"{block.prefix}.onnx"]
    model = onnx.load(str(onnx_files[0]))
    onnx.checker.check_model(model, full_check=False)
    ir_calls = [n for n in block.nodes if n.kind not in ("input", "param", "output")]
    assert len(model.graph.node) == len(ir_calls)
    assert [n.name for n in model.graph.node] == [n.name for n in ir_calls]
    assert {n.domain for n in model.graph.node} == {"dcc.aten"}
    lin_ops = [n for n in model.graph.node if n.op_type == "linear"]
    assert len(lin_ops) == len(block.linears)
    assert [o.name for o in model.graph.output] == next(n for n in block.nodes if n.kind == "output").inputs


def test_dumper_writes_onnx_once(captured, tmp_path):
    import onnx

    block, _, _, _ = captured("opt")
    dumper = Dumper(tmp_path)
    block.linears["fc2"].skip_reason = "kept in float for the test"
    try:
        dumper.dump(block, 0, "capture", None)
    finally:
        block.linears["fc2"].skip_reason = None
    txt = (tmp_path / "model.layers.0" / "00_capture.txt").read_text()
    fc2_line = next(line for line in txt.splitlines() if line.startswith("fc2 "))
    assert "16-bit (kept in float" in fc2_line
    assert "mlp fc1 (gate None, relu) -> fc2" in txt
    other = Block(1, "model.layers.1", block.module, nodes=block.nodes)
    dumper.dump(other, 0, "capture", None)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["model.layers.0.onnx"]
    assert (tmp_path / "model.layers.1" / "00_capture.json").is_file()
    model = onnx.load(str(tmp_path / "model.layers.0.onnx"))
    assert len(model.graph.node) == sum(n.kind not in ("input", "param", "output") for n in block.nodes)
