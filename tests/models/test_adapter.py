"""Model adapters: the kind chosen from the config alone (causal LM, BERT-family encoder, a refusal for the rest), the
skeleton each builds (pooler only where the checkpoint has one), head-model checkpoints read into the base model,
block 0's inputs, encoder calibration and embeddings."""
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from dcc.models.adapter import adapter_for, artifact_adapter, kind_of
from dcc.models.causal_lm import CausalLM
from dcc.models.encoder import Encoder, mean_pool
from dcc.models.loader import LazyModel, ModelLoadError
from dcc.models.text import DataError

from tiny_models import calib_ids, decoder_config, first_block_inputs, one_thread, save_tiny  # noqa: F401

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def _bert(**kw):
    return T.BertConfig(**{**BERT, **kw})


@pytest.mark.parametrize("config, kind", [
    (decoder_config("llama", architectures=["LlamaForCausalLM"]), "causal-lm"),
    (decoder_config("llama"), "causal-lm"),                                  # no architectures: the model type
    (_bert(architectures=["BertModel"]), "encoder"),                         # sentence-transformers' checkpoints
    (_bert(architectures=["BertForMaskedLM"]), "encoder"),
    (_bert(architectures=["BertForSequenceClassification"]), "encoder"),
    (_bert(), "encoder"),
    (_bert(architectures=["BertLMHeadModel"], is_decoder=True), "causal-lm"),  # BERT as a decoder is a causal LM
    (_bert(is_decoder=True), "causal-lm"),
    (T.RobertaConfig(**BERT, architectures=["RobertaModel"]), "encoder"),   # no table: other families follow
    (T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64), "encoder"),
    (T.T5Config(architectures=["T5ForConditionalGeneration"]), None),
    (T.BartConfig(architectures=["BartModel"]), None),                       # encoder-decoder
    (T.ViTConfig(architectures=["ViTModel"]), None),
    (decoder_config("llama", architectures=["LlamaModel"]), None),          # a decoder without its head
])
def test_kind_from_the_config(config, kind):
    assert kind_of(config) == kind
    if kind is None:
        with pytest.raises(ModelLoadError, match=r"^/m: .*dcc compiles decoder-only causal LMs and"):
            adapter_for(config, "/m")
    else:
        assert adapter_for(config).kind == kind


def test_artifacts_without_a_kind_are_causal_lms():
    assert isinstance(artifact_adapter({"source": {"model": "x"}}), CausalLM)
    assert isinstance(artifact_adapter({}), CausalLM)
    assert isinstance(artifact_adapter({"source": {"kind": "encoder"}}), Encoder)
    with pytest.raises(ValueError, match="unknown model kind 'vision'"):
        artifact_adapter({"source": {"kind": "vision"}})


def test_encoder_skeleton_has_a_pooler_only_where_the_checkpoint_has_one():
    enc = Encoder()
    model = enc.build(_bert(), keys=None)
    assert type(model).__name__ == "BertModel" and model.pooler is not None
    assert all(p.is_meta for p in model.parameters())
    keys = [n for n, _ in model.named_parameters()]
    assert enc.build(_bert(), keys=keys).pooler is not None
    assert enc.build(_bert(), keys=[k for k in keys if not k.startswith("pooler.")]).pooler is None
    assert enc.build(_bert(), keys=["bert." + k for k in keys]).pooler is not None   # prefixed names count


def test_checkpoint_prefix_only_for_a_head_models_names():
    enc = Encoder()
    model = enc.build(_bert(), keys=[])
    names = [n for n, _ in model.named_parameters()]
    assert enc.checkpoint_prefix(model, names) == ""
    assert enc.checkpoint_prefix(model, ["bert." + n for n in names] + ["cls.predictions.bias"]) == "bert."
    # a causal LM's names already carry its base model's prefix ("model."): nothing is stripped
    with torch.device("meta"):
        llama = T.AutoModelForCausalLM.from_config(decoder_config("llama"))
    assert CausalLM().checkpoint_prefix(llama, ["model." + n for n, _ in llama.named_parameters()]) == ""


