"""The Target registry: a third target defined in the test folder alone (tests/targets/toy_target.py) compiles,
inspects, validates and evaluates through the CLI, so nothing outside a target's folder needs to name it; and the
built-in targets' options are typed and checked."""
import json
import subprocess
from pathlib import Path

import pytest

from cli_util import run
from dcc.targets.base import TargetError, get_target, targets
from tiny_models import decoder_config, save_tiny

ROOT = Path(__file__).resolve().parents[2]


def test_a_target_from_the_test_folder_runs_through_the_cli(tmp_path):
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("toy_target", Path(__file__).with_name("toy_target.py"))
    mod = sys.modules["toy_target"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)   # registers "toy"
    assert "toy" in targets()
    save_tiny(tmp_path / "m", decoder_config("llama"))
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str((5 * i) % 100) for i in range(256)))
    out = tmp_path / "a"
    code, text = run("compile", tmp_path / "m", "--target", "toy", "--calib", ids, "--calib-chunks", "2",
                     "--calib-seq-len", "32", "-o", out, "-q")
    assert code == 0, text
    m = json.loads((out / "dcc.json").read_text())
    assert m["target"] == "toy" and {e["format"] for e in m["layers"].values()} == {"toy-int8-per-channel"}
    code, text = run("inspect", out)
    assert code == 0 and "14 of 14 linears quantized" in text, text
    code, text = run("validate", out, "--model", tmp_path / "m")
    assert code == 0 and "14/14 layers" in text and "top-1 agreement" in text, text
    code, text = run("eval", out, "--ppl", ids, "--seq-len", "32", "-q")
    assert code == 0 and "perplexity" in text, text
    code, text = run("compile", tmp_path / "m", "--target", "toy", "--bits", "4", "--calib", ids, "-o",
                     tmp_path / "b", "-q")
    assert code == 2 and "--bits 4" in text


def test_no_target_is_named_outside_its_folder_and_the_registry_line():
    out = subprocess.run(["git", "grep", "-n", "-i", r"qserve\|tinychat", "--", "dcc/"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    if not out and not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    stray = []
    for line in out.splitlines():
        path, _, text = line.split(":", 2)
        if path.startswith(("dcc/targets/tinychat/", "dcc/targets/qserve/")):
            continue
        if 'BUILTIN_TARGETS = ("tinychat", "qserve")' in text:   # the registry line
            continue
        stray.append(line)
    # what remains must be prose (docstrings and comments), never code that tests a target's name
    code = [s for s in stray if any(tok in s.split(":", 2)[2] for tok in ('== "', "== '", 'in ("', "import"))]
    assert not code, "\n".join(code)


def test_options_are_typed_and_checked():
    t = get_target("qserve")
    o = t.options(group_size=128)
    assert (o.algo, o.bits, o.gs, o.kv) == ("qoq", 4, 128, 4)
    assert t.options(bits=8, algo="smoothquant").kv is None
    with pytest.raises(TargetError, match="--zero"):
        t.options(zero="float")                     # a TinyChat option
    with pytest.raises(TargetError, match="--kv-bits"):
        get_target("tinychat").options(kv_bits="4")
    with pytest.raises(TargetError, match="--algo qoq"):
        get_target("tinychat").options(algo="qoq")
    with pytest.raises(TargetError, match="unknown target"):
        get_target("nope")
    o = get_target("tinychat").options(group_size=64)
    assert type(o).from_dict(o.to_dict()) == o
