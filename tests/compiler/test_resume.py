"""--resume (dcc/compiler/resume.py): a compile stopped after a block (Ctrl-C, SIGTERM, kill -9) continues from the
next block with --resume to the same bytes as an uninterrupted compile, for each causal-LM target; a checkpoint of
other inputs is refused naming what differs and kept; bad input removes it; fused linears split before the stop stay
split; the writer's checkpoint survives a shard written after it. A 4-block Llama (hidden 64, no tokenizer), run
in-process except for the kill -9."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_util import error_line, run
from dcc.cli import main as cli_main
from dcc.compiler import resume
from dcc.compiler.resume import Checkpoint, difference, fingerprint, worth_keeping
from dcc.targets.artifact import ArtifactWriter
from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401  (one_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parents[2]
SAVE = Checkpoint.save
TARGETS = {"tinychat": ("--algo", "awq", "--group-size", "64"), "qserve": ("--target", "qserve"),
           "nunchaku": ("--target", "nunchaku", "--rank", "16")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    save_tiny(d / "m", decoder_config("llama", layers=4))
    (d / "calib.txt").write_text(" ".join(str((7 * i + 3) % 100) for i in range(4 * 32)))
    return d


def args(tiny, out, target="tinychat", *extra):
    return ("compile", tiny / "m", *TARGETS[target], "--calib", tiny / "calib.txt", "--calib-chunks", "2",
            "--calib-seq-len", "32", "-o", out, "-q", *extra)


@pytest.fixture(scope="module")
def full(tiny):
    """Each target's artifact, compiled without interruption."""
    outs = {}
    for t in TARGETS:
        outs[t] = tiny / f"full-{t}"
        code, text = run(*args(tiny, outs[t], t))
        assert code == 0, text
    return outs


def ctrl_c():
    raise KeyboardInterrupt


def stop_after(monkeypatch, block: int, stop=ctrl_c):
    """Checkpoint.save records the blocks it saves and calls stop() once `block` is checkpointed."""
    saved, orig = [], SAVE

    def save(self, i, *a, **kw):
        orig(self, i, *a, **kw)
        saved.append(i)
        if i == block:
            stop()
    monkeypatch.setattr(Checkpoint, "save", save)
    return saved


def same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert (b / f.name).read_bytes() == f.read_bytes(), f.name


def journal(folder: Path) -> dict:
    return json.loads((folder / "resume" / "journal.json").read_text())


@pytest.mark.parametrize("target", list(TARGETS))
def test_an_interrupted_compile_resumes_to_the_same_bytes(tiny, full, tmp_path, monkeypatch, target):
    out, partial = tmp_path / "o", tmp_path / ".o.partial"
    stop_after(monkeypatch, 1)
    code, text = run(*args(tiny, out, target))
    assert code == 128 + signal.SIGINT and "interrupted" in error_line(text), text
    assert f"kept the interrupted compile in {partial} (2 of 4 blocks done)" in text and "--resume" in text
    assert not out.exists() and journal(partial)["done"] == 2
    before = (partial / "resume" / "journal.json").read_bytes()

    code, text = run(*args(tiny, out, target))   # neither --resume nor --force: refused, the checkpoint kept
    line = error_line(text)
    assert code == 2 and str(partial) in line and "--resume continues it" in line and "--force discards" in line
    assert (partial / "resume" / "journal.json").read_bytes() == before

    saved = stop_after(monkeypatch, -1)
    code, text = run(*args(tiny, out, target, "--resume"))
    assert code == 0, text
    assert "2 of 4 blocks were done" in text and saved == [2, 3]   # blocks 0 and 1 were not compiled again
    same_files(full[target], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]      # no partial folder, lock or spool left


