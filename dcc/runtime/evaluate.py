"""GPTQ-style perplexity: the evaluation text tokenized once, cut into non-overlapping windows of seq_len tokens,
ppl = exp(mean next-token NLL over every predicted token of every window)."""
from __future__ import annotations

import math
import sys

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, device: str = "cpu", progress: bool = True,
               desc: str = "perplexity") -> dict:
    """windows [n, L] token ids; returns {"ppl", "nll", "tokens", "windows", "seq_len"}."""
    model.eval()
    total_nll, total_tok = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr, leave=False):
        batch = windows[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tok += batch[:, 1:].numel()
    mean = total_nll / total_tok
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tok, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1])}
