"""dcc/compiler/chunks.py: a large calibration batch runs through a block's graph a few sequences at a time, and what
the passes see (outputs, watched values, the linears' inputs, the compiled artifact) is what one run gives."""
import pytest
import torch

from dcc.compiler import chunks
from dcc.compiler.chunks import chunk_sizes, run_chunked


def test_chunk_sizes_depend_on_the_shape_only():
    assert chunk_sizes(16, 256) == [16]                      # 4096 tokens: one run, as before
    assert chunk_sizes(128, 2048) == [8] * 16                # 16384 tokens a run
    assert chunk_sizes(12, 2048, max_tokens=16384) == [6, 6]   # the largest divisor that fits
    assert chunk_sizes(7, 100, max_tokens=400) == [4, 3]     # no divisor near 4: full chunks and a rest
    assert chunk_sizes(3, 10 ** 6) == [1, 1, 1]              # a sequence longer than a chunk still runs whole
    assert sum(chunk_sizes(127, 2048)) == 127


def _toy(args, kwargs, watch):
    x, = args
    h = torch.tanh(x @ kwargs["w"]) * kwargs["scale"]        # scale: shared by the batch ([1, 1, d])
    if watch:
        watch["h"](h.reshape(-1, h.shape[-1]))               # a flattened [b * s, d] value
        watch["heads"](h.transpose(1, 2))
    return (h.sum(-1), None, kwargs["scale"])


def test_run_chunked_equals_one_run():
    g = torch.Generator().manual_seed(0)
    x, w, scale = torch.randn(7, 5, 4, generator=g), torch.randn(4, 6, generator=g), torch.randn(1, 1, 6, generator=g)
    seen1, seen2 = {}, {}
    want = _toy((x,), {"w": w, "scale": scale}, {k: (lambda v, k=k: seen1.__setitem__(k, v)) for k in ("h", "heads")})
    got = run_chunked(_toy, (x,), {"w": w, "scale": scale}, 7, [3, 3, 1],
                      {k: (lambda v, k=k: seen2.__setitem__(k, v)) for k in ("h", "heads")})
    assert torch.equal(got[0], want[0]) and got[1] is None and torch.equal(got[2], scale)
    assert torch.equal(seen2["h"], seen1["h"]) and torch.equal(seen2["heads"], seen1["heads"])


@pytest.fixture()
def tiny(tmp_path):
    from tiny_models import decoder_config, save_tiny
    d = tmp_path / "m"
    save_tiny(d, decoder_config("llama", hidden=128, heads=4, kv_heads=2, head_dim=32, layers=2,
                                intermediate_size=256), seed=1)
    ids = torch.randint(0, 100, (6 * 32,), generator=torch.Generator().manual_seed(2))
    (tmp_path / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
    return d, tmp_path / "calib.txt"


def _build(tiny, out, target: str, algo: str):
    """The tiny model compiled on 6 x 32 calibration tokens into `out`; the artifact's folder."""
    from dcc.api import CompileOptions, compile_model
    model, calib = tiny
    opts = CompileOptions(target=target, algo=algo, calib=str(calib), calib_chunks=6, calib_seq_len=32,
                          progress=False)
    return compile_model(str(model), str(out), opts, log=lambda m: None)


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.parametrize("target,algo", [("tinychat", "awq"), ("qserve", "qoq")])
def test_a_chunked_compile_gives_the_same_artifact(tiny, tmp_path, monkeypatch, target, algo):
    """6 sequences of 32 tokens run whole, then 2 sequences at a time (3 chunks): the same tensors (to float32
    rounding: a matrix product may group rows differently) and the same layers quantized."""
    whole = _tensors(_build(tiny, tmp_path / "whole", target, algo))
    calls = []
    real = chunks.run_chunked
    monkeypatch.setattr(chunks, "CHUNK_TOKENS", 64)
    monkeypatch.setattr("dcc.compiler.context.run_chunked",
                        lambda run, a, k, b, sizes, w=None: calls.append(sizes) or real(run, a, k, b, sizes, w))
    chunked = _tensors(_build(tiny, tmp_path / "chunked", target, algo))
    assert [2, 2, 2] in calls
    assert whole.keys() == chunked.keys()
    differ = 0
    for name, t in whole.items():
        if t.is_floating_point():
            assert torch.allclose(t.float(), chunked[name].float(), rtol=1e-2, atol=1e-3), name
        else:
            differ += int((t != chunked[name]).sum())
    total = sum(t.numel() for t in whole.values() if not t.is_floating_point())
    assert differ <= total // 1000, f"{differ} of {total} packed integers differ"


@pytest.mark.parametrize("target,algo", [("qserve", "qoq"), ("tinychat", "awq")])
def test_a_lean_compile_gives_the_same_artifact(tiny, tmp_path, monkeypatch, target, algo):
    """lean (compiler/context.py: the inputs of one linear at a time, for calibration sets whose inputs do not all
    fit the GPU): the same layers and tensors, up to float32 rounding (a smoothed input is collected again instead of
    divided in place), and never more than one feed held."""
    from dcc.compiler import context, sequential
    whole = _tensors(_build(tiny, tmp_path / "whole", target, algo))
    held = []

    class Lean(context.BlockContext):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "memory": "lean"})

        def _collect(self, only=None, stop=False):
            acts = super()._collect(only, stop)
            held.append(len({id(x) for x in acts.values()}))
            return acts

    monkeypatch.setattr(sequential, "BlockContext", Lean)
    lean = _tensors(_build(tiny, tmp_path / "lean", target, algo))
    assert held and max(held) == 1
    assert whole.keys() == lean.keys()
    for name, t in whole.items():
        if t.is_floating_point():
            assert torch.allclose(t.float(), lean[name].float(), rtol=1e-2, atol=1e-3), name
        else:
            assert int((t != lean[name]).sum()) <= max(8, t.numel() // 200), name


def test_gptq_stages_run_the_block_only_up_to_their_input(tiny, tmp_path, monkeypatch):
    """GPTQ's true-sequential stages collect each stage's input by a run that stops there (context.fresh_inputs):
    the graph's nodes after it are never computed, and the artifact is the one full runs give, bit for bit."""
    from dcc.compiler import context

    def build(name):
        out = _build(tiny, tmp_path / name, "qserve", "gptq")
        return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors"}

    stops, real = [], context._then_stop
    monkeypatch.setattr(context, "_then_stop", lambda fn, n, left: stops.append(n) or real(fn, n, left))
    stopped = build("stopped")
    assert len(stops) >= 2 * 3   # 2 blocks x the stages after the first (o, gate/up, down)
    monkeypatch.setattr(context.BlockContext, "fresh_inputs",
                        lambda self, lin: (self.invalidate(), self.inputs(lin))[1])   # the full runs of before
    full = build("full")
    assert stopped == full
