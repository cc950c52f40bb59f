"""A GGUF tokenizer that cuts its own vocabulary's words into pieces is refused with one line naming the file (what
transformers 5.17 builds for Gemma 3), and a sound one passes; the real Gemma 3 file where it is present."""
import os
from pathlib import Path

import pytest

from dcc.models.gguf_config import GGUFError
from dcc.models.gguf_tokenizer import SPM_SPACE, check_whole_words

WORDS = ["tower", "metres", "river", "between", "history", "general", "island", "season", "football", "village",
         "station", "railway", "church", "school", "album", "single", "record", "united", "states", "county",
         "league", "player", "season", "battle", "french"]


class _Meta:   # the two look-ups check_whole_words makes
    def __init__(self, tokens, types=None):
        self.d = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}

    def get(self, key, default=None):
        return self.d.get(key, default)


class _WordTokenizer:   # one id per whitespace-separated word
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


class _CharTokenizer:   # one id per character, as a scoreless Unigram ends up
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text)))}


def _vocab():
    return ["<pad>", "<eos>", "<bos>"] + [SPM_SPACE + w for w in WORDS] + list("abcdefghij")


def test_sound_tokenizer_passes():
    check_whole_words(_WordTokenizer(), _Meta(_vocab()), Path("m.gguf"))


def test_character_splitting_tokenizer_refused_naming_the_file():
    with pytest.raises(GGUFError, match=r"^m\.gguf: the tokenizer transformers .* splits words that are single "
                                        r"tokens of its own vocabulary \(\d+ tokens for 25 such words\)"):
        check_whole_words(_CharTokenizer(), _Meta(_vocab()), Path("m.gguf"))


def test_vocabulary_without_words_is_not_probed():
    """A byte-level or tiny vocabulary has no marked words to probe: nothing is refused."""
    check_whole_words(_CharTokenizer(), _Meta(list("abc") + [SPM_SPACE + "ab"]), Path("m.gguf"))


GEMMA = Path(os.environ.get("DCC_GEMMA3_GGUF", Path(__file__).resolve().parents[2] / "models" / "gemma-3-270m.gguf"))


@pytest.mark.skipif(not GEMMA.is_file(), reason=f"{GEMMA} is absent (scripts/fetch_gemma3.sh fetches it)")
def test_real_gemma3_tokenizer_passes():
    from dcc.models.gguf_config import Meta, open_reader
    from dcc.models.gguf_tokenizer import _transformers_tokenizer
    check_whole_words(_transformers_tokenizer(GEMMA), Meta(open_reader(GEMMA), GEMMA), GEMMA)
