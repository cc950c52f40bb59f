"""Calibration and evaluation text, now in dcc/models/text.py (the model adapters build their batches from it);
re-exported here for existing importers."""
from ..models.text import (DataError, bos_token, check_vocab, load_tokenizer, read_text,  # noqa: F401
                           tokenize_file, windows)
