"""Prompts in, text out, for `dcc generate`: the prompt as token ids (through the artifact's tokenizer and its chat
template, or read as ids where the artifact ships no tokenizer), the model's end-of-sequence ids, and incremental
detokenization that prints multi-byte characters whole (the prefix/read offsets of text-generation-inference)."""
from __future__ import annotations

import json
from pathlib import Path


def encode_prompt(tokenizer, prompt: str, vocab_size: int, chat: bool = False) -> list[int]:
    """The prompt's token ids. Without a tokenizer (e.g. stories260K) the prompt must be whitespace-separated ids.
    chat: the user turn through the tokenizer's chat template, ending with the assistant's header."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if tokenizer is None:
        if chat:
            raise ValueError("--chat: the artifact ships no tokenizer, so it has no chat template")
        try:
            ids = [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError("the artifact ships no tokenizer: give the prompt as whitespace-separated token ids "
                             "(e.g. \"1 403 407\")") from None
    elif chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: the artifact's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]   # the template wrote the special tokens
    else:
        ids = tokenizer(prompt)["input_ids"]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    if not ids:
        raise ValueError("the prompt has no tokens")
    return ids


def eos_ids(folder: str | Path, config: dict, tokenizer) -> set[int]:
    """Every end-of-sequence id the model names: config.json's, generation_config.json's and the tokenizer's."""
    out: set[int] = set()

    def add(v):
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(i for i in v if isinstance(i, int))

    add(config.get("eos_token_id"))
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except ValueError:
            pass   # an unreadable generation config names no EOS; config.json still may
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return out


class TextStream:
    """Token ids in, text out as soon as it is whole: a piece whose last character would be a partial UTF-8 sequence
    (U+FFFD) waits for the next token. Each piece is decoded with a few tokens before it, so that tokenizers that
    drop a leading space at the start of a decode (SentencePiece) keep it. Without a tokenizer: the ids, spaced."""

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tok = tokenizer
        self.ids = list(context)[-5:] if tokenizer is not None else []
        self.prefix = 0
        self.read = len(self.ids)
        self.first = True

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.tok is None:
            piece = ("" if self.first else " ") + str(token)
            self.first = False
            return piece
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is left (a partial character at the very end included, as U+FFFD)."""
        if self.tok is None or self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def completion(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text of `tokens` after `prompt`, as TextStream prints it."""
    s = TextStream(tokenizer, prompt)
    return "".join(s.push(t) for t in tokens) + s.flush()
