"""The causal-LM adapter: AutoModelForCausalLM, calibration on consecutive token windows of a text file, and
GPTQ-style perplexity (the text tokenized once, cut into non-overlapping windows of seq_len tokens, ppl = exp(mean
next-token NLL over every predicted token of every window))."""
from __future__ import annotations

import logging
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from .adapter import ModelAdapter
from .text import bos_token, check_vocab, load_tokenizer, tokenize_file, windows


class CausalLM(ModelAdapter):
    kind = "causal-lm"
    eval_option = "--ppl"
    compares = "logits"

    def auto_class(self, config):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM

    def forward_kwargs(self, batch) -> dict:
        return {"input_ids": batch, "use_cache": False}

    def block_kwargs(self, kwargs: dict) -> dict:
        kwargs = super().block_kwargs(kwargs)
        kwargs["use_cache"] = False
        return kwargs

    def calibration(self, lm, path, chunks, seq_len) -> torch.Tensor:
        tok = load_tokenizer(lm.path)
        ids = tokenize_file(path, tok)
        check_vocab(ids, lm.config.vocab_size, path)
        return windows(ids, chunks, seq_len, path, bos=bos_token(tok))

    def eval_data(self, tokenizer, config, path, seq_len, limit) -> torch.Tensor:
        ctx_len = config.get("max_position_embeddings")
        if ctx_len and seq_len > ctx_len:
            logging.getLogger("dcc").warning(
                f"warning: --seq-len {seq_len} is beyond the model's context of {ctx_len} tokens "
                f"(max_position_embeddings): the perplexity measures extrapolation, not the model")
        ids = tokenize_file(path, tokenizer)
        check_vocab(ids, config["vocab_size"], path)
        return windows(ids, limit, seq_len, path, bos=bos_token(tokenizer))

    def evaluate(self, model, data, baseline=None, device="cpu", progress=True, on_timed=None) -> dict:
        out = {"artifact": perplexity(model, data, device=device, progress=progress, desc="artifact",
                                      on_timed=on_timed)}
        if baseline is not None:
            out["baseline"] = perplexity(baseline, data, progress=progress, desc="baseline")
        return out

    def report(self, results: dict) -> list[str]:
        return [f"{k:9} perplexity {r['ppl']:.3f} ({r['windows']} windows x {r['seq_len']} tokens)"
                for k, r in results.items()]

    def outputs(self, model, ids):
        return model(input_ids=ids, use_cache=False).logits.float()

    def compare(self, ref, got) -> dict:
        lp_f, lp_q = ref.log_softmax(-1), got.log_softmax(-1)
        kl = float((lp_f.exp() * (lp_f - lp_q)).sum(-1).mean())
        top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
        return {"kl": kl, "top1_agreement": top1, "logits_rel_err": float((got - ref).norm() / ref.norm())}

    def describe_comparison(self, cmp: dict) -> str:
        return (f"logits: KL {cmp['kl']:.4e}, top-1 agreement {cmp['top1_agreement'] * 100:.1f}%, "
                f"relative error {cmp['logits_rel_err']:.3e}")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, device: str = "cpu", progress: bool = True,
               desc: str = "perplexity", on_timed=None) -> dict:
    """windows [n, L] token ids; returns {"ppl", "nll", "tokens", "windows", "seq_len"}. on_timed(seconds of one
    batch) is called once the second batch is done (the first also captures each block's graph): the caller's
    estimate of the whole run."""
    model.eval()
    total_nll, total_tok = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr, leave=False):
        t0 = time.perf_counter()
        batch = windows[i:i + batch_size].to(device)
        nll, n = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
        total_nll += nll
        total_tok += n
        if i == batch_size and on_timed is not None:   # the second batch: the first also captured the graphs
            on_timed(time.perf_counter() - t0)
    mean = total_nll / total_tok
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tok, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1])}


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of the next-token NLL over every predicted token of `ids` [n, L], their count n * (L - 1))."""
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="sum")
    return float(nll), ids[:, 1:].numel()
