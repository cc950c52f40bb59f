"""Folders dcc must refuse before any compile work, each with one true line: model code shipped in the folder (never
imported, not even when a prompt would be answered yes), a dcc artifact, MoE models and models of a kind no adapter
takes, Gemma2's soft-capped attention, checkpoints whose names, shapes or dtypes do not match transformers'
skeleton."""
import json

import pytest
import torch
import transformers as T
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dcc.cli.main import main
from dcc.compiler.calib_data import load_tokenizer
from dcc.models.loader import LazyModel, ModelLoadError

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 (one_thread: autouse fixture)

# The hostile folder's own classes: imported by transformers only if it runs the folder's code.
EVIL_MODEL_MAP = {"AutoConfig": "configuration_evil.EvilConfig",
                  "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


def edit_json(path, **fields):
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def evil(folder) -> str:
    """Python that leaves folder/MARKER when imported: the proof that the folder's code ran (an absolute path, since
    transformers imports such files from a copy in its modules cache)."""
    return f"import pathlib\npathlib.Path({str(folder / 'MARKER')!r}).write_text('ran')\n"


@pytest.fixture
def llama(tmp_path):
    path = tmp_path / "m"
    save_tiny(path, decoder_config("llama"))
    return path


@pytest.fixture
def calib(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(str(i % 100) for i in range(256)))
    return f


def compile_cli(model, calib, out, stdin=None):
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(out), "-q"], input=stdin)
    return res.exit_code, res.output


def assert_refused(model, calib, tmp_path, message, stdin=None):
    out = tmp_path / "out"
    code, text = compile_cli(model, calib, out, stdin)
    errors = [line for line in text.splitlines() if line.startswith("dcc: error:")]
    assert code == 2 and errors == [f"dcc: error: {message}"], text
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.fixture
def hostile_model(llama):
    """A real tiny Llama whose config asks for its own classes (a model type transformers does not know, so that
    transformers would prompt to run them)."""
    for f in ("configuration_evil.py", "modeling_evil.py"):
        (llama / f).write_text(evil(llama) + "from transformers import LlamaConfig, LlamaForCausalLM\n"
                               "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                               "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    edit_json(llama / "config.json", model_type="evil", auto_map=EVIL_MODEL_MAP)
    return llama


@pytest.fixture
def hostile_tokenizer(llama):
    (llama / "tokenization_evil.py").write_text(evil(llama) + "from transformers import PreTrainedTokenizerFast\n"
                                                "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (llama / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (llama / "vocab.json").write_text("{}")
    return llama


def test_model_code_is_never_run(hostile_model, calib, tmp_path):
    msg = (f"{hostile_model}/config.json: auto_map entry AutoModelForCausalLM -> modeling_evil.EvilForCausalLM would "
           f"run Python code shipped with the model; dcc never runs model code (use a model whose architecture "
           f"transformers ships)")
    with pytest.raises(ModelLoadError) as e:
        LazyModel(hostile_model)
    assert str(e.value) == msg
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(hostile_model)   # transformers reads config.json's auto_map for tokenizers too
    assert str(e.value) == msg
    assert_refused(hostile_model, calib, tmp_path, msg)
    assert_refused(hostile_model, calib, tmp_path, msg, stdin="y\n")   # no prompt to answer
    assert not (hostile_model / "MARKER").exists()


def test_tokenizer_code_is_never_run(hostile_tokenizer, calib, tmp_path):
    msg = (f"{hostile_tokenizer}/tokenizer_config.json: auto_map entry AutoTokenizer -> "
           f"tokenization_evil.EvilTokenizer would run Python code shipped with the model; dcc never runs model code "
           f"(use a model whose architecture transformers ships)")
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(hostile_tokenizer)
    assert str(e.value) == msg
    with pytest.raises(ModelLoadError) as e:
        LazyModel(hostile_tokenizer)
    assert str(e.value) == msg
    assert_refused(hostile_tokenizer, calib, tmp_path, msg, stdin="y\n")
    assert not (hostile_tokenizer / "MARKER").exists()


def test_dcc_artifact_as_the_source(llama, calib, tmp_path):
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", str(llama), "--algo", "rtn", "--group-size", "64", "--calib", str(calib),
                                    "--calib-chunks", "2", "--calib-seq-len", "32", "-o", str(art), "-q"])
    assert res.exit_code == 0, res.output
    msg = (f"{art} is a dcc artifact (target tinychat), not a source model: compile from the model it was made from "
           f"(its source: m)")
    with pytest.raises(ModelLoadError) as e:
        LazyModel(art)
    assert str(e.value) == msg
    assert_refused(art, calib, tmp_path, msg)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts(tmp_path, family):
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
    config = (T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" else
              T.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64))
    save_tiny(tmp_path, config)
    name = type(T.AutoModelForCausalLM.from_config(config)).__name__
    with pytest.raises(ModelLoadError) as e:
        LazyModel(tmp_path)
    assert str(e.value) == (f"{tmp_path}: {name} (model_type {family}) is a mixture-of-experts model; dcc does not "
                            f"compile MoE models yet (their experts are not plain linear layers)")


