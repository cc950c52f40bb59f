"""Gemma 3 GGUF -> Hugging Face folder (dcc.models.gguf, architecture gemma3).

The synthetic tests write tiny gemma3 GGUF files with gguf.GGUFWriter the way llama.cpp's converter does (every norm
weight stored + 1, q/k rows left in Hugging Face order, Q8_0/Q5_0/Q4_K/Q6_K/F16 tensors, an SPM vocabulary with
scores) and always run. The real-file tests use Gemma-3-270M Q4_K_M (models/gemma-3-270m.gguf, written by
scripts/fetch_gemma3.sh; or $DCC_GEMMA3_GGUF) and are skipped when it is absent; it is converted once per module."""
from __future__ import annotations

import heapq
import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from dcc.models.gguf import GGUFError, gguf_to_hf

REPO = Path(__file__).resolve().parents[2]
GGUF_PATH = Path(os.environ.get("DCC_GEMMA3_GGUF", REPO / "models" / "gemma-3-270m.gguf"))
WIKI = Path("/work/shared/assets/wikitext2_raw_test/wiki.test.raw")
SKIP_REAL = f"Gemma-3-270M GGUF not found at {GGUF_PATH} (run scripts/fetch_gemma3.sh, or set DCC_GEMMA3_GGUF)"
needs_gguf = pytest.mark.skipif(not GGUF_PATH.is_file(), reason=SKIP_REAL)

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded on the banks of a wide river, "
    "where farmers and traders met to buy and sell their goods. Over the centuries, the small market town grew into "
    "a busy port, and its streets filled with merchants, sailors and craftsmen from many different countries. "
    "Today, visitors come from all over the world to see its old churches, walk along the river and enjoy the "
    "local food."
)
Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------------- llama.cpp's SPM, written out


