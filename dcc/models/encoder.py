"""The encoder adapter: encoder-only transformers (the BERT family, post-LayerNorm) built as transformers' base model
(AutoModel: BertModel), whose sentence embedding is the mean of the last hidden states over the real tokens (as
sentence-transformers' mean pooling); evaluated by the cosine between the artifact's and the float model's embeddings
of a text file's lines."""
from __future__ import annotations

import inspect
import sys

import torch
from tqdm.auto import tqdm

from .adapter import ModelAdapter
from .text import DataError, check_vocab, load_tokenizer, read_text, tokenize_file, windows

EVAL_BATCH = 8   # sentences per forward in `dcc eval`


class Encoder(ModelAdapter):
    kind = "encoder"
    eval_option = "--text"
    compares = "last hidden states and mean-pooled embeddings"

    def auto_class(self, config):
        from transformers import AutoModel
        return AutoModel

    def build_kwargs(self, config, keys) -> dict:
        """Without the pooler when the checkpoint has none of its weights (sentence-transformers saves none):
        mean pooling does not use it, and a skeleton with it would expect tensors the file lacks."""
        cls = self.auto_class(config)._model_mapping[type(config)]
        if keys is None or "add_pooling_layer" not in inspect.signature(cls.__init__).parameters:
            return {}
        has_pooler = any(k.startswith("pooler.") or ".pooler." in k for k in keys)
        return {} if has_pooler else {"add_pooling_layer": False}

    def forward_kwargs(self, batch) -> dict:
        if isinstance(batch, dict):
            return dict(batch)
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}

    def max_tokens(self, config: dict) -> int | None:
        return config.get("max_position_embeddings")

    def calibration(self, lm, path, chunks, seq_len) -> torch.Tensor:
        """Windows of seq_len consecutive tokens of the file, each framed as a sequence ([CLS] ... [SEP]) where the
        tokenizer has those tokens."""
        limit = self.max_tokens(lm.config.to_dict())
        if limit and seq_len > limit:
            raise DataError(f"{path}: --calib-seq-len {seq_len} is longer than {lm.path.name}'s "
                            f"{limit} positions (max_position_embeddings); use --calib-seq-len {limit} or less")
        tok = load_tokenizer(lm.path)
        ids = tokenize_file(path, tok)
        check_vocab(ids, lm.config.vocab_size, path)
        cls, sep = _frame(tok)
        if cls is None or seq_len < 3:
            return windows(ids, chunks, seq_len, path)
        inner = windows(ids, chunks, seq_len - 2, path)
        col = lambda t: torch.full((inner.shape[0], 1), t, dtype=inner.dtype)   # noqa: E731
        return torch.cat([col(cls), inner, col(sep)], dim=1)

    def eval_data(self, tokenizer, config, path, seq_len, limit) -> list[dict]:
        """Batches of the file's non-empty lines, padded, with their attention masks. With a tokenizer each line is
        one sentence (truncated to the positions the model has); a token-id file's lines are cut into windows."""
        cap = min(seq_len, self.max_tokens(config) or seq_len)
        lines = [ln for ln in read_text(path).split("\n") if ln.strip()]
        seqs = []
        for ln in lines:
            if tokenizer is not None:
                seqs.append(torch.tensor(tokenizer(ln, truncation=True, max_length=cap)["input_ids"]))
                continue
            try:
                ids = torch.tensor([int(t) for t in ln.split()], dtype=torch.long)
            except ValueError:
                raise DataError(f"{path}: the model has no tokenizer, so this file must hold whitespace-separated "
                                f"token ids") from None
            seqs += [w for w in ids.split(cap) if w.numel() >= 2]
        seqs = seqs[:limit] if limit else seqs
        if not seqs:
            raise DataError(f"{path}: no line of at least 2 tokens to embed")
        for s in seqs:
            check_vocab(s, config["vocab_size"], path)
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        batches = []
        for i in range(0, len(seqs), EVAL_BATCH):
            group = seqs[i:i + EVAL_BATCH]
            n = max(s.numel() for s in group)
            ids = torch.full((len(group), n), pad, dtype=torch.long)
            mask = torch.zeros(len(group), n, dtype=torch.long)
            for j, s in enumerate(group):
                ids[j, :s.numel()], mask[j, :s.numel()] = s, 1
            batches.append({"input_ids": ids, "attention_mask": mask})
        return batches

    @torch.no_grad()
    def embed(self, model, batch, device="cpu") -> torch.Tensor:
        """Mean-pooled sentence embeddings [n, hidden] (float32) of one batch."""
        kw = {k: v.to(device) for k, v in self.forward_kwargs(batch).items()}
        h = model(**kw).last_hidden_state.float()
        return mean_pool(h, kw["attention_mask"]).cpu()

    def evaluate(self, model, data, baseline=None, device="cpu", progress=True) -> dict:
        if baseline is None:
            raise ValueError("an encoder is evaluated against its float model: give --baseline MODEL")
        model.eval(), baseline.eval()
        got, ref = [], []
        for b in tqdm(data, desc="embeddings", unit="batch", disable=not progress, file=sys.stderr, leave=False):
            got.append(self.embed(model, b, device))
            ref.append(self.embed(baseline, b))
        got, ref = torch.cat(got).double(), torch.cat(ref).double()
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        tokens = int(sum(int(b["attention_mask"].sum()) for b in data))
        return {"artifact": {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                             "sentences": int(cos.numel()), "tokens": tokens},
                # how alike the float model finds different sentences: a cosine to judge the one above by
                "baseline": {"between_sentences_cosine": _between(ref)}}

    def report(self, results: dict) -> list[str]:
        a, b = results["artifact"], results["baseline"]
        return [f"artifact  embedding cosine to the float model: mean {a['cosine_mean']:.5f}, min "
                f"{a['cosine_min']:.5f} ({a['sentences']} sentences, {a['tokens']} tokens, mean pooling)",
                f"baseline  cosine between different sentences (float model): {b['between_sentences_cosine']:.5f}"]

    def outputs(self, model, ids):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()

    def compare(self, ref, got) -> dict:
        ones = torch.ones(ref.shape[:2])
        cos = torch.nn.functional.cosine_similarity(mean_pool(got.double(), ones), mean_pool(ref.double(), ones),
                                                    dim=-1)
        return {"hidden_rel_err": float((got - ref).norm() / ref.norm()),
                "embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min())}

    def describe_comparison(self, cmp: dict) -> str:
        return (f"last hidden states: relative error {cmp['hidden_rel_err']:.3e}; mean-pooled embeddings: cosine "
                f"mean {cmp['embedding_cosine_mean']:.5f}, min {cmp['embedding_cosine_min']:.5f}")


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of h [n, L, d] over the positions where mask [n, L] is 1."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def _between(e: torch.Tensor) -> float:
    """Mean cosine between the embeddings of different sentences (nan for a single sentence)."""
    if e.shape[0] < 2:
        return float("nan")
    u = torch.nn.functional.normalize(e, dim=-1)
    sim = u @ u.T
    n = e.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def _frame(tok) -> tuple[int | None, int | None]:
    """The ids that open and close a sequence ([CLS], [SEP]), or (None, None)."""
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    return (cls, sep) if cls is not None and sep is not None else (None, None)
