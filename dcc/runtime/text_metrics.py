"""What `dcc validate --model` compares a causal LM on: real text (--text, tokenized by the artifact's tokenizer and
cut into windows as `dcc eval --ppl` cuts it) or, without it, seeded random token ids, labelled as such wherever
they are reported; and both models' perplexity on the text, from the logits the comparison already holds."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..models.causal_lm import next_token_nll

RANDOM_LABEL = "random token ids (no --text given)"


def text_inputs(art, adapter, path, tokens: int, n_windows: int) -> tuple[torch.Tensor, dict]:
    """The first `n_windows` non-overlapping windows of `tokens` tokens of the file (fewer, with a note, where the
    text is shorter), and their account for the report."""
    from .evaluate import eval_data
    data = eval_data(art, adapter, path, tokens, None)   # every window of the text (it is tokenized once anyway)
    if data.shape[0] < n_windows:
        logging.getLogger("dcc").info(f"note: {path} holds {data.shape[0]} windows of {tokens} tokens; comparing "
                                      f"on those, not {n_windows}")
    ids = data[:n_windows]
    return ids, {"source": "text", "file": str(path), "windows": int(ids.shape[0]), "tokens_per_window": tokens,
                 "windows_in_file": int(data.shape[0])}


def random_inputs(vocab: int, n: int, tokens: int, seed: int) -> tuple[torch.Tensor, dict]:
    """The fallback: seeded uniform token ids (a measure of noise, not of text)."""
    from .validate import sample_ids
    return sample_ids(vocab, n, tokens, seed), {"source": RANDOM_LABEL, "windows": n, "tokens_per_window": tokens,
                                                "seed": seed}


def describe_inputs(info: dict) -> str:
    """One line: what the outputs were compared on."""
    if info["source"] == "text":
        return (f"compared on {Path(info['file']).name}: {info['windows']} windows x {info['tokens_per_window']} "
                f"tokens (of {info['windows_in_file']} in the file)")
    if info["source"] == RANDOM_LABEL:
        return (f"compared on {RANDOM_LABEL}: {info['windows']} x {info['tokens_per_window']} tokens, seed "
                f"{info['seed']}")
    return f"compared on {info['source']}" + (f" ({info['file']})" if info.get("file") else "")


def perplexities(ref_logits: torch.Tensor, got_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """Perplexity of the float model (ref) and of the artifact on the windows `ids`, GPTQ-style (every predicted
    token of every window), and the artifact's relative increase (0.05 = 5 % higher)."""
    nll_f, n = next_token_nll(ref_logits, ids)
    nll_q, _ = next_token_nll(got_logits, ids)
    ppl_f, ppl_q = math.exp(nll_f / n), math.exp(nll_q / n)
    return {"ppl_float": ppl_f, "ppl_artifact": ppl_q, "ppl_increase": ppl_q / ppl_f - 1, "ppl_tokens": n}


def describe_perplexity(cmp: dict) -> str:
    return (f"perplexity on the text: float {cmp['ppl_float']:.4f}, artifact {cmp['ppl_artifact']:.4f} "
            f"({cmp['ppl_increase'] * 100:+.2f} %, {cmp['ppl_tokens']} predicted tokens)")
