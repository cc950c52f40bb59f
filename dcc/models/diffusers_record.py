"""Record calibration inputs by running a local diffusers pipeline (`dcc calib record`, and `dcc compile PIPELINE
--calib prompts.txt`): its text encoders and scheduler run on the prompts offline, and the transformer's (or UNet's)
forward inputs are caught at several denoising steps of a short schedule (the VAE never decodes: output_type
"latent"). Each call's batch rows become samples of a dcc calibration file (dcc.models.diffusers_calib)."""
from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch

from .diffusers_calib import CalibInputs
from .diffusers_folder import DENOISERS, _json
from .loader import ModelLoadError
from .text import DataError, read_text

LIBRARIES = ("diffusers", "transformers")   # where a pipeline's components may come from (never the folder's code)
SKIP = {"return_dict"}                      # forward arguments that are not inputs


class _Stop(Exception):
    """Raised after the last recorded step: the rest of the schedule is not needed."""


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line)")
    return prompts


def check_pipeline_folder(folder: Path) -> dict:
    """model_index.json naming a diffusers pipeline whose components all come from diffusers or transformers."""
    import diffusers
    index = _json(folder / "model_index.json") if (folder / "model_index.json").is_file() else None
    if index is None:
        raise ModelLoadError(f"{folder}: no model_index.json (not a diffusers pipeline folder; `dcc calib record` "
                             f"runs a whole pipeline: text encoders, scheduler and denoiser)")
    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ModelLoadError(f"{folder / 'model_index.json'}: _class_name {name} is not a pipeline class of "
                             f"diffusers {diffusers.__version__} (dcc never runs code shipped with a model)")
    for comp, spec in index.items():
        if isinstance(spec, list) and spec and spec[0] is not None and spec[0] not in LIBRARIES:
            raise ModelLoadError(f"{folder / 'model_index.json'}: component {comp} comes from {spec[0]!r}, not from "
                                 f"diffusers or transformers (dcc never runs code shipped with a model)")
    return index


def load_pipeline(folder: Path, dtype: torch.dtype = torch.float32):
    import diffusers
    import transformers
    check_pipeline_folder(folder)
    diffusers.utils.logging.disable_progress_bar()     # the loaders' bars: dcc prints one line instead
    transformers.utils.logging.disable_progress_bar()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()   # not its advice to install accelerate, once per component
    try:
        with warnings.catch_warnings():   # diffusers 0.42 renames torch_dtype to dtype; 0.35 knows only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                                               use_safetensors=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: the pipeline does not load ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe) -> torch.nn.Module:
    for name in DENOISERS:
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise ModelLoadError(f"{type(pipe).__name__}: no transformer or unet to record the inputs of")


def steps_to_record(steps: int, timesteps: int) -> list[int]:
    """`timesteps` step indices spread evenly over a schedule of `steps` (first and last included)."""
    k = max(1, min(timesteps, steps))
    if k == 1:
        return [0]
    return sorted({round(i * (steps - 1) / (k - 1)) for i in range(k)})


