"""`dcc compile DIFFUSERS_FOLDER --target nunchaku` for a class with a Nunchaku loader writes ONE Nunchaku single file
(issue 26 part 3): tiny FLUX (C++ names and, through a recipe option, V2 names), Qwen-Image, Z-Image and SDXL's UNet
compiled from a calibration file; the file read back with singlefile.read has every key, shape and dtype the class's
loader reads (expected_keys, built here from the float model, not from the emitter), its metadata, the AdaNorm rows
interleaved with the +1 folded, `dcc validate` decodes every layer from it (decoded == compiled), and the same
inputs and seed give the same bytes. SANA (4-bit convolutions) and shapes a class cannot take stay dcc-runtime."""
import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
from cli_util import run  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse)

from dcc.targets.nunchaku import expected_keys as ek  # noqa: E402
from dcc.targets.nunchaku import naming, singlefile  # noqa: E402
from dcc.targets.nunchaku.lora import fused_parts  # noqa: E402

RANK = 16
# Z-Image at dim 384 (heads of 128): its SwiGLU hidden int(384 / 3 * 8) = 1024 takes Nunchaku's 128-multiples
ZIMAGE = dict(dim=384, n_heads=3, n_kv_heads=3, axes_dims=[32, 48, 48])
CASES = {   # id -> (class, model overrides, flux names)
    "flux": ("FluxTransformer2DModel", {}, "legacy"),
    "flux-v2": ("FluxTransformer2DModel", {}, "v2"),
    "qwen": ("QwenImageTransformer2DModel", {}, None),
    "zimage": ("ZImageTransformer2DModel", ZIMAGE, None),
    "sdxl": ("UNet2DConditionModel", {}, None),
}


def _compile(tmp_path, cls, over, flux, out="art", *extra):
    folder = tmp_path / "model"
    if not folder.exists():
        td.save(folder, cls, **over)
    calib = tmp_path / "calib.safetensors"
    if not calib.exists():
        td.write_calib(calib, cls, samples=2)
    if flux == "v2":
        recipe = tmp_path / "v2.json"
        recipe.write_text(json.dumps({"target": "nunchaku", "options": {"flux": "v2"}}))
        extra = ("--recipe", recipe, *extra)
    return run("compile", folder, "--target", "nunchaku", "--algo", "svdquant", "--rank", RANK, "--calib", calib,
               "-o", tmp_path / out, "-q", *extra)


def _paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _expected(model, cls, flux, dtype=torch.bfloat16, precision="int4"):
    """What the class's loader reads, from the float model: every stored layer's tensors (expected_keys) and every
    16-bit parameter under its stored name."""
    paths = _paths(model)
    quant = [p for p, kind in naming.nunchaku_linears(cls, paths, flux or "legacy").items() if kind == ek.W4A4]
    names = naming.nunchaku_names(cls, quant, paths, flux or "legacy")
    spec = ek.model_spec(names.model_class)
    expected = {}
    for sl in names.layers:
        mods = [model.get_submodule(p) for p in sl.parts]
        n, k = naming.stored_shape(sl, {p: (m.out_features, m.in_features) for p, m in zip(sl.parts, mods)})
        bias = naming.stored_bias(sl, [m.bias for m in mods], n)
        expected.update(ek.layer_tensors(spec, sl.layer, sl.prefix, n, k, bias is not None, precision, dtype, RANK))
    for name, p in model.named_parameters():
        key = names.stored_param(name)
        if key is not None:
            expected[key] = ek.Expect(tuple(p.shape), dtype, "required")
    return names, spec, expected


