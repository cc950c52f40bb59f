"""dcc's calibration file for diffusion models: the keyword inputs of the transformer's (or UNet's) forward, as a
pipeline called it, for N samples (a sample: one batch row at one denoising step), in one safetensors file.

Each input is stored by how the forward takes it (the file's metadata "layout" says which):
  batch   one tensor [N, ...]: the forward takes [batch, ...] (hidden_states, timestep, pooled_projections)
  list    one tensor [N, ...]: the forward takes a list of per-sample tensors (Z-Image's x, cap_feats)
  ragged  tensors NAME.0 ... NAME.{N-1}: such a list whose tensors differ in shape (captions of other lengths)
  shared  one tensor without a sample dimension, the same for every sample (FLUX's img_ids, txt_ids)
  values  JSON in the metadata, one value per sample (Qwen-Image's img_shapes)
  const   JSON in the metadata, one value for every sample (a flag the pipeline passes)
A dict input (a UNet's added_cond_kwargs) is stored as NAME/KEY. The metadata also holds "format"
("dcc-diffusers-calib"), "version", "class" (the model class the inputs are for) and "samples"."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .text import DataError

FORMAT = "dcc-diffusers-calib"
LAYOUTS = ("batch", "list", "ragged", "shared", "values", "const")
_JSON = ("values", "const")   # layouts kept in the metadata, not as tensors


@dataclass
class CalibInputs:
    """N samples of a diffusion model's forward inputs: flat name (dicts as NAME/KEY) -> tensor or values."""
    cls: str
    samples: int
    tensors: dict[str, object] = field(default_factory=dict)   # name -> tensor, list of tensors (ragged) or values
    layout: dict[str, str] = field(default_factory=dict)       # name -> one of LAYOUTS
    source: str = ""                                           # what the samples were recorded from
    tokens: int = 0                                            # latent positions per sample (set by the adapter)

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_kwargs(cls, class_name: str, kwargs: dict, layout: dict, samples: int) -> "CalibInputs":
        """From forward kwargs holding `samples` samples; layout: name -> its LAYOUTS entry where it is not batch
        (a tensor list given stacked, [N, ...], counts as "list")."""
        out = cls(class_name, samples)
        for name, v in _flatten(kwargs).items():
            kind = layout.get(name, layout.get(name.split("/")[0], "batch"))
            out.add(name, v, kind)
        return out

    def add(self, name: str, value, kind: str) -> None:
        if kind not in LAYOUTS:
            raise ValueError(f"calibration input {name}: layout {kind!r} is not one of {', '.join(LAYOUTS)}")
        if kind == "list" and isinstance(value, (list, tuple)):
            shapes = {tuple(t.shape) for t in value}
            kind, value = ("list", torch.stack(list(value))) if len(shapes) == 1 else ("ragged", list(value))
        n = (self.samples if kind in ("shared", "const") else len(value) if kind in ("ragged", "values")
             else value.shape[0])
        if n != self.samples:
            raise ValueError(f"calibration input {name} holds {n} samples, not {self.samples}")
        self.tensors[name], self.layout[name] = value, kind

    # ------------------------------------------------------------------------------------------------ file
    def save(self, path) -> Path:
        from safetensors.torch import save_file
        flat, values = {}, {}
        for name, v in self.tensors.items():
            kind = self.layout[name]
            if kind in _JSON:
                values[name] = v
            elif kind == "ragged":
                flat.update({f"{name}.{i}": t.contiguous() for i, t in enumerate(v)})
            else:
                flat[name] = v.contiguous()
        meta = {"format": FORMAT, "version": "1", "class": self.cls, "samples": str(self.samples),
                "layout": json.dumps(self.layout), "values": json.dumps(values),
                "source": self.source}
        path = Path(path)
        save_file(flat, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path) -> "CalibInputs":
        from safetensors import safe_open
        p = Path(path)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise DataError(f"{p}: not a safetensors file ({str(e).splitlines()[0]})") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{p}: not a dcc calibration file (no format {FORMAT} in its metadata; make one with "
                            f"`dcc calib record`)")
        try:
            layout, values = json.loads(meta["layout"]), json.loads(meta.get("values", "{}"))
            out = cls(meta["class"], int(meta["samples"]), source=meta.get("source", ""))
        except (KeyError, ValueError) as e:
            raise DataError(f"{p}: damaged calibration metadata ({e})") from None
        try:
            for name, kind in layout.items():
                if kind in _JSON:
                    out.add(name, values[name], kind)
                elif kind == "ragged":
                    out.add(name, [data[f"{name}.{i}"] for i in range(out.samples)], kind)
                else:
                    out.add(name, data[name], kind)
        except KeyError as e:
            raise DataError(f"{p}: calibration input {e} is missing") from None
        except ValueError as e:
            raise DataError(f"{p}: {e}") from None
        return out

    # ------------------------------------------------------------------------------------------------ use
    def first(self, n: int | None) -> "CalibInputs":
        """The first n samples (all when n is None or larger)."""
        if n is None or n >= self.samples:
            return self
        out = CalibInputs(self.cls, n, source=self.source)
        for name, v in self.tensors.items():
            kind = self.layout[name]
            out.tensors[name], out.layout[name] = (v if kind in ("shared", "const") else v[:n]), kind
        return out

    def to(self, device) -> "CalibInputs":
        """The same samples with every tensor on `device` (validate runs the artifact where its model lives)."""
        out = CalibInputs(self.cls, self.samples, source=self.source, tokens=self.tokens)
        for name, v in self.tensors.items():
            kind = self.layout[name]
            out.tensors[name] = (v if kind in _JSON else [t.to(device) for t in v] if kind == "ragged"
                                 else v.to(device))
            out.layout[name] = kind
        return out

    def forward_kwargs(self, device=None, dtype: torch.dtype | None = None) -> dict:
        """The forward's keyword arguments for all samples as one batch (floating tensors in dtype, on device)."""
        def conv(t):
            t = t.to(device) if device is not None else t
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        flat = {}
        for name, v in self.tensors.items():
            kind = self.layout[name]
            if kind == "values":
                flat[name] = list(v)
            elif kind == "const":
                flat[name] = v
            elif kind == "list":
                flat[name] = [conv(t) for t in v.unbind(0)]
            elif kind == "ragged":
                flat[name] = [conv(t) for t in v]
            else:
                flat[name] = conv(v)
        return _unflatten(flat)

    def sample_numel(self) -> int:
        """Values per sample of the first input (the latents: hidden_states, x or sample)."""
        name = next(iter(self.tensors))
        v, kind = self.tensors[name], self.layout[name]
        t = v[0] if kind in ("ragged", "values", "list", "batch") else v   # (const: not a tensor)
        return t.numel() if isinstance(t, torch.Tensor) else 0


def _flatten(kwargs: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *path, last = name.split("/")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out
