"""Any family in (issue 28, point 3): tiny random Llama, Mistral, Qwen2, Qwen3 (q/k norms), Gemma2 (soft-capped eager
attention, post-norms), Gemma3 (q/k norms, RoPE per layer type) and Phi-3 (fused qkv_proj and gate_up_proj) compile,
the artifact validates (its decoded weights are the compiled ones) and its CPU reference's logits are close to the
float model's; refusals are one true line; sharded, fp16 and bf16 checkpoints go in; GGUF files of qwen2, qwen3,
phi3, gemma2 and mistral (as llama, or as mistral) convert, with Q8_0/Q5_x/Q4_x and K-quant (Q6_K, Q5_K) tensors."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as T

from cli_util import error_line, run
from dcc.models.gguf import gguf_to_hf
from dcc.runtime.artifact import load_artifact
from dcc.runtime.reference import build_model
from tiny_models import one_thread  # noqa: F401  (one intra-op thread for the module)

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda **kw: T.LlamaConfig(**COMMON, **kw),
    "mistral": lambda **kw: T.MistralConfig(**COMMON, **kw),
    "qwen2": lambda **kw: T.Qwen2Config(**COMMON, **kw),
    "qwen3": lambda **kw: T.Qwen3Config(**COMMON, head_dim=16, **kw),
    "gemma2": lambda **kw: T.Gemma2Config(**COMMON, head_dim=16, **kw),
    "gemma3": lambda **kw: T.Gemma3TextConfig(**COMMON, head_dim=16, **kw),
    "phi3": lambda **kw: T.Phi3Config(**COMMON, pad_token_id=0, **kw),
}
W8A8 = ("--target", "qserve", "--algo", "smoothquant", "--bits", "8")
# one representative 4-bit recipe per family: the passes that assume a structure (rotation, smoothing,
# SmoothAttention, the 4-bit KV cache) run where the family's structure allows them
FOUR_BIT = {
    "llama": ("--target", "tinychat", "--algo", "awq", "--group-size", "64"),
    "mistral": ("--target", "tinychat", "--algo", "rtn", "--group-size", "64"),
    "qwen2": ("--target", "qserve",),
    "qwen3": ("--target", "qserve",),                      # SmoothAttention folds into q_norm / k_norm
    "gemma2": ("--target", "nunchaku", "--rank", "16"),    # eager attention, post-norms
    "gemma3": ("--target", "nunchaku", "--algo", "rtn", "--rank", "16"),
    "phi3": ("--target", "qserve",),                       # qkv_proj / gate_up_proj split, KV4, SmoothAttention
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    (d / "calib.txt").write_text(" ".join(str((7 * i + 3) % VOCAB) for i in range(4 * 32)))
    return d


def _save(folder: Path, config, dtype=torch.float32, **save_kw) -> Path:
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        T.AutoModelForCausalLM.from_config(config).to(dtype).eval().save_pretrained(folder, **save_kw)
    return folder


def _compile(model: Path, out: Path, calib: Path, recipe: tuple) -> tuple[int, str]:
    return run("compile", model, *recipe, "--calib", calib, "--calib-chunks", "2", "--calib-seq-len", "32", "-o", out,
               "-q", "--force")


@torch.no_grad()
def _drift(model: Path, out: Path) -> float:
    """Relative error of the artifact's CPU reference logits against the float model's (transformers' own build)."""
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(input_ids=ids).logits
    got = build_model(load_artifact(out))(input_ids=ids, use_cache=False).logits
    return float((got - ref).norm() / ref.norm())


def _compiled(root: Path, family: str, name: str, recipe: tuple) -> Path:
    model = _save(root / family, FAMILIES[family]())
    out = root / f"{family}-{name}"
    code, text = _compile(model, out, root / "calib.txt", recipe)
    assert code == 0, text
    code, text = run("validate", out)   # every quantized layer decodes to the compiled fake-quant weight
    assert code == 0, text
    return out


@torch.no_grad()
def _with_artifact_weights(model: Path, art) -> torch.nn.Module:
    """transformers' own model of `model` holding the artifact's weights: each quantized linear its decoded weight
    (a split fused linear: its parts' decoded rows, concatenated), everything else the artifact's tensor."""
    m = T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    quant, splits = art.quantized_layers(), (art.manifest["source"].get("split_linears") or {})

    def weight(layer: str) -> torch.Tensor:
        if layer in splits:
            return torch.cat([weight(f"{layer}.{i}") for i in range(len(splits[layer]))])
        return art.decode(layer) if layer in quant else art.tensors.get(f"{layer}.weight")

    for name, p in m.named_parameters():
        layer, _, kind = name.rpartition(".")
        if kind == "weight" and (layer in quant or layer in splits):
            p.copy_(weight(layer))
        elif layer in splits:   # a bias of a split linear
            p.copy_(torch.cat([art.tensors.get(f"{layer}.{i}.{kind}") for i in range(len(splits[layer]))]))
        elif name in art.tensors.keys():
            p.copy_(art.tensors.get(name))
        else:
            assert name == "lm_head.weight" and art.manifest["tied_embeddings"], name
    return m


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3"])   # TinyChat refuses Gemma 3's RoPE
def test_family_reference_runs_the_models_function(root, family):
    """W4A16 (the kernel computes with the decoded 16-bit weight): the artifact's CPU reference -- its blocks run as
    the captured graphs, eager soft-capped attention for Gemma 2, the split parts for Phi-3 -- computes what
    transformers' own model computes with the artifact's weights, to float tolerance."""
    out = _compiled(root, family, "w4a16", ("--target", "tinychat", "--algo", "awq", "--group-size", "64"))
    art = load_artifact(out)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _with_artifact_weights(root / family, art)(input_ids=ids).logits
        got = build_model(art)(input_ids=ids, use_cache=False).logits
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_gemma2_eager_attention_takes_a_quantized_kv_cache(root):
    """The KV cache quantization finds Gemma 2's eager attention (its K and V before the GQA repeat)."""
    out = _compiled(root, "gemma2", "w8a8kv8", (*W8A8, "--kv-bits", "8"))
    kv = json.loads((out / "dcc.json").read_text())["runtime"]["kv_cache"]
    assert kv == {"model.layers.0.self_attn": 8, "model.layers.1.self_attn": 8}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_four_bit(root, family):
    out = _compiled(root, family, "w4", FOUR_BIT[family])
    assert _drift(root / family, out) < 0.5


def test_phi3_fused_linears_are_split_from_the_dataflow(root):
    out = _compiled(root, "phi3", "w4", FOUR_BIT["phi3"])
    manifest = json.loads((out / "dcc.json").read_text())
    splits = manifest["source"]["split_linears"]
    assert splits["model.layers.0.self_attn.qkv_proj"] == [64, 32, 32]     # q, k, v rows
    assert splits["model.layers.1.mlp.gate_up_proj"] == [128, 128]          # gate, up
    assert "model.layers.0.self_attn.qkv_proj.1" in manifest["layers"]
    assert manifest["runtime"]["kv_cache"]["model.layers.0.self_attn"] == 4
    # validate --model compares each part with its slice of the float model's fused output
    out = _compiled(root, "phi3", "w4a16", ("--target", "tinychat", "--algo", "rtn", "--group-size", "64"))
    code, text = run("validate", out, "--model", root / "phi3", "--tokens", "16", "--layers")
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("model.layers.")]
    assert code == 0 and len(listed) == 14, text   # 2 x (q, k, v, o, gate, up, down)
    assert {"model.layers.1.mlp.gate_up_proj.0", "model.layers.1.self_attn.qkv_proj.2"} <= set(listed)


