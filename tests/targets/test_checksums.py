"""dcc/targets/checksums.py: weight checksums computed by threads land in their entries, in the place the key took
when it was asked for, and equal the synchronous sha256_tensor."""
import torch

from dcc.targets.artifact import sha256_tensor
from dcc.targets.checksums import settle_hashes, sha256_later


def test_threaded_checksums_fill_their_entries_in_order():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(300, 257, generator=g), torch.randn(64, generator=g).half(), torch.randn(5, 3).t()]
    entries = []
    for t in ts:
        e = {"format": "f"}
        sha256_later(e, "weight_sha256", t)
        e["after"] = 1   # a key added after the request stays after it
        entries.append(e)
    settle_hashes()
    for e, t in zip(entries, ts):
        assert list(e) == ["format", "weight_sha256", "after"]
        assert e["weight_sha256"] == sha256_tensor(t)
