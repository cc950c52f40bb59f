"""dcc/runtime/reference.py on diffusers artifacts: the reference model of a tiny FLUX transformer and SDXL UNet
(W4A4 SVDQuant) runs every block as its captured graph, bit-equal to running the format's modules eagerly; its
denoiser output is close to the float model's; and each block's error against the float block on the same inputs is
the error the compiler recorded for its simulated block."""
import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
import tiny_diffusers_artifacts as tda  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse)

from dcc.models.diffusers import DiffusersModel  # noqa: E402
from dcc.models.diffusers_calib import CalibInputs  # noqa: E402
from dcc.models.loader import LazyModel  # noqa: E402
from dcc.runtime.artifact import load_artifact  # noqa: E402
from dcc.runtime.graph_blocks import GraphForward  # noqa: E402
from dcc.runtime.reference import build_model  # noqa: E402
from dcc.runtime.validate import compare_with_float  # noqa: E402

CLASSES = ["FluxTransformer2DModel", "UNet2DConditionModel"]


@pytest.fixture(scope="module", params=CLASSES)
def compiled(request, tmp_path_factory):
    """(artifact folder, source folder, calibration file) of a tiny model compiled for nunchaku in dcc's runtime
    layout (tests/tiny_diffusers_artifacts.py)."""
    cls, tmp = request.param, tmp_path_factory.mktemp(request.param)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, folder = td.save(tmp / "model", cls, **(tda.UNET_192 if cls == "UNet2DConditionModel" else {}))
        calib = td.write_calib(tmp / "calib.safetensors", cls, samples=2)
        code, text = tda.compile_runtime_layout(folder, calib, tmp / "art")
    finally:
        torch.set_num_threads(n)
    assert code == 0, text
    return tmp / "art", folder, calib


def _graph_blocks(model):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), GraphForward)]




def test_blocks_run_as_graphs_bit_equal_to_eager(compiled):
    art_dir, _, calib = compiled
    art = load_artifact(art_dir)
    model = build_model(art)
    lists = json.loads((art_dir / "dcc.json").read_text())["source"]["block_lists"]
    blocks = _graph_blocks(model)
    assert len(blocks) == art.manifest["source"]["num_blocks"] == sum(len(model.get_submodule(n)) for n in lists)
    formats = [m for m in model.modules() if type(m).__name__ == "NunchakuLinear"]
    assert len(formats) == len(art.quantized_layers())
    batch = CalibInputs.load(calib)
    graph = DiffusersModel().outputs(model, batch)
    for b in blocks:
        del b.forward   # the class's forward again, with the same NunchakuLinear modules
    eager = DiffusersModel().outputs(model, batch)
    assert torch.equal(graph, eager)


def test_output_close_to_the_float_model(compiled):
    art_dir, folder, calib = compiled
    art = load_artifact(art_dir)
    lm = LazyModel(folder)
    cmp = compare_with_float(art, lm.materialize_all(), CalibInputs.load(calib), blocks=lm.block_prefixes)
    # W4A4 with a rank-16 branch on random tiny models: 1% (FLUX) to 6% (UNet) relative error in the output
    assert 1e-4 < cmp["output_rel_err"] < 0.1 and cmp["output_cosine"] > 0.99
    assert set(cmp["blocks"]) == set(lm.block_prefixes) and all(0 < v < 0.2 for v in cmp["blocks"].values())
    assert set(cmp["layers"]) == set(art.quantized_layers())
    line = DiffusersModel().describe_comparison(cmp)
    assert line.startswith("denoiser output vs the float model: rel err") and "block outputs rel err" in line


def test_block_errors_are_the_compiled_ones(compiled):
    """Each block of the reference, against the float block on the reference's own inputs, errs as much as the
    compiler measured for its simulated block (the manifest's blocks.*.output_rel_err) -- to within 5%, not bit for
    bit: the compiler's simulation runs the float32 source's tensors outside the quantized layers (the artifact
    stores them in 16 bits) and its fake-quant numerics, the reference Nunchaku's kernel numerics (measured: 0.3% to
    1.8% apart on these models)."""
    art_dir, folder, calib = compiled
    art = load_artifact(art_dir)
    model, fm = build_model(art), LazyModel(folder).materialize_all()
    tda.assert_blocks_err_as_compiled(art, model, fm, calib)
