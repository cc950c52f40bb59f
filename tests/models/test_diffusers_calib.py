"""dcc/models/diffusers_calib.py and diffusers_record.py: the calibration file of a diffusion model's forward inputs
(every layout round-trips; a file of the wrong kind or class is refused in one line) and how recorded pipeline
calls become samples."""
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
from dcc.models.diffusers_calib import CalibInputs  # noqa: E402
from dcc.models.diffusers_record import merge, steps_to_record  # noqa: E402
from dcc.models.loader import LazyModel  # noqa: E402
from dcc.models.text import DataError  # noqa: E402


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_layout_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(3, 4, 8, generator=g), "img_ids": torch.arange(12.).reshape(4, 3),
          "x": [torch.randn(2, 5, generator=g) for _ in range(3)],
          "cap": [torch.randn(n, 5, generator=g) for n in (2, 3, 4)],
          "img_shapes": [[[1, 2, 2]]] * 3, "flag": True,
          "added_cond_kwargs": {"text_embeds": torch.randn(3, 6, generator=g)}}
    layout = {"img_ids": "shared", "x": "list", "cap": "list", "img_shapes": "values", "flag": "const"}
    c = CalibInputs.from_kwargs("FluxTransformer2DModel", kw, layout, 3)
    assert c.layout["cap"] == "ragged" and c.layout["x"] == "list"   # a list of other shapes cannot stack
    back = CalibInputs.load(c.save(tmp_path / "c.safetensors"))
    assert back.cls == "FluxTransformer2DModel" and back.samples == 3 and list(back.layout) == list(c.layout)
    assert _same(back.forward_kwargs(), kw)
    two = back.first(2).forward_kwargs()
    assert two["hidden_states"].shape[0] == 2 and len(two["cap"]) == 2 and two["img_ids"].shape == (4, 3)
    assert two["img_shapes"] == [[[1, 2, 2]]] * 2 and two["flag"] is True


def test_inconsistent_samples_are_refused():
    with pytest.raises(ValueError, match="calibration input b holds 2 samples, not 3"):
        CalibInputs.from_kwargs("X", {"a": torch.zeros(3, 1), "b": torch.zeros(2, 1)}, {}, 3)


def test_files_of_another_kind_or_model_are_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DataError, match="plain.safetensors: not a dcc calibration file"):
        CalibInputs.load(tmp_path / "plain.safetensors")
    _, folder = td.save(tmp_path / "sana", "SanaTransformer2DModel")
    calib = td.write_calib(tmp_path / "flux.safetensors", "FluxTransformer2DModel")
    lm = LazyModel(folder)
    with pytest.raises(DataError) as e:
        lm.adapter.calibration(lm, calib, 16, 256)
    assert str(e.value) == (f"{calib}: calibration inputs of FluxTransformer2DModel, but the model is "
                            f"SanaTransformer2DModel")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(DataError, match="a text file, but .* is a model folder without its pipeline"):
        lm.adapter.calibration(lm, tmp_path / "prompts.txt", 16, 256)


def test_recorded_calls_become_samples():
    assert steps_to_record(4, 4) == [0, 1, 2, 3] and steps_to_record(10, 3) == [0, 4, 9]
    assert steps_to_record(4, 1) == [0] and steps_to_record(2, 5) == [0, 1]
    ids = torch.zeros(4, 3)
    calls = [{"hidden_states": torch.full((2, 4, 8), float(i)), "timestep": torch.tensor(float(i)), "img_ids": ids,
              "added_cond_kwargs": {"time_ids": torch.ones(2, 6)}} for i in range(3)]
    c = merge("UNet2DConditionModel", calls)
    assert c.samples == 6 and c.layout == {"hidden_states": "batch", "timestep": "batch", "img_ids": "shared",
                                           "added_cond_kwargs/time_ids": "batch"}
    # a UNet's one timestep per call becomes one per sample, so calls at other steps share a batch
    assert c.tensors["timestep"].tolist() == [0, 0, 1, 1, 2, 2]
    calls[1]["img_ids"] = ids + 1
    with pytest.raises(ValueError, match="input img_ids of UNet2DConditionModel differs between the recorded calls"):
        merge("UNet2DConditionModel", calls)
