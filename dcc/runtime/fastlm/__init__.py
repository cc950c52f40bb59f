"""A fast decode path for Llama-family TinyChat (W4A16) and QServe (W4A8, W4A8KV4) artifacts (issue 29): a
hand-written decoder on the artifact's stored tensors with a static KV cache and the decode step in a CUDA graph;
the same code runs on the CPU with torch ops (reference numerics), which is how CI checks its structure.

    from dcc.runtime.fastlm import FastLlama, generate_fast, unsupported
    if unsupported(art) is None:
        res = generate_fast(FastLlama(art, "cuda"), prompt_ids, 64)
"""
from __future__ import annotations

from .decoder import FastLlama
from .run import generate_fast
from .spec import fast_path_problem, read_spec, unsupported

__all__ = ["FastLlama", "fast_path_problem", "generate_fast", "read_spec", "unsupported"]
