"""bench/_compiled.py: the accuracy benchmarks' compile step gives the artifact folder and the loaded artifact inside
the block, and removes the folder after it."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 (autouse fixture)

from dcc.api import CompileOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _compiled import compiled  # noqa: E402  (bench/ is not a package)


def test_compiled_yields_the_artifact_and_cleans_up(tmp_path):
    cfg = decoder_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, max_position_embeddings=64)
    save_tiny(tmp_path / "m", cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (4 * 32,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
    opts = CompileOptions(target="tinychat", algo="rtn", group_size=64, calib=str(tmp_path / "calib.txt"),
                          calib_chunks=4, calib_seq_len=32, progress=False)
    with compiled(str(tmp_path / "m"), opts) as (out, art, secs):
        assert (out / "dcc.json").is_file() and any(out.glob("*.safetensors"))
        assert art.manifest["target"] == "tinychat" and isinstance(secs, float)
        kept = out
    assert not kept.exists()