class LlamaCppSpm:
    """llama.cpp's tokenizer for an SPM ('llama') vocabulary, written out here independently (llama-vocab.cpp:
    tokenizer_st_partition, then llm_tokenizer_spm_session): control/user-defined tokens are cut out of the raw text
    first (longest first; control ones only with parse_special), spaces become U+2581, and each remaining piece is
    merged pairwise, best score first (leftmost on ties), into vocabulary tokens; a leftover character that is not a
    token is written as its UTF-8 bytes (<0xXX>)."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int]):
        self.tokens, self.scores, self.types = tokens, scores, types
        self.index: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self.index.setdefault(t, i)
        self.special = sorted((i for i, ty in enumerate(types) if ty in (2, 3, 4)), key=lambda i: -len(tokens[i]))
        self.byte = {b: self.index[f"<0x{b:02X}>"] for b in range(256)}

    def _merge(self, text: str) -> list[int]:
        syms = [[c, i - 1, i + 1] for i, c in enumerate(text)]  # [text, prev, next]
        if syms:
            syms[-1][2] = -1
        heap: list = []

        def push(left, right):
            if left != -1 and right != -1:
                tid = self.index.get(syms[left][0] + syms[right][0])
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], left, right, len(syms[left][0]) + len(syms[right][0])))

        for i in range(1, len(syms)):
            push(i - 1, i)
        while heap:
            _, left, right, n = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a[0] or not b[0] or len(a[0]) + len(b[0]) != n:  # one side merged since
                continue
            a[0], b[0], a[2] = a[0] + b[0], "", b[2]
            if b[2] >= 0:
                syms[b[2]][1] = left
            push(a[1], left)
            push(left, a[2])
        out, i = [], 0 if syms else -1
        while i != -1:
            s = syms[i][0]
            out += [self.index[s]] if s in self.index else [self.byte[b] for b in s.encode()]
            i = syms[i][2]
        return out

    def encode(self, text: str, bos: int | None = None, parse_special: bool = True) -> list[int]:
        frags: list = [text]
        for sid in self.special:
            if self.types[sid] == 3 and not parse_special:
                continue
            s, nxt = self.tokens[sid], []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    nxt.append(f)
                    continue
                for j, part in enumerate(f.split(s)):
                    nxt += ([sid] if j else []) + ([part] if part else [])
            frags = nxt
        out = [] if bos is None else [bos]
        for f in frags:
            out += [f] if isinstance(f, int) else self._merge(f.replace(" ", "\u2581"))
        return out


# --------------------------------------------------------------------------------------------- synthetic tiny GGUFs

# Gemma's layout: control tokens, user-defined ones (newline and space runs, HTML tags), 256 bytes, the pieces in merge
# order (score = -position), tab runs (user-defined) last. transformers' Gemma tokenizer, which dcc writes, merges the
# space runs by their position in the file, which agrees with llama.cpp's cutting them out first only because they
# come before every normal piece, as in Gemma's vocabulary.
_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_USER = ["\n", "\n\n", "  ", "   ", "<b>", "</b>"]
_PIECES = ["▁", "t", "h", "e", "a", "r", "he", "▁t", "▁the", "at", "▁a", "er", "▁h", "ea", "ere", "▁there", "th"]
_TABS = ["\t", "\t\t"]
TOKENS = _CONTROL + _USER + [f"<0x{b:02X}>" for b in range(256)] + _PIECES + _TABS
TYPES = [3] * len(_CONTROL) + [4] * len(_USER) + [6] * 256 + [1] * len(_PIECES) + [4] * len(_TABS)
SCORES = [-1000.0] * (len(_CONTROL) + len(_USER)) + [0.0] * 256 + [-float(TOKENS.index(p)) for p in _PIECES]
SCORES += [-1000.0] * len(_TABS)


def tid(*tokens: str) -> list[int]:
    return [TOKENS.index(t) for t in tokens]


def _tiny_config(**kw):
    from transformers import Gemma3TextConfig

    args = dict(
        vocab_size=len(TOKENS), hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=4,
        query_pre_attn_scalar=128, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return Gemma3TextConfig(**{**args, **kw})


def _tiny_model(seed: int = 0, **kw):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    m = Gemma3ForCausalLM(_tiny_config(**kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                # like Gemma's bfloat16 norms: multiples of 1/256 in (-1, 1), so w + 1 is exact in float32
                p.copy_(torch.round(torch.randn_like(p) * 64).clamp(-255, 255) / 256)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return m


def _raw_kquant(rows: int, cols: int, qt, seed: int) -> np.ndarray:
    """Random K-quant blocks (gguf can dequantize K-quants but not make them) with small finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = np.full((rows, cols // block), 2e-3, np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qt == Q.Q4_K:  # d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        raw[..., 0:2], raw[..., 2:4] = d, d
    else:  # Q6_K: 128 + 64 bytes of 6-bit codes, 16 int8 scales, then d
        raw[..., -2:] = d
    return raw.reshape(rows, -1)


_LINEAR_TYPES = {  # HF module -> how the tiny file stores it (llama.cpp's Q4_K_M mixes types like this)
    "self_attn.q_proj": Q.Q8_0,
    "self_attn.k_proj": Q.Q5_0,
    "self_attn.v_proj": Q.F16,
    "self_attn.o_proj": Q.Q4_K,
    "mlp.gate_proj": Q.Q5_0,
    "mlp.up_proj": Q.F32,
    "mlp.down_proj": Q.Q6_K,
}
_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_LINEARS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_tiny_gguf(path: Path, m, *, meta=None, drop: tuple = (), extra: dict | None = None) -> dict:
    """Write `m` as llama.cpp's converter writes a Gemma 3 (conversion/gemma.py, Gemma3Model). Returns the Hugging Face
    state dict as it should come back (quantized tensors replaced by their dequantized values)."""
    cfg = m.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    for call in meta or ():
        call(w)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores(SCORES)
    w.add_token_types(TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}
    expect = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    plan = [("model.embed_tokens.weight", "token_embd.weight", Q.Q8_0)]
    plan += [("model.norm.weight", "output_norm.weight", None)]
    for i in range(cfg.num_hidden_layers):
        plan += [(f"model.layers.{i}.{h}.weight", f"blk.{i}.{g}.weight", _LINEAR_TYPES[h]) for h, g in _LINEARS.items()]
        plan += [(f"model.layers.{i}.{h}.weight", f"blk.{i}.{g}.weight", None) for h, g in _NORMS.items()]
    for n, (hf, g, qt) in enumerate(plan):
        if g in drop:
            continue
        a = sd[hf]
        if qt is None:  # a norm: F32, stored as w + 1 (Gemma3RMSNorm computes x * (1 + w))
            w.add_tensor(g, a + np.float32(1.0))
        elif qt in (Q.F32, Q.F16):
            w.add_tensor(g, a.astype(np.float16) if qt == Q.F16 else a)
            expect[hf] = a.astype(np.float16).astype(np.float32) if qt == Q.F16 else a
        else:
            raw = _raw_kquant(*a.shape, qt, seed=n) if qt in (Q.Q4_K, Q.Q6_K) else gguf.quants.quantize(a, qt)
            w.add_tensor(g, raw, raw_dtype=qt)
            expect[hf] = gguf.quants.dequantize(raw, qt).reshape(a.shape)
    for g, a in (extra or {}).items():
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source model, .gguf path, expected state dict, converted folder)."""
    tmp = tmp_path_factory.mktemp("gemma3_tiny")
    m = _tiny_model()
    src = tmp / "tiny-gemma3.gguf"
    expect = _write_tiny_gguf(src, m)
    return m, src, expect, gguf_to_hf(src, tmp / "hf", progress=False)


def test_tiny_config(tiny):
    from transformers import AutoConfig

    m, _, _, folder = tiny
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "gemma3_text" and raw["architectures"] == ["Gemma3ForCausalLM"]
    cfg, want = AutoConfig.from_pretrained(folder), m.config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window", "layer_types",
        "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation",
        "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):
        assert getattr(cfg, key) == getattr(want, key), key
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's set_swa_pattern(6)
    assert raw["rms_norm_eps"] == 1e-6  # float32 metadata written as the decimal it came from


def test_tiny_weights_and_norm_shift(tiny):
    _, src, expect, folder = tiny
    stored = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expect)  # tied: no lm_head
        for k, v in expect.items():
            assert torch.equal(f.get_tensor(k), torch.from_numpy(np.ascontiguousarray(v))), k
        # the file holds w + 1 for every norm; the folder holds w exactly
        for hf, g in [("model.norm.weight", "output_norm.weight"), *[
            (f"model.layers.3.{h}.weight", f"blk.3.{g}.weight") for h, g in _NORMS.items()
        ]]:
            gw = np.array(stored[g].data, dtype=np.float32)
            assert np.array_equal(f.get_tensor(hf).numpy() + 1, gw) and not np.array_equal(f.get_tensor(hf), gw), hf
        # q/k keep Hugging Face's row order (Gemma uses NEOX RoPE: the converter does not permute them)
        q = gguf.quants.dequantize(stored["blk.2.attn_q.weight"].data, Q.Q8_0).reshape(256, 256)
        assert np.array_equal(f.get_tensor("model.layers.2.self_attn.q_proj.weight").numpy(), q)
    assert {stored[f"blk.0.{g}.weight"].tensor_type for g in _LINEARS.values()} == set(_LINEAR_TYPES.values())


def test_tiny_logits_match_transformers(tiny, tmp_path, monkeypatch):
    from transformers import Gemma3ForCausalLM

    from dcc.models.loader import LazyModel

    m, src, expect, folder = tiny
    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expect.items()}, strict=False)
    monkeypatch.setenv("DCC_CACHE", str(tmp_path / "cache"))
    lm = LazyModel(src)  # what dcc compiles: the .gguf converted once into the cache, loaded block by block
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and len(lm.blocks) == 6
    ids = torch.tensor([tid("<bos>", "▁a", "▁the", "  ", "<0x71>", "<b>", "ere", "<0xC3>", "<0xA9>", "▁there", "he")])
    assert ids.shape[1] > m.config.sliding_window
    with torch.no_grad():
        want = m(ids).logits
        got = lm.materialize_all()(input_ids=ids, use_cache=False).logits
        again = Gemma3ForCausalLM.from_pretrained(folder).eval()(ids).logits
    assert torch.equal(got, want) and torch.equal(again, want)
    assert want.abs().max() < 30.0  # the final softcap (tanh * 30) is applied


def test_tiny_tokenizer(tiny):
    from transformers import AutoTokenizer

    folder = tiny[3]
    tok = AutoTokenizer.from_pretrained(folder)
    ref = LlamaCppSpm(TOKENS, SCORES, TYPES)
    assert tok(" the")["input_ids"] == tid("<bos>", "▁the")  # add_bos; ▁ t -> ▁t, h e -> he, ▁t he -> ▁the
    # no prefix space; "he" is merged first (best score), after which neither "th" nor "er" can be
    assert tok("there")["input_ids"] == tid("<bos>", "t", "he", "r", "e")
    assert tok("a  the")["input_ids"] == tid("<bos>", "a", "  ", "t", "he")  # the space run is one token
    for s in [" there  the\n\n<b>heat</b>", "a   é 日\t\tx", "hat at\nthe", "<bos>a<eos>", "   ", ""]:
        want = ref.encode(s, bos=2)
        assert tok(s)["input_ids"] == want, s
        assert tok.decode(want, skip_special_tokens=True) == s.replace("<bos>", "").replace("<eos>", ""), s
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<bos>", "<eos>", "<unk>", "<pad>")


def test_tiny_pattern_and_rope_scaling(tmp_path):
    from transformers import AutoConfig

    m = _tiny_model(seed=1, final_logit_softcapping=None)
    src = tmp_path / "scaled.gguf"
    flags = [True, False, True, True, False, True]  # one flag per layer, true = sliding
    _write_tiny_gguf(src, m, meta=[
        lambda w: w.add_sliding_window_pattern(flags),
        lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
        lambda w: w.add_rope_scaling_factor(8.0),
        lambda w: w.add_rope_freq_base_swa(20_000.0),
    ])
    cfg = AutoConfig.from_pretrained(gguf_to_hf(src, tmp_path / "hf", progress=False))
    assert cfg.layer_types == ["sliding_attention" if f else "full_attention" for f in flags]
    assert cfg.rope_parameters["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert cfg.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 20_000.0}
    assert cfg.final_logit_softcapping is None


def test_tiny_errors(tmp_path):
    m = _tiny_model(seed=2)
    cap = tmp_path / "softcap.gguf"
    _write_tiny_gguf(cap, m, meta=[lambda w: w.add_attn_logit_softcapping(50.0)])
    with pytest.raises(GGUFError, match=r"softcap.gguf.*attn_logit_softcapping"):
        gguf_to_hf(cap, tmp_path / "out")

    miss = tmp_path / "missing.gguf"
    _write_tiny_gguf(miss, m, drop=("blk.4.post_ffw_norm.weight",))
    with pytest.raises(GGUFError, match=r"missing.gguf: tensor blk\.4\.post_ffw_norm\.weight .*is missing"):
        gguf_to_hf(miss, tmp_path / "out")

    extra = tmp_path / "extra.gguf"
    _write_tiny_gguf(extra, m, extra={"rope_freqs.weight": np.ones(64, np.float32)})
    with pytest.raises(GGUFError, match=r"extra.gguf: unknown tensor 'rope_freqs.weight' for a gemma3 model"):
        gguf_to_hf(extra, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.gguf", "missing.gguf", "softcap.gguf"]


# ----------------------------------------------------------------------------------------- real Gemma-3-270M file


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not GGUF_PATH.is_file():
        pytest.skip(SKIP_REAL)
    return gguf_to_hf(GGUF_PATH, tmp_path_factory.mktemp("gemma3_270m") / "hf", progress=False)


@pytest.fixture(scope="module")
def real_model(converted):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(converted).eval()


@needs_gguf
def test_real_config(converted):
    cfg = json.loads((converted / "config.json").read_text())
    want = {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 640,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 2048, "rms_norm_eps": 1e-6, "vocab_size": 262144, "max_position_embeddings": 32768,
        "sliding_window": 512, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
        "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    }
    assert {k: cfg.get(k) for k in want} == want


@needs_gguf
def test_real_weights(converted):
    src = {t.name: t for t in gguf.GGUFReader(str(GGUF_PATH)).tensors}

    def deq(name):
        t = src[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])

    cases = {
        "model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", Q.Q5_0),
        "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", Q.Q4_K),
        "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", Q.Q6_K),
        "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", Q.Q8_0),
    }
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        for hf, (g, qt) in cases.items():
            assert src[g].tensor_type == qt, g
            assert torch.equal(f.get_tensor(hf), torch.from_numpy(np.array(deq(g), dtype=np.float32))), hf
        norms = [k for k in f.keys() if k.endswith("norm.weight")]
        assert len(norms) == 1 + 18 * 6
        hf_norm = {g: h for h, g in _NORMS.items()}
        for i, g in [(0, "attn_q_norm"), (5, "post_ffw_norm"), (17, "ffn_norm")]:
            hf = f"model.layers.{i}.{hf_norm[g]}.weight"
            w = f.get_tensor(hf)
            assert torch.equal(w + 1, torch.from_numpy(deq(f"blk.{i}.{g}.weight").copy())), hf
            # the converter added 1 in float32 to bfloat16 weights: what comes back is bfloat16 again, exactly
            assert torch.equal(w.to(torch.bfloat16).float(), w), hf


@needs_gguf
def test_real_tokenizer_matches_llama_cpp(converted):
    from transformers import AutoTokenizer

    meta = gguf.GGUFReader(str(GGUF_PATH)).fields

    def field(key):
        f = meta[key]
        return [bytes(f.parts[i]).decode() if key.endswith("tokens") else f.parts[i].tolist()[0] for i in f.data]

    ref = LlamaCppSpm(*(field(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type")))
    tok = AutoTokenizer.from_pretrained(converted)
    samples = [
        "Hello world", PARAGRAPH, "  leading spaces,\ttabs\nand newlines\n\n", "a   b\t\tc  \n  d",
        "<start_of_turn>user\nWhat is 12345 + 678?<end_of_turn>\n<start_of_turn>model\n",
        "Ünïcödé — ça marche? 日本語のテキスト 🙂 don't we'll I'M", "<b>bold</b> <table><tr><td>x</td></tr></table>",
        "def f(x):\n    return x**2  # square\n", "𝔘𝔫𝔦 \x00\x01 ꙮ",
    ]
    if WIKI.is_file():
        samples.append(WIKI.read_text(encoding="utf-8").replace("\r\n", "\n")[:30000])
    for s in samples:
        want = ref.encode(s, bos=2)
        assert tok(s)["input_ids"] == want, s[:80]
        assert tok.decode(want[1:]) == s, s[:80]
    assert tok(" ")["input_ids"] == [2, 236743] and tok.bos_token == "<bos>"


@needs_gguf
def test_real_is_a_language_model(real_model, converted):
    from transformers import AutoTokenizer

    from dcc.models.gguf import permute_rope_rows

    ids = AutoTokenizer.from_pretrained(converted)(PARAGRAPH, return_tensors="pt").input_ids
    layers = real_model.model.layers
    norms = [p for n, p in real_model.named_parameters() if n.endswith("norm.weight")]

    def loss() -> float:
        with torch.no_grad():
            return real_model(ids, labels=ids).loss.item()

    good = loss()
    assert math.exp(good) < 30, f"perplexity {math.exp(good):.1f} on plain English: the weights are wrong"
    qk = [(b.self_attn.q_proj.weight.data, b.self_attn.k_proj.weight.data) for b in layers]
    saved = [p.data for p in norms]
    try:
        for b, (q, k) in zip(layers, qk):  # llama's q/k row order would be wrong here
            b.self_attn.q_proj.weight.data = torch.from_numpy(permute_rope_rows(q.numpy(), 4))
            b.self_attn.k_proj.weight.data = torch.from_numpy(permute_rope_rows(k.numpy(), 1))
        permuted = loss()
        for b, (q, k) in zip(layers, qk):
            b.self_attn.q_proj.weight.data, b.self_attn.k_proj.weight.data = q, k
        for p, w in zip(norms, saved):  # the norms as the file stores them
            p.data = w + 1
        shifted = loss()
    finally:
        for b, (q, k) in zip(layers, qk):
            b.self_attn.q_proj.weight.data, b.self_attn.k_proj.weight.data = q, k
        for p, w in zip(norms, saved):
            p.data = w
    assert permuted > good + 1.0 and shifted > good + 1.0, (good, permuted, shifted)
    assert math.isclose(loss(), good, rel_tol=0, abs_tol=1e-6)
