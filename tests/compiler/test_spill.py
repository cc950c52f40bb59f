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
    for mode in ("full", "spill", "lean"):
        outs[mode] = tmp_path / mode
        made = compile_in(tiny, outs[mode], target, mode, monkeypatch)
        assert (made > 0) == (mode == "spill"), (mode, made)
    # spill holds what full holds, elsewhere: every file the same. Lean: the same tensors and config for AWQ and
    # QoQ; dcc.json's per-layer output errors may differ, as a lean context collects a later linear's inputs again
    # after the quantizer has changed the linears before it (full holds them from before) -- for SVDQuant that
    # reaches the weights too (its later linears' low-rank branches see those inputs)
    pairs = [("full", "spill", ())] + ([("full", "lean", ("dcc.json",))] if target != "nunchaku" else [])
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


def test_the_mode_falls_from_full_to_spill_to_lean(tiny, monkeypatch):
    """auto: full where its estimate fits the GPU's free memory, else spill where the host has room, else lean; the
    GPU's free memory and the host's room are stood in for (the rule, not a device, is under test)."""
    import dcc.api as api
    from dcc.compiler import dist
    from dcc.models.loader import LazyModel
    lm = LazyModel(tiny / "m")
    opts = api.CompileOptions(calib=str(tiny / "calib.txt"), calib_chunks=4, calib_seq_len=32, device="cuda")
    ids = torch.zeros(4, 32, dtype=torch.long)
    monkeypatch.delenv("DCC_CALIB_MEMORY", raising=False)
    full = api.estimate_memory_mb(lm, 128)
    for free, host, want in ((full + 1, True, "full"), (full - 1, True, "spill"), (full - 1, False, "lean")):
        monkeypatch.setattr(api, "free_and_total_mb", lambda dev, free=free: (free, 2 * full))
        monkeypatch.setattr(api, "host_room", lambda mb, host=host: host)
        assert api.plan_memory(lm, ids, opts, dist.SINGLE)[2] == want
    monkeypatch.setenv("DCC_CALIB_MEMORY", "lean")   # forced
    assert api.plan_memory(lm, ids, opts, dist.SINGLE)[2] == "lean"
