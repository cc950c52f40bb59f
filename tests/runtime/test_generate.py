"""The decoding core of `dcc generate` (dcc/runtime/generate.py, prompt.py) on tiny TinyChat (W4A16) and QServe
(W4A8KV4) artifacts: greedy tokens are the reference model's argmax over the whole unpadded sequence at every step,
padded steps give the unpadded logits, sampling repeats with its seed, top-p and EOS cut where they should."""
import shutil
from pathlib import Path

import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.ir.ops import quant_kv
from dcc.runtime import generate as generate_module
from dcc.runtime.generate import NextLogits, Sampling, choose, generate, padded_length
from dcc.runtime.kv_graphs import CachedSteps
from dcc.runtime.prompt import TextStream, completion, encode_prompt, eos_ids
from dcc.runtime.reference import build_model

from tiny_models import decoder_config, save_tiny

TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "assets" / "smollm2_tokenizer"
TARGETS = {"tinychat": dict(algo="rtn", group_size=64), "qserve": dict(algo="qoq-rtn", group_size=0)}
PROMPT = [5, 17, 42, 8, 99]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{target: the CPU reference model of a tiny Llama artifact compiled for it}."""
    d = tmp_path_factory.mktemp("gen")
    cfg = decoder_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, max_position_embeddings=64)
    save_tiny(d / "m", cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (4 * 32,), generator=torch.Generator().manual_seed(0))
    (d / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
    out = {}
    for target, kw in TARGETS.items():
        opts = CompileOptions(target=target, calib=str(d / "calib.txt"), calib_chunks=4, calib_seq_len=32,
                              progress=False, **kw)
        art = load_artifact(compile_model(str(d / "m"), str(d / target), opts, log=lambda m: None))
        out[target] = build_model(art)
    assert load_artifact(d / "qserve").manifest["runtime"]["kv_bits"] == 4   # the KV cache is quantized there
    return out


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "recompute"])
@pytest.mark.parametrize("target", TARGETS)
def test_greedy_tokens_are_the_reference_argmax_over_the_whole_sequence(models, target, cache):
    model = models[target]
    res = generate(model, PROMPT, 10, bucket=8, cache=cache)   # lengths 5..14: padded to 8 and 16
    assert res.stop == "length" and len(res.tokens[0]) == 10 and res.cached == cache
    seq = list(PROMPT)
    with torch.no_grad():
        for tok in res.tokens[0]:
            ref = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            assert tok == int(ref.argmax()), (target, len(seq))
            seq.append(tok)


@pytest.mark.parametrize("target", TARGETS)
def test_cached_steps_give_the_whole_sequence_logits(models, target):
    model = models[target]
    ids = torch.tensor([PROMPT * 3] * 2)   # batch 2, 15 tokens: prefill 5 (padded to 8), then 10 steps (2 buckets)
    steps = CachedSteps(model, 8)
    with torch.no_grad():
        got = [steps.prefill(ids[:, :5], 8)] + [steps.step(ids[:, n]) for n in range(5, 14)]
        for n, logits in zip(range(5, 15), got):
            ref = model(input_ids=ids[:, :n], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # the cached graphs quantize K and V where the artifact's engine does (QServe: KV4), and only there
    graphs = [g for w in steps.wrappers for g in w.forward.graphs.values()]
    kv = {sum(n.target is quant_kv for n in g.graph.nodes) for g in graphs}
    assert kv == ({2} if target == "qserve" else {0})


def test_a_block_the_cache_cannot_take_falls_back_to_recomputing(models, monkeypatch):
    def refuse(self, ids, padded):
        raise ValueError("cannot capture this block")
    notes = []
    monkeypatch.setattr(CachedSteps, "prefill", refuse)
    monkeypatch.setattr(generate_module.log, "info", notes.append)
    res = generate(models["tinychat"], PROMPT, 6, bucket=8)
    assert not res.cached and res.tokens == generate(models["tinychat"], PROMPT, 6, bucket=8, cache=False).tokens
    assert len(notes) == 1 and "no KV cache for this model (ValueError: cannot capture this block)" in notes[0]


@pytest.mark.parametrize("target", TARGETS)
def test_padding_leaves_the_real_positions_logits(models, target):
    model = models[target]
    ids = torch.tensor([PROMPT * 2])   # 10 tokens, padded to 16 and to 32
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[:, -1]
    for bucket in (16, 32):
        got = NextLogits(model, bucket, None)(ids)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "recompute"])
def test_graphs_are_captured_once_per_bucket(models, cache):
    def run():
        return generate(models["qserve"], [3] * 9, 12, bucket=8, cache=cache)   # 9..20 tokens: buckets 16, 24
    first, again = run(), run()
    assert again.captures == 0 and again.tokens == first.tokens   # the second run reuses every graph
    assert again.summary()["graph_captures"] == 0 and first.captures <= 3


def test_a_batch_decodes_each_copy_like_one_sequence(models):
    one = generate(models["tinychat"], PROMPT, 6, bucket=8)
    three = generate(models["tinychat"], PROMPT, 6, batch=3, bucket=8)
    assert three.tokens == one.tokens * 3


def test_sampling_repeats_with_its_seed_and_differs_across_seeds(models):
    model = models["tinychat"]

    def run(seed):
        return generate(model, PROMPT, 12, Sampling(temperature=1.0, seed=seed), bucket=8).tokens[0]

    a = run(1)
    assert run(1) == a
    assert run(2) != a
    greedy = generate(model, PROMPT, 12, bucket=8).tokens[0]
    assert a != greedy   # temperature 1 on a random model: not the argmax path


def test_a_tiny_top_p_keeps_only_the_most_likely_token(models):
    model = models["qserve"]
    greedy = generate(model, PROMPT, 8, bucket=8).tokens[0]
    nucleus = generate(model, PROMPT, 8, Sampling(temperature=1.0, top_p=1e-6, seed=3), bucket=8).tokens[0]
    assert nucleus == greedy


def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]])).expand(400, -1)
    got = choose(logits, Sampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {0, 2}   # 0.5 + 0.3 reach 0.7; 0.15 and 0.05 are cut
    got = choose(logits, Sampling(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {0, 2, 3}
    assert choose(logits[:1], Sampling()).tolist() == [0]
    with pytest.raises(ValueError, match="top-p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)


def test_eos_stops_each_sequence_and_the_run(models):
    model = models["tinychat"]
    greedy = generate(model, PROMPT, 8, bucket=8).tokens[0]
    stop = greedy[2]
    first = greedy.index(stop)
    res = generate(model, PROMPT, 8, eos={stop}, bucket=8)
    assert res.stop == "eos" and res.tokens[0] == greedy[:first + 1]
    # a batch of sampled sequences: each ends at its own first EOS, the run when all have
    seen = []
    res = generate(model, PROMPT, 40, Sampling(temperature=1.0, seed=0), batch=3, eos={stop}, bucket=8,
                   on_tokens=seen.append)
    for b, toks in enumerate(res.tokens):
        assert stop not in toks[:-1]
        assert res.stop == "length" or toks[-1] == stop
        assert [s[b] for s in seen[:len(toks)]] == toks


def test_the_context_ends_the_run(models):
    res = generate(models["tinychat"], PROMPT, 10, bucket=8, max_positions=8)
    assert res.stop == "context" and len(res.tokens[0]) == 3
    with pytest.raises(ValueError, match="at most 5 positions"):
        generate(models["tinychat"], PROMPT, 10, max_positions=5)


def test_padded_length():
    assert [padded_length(n, 32, None) for n in (1, 32, 33)] == [32, 32, 64]
    assert padded_length(50, 32, 60) == 60 and padded_length(70, 32, 60) == 70


def test_prompts_without_a_tokenizer_are_token_ids():
    assert encode_prompt(None, " 1 403\n407 ", 512) == [1, 403, 407]
    for prompt, msg in (("Once upon", "whitespace-separated token ids"), ("1 600", "outside the model's vocab"),
                        ("  ", "empty")):
        with pytest.raises(ValueError, match=msg):
            encode_prompt(None, prompt, 512)
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(None, "1 2", 512, chat=True)
    s = TextStream(None)
    assert [s.push(t) for t in (1, 22, 3)] == ["1", " 22", " 3"] and s.flush() == ""


@pytest.mark.skipif(not TOKENIZER.is_dir(), reason=f"needs ../shared/assets ({TOKENIZER} is absent)")
def test_text_streams_whole_characters(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    prompt = tok("Say:")["input_ids"]
    text = " naïve café, 日本語 and 🦙 emoji"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tok, prompt)
    pieces = [s.push(t) for t in ids]
    assert "".join(pieces) + s.flush() == text == completion(tok, prompt, ids)
    assert "" in pieces and not any("\ufffd" in p for p in pieces)   # a split character waited for its bytes
    assert encode_prompt(tok, "Hi", tok.vocab_size + 100) == tok("Hi")["input_ids"]
    chat = encode_prompt(tok, "Hi", tok.vocab_size + 100, chat=True)
    assert tok.decode(chat).endswith("assistant\n") and "Hi" in tok.decode(chat)
    shutil.copy(TOKENIZER / "generation_config.json", tmp_path)
    eos = eos_ids(tmp_path, {"eos_token_id": [7, 8]}, tok)
    assert {7, 8, tok.eos_token_id} <= eos


def test_a_plain_transformers_model_decodes_as_its_own_generate(monkeypatch):
    """A model without block graphs (no KV cache here: every step recomputes) gives transformers' greedy tokens."""
    from tiny_models import tiny_model
    monkeypatch.setattr(generate_module.log, "info", lambda msg: None)
    model = tiny_model("llama")
    res = generate(model, PROMPT, 8, eos={model.config.eos_token_id})
    ref = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert not res.cached and res.tokens[0] == ref[0, len(PROMPT):].tolist()
