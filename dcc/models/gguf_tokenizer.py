"""The tokenizer of a GGUF file as Hugging Face tokenizer files: dcc builds llama.cpp's 'gpt2' byte-level BPE itself and
hands other kinds (sentencepiece 'llama', ...) to transformers' own GGUF tokenizer loading. For Gemma 3 ('llama' kind,
no merges in the file) that is GemmaTokenizer with merges rebuilt from the token order; it encodes WikiText-2 and PTB
exactly as llama.cpp's SPM tokenizer does (tests/models/test_gguf_gemma3.py), control tokens in the text included."""
from __future__ import annotations

import warnings
from pathlib import Path

from .gguf_config import GGUFError, Meta

__all__ = ["write_tokenizer"]

_GPT2_SPLIT = None  # ByteLevel's own regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp's pre-tokenizer types)
_PRE_SPLITS = {
    "default": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "smollm": _GPT2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def _bpe_tokenizer(meta: Meta, path: Path, model_max_length: int | None):
    """A byte-level BPE fast tokenizer ('gpt2' in llama.cpp's terms) from the vocabulary and merges in the file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = meta.get("tokenizer.ggml.tokens")
    merges_raw = meta.get("tokenizer.ggml.merges", None)
    if merges_raw is None:
        raise GGUFError(f"{path}: BPE tokenizer without tokenizer.ggml.merges")
    token_type = meta.get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "default") or "default"
    if pre not in _PRE_SPLITS:
        raise GGUFError(
            f"{path}: tokenizer pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_SPLITS))})"
        )
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: tokenizer merge {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated token keeps its first id

    try:
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            continuing_subword_prefix="",
            end_of_word_suffix="",
        )
    except Exception as e:  # e.g. a merge whose tokens are not in the vocabulary
        raise GGUFError(f"{path}: the tokenizer vocabulary/merges are inconsistent ({e})") from None
    tok = Tokenizer(bpe)
    split = _PRE_SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, token_type)
        if ty == _TOKEN_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, token_type)
        if ty == _TOKEN_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def tok_str(key):
        i = meta.int(f"tokenizer.ggml.{key}", None)
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary of {len(tokens)} tokens")
        return tokens[i]

    bos, eos = tok_str("bos_token_id"), tok_str("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single, pair, specials = "$A:0", "$A:0 $B:1", []
    if add_bos:
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        specials.append((bos, vocab[bos]))
    if add_eos:
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
        if eos != bos or not add_bos:
            specials.append((eos, vocab[eos]))
    if add_bos and add_eos:
        pair = f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    kwargs = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": tok_str("unknown_token_id"),
        "pad_token": tok_str("padding_token_id"),
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    template = meta.get("tokenizer.chat_template", None)
    if template:
        hf.chat_template = template
    return hf


def _transformers_tokenizer(path: Path):
    """Other tokenizer kinds (sentencepiece 'llama', ...): transformers' own GGUF tokenizer loading."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)


SPM_SPACE = "\u2581"   # sentencepiece's word-start marker


def check_whole_words(tok, meta: Meta, path: Path, probes: int = 200) -> None:
    """Refuse a tokenizer that splits its own vocabulary's words: sentencepiece tokens that are a word-start marker
    and 4+ letters, written as text, must mostly come back as one token each. transformers 5.17 builds Gemma 3's GGUF
    tokenizer as a Unigram with equal scores that cuts text into single characters (WikiText-2 perplexity of the
    float model 19616 instead of 19.5); 5.25 rebuilds its merges and passes."""
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    words = [t[1:] for t, ty in zip(tokens, types)
             if ty == 1 and t.startswith(SPM_SPACE) and len(t) >= 5 and t[1:].isascii() and t[1:].isalpha()]
    if len(words) < 20:   # not a sentencepiece vocabulary of words: nothing to probe
        return
    step = max(1, len(words) // probes)
    words = words[::step][:probes]
    n = len(tok(" " + " ".join(words), add_special_tokens=False)["input_ids"])
    if n > 2 * len(words):
        import transformers
        raise GGUFError(f"{path}: the tokenizer transformers {transformers.__version__} builds from this file splits "
                        f"words that are single tokens of its own vocabulary ({n} tokens for {len(words)} such "
                        f"words), so every text would be mis-tokenized; upgrade transformers (dcc is tested with "
                        f"5.25, which builds it correctly)")


def write_tokenizer(meta: Meta, path: Path, out: Path, model_max_length: int | None) -> None:
    """Save the tokenizer of the GGUF file at `path` into the folder `out` (only a warning if the file has none)."""
    if "tokenizer.ggml.tokens" not in meta:
        warnings.warn(f"{path}: no tokenizer in the file; the folder gets weights and config only", stacklevel=3)
        return
    kind = meta.get("tokenizer.ggml.model", None)
    if kind == "gpt2":
        tok = _bpe_tokenizer(meta, path, model_max_length)
    else:
        try:
            tok = _transformers_tokenizer(path)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GGUFError(
                f"{path}: tokenizer kind {kind!r} could not be built (dcc builds 'gpt2' byte-level BPE itself and "
                f"hands other kinds to transformers, which failed: {first})"
            ) from None
        check_whole_words(tok, meta, path)
    tok.save_pretrained(str(out))
