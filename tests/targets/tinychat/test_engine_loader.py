"""TinyChat's loader and W4A16 kernels as the judge of an artifact (dcc/targets/tinychat/loader_spec.py, written from
llm-awq d6e797a: WQLinear's buffers and asserts, gemm_forward_cuda_new's tiles): the manifest lists TinyChat only
where every layer loads and every layer's shape runs correctly and in bounds; check_artifact names each problem."""
import json

import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.targets.base import get_target
from dcc.targets.tinychat import loader_spec

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 - one_thread applies to this module


def _compile(tmp, name, hidden, inter, heads, kv, group=128):
    src = tmp / name
    save_tiny(src, decoder_config("llama", hidden=hidden, heads=heads, kv_heads=kv, layers=1,
                                  intermediate_size=inter))
    ids = torch.randint(0, 100, (2 * 32,), generator=torch.Generator().manual_seed(0))
    (tmp / "ids.txt").write_text(" ".join(map(str, ids.tolist())))
    opts = CompileOptions(target="tinychat", algo="rtn", group_size=group, calib=str(tmp / "ids.txt"),
                          calib_chunks=2, calib_seq_len=32, progress=False)
    return compile_model(str(src), str(tmp / f"{name}-art"), opts, log=lambda m: None)


def test_kernel_limits_from_the_gemm_source():
    assert loader_spec.kernel_problems(4096, 4096) == []
    assert loader_spec.kernel_problems(128, 768) == []
    small_k = loader_spec.kernel_problems(128, 512)       # split-K 2 at 8-32 tokens: prologue reads to 256 + 384
    assert any("8-32 tokens preloads 3 k tiles of 128 unmasked from 256" in p for p in small_k)
    odd = loader_spec.kernel_problems(256, 1152)          # 9 k tiles of 128: split-K 2 drops one
    assert any("not a multiple of 256" in p and "8-32 tokens" in p for p in odd)
    assert any("last 64 output columns" in p for p in loader_spec.kernel_problems(192, 1024))


def test_small_model_is_not_listed_for_tinychat(tmp_path):
    """hidden 128 (K < 768) and 64-wide k/v projections (N % 128): TinyChat's GEMM cannot run them."""
    art = _compile(tmp_path, "small", hidden=128, inter=256, heads=4, kv=2)
    manifest = json.loads((art / "dcc.json").read_text())
    assert manifest["engines"] == ["dcc-runtime"]
    notes = json.loads((art / "config.json").read_text())["quantization_config"]["kernel_notes"]
    assert any("reading past K" in n for n in notes) and any("output columns" in n for n in notes)
    problems = get_target("tinychat").check_artifact(load_artifact(art))
    assert problems and not any("missing" in p or "WQLinear holds" in p for p in problems)


@pytest.mark.slow
def test_shapes_tinychat_runs_are_listed(tmp_path):
    """hidden 768, MLP 2048, 6 heads of 128 with 6 kv heads: every K >= 768, K % 256 == 0 and N % 128 == 0."""
    art = _compile(tmp_path, "fits", hidden=768, inter=2048, heads=6, kv=6)
    assert json.loads((art / "dcc.json").read_text())["engines"] == ["tinychat", "dcc-runtime"]
    assert get_target("tinychat").check_artifact(load_artifact(art)) == []
