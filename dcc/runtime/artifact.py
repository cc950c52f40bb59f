"""Read a dcc artifact folder: check its manifest and file checksums, and decode every quantized linear back to the
16-bit weight the engine's kernel reconstructs (no compiler needed)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.loader import ModelLoadError, TensorIndex
from ..targets.artifact import MANIFEST, sha256_file
from ..targets.base import TargetError, get_format

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ArtifactError(ValueError):
    """A damaged or unknown artifact; the message names the file or tensor."""


@dataclass
class Artifact:
    path: Path
    manifest: dict
    config: dict
    tensors: TensorIndex

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.get("dtype", "float16")]

    def format_of(self, layer: str):
        """The target Format (dcc.targets.base.Format) a quantized layer is stored in."""
        fmt = self.manifest["layers"][layer].get("format")
        try:
            return get_format(fmt)[1]
        except TargetError:
            raise ArtifactError(f"{self.path}: layer {layer} has format {fmt!r}, which this runtime cannot decode"
                                ) from None

    def quantized_layers(self) -> dict[str, dict]:
        return {k: v for k, v in self.manifest["layers"].items() if "skip_reason" not in v}

    def decode(self, layer: str) -> torch.Tensor:
        """The [N, K] weight of a quantized layer, exactly as the kernel reconstructs it (in the format's
        decoded_dtype: 16-bit where the kernel forms a 16-bit weight, float32 where the GEMM applies the scales to
        integers and never does)."""
        entry = self.manifest["layers"][layer]
        fmt = self.format_of(layer)
        try:
            return fmt.decode(self.tensors, layer, entry)
        except KeyError as e:
            raise ArtifactError(f"{self.path}: layer {layer} is missing tensor {e}") from None


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"{p}: not an artifact folder")
    mf = p / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{p}: no {MANIFEST} (not written by dcc compile, or incomplete)")
    try:
        manifest = json.loads(mf.read_text())
        config = json.loads((p / "config.json").read_text())
    except (ValueError, FileNotFoundError) as e:
        raise ArtifactError(f"{p}: unreadable manifest or config.json ({e})") from None
    if manifest.get("format") != "dcc-artifact":
        raise ArtifactError(f"{mf}: not a dcc artifact manifest")
    if verify:
        for f, digest in manifest.get("files", {}).items():
            if not (p / f).is_file():
                raise ArtifactError(f"{p / f}: listed in the manifest but missing")
            if sha256_file(p / f) != digest:
                raise ArtifactError(f"{p / f}: checksum differs from the manifest (file changed or corrupt)")
    try:
        tensors = TensorIndex(p)
    except ModelLoadError as e:
        raise ArtifactError(str(e)) from None
    return Artifact(p, manifest, config, tensors)
