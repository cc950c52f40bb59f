"""Artifact folders, written atomically: tensors go to safetensors shards in a temporary folder beside the output,
with config, tokenizer files and the dcc.json manifest; the folder is renamed into place only when complete."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

MANIFEST = "dcc.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class OutputExistsError(FileExistsError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()
                          ).hexdigest()


class ArtifactWriter:
    """Collects tensors (sharded by size), then finalize() writes index, config, manifest and renames."""

    def __init__(self, out: str | os.PathLike, force: bool = False, shard_bytes: int = 2 << 30):
        self.out = Path(out).resolve()
        if self.out.exists() and not force:
            raise OutputExistsError(f"{self.out}: already exists (use --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.force, self.shard_bytes = force, shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, str] = {}
        self._written: list[str] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map or name in self._pending:
            raise ValueError(f"artifact tensor {name} written twice")
        self._pending[name] = t.detach().contiguous().cpu()
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        fname = f"model-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, str(self.tmp / fname), metadata={"format": "pt"})
        for k in self._pending:
            self.weight_map[k] = fname
        self._written.append(fname)
        self._pending, self._pending_bytes = {}, 0

    def finalize(self, config: dict, manifest: dict, source: Path | None = None) -> Path:
        self._flush()
        # names that do not depend on the number of shards known in advance: rename to -of- form now
        n = len(self._written)
        renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
                   for i, f in enumerate(self._written)}
        for old, new in renames.items():
            (self.tmp / old).rename(self.tmp / new)
        self.weight_map = {k: renames[v] for k, v in sorted(self.weight_map.items())}
        if n > 1:
            (self.tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=1, sort_keys=True) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if source is not None:
            for f in TOKENIZER_FILES:
                if (source / f).is_file():
                    shutil.copyfile(source / f, self.tmp / f)
        files = sorted(p.name for p in self.tmp.iterdir() if p.is_file())
        manifest = dict(manifest, files={f: sha256_file(self.tmp / f) for f in files})
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if self.out.exists():
            if not self.force:
                raise OutputExistsError(f"{self.out}: appeared while compiling (use --force to replace it)")
            shutil.rmtree(self.out)
        os.rename(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
