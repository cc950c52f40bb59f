"""Bad input through the `dcc` command, on a tiny random Llama saved as a Hugging Face folder (no ../shared needed):
--force never replaces what is not a dcc artifact, interrupted runs clean up, and every refusal is one true line
with the right exit code and nothing left behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_util import error_line, run
from tiny_models import decoder_config, save_tiny

ROOT = Path(__file__).resolve().parents[2]


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f".{name}.*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, calibration ids file): a 2-block Llama, hidden 64, vocab 100, no tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    save_tiny(d / "m", decoder_config("llama"))
    calib = d / "calib.txt"
    calib.write_text(" ".join(str((7 * i) % 100) for i in range(4 * 64)))
    return d / "m", calib


def compile_args(tiny, out, *extra):
    model, calib = tiny
    return ("compile", model, "--algo", "rtn", "--group-size", "64", "--calib", calib, "--calib-chunks", "2",
            "--calib-seq-len", "32", "-o", out, "-q", *extra)


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "a"
    code, text = run(*compile_args(tiny, out))
    assert code == 0, text
    return out


# ------------------------------------------------------------------------------------------------ --force and -o


def test_force_refuses_the_current_folder(tiny, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, text = run(*compile_args(tiny, ".", "--force"))
    assert code == 2, text
    assert (tmp_path / "notes.txt").read_text() == "mine"
    error_line(text)


def test_force_refuses_a_folder_that_is_not_an_artifact(tiny, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.csv").write_text("1,2,3")
    code, text = run(*compile_args(tiny, precious, "--force"))
    assert code == 2 and "dcc artifact" in error_line(text)
    assert (precious / "data.csv").read_text() == "1,2,3" and sorted(os.listdir(precious)) == ["data.csv"]


def test_force_refuses_the_source_model(tiny, tmp_path):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(tiny[0], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    # even a model folder that carries a dcc.json claiming to be an artifact is never replaced
    (model / "dcc.json").write_text(json.dumps({"format": "dcc-artifact"}))
    code, text = run("compile", model, "--algo", "rtn", "--group-size", "64", "--calib", tiny[1], "--calib-chunks",
                     "2", "--calib-seq-len", "32", "-o", model, "--force", "-q")
    assert code == 2, text
    error_line(text)
    assert all((model / n).read_bytes() == b for n, b in before.items())


def test_force_replaces_an_artifact_and_leaves_nothing_beside_it(tiny, artifact, tmp_path):
    import shutil
    out = tmp_path / "a"
    shutil.copytree(artifact, out)
    (out / "stale-extra.txt").write_text("from the old artifact")
    code, text = run(*compile_args(tiny, out, "--force"))
    assert code == 0, text
    assert not (out / "stale-extra.txt").exists() and (out / "dcc.json").is_file()
    assert leftovers(tmp_path, "a") == []


def test_artifact_files_honour_the_umask(artifact):
    # the test process runs under the usual 022 umask of a CI shell or a terminal
    umask = os.umask(0)
    os.umask(umask)
    assert (artifact.stat().st_mode & 0o777) == 0o777 & ~umask
    for f in artifact.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f.name


def test_output_or_dump_dir_under_a_file_is_refused_before_any_work(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    code, text = run(*compile_args(tiny, tmp_path / "file" / "out"))
    assert code == 2 and "file" in error_line(text)
    code, text = run(*compile_args(tiny, tmp_path / "o", "--dump-dir", tmp_path / "file" / "dumps"))
    assert code == 2 and "--dump-dir" in error_line(text)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path, "o") == []


def test_a_live_writer_holds_the_output(tiny, tmp_path):
    (tmp_path / ".o.lock").write_text(str(os.getppid()))   # a live process that is not this one
    code, text = run(*compile_args(tiny, tmp_path / "o"))
    assert code == 2 and str(os.getppid()) in error_line(text)
    assert not (tmp_path / "o").exists()


def test_a_dead_process_temporary_folder_is_removed_and_reported(tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"x" * 100)
    code, text = run(*compile_args(tiny, tmp_path / "o"))
    assert code == 0, text
    assert not stale.exists() and "stale" in text and str(dead.pid) in text


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tiny, tmp_path, sig):
    out = tmp_path / "o"
    model, calib = tiny
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "dcc", "compile", str(model), "--algo", "awq", "--group-size", "64", "--calib",
           str(calib), "--calib-chunks", "4", "--calib-seq-len", "64", "-o", str(out), "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the compile ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = [x for x in err.splitlines() if x.startswith("dcc: error:")]
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path, "o") == []


# ------------------------------------------------------------------------------------------------ true messages


def test_group_size_advice_lists_only_sizes_that_fit(tmp_path):
    """in_features 500 (not a multiple of 64): no group size of TinyChat's layout takes it, so keeping that layer in
    16 bits is the advice at group 64; at 128 no layer fits (the others are 64 wide), so 64 with keep is."""
    save_tiny(tmp_path / "m", decoder_config("llama", intermediate_size=500))
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(str(i % 100) for i in range(128)))
    code, text = run("compile", tmp_path / "m", "--group-size", "64", "--calib", calib, "-o", tmp_path / "o", "-q")
    line = error_line(text)
    assert code == 2 and "500" in line and "--group-size" not in line and "--unsupported keep" in line, line
    code, text = run("compile", tmp_path / "m", "--calib", calib, "-o", tmp_path / "o", "-q")
    line = error_line(text)
    assert code == 2 and "--group-size 64 (dcc runtime only) with --unsupported keep" in line, line
    assert "--group-size 32" not in line.split("; ", 1)[1], line   # 32 fits no more layers than 64 does


def test_group_size_advice_suggests_a_size_that_fits(tmp_path):
    """in_features 192 with group 128: 64 and 32 fit every layer, so they are what the error suggests."""
    save_tiny(tmp_path / "m", decoder_config("llama", hidden=64, intermediate_size=192))
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(str(i % 100) for i in range(128)))
    code, text = run("compile", tmp_path / "m", "--calib", calib, "-o", tmp_path / "o", "-q")
    line = error_line(text)
    assert code == 2 and "--group-size 64" in line and "--group-size 128" not in line, line


@pytest.mark.parametrize("opts,expect", [(("--bits", "3"), "4-bit"), (("--bits", "8"), "4-bit"),
                                         (("--group-size", "0"), "groups")])
def test_options_the_target_cannot_take_are_refused(tiny, tmp_path, opts, expect):
    model, calib = tiny
    code, text = run("compile", model, *opts, "--unsupported", "keep", "--calib", calib, "-o", tmp_path / "o", "-q")
    line = error_line(text)
    assert code == 2 and expect in line and "--group-size 64" not in line, line
    assert not (tmp_path / "o").exists()


def test_an_artifact_with_nothing_quantized_is_refused(tmp_path):
    """hidden 48 and MLP 96: no linear of this model fits TinyChat's 64-column blocks."""
    save_tiny(tmp_path / "m", decoder_config("llama", hidden=48, heads=4, kv_heads=2))
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(str(i % 100) for i in range(128)))
    code, text = run("compile", tmp_path / "m", "--group-size", "64", "--unsupported", "keep", "--calib", calib,
                     "-o", tmp_path / "o", "-q")
    assert code == 2 and "nothing quantized" in error_line(text)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path, "o") == []


