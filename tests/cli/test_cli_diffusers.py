"""`dcc compile FOLDER --target nunchaku` on tiny random diffusers models (FLUX, SANA, Qwen-Image, Z-Image, SDXL's
UNet) from a calibration file, `dcc validate` (decoded == compiled) and `inspect`; `dcc calib record` on a tiny
FLUX pipeline with real tokenizers, and compiling the pipeline folder from prompts; the errors a user meets."""
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
from cli_util import error_line, run  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse)

CLASSES = list(td.CONFIGS)


def _linears(model, inside: bool) -> dict[str, nn.Linear]:
    from dcc.models.diffusers_folder import find_block_lists
    roots = [n for n, _ in find_block_lists(model)]
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(n.startswith(r + ".") for r in roots) == inside}


def _compile(folder, calib, out, *extra):
    return run("compile", folder, "--target", "nunchaku", "--algo", "svdquant", "--rank", "16", "--calib", calib,
               "-o", out, "-q", *extra)


@pytest.mark.parametrize("cls", CLASSES)
def test_compile_and_validate(cls, tmp_path):
    model, folder = td.save(tmp_path / "model", cls)
    calib = td.write_calib(tmp_path / "calib.safetensors", cls, samples=2)
    keep = ("--unsupported", "keep") if cls == "ZImageTransformer2DModel" else ()
    code, text = _compile(folder, calib, tmp_path / "art", *keep)
    assert code == 0, text
    m = json.loads((tmp_path / "art" / "dcc.json").read_text())
    assert m["source"]["kind"] == "diffusers" and m["source"]["architecture"] == cls
    assert m["recipe"]["calibration"]["samples"] == 2 and m["versions"]["diffusers"]
    if m["runtime"].get("nunchaku_file", {}).get("written"):
        # a class Nunchaku loads, at shapes it takes: one Nunchaku single file (test_cli_nunchaku_diffusers.py)
        assert m["engines"] == ["nunchaku", "dcc-runtime"]
        code, text = run("validate", tmp_path / "art")
        assert code == 0, text
        return
    assert m["target"] == "nunchaku" and m["engines"] == ["dcc-runtime"]
    # every linear inside the blocks has an entry (W4A4 where in_features takes 64-groups); none outside does
    inside, outside = _linears(model, True), _linears(model, False)
    assert set(m["layers"]) == set(inside)
    kept = {k for k, v in m["layers"].items() if "skip_reason" in v}
    assert kept == {k for k, l in inside.items() if l.in_features % 64}
    assert all(v["format"].startswith("nunchaku-w4a4-int4") for k, v in m["layers"].items() if k not in kept)
    with safe_open(str(tmp_path / "art" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in outside:   # embedders, time embedding, proj_out: 16-bit, as they were
            assert f.get_tensor(f"{name}.weight").dtype == torch.bfloat16
        convs = [n for n, c in model.named_modules() if isinstance(c, nn.Conv2d)]
        assert all(f.get_tensor(f"{n}.weight").dtype == torch.bfloat16 for n in convs)
    assert keys >= {f"{name}.qweight" for name in set(inside) - kept}
    code, text = run("validate", tmp_path / "art")
    n = len(inside) - len(kept)
    assert code == 0 and f"decoded weights equal the fake-quant weights: {n}/{n} layers" in text, text
    code, text = run("inspect", tmp_path / "art")
    assert code == 0 and f"{n} of {len(inside)} linears quantized" in text and "diffusers" in text


def test_same_inputs_and_seed_give_the_same_bytes(tmp_path):
    _, folder = td.save(tmp_path / "model", "SanaTransformer2DModel")
    calib = td.write_calib(tmp_path / "calib.safetensors", "SanaTransformer2DModel", samples=2)
    for out in ("a", "b"):
        code, text = _compile(folder, calib, tmp_path / out)
        assert code == 0, text
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_errors(tmp_path):
    _, folder = td.save(tmp_path / "model", "ZImageTransformer2DModel")
    calib = td.write_calib(tmp_path / "calib.safetensors", "ZImageTransformer2DModel")
    code, text = _compile(folder, calib, tmp_path / "x")
    assert code == 2 and "noise_refiner.0.feed_forward.w2: in_features 341 is not a multiple of the group size 64" \
        in error_line(text)
    other = td.write_calib(tmp_path / "flux.safetensors", "FluxTransformer2DModel")
    code, text = _compile(folder, other, tmp_path / "y", "--unsupported", "keep")
    assert code == 2 and "calibration inputs of FluxTransformer2DModel, but the model is ZImageTransformer2DModel" \
        in error_line(text)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    code, text = _compile(folder, tmp_path / "prompts.txt", tmp_path / "z", "--unsupported", "keep")
    assert code == 2 and "without its pipeline" in error_line(text) and "dcc calib record" in text
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if not td.TOKENIZER.is_dir():
        pytest.skip(f"needs ../shared/assets ({td.TOKENIZER} is absent)")
    folder = td.save_flux_pipeline(tmp_path_factory.mktemp("pipe") / "flux")
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("a red fox in the snow\n\na lighthouse at dusk\n")
    return folder, prompts


def test_calib_record_then_compile(pipeline, tmp_path):
    folder, prompts = pipeline
    out = tmp_path / "calib.safetensors"
    code, text = run("calib", "record", folder, "--prompts", prompts, "-o", out, "--steps", "3", "--timesteps", "2",
                     "--height", "8", "--width", "8", "--max-sequence-length", "8")
    assert code == 0, text
    from dcc.models.diffusers_calib import CalibInputs
    c = CalibInputs.load(out)
    # 2 prompts x 2 recorded steps (the first and the last of 3), at 8x8 pixels: 4x4 packed latents
    assert c.cls == "FluxTransformer2DModel" and c.samples == 4
    assert c.layout["img_ids"] == "shared" and tuple(c.tensors["hidden_states"].shape) == (4, 16, 16)
    assert tuple(c.tensors["encoder_hidden_states"].shape) == (4, 8, 64)
    t = c.tensors["timestep"]
    assert t[0] == t[1] and t[2] == t[3] and t[0] > t[2]    # one timestep per call, the noisier first
    code, text = run("calib", "record", folder, "--prompts", prompts, "-o", out)
    assert code == 2 and "exists (use --force" in error_line(text)
    code, text = _compile(folder, out, tmp_path / "art")
    assert code == 0, text
    m = json.loads((tmp_path / "art" / "dcc.json").read_text())
    assert m["source"]["pipeline"] == "flux" and m["source"]["model"] == "transformer"
    code, text = run("validate", tmp_path / "art")
    assert code == 0, text


def test_compile_a_pipeline_from_prompts(pipeline, tmp_path):
    folder, prompts = pipeline
    code, text = _compile(folder, prompts, tmp_path / "art", "--calib-chunks", "2")
    assert code == 0, text
    assert "recorded 8 samples" in text   # 2 prompts x every step of the default 4-step schedule
    m = json.loads((tmp_path / "art" / "dcc.json").read_text())
    assert m["recipe"]["calibration"]["samples"] == 2 and m["recipe"]["calibration"]["file"] == "prompts.txt"


def test_calib_record_of_a_unet_pipeline(pipeline, tmp_path):
    folder = td.save_sdxl_pipeline(tmp_path / "sdxl")
    out = tmp_path / "calib.safetensors"
    code, text = run("calib", "record", folder, "--prompts", pipeline[1], "-o", out, "--steps", "2", "--height", "16",
                     "--width", "16")
    assert code == 0, text
    from dcc.models.diffusers_calib import CalibInputs
    c = CalibInputs.load(out)
    # classifier-free guidance: each call holds the unconditional and the conditional batch (2 + 2 rows), 2 steps
    assert c.cls == "UNet2DConditionModel" and c.samples == 8
    assert set(c.layout) == {"sample", "timestep", "encoder_hidden_states", "added_cond_kwargs/text_embeds",
                             "added_cond_kwargs/time_ids"}
    assert tuple(c.tensors["sample"].shape) == (8, 4, 16, 16) and c.tensors["timestep"].shape == (8,)
    kwargs = c.forward_kwargs()
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
