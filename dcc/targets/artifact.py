"""Artifact folders, written atomically: tensors go to safetensors shards in a temporary folder beside the output,
with config, tokenizer files and the dcc.json manifest; the folder is renamed into place only when complete.
The writer refuses outputs it must not touch (the working folder, the inputs, anything but a dcc artifact with
--force), holds a lock beside the output, and turns every failed write into one line naming the file. A compile that
checkpoints its blocks keeps its folder when interrupted, as .NAME.partial, for `--resume` (dcc/compiler/resume.py)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError
from .spool import Spool

MANIFEST = "dcc.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json", "vocab.txt")
CHECKPOINT_DIR, JOURNAL = "resume", "journal.json"   # a resumable compile's state, inside the temporary folder


class OutputError(ValueError):
    """A refused output path; the message is one line naming the path and what is wrong."""


class OutputExistsError(OutputError):
    pass


class ArtifactWriteError(OSError):
    """A write failed; the message is "PATH: cannot write (reason)"."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (row-major), hashed in place: no copy of a gigabyte weight to a bytes object."""
    t = t.detach().contiguous().cpu()
    flat = t.reshape(-1)
    return hashlib.sha256((flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).numpy()).hexdigest()


def is_artifact(path: Path) -> bool:
    """True if path holds a dcc.json manifest of a dcc artifact: the only kind of folder --force may replace."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == "dcc-artifact"
    except (OSError, ValueError, AttributeError):  # no manifest, not JSON (or not UTF-8), not an object
        return False


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _write(path: Path, fn: Callable, *args):
    """Run one write; an OSError or a safetensors error (not an OSError) becomes one line naming the file."""
    try:
        return fn(*args)
    except (OSError, SafetensorError) as e:
        err = ArtifactWriteError(f"{path}: cannot write ({getattr(e, 'strerror', None) or e})")
        err.errno = getattr(e, "errno", None)
        raise err from e


def _umask() -> int:
    old = os.umask(0)  # the only way to read the umask is to set it
    os.umask(old)
    return old


class ArtifactWriter:
    """Collects tensors (sharded by size), then finalize() writes index, config, manifest and renames.

    Everything that can be refused is checked in the constructor, before any work: a file in the way, an existing
    output without force, a folder that force must not replace, another dcc process writing the same output, and
    too little free space (need_bytes). protect names inputs (the source model) that must never be replaced; the
    current working folder is always protected. An interrupted compile's folder (one holding a checkpoint journal:
    .NAME.partial, or the temporary folder of a process that died) is continued with resume, removed with force,
    and otherwise refused with a line saying so."""

    def __init__(self, out: str | os.PathLike, force: bool = False, shard_bytes: int = 2 << 30,
                 protect: Iterable[str | os.PathLike] = (), need_bytes: int = 0,
                 log: Callable[[str], None] | None = None, resume: bool = False):
        self.out = Path(out).resolve()
        self.force, self.shard_bytes = force, shard_bytes
        self.protect = [Path.cwd().resolve()] + [Path(p).resolve() for p in protect]
        self.log = log or logging.getLogger(__name__).warning
        self.lock = self.out.parent / f".{self.out.name}.lock"
        self._spool: Spool | None = None   # the shard being written
        self.weight_map: dict[str, str] = {}
        self._written: list[str] = []
        self._locked = self._done = False
        self.tmp: Path | None = None
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.resumed = False                # the temporary folder is an interrupted compile's, adopted
        self._checkpointed = False          # a checkpoint refers to the spool: a flush keeps its file
        self._stale_spools: list[Path] = []

        self._check_path()
        if self.out.exists():
            if not force:
                raise OutputExistsError(f"{self.out}: already exists (use --force to replace it)")
            self._check_replaceable()
        made = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        try:
            _write(self.out.parent, self.out.parent.mkdir, 0o777, True, True)
            self._take_lock()
            self._remove_stale_temps()
            self._take_partial(resume, force)
            # what an adopted compile has written already is part of the estimate
            self._check_space(need_bytes - (sum(f.stat().st_size for f in self.tmp.iterdir() if f.is_file())
                                            if self.resumed else 0))
            if self.tmp is None:
                self.tmp = Path(_write(self.out.parent, tempfile.mkdtemp, "",
                                       f".{self.out.name}.tmp-{os.getpid()}-", self.out.parent))
        except BaseException:
            if self.resumed:   # refused after all: the interrupted compile goes back where it was found
                os.rename(self.tmp, self.partial)
            self._release_lock()
            for p in made:  # leave no empty folders behind a refusal (rmdir fails, harmlessly, if not empty)
                try:
                    p.rmdir()
                except OSError:
                    pass
            raise

    # ------------------------------------------------------------------------------------------------ checks

    def _check_path(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: exists and is not a folder")
        for p in self.out.parents:
            if p.exists():
                if not p.is_dir():
                    raise OutputError(f"{self.out}: cannot create the output folder: {p} is a file")
                return

    def _check_replaceable(self) -> None:
        """--force replaces a dcc artifact, never the working folder, an input, or a folder holding either."""
        for i, p in enumerate(self.protect):
            what = "the current working folder" if i == 0 else f"the input {p}"
            if p == self.out:
                raise OutputError(f"{self.out}: is {what}; --force never replaces it")
            if p.is_relative_to(self.out):
                raise OutputError(f"{self.out}: contains {what}; --force never replaces it")
        if not is_artifact(self.out):
            raise OutputError(f"--force replaces only a dcc artifact folder (with a {MANIFEST} manifest); "
                              f"{self.out} is not one, so it is left alone")

    def _check_space(self, need_bytes: int) -> None:
        if need_bytes <= 0:
            return
        free = shutil.disk_usage(self.out.parent).free
        if free < need_bytes:
            raise OutputError(f"{self.out}: the artifact needs about {need_bytes / 2**20:.0f} MiB "
                              f"but only {free / 2**20:.0f} MiB are free there")

    # ------------------------------------------------------------------------------------------------ lock

    def _take_lock(self) -> None:
        # a few tries: after removing a stale lock, another process may take it first (then we see its live pid)
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_lock()
                continue
            except OSError as e:
                raise ArtifactWriteError(f"{self.lock}: cannot write ({e.strerror or e})") from e
            self._locked = True
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            return
        raise OutputError(f"{self.out}: cannot take the lock {self.lock}; another dcc process keeps taking it")

    def _clear_stale_lock(self) -> None:
        try:
            pid = int(self.lock.read_text().strip())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid_alive(pid):
            raise OutputError(f"{self.out}: another dcc process (pid {pid}) is writing this output; "
                              "wait for it to finish or stop it")
        self.lock.unlink(missing_ok=True)
        self.log(f"removed stale lock {self.lock} left by process {pid}, which is no longer running"
                 if pid is not None else f"removed unreadable lock {self.lock}")

    def _release_lock(self) -> None:
        if self._locked:
            self._locked = False
            self.lock.unlink(missing_ok=True)

    def _dead_temps(self) -> list[tuple[Path, str]]:
        prefix = f".{self.out.name}.tmp-"
        found = []
        for p in self.out.parent.iterdir():
            pid = p.name[len(prefix):].split("-", 1)[0] if p.name.startswith(prefix) else ""
            if pid.isdigit() and p.is_dir() and not pid_alive(int(pid)):
                found.append((p, pid))
        return found

    def _remove_stale_temps(self) -> None:
        """Temporary folders of crashed runs (.NAME.tmp-PID-*) are removed; those of live processes are not, nor
        those holding a checkpoint journal (a killed compile that --resume continues)."""
        for p, pid in self._dead_temps():
            if not (p / CHECKPOINT_DIR / JOURNAL).is_file():
                shutil.rmtree(p, ignore_errors=True)
                self.log(f"removed stale temporary folder {p} left by process {pid}, which is no longer running")

    def _take_partial(self, resume: bool, force: bool) -> None:
        """An interrupted compile of this output (the newest, if a killed process left another): adopted as this
        run's temporary folder with resume, removed with force, else refused naming both ways on."""
        found = [p for p, _ in self._dead_temps() if (p / CHECKPOINT_DIR / JOURNAL).is_file()]
        if self.partial.is_dir():
            found.append(self.partial)
        found.sort(key=lambda p: (p / CHECKPOINT_DIR / JOURNAL).stat().st_mtime_ns
                   if (p / CHECKPOINT_DIR / JOURNAL).is_file() else -1)
        for p in found[:-1]:
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"removed {p}, an older interrupted compile of {self.out.name}")
        if not found:
            return
        p = found[-1]
        if resume and (p / CHECKPOINT_DIR / JOURNAL).is_file():
            self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            _write(self.tmp, os.rename, p, self.tmp)
            self.resumed = True
        elif force or not (p / CHECKPOINT_DIR / JOURNAL).is_file():
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"discarded the interrupted compile in {p} (--force)" if force else f"removed {p}: it holds "
                     f"no checkpoint to resume from")
        else:
            raise OutputError(f"{self.out}: an interrupted compile of this output is kept in {p} "
                              f"({checkpoint_progress(p)}): --resume continues it, --force discards it")

    @property
    def journal(self) -> Path:
        """Where a resumable compile keeps its checkpoint journal (the files it names lie beside it)."""
        return self.tmp / CHECKPOINT_DIR / JOURNAL

    # ------------------------------------------------------------------------------------------------ writing

    def __contains__(self, name: str) -> bool:
        """Whether tensor `name` was added (written or in the shard being written)."""
        return name in self.weight_map or (self._spool is not None and name in self._spool.entries)

    def add(self, name: str, t: torch.Tensor) -> None:
        """Queue a tensor for the current shard: its bytes go to the shard's spool file now (dcc/targets/spool.py),
        so the writer holds no tensor and its memory does not grow with the model."""
        if name in self:
            raise ValueError(f"artifact tensor {name} written twice")
        if self._spool is None:
            self._spool = _write(self.tmp, Spool, self.tmp)
        _write(self._spool.path, self._spool.add, name, t)
        if self._spool.nbytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._spool is None or not len(self._spool):
            return
        fname = f"model-{len(self._written) + 1:05d}.safetensors"
        spool, self._spool = self._spool, None
        # a checkpoint may still name this spool: its file goes at the next commit()
        _write(self.tmp / fname, spool.write, self.tmp / fname, {"format": "pt"}, self._checkpointed)
        if self._checkpointed:
            self._stale_spools.append(spool.path)
        for k in spool.entries:
            self.weight_map[k] = fname
        self._written.append(fname)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """The shards written and the spool's content so far, on disk: what restore() continues from."""
        self._checkpointed = True
        spool = _write(self._spool.path, self._spool.state) if self._spool is not None else None
        return {"written": list(self._written), "weight_map": dict(self.weight_map), "spool": spool}

    def take_stale(self) -> list[Path]:
        """The spools written out into shards since the last call, which a checkpoint taken now no longer names: the
        caller deletes them once that checkpoint is on disk (the previous one may still name them until then)."""
        stale, self._stale_spools = self._stale_spools, []
        return stale

    def commit(self) -> None:
        """A checkpoint naming state() is on disk: spools written out into shards before it are not needed."""
        for p in self._stale_spools:
            p.unlink(missing_ok=True)
        self._stale_spools = []

    def restore(self, state: dict) -> None:
        """Continue from state(): what was written after it (a shard, a spool, bytes of a block that did not finish)
        is dropped."""
        keep = set(state["written"]) | ({state["spool"]["file"]} if state["spool"] else set())
        missing = sorted(f for f in keep if not (self.tmp / f).is_file())
        if missing:   # checked before anything is touched
            raise FileNotFoundError(f"{missing[0]} is missing")
        self._checkpointed = True
        self._written, self.weight_map = list(state["written"]), dict(state["weight_map"])
        for p in self.tmp.iterdir():
            if p.is_file() and p.name not in keep:
                p.unlink()
        self._spool = _write(self.tmp, Spool.reopen, self.tmp, state["spool"]) if state["spool"] else None

    def _drop_checkpoint(self) -> None:
        """The artifact is being finished: the checkpoint and the spools it kept go (they are not the artifact's)."""
        self.commit()
        if (self.tmp / CHECKPOINT_DIR).exists():
            shutil.rmtree(self.tmp / CHECKPOINT_DIR, ignore_errors=True)

    def _write_json(self, name: str, obj: dict, indent: int) -> None:
        path = self.tmp / name
        _write(path, path.write_text, json.dumps(obj, indent=indent, sort_keys=True) + "\n")

    def finalize(self, config: dict, manifest: dict, source: Path | None = None) -> Path:
        try:
            self._write_folder(config, manifest, source)
            self._set_modes()
            self._move_into_place()
        finally:
            self._release_lock()
        self._done = True
        return self.out

    def _write_folder(self, config: dict, manifest: dict, source: Path | None) -> None:
        self._flush()
        self._drop_checkpoint()
        # names that do not depend on the number of shards known in advance: rename to -of- form now
        n = len(self._written)
        renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
                   for i, f in enumerate(self._written)}
        for old, new in renames.items():
            _write(self.tmp / new, os.rename, self.tmp / old, self.tmp / new)
        self.weight_map = {k: renames[v] for k, v in sorted(self.weight_map.items())}
        if n > 1:
            self._write_json("model.safetensors.index.json", {"metadata": {}, "weight_map": self.weight_map}, 1)
        self._write_json("config.json", config, 2)
        if source is not None:
            for f in TOKENIZER_FILES:
                if (Path(source) / f).is_file():
                    _write(self.tmp / f, shutil.copyfile, Path(source) / f, self.tmp / f)
        files = sorted(p.name for p in self.tmp.iterdir() if p.is_file())
        self._write_json(MANIFEST, dict(manifest, files={f: sha256_file(self.tmp / f) for f in files}), 1)

    def _set_modes(self) -> None:
        # mkdtemp makes the folder 0700 (private while half-written); the finished artifact gets the modes any
        # other output would have under the user's umask
        mask = _umask()
        for p in self.tmp.iterdir():
            _write(p, os.chmod, p, 0o666 & ~mask)
        _write(self.tmp, os.chmod, self.tmp, 0o777 & ~mask)

    def _move_into_place(self) -> None:
        """Rename the finished folder to out. An artifact already there is renamed aside first and removed only
        after the new one is in place, so out holds an artifact at every moment except between two renames."""
        if not self.out.exists():
            _write(self.out, os.rename, self.tmp, self.out)
            return
        if not self.force:
            raise OutputExistsError(f"{self.out}: appeared while compiling (use --force to replace it)")
        self._check_replaceable()  # what appeared must itself be a dcc artifact
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        _write(self.out, os.rename, self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except OSError as e:
            try:
                os.rename(old, self.out)  # put the previous artifact back
            except OSError:
                raise ArtifactWriteError(f"{self.out}: cannot write ({e.strerror or e}); the previous artifact "
                                         f"is kept at {old}") from e
            raise ArtifactWriteError(f"{self.out}: cannot write ({e.strerror or e})") from e
        shutil.rmtree(old, ignore_errors=True)

    def abort(self, keep: bool = False) -> Path | None:
        """Remove the temporary folder and the lock; after finalize() it does nothing. keep: a folder holding a
        checkpoint journal is kept instead, renamed to .NAME.partial (returned), for --resume."""
        kept = None
        if not self._done and self.tmp is not None:
            if self._spool is not None:
                self._spool._f.close()
            if keep and self.journal.is_file():
                kept = self.tmp   # not renamed: the next run still finds it, a dead process's folder with a journal
                if not self.partial.exists():
                    try:
                        os.rename(self.tmp, self.partial)
                        kept = self.partial
                    except OSError:
                        pass
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self._release_lock()
        return kept


def checkpoint_progress(folder: Path) -> str:
    """'3 of 8 blocks done', read off an interrupted compile's journal."""
    try:
        j = json.loads((folder / CHECKPOINT_DIR / JOURNAL).read_text())
        return f"{int(j['done'])} of {int(j['blocks'])} blocks done"
    except (OSError, ValueError, KeyError, TypeError):
        return "its checkpoint journal is unreadable"