def test_moe_found_in_the_skeleton_without_a_config_field(tmp_path):
    from dcc.models.checks import check_skeleton
    config = T.MixtralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, num_local_experts=4)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelLoadError, match="is a mixture-of-experts model"):
        check_skeleton(tmp_path, config, model)
    with torch.device("meta"):   # a dense model passes
        check_skeleton(tmp_path, config, T.AutoModelForCausalLM.from_config(decoder_config("llama")))


def test_sentence_encoder_goes_to_the_encoder_adapter(tmp_path):
    T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(tmp_path)
    assert "embeddings.word_embeddings.weight" in load_file(tmp_path / "model.safetensors")   # no 'bert.' prefix
    lm = LazyModel(tmp_path)   # before the encoder adapter: refused, blaming the file for a missing bert.* tensor
    assert lm.adapter.kind == "encoder" and type(lm.model).__name__ == "BertModel"


def test_a_model_of_another_kind_is_refused(tmp_path):
    T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        LazyModel(tmp_path)
    assert str(e.value) == (f"{tmp_path}: ViTModel (model_type vit) is neither a causal language model nor an "
                            f"encoder-only transformer with a masked-LM class in transformers; dcc compiles "
                            f"decoder-only causal LMs and BERT-family encoders today (diffusion transformers are "
                            f"planned)")


def test_gemma2_soft_capping_is_built_with_eager_attention(tmp_path):
    """Gemma 2's tanh soft-cap of the scores is not in sdpa: the model is built with eager attention (issue 23
    refused it; the analysis now finds eager attention in the graph, tests/models/test_families.py)."""
    config = T.Gemma2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, head_dim=16, max_position_embeddings=64)
    save_tiny(tmp_path, config)
    assert LazyModel(tmp_path).model.config._attn_implementation == "eager"
    save_tiny(tmp_path, T.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64))
    assert LazyModel(tmp_path).model.config._attn_implementation == "sdpa"


def test_renamed_tensors_are_found_up_front(llama):
    tensors = load_file(llama / "model.safetensors")
    renamed = {k.replace("model.layers.", "transformer.h."): v for k, v in tensors.items()}
    save_file(renamed, llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        LazyModel(llama)   # the constructor: before any block is read
    assert str(e.value) == (f"{llama}: the checkpoint does not match transformers' LlamaForCausalLM: 18 of 21 tensors "
                            f"missing (first: model.layers.0.self_attn.q_proj.weight); the file's names look like "
                            f"'transformer.h.0.input_layernorm.weight'")


def test_wrong_shape_is_found_up_front(llama):
    tensors = load_file(llama / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        LazyModel(llama)
    assert str(e.value) == (f"{llama}: tensor model.layers.1.mlp.down_proj.weight has shape (64, 64), the config "
                            f"expects (64, 128)")


def test_integer_weights_are_refused(llama):
    tensors = load_file(llama / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = torch.randint(-127, 128, tensors[key].shape, dtype=torch.int8)
    save_file(tensors, llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        LazyModel(llama)
    assert str(e.value) == (f"{llama}/model.safetensors: tensor {key} is I8; dcc needs floating-point source weights "
                            f"(this checkpoint looks already quantized)")


def test_quantization_config_is_refused(llama):
    edit_json(llama / "config.json", quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(ModelLoadError) as e:
        LazyModel(llama)
    assert str(e.value) == (f"{llama}/config.json: quantization_config (quant_method gptq) says the weights are "
                            f"already quantized; dcc needs floating-point source weights")


def test_an_auto_map_in_the_older_list_form_is_refused_too(tmp_path):
    from dcc.models.checks import check_no_remote_code
    from dcc.models.loader import ModelLoadError
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": ["tokenization_evil.EvilTokenizer", null]}')
    with pytest.raises(ModelLoadError, match=r"tokenizer_config.json: auto_map entry AutoTokenizer -> "
                                             r"tokenization_evil.EvilTokenizer would run Python code"):
        check_no_remote_code(tmp_path)
