"""The fast decoder on the GPU (dcc/runtime/fastlm with csrc/attn, w4a16, w4a8): its greedy tokens are the CPU
reference's (`dcc generate --exact`) for 32 new tokens on tiny TinyChat, QServe (per channel, g128; KV4) and
stories260K artifacts; the CUDA graph's replay gives the eager step's logits; a batch decodes each row as alone."""
from pathlib import Path

import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.runtime.fastlm import FastLlama, generate_fast
from dcc.runtime.generate import generate
from dcc.runtime.reference import build_model
from cuda_util import require_family
from tiny_models import decoder_config, one_thread, sampled_id_files, save_tiny  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STORIES = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K" / "hf"
CASES = {"tinychat": dict(target="tinychat", algo="rtn", group_size=64),
         "qserve": dict(target="qserve", algo="qoq-rtn", group_size=0),
         "qserve-g128": dict(target="qserve", algo="qoq-rtn", group_size=128),
         "stories-tinychat": dict(target="tinychat", algo="rtn", group_size=64, unsupported="keep"),
         "stories-qserve": dict(target="qserve", algo="qoq-rtn", unsupported="keep")}
PROMPT = [5, 17, 42, 8, 99]


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    for fam in ("attn", "w4a16", "w4a8"):
        require_family(fam)
    d = tmp_path_factory.mktemp("fastlm_cuda")
    out = {}
    for name, kw in CASES.items():
        if name.startswith("stories"):
            if not STORIES.is_dir():
                continue
            src, (calib, _) = STORIES, sampled_id_files(STORIES, d)
        else:
            hidden = 128 if name.endswith("g128") else 64
            src = d / f"m{hidden}"
            save_tiny(src, decoder_config("llama", hidden=hidden, heads=4, kv_heads=2, layers=2,
                                          max_position_embeddings=128), seed=0)
            calib = d / "calib.txt"
            calib.write_text(" ".join(map(str, torch.randint(0, 100, (128,), generator=torch.Generator()
                                                             .manual_seed(0)).tolist())))
        opts = CompileOptions(calib=str(calib), calib_chunks=4, calib_seq_len=32, progress=False, **kw)
        out[name] = load_artifact(compile_model(str(src), str(d / name), opts, log=lambda m: None))
    return out


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_the_cpu_reference(arts, case):
    if case not in arts:
        pytest.skip(f"needs ../shared/assets ({STORIES} is absent)")
    art = arts[case]
    prompt = [1, 403, 407] if case.startswith("stories") else PROMPT
    # approx 0: QServe's fused norm and SiLU with the stand-ins the CPU reference emulates, bit for bit
    got = generate_fast(FastLlama(art, "cuda", approx=0), prompt, 32)
    assert got.captures == 1 and got.steps == 31
    ref = generate(build_model(art), prompt, 32, cache=False, bucket=1)
    if got.tokens != ref.tokens:
        # a difference is a failure unless the reference itself was at a tie there (top-2 logits within 16-bit
        # rounding of each other: the GPU's fp16/bf16 activations may then pick the other one)
        i = next(k for k, (a, b) in enumerate(zip(ref.tokens[0], got.tokens[0])) if a != b)
        with torch.no_grad():
            logits = build_model(art)(input_ids=torch.tensor([prompt + ref.tokens[0][:i]]), use_cache=False).logits
        top = logits[0, -1].topk(2).values
        margin = float(top[0] - top[1])
        assert margin <= 5e-3 * max(1.0, float(top[0].abs())), (
            f"{case}: first difference at new token {i}: cpu {ref.tokens[0][i]}, cuda {got.tokens[0][i]}; the "
            f"reference's top-2 logit margin there is {margin:.3g} (not a tie)")


@pytest.mark.parametrize("case,sdpa", [("tinychat", False), ("tinychat", True), ("qserve", False)])
def test_graph_replay_equals_the_eager_step(arts, case, sdpa):
    from dcc.runtime.fastlm.graph import StepGraph
    lm = FastLlama(arts[case], "cuda", sdpa=sdpa)
    lm.allocate(3, 16)
    ids = torch.tensor([PROMPT, PROMPT[::-1], [7] * 5], device="cuda")
    first = lm.prefill(ids).argmax(-1)
    pos = torch.full((3,), 5, device="cuda")
    eager = lm.step(first, pos).clone()
    graph = StepGraph(lm, first, pos)
    for _ in range(2):   # replays rewrite the same slot with the same K/V
        logits, nxt = graph(first, pos)
        torch.cuda.synchronize()
        assert torch.allclose(logits, eager, rtol=0, atol=1e-3 * float(eager.abs().max()))
        assert torch.equal(nxt, eager.argmax(-1))
    cpu = FastLlama(arts[case], "cpu")   # the same step on the CPU (float32): the GPU's 16-bit rounding apart
    cpu.allocate(3, 16)
    cpu.prefill(ids.cpu())
    want = cpu.step(first.cpu(), pos.cpu())
    assert torch.allclose(eager.cpu(), want, rtol=0, atol=3e-2 * float(want.abs().max()))


@pytest.mark.parametrize("case", ["tinychat", "qserve"])
def test_a_batch_decodes_each_row_as_alone(arts, case):
    """Every row of a batch of one prompt decodes the same tokens; the first matches batch 1's (later ones may part
    only where batch 1's GEMMs, another kernel choice, round a near-tie the other way)."""
    lm = FastLlama(arts[case], "cuda")
    alone = generate_fast(lm, PROMPT, 12).tokens[0]
    rows = generate_fast(lm, PROMPT, 12, batch=5).tokens
    assert rows == [rows[0]] * 5 and rows[0][0] == alone[0] and len(rows[0]) == 12