@pytest.mark.parametrize("device,expect", [("cuda", "cuda"), ("tpu0", "not a device"), ("meta", "cpu or cuda")])
def test_devices_get_one_true_line(tiny, tmp_path, device, expect):
    import torch
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, text = run(*compile_args(tiny, tmp_path / "o", "--device", device))
    line = error_line(text)
    assert code == 2 and expect in line and "AssertionError" not in line and "Traceback" not in text, line


def test_calibration_counts_must_be_positive(tiny, tmp_path):
    model, calib = tiny
    code, text = run("compile", model, "--calib", calib, "--calib-chunks", "0", "-o", tmp_path / "o")
    assert code == 2 and "--calib-chunks" in text and "export" not in text


def test_validate_with_the_wrong_model_says_so(artifact, tmp_path):
    save_tiny(tmp_path / "other", decoder_config("llama", hidden=128))
    code, text = run("validate", artifact, "--model", tmp_path / "other")
    line = error_line(text)
    assert code == 2 and "hidden_size" in line and "other" in line, line


def test_inspect_checks_the_files(artifact, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    cfg = bad / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_size": 64', '"hidden_size": 65'))
    code, text = run("inspect", bad)
    assert code == 2 and "config.json" in error_line(text) and "checksum" in text


def test_eval_warns_beyond_the_context(tiny, artifact, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 100) for i in range(200)))
    code, text = run("eval", artifact, "--ppl", ids, "--seq-len", "100", "--windows", "1", "-q")
    assert code == 0, text
    assert "warning" in text and "64" in text   # max_position_embeddings of the tiny config


def test_a_closed_pipe_is_quiet():
    """`dcc passes | head -1`: the reader is gone before dcc writes (its end of the pipe closed first)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "dcc", "passes"], env=env, stdout=w, stderr=subprocess.PIPE,
                              timeout=120)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


def test_the_test_command_prints_its_summary_line():
    """pytest's summary ("N passed, M skipped") is hidden at -qq: the README's test command passes -q once."""
    import tomllib
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert (addopts.split().count("-q") + script.count(" -q")) <= 1
