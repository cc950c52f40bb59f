"""singlefile.py: exact round trips of every dtype Nunchaku stores (int8, int32, fp8 e4m3, bf16/fp16, fp32 scalars,
empty tensors), the metadata Nunchaku's loaders read (the quantization_config of merge_safetensors.py), equal bytes
for equal inputs across processes and insertion orders, the file read back by safetensors itself, atomic replace,
and one clear error per bad input."""
import hashlib
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from dcc.targets.nunchaku import singlefile as sf
from dcc.targets.nunchaku.singlefile import SingleFileError

CONFIG = {"_class_name": "FluxTransformer2DModel", "num_layers": 1, "axes_dims_rope": [16, 24, 24]}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "transformer_blocks.0.qkv_proj.qweight": torch.randint(-128, 128, (384, 64), generator=g, dtype=torch.int8),
        "transformer_blocks.0.qkv_proj.wscales": torch.randn(2, 384, generator=g).to(torch.bfloat16),
        "transformer_blocks.0.norm1.linear.qweight": torch.randint(-2**31, 2**31 - 1, (192, 64), generator=g,
                                                                   dtype=torch.int32),
        "transformer_blocks.0.fp4.wscales": (torch.rand(8, 128, generator=g) * 8).to(torch.float8_e4m3fn),
        "transformer_blocks.0.fp4.wtscale": torch.tensor([0.25]),
        "transformer_blocks.0.fp4.wcscales": torch.randn(128, generator=g).to(torch.float16),
        "x_embedder.weight": torch.randn(128, 16, generator=g)[:, ::2].to(torch.bfloat16),   # not contiguous
        "empty.lora_down": torch.zeros(0, 128, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.0, dtype=torch.float64),
    }


def _md(precision="int4", model_class="NunchakuFluxTransformer2dModel", **kw):
    return sf.metadata(CONFIG, model_class, sf.quantization_config(precision, 32), **kw)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))   # bit for bit


def test_round_trip_and_metadata(tmp_path):
    t = _tensors()
    path = sf.write(tmp_path / "m.safetensors", t, _md(comfy_config={"model_class": "Flux", "model_config": {}}))
    back, md = sf.read(path)
    assert set(back) == set(t)
    for k in t:
        _same(t[k].contiguous(), back[k])
    assert md["config"] == CONFIG and md["model_class"] == "NunchakuFluxTransformer2dModel"
    assert md["comfy_config"] == {"model_class": "Flux", "model_config": {}}
    assert md["quantization_config"] == {
        "method": "svdquant", "rank": 32,
        "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
        "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}}
    with safe_open(str(path), framework="pt") as f:                              # what Nunchaku's loaders call
        raw = f.metadata()
        assert json.loads(raw["config"]) == CONFIG and isinstance(raw["quantization_config"], str)
        _same(f.get_tensor("transformer_blocks.0.fp4.wscales"), t["transformer_blocks.0.fp4.wscales"])
    assert list(tmp_path.iterdir()) == [path]                                    # no temporary file left


def test_quantization_config_nvfp4_and_zimage():
    cfg = sf.quantization_config("nvfp4", 128, skip_refiners=False)
    assert cfg["weight"] == {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    assert cfg["activation"] == {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}
    assert cfg["rank"] == 128 and cfg["skip_refiners"] is False
    assert "skip_refiners" not in sf.quantization_config("int4", 32)


def test_deterministic_bytes(tmp_path):
    t = _tensors()
    a = sf.write(tmp_path / "a.safetensors", t, _md())
    b = sf.write(tmp_path / "b.safetensors", dict(reversed(list(t.items()))),
                 sf.metadata(dict(reversed(list(CONFIG.items()))), "NunchakuFluxTransformer2dModel",
                             json.dumps(sf.quantization_config("int4", 32))))
    assert a.read_bytes() == b.read_bytes()
    code = ("import sys, torch; sys.path.insert(0, %r); from tests.targets.nunchaku.test_singlefile import _tensors, "
            "_md; from dcc.targets.nunchaku import singlefile as sf; sf.write(sys.argv[1], _tensors(), _md())")
    c = tmp_path / "c.safetensors"
    subprocess.run([sys.executable, "-c", code % str(sf.__file__).rsplit("/dcc/", 1)[0], str(c)], check=True)
    assert hashlib.sha256(c.read_bytes()).digest() == hashlib.sha256(a.read_bytes()).digest()   # another process


def test_replace_is_atomic(tmp_path, monkeypatch):
    path = sf.write(tmp_path / "m.safetensors", {"a": torch.ones(2)}, _md())
    old = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(sf.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        sf.write(path, {"a": torch.zeros(2)}, _md())
    assert path.read_bytes() == old and list(tmp_path.iterdir()) == [path]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SingleFileError, match="model_class 'NunchakuPixArt' is not one of Nunchaku's loaders"):
        _md(model_class="NunchakuPixArt")
    with pytest.raises(SingleFileError, match="precision 'fp8' is not one of"):
        sf.quantization_config("fp8", 32)
    with pytest.raises(SingleFileError, match="rank -16 must be an integer >= 0"):
        sf.quantization_config("int4", -16)
    with pytest.raises(SingleFileError, match="config is not valid JSON"):
        sf.metadata("{not json", "NunchakuFluxTransformer2dModel", {})
    with pytest.raises(SingleFileError, match="quantization_config must be a JSON object, got list"):
        sf.metadata(CONFIG, "NunchakuFluxTransformer2dModel", [1])
    path = tmp_path / "m.safetensors"
    with pytest.raises(SingleFileError, match=r"m\.safetensors: metadata lacks 'model_class'"):
        sf.write(path, {}, {"config": "{}", "quantization_config": "{}"})
    with pytest.raises(SingleFileError, match="tensor c has dtype torch.complex64"):
        sf.write(path, {"c": torch.zeros(2, dtype=torch.complex64)}, _md())
    with pytest.raises(SingleFileError, match="'w' must map a str to a torch.Tensor, got list"):
        sf.write(path, {"w": [1.0]}, _md())
    assert not path.exists()


def test_bad_files_are_named(tmp_path):
    with pytest.raises(SingleFileError, match=r"nope\.safetensors: no such file"):
        sf.read(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    with pytest.raises(SingleFileError, match=r"junk\.safetensors: not a readable safetensors file"):
        sf.read(junk)
    plain = tmp_path / "plain.safetensors"                                        # a two-file-era shard
    safetensors.torch.save_file({"a": torch.ones(1)}, str(plain), metadata={"config": "{}"})
    with pytest.raises(SingleFileError, match=r"plain\.safetensors: metadata lacks 'model_class'"):
        sf.read(plain)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1)}, str(bad), metadata={
        "config": "{}", "model_class": "NunchakuFluxTransformer2dModel", "quantization_config": "{rank: 32"})
    with pytest.raises(SingleFileError, match=r"bad\.safetensors: metadata 'quantization_config' is not valid JSON"):
        sf.read(bad)
