"""The diffusers adapter: a diffusion transformer or UNet (FLUX, SANA, Qwen-Image, Z-Image, SDXL's UNet, ...) built
from its diffusers folder, calibrated on recorded inputs of its forward (a dcc calibration file, or prompts run
through the folder's pipeline: dcc.models.diffusers_record), whose blocks are compiled in the order its own forward
calls them (dcc.compiler.sequential.ModelForward). Convolutions and everything outside the blocks stay 16-bit.
An artifact's model is rebuilt from its config (artifact_model), compared with the float model on recorded inputs
(`validate --model`: the denoiser's output) and evaluated by its pipeline's images (dcc.runtime.images)."""
from __future__ import annotations

from pathlib import Path

import torch

from .adapter import ModelAdapter
from .diffusers_calib import CalibInputs
from .text import DataError


def is_calib_file(path) -> bool:
    """A safetensors file (by its 8-byte header length and JSON start), whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


class DiffusersModel(ModelAdapter):
    kind = "diffusers"
    eval_option = "--images"
    compares = "denoiser outputs"

    def auto_class(self, config):
        from .diffusers_folder import model_class
        return model_class(Path("config.json"), config)

    def build(self, config, dtype=torch.float32, keys=None, device: str = "meta"):
        """diffusers' class of the config (its parameters on `device`; meta: a skeleton without memory)."""
        from .diffusers_folder import build
        if device == "meta":
            return build(Path("config.json"), config, dtype)
        with torch.device(device):
            model = self.auto_class(config).from_config(dict(config))
        return (model if next(model.parameters()).dtype == dtype else model.to(dtype)).eval()

    # ---------------------------------------------------------------------------------------------- calibration
    def calibration(self, lm, path, chunks, seq_len) -> CalibInputs:
        """The first `chunks` samples of a calibration file; or, for a text file of prompts and a pipeline folder,
        inputs recorded on the fly by running the pipeline (as `dcc calib record` does, with its defaults)."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        name = type(lm.model).__name__
        if is_calib_file(p):
            calib = CalibInputs.load(p)
        elif lm.pipeline_path is not None:
            from .diffusers_record import read_prompts, record
            calib = record(lm.pipeline_path, read_prompts(p))
        else:
            raise DataError(f"{p}: a text file, but {lm.path} is a model folder without its pipeline (no text "
                            f"encoders to turn prompts into inputs); give a calibration file from `dcc calib record "
                            f"PIPELINE_DIR --prompts {p.name}`, or the pipeline folder")
        if calib.cls != name:
            raise DataError(f"{p}: calibration inputs of {calib.cls}, but the model is {name}")
        calib = calib.first(chunks)
        # tokens (latent positions) per sample: the latents' values over their channels, for the memory estimate
        channels = lm.config.get("in_channels") or 1
        calib.tokens = max(1, calib.sample_numel() // channels)
        return calib

    def forward_kwargs(self, batch: CalibInputs, device=None, dtype=torch.float32) -> dict:
        return {**batch.forward_kwargs(device, dtype), "return_dict": False}

    def block_inputs(self, lm, batch: CalibInputs, device):
        """The whole model's forward on the calibration batch: each block is compiled when the forward reaches it."""
        from ..compiler.sequential import ModelForward
        dev = torch.device(device)
        return ModelForward(lambda: lm.model(**self.forward_kwargs(batch, dev, lm.dtype)))

    def calib_summary(self, batch: CalibInputs) -> dict:
        # chunks/seq_len as the other kinds name them (samples, and values per sample of the latents)
        return {"chunks": batch.samples, "seq_len": batch.tokens, "samples": batch.samples,
                "inputs": batch.cls, "source": batch.source}

    def calib_tokens(self, batch: CalibInputs) -> int:
        return batch.samples * batch.tokens

    def describe_calibration(self, batch: CalibInputs) -> str:
        return f"{batch.samples} samples of {batch.cls}'s inputs"

    # ---------------------------------------------------------------------------------------------- artifacts
    def artifact_model(self, folder: Path, config: dict, dtype=torch.float32):
        """(config, skeleton) of an artifact's model: its config.json less what dcc added (quantization_config, the
        dtype keys: whatever the class's constructor does not take, which from_config would ignore with a warning),
        built as diffusers' class with its parameters on meta."""
        import inspect
        from .diffusers_folder import DiffusersConfig, build, model_class
        takes = inspect.signature(model_class(folder, config).__init__).parameters
        cfg = DiffusersConfig({k: v for k, v in config.items() if k.startswith("_") or k in takes})
        return cfg, build(folder, cfg, dtype)

    def block_lists(self, model) -> list[str]:
        from .diffusers_folder import find_block_lists
        return [name for name, _ in find_block_lists(model)]

    # ---------------------------------------------------------------------------------------------- validate
    def validation_inputs(self, lm, path, samples: int) -> CalibInputs:
        """What `validate --model` compares on: the first `samples` of a calibration file, or inputs recorded from
        a prompts file through the pipeline folder given as the model (as compile's --calib takes them)."""
        if path is None:
            raise DataError(f"{lm.path}: a diffusion model is compared on recorded inputs of its forward: give "
                            f"--inputs CALIB (a file of `dcc calib record PIPELINE_DIR --prompts FILE`), or --inputs "
                            f"PROMPTS with the pipeline folder as --model")
        return self.calibration(lm, path, samples, 0)

    def max_tokens(self, config) -> None:
        return None

    @torch.no_grad()
    def outputs(self, model, batch: CalibInputs) -> torch.Tensor:
        """The denoiser's output (predicted noise or velocity) on the batch, on the model's device, in float32."""
        dev = next(model.parameters()).device
        out = model(**self.forward_kwargs(batch, dev, torch.float32))[0]
        if isinstance(out, (list, tuple)):   # one tensor per sample (Z-Image): joined
            out = torch.cat([t.flatten() for t in out])
        return out

    def compare(self, ref: torch.Tensor, got: torch.Tensor) -> dict:
        ref, got = ref.double().flatten(), got.double().flatten()
        rel = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
        cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))
        return {"output_rel_err": rel, "output_cosine": cos}

    def describe_comparison(self, cmp: dict) -> str:
        import math
        rel = cmp["output_rel_err"]
        line = (f"denoiser output vs the float model: rel err {rel:.4e} (SQNR "
                f"{-20 * math.log10(max(rel, 1e-30)):.1f} dB), cosine {cmp['output_cosine']:.6f}")
        blocks = cmp.get("blocks") or {}
        if blocks:
            worst = max(blocks, key=blocks.get)
            line += f"; block outputs rel err {min(blocks.values()):.3e} .. {blocks[worst]:.3e} ({worst})"
        return line

    # ---------------------------------------------------------------------------------------------- eval
    def report(self, results: dict) -> list[str]:
        """`dcc eval --images` lines: one per prompt, then the means (dcc.runtime.images computes them)."""
        def db(v):
            return "inf" if v is None else f"{v:.2f}"
        rows = results["images"]
        lines = [f"{'prompt':48} {'PSNR dB':>8} {'SSIM':>7}"]
        lines += [f"{r['prompt'][:48]:48} {db(r['psnr_db']):>8} {r['ssim']:7.4f}" for r in rows]
        m = results["mean"]
        s = results["settings"]
        lines.append(f"mean over {len(rows)} images ({s['height']}x{s['width']}, {s['steps']} step"
                     f"{'s' if s['steps'] != 1 else ''}, seed "
                     f"{s['seed']}): PSNR {db(m['psnr_db'])} dB, SSIM {m['ssim']:.4f} (the artifact's "
                     f"{results['model']} against the pipeline's 16-bit one)")
        return lines

    def _no_eval(self, *a, **k):
        raise ValueError("a diffusion model's artifact is evaluated by the images of its pipeline: "
                         "`dcc eval ART --images PROMPTS --pipeline PIPELINE_DIR`")

    eval_data = evaluate = _no_eval
