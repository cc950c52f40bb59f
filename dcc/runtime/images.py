"""`dcc eval --images`: one image per prompt, each with its own fixed seed, generated twice through a local diffusers
pipeline (offline) -- with the pipeline's own 16-bit denoiser, then with the artifact's (the CPU reference, or the
GPU kernels) in its place -- and compared by PSNR and SSIM (dcc/runtime/image_metrics.py). Both runs compute in
float32 on the same text embeddings, noise and schedule, so the images differ only by the artifact's quantization."""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.diffusers_folder import DENOISERS
from ..models.diffusers_record import denoiser, load_pipeline
from .image_metrics import psnr, ssim


@dataclass
class ImageSettings:
    """How each image is generated; None: the pipeline's own default."""
    steps: int | None = None
    seed: int = 0          # image i uses seed + i, in both runs
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None


def load_eval_pipeline(folder, art):
    """The pipeline folder, loaded in float32 (its components from diffusers and transformers only), whose denoiser
    must be of the artifact's class and sizes; otherwise one line says what differs."""
    from .validate import check_same_model
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder}: not a diffusers pipeline folder (no model_index.json); --pipeline takes the "
                         f"pipeline the artifact's model came from, with its text encoders, scheduler and VAE")
    pipe = load_pipeline(folder, torch.float32)
    want = (art.manifest.get("source") or {}).get("architecture", "?")
    try:
        model = denoiser(pipe)
    except ValueError:
        model = None
    if model is None or type(model).__name__ != want:
        have = f"its denoiser is {type(model).__name__}" if model is not None else "it has no transformer or unet"
        raise ValueError(f"{folder}: {have}, but {art.path.name} holds a {want}; give the pipeline it was "
                         f"compiled from")
    check_same_model(art, dict(model.config), folder)
    return pipe


def _call_kwargs(pipe, s: ImageSettings) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    call = {"output_type": "pt"}
    for k, v in (("num_inference_steps", s.steps), ("height", s.height), ("width", s.width),
                 ("max_sequence_length", s.max_sequence_length)):
        if v is not None:
            if k not in params:
                raise ValueError(f"--{k.replace('_', '-')}: {type(pipe).__name__} takes no {k}")
            call[k] = v
    return call


@torch.no_grad()
def generate(pipe, prompts: list[str], s: ImageSettings, desc: str, progress: bool = True) -> list[torch.Tensor]:
    """One [3, H, W] float32 image in [0, 1] per prompt (the generator on the CPU: the same noise on any device)."""
    call = _call_kwargs(pipe, s)
    out = []
    for i, prompt in enumerate(tqdm(prompts, desc=desc, unit="image", disable=not progress, file=sys.stderr)):
        g = torch.Generator("cpu").manual_seed(s.seed + i)
        img = pipe(prompt=prompt, generator=g, **call).images
        out.append(torch.as_tensor(img)[0].float().cpu().clamp(0, 1))
    return out


def _denoiser_name(pipe) -> str:
    return next(n for n in DENOISERS if isinstance(getattr(pipe, n, None), torch.nn.Module))


def compare_images(art, pipe, build_model, prompts: list[str], s: ImageSettings, device: str = "cpu",
                   progress: bool = True) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """(results, the float images, the artifact's images). build_model(art) gives the artifact's model; the
    pipeline's own denoiser is released before it is built (one denoiser in memory at a time)."""
    name = _denoiser_name(pipe)
    pipe.to(device)
    ref = generate(pipe, prompts, s, f"16-bit {name}", progress)
    setattr(pipe, name, None)
    model = build_model(art)
    setattr(pipe, name, model)
    got = generate(pipe, prompts, s, f"artifact's {name}", progress)
    rows = []
    for prompt, a, b in zip(prompts, ref, got):
        p = psnr(a, b)
        rows.append({"prompt": prompt, "psnr_db": None if p == float("inf") else p, "ssim": ssim(a, b)})
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    steps = s.steps or inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    results = {
        "model": name, "architecture": (art.manifest.get("source") or {}).get("architecture"),
        "pipeline": str(getattr(pipe, "name_or_path", "") or ""),
        "settings": {"steps": steps, "seed": s.seed, "height": int(ref[0].shape[1]), "width": int(ref[0].shape[2]),
                     "device": device},
        "images": rows,
        # the mean PSNR of identical images is infinite: None in JSON, "inf" when printed
        "mean": {"psnr_db": sum(finite) / len(finite) if len(finite) == len(rows) else None,
                 "ssim": sum(r["ssim"] for r in rows) / len(rows)},
    }
    return results, ref, got
