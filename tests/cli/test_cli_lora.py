"""`dcc lora merge` end to end on stories260K compiled for Nunchaku with a rank-16 branch: PEFT and kohya LoRAs
merged, the manifest's record of them, `dcc validate` (decoded main branch still bit-exact, the runtime model
builds and runs against the float model) and `dcc inspect` on the merged artifact, the same bytes on a second run,
--skip-unmatched, and the errors a user meets (each one line, exit 2, nothing written)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_util import error_line, run

STORIES = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K" / "hf"
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs ../shared/assets ({STORIES} is absent)")
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(nunchaku artifact, tinychat artifact, calibration file)."""
    d = tmp_path_factory.mktemp("lora")
    calib = d / "calib.txt"   # token ids (the model has no tokenizer)
    calib.write_text(" ".join(str((37 * i + 11) % 512) for i in range(4 * 128)))
    outs = []
    for target, extra in (("nunchaku", ("--rank", "16")), ("tinychat", ("--algo", "rtn", "--group-size", "64"))):
        code, text = run("compile", STORIES, "--target", target, *extra, "--unsupported", "keep", "--calib", calib,
                         "--calib-chunks", "4", "--calib-seq-len", "128", "-o", d / target, "-q")
        assert code == 0, text
        outs.append(d / target)
    return outs[0], outs[1], calib


def _lora(path: Path, kind: str = "peft", seed: int = 0, **extra) -> Path:
    g = torch.Generator().manual_seed(seed)
    if kind == "peft":
        sd = {f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 64, generator=g),
              f"base_model.model.{Q}.lora_B.weight": torch.randn(64, 4, generator=g),
              f"base_model.model.{Q}.alpha": torch.tensor(8.0),
              "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight": torch.randn(4, 64, generator=g),
              "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight": torch.randn(172, 4, generator=g)}
    else:
        sd = {"lora_unet_layers_1_self_attn_k_proj.lora_down.weight": torch.randn(8, 64, generator=g),
              "lora_unet_layers_1_self_attn_k_proj.lora_up.weight": torch.randn(32, 8, generator=g),
              "lora_unet_layers_1_self_attn_k_proj.alpha": torch.tensor(4.0)}
    sd.update(extra)
    save_file(sd, path)
    return path


def test_merge_validate_inspect(built, tmp_path):
    art = built[0]
    peft, kohya = _lora(tmp_path / "p.safetensors"), _lora(tmp_path / "k.safetensors", "kohya")
    code, text = run("lora", "merge", art, peft, "--strength", "0.8", "-o", tmp_path / "m1")
    assert code == 0, text
    assert "into 2 layers" in text and "LoRA rank 4" in text
    code, text = run("lora", "merge", tmp_path / "m1", kohya, "-o", tmp_path / "m2")
    assert code == 0, text
    m = json.loads((tmp_path / "m2" / "dcc.json").read_text())
    recs = m["lora"]
    assert [(r["file"], r["format"], r["strength"]) for r in recs] == [("p.safetensors", "peft", 0.8),
                                                                       ("k.safetensors", "kohya", 1.0)]
    assert sorted(recs[0]["layers"]) == [Q, "model.layers.3.mlp.up_proj"]
    assert recs[1]["layers"] == {"model.layers.1.self_attn.k_proj": {
        "ranks": [16, 24], "bias": False, "modules": ["model.layers.1.self_attn.k_proj"]}}
    import hashlib
    assert recs[0]["sha256"] == hashlib.sha256(peft.read_bytes()).hexdigest()
    assert m["layers"][Q]["rank"] == 20 and m["layers"][Q]["svd_rank"] == 16
    assert m["layers"]["model.layers.1.self_attn.k_proj"]["rank"] == 24
    base = json.loads((art / "dcc.json").read_text())
    assert m["layers"]["model.layers.2.self_attn.q_proj"] == base["layers"]["model.layers.2.self_attn.q_proj"]
    code, text = run("validate", tmp_path / "m2", "--model", STORIES, "--tokens", "32")
    assert code == 0, text
    assert "30/30 layers" in text
    code, text = run("inspect", tmp_path / "m2")
    assert code == 0 and "30 of 35 linears quantized" in text, text