def test_sigterm_twice_then_resume(tiny, full, tmp_path, monkeypatch):
    """A real SIGTERM after block 0, a resume stopped by SIGTERM again after block 2, a second resume."""
    out = tmp_path / "o"
    monkeypatch.setattr(cli_main, "_received", [])   # the signals this process saw: this test's only
    stop_after(monkeypatch, 0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, text = run(*args(tiny, out))
    assert code == 128 + signal.SIGTERM and "SIGTERM" in error_line(text), text
    stop_after(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, text = run(*args(tiny, out, "tinychat", "--resume"))
    assert code == 128 + signal.SIGTERM and "3 of 4 blocks done" in text, text
    saved = stop_after(monkeypatch, -1)
    code, text = run(*args(tiny, out, "tinychat", "--resume"))
    assert code == 0 and saved == [3], text
    same_files(full["tinychat"], out)


def test_fused_linears_split_before_the_interruption_stay_split(tmp_path, monkeypatch):
    """Phi-3's qkv_proj and gate_up_proj are split into their parts as each block is compiled; the manifest lists
    every block's, so the resumed compile splits the finished blocks' again."""
    import transformers as T
    save_tiny(tmp_path / "m", T.Phi3Config(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                           pad_token_id=0))
    (tmp_path / "c.txt").write_text(" ".join(str((7 * i + 3) % 100) for i in range(64)))

    def cmd(out, *extra):
        return ("compile", tmp_path / "m", "--algo", "rtn", "--group-size", "64", "--calib", tmp_path / "c.txt",
                "--calib-chunks", "2", "--calib-seq-len", "32", "-o", tmp_path / out, "-q", *extra)
    assert run(*cmd("full"))[0] == 0
    stop_after(monkeypatch, 0)
    assert run(*cmd("o"))[0] == 130
    stop_after(monkeypatch, -1)
    code, text = run(*cmd("o", "--resume"))
    assert code == 0, text
    splits = json.loads((tmp_path / "o" / "dcc.json").read_text())["source"]["split_linears"]
    assert len(splits) == 2 * 3
    same_files(tmp_path / "full", tmp_path / "o")


def test_other_inputs_are_refused_by_name_and_the_checkpoint_kept(tiny, full, tmp_path, monkeypatch):
    out, partial = tmp_path / "o", tmp_path / ".o.partial"
    model = tmp_path / "m"
    model.mkdir()
    for f in (tiny / "m").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    calib = tmp_path / "calib.txt"
    calib.write_text((tiny / "calib.txt").read_text())

    def cmd(*extra, model=model, calib=calib):
        return ("compile", model, *TARGETS["tinychat"], "--calib", calib, "--calib-chunks", "2", "--calib-seq-len",
                "32", "-o", out, "-q", *extra)
    stop_after(monkeypatch, 1)
    assert run(*cmd())[0] == 130
    monkeypatch.undo()
    before = (partial / "resume" / "journal.json").read_bytes()
    checks = [(cmd("--resume", "--seed", "1"), "--seed was 0, now 1"),
              (cmd("--resume", "--calib-chunks", "1"), "--calib-chunks was 2, now 1"),
              (cmd("--resume", "--algo", "rtn"), "option algo was \"awq\", now \"rtn\"")]
    calib2 = tmp_path / "calib2.txt"
    calib2.write_text(calib.read_text() + " 5")
    checks.append((cmd("--resume", calib=calib2), "calibration file has changed"))
    for c, why in checks:
        code, text = run(*c)
        line = error_line(text)
        assert code == 2 and why in line and "--force without --resume discards it" in line, line
    st = model / "model.safetensors"
    t = __import__("safetensors.torch", fromlist=["_"]).load_file(str(st))
    t["model.norm.weight"] = t["model.norm.weight"] * 2
    __import__("safetensors.torch", fromlist=["_"]).save_file(t, str(st), metadata={"format": "pt"})
    code, text = run(*cmd("--resume"))
    assert code == 2 and "model file model.safetensors has changed" in error_line(text), text
    assert (partial / "resume" / "journal.json").read_bytes() == before   # every refusal left it as it was
    (partial / "resume" / "hidden-00002.safetensors").unlink()
    code, text = run(*cmd("--resume", model=tiny / "m"))
    line = error_line(text)
    assert code == 2 and "is damaged (hidden-00002.safetensors is missing)" in line and "--force" in line, line
    code, text = run(*cmd("--force", model=tiny / "m"))   # --force without --resume: discarded, compiled anew
    assert code == 0 and "discarded the interrupted compile" in text, text
    same_files(full["tinychat"], out)
    assert not partial.exists()


def test_bad_input_removes_the_checkpoint_a_full_disk_keeps_it(tiny, tmp_path, monkeypatch):
    def fail(exc):
        def stop():
            raise exc
        return stop
    stop_after(monkeypatch, 1, fail(ValueError("a pass met something it cannot take")))
    code, text = run(*args(tiny, tmp_path / "o"))
    assert code == 2 and "cannot take" in error_line(text)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    stop_after(monkeypatch, 1, fail(OSError(28, "No space left on device")))
    code, text = run(*args(tiny, tmp_path / "o"))
    assert code != 0 and (tmp_path / ".o.partial" / "resume" / "journal.json").is_file(), text


def test_no_checkpoint_leaves_nothing_and_refuses_resume(tiny, tmp_path, monkeypatch):
    saved = stop_after(monkeypatch, -1)
    code, text = run(*args(tiny, tmp_path / "o", "tinychat", "--no-checkpoint", "--resume"))
    assert code == 2 and "--no-checkpoint" in error_line(text)
    code, text = run(*args(tiny, tmp_path / "o", "tinychat", "--no-checkpoint"))
    assert code == 0 and saved == [], text
    code, text = run(*args(tiny, tmp_path / "p", "tinychat", "--resume"))   # nothing to resume: from block 0
    assert code == 0 and "compiling from block 0" in text, text
    same_files(tmp_path / "o", tmp_path / "p")


def test_a_killed_compile_resumes(tiny, full, tmp_path):
    """kill -9 while block 2 is being emitted (its tensors in the spool, its checkpoint not written): no handler runs,
    the temporary folder stays under the dead process's name; --resume adopts it and cuts block 2's bytes."""
    out = tmp_path / "o"
    script = ("import os, signal, sys\n"
              "from dcc.targets.common.emit import BaseEmitter\n"
              "orig = BaseEmitter.on_block\n"
              "def on_block(self, block, ctx=None):\n"
              "    orig(self, block, ctx)\n"
              "    if block.index == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
              "BaseEmitter.on_block = on_block\n"
              "from dcc.cli.main import main\n"
              "main(sys.argv[1:])\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args(tiny, out))], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(tmp_path.glob(".o.tmp-*"))
    assert len(left) == 1 and journal(left[0])["done"] == 2
    spool = journal(left[0])["writer"]["spool"]
    assert (left[0] / spool["file"]).stat().st_size > spool["nbytes"]   # block 2's tensors, past the checkpoint
    code, text = run(*args(tiny, out, "tinychat", "--resume"))
    assert code == 0 and "2 of 4 blocks were done" in text, text
    same_files(full["tinychat"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_large_weight_files_are_fingerprinted_by_size_and_mtime(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "SMALL_FILE", 0)   # every file counts as large here
    st = tmp_path / "model.safetensors"
    st.write_bytes((tiny / "m" / "model.safetensors").read_bytes())
    (tmp_path / "README.md").write_text("not read by a compile")
    then = fingerprint(tmp_path, "0" * 64, {"--seed": 0}, {"dcc": "0.1.0"})
    assert sorted(k for k in then if k.startswith("model file")) == ["model file model.safetensors"]
    (tmp_path / "README.md").write_text("edited")
    assert difference(then, fingerprint(tmp_path, "0" * 64, {"--seed": 0}, {"dcc": "0.1.0"})) is None
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 1))
    now = fingerprint(tmp_path, "0" * 64, {"--seed": 0}, {"dcc": "0.1.0"})
    assert difference(then, now) == "model file model.safetensors has changed"
    assert difference(then, dict(then, **{"dcc version": "0.2.0"})) == "dcc version was 0.1.0, now 0.2.0"


def test_what_keeps_a_checkpoint():
    """Interruptions and exhausted resources keep it, also a signal an extension turned into its own error (as
    safetensors does: tests/cli/test_cli_signals.py); bad input does not."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
    except ValueError as e:
        assert worth_keeping(e)
    assert worth_keeping(OSError(28, "No space left on device")) and worth_keeping(MemoryError())
    assert not worth_keeping(ValueError("--calib-chunks 0: must be at least 1"))
    assert not worth_keeping(RuntimeError("pass awq failed on block model.layers.3"))


def test_writer_checkpoint_survives_a_shard_written_after_it(tmp_path):
    """Tensors of 1 KiB, shards of 3 KiB: the checkpoint after t3 names a spool that t5 then writes out into a
    shard; a restart restores the spool, cuts what came after, and ends with the uninterrupted writer's bytes."""
    ts = {f"t{i}": torch.arange(256, dtype=torch.float32) + i for i in range(9)}

    def write(w, names):
        for k in names:
            w.add(k, ts[k])

    ref = ArtifactWriter(tmp_path / "ref", shard_bytes=3 << 10)
    write(ref, list(ts))
    ref.finalize({}, {"format": "dcc-artifact"})

    w = ArtifactWriter(tmp_path / "out", shard_bytes=3 << 10)
    write(w, ["t0", "t1", "t2", "t3", "t4"])
    state = w.state()
    w.journal.parent.mkdir()
    w.journal.write_text(json.dumps({"done": 1, "blocks": 2}))
    w.commit()
    write(w, ["t5", "t6", "t7"])    # a shard is written (t3..t5), more goes to a new spool; then the process stops
    assert len(w._written) == 2
    assert w.abort(keep=True) == tmp_path / ".out.partial"
    w = ArtifactWriter(tmp_path / "out", shard_bytes=3 << 10, resume=True)
    assert w.resumed
    w.restore(state)
    write(w, ["t5", "t6", "t7", "t8"])
    w.finalize({}, {"format": "dcc-artifact"})
    same_files(tmp_path / "ref", tmp_path / "out")


def test_diffusion_models_refuse_resume(tmp_path):
    tiny_diffusers = pytest.importorskip("tiny_diffusers")
    pytest.importorskip("diffusers")
    tiny_diffusers.save(tmp_path / "m", "SanaTransformer2DModel")
    tiny_diffusers.write_calib(tmp_path / "calib.safetensors", "SanaTransformer2DModel")
    code, text = run("compile", tmp_path / "m", "--target", "nunchaku", "--calib", tmp_path / "calib.safetensors",
                     "-o", tmp_path / "o", "-q", "--resume")
    assert code == 2 and "--resume: not supported for diffusion models" in error_line(text), text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors", "m"]


def test_every_checkpoint_on_disk_names_files_that_exist(tiny, tmp_path, monkeypatch):
    """Shards written every block (a tiny shard size): whenever a checkpoint is about to be written (the previous
    one being the one on disk, which a kill would leave), every file that journal names is there -- the spools it
    names are deleted only once the next checkpoint is on disk."""
    orig_init = ArtifactWriter.__init__

    def small_shards(self, *a, **k):
        orig_init(self, *a, **{**k, "shard_bytes": 4096})
    monkeypatch.setattr(ArtifactWriter, "__init__", small_shards)
    checked = []

    class Checking:
        def submit(self, fn, *a):
            journal = fn.__self__.journal   # the Checkpoint whose _write this is
            if journal.is_file():
                j = json.loads(journal.read_text())
                names = list(j["writer"]["written"]) + ([j["writer"]["spool"]["file"]] if j["writer"]["spool"]
                                                        else [])
                missing = [n for n in names if not (journal.parent.parent / n).is_file()]
                checked.append(missing)
            from concurrent.futures import Future
            f = Future()
            fn(*a)
            f.set_result(None)
            return f
    monkeypatch.setattr(resume, "_POOL", Checking())
    code, text = run(*args(tiny, tmp_path / "o"))
    assert code == 0, text
    assert len(checked) >= 2 and all(m == [] for m in checked), checked
