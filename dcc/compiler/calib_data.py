"""Calibration and evaluation text, now in dcc/models/text.py (the model adapters build their batches from it);
re-exported here for existing importers."""
from ..models.text import DataError, check_vocab, load_tokenizer, read_text, tokenize_file, windows  # noqa: F401
