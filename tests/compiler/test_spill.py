"""compiler/spill.py: calibration inputs held in host memory give the artifact of inputs held on the device, byte
for byte (each target's passes: AWQ and clip, QoQ's smoothing, rescale and GPTQ, SVDQuant's shifted inputs), and
the mode is chosen, forced and refused as api.plan_memory says. On the CPU, "host" and device are one memory: the
test checks that the spilled path ran (its host buffers were made) and that it computes the same bits."""
from pathlib import Path

import pytest
import torch

from cli_util import run
from dcc.compiler import chunks, spill
from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401  (one_thread: an autouse fixture)

TARGETS = {"tinychat": ("--algo", "awq", "--group-size", "64"), "qserve": ("--target", "qserve"),
           "nunchaku": ("--target", "nunchaku", "--rank", "16")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("spill")
    save_tiny(d / "m", decoder_config("llama", layers=2))
    (d / "calib.txt").write_text(" ".join(str((7 * i + 3) % 100) for i in range(4 * 32)))
    return d


def compile_in(tiny: Path, out: Path, target: str, mode: str, monkeypatch) -> int:
    """Compile with $DCC_CALIB_MEMORY=mode, the batch run one 32-token sequence at a time (so chunks are gathered)
    and row blocks of 16 (so the blocked reductions take several blocks); returns how many host buffers spill made."""
    made = []
    real = spill.host_empty

    def counting(shape, dtype):
        made.append(tuple(shape))
        return real(shape, dtype)
    monkeypatch.setenv("DCC_CALIB_MEMORY", mode)
    monkeypatch.setattr(chunks, "CHUNK_TOKENS", 32)
    monkeypatch.setattr(spill, "ROWS", 16)
    monkeypatch.setattr(spill, "host_empty", counting)
    monkeypatch.setattr(chunks, "host_empty", counting)
    code, text = run("compile", tiny / "m", *TARGETS[target], "--calib", tiny / "calib.txt", "--calib-chunks", "4",
                     "--calib-seq-len", "32", "-o", out, "-q")
    assert code == 0, text
    return len(made)


@pytest.mark.parametrize("target", list(TARGETS))
def test_spilled_inputs_give_the_same_bytes(tiny, tmp_path, monkeypatch, target):
    outs = {}
    for mode in ("full", "lean", "spill"):
        outs[mode] = tmp_path / mode
        made = compile_in(tiny, outs[mode], target, mode, monkeypatch)
        assert (made > 0) == (mode == "spill"), (mode, made)
    # spill is lean with the inputs elsewhere: every file the same. Full against lean: the same tensors and config
    # for AWQ and QoQ; dcc.json's per-layer output errors may differ, as a lean context collects a later linear's
    # inputs again after the quantizer has changed the linears before it (the full context holds them from
    # before) -- for SVDQuant that reaches the weights too (its later linears' low-rank branches see those inputs)
    pairs = [("lean", "spill", ())] + ([("full", "lean", ("dcc.json",))] if target != "nunchaku" else [])
    for a, b, skip in pairs:
        names = sorted(p.name for p in outs[a].iterdir())
        assert names == sorted(p.name for p in outs[b].iterdir())
        for name in names:
            if (outs[a] / name).is_file() and name not in skip:
                assert (outs[a] / name).read_bytes() == (outs[b] / name).read_bytes(), (a, b, name)


def test_blocked_absmax_and_divide_are_exact(monkeypatch):
    monkeypatch.setattr(spill, "ROWS", 7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 9, generator=g) * 100
    s = torch.rand(9, generator=g) + 0.5
    assert torch.equal(spill.absmax(x, torch.device("cpu")), x.abs().amax(0))
    assert torch.equal(spill.divide(x, s), x / s)
    assert torch.equal(spill.absmax(x[:0], torch.device("cpu")), torch.zeros(9))
    y = spill.to_host(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_a_wrong_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("DCC_CALIB_MEMORY", "disk")
    with pytest.raises(ValueError, match=r"DCC_CALIB_MEMORY='disk': one of auto, full, lean, spill"):
        spill.forced_mode()


def test_spilled_inputs_that_do_not_fit_the_host_are_refused(tiny, tmp_path, monkeypatch):
    """The host check reads MemAvailable: a compile whose spilled inputs exceed it stops before any work."""
    import dcc.api as api
    monkeypatch.setattr(api, "spilled_inputs_mb", lambda lm, tokens: 1e12)
    monkeypatch.setenv("DCC_CALIB_MEMORY", "spill")
    code, text = run("compile", tiny / "m", *TARGETS["tinychat"], "--calib", tiny / "calib.txt", "--calib-chunks",
                     "4", "--calib-seq-len", "32", "-o", tmp_path / "o", "-q")
    assert code != 0
    assert "in host memory they need about" in text and not (tmp_path / "o").exists()