def test_same_bytes_twice(built, tmp_path):
    peft = _lora(tmp_path / "p.safetensors", seed=3)
    for out in ("a", "b"):
        code, text = run("lora", "merge", built[0], peft, "-o", tmp_path / out, "--strength", "1.5")
        assert code == 0, text
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "dcc.json" in names
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in names)


def test_skip_unmatched_lists_them(built, tmp_path):
    extra = {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 512),
             "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(64, 4),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}
    lora = _lora(tmp_path / "x.safetensors", **extra)
    code, text = run("lora", "merge", built[0], lora, "-o", tmp_path / "no")
    assert code == 2 and "model.embed_tokens, which is not quantized by dcc" in error_line(text)
    assert "--skip-unmatched" in error_line(text) and not (tmp_path / "no").exists()
    code, text = run("lora", "merge", built[0], lora, "-o", tmp_path / "yes", "--skip-unmatched")
    assert code == 0, text
    assert "skipped 2 LoRA modules" in text and "base_model.model.model.embed_tokens (not quantized" in text
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1 (a text encoder's module" in text
    rec = json.loads((tmp_path / "yes" / "dcc.json").read_text())["lora"][0]
    assert len(rec["skipped"]) == 2 and len(rec["layers"]) == 2


def test_errors(built, tmp_path):
    art, tinychat, _ = built
    cases = [
        # a shape that does not fit names the tensor and the layer
        (_lora(tmp_path / "shape.safetensors", **{f"base_model.model.{Q}.lora_B.weight": torch.zeros(60, 4)}),
         art, [f"{Q}.lora_B.weight has shape (60, 4)", f"layer {Q} has 64 outputs"]),
        (_lora(tmp_path / "k.safetensors", **{f"base_model.model.{Q}.lora_A.weight": torch.zeros(4, 72)}),
         art, [f"{Q}.lora_A.weight has shape (4, 72)", f"layer {Q} has 64 inputs"]),
        # an unknown key
        (_lora(tmp_path / "u.safetensors", **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(2)}),
         art, ["tensor model.layers.0.self_attn.q_proj.weight is not a LoRA tensor"]),
        # a 16-bit layer (172 inputs: kept by --unsupported keep)
        (_lora(tmp_path / "h.safetensors", **{
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 172),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.zeros(64, 4)}),
         art, ["layer model.layers.0.mlp.down_proj is 16-bit", "never into a float weight"]),
        # a module no artifact layer has
        (_lora(tmp_path / "n.safetensors", **{"transformer.blocks.9.attn.lora_A.weight": torch.zeros(4, 8),
                                              "transformer.blocks.9.attn.lora_B.weight": torch.zeros(8, 4)}),
         art, ["transformer.blocks.9.attn, which is not a module of this artifact"]),
        # not a Nunchaku artifact
        (_lora(tmp_path / "t.safetensors"), tinychat, ["a tinychat artifact", "Nunchaku-target artifacts"]),
        # not a LoRA file
        (tmp_path / "calib.txt", art, ["not a readable safetensors file"]),
    ]
    (tmp_path / "calib.txt").write_text("1 2 3")
    for lora, artifact, words in cases:
        code, text = run("lora", "merge", artifact, lora, "-o", tmp_path / "out")
        line = error_line(text)
        assert code == 2 and all(w in line for w in words), (words, text)
        assert str(lora) in line or "tinychat" in line, line
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))   # no temporary folder or lock left behind


def test_output_rules(built, tmp_path):
    art = built[0]
    peft = _lora(tmp_path / "p.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, text = run("lora", "merge", art, peft, "-o", tmp_path / "out")
    assert code == 2 and "already exists (use --force" in error_line(text)
    code, text = run("lora", "merge", art, peft, "-o", tmp_path / "out", "--force")
    assert code == 2 and "is not one, so it is left alone" in error_line(text)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, text = run("lora", "merge", art, peft, "-o", art, "--force")
    assert code == 2 and "--force never replaces it" in error_line(text)
    code, text = run("lora", "merge", art, peft, "-o", tmp_path / "m")
    assert code == 0, text
    code, text = run("lora", "merge", art, _lora(tmp_path / "q.safetensors", seed=5), "-o", tmp_path / "m",
                     "--force")
    assert code == 0, text
    assert json.loads((tmp_path / "m" / "dcc.json").read_text())["lora"][0]["file"] == "q.safetensors"
