"""The weight checksums of a manifest's entries (weight_sha256: what a decoder must give back bit for bit), computed
by threads while the emitter packs: hashlib releases the GIL, so a block's linears are hashed side by side."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .artifact import sha256_tensor

_HASHERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="dcc-sha256")
_PENDING: list = []


def sha256_later(entry: dict, key: str, t: torch.Tensor) -> None:
    """entry[key] = sha256_tensor(t), computed by a thread (hashlib releases the GIL: a block's linears are hashed
    side by side, while the emitter packs the next ones); the key takes its place in the entry now (the manifest's
    key order does not depend on timing). settle_hashes() waits for them; t must not change until then."""
    entry[key] = None
    _PENDING.append(_HASHERS.submit(_fill, entry, key, t.detach()))


def _fill(entry: dict, key: str, t: torch.Tensor) -> None:
    entry[key] = sha256_tensor(t)


def settle_hashes() -> None:
    """Until every sha256_later is filled in (raises a hashing error)."""
    while _PENDING:
        _PENDING.pop(0).result()
