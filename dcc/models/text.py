"""Calibration and evaluation text: read a file the user names, tokenize it with the model folder's tokenizer (or
read token ids) and cut it into token windows. The model adapters build their batches from these."""
from __future__ import annotations

from pathlib import Path

import torch


class DataError(ValueError):
    """Unusable calibration or evaluation data; the message names the file."""


def read_text(path: str | Path) -> str:
    """UTF-8 text with CRLF line ends normalised to LF (WikiText-2's raw files ship with CRLF)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise DataError(f"{p}: the file is empty")
    return text


def tokenize_file(path: str | Path, tokenizer) -> torch.Tensor:
    """All tokens of a file as one 1-D LongTensor. Without a tokenizer the file must hold integer token ids."""
    text = read_text(path)
    if tokenizer is None:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise DataError(f"{path}: the model has no tokenizer, so this file must hold whitespace-separated "
                            f"token ids") from None
        return torch.tensor(ids, dtype=torch.long)
    # the whole text at once (GPTQ-style); verbose=False: it is longer than the model context on purpose
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def bos_token(tokenizer) -> int | None:
    """The token the tokenizer puts before a text by default (Gemma's <bos>, Llama-2's <s>), or None (SmolLM2, GPT-2,
    a model without a tokenizer). A model trained with it expects it at position 0: Gemma-3-270M on WikiText-2
    (2 x 512 tokens) has perplexity 52.5 without it and 19.5 with it, so windows for such models start with it."""
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is None:
        return None
    first = tokenizer("a", verbose=False)["input_ids"][:1]
    return tokenizer.bos_token_id if first == [tokenizer.bos_token_id] else None


def windows(ids: torch.Tensor, n: int | None, length: int, source: str = "data", bos: int | None = None
            ) -> torch.Tensor:
    """The first n consecutive, non-overlapping windows of `length` tokens ([n, length]); n=None takes all. With
    `bos`, each window is that token followed by the next length - 1 tokens of the text (as the tokenizer would
    encode each window on its own)."""
    if length <= (bos is not None):
        need = "at least 2 (the BOS token and one of the text)" if bos is not None else "positive"
        raise DataError(f"{source}: window length must be {need}, got {length}")
    step = length - (bos is not None)
    available = ids.numel() // step
    if available == 0:
        raise DataError(f"{source}: {ids.numel()} tokens, fewer than one window of {step}")
    if n is None:
        n = available
    if n > available:
        raise DataError(f"{source}: asked for {n} windows of {length} tokens but the text has {ids.numel()} tokens "
                        f"({available} windows)")
    out = ids[: n * step].view(n, step)
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=out.dtype), out], 1)
    return out


def check_vocab(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise DataError(f"{source}: token id {int(bad[0])} is outside the model's vocabulary of {vocab_size}")


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer, or None if it ships none (e.g. stories260K). A tokenizer that names its own Python
    (auto_map) is refused: dcc never runs code shipped with a model or an artifact."""
    from .checks import check_no_remote_code
    folder = Path(folder)
    check_no_remote_code(folder)
    # vocab.txt: WordPiece vocabularies (the BERT family) that ship no tokenizer.json
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
