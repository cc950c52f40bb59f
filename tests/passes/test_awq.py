"""awq: Before/After on tiny decoder layers whose inputs have outlier channels (a norm gain with a few 20x entries).
The scales must leave the float block unchanged, and with quantization they must beat plain RTN."""
import copy

import pytest
import torch
import transformers as T

from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.ir.analysis import analyse
from dcc.ir.capture import capture, typed_nodes
from dcc.ir.formats import QuantSpec
from dcc.ir.graph import Block
from dcc.passes.awq import Awq, AwqConfig
from dcc.passes.base import get_pass

SPEC = QuantSpec("int4", symmetric=False, group_size=32, scale_dtype="float16", zero_mode="scaled")
VOCAB = 128
OUTLIERS = [3, 17, 40]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Stop(Exception):
    pass


def _config(family):
    if family == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=64)
    cls = {"llama": T.LlamaConfig, "gemma": T.GemmaConfig}[family]
    extra = {"head_dim": 16} if family == "gemma" else {}
    return cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **extra)


def _template(family):
    """A captured layer 0 with outlier input channels and its calibration inputs; copied for every run."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa").eval()
    layer = (model.model.decoder.layers if family == "opt" else model.model.layers)[0]
    with torch.no_grad():
        for name, mod in layer.named_modules():
            if "norm" in name and getattr(mod, "weight", None) is not None:
                # Gemma's gain is (1 + w): an effective gain of 20 everywhere the norm output has an outlier
                mod.weight[OUTLIERS] = 19.0 if family == "gemma" else 20.0
    caught = {}

    def hook(mod, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Stop

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    kwargs = {k: v for k, v in caught["kwargs"].items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    args = caught["args"] or (kwargs.pop("hidden_states"),)
    gm, params = capture(layer, args, kwargs)
    return layer, gm, params, args, kwargs


@pytest.fixture(scope="module")
def templates():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _template(family)
        return cache[family]
    return get


def _fresh(template):
    """A float copy of the layer as an analysed Block with int4 g32 specs, and its calibration context."""
    layer, gm, params, args, kwargs = template
    block = Block(0, "model.layers.0", copy.deepcopy(layer))
    block.gm, block.nodes = gm, typed_nodes(gm, params)
    analyse(block, gm, params)
    for lin in block.linears.values():
        lin.spec = SPEC
    return block, BlockContext(block, args, kwargs, torch.device("cpu"))


def _run(template, names):
    """Run the passes; returns (relative error of the block output vs the float block, results, block)."""
    block, ctx = _fresh(template)
    _, _, ref = ctx.block_io()
    ref = ref.clone()
    results = run_block(block, [Step(n, get_pass(n).Config()) for n in names], ctx, PassTiming())
    out = ctx.forward()
    return float((out - ref).norm() / ref.norm()), results, block


def test_config_validation_and_round_trip():
    assert get_pass("awq") is Awq
    cfg = AwqConfig(grid=8, patterns=("x",), max_tokens=64)
    assert AwqConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"grid": 0}, {"max_tokens": 8}):
        with pytest.raises(ValueError, match="awq"):
            AwqConfig(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        AwqConfig.from_dict({"alpha": 0.5})


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_awq_scales_preserve_the_float_block(templates, family):
    """Only the awq step (no quantization): weights and norm gains change, the block's function does not."""
    t = templates(family)
    before = {k: v.clone() for k, v in t[0].state_dict().items()}
    err, results, block = _run(t, ["awq"])
    res = results[0]
    assert res.changed is True
    groups = res.details["groups"]
    # norm -> q/k/v, norm -> up(/gate), v -> o and up -> down are all found and scaled
    assert len(groups) == 4 and res.details["skipped"] == []
    assert any(g["alpha"] > 0 for g in groups.values())
    after = block.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("norm" in k for k in changed) and any("down_proj" in k or "fc2" in k for k in changed)
    assert all(lin.qtensor is None for lin in block.linears.values())
    assert err < 1e-5, f"{family}: awq changed the float block output by {err:.2e} (relative)"


def test_awq_search_never_worse_than_unscaled(templates):
    """Each group's chosen scale scores at most the loss of s = 1 (the grid starts at alpha = 0)."""
    _, results, _ = _run(templates("llama"), ["awq"])
    groups = results[0].details["groups"]
    for name, g in groups.items():
        assert g["loss"] <= g["loss_rtn"] * (1 + 1e-9), name
    # with 20x outlier channels, the norm groups' search finds a real gain
    norm_groups = [g for k, g in groups.items() if "layernorm" in k]
    assert norm_groups and all(g["loss"] < g["loss_rtn"] for g in norm_groups)


def test_awq_clip_rtn_beats_rtn_on_outlier_channels(templates):
    t = templates("llama")
    err_rtn, _, _ = _run(t, ["rtn"])
    err_awq, _, _ = _run(t, ["awq", "rtn"])
    err_full, results, block = _run(t, ["awq", "clip", "rtn"])
    assert [r.changed for r in results] == [True, False, True]
    assert all(lin.qtensor is not None for lin in block.linears.values())
    # every weight is exactly its quantized value after the full pipeline
    for name, lin in block.linears.items():
        w = block.linear_module(name).weight.data
        assert torch.equal(w, lin.qtensor.dequantize(w.dtype))
    assert err_awq < err_rtn
    assert err_full < err_rtn
    assert err_full < 0.9 * err_rtn, (err_rtn, err_awq, err_full)


def test_awq_skips_norm_without_gain():
    """A norm with no gain cannot absorb a scale: the group is reported as skipped, and nothing changes."""
    class NoGain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(64, elementwise_affine=False)
            self.fc = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    module = NoGain()
    x = torch.randn(2, 16, 64)
    gm, params = capture(module, (x,), {})
    block = Block(0, "custom.0", module)
    analyse(block, gm, params)
    block.linears["fc"].spec = SPEC
    ctx = BlockContext(block, (x,), {}, torch.device("cpu"))
    w0 = module.fc.weight.detach().clone()
    res = Awq().run(block, AwqConfig(), ctx)
    assert res.changed is False and res.details["groups"] == {}
    assert len(res.details["skipped"]) == 1 and "no gain" in res.details["skipped"][0]
    assert torch.equal(module.fc.weight, w0)
