"""Compile speed of the Nunchaku target on a FLUX.1-dev-shaped transformer (random weights, the real config: hidden
3072, 24 heads of 128, 19 double + 38 single blocks, text width 4096) or a Sana-1600M-shaped one (`--model sana`:
diffusers' SanaTransformer2DModel defaults, which are Sana 1.6B's: 20 blocks, hidden 2240 = 70 heads of 32, Gemma-2
captions of width 2304; 1024 px = 32 x 32 latent positions, 300 text tokens) from a calibration file of
recorded-shape inputs, SVDQuant INT4 rank 32; per-pass times printed. The weights are random (no trained model can
be obtained offline): the time does not depend on their values.

A run compiles `--double` double and `--single` single blocks (the transformer built with that many); the whole
model's time is extrapolated from the per-block times, said as such in the JSON (one command on the device machine
may not run for the ~10+ minutes a whole model takes):

    python bench/nunchaku_compile_speed.py --device cuda --double 2 --single 4 --samples 8 --image-tokens 4096
    python bench/nunchaku_compile_speed.py --model sana --device cpu --double 2 --samples 4 --image-tokens 1024 \
        --text-tokens 300 --out bench/results/nunchaku_compile_speed_sana.json     (--double: Sana's blocks)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import _results  # bench/_results.py: the results' JSON format

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def build(folder: Path, double: int, single: int, seed: int, device: str, scale: int = 1) -> dict:
    """A FluxTransformer2DModel of FLUX.1-dev's config with `double` + `single` blocks, random bf16 weights, saved."""
    from diffusers import FluxTransformer2DModel
    cfg = dict(FLUX_DEV, num_layers=double, num_single_layers=single)
    if scale > 1:   # a small stand-in for a CPU check of this script
        cfg.update(attention_head_dim=128 // scale, joint_attention_dim=4096 // scale,
                   pooled_projection_dim=768 // scale, axes_dims_rope=(16 // scale, 56 // scale, 56 // scale))
    torch.manual_seed(seed)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return cfg


SANA_BLOCKS = 20   # SanaTransformer2DModel's default num_layers (Sana 1600M)


def build_sana(folder: Path, blocks: int, seed: int, device: str) -> dict:
    """A SanaTransformer2DModel of Sana 1.6B's config (diffusers' defaults) with `blocks` blocks, random bf16."""
    from diffusers import SanaTransformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        model = SanaTransformer2DModel(num_layers=blocks).to(torch.bfloat16)
    model.save_pretrained(folder)
    cfg = dict(model.config)
    del model
    return cfg


def write_sana_calib(path: Path, cfg: dict, samples: int, image_tokens: int, text_tokens: int, seed: int) -> None:
    """Random inputs of the shapes SanaPipeline feeds the transformer (latents [B, 32, side, side], Gemma-2 text
    states, timesteps in (0, 1000]) as dcc's calibration file."""
    from dcc.models.diffusers_calib import CalibInputs
    g = torch.Generator().manual_seed(seed)
    side = int(image_tokens ** 0.5)
    kw = {"hidden_states": torch.randn(samples, cfg["in_channels"], side, side, generator=g),
          "encoder_hidden_states": torch.randn(samples, text_tokens, cfg["caption_channels"], generator=g),
          "timestep": (torch.rand(samples, generator=g) * 1000).clamp(min=20)}
    CalibInputs.from_kwargs("SanaTransformer2DModel", kw, {}, samples).save(path)


def write_calib(path: Path, cfg: dict, samples: int, image_tokens: int, text_tokens: int, seed: int) -> None:
    """Random inputs of the shapes FluxPipeline feeds the transformer (latents of image_tokens positions, T5 text
    states, CLIP pooled, timesteps in (0, 1], guidance 3.5), as dcc's calibration file (dcc calib record's format)."""
    from dcc.models.diffusers_calib import CalibInputs
    g = torch.Generator().manual_seed(seed)
    side = int(image_tokens ** 0.5)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                     indexing="ij"), -1).reshape(-1, 3)
    kw = {"hidden_states": torch.randn(samples, side * side, cfg["in_channels"], generator=g),
          "encoder_hidden_states": torch.randn(samples, text_tokens, cfg["joint_attention_dim"], generator=g),
          "pooled_projections": torch.randn(samples, cfg["pooled_projection_dim"], generator=g),
          "timestep": torch.rand(samples, generator=g).clamp(min=0.02), "img_ids": ids,
          "txt_ids": torch.zeros(text_tokens, 3), "guidance": torch.full((samples,), 3.5)}
    CalibInputs.from_kwargs("FluxTransformer2DModel", kw, {"img_ids": "shared", "txt_ids": "shared"},
                            samples).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux", choices=["flux", "sana"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--double", type=int, default=2, help="FLUX: double blocks; Sana: its blocks")
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=4096, help="latent positions (4096: a 1024x1024 image)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--scale", type=int, default=1, help="divide the widths (a CPU check of this script)")
    ap.add_argument("--work", default=None, help="folder for the model and the calibration file (default: a temp)")
    ap.add_argument("--out", default="bench/results/nunchaku_compile_speed.json")
    args = ap.parse_args()

    from dcc.api import CompileOptions, compile_model
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        dev = "cuda" if args.device == "cuda" else "cpu"
        if args.model == "sana":
            cfg = build_sana(work / "flux", args.double, 0, dev)
            write_sana_calib(work / "calib.safetensors", cfg, args.samples, args.image_tokens, args.text_tokens, 1)
        else:
            cfg = build(work / "flux", args.double, args.single, 0, dev, args.scale)
            write_calib(work / "calib.safetensors", cfg, args.samples, args.image_tokens, args.text_tokens, 1)
        setup_s = time.perf_counter() - t
        lines, blocks = [], {}
        # per-block wall time (bench-side instrumentation: the artifact records no times, to stay reproducible)
        from dcc.compiler import sequential
        inner = sequential._BlockCompiler.compile

        def timed(self, i, prefix, *a, **kw):
            t0 = time.perf_counter()
            out = inner(self, i, prefix, *a, **kw)
            if args.device == "cuda":
                torch.cuda.synchronize()
            blocks[prefix] = time.perf_counter() - t0
            return out
        sequential._BlockCompiler.compile = timed
        opts = CompileOptions(target="nunchaku", algo="svdquant", rank=args.rank, calib=str(work / "calib.safetensors"),
                              calib_chunks=args.samples, device=args.device, progress=False, force=True)
        t = time.perf_counter()
        compile_model(str(work / "flux"), str(work / "out"), opts, log=lines.append)
        secs = time.perf_counter() - t
    print("\n".join(lines))
    double_s = [v for k, v in blocks.items() if k.startswith("transformer_blocks.")]
    single_s = [v for k, v in blocks.items() if k.startswith("single_transformer_blocks.")]
    name = "Sana-1600M-shaped (random weights)" if args.model == "sana" else "FLUX.1-dev-shaped (random weights)"
    row = {"model": name, "device": args.device, "double": args.double,
           "single": args.single if args.model == "flux" else 0, "samples": args.samples,
           "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "rank": args.rank,
           "compile_s": round(secs, 1), "setup_s": round(setup_s, 1),
           "threads": torch.get_num_threads()}
    if args.model == "sana" and double_s:
        b = sum(double_s) / len(double_s)
        row.update(block_s=round(b, 2), **{f"extrapolated_{SANA_BLOCKS}_s":
                                           round(secs - sum(double_s) + SANA_BLOCKS * b, 1)})
    elif double_s and single_s:
        d, s = sum(double_s) / len(double_s), sum(single_s) / len(single_s)
        row.update(double_block_s=round(d, 2), single_block_s=round(s, 2),
                   extrapolated_19_38_s=round(secs - sum(double_s) - sum(single_s) + 19 * d + 38 * s, 1))
    print(json.dumps(row, indent=1))
    _results.write(Path(args.out).stem, [row], out=args.out, args=vars(args))


if __name__ == "__main__":
    main()
