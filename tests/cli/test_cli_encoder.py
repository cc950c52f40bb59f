"""End to end through the `dcc` command on a tiny BERT sentence encoder (post-LayerNorm, saved as sentence-transformers
save theirs: BertModel weights without the `bert.` prefix, no pooler), calibrated on token ids: compile (rtn, gptq),
inspect, validate against the float model, eval by the cosine of mean-pooled embeddings; a BertForMaskedLM checkpoint
(prefixed names, a head dcc does not use) loads the same way; wrong evaluation pairings are one line."""
import json
import re

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from cli_util import error_line, run

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 (one_thread: autouse fixture)

VOCAB = 200
# initializer_range 0.1: the blocks' updates are large against the residual stream, so the embeddings depend on every
# quantized layer (at BERT's 0.02 even a scrambled layer moves the cosine by less than 0.01)
CONFIG = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              max_position_embeddings=128, initializer_range=0.1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A sentence-transformers-style BertModel folder, calibration ids and an evaluation file of id lines."""
    d = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**CONFIG), add_pooling_layer=False).save_pretrained(d / "bert")
    g = torch.Generator().manual_seed(1)
    (d / "calib.txt").write_text(" ".join(map(str, torch.randint(1, VOCAB, (4096,), generator=g).tolist())))
    lengths = torch.randint(5, 60, (24,), generator=g).tolist()
    (d / "eval.txt").write_text("\n".join(" ".join(map(str, torch.randint(1, VOCAB, (n,), generator=g).tolist()))
                                          for n in lengths) + "\n")
    return d


def _compile(model, out, algo):
    code, text = run("compile", model, "--target", "tinychat", "--algo", algo, "--group-size", "64",
                     "--calib", model.parent / "calib.txt", "--calib-chunks", "8", "--calib-seq-len", "64",
                     "-o", out, "-q")
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def rtn(files):
    return _compile(files / "bert", files / "rtn", "rtn")


@pytest.fixture(scope="module")
def gptq(files):
    return _compile(files / "bert", files / "gptq", "gptq")


def _cosine(text: str) -> tuple[float, float]:
    m = re.search(r"embedding cosine to the float model: mean ([0-9.]+), min ([0-9.]+)", text)
    assert m, text
    return float(m[1]), float(m[2])


def test_the_checkpoint_has_no_prefix_and_no_pooler(files):
    keys = load_file(files / "bert" / "model.safetensors")
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith(("bert.", "pooler.")) for k in keys)


def test_compile_writes_an_encoder_artifact(rtn):
    m = json.loads((rtn / "dcc.json").read_text())
    assert m["source"]["kind"] == "encoder" and m["source"]["architecture"] == "BertModel"
    assert m["source"]["blocks"] == "encoder.layer" and m["source"]["num_blocks"] == 2
    quant = [k for k, v in m["layers"].items() if "skip_reason" not in v]
    assert len(quant) == len(m["layers"]) == 2 * 6   # q, k, v, attention output, intermediate, output
    t = load_file(rtn / "model.safetensors")
    assert t["encoder.layer.0.attention.self.query.qweight"].dtype == torch.int16
    assert "embeddings.word_embeddings.weight" in t and not any("pooler" in k for k in t)


def test_inspect_and_validate(rtn, files):
    code, text = run("inspect", rtn)
    assert code == 0 and "(BertModel, encoder, 2 blocks)" in text and "12 of 12 linears quantized" in text
    code, text = run("validate", rtn, "--model", files / "bert", "--json", files / "validate.json")
    assert code == 0, text
    assert "12/12 layers" in text and "last hidden states: relative error" in text
    # --tokens 128 (the default) fits this model's 128 positions; the comparison is of hidden states, not logits
    report = json.loads((files / "validate.json").read_text())["float"]
    assert report["compares"] == "last hidden states and mean-pooled embeddings"
    assert 0 < report["hidden_rel_err"] < 0.2 and report["embedding_cosine_min"] > 0.95
    assert all(0 < v < 0.5 for v in report["layers"].values()) and len(report["layers"]) == 12


def test_validate_caps_tokens_at_the_positions(rtn, files):
    code, text = run("validate", rtn, "--model", files / "bert", "--tokens", "500")
    assert code == 0, text
    assert "--tokens 500 is beyond the model's 128 positions; comparing on 128" in text


def test_eval_cosine_to_the_float_model(rtn, gptq, files):
    code, text = run("eval", rtn, "--text", files / "eval.txt", "--baseline", files / "bert", "-q",
                     "--json", files / "eval.json")
    assert code == 0, text
    mean, low = _cosine(text)
    res = json.loads((files / "eval.json").read_text())
    assert res["artifact"]["sentences"] == 24 and res["artifact"]["cosine_mean"] == pytest.approx(mean, abs=1e-5)
    between = res["baseline"]["between_sentences_cosine"]
    # closer to the float embedding of the same line than the float model's embeddings of different lines are
    assert mean > 0.97 and low > between and low <= mean < 1.0
    code, text = run("eval", gptq, "--text", files / "eval.txt", "--baseline", files / "bert", "-q")
    assert code == 0, text
    assert _cosine(text)[0] > max(mean, 0.99)   # GPTQ's error feedback beats round-to-nearest


def test_a_broken_decode_does_not_reach_the_bound(rtn, files):
    """The bound above means something: the same artifact with each decoded weight's columns reversed in groups of
    8 (a nibble-order mistake) falls far below it."""
    from dcc.models.loader import LazyModel
    from dcc.runtime.artifact import load_artifact
    from dcc.runtime.evaluate import eval_adapter, eval_data
    from dcc.runtime.reference import build_model
    art = load_artifact(rtn)
    adapter = eval_adapter(art, "--text", str(files / "bert"))
    data = eval_data(art, adapter, files / "eval.txt", 512, None)
    model = build_model(art)
    for name in art.quantized_layers():
        w = model.get_submodule(name).weight
        w.data = w.data.view(w.shape[0], -1, 8).flip(-1).reshape(w.shape)
    res = adapter.evaluate(model, data, LazyModel(files / "bert").materialize_all(), progress=False)
    assert res["artifact"]["cosine_mean"] < 0.8


def test_masked_lm_checkpoint_compiles(files, tmp_path):
    torch.manual_seed(0)
    T.BertForMaskedLM(T.BertConfig(**CONFIG)).save_pretrained(tmp_path / "mlm")
    assert "bert.embeddings.word_embeddings.weight" in load_file(tmp_path / "mlm" / "model.safetensors")
    (tmp_path / "calib.txt").write_text((files / "calib.txt").read_text())
    out = _compile(tmp_path / "mlm", tmp_path / "art", "rtn")
    m = json.loads((out / "dcc.json").read_text())
    assert m["source"]["kind"] == "encoder" and m["source"]["architecture"] == "BertModel"
    t = load_file(out / "model.safetensors")
    assert not any(k.startswith(("bert.", "cls.")) for k in t)   # the base model's names; the MLM head is not used
    code, text = run("validate", out, "--model", tmp_path / "mlm")
    assert code == 0 and "12/12 layers" in text, text
    code, text = run("eval", out, "--text", files / "eval.txt", "--baseline", tmp_path / "mlm", "-q")
    assert code == 0 and _cosine(text)[0] > 0.97, text


def test_wrong_evaluation_pairings_are_one_line(rtn, files, tmp_path):
    code, text = run("eval", rtn, "--ppl", files / "eval.txt")
    assert code == 2 and error_line(text) == (
        f"dcc: error: {rtn}: --ppl measures perplexity (causal LMs), but this artifact's model is an encoder "
        f"(BertModel); use --text FILE --baseline MODEL")
    code, text = run("eval", rtn, "--text", files / "eval.txt")
    assert code == 2 and "give --baseline MODEL" in error_line(text)
    code, text = run("eval", rtn)
    assert code == 2 and "give one of --ppl FILE" in error_line(text)
    # a causal LM evaluated as an encoder
    save_tiny(tmp_path / "llama", decoder_config("llama"))
    (tmp_path / "ids.txt").write_text(" ".join(str(i % 100) for i in range(2048)))
    code, text = run("compile", tmp_path / "llama", "--algo", "rtn", "--group-size", "64", "--calib",
                     tmp_path / "ids.txt", "--calib-chunks", "4", "--calib-seq-len", "32", "-o", tmp_path / "a", "-q")
    assert code == 0, text
    code, text = run("eval", tmp_path / "a", "--text", files / "eval.txt", "--baseline", tmp_path / "llama")
    assert code == 2 and error_line(text) == (
        f"dcc: error: {tmp_path / 'a'}: --text measures embedding cosine to the float model (encoders), but this "
        f"artifact's model is a causal-lm (LlamaForCausalLM); use --ppl FILE")


def test_calibration_longer_than_the_positions_is_one_line(files, tmp_path):
    code, text = run("compile", files / "bert", "--algo", "rtn", "--group-size", "64", "--calib",
                     files / "calib.txt", "--calib-chunks", "2", "--calib-seq-len", "256", "-o", tmp_path / "x", "-q")
    assert code == 2 and "--calib-seq-len 256 is longer than bert's 128 positions" in error_line(text)
    assert not (tmp_path / "x").exists()


def test_qserve_refuses_an_encoder_before_any_work(files, tmp_path):
    code, text = run("compile", files / "bert", "--target", "qserve", "--calib", files / "calib.txt",
                     "--calib-chunks", "2", "--calib-seq-len", "32", "-o", tmp_path / "x", "-q")
    line = error_line(text)
    assert code == 2 and "encoder model" in line and "decoder-only" in line and "rotate" not in line, line
    assert not (tmp_path / "x").exists()