@pytest.mark.parametrize("case", list(CASES))
def test_single_file_is_what_the_loader_reads_and_validates(case, tmp_path):
    cls, over, flux = CASES[case]
    code, text = _compile(tmp_path, cls, over, flux)
    assert code == 0, text
    art = tmp_path / "art"
    m = json.loads((art / "dcc.json").read_text())
    note = m["runtime"]["nunchaku_file"]
    assert m["engines"] == ["nunchaku", "dcc-runtime"] and note["written"], note
    files = [f for f in m["files"] if f.endswith(".safetensors")]
    assert files == [note["file"]] == [f"svdq-int4_r{RANK}.safetensors"]   # ONE weights file: Nunchaku's
    tensors, md = singlefile.read(art / note["file"])
    model = td.build(cls, **over)
    names, spec, expected = _expected(model, cls, flux)
    assert set(note["layers"]) == {sl.prefix for sl in names.layers}   # every stored layer, once
    assert md["model_class"] == names.model_class == note["model_class"]
    assert md["config"]["_class_name"] == cls and md["quantization_config"]["rank"] == RANK
    assert md["quantization_config"]["weight"] == {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    # every key, shape and dtype; strict: nothing the loader does not know (the legacy C++ class is lenient, and
    # still gets exactly the keys DeepCompressor writes)
    assert ek.check(tensors, expected, strict=True) == []
    assert {k for k, e in expected.items() if e.need == "required"} <= set(tensors)
    # the AdaNorm / modulation linears: AWQ W4A16, rows interleaved, +1 folded into the scale rows' bias
    awq = [sl for sl in names.layers if sl.kind == ek.AWQ]
    assert bool(awq) == (cls in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"))
    for sl in awq:
        mod = model.get_submodule(sl.parts[0])
        want = naming.stored_bias(sl, [mod.bias.detach()], mod.out_features).to(torch.bfloat16)
        assert torch.equal(tensors[f"{sl.prefix}.bias"], want), sl.prefix
        assert m["layers"][sl.parts[0]]["format"] == "nunchaku-awq-w4a16"
    # the manifest's mapping: every dcc linear of a stored layer names its prefix and rows; fused ones their parts
    layers = m["layers"]
    for sl in names.layers:
        if sl.kind != ek.W4A4 or len(sl.parts) < 2:
            continue
        entries = [layers[p] for p in sl.parts]
        assert all(e["stored"]["prefix"] == sl.prefix for e in entries)
        assert entries[0]["stored"]["fused"] == [[p, layers[p]["shape"][0]] for p in sl.parts]
        # the stored layer's own view, in lora.py's "fused" contract (source modules, rows summing to N)
        view = note["layers"][sl.prefix]
        assert fused_parts(sl.prefix, view) == [(p, s, n) for p, s, n in
                                                zip(sl.parts, *_starts([layers[p]["shape"][0] for p in sl.parts]))]
        assert [e["stored"]["rows"] for e in entries] == [[[s, s + n, 1]] for s, n in
                                                         zip(*_starts([layers[p]["shape"][0] for p in sl.parts]))]
    code, text = run("validate", art)
    n = sum(1 for v in layers.values() if "skip_reason" not in v)
    assert code == 0 and f"decoded weights equal the fake-quant weights: {n}/{n} layers" in text, text
    assert "Nunchaku's loader: every tensor it reads is present with its dtype and shape" in text, text
    kept = {k: v["skip_reason"] for k, v in layers.items() if "skip_reason" in v}
    if cls == "UNet2DConditionModel":   # cross-attention k/v stay 16-bit in Nunchaku's SDXL class
        assert {".".join(k.split(".")[-2:]) for k in kept} == {"attn2.to_k", "attn2.to_v"}
    if cls == "ZImageTransformer2DModel":   # adaLN modulation stays 16-bit
        assert kept and all("adaLN" in k for k in kept)


def _starts(sizes):
    starts, s = [], 0
    for n in sizes:
        starts.append(s)
        s += n
    return starts, sizes


def test_flux_single_block_proj_out_is_split_before_the_passes(tmp_path):
    cls, over, flux = CASES["flux"]
    code, text = _compile(tmp_path, cls, over, flux)
    assert code == 0, text
    m = json.loads((tmp_path / "art" / "dcc.json").read_text())
    layers = m["layers"]
    p = "single_transformer_blocks.0"
    assert f"{p}.proj_out" not in layers
    attn, mlp = layers[f"{p}.proj_out_cat0"], layers[f"{p}.proj_out_cat1"]
    assert attn["stored"]["prefix"] == f"{p}.out_proj" and mlp["stored"]["prefix"] == f"{p}.mlp_fc2"
    # the mlp half reads the GELU: unsigned activations, as Nunchaku's mlp_fc2; the attention half signed
    assert attn["format"] == "nunchaku-w4a4-int4" and mlp["format"] == "nunchaku-w4a4-int4-unsigned"
    assert attn["shape"] == [128, 128] and mlp["shape"] == [128, 512]
    tensors, _ = singlefile.read(tmp_path / "art" / m["runtime"]["nunchaku_file"]["file"])
    assert not tensors[f"{p}.out_proj.bias"].any()   # the bias lives in mlp_fc2 (ConcatLinear)
    assert tensors[f"{p}.mlp_fc2.bias"].any()
    # validate's loader check reads the stored layers from the manifest: a layer stored at another shape is named
    from dcc.runtime.artifact import load_artifact
    from dcc.targets.nunchaku.stored import check_file
    art = load_artifact(tmp_path / "art")
    assert check_file(art) == []
    art.manifest["layers"][f"{p}.proj_out_cat1"]["stored"]["shape"] = [128, 256]
    problems = check_file(art)
    assert problems and problems[0].startswith(f"{p}.mlp_fc2.") and "expected" in problems[0], problems


@pytest.mark.parametrize("case", ["flux", "sdxl"])
def test_nvfp4_single_file(case, tmp_path):
    """NVFP4: each part of a fused layer has its own per-tensor scale; the file holds wtscale 1 and the parts' scales
    as per-row wcscales (SDXL's loader has no wtscale at all), and decodes exactly."""
    cls, over, flux = CASES[case]
    code, text = _compile(tmp_path, cls, over, flux, "art", "--precision", "nvfp4")
    assert code == 0, text
    m = json.loads((tmp_path / "art" / "dcc.json").read_text())
    tensors, md = singlefile.read(tmp_path / "art" / m["runtime"]["nunchaku_file"]["file"])
    assert md["quantization_config"]["weight"]["dtype"] == "fp4_e2m1_all"
    names, spec, expected = _expected(td.build(cls, **over), cls, flux, precision="nvfp4")
    assert ek.check(tensors, expected, strict=True) == []
    qkv = next(sl for sl in names.layers if len(sl.parts) == 3)
    wt = tensors.get(f"{qkv.prefix}.wtscale")
    assert (wt is None) == (cls == "UNet2DConditionModel") and (wt is None or float(wt) == 1.0)
    assert tensors[f"{qkv.prefix}.wscales"].dtype == torch.float8_e4m3fn
    code, text = run("validate", tmp_path / "art")
    n = sum(1 for v in m["layers"].values() if "skip_reason" not in v)
    assert code == 0 and f"{n}/{n} layers" in text, text


def test_same_inputs_and_seed_give_the_same_bytes(tmp_path):
    cls, over, flux = CASES["qwen"]
    for out in ("a", "b"):
        code, text = _compile(tmp_path, cls, over, flux, out)
        assert code == 0, text
    name = f"svdq-int4_r{RANK}.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("cls,over,why", [
    ("SanaTransformer2DModel", {}, "transformer_blocks.0.ff.conv_inverted: NunchakuSanaTransformer2DModel stores "
                                   "this convolution in 4 bits, and dcc quantizes linears only"),
    ("ZImageTransformer2DModel", {}, "takes W4A4 layers unpadded, so N = 682 and K = 128 must be multiples of 128"),
])
def test_what_nunchaku_cannot_load_stays_a_dcc_runtime_artifact(cls, over, why, tmp_path):
    code, text = _compile(tmp_path, cls, over, None, "art", "--unsupported", "keep")
    assert code == 0, text
    m = json.loads((tmp_path / "art" / "dcc.json").read_text())
    note = m["runtime"]["nunchaku_file"]
    assert m["engines"] == ["dcc-runtime"] and not note["written"] and why in note["why"], note
    assert (tmp_path / "art" / "model.safetensors").is_file()
    code, text = run("validate", tmp_path / "art")
    assert code == 0, text
