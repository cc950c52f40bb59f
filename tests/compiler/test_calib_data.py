"""Calibration text: reading files (line ends, empty, non-UTF-8), token ids without a tokenizer, windows, vocab."""
import pytest
import torch

from dcc.compiler.calib_data import DataError, bos_token, check_vocab, load_tokenizer, read_text, tokenize_file, windows


def test_read_text_normalises_crlf(tmp_path):
    p = tmp_path / "wiki.raw"
    p.write_bytes(b" = Title = \r\n\r\nfirst line\r\nsecond line\nthird\r\n")
    text = read_text(p)
    assert "\r" not in text
    assert text == " = Title = \n\nfirst line\nsecond line\nthird\n"
    assert read_text(str(p)) == text


def test_read_text_keeps_utf8(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("naïve café — 日本語\r\n", encoding="utf-8")
    assert read_text(p) == "naïve café — 日本語\n"


@pytest.mark.parametrize("content", [b"", b"  \r\n\n\t "])
def test_empty_file_names_the_file(tmp_path, content):
    p = tmp_path / "empty_calib.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match="empty") as e:
        read_text(p)
    assert str(p) in str(e.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        read_text(tmp_path / "nope.txt")
    assert "nope.txt" in str(e.value)
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as e:
        read_text(p)
    assert str(p) in str(e.value) and "byte 3" in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        read_text(tmp_path)   # a folder is not a file


def test_windows_exact_slicing():
    ids = torch.arange(23)
    w = windows(ids, 3, 7)
    assert w.shape == (3, 7) and w.dtype == ids.dtype
    assert torch.equal(w, torch.arange(21).view(3, 7))
    assert torch.equal(windows(ids, 1, 7), torch.arange(7).view(1, 7))
    # n=None takes every whole window; the tail that does not fill one is dropped
    assert torch.equal(windows(ids, None, 5), torch.arange(20).view(4, 5))
    assert torch.equal(windows(ids, None, 23), ids.view(1, 23))


def test_windows_errors_name_the_source():
    ids = torch.arange(20)
    with pytest.raises(DataError, match="asked for 3 windows of 8 tokens but the text has 20 tokens") as e:
        windows(ids, 3, 8, source="calib.txt")
    assert str(e.value).startswith("calib.txt:")
    with pytest.raises(DataError, match="fewer than one window of 21") as e:
        windows(ids, None, 21, source="tiny.txt")
    assert "tiny.txt" in str(e.value)
    for bad in (0, -4):
        with pytest.raises(DataError, match="window length must be positive"):
            windows(ids, 1, bad)


def test_tokenize_file_without_tokenizer_reads_ids(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("1 2 3\r\n4\t5\n\n  6  ")
    ids = tokenize_file(p, None)
    assert ids.dtype == torch.long and torch.equal(ids, torch.tensor([1, 2, 3, 4, 5, 6]))


def test_tokenize_file_without_tokenizer_rejects_words(tmp_path):
    p = tmp_path / "words.txt"
    p.write_text("1 2 three 4")
    with pytest.raises(DataError, match="whitespace-separated token ids") as e:
        tokenize_file(p, None)
    assert str(p) in str(e.value)


def test_tokenize_file_with_a_tokenizer(tmp_path):
    class CharTokenizer:   # the call convention of a Hugging Face tokenizer
        def __call__(self, text, add_special_tokens=True, verbose=True):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) for c in text]}

    p = tmp_path / "t.txt"
    p.write_bytes(b"ab\r\nc")
    assert torch.equal(tokenize_file(p, CharTokenizer()), torch.tensor([97, 98, 10, 99]))


def test_check_vocab():
    check_vocab(torch.tensor([0, 5, 9]), 10, "ok.txt")
    check_vocab(torch.tensor([], dtype=torch.long), 10, "empty")
    with pytest.raises(DataError, match="token id 10 is outside the model's vocabulary of 10") as e:
        check_vocab(torch.tensor([3, 10, 2]), 10, "ids.txt")
    assert str(e.value).startswith("ids.txt:")
    with pytest.raises(DataError) as e:
        check_vocab(torch.tensor([3, -1, 2]), 10, "neg.txt")
    assert str(e.value).startswith("neg.txt:")


def test_check_vocab_names_the_negative_id():
    with pytest.raises(DataError, match="-1"):
        check_vocab(torch.tensor([3, -1, 2]), 10, "neg.txt")


def test_load_tokenizer_none_without_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


def test_windows_after_a_bos_token():
    ids = torch.arange(10, 20)
    w = windows(ids, None, 4, "t", bos=1)
    assert w.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    with pytest.raises(DataError, match="t: window length must be at least 2"):
        windows(ids, None, 1, "t", bos=1)


class _BosTokenizer:   # the call convention of a Hugging Face tokenizer that starts each text with id 2 (Gemma)
    bos_token_id = 2

    def __init__(self, adds: bool):
        self.adds = adds

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [2] * (self.adds and add_special_tokens) + [ord(c) for c in text]}


def test_bos_token_only_where_the_tokenizer_adds_one():
    from pathlib import Path
    assert bos_token(_BosTokenizer(True)) == 2
    assert bos_token(_BosTokenizer(False)) is None     # has a BOS but does not add it (SmolLM2's case)
    assert bos_token(None) is None
    smol = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "smollm2_tokenizer"
    if not (smol / "tokenizer.json").is_file():
        pytest.skip(f"{smol} is absent (../shared/assets)")
    assert bos_token(load_tokenizer(smol)) is None
