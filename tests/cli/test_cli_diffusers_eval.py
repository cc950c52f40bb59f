"""`dcc eval ART --images PROMPTS --pipeline DIR` and `dcc validate ART --model DIR --inputs FILE` on a tiny FLUX
pipeline (tests/tiny_diffusers.py) whose transformer is compiled for nunchaku in dcc's runtime layout (and once as a
Nunchaku single file): the images
of the 16-bit and the artifact's transformer side by side in an HTML page with PSNR and SSIM, the denoiser's and each
block's output error; and the errors a user meets."""
import base64
import io
import json
import re

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
import tiny_diffusers_artifacts as tda  # noqa: E402
from cli_util import error_line, run  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse)

FAST = ("--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "8", "-q")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(pipeline folder, artifact of its transformer, calibration file, prompts file)."""
    if not td.TOKENIZER.is_dir():
        pytest.skip(f"needs ../shared/assets ({td.TOKENIZER} is absent)")
    tmp = tmp_path_factory.mktemp("flux_eval")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = td.save_flux_pipeline(tmp / "flux")
        # FluxPipeline decodes latents / scaling_factor + shift_factor: the tiny VAE's config leaves it None
        vae_cfg = pipe / "vae" / "config.json"
        vae_cfg.write_text(json.dumps({**json.loads(vae_cfg.read_text()), "shift_factor": 0.0}))
        calib = td.write_calib(tmp / "calib.safetensors", "FluxTransformer2DModel", samples=2)
        code, text = tda.compile_runtime_layout(pipe, calib, tmp / "art")
    finally:
        torch.set_num_threads(n)
    assert code == 0, text
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red fox in the snow\n\na lighthouse at dusk\n")
    return pipe, tmp / "art", calib, prompts


def test_eval_images(flux, tmp_path):
    pipe, art, _, prompts = flux
    html, js = tmp_path / "report.html", tmp_path / "eval.json"
    code, text = run("eval", art, "--images", prompts, "--pipeline", pipe, *FAST, "--out-html", html, "--json", js)
    assert code == 0, text
    res = json.loads(js.read_text())
    rows = res["images"]
    assert [r["prompt"] for r in rows] == ["a red fox in the snow", "a lighthouse at dusk"]
    assert res["settings"] == {"steps": 2, "seed": 0, "height": 64, "width": 64, "device": "cpu"}
    # the artifact changes the images, a little: finite PSNR, SSIM just below 1
    assert all(20 < r["psnr_db"] < 100 and 0.9 < r["ssim"] < 1 for r in rows)
    mean_psnr = sum(r["psnr_db"] for r in rows) / 2
    assert res["mean"]["psnr_db"] == pytest.approx(mean_psnr)
    assert res["mean"]["ssim"] == pytest.approx(sum(r["ssim"] for r in rows) / 2)
    assert (f"mean over 2 images (64x64, 2 steps, seed 0): PSNR {mean_psnr:.2f} dB, SSIM {res['mean']['ssim']:.4f}"
            in text)
    assert f"{'a red fox in the snow':48} {rows[0]['psnr_db']:8.2f} {rows[0]['ssim']:7.4f}" in text
    page = html.read_text()
    assert page.count("<tr><td>") == 2 and "a lighthouse at dusk" in page
    from PIL import Image
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 4 and all(Image.open(io.BytesIO(base64.b64decode(p))).size == (64, 64) for p in pngs)
    assert pngs[0] != pngs[1]   # 16-bit and artifact images differ


def test_same_seed_same_images(flux, tmp_path):
    """A second run reproduces the first exactly (seeds per image; the generator on the CPU)."""
    pipe, art, _, prompts = flux
    out = []
    for i in range(2):
        code, text = run("eval", art, "--images", prompts, "--pipeline", pipe, "--steps", "1", "--height", "16",
                         "--width", "16", "--max-sequence-length", "8", "-q", "--json", tmp_path / f"{i}.json")
        assert code == 0, text
        out.append(json.loads((tmp_path / f"{i}.json").read_text())["images"])
    assert out[0] == out[1]


def test_validate_against_the_float_model(flux, tmp_path):
    pipe, art, calib, _ = flux
    code, text = run("validate", art, "--model", pipe, "--inputs", calib, "--json", tmp_path / "v.json")
    assert code == 0, text
    rep = json.loads((tmp_path / "v.json").read_text())["float"]
    assert 0 < rep["output_rel_err"] < 0.1 and rep["output_cosine"] > 0.99
    assert list(rep["blocks"]) == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                                   "single_transformer_blocks.1"]   # in the order the forward calls them
    assert f"denoiser output vs the float model: rel err {rep['output_rel_err']:.4e}" in text
    assert re.search(r"^single_transformer_blocks\.1 +\d\.\d{4}e-0\d$", text, re.M)
    code, text = run("validate", art, "--model", pipe)
    assert code == 2 and "give --inputs CALIB" in error_line(text)


