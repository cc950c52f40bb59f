"""The spooled safetensors writer lays out exactly the bytes of safetensors.torch.save_file, for every dtype dcc
stores, in mixed orders, with empty and scalar tensors, and removes its spool file."""
import random

import pytest
import torch
from safetensors.torch import save_file

from dcc.targets.spool import ST_NAMES, Spool


def _random_tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    shape = rng.choice([(), (0,), (3,), (2, 5), (4, 1, 3)])
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("seed", range(6))
def test_bytes_equal_save_file(tmp_path, seed):
    rng = random.Random(seed)
    dtypes = list(ST_NAMES)
    names = [f"model.layers.{rng.randrange(40)}.{rng.choice(['q', 'k', 'mlp.up'])}.{i}" for i in range(25)]
    names += ["z", "a", "\u00e9t\u00e9.w"]
    tensors = {n: _random_tensor(rng, rng.choice(dtypes)) for n in names}
    rng.shuffle(order := list(tensors))
    spool = Spool(tmp_path)
    for n in order:
        spool.add(n, tensors[n])
    spool.write(tmp_path / "mine.safetensors", {"format": "pt"})
    save_file(tensors, str(tmp_path / "ref.safetensors"), {"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors", "ref.safetensors"]


def test_copies_in_chunks(tmp_path, monkeypatch):
    """A tensor larger than one copy is laid out in several reads and still byte-equal."""
    import dcc.targets.spool as spool_mod
    monkeypatch.setattr(spool_mod, "COPY_BYTES", 64)
    t = {"b": torch.arange(300, dtype=torch.int32), "a": torch.arange(77, dtype=torch.float16)}
    spool = Spool(tmp_path)
    for k, v in t.items():
        spool.add(k, v)
    spool.write(tmp_path / "m.safetensors", {"format": "pt"})
    save_file(t, str(tmp_path / "r.safetensors"), {"format": "pt"})
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()


def test_unknown_dtype_refused_by_name(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="artifact tensor c: dtype torch.complex64"):
        spool.add("c", torch.zeros(2, dtype=torch.complex64))
    spool.discard()
    assert list(tmp_path.iterdir()) == []
