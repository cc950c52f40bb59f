"""rtn: Before/After on a tiny saved Llama compiled block by block through the sequential compiler."""
import pytest
import torch
from safetensors.torch import load_file

from dcc.api import block0_inputs
from dcc.compiler.sequential import compile_blocks
from dcc.compiler.pass_manager import Step
from dcc.ir.formats import quantize_tensor
from dcc.models.loader import LazyModel
from dcc.passes.base import get_pass
from dcc.passes.rtn import Rtn, RtnConfig

from tiny_models import INT4_G32 as SPEC, calib_ids, decoder_config, one_thread, save_tiny  # noqa: F401 (one_thread)

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_rtn")
    save_tiny(path, decoder_config("llama", vocab=VOCAB))
    return path


def _ids():
    return calib_ids(1, vocab=VOCAB)


def _assign_all(block):
    for lin in block.linears.values():
        lin.spec = SPEC


def test_registered_under_file_name():
    assert get_pass("rtn") is Rtn and Rtn.name == "rtn"
    assert RtnConfig.from_dict(RtnConfig().to_dict()) == RtnConfig()
    with pytest.raises(ValueError, match="unknown option"):
        RtnConfig.from_dict({"bits": 4})


def _snapshot(block):
    """What the tests check after the block is released: weights, quantized tensors, stats."""
    return {n: {"w": block.linear_module(n).weight.data.clone(), "lin": lin} for n, lin in block.linears.items()}


@pytest.fixture(scope="module")
def compiled(tiny_llama):
    """One sequential RTN compile of both blocks; each block is also given a second RTN run, which must be a no-op."""
    blocks, reruns = {}, []

    def on_block(block, *ctx):
        blocks[block.prefix] = _snapshot(block)
        res = Rtn().run(block, RtnConfig(), ctx[0] if ctx else None)
        reruns.append((res, {n: torch.equal(block.linear_module(n).weight.data, blocks[block.prefix][n]["w"])
                             for n in block.linears}))

    lm = LazyModel(tiny_llama)
    res = compile_blocks(lm, [Step("rtn", RtnConfig())], block0_inputs(lm, _ids()), _assign_all, on_block=on_block,
                         progress=False)
    return lm, res, blocks, reruns


def test_rtn_quantizes_every_linear_exactly(tiny_llama, compiled):
    lm, res, blocks, _ = compiled
    saved = load_file(tiny_llama / "model.safetensors")
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    assert res.blocks == 2 and set(res.timing.seconds) == {"rtn"}
    for prefix, lins in blocks.items():
        assert set(lins) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        for name, rec in lins.items():
            lin, w = rec["lin"], rec["w"]
            qt = lin.qtensor
            assert qt is not None and qt.spec == SPEC
            # the module's weight is exactly what the artifact will decode to
            assert torch.equal(w, qt.dequantize(w.dtype))
            assert qt.codes.dtype == torch.int16 and qt.codes.shape == w.shape
            assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) <= 15
            assert qt.scale.dtype == torch.float16 and qt.scale.shape == (lin.out_features, lin.in_features // 32)
            assert qt.zero.shape == qt.scale.shape and int(qt.zero.min()) >= 0 and int(qt.zero.max()) <= 15
            # round to nearest: within half a step of the float weight (plus the fp16 rounding of scale/zero)
            orig = saved[f"{prefix}.{name}.weight"]
            assert not torch.equal(orig, w)
            step = qt.scale.float().repeat_interleave(32, dim=1)
            assert bool(((orig - w).abs() <= 0.5 * step + 1e-3 * orig.abs().amax()).all())
            # a fresh RTN of the float weight gives the same codes (clip 1.0, no other pass ran)
            assert torch.equal(quantize_tensor(orig, SPEC).codes, qt.codes)
            assert lin.stats["weight_sqnr_db"] > 10
    # weights are released after on_block: memory stays one block at a time
    assert all(p.is_meta for b in lm.blocks for p in b.parameters())


def test_rtn_twice_is_a_no_op(compiled):
    _, _, _, reruns = compiled
    assert len(reruns) == 2
    for res, unchanged in reruns:
        assert res.changed is False and res.details["sqnr_db"] == {}
        assert all(unchanged.values()) and len(unchanged) == 7


def test_rtn_skips_unspecified_linears_and_uses_clip_ratios(tiny_llama):
    """down_proj has no spec (kept in float); the others carry clip ratios 0.7 (as the clip pass would set them),
    which shrink the range RTN quantizes with."""
    saved = load_file(tiny_llama / "model.safetensors")
    checked = []

    def assign(block):
        for name, lin in block.linears.items():
            if name == "mlp.down_proj":
                lin.skip_reason = "kept in float by the test"
            else:
                lin.spec = SPEC
                lin.clip = torch.full((lin.out_features, lin.in_features // 32), 0.7)

    def on_block(block, *_ctx):
        down = block.linears["mlp.down_proj"]
        assert down.qtensor is None and down.spec is None
        assert torch.equal(block.linear_module("mlp.down_proj").weight.data,
                           saved[f"{block.prefix}.mlp.down_proj.weight"])
        for name, lin in block.linears.items():
            if name == "mlp.down_proj":
                continue
            orig = saved[f"{block.prefix}.{name}.weight"]
            assert torch.equal(lin.qtensor.codes, quantize_tensor(orig, SPEC, 0.7).codes)
            assert not torch.equal(lin.qtensor.codes, quantize_tensor(orig, SPEC, 1.0).codes)
            # the clipped range saturates the extremes: the largest weights are now outside the decoded range
            w = block.linear_module(name).weight.data
            assert float(w.abs().max()) < float(orig.abs().max())
        checked.append(block.index)

    lm = LazyModel(tiny_llama)
    compile_blocks(lm, [Step("rtn", RtnConfig())], block0_inputs(lm, _ids()), assign, on_block=on_block,
                   progress=False)
    assert checked == [0, 1]
