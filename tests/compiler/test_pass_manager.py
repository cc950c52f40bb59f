"""The pass manager: requires/ensures checked before a run, failures re-raised naming the pass, the block and the
passes before it, the debug verifier between passes, timing and dumps per pass."""
import json
from dataclasses import dataclass

import pytest
import torch

from dcc.compiler.context import BlockContext
from dcc.ir.capture import capture
from dcc.compiler.pass_manager import PassError, PassTiming, Step, check_pipeline, run_block, verify_block
from dcc.ir.dump import Dumper
from dcc.ir.graph import Block, Linear
from dcc.passes import base
from dcc.passes.base import Pass, PassConfig, PassResult, get_pass, register
from dcc.passes.rtn import RtnConfig

from tiny_models import INT4_G32 as SPEC


@dataclass(frozen=True)
class _NoOptions(PassConfig):
    pass


@dataclass(frozen=True)
class _ScaleConfig(PassConfig):
    factor: float = 2.0

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")


class _NeedsRotation(Pass):
    __module__ = "tests.throwaway.zz_test_needs_rotation"
    Config = _NoOptions
    requires = ("rotated",)

    def run(self, block, config, ctx):
        return PassResult(False, "nothing")


class _Rotates(Pass):
    __module__ = "tests.throwaway.zz_test_rotates"
    Config = _NoOptions
    ensures = ("rotated",)

    def run(self, block, config, ctx):
        return PassResult(False, "pretends to rotate")


class _Boom(Pass):
    __module__ = "tests.throwaway.zz_test_boom"
    Config = _NoOptions

    def run(self, block, config, ctx):
        raise RuntimeError("kaboom in the test pass")


class _Scale(Pass):
    """Multiplies fc's weight by a factor: a pass that changes weights (and can poison them with inf)."""
    __module__ = "tests.throwaway.zz_test_scale"
    Config = _ScaleConfig

    def run(self, block, config, ctx):
        w = block.linear_module("fc").weight
        w.data = w.data * config.factor
        return PassResult(True, f"scaled by {config.factor}", {"factor": config.factor})


_THROWAWAY = (_NeedsRotation, _Rotates, _Boom, _Scale)


@pytest.fixture(autouse=True)
def throwaway_passes():
    get_pass("rtn")   # load the real passes first, so that the registry is complete before ours go in
    for cls in _THROWAWAY:
        register(cls)
    yield
    for cls in _THROWAWAY:
        base.REGISTRY.pop(cls.name, None)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.fc(x)


def _block(prefix="model.layers.3"):
    module = _Tiny()
    block = Block(3, prefix, module)
    block.linears = {"fc": Linear("fc", 64, 32, False, spec=SPEC)}
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    block.gm = capture(module, (x,), {})[0]
    return block, BlockContext(block, (x,), {}, torch.device("cpu"))


def test_registration_under_module_file_name():
    assert _Boom.name == "zz_test_boom" and get_pass("zz_test_boom") is _Boom
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Other", (Pass,), {"__module__": "x.zz_test_boom"}))
    with pytest.raises(KeyError, match="unknown pass 'no_such_pass'"):
        get_pass("no_such_pass")


def test_requires_without_earlier_ensures_fails_the_pipeline():
    with pytest.raises(PassError) as e:
        check_pipeline([Step("rtn", RtnConfig()), Step("zz_test_needs_rotation", _NoOptions())])
    msg = str(e.value)
    assert "step 1" in msg and "zz_test_needs_rotation" in msg and "rotated" in msg
    # the fact must come from an *earlier* pass: after it is too late
    with pytest.raises(PassError):
        check_pipeline([Step("zz_test_needs_rotation", _NoOptions()), Step("zz_test_rotates", _NoOptions())])
    check_pipeline([Step("zz_test_rotates", _NoOptions()), Step("zz_test_needs_rotation", _NoOptions())])


def test_failure_names_pass_block_and_passes_before():
    block, ctx = _block()
    steps = [Step("zz_test_scale", _ScaleConfig()), Step("rtn", RtnConfig()), Step("zz_test_boom", _NoOptions())]
    with pytest.raises(PassError) as e:
        run_block(block, steps, ctx, PassTiming())
    msg = str(e.value)
    assert "pass zz_test_boom failed" in msg
    assert "model.layers.3" in msg
    assert "after zz_test_scale, rtn" in msg
    assert "RuntimeError: kaboom in the test pass" in msg
    assert "(no --dump-dir)" in msg
    assert isinstance(e.value.__cause__, RuntimeError)


