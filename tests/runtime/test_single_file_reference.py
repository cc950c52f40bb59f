"""dcc/runtime/reference.py on Nunchaku single-file artifacts (dcc/targets/nunchaku/read_back.py): tiny FLUX (legacy
and V2 names), SDXL and Qwen-Image transformers compiled to one svdq-int4_r16.safetensors rebuild; each W4A4 dcc
linear's module is bit-equal to the layer the dcc-named layout stores for the same compiled weights; the read-back
inverts the file's renames, row orders and AdaNorm +1 exactly; FLUX's two namings give bit-equal outputs; and each
block errs as much as the compiler measured."""
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
from dcc.runtime.reference import build_model  # noqa: E402
from dcc.runtime.validate import compare_with_float  # noqa: E402
from dcc.targets.nunchaku import naming  # noqa: E402
from dcc.targets.nunchaku.emit import pack_linear  # noqa: E402
from dcc.targets.nunchaku.read_back import FusedPart, _names, read_back  # noqa: E402

CASES = {"flux": ("FluxTransformer2DModel", "legacy"), "flux-v2": ("FluxTransformer2DModel", "v2"),
         "sdxl": ("UNet2DConditionModel", None), "qwen": ("QwenImageTransformer2DModel", None)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny model folder and calibration file per class (both FLUX namings compile the same model)."""
    made = {}

    def get(cls):
        if cls not in made:
            tmp = tmp_path_factory.mktemp(cls)
            _, folder = td.save(tmp / "model", cls)
            made[cls] = (folder, td.write_calib(tmp / "calib.safetensors", cls, samples=2), tmp)
        return made[cls]
    return get


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request, sources):
    """(artifact folder, source folder, calibration file) of a single-file artifact."""
    cls, flux = CASES[request.param]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder, calib, tmp = sources(cls)
        extra = ()
        if flux == "v2":
            recipe = tmp / "v2.json"
            recipe.write_text(json.dumps({"target": "nunchaku", "options": {"flux": "v2"}}))
            extra = ("--recipe", recipe)
        out = tmp / f"art-{request.param}"
        if not out.exists():
            code, text = tda.compile_single_file(folder, calib, out, *extra)
            assert code == 0, text
    finally:
        torch.set_num_threads(n)
    return out, folder, calib




def test_rebuilds_and_each_block_errs_as_compiled(compiled):
    """The reference of the file, against the float model: close in output, and each block's error on its own inputs
    is the one the compiler recorded for its simulated block, to within 5% (as for the dcc-named layout,
    test_diffusers_reference.py: the simulation runs the float32 tensors outside the quantized layers)."""
    art_dir, folder, calib = compiled
    art = load_artifact(art_dir)
    model, fm = build_model(art), LazyModel(folder).materialize_all()
    tda.assert_blocks_err_as_compiled(art, model, fm, calib)
    cmp = compare_with_float(art, fm, CalibInputs.load(calib), blocks=LazyModel(folder).block_prefixes)
    assert 1e-4 < cmp["output_rel_err"] < 0.1 and cmp["output_cosine"] > 0.99
    # every layer of the manifest reports but the split parts, partial sums with no float linear to compare with
    parts = {p for ps in read_back(art).splits.values() for p in ps}
    assert set(cmp["layers"]) == set(art.manifest["layers"]) - parts
    if art.manifest["source"]["architecture"] == "FluxTransformer2DModel":
        assert len(parts) == 4


def test_each_w4a4_layer_is_its_dcc_named_layer_bit_for_bit(compiled):
    """Each W4A4 dcc linear (a part of a fused or split stored layer) computes, bit for bit, what the dcc-named
    layout's module computes for the same compiled layer: its rows of codes, scales, branch up and bias, with the
    layer's smoothing and branch down, packed as that layout packs them and rebuilt by its format's reference."""
    art_dir, _, _ = compiled
    art = load_artifact(art_dir)
    rb = read_back(art)
    parts = {p: m for p, m in rb.modules.items() if isinstance(m, FusedPart)}
    assert set(parts) == {p for p, e in art.manifest["layers"].items()
                          if (e.get("stored") or {}).get("kind") == "w4a4"} and parts
    g = torch.Generator().manual_seed(0)
    for path, part in parts.items():
        n, k = art.manifest["layers"][path]["shape"]
        assert (part.out_features, part.in_features) == (n, k)
        own = _dcc_named(art, path, part)
        x = torch.randn(3, 5, k, generator=g)
        assert torch.equal(part(x), own(x)), path
        assert torch.equal(part.weight, own.weight), path


def _dcc_named(art, path: str, part: FusedPart):
    """The module the dcc-named layout builds for W4A4 layer `path` of the same compile (its rows, packed so)."""
    f, rows = part.fused, part.rows
    n, k = art.manifest["layers"][path]["shape"]
    bias = f.stored_bias[rows] if f.stored_bias is not None else None
    t = pack_linear(f.wcodes[rows], f.wscales[rows], f.smooth, f.lora_down, f.lora_up[rows], bias, f.dtype)
    return art.format_of(path).reference(t, n, k, bias)


def test_whole_model_with_dcc_named_modules_is_bit_equal(compiled):
    """The rebuilt model with every W4A4 part swapped for its dcc-named module gives the same output, bit for bit."""
    art_dir, _, calib = compiled
    art = load_artifact(art_dir)
    batch = CalibInputs.load(calib)
    got = DiffusersModel().outputs(build_model(art), batch)
    model = build_model(art)
    for path, m in list(model.named_modules()):
        if isinstance(m, FusedPart):
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, _dcc_named(art, path, m))
    assert not any(isinstance(m, FusedPart) for m in model.modules())
    assert torch.equal(DiffusersModel().outputs(model, batch), got)


def test_read_back_inverts_the_file_exactly(compiled):
    """naming.stored_param of every read-back 16-bit name is the file's key (same tensor), and naming.stored_bias /
    stored_rows of every read-back AWQ or dense layer give the file's bias and rows back (the +1 folded again)."""
    art_dir, _, _ = compiled
    art = load_artifact(art_dir)
    rb, names = read_back(art), _names(art)
    by_prefix = {sl.prefix: sl for sl in names.layers}
    stored_keys = {key for v in art.manifest["runtime"]["nunchaku_file"]["layers"].values()
                   for key in v["tensors"].values()}
    plain = {src: t for src, t in rb.tensors.items() if names.stored_param(src) is not None}
    assert {names.stored_param(src) for src in plain} == set(art.tensors.keys()) - stored_keys
    assert all(torch.equal(t, art.tensors.get(names.stored_param(src))) for src, t in plain.items())
    if names.model_class == "NunchakuFluxTransformer2dModel":   # the legacy C++ block's renames, undone
        assert any(".attn.norm_q." in src and names.stored_param(src) != src for src in plain)
    groups = {}
    for path, e in art.manifest["layers"].items():
        if (e.get("stored") or {}).get("kind") in ("awq", "dense"):
            groups.setdefault(e["stored"]["prefix"], []).append(path)
    assert bool(groups) == (art.manifest["source"]["architecture"] != "UNet2DConditionModel")   # SDXL: no AdaNorm
    for prefix, paths in groups.items():
        sl, view = by_prefix[prefix], art.manifest["runtime"]["nunchaku_file"]["layers"][prefix]
        paths = sorted(paths, key=lambda p: [q for q in sl.parts].index(p))
        if view["kind"] == "dense":
            w = naming.stored_rows(sl, [rb.tensors[f"{p}.weight"] for p in paths])
            assert torch.equal(w, art.tensors.get(view["tensors"]["weight"])), prefix
        if view["bias"]:
            b = naming.stored_bias(sl, [rb.tensors[f"{p}.bias"] for p in paths], view["shape"][0])
            assert torch.equal(b.to(art.dtype), art.tensors.get(view["tensors"]["bias"])), prefix


def test_flux_namings_give_bit_equal_outputs(sources):
    """The legacy (C++) and V2 (diffusers) names of the same compile read back to the same model: equal outputs."""
    folder, calib, tmp = sources("FluxTransformer2DModel")
    outs = []
    for name in ("flux", "flux-v2"):
        art = tmp / f"art-{name}"
        if not art.exists():
            pytest.skip(f"{art} not compiled by the parametrized tests")
        outs.append(DiffusersModel().outputs(build_model(load_artifact(art)), CalibInputs.load(calib)))
    assert torch.equal(outs[0], outs[1])


def test_a_target_without_read_back_is_refused_in_one_line(compiled, monkeypatch):
    """Where the artifact's target cannot read its own file back, the reference refuses in one line naming a layer
    and the stored layer that holds it (check_rebuildable without reading anything; build_model alike)."""
    from dcc.runtime.artifact import ArtifactError
    from dcc.runtime.reference import check_rebuildable
    from dcc.targets.base import Target
    from dcc.targets.nunchaku.target import Nunchaku
    art = load_artifact(compiled[0])
    check_rebuildable(art)   # the nunchaku target reads its file back
    monkeypatch.setattr(Nunchaku, "read_back", Target.read_back)
    with pytest.raises(ArtifactError, match=r"stored in the engine's own file \(e\.g\. .+ lives in .+\), which its "
                                            r"target 'nunchaku' cannot read back"):
        check_rebuildable(art)
    with pytest.raises(ArtifactError, match="cannot read back"):
        build_model(art)