def test_refusals_are_one_true_line(root):
    gemma3 = _save(root / "gemma3", FAMILIES["gemma3"]())
    code, text = _compile(gemma3, root / "g3-tc", root / "calib.txt", FOUR_BIT["llama"])
    assert code != 0 and "target tinychat refuses this model: TinyChat applies one plain RoPE" in error_line(text)
    gemma2 = _save(root / "gemma2", FAMILIES["gemma2"]())
    code, text = _compile(gemma2, root / "g2-qoq", root / "calib.txt", ("--target", "qserve"))
    line = error_line(text)
    assert code != 0 and "rotate: block model.layers.0: no linear writes into the residual stream directly" in line
    assert "use a pipeline without rotate" in line


@pytest.mark.parametrize("name,dtype,shard", [("fp16", torch.float16, None), ("bf16", torch.bfloat16, None),
                                              ("sharded-bf16", torch.bfloat16, "20KB")])
def test_checkpoint_dtypes_and_shards(root, name, dtype, shard):
    model = _save(root / name, FAMILIES["llama"](), dtype, **({"max_shard_size": shard} if shard else {}))
    assert (model / "model.safetensors.index.json").is_file() == bool(shard)
    out = root / f"{name}-rtn"
    code, text = _compile(model, out, root / "calib.txt", FOUR_BIT["mistral"])
    assert code == 0, text
    code, text = run("validate", out)
    assert code == 0, text
    assert _drift(model, out) < 0.5


# ------------------------------------------------------------------------------------------------------------ GGUF

Q = gguf.GGMLQuantizationType
def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (printable Latin-1 as itself, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _config(family: str):
    kw = {**COMMON, "intermediate_size": 256, "vocab_size": 260, "tie_word_embeddings": False}
    if family in ("qwen3", "gemma2"):
        kw["head_dim"] = 16
    if family == "gemma2":
        kw.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                  sliding_window=16)
    if family == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mistral":
        kw["sliding_window"] = 16
    return {"llama": T.MistralConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config,
            "phi3": T.Phi3Config, "gemma2": T.Gemma2Config}[family](**kw)