def test_failure_of_the_first_pass_says_none_before_and_names_dump(tmp_path):
    block, ctx = _block("model.layers.0")
    with pytest.raises(PassError) as e:
        run_block(block, [Step("zz_test_boom", _NoOptions())], ctx, PassTiming(), Dumper(tmp_path))
    msg = str(e.value)
    assert "after (none)" in msg and "model.layers.0" in msg
    assert str(tmp_path / "model.layers.0") in msg
    # the capture dump was written before the failing pass ran
    assert (tmp_path / "model.layers.0" / "00_capture.json").is_file()


def test_debug_verifier_catches_non_finite_weights():
    block, ctx = _block()
    steps = [Step("zz_test_scale", _ScaleConfig(factor=float("inf")))]
    with pytest.raises(PassError, match=r"pass zz_test_scale on block model.layers.3: fc.weight has NaN/inf"):
        run_block(block, steps, ctx, PassTiming(), debug=True)
    block, ctx = _block()
    run_block(block, steps, ctx, PassTiming(), debug=False)   # without debug the verifier does not run
    assert not torch.isfinite(block.module.fc.weight).all()


def test_verify_block_checks_quantized_shape():
    block, ctx = _block()
    run_block(block, [Step("rtn", RtnConfig())], ctx, PassTiming(), debug=True)
    verify_block(block, "here")
    block.linears["fc"].qtensor.codes = block.linears["fc"].qtensor.codes[:, :32]
    with pytest.raises(PassError, match="here: fc quantized shape"):
        verify_block(block, "here")


def test_timing_records_each_pass_and_results_in_order(tmp_path):
    block, ctx = _block()
    timing = PassTiming()
    steps = [Step("zz_test_scale", _ScaleConfig(factor=0.5)), Step("zz_test_rotates", _NoOptions()),
             Step("rtn", RtnConfig())]
    results = run_block(block, steps, ctx, timing, Dumper(tmp_path))
    assert set(timing.seconds) == {"zz_test_scale", "zz_test_rotates", "rtn"}
    assert all(s >= 0 for s in timing.seconds.values())
    assert [r.message for r in results[:2]] == ["scaled by 0.5", "pretends to rotate"]
    assert all(isinstance(r.details["seconds"], float) for r in results)
    assert results[2].changed and block.linears["fc"].qtensor is not None
    # a second block accumulates into the same timing
    before = dict(timing.seconds)
    block2, ctx2 = _block("model.layers.4")
    run_block(block2, steps, ctx2, timing)
    assert all(timing.seconds[k] >= before[k] for k in before)
    # one dump per step, numbered in order, each recording its pass
    d = tmp_path / "model.layers.3"
    names = sorted(p.name for p in d.glob("*.json"))
    assert names == ["00_capture.json", "01_zz_test_scale.json", "02_zz_test_rotates.json", "03_rtn.json"]
    rec = json.loads((d / "01_zz_test_scale.json").read_text())
    assert rec["pass"] == "zz_test_scale" and rec["result"]["details"]["factor"] == 0.5


def test_changed_weights_invalidate_collected_inputs():
    """A pass that reports changed=True makes the context collect linear inputs again."""
    block, ctx = _block()
    first = ctx.inputs("fc")
    run_block(block, [Step("zz_test_scale", _ScaleConfig())], ctx, PassTiming())
    assert ctx.inputs("fc") is not first
    second = ctx.inputs("fc")
    run_block(block, [Step("zz_test_rotates", _NoOptions())], ctx, PassTiming())
    assert ctx.inputs("fc") is second


def test_step_round_trip():
    step = Step("zz_test_scale", _ScaleConfig(factor=3.0))
    d = step.to_dict()
    assert d == {"pass": "zz_test_scale", "config": {"factor": 3.0}}
    assert Step.from_dict(d) == step
    with pytest.raises(ValueError, match="factor must be > 0"):
        Step.from_dict({"pass": "zz_test_scale", "config": {"factor": -1.0}})
    with pytest.raises(ValueError, match="unknown option"):
        Step.from_dict({"pass": "zz_test_scale", "config": {"scale": 1.0}})


