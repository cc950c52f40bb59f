"""bench/scale.py: the projection to the real depth and the merge of rows across commands (pure), and one --quick
row end to end on the CPU (the tiny Llama built as sharded safetensors, `dcc compile` in a child with per-block
times, the JSON and the table)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT.parent / "shared" / "assets"
sys.path.insert(0, str(ROOT / "bench"))

import _scale_report as report  # noqa: E402  (bench/ is not a package)


def test_projection_keeps_fixed_costs_and_block_zero():
    # 2 s outside the blocks, block 0 pays the capture (5 s), later blocks 1 s each (the median ignores the 9 s one)
    p = report.projection([5.0, 1.0, 9.0, 1.0], wall=18.0, full=80)
    assert p["fixed_s"] == 2.0 and p["block_first_s"] == 5.0 and p["block_median_s"] == 1.0
    assert p["projected_full_s"] == 2.0 + 5.0 + 79 * 1.0
    assert report.projection([], 3.0, 80) == {}


def test_timed_out_row_projects_from_the_blocks_done():
    # killed at 30 s inside block 3: each block's share runs from its start to the next one's (2.5 s: 2 s of compile,
    # 0.5 s of checkpoint), the fixed part is the 5 s before block 0 alone, and the projection says it is a bound
    res = {"timed_out": True, "rc": None, "wall_s": 30.0, "peak_rss_mb": 900, "gpu_used_before_mb": None,
           "gpu_used_peak_mb": None, "tail": ["dcc: error: interrupted (SIGTERM)"], "text": "",
           "events": [{"event": "block", "start": 5.0 + 2.5 * i, "seconds": 2.0} for i in range(3)]}
    row = report.summarise({"id": "8b/dcc-qserve/16x256", "tool": "dcc", "blocks": 32}, res, 32)
    assert row["status"] == "timed out" and row["blocks_done"] == 3
    assert row["block_s"] == [2.5, 2.5, 2.5] and row["fixed_s"] == 5.0
    assert row["projected_full_s"] == 5.0 + 32 * 2.5 and "lower bound" in row["projection_note"]


def test_row_seconds_caps_rows_by_glob():
    import scale   # bench/scale.py
    assert scale.row_limit(None, "8b/dcc-qserve/128x2048") == float("inf")
    assert scale.row_limit("90", "8b/llmc-awq/16x256") == 90.0
    spec = "*dcc-qserve*=150,8b/llmc-*=95"
    assert scale.row_limit(spec, "8b/dcc-qserve/128x2048") == 150.0
    assert scale.row_limit(spec, "8b/llmc-gptq/128x2048") == 95.0
    assert scale.row_limit(spec, "70b4/llmc-gptq/128x2048") == float("inf")   # no glob matches
    assert scale.row_limit("dcc-qserve*=170,*=60", "8b/dcc-qserve/128x2048") == 170.0   # the method alone
    assert scale.row_limit("dcc-qserve*=170,*=60", "8b/dcc-tinychat-awq/16x256") == 60.0


def test_merge_replaces_by_id_and_keeps_other_commands(tmp_path):
    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"rows": [{"id": "a", "status": "ok", "wall_s": 1},
                                        {"id": "b", "status": "ok", "wall_s": 2}], "recipes": {"x": {}}}))
    rows, extra = report.merge(out, [{"id": "a", "status": "ok", "wall_s": 3}],
                               [{"id": "b", "status": "not run"}, {"id": "c", "status": "not run"}])
    by = {r["id"]: r for r in rows}
    assert by["a"]["wall_s"] == 3            # this run's measurement replaces the old one
    assert by["b"]["wall_s"] == 2            # a row skipped now keeps the earlier measurement
    assert by["c"]["status"] == "not run"    # and is recorded where there was none
    assert extra == {"recipes": {"x": {}}}


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "smollm2_tokenizer").is_dir(), reason=f"needs ../shared/assets ({ASSETS})")
def test_quick_dcc_row(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--rows",
                        "tiny/dcc-tinychat-awq/*,tiny/dcc-tinychat-awq-noclip/*", "--dir", str(tmp_path),
                        "--assets", str(ASSETS)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((tmp_path / "scale_quick.json").read_text())
    row, noclip = sorted(doc["rows"], key=lambda r: r["id"])
    assert row["status"] == "ok", row.get("log_tail")
    # the row beside llm-compressor's AWQ runs its recipe: the scale search, then round to nearest (no clip search)
    assert noclip["status"] == "ok", noclip.get("log_tail")
    assert [p["pass"] for p in doc["recipes"]["dcc-tinychat-awq-noclip"]["recipe"]["pipeline"]] == ["awq", "rtn"]
    assert [p["pass"] for p in doc["recipes"]["dcc-tinychat-awq"]["recipe"]["pipeline"]] == ["awq", "clip", "rtn"]
    assert row["blocks_done"] == row["blocks"] == 2 and all(s > 0 for s in row["block_s"])
    assert row["peak_rss_mb"] > 100 and row["dcc_peak_rss_mb"] > 100
    assert row["projected_full_s"] > row["block_first_s"] and row["projected_blocks"] == 8
    assert doc["recipes"]["dcc-tinychat-awq"]["recipe"]["target"] == "tinychat"
    index = json.loads((tmp_path / "tiny" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1   # sharded, as the large checkpoints are
    assert "| tiny/dcc-tinychat-awq/4x64 | ok |" in p.stdout
