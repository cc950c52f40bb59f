"""LazyModel.streamed: the whole model called as usual with one block resident at a time (validate's float model)."""
import torch

from dcc.models.loader import LazyModel
from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 (one_thread: autouse fixture)


def test_streamed_forward_equals_the_saved_model_one_block_at_a_time(tmp_path):
    saved = save_tiny(tmp_path / "m", decoder_config("llama", vocab=128, hidden=32, layers=3))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    lm = LazyModel(tmp_path / "m")
    resident = []

    def count(mod, args):   # after this block's own pre-hook (registered first): how many blocks hold weights
        resident.append(sum(not next(b.parameters()).is_meta for b in lm.blocks))

    with lm.streamed() as model:
        hooks = [b.register_forward_pre_hook(count) for b in lm.blocks]
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
        for h in hooks:
            h.remove()
    with torch.no_grad():
        want = saved(input_ids=ids, use_cache=False).logits
    assert resident == [1, 1, 1]
    assert all(next(b.parameters()).is_meta for b in lm.blocks)   # released after the forward
    torch.testing.assert_close(got, want)