def test_pipeline_order_is_checked_from_the_passes_declarations():
    """reorder after clip, a weight change after quantization and a second quantization are refused before any
    work; every pipeline the targets build is accepted."""
    from dcc.passes.clip import ClipConfig
    from dcc.passes.gptq import GptqConfig
    from dcc.passes.reorder import ReorderConfig
    from dcc.passes.smooth import SmoothConfig
    from dcc.targets.base import targets
    with pytest.raises(PassError, match=r"reorder\) must come before step 0 \(clip\)"):
        check_pipeline([Step("clip", ClipConfig()), Step("reorder", ReorderConfig()), Step("rtn", RtnConfig())])
    with pytest.raises(PassError, match=r"smooth\) must come before step 0 \(rtn\)"):
        check_pipeline([Step("rtn", RtnConfig()), Step("smooth", SmoothConfig(alpha=0.5))])
    with pytest.raises(PassError, match=r"gptq\) must come before step 0 \(rtn\)"):
        check_pipeline([Step("rtn", RtnConfig()), Step("gptq", GptqConfig())])
    for t in targets().values():
        for algo in t.algos:
            for bits in (4, 8):
                for gs in (None, 0, 128):
                    try:
                        opts = t.options(algo=algo, bits=bits, group_size=gs)
                    except ValueError:
                        continue   # a combination the target does not take
                    check_pipeline(t.pipeline(opts))


class _ClaimsToPreserve(_Scale):
    """Scales fc's weight (changes the function) but declares that it preserves it."""
    __module__ = "tests.throwaway.zz_test_claims"
    preserves_function = True


def test_the_manager_checks_function_preservation_under_debug():
    register(_ClaimsToPreserve)
    try:
        block, ctx = _block()
        with pytest.raises(PassError, match=r"zz_test_claims on block model.layers.3.*changed by .* does not preserve"):
            run_block(block, [Step("zz_test_claims", _ScaleConfig(factor=2.0))], ctx, PassTiming(), debug=True)
        block, ctx = _block()   # a factor of 1 keeps the function: the measured error is recorded in the result
        res = run_block(block, [Step("zz_test_claims", _ScaleConfig(factor=1.0))], ctx, PassTiming(), debug=True)
        assert res[0].details["output_rel_err"] == 0.0
        block, ctx = _block()   # without --debug and without a verify option, nothing is checked
        run_block(block, [Step("zz_test_claims", _ScaleConfig(factor=2.0))], ctx, PassTiming())
    finally:
        base.REGISTRY.pop("zz_test_claims", None)


class _BadPrologue(_Rotates):
    __module__ = "tests.throwaway.zz_test_bad_prologue"

    def model_prologue(self, lm, config, ctx):
        raise RuntimeError("no embeddings here")


def test_model_steps_run_through_the_manager(tmp_path):
    """Prologues and epilogues are timed, dumped under dump_dir/model/, and their failures name pass and phase."""
    from dcc.compiler.pass_manager import run_model_steps
    from dcc.ir.dump import Dumper

    class _Done(_Rotates):
        __module__ = "tests.throwaway.zz_test_done"

        def model_epilogue(self, lm, config, ctx):
            return PassResult(True, "folded something", {"what": "head"})

    for cls in (_BadPrologue, _Done):
        register(cls)
    try:
        timing = PassTiming()
        changed = run_model_steps("epilogue", [Step("zz_test_done", _NoOptions())], None, None, timing,
                                  Dumper(tmp_path))
        assert changed == ["zz_test_done"] and "zz_test_done" in timing.seconds
        rec = (tmp_path / "model" / "epilogue_01_zz_test_done.json").read_text()
        assert '"folded something"' in rec and '"head"' in rec
        with pytest.raises(PassError, match=r"pass zz_test_bad_prologue failed in its model prologue.*no embeddings"):
            run_model_steps("prologue", [Step("zz_test_bad_prologue", _NoOptions())], None, None, PassTiming())
    finally:
        for cls in (_BadPrologue, _Done):
            base.REGISTRY.pop(cls.name, None)