@torch.no_grad()
def record(folder: Path, prompts: list[str], steps: int = 4, timesteps: int | None = None, height: int | None = None,
           width: int | None = None, seed: int = 0, max_sequence_length: int | None = None,
           dtype: torch.dtype = torch.float32, log=logging.getLogger("dcc").info) -> CalibInputs:
    """Run the pipeline on the prompts (all in one batch) for `steps` steps and record the denoiser's inputs at
    `timesteps` of them (default: every step)."""
    pipe = load_pipeline(Path(folder), dtype)
    model = denoiser(pipe)
    wanted = steps_to_record(steps, steps if timesteps is None else timesteps)
    sig = inspect.signature(model.forward)
    calls, state = [], {"step": 0}

    def hook(mod, args, kwargs):
        if state["step"] in wanted:
            bound = sig.bind(*args, **kwargs).arguments
            calls.append({k: v for k, v in bound.items() if k not in SKIP and v is not None})

    def on_step_end(p, i, t, callback_kwargs):
        state["step"] = i + 1
        if state["step"] > wanted[-1]:
            raise _Stop
        return {}

    call = {"prompt": prompts, "num_inference_steps": steps, "output_type": "latent",
            "generator": torch.Generator().manual_seed(seed), "callback_on_step_end": on_step_end}
    params = inspect.signature(pipe.__call__).parameters
    for k, v in (("height", height), ("width", width), ("max_sequence_length", max_sequence_length)):
        if v is not None:
            if k not in params:
                raise ValueError(f"--{k.replace('_', '-')}: {type(pipe).__name__} takes no {k}")
            call[k] = v
    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call)
    except _Stop:
        pass
    finally:
        h.remove()
    if not calls:
        raise ValueError(f"{folder}: the pipeline never called its {type(model).__name__}")
    out = merge(type(model).__name__, calls)
    out.source = (f"{Path(folder).name}: {len(prompts)} prompts, steps {wanted} of {steps}, seed {seed}"
                  + (f", {height}x{width}" if height or width else ""))
    log(f"recorded {out.samples} samples ({len(calls)} calls of {type(model).__name__} at steps {wanted} of "
        f"{steps})")
    return out


def _batch_of(call: dict) -> int:
    for v in call.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return len(v)
    raise ValueError("a recorded call has no batched tensor input")


def _classify(name: str, v, b: int, out: dict) -> None:
    """(layout, value) of one input of a call with batch b, into out[name] (dicts flattened as NAME/KEY)."""
    if isinstance(v, dict):
        for k, x in v.items():
            if x is not None:
                _classify(f"{name}/{k}", x, b, out)
    elif isinstance(v, torch.Tensor):
        if v.dim() == 0:   # one timestep for the whole batch (a UNet's t): per sample, so steps can share a batch
            out[name] = ("batch", v.reshape(1).expand(b).clone())
        elif v.shape[0] == b:
            out[name] = ("batch", v.detach().cpu())
        else:
            out[name] = ("shared", v.detach().cpu())
    elif isinstance(v, (list, tuple)) and len(v) == b and all(isinstance(x, torch.Tensor) for x in v):
        out[name] = ("list", [x.detach().cpu() for x in v])
    elif isinstance(v, (list, tuple)) and len(v) == b:
        out[name] = ("values", _jsonable(list(v)))
    elif isinstance(v, (bool, int, float, str)):
        out[name] = ("const", v)
    else:
        raise ValueError(f"input {name} of type {type(v).__name__} cannot be recorded")


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def merge(cls_name: str, calls: list[dict]) -> CalibInputs:
    """The recorded calls as one CalibInputs: batch rows of every call are samples, in order."""
    parts = []
    for c in calls:
        b = _batch_of(c)
        flat: dict = {}
        for k, v in c.items():
            _classify(k, v, b, flat)
        parts.append((b, flat))
    names = list(parts[0][1])
    n = sum(b for b, _ in parts)
    out = CalibInputs(cls_name, n)
    for name in names:
        kinds = {p[name][0] if name in p else None for _, p in parts}
        if len(kinds) != 1:
            raise ValueError(f"input {name} is not given the same way in every recorded call of {cls_name}")
        kind = kinds.pop()
        vals = [p[name][1] for _, p in parts]
        if kind in ("shared", "const"):
            same = (all(v.shape == vals[0].shape and torch.equal(v, vals[0]) for v in vals[1:]) if kind == "shared"
                    else all(v == vals[0] for v in vals[1:]))
            if not same:
                raise ValueError(f"input {name} of {cls_name} differs between the recorded calls")
            out.add(name, vals[0], kind)
        elif kind == "batch":
            shapes = {tuple(v.shape[1:]) for v in vals}
            if len(shapes) != 1:
                raise ValueError(f"input {name} of {cls_name} has other shapes in other calls ({sorted(shapes)}): "
                                 f"record at one resolution, without separate guidance passes of other lengths")
            out.add(name, torch.cat(vals), "batch")
        else:   # list (stacked where the shapes agree, else ragged) or values
            out.add(name, [x for v in vals for x in v], kind)
    return out
