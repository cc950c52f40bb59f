"""The artifact writer refuses outputs it must not touch (the working folder, inputs, folders that are not dcc
artifacts, paths under a file, a busy or too small output), replaces an artifact atomically, cleans up after crashed
runs, names the file of a failed write, and leaves files with the modes the umask gives."""
import errno
import gc
import json
import os
import shutil
import stat
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file

import dcc.targets.artifact as artifact
from dcc.targets.artifact import MANIFEST, ArtifactWriteError, ArtifactWriter, OutputError, OutputExistsError


def _write(out, tensors=None, **kw):
    w = ArtifactWriter(out, **kw)
    for k, t in (tensors or {"w": torch.arange(4.0)}).items():
        w.add(k, t)
    return w.finalize({"model_type": "tiny"}, {"format": "dcc-artifact", "version": 1})


def _fake_artifact(folder):
    """A folder whose manifest says dcc artifact, so that only the rule under test can refuse it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({"format": "dcc-artifact"}))
    (folder / "keep.txt").write_text("precious")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid no longer names a process
    return p.pid


# ------------------------------------------------------------------------------------------------ refusals

def test_force_on_cwd_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    _fake_artifact(work)
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="is the current working folder; --force never replaces it"):
        ArtifactWriter(".", force=True)
    assert (work / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_force_on_parent_of_cwd_refused(tmp_path, monkeypatch):
    _fake_artifact(tmp_path / "a")
    (tmp_path / "a" / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(OutputError, match="contains the current working folder"):
        ArtifactWriter(tmp_path / "a", force=True)
    assert (tmp_path / "a" / "keep.txt").read_text() == "precious"


def test_force_on_non_artifact_folder_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OutputError) as e:
        ArtifactWriter(out, force=True)
    assert str(e.value) == (f"--force replaces only a dcc artifact folder (with a dcc.json manifest); {out} is not "
                            "one, so it is left alone")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no lock, no temporary folder


def test_force_on_protected_source_and_its_parent_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "models" / "src"
    _fake_artifact(src)
    with pytest.raises(OutputError, match=f"is the input {src}; --force never replaces it"):
        ArtifactWriter(src, force=True, protect=[src])
    with pytest.raises(OutputError, match=f"contains the input {src}"):
        ArtifactWriter(tmp_path / "models", force=True, protect=[str(src / "model.gguf")])
    assert (src / "keep.txt").read_text() == "precious"


def test_without_force_existing_output_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="already exists .use --force to replace it.") as e:
        ArtifactWriter(tmp_path / "out")
    assert isinstance(e.value, OutputError)


def test_output_under_a_file_refused(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=f"cannot create the output folder: {tmp_path / 'file.txt'} is a file"):
        ArtifactWriter(tmp_path / "file.txt" / "sub" / "out")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        ArtifactWriter(tmp_path / "file.txt", force=True)
    assert (tmp_path / "file.txt").read_text() == "x"


def test_not_enough_space_refused(tmp_path):
    out = tmp_path / "new" / "out"
    need = shutil.disk_usage(tmp_path).free + (1 << 40)
    with pytest.raises(OutputError, match=r"the artifact needs about \d+ MiB but only \d+ MiB are free there"):
        ArtifactWriter(out, need_bytes=need)
    assert list(tmp_path.iterdir()) == []  # no lock, no temporary folder, no folder made for it


# ------------------------------------------------------------------------------------------------ replacement

def test_force_replaces_an_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _write(tmp_path / "out", {"old": torch.zeros(3)})
    (out / "extra.txt").write_text("from the old run")
    seen = []  # what out held whenever something was deleted: the old artifact goes only once the new one is in
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (seen.append(list(load_file(out / "model.safetensors"))),
                                                          real(p, **kw)))
    assert _write(tmp_path / "out", {"new": torch.ones(2)}, force=True) == out
    assert seen == [["new"]]
    assert list(load_file(out / "model.safetensors")) == ["new"]
    assert not (out / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-, .tmp- or .lock left


def test_failed_final_rename_restores_the_old_artifact(tmp_path, monkeypatch):
    out = _write(tmp_path / "out", {"old": torch.zeros(3)})
    w = ArtifactWriter(out, force=True)
    w.add("new", torch.ones(2))
    real = os.rename

    def rename(src, dst):
        if str(src) == str(w.tmp) and str(dst) == str(out):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactWriteError, match=rf"{out}: cannot write \(Input/output error\)"):
        w.finalize({}, {"format": "dcc-artifact"})
    w.abort()
    assert list(load_file(out / "model.safetensors")) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_appeared_non_artifact_is_not_replaced(tmp_path):
    w = ArtifactWriter(tmp_path / "out", force=True)
    w.add("w", torch.ones(2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs.txt").write_text("x")
    with pytest.raises(OutputError, match="is not one, so it is left alone"):
        w.finalize({}, {"format": "dcc-artifact"})
    w.abort()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["theirs.txt"]


# ------------------------------------------------------------------------------------------------ lock and leftovers

def test_lock_held_by_live_process_refused(tmp_path):
    first = ArtifactWriter(tmp_path / "out")
    assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(OutputError, match=rf"another dcc process \(pid {os.getpid()}\) is writing this output; "
                                          "wait for it to finish or stop it"):
        ArtifactWriter(tmp_path / "out")
    assert (tmp_path / ".out.lock").exists() and first.tmp.is_dir()  # the refused writer took nothing away
    first.abort()
    ArtifactWriter(tmp_path / "out").abort()  # free again


def test_stale_lock_of_dead_process_taken_over(tmp_path):
    dead = _dead_pid()
    (tmp_path / ".out.lock").write_text(f"{dead}\n")
    notes = []
    w = ArtifactWriter(tmp_path / "out", log=notes.append)
    assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
    assert len(notes) == 1 and f"left by process {dead}, which is no longer running" in notes[0]
    w.abort()


def test_stale_temp_folder_of_dead_process_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abcd1234"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"half")
    notes = []
    w = ArtifactWriter(tmp_path / "out", log=notes.append)
    assert not stale.exists()
    assert notes == [f"removed stale temporary folder {stale} left by process {dead}, which is no longer running"]
    w.abort()


def test_temp_folder_of_live_process_kept(tmp_path):
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    notes = []
    w = ArtifactWriter(tmp_path / "out", log=notes.append)
    assert live.is_dir() and notes == []
    assert w.tmp.name.startswith(f".out.tmp-{os.getpid()}-") and w.tmp != live
    w.abort()


def test_abort_removes_temp_folder_and_lock(tmp_path):
    w = ArtifactWriter(tmp_path / "out")
    w.add("w", torch.ones(2))
    assert (tmp_path / ".out.lock").is_file() and w.tmp.is_dir()
    w.abort()
    w.abort()  # twice is harmless
    assert list(tmp_path.iterdir()) == []
    out = _write(tmp_path / "out")
    done = ArtifactWriter(tmp_path / "out2")
    done.finalize({}, {"format": "dcc-artifact"})
    done.abort()  # after finalize: keeps the artifact
    assert (out / MANIFEST).is_file() and (tmp_path / "out2" / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2"]


# ------------------------------------------------------------------------------------------------ writes

def test_write_error_names_the_file(tmp_path, monkeypatch):
    def fail(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(artifact.Spool, "write", fail)
    w = ArtifactWriter(tmp_path / "out")
    w.add("w", torch.ones(2))
    with pytest.raises(ArtifactWriteError) as e:
        w.finalize({}, {"format": "dcc-artifact"})
    assert str(e.value) == f"{w.tmp / 'model-00001.safetensors'}: cannot write (No space left on device)"
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_spool_write_error_names_the_spool_file(tmp_path, monkeypatch):
    """A full disk while a tensor's bytes are spooled (during the compile, not at the end) names that file."""
    w = ArtifactWriter(tmp_path / "out")
    w.add("a", torch.ones(2))

    def fail(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(artifact.Spool, "add", fail)
    with pytest.raises(ArtifactWriteError, match=r"\.spool-.*: cannot write \(No space left on device\)"):
        w.add("b", torch.ones(2))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_keeps_no_tensor(tmp_path):
    """Added tensors are on disk, not held: the writer's memory does not grow with the model."""
    w = ArtifactWriter(tmp_path / "out", shard_bytes=1 << 20)
    t = torch.arange(1000.0)
    ref = weakref.ref(t)
    w.add("t", t)
    t.zero_()            # a later change to the caller's tensor does not reach the artifact
    del t
    gc.collect()
    assert ref() is None
    assert "t" in w and "u" not in w
    out = w.finalize({}, {"format": "dcc-artifact"})
    assert torch.equal(load_file(out / "model.safetensors")["t"], torch.arange(1000.0))


def test_shards_split_by_size(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}   # 1 KiB each
    out = _write(tmp_path / "out", tensors, shard_bytes=2048)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for k, f in index["weight_map"].items():
        assert torch.equal(load_file(out / f)[k], tensors[k])
    assert not list(out.glob(".spool-*"))


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_finalized_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = _write(tmp_path / "out", {f"t{i}": torch.ones(8) for i in range(3)}, shard_bytes=16)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = list(out.iterdir())
    assert "model.safetensors.index.json" in {p.name for p in files}  # sharded: every kind of file is there
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}