def test_masked_lm_checkpoint_loads_into_the_base_model(tmp_path):
    torch.manual_seed(0)
    mlm = T.BertForMaskedLM(_bert()).eval()
    mlm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors")
    assert "bert.embeddings.word_embeddings.weight" in keys and any(k.startswith("cls.") for k in keys)
    lm = LazyModel(tmp_path)
    assert lm.adapter.kind == "encoder" and lm.key_prefix == "bert." and lm.model.pooler is None
    model = lm.materialize_all()
    ids = calib_ids(3, vocab=100)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, mlm.bert(input_ids=ids).last_hidden_state)


def test_causal_block0_inputs_are_what_the_first_layer_receives(tmp_path):
    model = save_tiny(tmp_path, decoder_config("llama"))
    lm = LazyModel(tmp_path)
    lm.materialize("")
    ids = calib_ids()
    args, kwargs = lm.adapter.block0_inputs(lm, ids, torch.device("cpu"))
    want_args, want_kwargs = first_block_inputs(model, model.model.layers[0], ids)
    assert torch.equal(args[0], want_args[0]) and kwargs["use_cache"] is False
    assert set(kwargs) == set(want_kwargs) and "past_key_values" not in kwargs


def test_encoder_block0_inputs_run_the_blocks_to_the_last_hidden_state(tmp_path):
    torch.manual_seed(0)
    T.BertModel(_bert(), add_pooling_layer=False).save_pretrained(tmp_path)
    lm = LazyModel(tmp_path)
    model = lm.materialize_all()
    ids = calib_ids(2, vocab=100, shape=(3, 20))
    args, kwargs = lm.adapter.block0_inputs(lm, ids, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(args[0], model.embeddings(input_ids=ids))
        h = args[0]
        for block in lm.blocks:
            out = block(h, *args[1:], **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(h, model(input_ids=ids).last_hidden_state, atol=1e-6)


def test_mean_pool_ignores_padding():
    h = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    assert torch.equal(mean_pool(h, torch.tensor([[1, 1, 0, 0]])), h[0, :2].mean(0, keepdim=True))


@pytest.fixture
def bert_with_tokenizer(tmp_path):
    """A tiny BERT folder with a WordPiece tokenizer (vocab.txt only, as older BERT checkpoints ship it)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat ran and".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    T.BertModel(_bert(vocab_size=len(words)), add_pooling_layer=False).save_pretrained(tmp_path)
    (tmp_path / "calib.txt").write_text("the cat sat on the mat\nthe dog ran and the cat sat\n" * 10)
    return tmp_path


def test_encoder_calibration_frames_windows_with_cls_and_sep(bert_with_tokenizer):
    lm = LazyModel(bert_with_tokenizer)
    batch = lm.adapter.calibration(lm, bert_with_tokenizer / "calib.txt", 3, 8)
    assert batch.shape == (3, 8)
    assert (batch[:, 0] == 2).all() and (batch[:, -1] == 3).all()          # [CLS] ... [SEP]
    assert not ((batch[:, 1:-1] == 2) | (batch[:, 1:-1] == 3)).any()
    with pytest.raises(DataError, match=r"--calib-seq-len 100 is longer than .* 64 positions"):
        lm.adapter.calibration(lm, bert_with_tokenizer / "calib.txt", 3, 100)


def test_encoder_eval_batches_are_padded_lines(bert_with_tokenizer):
    from dcc.models.text import load_tokenizer
    tok = load_tokenizer(bert_with_tokenizer)
    assert tok is not None   # found through vocab.txt
    f = bert_with_tokenizer / "eval.txt"
    f.write_text("the cat sat\n\nthe dog ran and the cat sat on the mat\n")
    (batch,) = Encoder().eval_data(tok, _bert(vocab_size=14).to_dict(), f, 512, None)
    assert batch["input_ids"].shape == (2, 12) and batch["attention_mask"].sum(1).tolist() == [5, 12]
    assert batch["input_ids"][0, 5:].eq(tok.pad_token_id).all()