def test_errors(flux, tmp_path):
    pipe, art, _, prompts = flux
    code, text = run("eval", art)
    assert code == 2 and ("a diffusion model (FluxTransformer2DModel) is evaluated by the images of its pipeline: "
                          "give --images PROMPTS --pipeline PIPELINE_DIR") in error_line(text)
    code, text = run("eval", art, "--ppl", prompts)
    assert code == 2 and "use --images FILE --pipeline PIPELINE_DIR" in error_line(text)
    code, text = run("eval", art, "--images", prompts)
    assert code == 2 and "go together" in error_line(text)
    code, text = run("eval", art, "--images", tmp_path / "missing.txt", "--pipeline", pipe)
    assert code == 2 and "missing.txt: no such file" in error_line(text)
    code, text = run("eval", art, "--images", prompts, "--pipeline", pipe / "transformer")
    assert code == 2 and "not a diffusers pipeline folder (no model_index.json)" in error_line(text)
    code, text = run("eval", art, "--images", prompts, "--pipeline", pipe, "--out-html", tmp_path / "no" / "r.html")
    assert code == 2 and "its folder does not exist" in error_line(text)
    sdxl = td.save_sdxl_pipeline(tmp_path / "sdxl")
    code, text = run("eval", art, "--images", prompts, "--pipeline", sdxl, *FAST)
    assert code == 2 and "its denoiser is UNet2DConditionModel, but art holds a FluxTransformer2DModel" \
        in error_line(text)
    assert list(tmp_path.glob("*.html")) == []


def test_eval_and_validate_a_nunchaku_single_file(flux, tmp_path):
    """The same pipeline's transformer compiled to a Nunchaku single file: `dcc validate` (decoded weights and the
    float model) and `dcc eval --images` run on it through the target's read-back, with errors of the same size."""
    pipe, _, calib, prompts = flux
    art = tmp_path / "art"
    code, text = tda.compile_single_file(pipe, calib, art)
    assert code == 0, text
    assert "nunchaku" in json.loads((art / "dcc.json").read_text())["engines"]
    code, text = run("validate", art, "--model", pipe, "--inputs", calib, "--json", tmp_path / "v.json")
    assert code == 0, text
    rep = json.loads((tmp_path / "v.json").read_text())["float"]
    assert 0 < rep["output_rel_err"] < 0.1 and rep["output_cosine"] > 0.99
    assert list(rep["blocks"]) == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                                   "single_transformer_blocks.1"]
    code, text = run("eval", art, "--images", prompts, "--pipeline", pipe, *FAST, "--json", tmp_path / "e.json")
    assert code == 0, text
    rows = json.loads((tmp_path / "e.json").read_text())["images"]
    assert [r["prompt"] for r in rows] == ["a red fox in the snow", "a lighthouse at dusk"]
    assert all(20 < r["psnr_db"] < 100 and 0.9 < r["ssim"] < 1 for r in rows)