def _kquant_blocks(rows: int, cols: int, qt, seed: int) -> np.ndarray:
    """Random K-quant super-blocks (gguf dequantizes K-quants but cannot make them) with a small f16 scale, so the
    weights stay finite and small: Q6_K keeps d in its last 2 bytes, Q5_K keeps d and dmin in its first 4."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = np.full((rows, cols // block), 1e-3, np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qt == Q.Q6_K:
        raw[..., -2:] = d
    else:
        raw[..., 0:2], raw[..., 2:4] = d, d
    return raw.reshape(rows, -1)


def _hf_to_gguf_names(family: str, cfg) -> dict[str, str]:
    """{HF tensor: GGUF tensor} as llama.cpp's converter names them for this family."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"self_attn.o_proj.weight": "attn_output.weight", "mlp.down_proj.weight": "ffn_down.weight",
           "input_layernorm.weight": "attn_norm.weight"}
    if family == "phi3":
        per.update({"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
                    "post_attention_layernorm.weight": "ffn_norm.weight"})
    else:
        per.update({f"self_attn.{p}_proj.weight": f"attn_{p}.weight" for p in "qkv"})
        per.update({"mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight"})
    if family == "gemma2":
        per.update({"post_attention_layernorm.weight": "post_attention_norm.weight",
                    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                    "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
    elif family != "phi3":
        per["post_attention_layernorm.weight"] = "ffn_norm.weight"
    if family == "qwen3":
        per.update({"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"})
    if family == "qwen2":
        per.update({f"self_attn.{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"})
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{h}": f"blk.{i}.{g}" for h, g in per.items()})
    return names


def _write_gguf(path: Path, family: str, m) -> dict[str, np.ndarray]:
    """Write `m` as llama.cpp's converter would (Mistral as llama or mistral, q/k rows permuted to interleaved RoPE;
    Gemma's norms + 1), linears in a mix of Q8_0, Q5_0, Q5_1, Q4_1, Q6_K and Q5_K. Returns the HF state dict as it
    should come back (quantized tensors replaced by their dequantized values)."""
    cfg, arch = m.config, family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if family == "mistral":
        w.add_sliding_window(cfg.sliding_window)
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<s>", "</s>", "\u0120t"] + _byte_chars())   # "Ġt": a space and t merged
    w.add_token_types([3, 3, 3, 1] + [1] * 256)
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    types = [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_1]
    expect = {}
    for n, (hf, g) in enumerate(_hf_to_gguf_names(family, cfg).items()):
        a = m.state_dict()[hf].float().numpy()
        if family in ("llama", "mistral") and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        if family == "gemma2" and hf.endswith("norm.weight"):
            a = a + np.float32(1.0)   # Gemma's RMSNorm computes x * (1 + w); llama.cpp stores 1 + w
        if a.ndim == 1:
            w.add_tensor(g, np.ascontiguousarray(a))
            back = a
        else:
            qt = Q.Q6_K if hf.endswith("down_proj.weight") and "layers.0" in hf else \
                Q.Q5_K if hf.endswith("down_proj.weight") else types[n % len(types)]
            raw = (_kquant_blocks(*a.shape, qt, seed=n) if qt in (Q.Q6_K, Q.Q5_K)
                   else gguf.quants.quantize(np.ascontiguousarray(a), qt))
            w.add_tensor(g, raw, raw_dtype=qt)
            back = gguf.quants.dequantize(raw, qt).reshape(a.shape)
        if family in ("llama", "mistral") and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        if family == "gemma2" and hf.endswith("norm.weight"):
            back = back - np.float32(1.0)
        expect[hf] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"])
def test_gguf_family_converts(tmp_path, family):
    """The converted folder is the source model with the dequantized weights: same config class and the same
    logits (bit for bit). "llama": a Mistral model written as llama.cpp writes it (architecture llama); "mistral": the
    same under architecture mistral, as transformers also reads it (sliding window 16 < 24 tokens: it matters)."""
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(_config(family)).eval()
    src = tmp_path / f"{family}.gguf"
    expect = _write_gguf(src, family, m)
    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expect.items()}, strict=False)
    folder = gguf_to_hf(src, tmp_path / "hf", progress=False)
    got = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(got).__name__ == ("LlamaForCausalLM" if family == "llama" else type(m).__name__)
    ids = torch.randint(4, 260, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, m(input_ids=ids).logits)


def test_gguf_phi3_compiles(tmp_path, monkeypatch):
    """A .gguf goes straight into `dcc compile` (converted once into the cache): Phi-3, fused tensors and all."""
    monkeypatch.setenv("DCC_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(_config("phi3")).eval()
    src = tmp_path / "phi3.gguf"
    _write_gguf(src, "phi3", m)
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 20)
    out = tmp_path / "out"
    code, text = _compile(src, out, calib, ("--target", "nunchaku", "--algo", "rtn", "--rank", "16"))
    assert code == 0, text
    code, text = run("validate", out)
    assert code == 0, text
