"""Tiny diffusers artifacts in both layouts the nunchaku target writes, for the runtime tests
(tests/runtime/test_diffusers_reference.py, test_single_file_reference.py, tests/cli/test_cli_diffusers_eval.py):
dcc's runtime layout (tensors under the diffusers model's own names) and a Nunchaku single file (fused, split and
renamed layers, which dcc's CPU reference reads back through the target's read_back).

The target writes the single file for every class whose shapes its loader takes, and a dcc-runtime artifact
otherwise: a SDXL UNet 192 channels wide is one (the Python SDXL class takes W4A4 layers unpadded: N, K % 128); for
FLUX, whose C++ class pads every shape, compile_runtime_layout runs with the target's single-file plan off."""
from __future__ import annotations

import contextlib
import json

import pytest

from cli_util import run

# a SDXL UNet whose transformer blocks are 192 wide: W4A4 groups of 64 fit, Nunchaku's unpadded layers do not
UNET_192 = {"block_out_channels": (64, 192)}


@contextlib.contextmanager
def single_file_off():
    """The nunchaku target's plan inactive, as for a class without a Nunchaku loader (its artifact: dcc-runtime)."""
    try:
        from dcc.targets.nunchaku import target as nt
        from dcc.targets.nunchaku.assign import Plan
    except ImportError as e:   # the target's single-file code moved: the seam below must follow it
        pytest.skip(f"nunchaku single-file plan not found ({e})")
    if not hasattr(nt, "make_plan"):
        pytest.skip("dcc.targets.nunchaku.target.make_plan not found")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nt, "make_plan", lambda lm, *a, **k: Plan(type(lm.model).__name__, why="dcc runtime layout"))
        yield


def compile_runtime_layout(folder, calib, out, *extra) -> tuple[int, str]:
    """`dcc compile FOLDER --target nunchaku` into a dcc-runtime artifact (checked: no layer names a stored one)."""
    with single_file_off():
        code, text = run("compile", folder, "--target", "nunchaku", "--algo", "svdquant", "--rank", "16", "--calib",
                         calib, "-o", out, "-q", *extra)
    if code == 0:
        layers = json.loads((out / "dcc.json").read_text())["layers"]
        assert not any("stored" in v for v in layers.values()), "expected a dcc-runtime artifact"
    return code, text


def compile_single_file(folder, calib, out, *extra) -> tuple[int, str]:
    """`dcc compile FOLDER --target nunchaku` into a Nunchaku single-file artifact (checked: its layers name stored
    ones)."""
    code, text = run("compile", folder, "--target", "nunchaku", "--algo", "svdquant", "--rank", "16", "--calib", calib,
                     "-o", out, "-q", *extra)
    if code == 0:
        layers = json.loads((out / "dcc.json").read_text())["layers"]
        assert any("stored" in v for v in layers.values()), "expected a Nunchaku single-file artifact"
    return code, text


def joined(out):
    """Every floating tensor a block returns, flattened into one float64 vector (FLUX's blocks return two)."""
    import torch
    from torch.utils import _pytree as pytree
    return torch.cat([t.flatten() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                      and t.is_floating_point()]).double()


def assert_blocks_err_as_compiled(art, model, fm, calib) -> None:
    """Each block of the artifact's reference `model`, run on the inputs it receives, errs against the float model's
    block `fm` by what the compiler recorded for it (output_rel_err), to within 5%: the compiler simulated with the
    float32 tensors outside the quantized layers, the artifact stores them in 16 bits."""
    import torch
    from dcc.models.diffusers import DiffusersModel
    from dcc.models.diffusers_calib import CalibInputs
    seen = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, a, k, o, p=p: seen.__setitem__(p, (a, k, o)), with_kwargs=True) for p in art.manifest["blocks"]]
    DiffusersModel().outputs(model, CalibInputs.load(calib))
    for h in hooks:
        h.remove()
    assert set(seen) == set(art.manifest["blocks"])
    for p, (args, kwargs, out) in seen.items():
        with torch.no_grad():
            ref = joined(fm.get_submodule(p)(*args, **kwargs))
        err = float((joined(out) - ref).norm() / ref.norm())
        assert err == pytest.approx(art.manifest["blocks"][p]["output_rel_err"], rel=0.05), p
