"""simulate(): the chosen linears see int8 per-token inputs, the chosen attentions see a quantized KV cache and hand
post-RoPE queries/keys to observers; everything is restored on exit."""
import pytest
import torch

from dcc.ir.actquant import fake_quantize_tokens_int8
from dcc.ir.simulate import simulate

from tiny_models import decoder_config


def _model():
    import transformers as T
    torch.manual_seed(0)
    return T.LlamaForCausalLM(decoder_config("llama", layers=1)).eval()


def test_act_hook_quantizes_inputs_and_restores():
    model = _model()
    layer = model.model.layers[0]
    seen = {}
    h = layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].clone()))
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        x_float = seen["x"]
        with simulate(layer, act={"mlp.down_proj": "int8"}):
            sim = model(input_ids=ids).logits
        x_sim = seen["x"]
        again = model(input_ids=ids).logits
    h.remove()
    assert torch.equal(x_sim, fake_quantize_tokens_int8(x_float))   # the linear saw the int8 grid
    assert not torch.equal(sim, base) and torch.equal(again, base)   # and only inside the context
    with pytest.raises(ValueError, match="activation format"):
        with simulate(layer, act={"mlp.down_proj": "int4"}):
            pass


def test_kv_and_observer():
    model = _model()
    layer = model.model.layers[0]
    got = []
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with simulate(layer, observers={"self_attn": lambda q, k: got.append((q.shape, k.shape))}):
            same = model(input_ids=ids).logits
        with simulate(layer, kv={"self_attn": 4}):
            kv4 = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert got == [(torch.Size([2, 4, 9, 16]), torch.Size([2, 2, 9, 16]))]   # post-RoPE, before the GQA repeat
    torch.testing.assert_close(same, base)          # observing changes nothing
    assert float((kv4 - base).abs().max()) > 1e-4   # KV4 does
    assert model.config._attn_implementation == "sdpa" and torch.equal(after, base)
