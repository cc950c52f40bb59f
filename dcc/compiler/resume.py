"""Resumable compiles: after each block of a chain compile (causal LMs, encoders), what the rest of the compile needs
to go on from the next block is checkpointed in the output's temporary folder, under a journal that names the
compile's inputs by fingerprint; `--resume` checks the fingerprint and continues, to the same bytes.

What a checkpoint holds (dcc/targets/artifact.py keeps the folder, and names the journal):
- the block's emitted tensors: already on disk, in the writer's spool; the writer's state (shards written, the
  spool's entries and length) lets a restart cut whatever a block that did not finish appended;
- the calibration activations entering the next block, with torch's RNG state (the passes draw from it), in one
  safetensors file, replaced after each block;
- the emitter's manifest entries (its JSON-able state), the notes of the passes, and the fused linears each finished
  block split (ir/fused_linear.py: the manifest lists them);
- journal.json: blocks done, the fingerprint, and the above, written last and atomically (a kill while a block runs,
  or while its checkpoint is written, leaves the previous checkpoint whole).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..ir.fused_linear import SplitLinear, split_linears
from .gpu_memory import GpuMemoryError
from .spill import host_empty

FORMAT = "dcc-resume"
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcc-checkpoint")   # one write at a time, in order
SMALL_FILE = 1 << 20   # model files up to this size are hashed; larger ones are named by size and mtime
# what a compile reads of a model folder (weights, config, tokenizer: the artifact copies the tokenizer files)
MODEL_FILES = {".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja"}


def fingerprint(model: Path, calib_sha: str, recipe: dict, versions: dict) -> dict[str, str]:
    """What the artifact's bytes depend on, as named strings: the recipe as the caller names its parts (target,
    options, pipeline, seed, calibration shape, device kind, ...), the calibration file's sha256, the versions (dcc,
    torch, transformers), and the model's files (weights, config, tokenizer; not a README): sha256 of the small ones,
    size and mtime of the weights (hashing gigabytes on every resume would cost minutes; an edited or replaced file
    changes them, and so does a copy that does not keep mtimes: refused, not resumed wrongly)."""
    fp = {k: json.dumps(v, sort_keys=True) for k, v in recipe.items()}
    fp["calibration file"] = calib_sha
    fp.update({f"{k} version": str(v) for k, v in versions.items()})
    files = [model] if model.is_file() else sorted(p for p in model.iterdir() if p.is_file()
                                                  and p.suffix in MODEL_FILES and not p.name.startswith("."))
    for p in files:
        st = p.stat()
        if st.st_size <= SMALL_FILE:
            fp[f"model file {p.name}"] = "sha256 " + hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            fp[f"model file {p.name}"] = f"{st.st_size} bytes, mtime {st.st_mtime_ns}"
    return fp


def difference(then: dict[str, str], now: dict[str, str]) -> str | None:
    """One phrase naming the first input that differs between two fingerprints, or None."""
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key), now.get(key)
        if a == b:
            continue
        if a is None:
            return f"{key} is new"
        if b is None:
            return f"{key} is gone"
        if key.startswith("model file") or key == "calibration file":
            return f"{key} has changed"
        da, db = _loads(a), _loads(b)
        if isinstance(da, dict) and isinstance(db, dict):   # name the option, not the whole dict
            k = next(k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k))
            return f"{key} {k} was {json.dumps(da.get(k))}, now {json.dumps(db.get(k))}"
        return f"{key} was {_short(a)}, now {_short(b)}"
    return None


def _loads(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return None


def _short(v: str, n: int = 60) -> str:
    return v if len(v) <= n else v[: n - 3] + "..."


def worth_keeping(e: BaseException) -> bool:
    """Whether a failed compile's checkpoints should stay for --resume: an interruption (Ctrl-C, SIGTERM, also one
    an extension turned into its own error) or what the machine ran out of (memory, disk, a write error), found
    anywhere in the exception's chain. Bad input (a ValueError, a pass that cannot apply) would fail again the same
    way: its folder is removed (the API keeps an adopted one until its fingerprint is checked)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (KeyboardInterrupt, OSError, MemoryError, torch.cuda.OutOfMemoryError, GpuMemoryError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename over path, with the bytes on disk first: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoint:
    """Checkpoints of one compile in `journal`'s folder. The API builds it with the fingerprint, the emitter and the
    writer; load() continues an adopted folder; compile_blocks calls restore() once and save() after each block."""

    def __init__(self, journal: Path, fingerprint: dict[str, str], emitter, writer, log=print, name=None):
        self.journal, self.fp, self.emitter, self.writer, self.log = Path(journal), fingerprint, emitter, writer, log
        self.name = name or self.journal.parent.parent   # the folder, as the user knows it (errors name it)
        self.start = 0                       # blocks done (the first block this run compiles)
        self.blocks: int | None = None       # the model's, as the loaded journal says
        self.blocks_loaded = 0               # blocks the loaded journal held as done
        self.enabled = True
        self._data: dict | None = None
        self._pending = None   # (blocks done, the future writing their checkpoint)
        self._host: torch.Tensor | None = None   # the pinned buffer of GPU activations (_to_host)
        self.splits: dict[str, dict[str, list[int]]] = {}
        # the emitter's state that JSON cannot hold (its dtype, a plan) must not change while blocks are emitted
        self._fixed = {k: repr(v) for k, v in self._emitter_vars().items() if not _json_exact(v)}

    def _emitter_vars(self) -> dict:
        return {k: v for k, v in vars(self.emitter).items() if v is not self.writer}

    def load(self) -> int:
        """Read and check the adopted journal; restore the writer and the emitter. Returns the blocks done. A
        mismatch is a ValueError naming what differs."""
        try:
            data = json.loads(self.journal.read_text())
            if data.get("format") != FORMAT:
                raise ValueError("not a dcc checkpoint journal")
        except (OSError, ValueError) as e:
            raise ValueError(f"--resume: the checkpoint of the interrupted compile in {self.name} cannot be read "
                             f"({e}); --force without --resume discards it") from e
        why = difference(data["fingerprint"], self.fp)
        if why is not None:
            raise ValueError(f"--resume: the interrupted compile in {self.name} was made from other inputs ({why}); "
                             f"resume with the same ones, or --force without --resume discards it")
        try:
            if not (self.journal.parent / data["hidden"]).is_file():
                raise FileNotFoundError(f"{data['hidden']} is missing")
            self.writer.restore(data["writer"])
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--resume: the checkpoint of the interrupted compile in {self.name} is damaged ({e}); "
                             f"--force without --resume discards it") from e
        vars(self.emitter).update(data["emitter"])
        self._data, self.start, self.splits = data, int(data["done"]), data["splits"]
        self.blocks, self.blocks_loaded = int(data["blocks"]), self.start
        return self.start

    def restore(self, lm, args: tuple, device: torch.device) -> tuple[tuple, list[str]]:
        """After the prologues and block 0's inputs: the finished blocks' fused linears split again, the RNG as
        the last finished block left it, and the next block's input in place of args[0]. Returns (args, notes)."""
        if self._data is None:
            return args, []
        for prefix, widths in self.splits.items():
            split_linears(lm.model.get_submodule(prefix), widths)
        t = load_file(str(self.journal.parent / self._data["hidden"]))
        torch.set_rng_state(t["rng"])
        if "rng_cuda" in t and device.type == "cuda":
            torch.cuda.set_rng_state(t["rng_cuda"], device)
        if "hidden" in t:
            h = t["hidden"]
            if "hidden_stride" in t:   # the layout the block produced, in case a kernel's choice depends on it
                h = torch.empty_strided(h.shape, t["hidden_stride"].tolist(), dtype=h.dtype).copy_(h)
            args = (h.to(device),) + tuple(args[1:])
        return args, list(self._data["messages"])

    def save(self, i: int, n: int, lm, out: torch.Tensor, messages: list[str], device: torch.device) -> None:
        """Block i is done and packed: checkpoint what block i+1 needs. Nothing is written once disabled."""
        if not self.enabled:
            return
        state = self._emitter_vars()
        changed = [k for k, v in state.items() if (k in self._fixed) != (not _json_exact(v))
                   or (k in self._fixed and repr(v) != self._fixed[k])]
        if changed:
            self.enabled = False   # an earlier checkpoint stays valid: a resume starts there
            self.log(f"note: the emitter keeps state that cannot be checkpointed ({changed[0]}); checkpoints stop "
                     f"after block {self.start}")
            return
        prefix = lm.block_prefix(i)
        split = {name[len(prefix) + 1:]: [m.out_features for m in mod.children()]
                 for name, mod in lm.model.named_modules()
                 if isinstance(mod, SplitLinear) and name.startswith(prefix + ".")}
        if split:
            self.splits[prefix] = split
        self.journal.parent.mkdir(exist_ok=True)
        hidden = f"hidden-{i + 1:05d}.safetensors"
        tensors = {"rng": torch.get_rng_state()}
        if device.type == "cuda":
            tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
        self.wait()   # the previous checkpoint is on disk before this one is written (and its host buffer free)
        ready = None
        if i + 1 < n:
            tensors["hidden"], ready = self._to_host(out.detach().contiguous())
            if not out.is_contiguous():
                tensors["hidden_stride"] = torch.tensor(out.stride(), dtype=torch.int64)
        data = {"format": FORMAT, "version": 1, "done": i + 1, "blocks": n, "fingerprint": self.fp,
                "hidden": hidden, "writer": json.loads(json.dumps(self.writer.state())),
                "emitter": json.loads(json.dumps({k: v for k, v in state.items() if k not in self._fixed})),
                "messages": list(messages), "splits": json.loads(json.dumps(self.splits))}
        # written by a thread while the next block computes (an 8B model's activations at 128 x 2048 tokens are
        # 4 GB a block); the journal last, so a kill at any point leaves the previous checkpoint whole
        # the spools flushed into shards since the previous checkpoint are still named by it: they go only once this
        # one is on disk
        self._pending = (i + 1, _POOL.submit(self._write, hidden, tensors, data, self.writer.take_stale(), ready))

    def _to_host(self, x: torch.Tensor):
        """x on the host, and the CUDA event after which it is there (None: it is there now). From a GPU, the copy goes
        into one pinned buffer reused by every block (the caller has waited for the previous write) without stopping
        the host: queued on the compute stream, so the next block's kernels cannot change x before it is read, and
        the writing thread waits for the event. A synchronous copy of an 8B model's 2-4 GB of activations into
        pageable memory stopped the compile for seconds per block."""
        if not x.is_cuda:
            return x, None
        buf = self._host
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            self._host = buf = None   # the old buffer's pages go back before the new one is pinned
            buf = self._host = host_empty(x.shape, x.dtype)
        buf.copy_(x, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(x.device))
        return buf, ready

    def _write(self, hidden: str, tensors: dict, data: dict, stale: list[Path], ready=None) -> None:
        if ready is not None:
            ready.synchronize()
        _write_atomic(self.journal.parent / hidden, lambda p: save_file(tensors, str(p)))
        _write_atomic(self.journal, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))
        for p in self.journal.parent.glob("hidden-*.safetensors"):
            if p.name != hidden:
                p.unlink()
        for p in stale:
            p.unlink(missing_ok=True)

    def wait(self) -> None:
        """Until the checkpoint being written is on disk; raises its error, if writing it failed."""
        if self._pending is None:
            return
        done, job = self._pending
        self._pending = None
        job.result()
        self.start = done


def _json_exact(v) -> bool:
    """Whether v comes back equal from JSON (dicts with str keys, lists, str, numbers, bools, None)."""
    try:
        return json.loads(json.dumps(v)) == v
    except (TypeError, ValueError):
        return False
