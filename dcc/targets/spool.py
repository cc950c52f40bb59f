"""A safetensors file written without holding its tensors: each tensor's bytes go to a spool file as it arrives, and
write() lays the final file out from there in copies of a few MB, so a writer's memory does not grow with the shard.

The bytes are exactly those of safetensors.torch.save_file(tensors, path, metadata) for the same tensors (tested):
- the header is compact JSON (no spaces), "__metadata__" first, then one entry per tensor {"dtype", "shape",
  "data_offsets"} in data order, padded with spaces to a multiple of 8 bytes and preceded by its length (u64 LE);
- the data order is safetensors' own: by dtype in the rank its serializer gives them (wider and later dtypes first:
  I64, F64, F32, I32, BF16, F16, F8, I8, U8, BOOL in 0.8), then by name (byte order). The rank is read once from the
  installed safetensors by serializing one element of each dtype, so a version that orders otherwise is followed.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as _st_save

# torch dtype -> safetensors dtype name (those dcc artifacts hold; anything else is refused with its name)
ST_NAMES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
            torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
            torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
COPY_BYTES = 8 << 20   # one read/write of the final layout
_RANK: dict[torch.dtype, int] | None = None


def dtype_rank() -> dict[torch.dtype, int]:
    """The installed safetensors' data order of dtypes: serialize one element of each under names that sort against
    that order, and read back where each landed."""
    global _RANK
    if _RANK is None:
        probe = {f"t{i:02d}": torch.zeros(1, dtype=dt) for i, dt in enumerate(ST_NAMES)}
        blob = _st_save(probe)
        n = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8:8 + n])
        header.pop("__metadata__", None)
        order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        dts = list(ST_NAMES)
        _RANK = {dts[int(k[1:])]: i for i, k in enumerate(order)}
    return _RANK


class Spool:
    """Tensors for one safetensors file, kept on disk (in a spool file in `folder`) until write()."""

    def __init__(self, folder: Path):
        fd, name = tempfile.mkstemp(prefix=".spool-", dir=folder)
        self.path = Path(name)
        self._f = os.fdopen(fd, "wb")
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}   # name -> dtype, shape, at, len
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in ST_NAMES:
            raise ValueError(f"artifact tensor {name}: dtype {t.dtype} cannot be stored in safetensors here")
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.entries[name] = (t.dtype, tuple(t.shape), self.nbytes, len(data))
        self._f.write(data)
        self.nbytes += len(data)

    def state(self) -> dict:
        """What reopen() needs to continue this spool after a restart (a resumable compile's checkpoint): its bytes
        so far are flushed to disk first."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return {"file": self.path.name, "nbytes": self.nbytes,
                "entries": {k: [ST_NAMES[dt], list(shape), at, n] for k, (dt, shape, at, n) in self.entries.items()}}

    @classmethod
    def reopen(cls, folder: Path, state: dict) -> "Spool":
        """The spool as state() saw it: bytes appended after that point (a block that did not finish) are cut."""
        self = cls.__new__(cls)
        self.path = Path(folder) / state["file"]
        self._f = open(self.path, "r+b")
        self._f.truncate(state["nbytes"])
        self._f.seek(state["nbytes"])
        dtypes = {n: dt for dt, n in ST_NAMES.items()}
        self.entries = {k: (dtypes[d], tuple(shape), at, n) for k, (d, shape, at, n) in state["entries"].items()}
        self.nbytes = state["nbytes"]
        return self

    def write(self, path: Path, metadata: dict[str, str] | None = None, keep: bool = False) -> None:
        """Lay the file out at `path` (save_file's bytes) and delete the spool (keep: leave it, for a checkpoint
        that still refers to it)."""
        self._f.close()
        rank = dtype_rank()
        names = sorted(self.entries, key=lambda k: (rank[self.entries[k][0]], k.encode()))
        header: dict = {"__metadata__": metadata} if metadata else {}
        at = 0
        for k in names:
            dt, shape, _, n = self.entries[k]
            header[k] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [at, at + n]}
            at += n
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        with open(self.path, "rb") as src, open(path, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)))
            dst.write(text)
            for k in names:
                _, _, off, n = self.entries[k]
                src.seek(off)
                while n:
                    chunk = src.read(min(n, COPY_BYTES))
                    dst.write(chunk)
                    n -= len(chunk)
        if not keep:
            self.discard()

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)
