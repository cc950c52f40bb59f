"""LoRA merged into Nunchaku artifacts (dcc/targets/nunchaku/lora.py, lora_keys.py): key formats and name
resolution; the fused-layer rules on a hand-made fused entry (shared A -> one down, different As -> block-diagonal
up); biases, a second merge, the INT4 / INT4-unsigned / NVFP4 formats, a kohya FLUX LoRA through diffusers'
converter; and on stories260K compiled with a rank-16 branch, per merged layer, the CPU reference of Nunchaku's kernel
(NunchakuLinear) gives the base artifact's output plus strength * alpha/r * x A^T B^T (float64) within the bound
of the kernel's 16-bit roundings, with every main-branch tensor byte-identical.

The bound (bf16, unit roundoff u = 2^-8), per output element: the kernel rounds each output once to bf16 after
adding the branch in fp32, so base and merged outputs carry u|y_b| + u|y_m|; the LoRA's part is x (bf16 in the
test) times bf16(scale * A) (rounded once by the merge), its fp32 activations rounded to bf16 (lora_scales = 1),
times bf16(B): (1 + u)^3 - 1 of |x| |scale A|^T |B|^T. fp32 accumulation adds ~2^-24 relative, covered by a 2^-20
slack. A changed bias: bf16(b + db) is one more rounding (u|b + db|) and the bias is added to the 16-bit main
branch in bf16 (u|main + b| for each of base and merged)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dcc.runtime.artifact import load_artifact
from dcc.targets.base import get_format
from dcc.targets.nunchaku import layout
from dcc.targets.nunchaku.emit import FORMAT, FORMAT_NVFP4, FORMAT_UNSIGNED, pack_linear, unpack_linear
from dcc.targets.nunchaku.lora import branch, merge_artifact, merge_layer, merge_tensors, plan
from dcc.targets.nunchaku.lora_keys import LoraError, Resolver, parse
from dcc.targets.nunchaku.reference import NunchakuLinear

U = 2.0 ** -8   # bf16 unit roundoff
STORIES = Path(__file__).resolve().parents[4] / "shared" / "assets" / "stories260K" / "hf"
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs ../shared/assets ({STORIES} is absent)")
SRC = "lora.safetensors"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(n: int, k: int, rank: int, seed: int, bias: bool = True) -> dict:
    """The packed tensors of one random Nunchaku linear (bf16, INT4 g64) with a rank-`rank` branch."""
    g = _gen(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g)
    scales = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.005)
    smooth = torch.rand(k, generator=g) + 0.5
    down = torch.randn(rank, k, generator=g) * 0.1 if rank else None
    up = torch.randn(n, rank, generator=g) * 0.1 if rank else None
    b = torch.randn(n, generator=g) * 0.1 if bias else None
    return pack_linear(codes, scales, smooth, down, up, b, torch.bfloat16)


def _ref(t: dict, n: int, k: int, fmt: str = FORMAT) -> NunchakuLinear:
    return get_format(fmt)[1].reference(t, n, k, None)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed)).to(torch.bfloat16).float()   # exact in bf16: no input rounding


def check_merged(base: dict, merged: dict, n: int, k: int, x: torch.Tensor, delta_w: torch.Tensor,
                 abs_w: torch.Tensor, dbias: torch.Tensor | None = None, fmt: str = FORMAT) -> float:
    """Assert merged(x) == base(x) + x delta_w^T (+ dbias) within the bound in the module docstring; delta_w [N, K]
    is the LoRA's float64 update, abs_w = |scale A|^T-weighted |B| product bound matrix [N, K] (|B| |scale A|).
    Returns the largest error relative to the largest |x delta_w^T|."""
    yb = _ref(base, n, k, fmt)(x).double()
    ym = _ref(merged, n, k, fmt)(x).double()
    xd = x.double()
    want = yb + xd @ delta_w.T
    tol = U * (yb.abs() + ym.abs()) + ((1 + U) ** 3 - 1 + 2.0 ** -20) * (xd.abs() @ abs_w.T)
    if dbias is not None:
        want = want + dbias
        # the 16-bit main branch alone: zero bias, zero branch (adding 0 changes nothing)
        bare = {**base, "bias": torch.zeros_like(base["bias"]), "lora_up": torch.zeros_like(base["lora_up"])}
        main = _ref(bare, n, k, fmt)(x).double()
        b = unpack_linear(base, n, k)["bias"].double()
        tol = tol + U * ((b + dbias).abs() + (main + b).abs() + (main + b + dbias).abs() * (1 + U) + 1e-30)
    err = (ym - want).abs()
    worst = float((err / tol).max())
    assert worst <= 1.0, f"error {float(err.max()):.3g} exceeds the bound by {worst:.3g}x"
    return float(err.max() / (xd @ delta_w.T).abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------ keys and names

def test_parse_formats_and_scale():
    g = _gen(0)
    a, b = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    mods, fmt = parse({"base_model.model.m.q.lora_A.weight": a, "base_model.model.m.q.lora_B.weight": b,
                       "base_model.model.m.q.alpha": torch.tensor(8.0), "m.k.lora_A.default.weight": a,
                       "m.k.lora_B.default.weight": b, "m.k.lora_B.default.bias": b[:, 0]}, SRC)
    assert fmt == "peft"
    by = {m.name: m for m in mods}
    assert by["base_model.model.m.q"].scale(0.5) == 0.5 * 8 / 4 and by["m.k"].scale(1.0) == 1.0
    assert by["m.k"].bias is not None and not by["base_model.model.m.q"].kohya
    mods, fmt = parse({"lora_unet_m_q.lora_down.weight": a, "lora_unet_m_q.lora_up.weight": b,
                       "lora_unet_m_q.alpha": torch.tensor(2.0), "lora_unet_m_q.diff_b": b[:, 1]}, SRC)
    assert fmt == "kohya" and mods[0].kohya and mods[0].scale(1.0) == 0.5 and mods[0].diff_b is not None


@pytest.mark.parametrize("sd, words", [
    ({"m.q.weight": torch.zeros(2, 2)}, ["m.q.weight", "not a LoRA tensor"]),
    ({"m.q.lora_A.weight": torch.zeros(4, 8)}, ["m.q", "no B (up)"]),
    ({"m.q.lora_A.weight": torch.zeros(4, 8), "m.q.lora_B.weight": torch.zeros(8, 3)}, ["disagree on the rank"]),
    ({"lora_unet_q.dora_scale": torch.zeros(1, 8)}, ["lora_unet_q.dora_scale", "DoRA"]),
    ({"lora_unet_q.diff": torch.zeros(8, 8)}, ["lora_unet_q.diff", "requantizing"]),
    ({"m.q.lora_A.weight": torch.zeros(4, 8), "m.q.lora_B.weight": torch.zeros(8, 4),
      "m.q.alpha": torch.zeros(2)}, ["m.q.alpha", "one finite number"]),
    ({"m.q.lora_A.weight": torch.zeros(4, 8, 3, 3), "m.q.lora_B.weight": torch.zeros(8, 4)}, ["convolution"]),
    ({"m.q.lora_A.weight": torch.full((4, 8), float("nan")), "m.q.lora_B.weight": torch.zeros(8, 4)},
     ["m.q.lora_A.weight", "32 NaN/inf"]),
    ({"a.q.lora_A.weight": torch.zeros(4, 8), "a.q.lora_B.weight": torch.zeros(8, 4),
      "b.k.lora_A.default.weight": torch.zeros(4, 8), "b.k.lora_B.other.weight": torch.zeros(8, 4)},
     ["several PEFT adapters (default, other)"]),
])
def test_parse_errors(sd, words):
    with pytest.raises(LoraError) as e:
        parse(sd, SRC)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert str(e.value).startswith(SRC) and "\n" not in str(e.value)


def test_resolver_dotted_kohya_and_ambiguity():
    mods, _ = parse({f"{p}.lora_A.weight": torch.zeros(1, 4) for p in (
        "base_model.model.model.layers.0.attn.q", "transformer.blocks.0.to_q", "lora_unet_layers_0_attn_q",
        "lora_unet_model_layers_0_attn_q")} | {f"{p}.lora_B.weight": torch.zeros(4, 1) for p in (
        "base_model.model.model.layers.0.attn.q", "transformer.blocks.0.to_q", "lora_unet_layers_0_attn_q",
        "lora_unet_model_layers_0_attn_q")}, SRC)
    r = Resolver(["model.layers.0.attn.q", "blocks.0.to_q", "model.norm"])
    got = {m.name: r(m, SRC) for m in mods}
    assert got == {"base_model.model.model.layers.0.attn.q": "model.layers.0.attn.q",
                   "transformer.blocks.0.to_q": "blocks.0.to_q", "lora_unet_layers_0_attn_q": "model.layers.0.attn.q",
                   "lora_unet_model_layers_0_attn_q": "model.layers.0.attn.q"}
    amb = Resolver(["a.b_c.d", "a.b.c_d"])
    kohya = next(m for m in mods if m.name == "lora_unet_layers_0_attn_q")
    kohya.name = "lora_unet_a_b_c_d"
    with pytest.raises(LoraError, match=r"matches several modules \(a\.b\.c_d, a\.b_c\.d\)"):
        amb(kohya, SRC)


# ------------------------------------------------------------------------------------------------ fused layers

N_PARTS = (("blk.attn.to_q", 32), ("blk.attn.to_k", 32), ("blk.attn.to_v", 64))
FUSED = "blk.attn.to_qkv"
K = 64


def _fused_manifest() -> tuple[dict, dict]:
    n = sum(r for _, r in N_PARTS)
    entry = {"format": FORMAT, "shape": [n, K], "rank": 16, "fused": [list(p) for p in N_PARTS]}
    out = {"format": FORMAT, "shape": [64, 128], "rank": 16}
    manifest = {"layers": {FUSED: entry, "blk.attn.to_out.0": out,
                           "blk.ff.kept": {"format": "bfloat16", "shape": [64, 64], "skip_reason": "kept 16-bit"}}}
    tensors = {FUSED: _layer(n, K, 16, 1), "blk.attn.to_out.0": _layer(64, 128, 16, 2)}
    return manifest, tensors


def _merge(manifest: dict, tensors: dict, sd: dict, strength: float = 1.0, **kw):
    layers = {k: dict(v) for k, v in manifest["layers"].items()}
    keys = [f"{layer}.{t}" for layer, ts in tensors.items() for t in ts]
    mods, _ = parse(sd, SRC)
    p = plan({"layers": layers}, keys, mods, SRC, **kw)
    new, touched = merge_tensors(layers, lambda key: tensors[key.rpartition(".")[0]][key.rpartition(".")[2]], p,
                                 strength)
    merged = {layer: {t: new.get(f"{layer}.{t}", v) for t, v in ts.items()} for layer, ts in tensors.items()}
    return merged, touched, layers, p


def _peft(sd: dict, mod: str, a, b, alpha=None):
    sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = a, b
    if alpha is not None:
        sd[f"transformer.{mod}.alpha"] = torch.tensor(float(alpha))


def _update(parts: list[tuple[int, int, torch.Tensor, torch.Tensor, float]], n: int, k: int):
    """(delta_w [N, K], |B| |scale A| [N, K]) of LoRAs placed at rows (start, rows, A, B, scale)."""
    dw, aw = torch.zeros(n, k, dtype=torch.float64), torch.zeros(n, k, dtype=torch.float64)
    for start, rows, a, b, s in parts:
        sa = (a.double() * s)
        dw[start:start + rows] += b.double() @ sa
        aw[start:start + rows] += b.double().abs() @ sa.abs()
    return dw, aw


def test_fused_shared_a_gives_one_down():
    manifest, tensors = _fused_manifest()
    g = _gen(3)
    a = torch.randn(4, K, generator=g)
    sd, placed, start = {}, [], 0
    for mod, rows in N_PARTS:
        b = torch.randn(rows, 4, generator=g)
        _peft(sd, mod, a, b, alpha=8)
        placed.append((start, rows, a, b, 2.0))
        start += rows
    merged, touched, layers, _ = _merge(manifest, tensors, sd)
    assert touched[FUSED]["ranks"] == [16, 20] and layers[FUSED]["rank"] == 20 and layers[FUSED]["svd_rank"] == 16
    assert tuple(merged[FUSED]["lora_down"].shape) == (128, 32)   # K padded to 128, rank 20 padded to 32
    n = sum(r for _, r in N_PARTS)
    check_merged(tensors[FUSED], merged[FUSED], n, K, _x(8, K, 4), *_update(placed, n, K))
    # the main branch is untouched, byte for byte
    for t in ("qweight", "wscales", "smooth", "smooth_orig", "bias"):
        assert torch.equal(merged[FUSED][t].view(torch.uint8), tensors[FUSED][t].view(torch.uint8))


def test_fused_different_as_give_block_diagonal_up():
    manifest, tensors = _fused_manifest()
    g = _gen(5)
    sd, placed, start, ranks = {}, [], 0, (4, 8, 4)
    for (mod, rows), r in zip(N_PARTS, ranks):
        a, b = torch.randn(r, K, generator=g), torch.randn(rows, r, generator=g)
        _peft(sd, mod, a, b, alpha=r / 2)
        placed.append((start, rows, a, b, 0.5 * 0.75))
        start += rows
    merged, touched, _, _ = _merge(manifest, tensors, sd, strength=0.75)
    assert touched[FUSED]["ranks"] == [16, 32]
    n = sum(r for _, r in N_PARTS)
    up = layout.unpack_lora_up(merged[FUSED]["lora_up"])
    # block-diagonal: part i's rows are zero outside its own rank columns (q: 16..19, k: 20..27, v: 28..31)
    cols = [(16, 20), (20, 28), (28, 32)]
    rows = [(0, 32), (32, 64), (64, 128)]
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            assert bool(up[r0:r1, c0:c1].any()) == (i == j)
    check_merged(tensors[FUSED], merged[FUSED], n, K, _x(8, K, 6), *_update(placed, n, K))


def test_fused_one_part_leaves_other_rows_bit_identical():
    manifest, tensors = _fused_manifest()
    g = _gen(7)
    a, b = torch.randn(4, K, generator=g), torch.randn(32, 4, generator=g)
    sd = {}
    _peft(sd, "blk.attn.to_k", a, b)
    merged, touched, _, _ = _merge(manifest, tensors, sd)
    assert touched[FUSED] == {"ranks": [16, 20], "bias": False, "modules": ["blk.attn.to_k"]}
    x = _x(8, K, 8)
    yb, ym = _ref(tensors[FUSED], 128, K)(x), _ref(merged[FUSED], 128, K)(x)
    assert torch.equal(yb[:, :32], ym[:, :32]) and torch.equal(yb[:, 64:], ym[:, 64:])
    check_merged(tensors[FUSED], merged[FUSED], 128, K, x, *_update([(32, 32, a, b, 1.0)], 128, K))


def test_fused_whole_layer_and_shared_a_with_other_scale():
    """A LoRA naming the fused layer itself covers all rows; equal As with different alphas are not shared."""
    manifest, tensors = _fused_manifest()
    g = _gen(9)
    a = torch.randn(4, K, generator=g)
    whole_a, whole_b = torch.randn(8, K, generator=g), torch.randn(128, 8, generator=g)
    bq, bk = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g)
    sd = {}
    _peft(sd, FUSED, whole_a, whole_b)
    _peft(sd, "blk.attn.to_q", a, bq, alpha=4)
    _peft(sd, "blk.attn.to_k", a, bk, alpha=8)
    merged, touched, _, _ = _merge(manifest, tensors, sd)
    assert touched[FUSED]["ranks"] == [16, 16 + 8 + 4 + 4]
    placed = [(0, 128, whole_a, whole_b, 1.0), (0, 32, a, bq, 1.0), (32, 32, a, bk, 2.0)]
    check_merged(tensors[FUSED], merged[FUSED], 128, K, _x(8, K, 10), *_update(placed, 128, K))


def test_fused_contract_and_shape_errors():
    manifest, tensors = _fused_manifest()
    g = _gen(11)
    sd = {}
    _peft(sd, "blk.attn.to_v", torch.randn(4, K, generator=g), torch.randn(32, 4, generator=g))
    with pytest.raises(LoraError, match=r"lora_B.weight has shape \(32, 4\), but blk.attn.to_v \(rows 64..127 of "
                                        r"layer blk.attn.to_qkv\) has 64 outputs"):
        _merge(manifest, tensors, sd)
    bad = json.loads(json.dumps(manifest))
    bad["layers"][FUSED]["fused"][2][1] = 60
    sd = {}
    _peft(sd, "blk.attn.to_q", torch.zeros(2, K), torch.zeros(32, 2))
    with pytest.raises(LoraError, match="layer blk.attn.to_qkv: its fused parts have 124 rows in all, the layer 128"):
        _merge(bad, tensors, sd)
    bad = json.loads(json.dumps(manifest))
    bad["layers"][FUSED]["fused"][2][0] = "blk.attn.to_out.0"
    with pytest.raises(LoraError, match="fused part blk.attn.to_out.0 is also a layer"):
        _merge(bad, tensors, sd)
    sd = {}
    _peft(sd, "blk.ff.kept", torch.zeros(2, 64), torch.zeros(64, 2))
    with pytest.raises(LoraError, match="layer blk.ff.kept is 16-bit .* never into a float weight"):
        _merge(manifest, tensors, sd)
    # a part of a 16-bit fused layer is the same error, naming the layer
    bad = json.loads(json.dumps(manifest))
    bad["layers"]["blk.ff.kept"]["fused"] = [["blk.ff.w1", 32], ["blk.ff.w3", 32]]
    sd = {}
    _peft(sd, "blk.ff.w3", torch.zeros(2, 64), torch.zeros(32, 2))
    with pytest.raises(LoraError, match="lora_A.weight: layer blk.ff.kept is 16-bit"):
        _merge(bad, tensors, sd)


def test_bias_and_diff_b_and_second_merge():
    """lora_B's bias is scaled like the branch, diff_b by the strength only; a second LoRA starts at the next
    multiple of 16 ranks, keeping the first merge's ranks bit for bit."""
    manifest, tensors = _fused_manifest()
    g = _gen(12)
    a, b, lb = torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    sd = {}
    _peft(sd, "blk.attn.to_out.0", a, b, alpha=2)
    sd["transformer.blk.attn.to_out.0.lora_B.bias"] = lb
    merged, touched, layers, _ = _merge(manifest, tensors, sd, strength=2.0)
    assert touched["blk.attn.to_out.0"] == {"ranks": [16, 20], "bias": True, "modules": ["blk.attn.to_out.0"]}
    x = _x(8, 128, 13)
    dw, aw = _update([(0, 64, a, b, 1.0)], 64, 128)
    check_merged(tensors["blk.attn.to_out.0"], merged["blk.attn.to_out.0"], 64, 128, x, dw, aw,
                 dbias=2.0 * 0.5 * lb.double())
    # second merge: a kohya diff_b and rank-8 factors on top of the merged layer
    a2, b2, db = torch.randn(8, 128, generator=g), torch.randn(64, 8, generator=g), torch.randn(64, generator=g)
    sd2 = {"lora_unet_blk_attn_to_out_0.lora_down.weight": a2, "lora_unet_blk_attn_to_out_0.lora_up.weight": b2,
           "lora_unet_blk_attn_to_out_0.diff_b": db}
    again, touched2, layers2, _ = _merge({"layers": layers}, merged, sd2, strength=0.5)
    assert touched2["blk.attn.to_out.0"]["ranks"] == [32, 40] and layers2["blk.attn.to_out.0"]["svd_rank"] == 16
    d1 = layout.unpack_lora_down(merged["blk.attn.to_out.0"]["lora_down"])
    d2 = layout.unpack_lora_down(again["blk.attn.to_out.0"]["lora_down"])
    assert torch.equal(d2[:20], d1[:20]) and not d2[20:32].any() and d2.shape[0] == 48
    dw2, aw2 = _update([(0, 64, a2, b2, 0.5)], 64, 128)
    check_merged(merged["blk.attn.to_out.0"], again["blk.attn.to_out.0"], 64, 128, x, dw2, aw2,
                 dbias=0.5 * db.double())


def test_rank0_layer_gets_the_lora_at_rank_0():
    t = _layer(128, 64, 0, 14)
    entry = {"format": FORMAT, "shape": [128, 64], "rank": 0}
    g = _gen(15)
    a, b = torch.randn(4, 64, generator=g), torch.randn(128, 4, generator=g)
    down, up, db = branch(128, 64, plan({"layers": {"l": entry}}, [], parse(
        {"l.lora_A.weight": a, "l.lora_B.weight": b}, SRC)[0], SRC).layers["l"], 1.0)
    changed, seg = merge_layer(t, "l", entry, down, up, db)
    assert seg == [0, 4] and set(changed) == {"lora_down", "lora_up"}
    check_merged(t, {**t, **changed}, 128, 64, _x(8, 64, 16), *_update([(0, 128, a, b, 1.0)], 128, 64))


@pytest.mark.parametrize("fmt", [FORMAT, FORMAT_UNSIGNED, FORMAT_NVFP4])
def test_every_nunchaku_format(fmt):
    """INT4, INT4 after GELU (act_unsigned: the branch reads the unshifted x, the bias holds the shift compensation)
    and NVFP4 (the bias added after wcscales): the same branch and bias arithmetic."""
    g = _gen(22)
    n, k = 128, 128
    if fmt == FORMAT_NVFP4:
        codes = torch.randint(0, 16, (n, k), generator=g)
        scales = (torch.rand(n, k // 16, generator=g) + 0.5).to(torch.float8_e4m3fn).float()
        t = pack_linear(codes, scales, torch.rand(k, generator=g) + 0.5, torch.randn(16, k, generator=g) * 0.1,
                        torch.randn(n, 16, generator=g) * 0.1, torch.randn(n, generator=g), torch.bfloat16,
                        wtscale=0.03125)
    else:
        t = _layer(n, k, 16, 23)
    entry = {"format": fmt, "shape": [n, k], "rank": 16}
    a, b, lb = torch.randn(8, k, generator=g), torch.randn(n, 8, generator=g), torch.randn(n, generator=g)
    sd = {"l.lora_A.weight": a, "l.lora_B.weight": b, "l.lora_B.bias": lb, "l.alpha": torch.tensor(4.0)}
    merged, touched, _, _ = _merge({"layers": {"l": entry}}, {"l": t}, sd, strength=1.5)
    assert touched["l"] == {"ranks": [16, 24], "bias": True, "modules": ["l"]}
    for name in t:
        if name not in ("lora_down", "lora_up", "bias"):
            assert torch.equal(t[name].view(torch.uint8), merged["l"][name].view(torch.uint8)), name
    x = _x(8, k, 24)
    if fmt == FORMAT_UNSIGNED:
        x = torch.nn.functional.gelu(x).to(torch.bfloat16).float()
    check_merged(t, merged["l"], n, k, x, *_update([(0, n, a, b, 0.75)], n, k), dbias=0.75 * lb.double(), fmt=fmt)


def test_kohya_flux_bfl_through_diffusers():
    """A kohya FLUX LoRA in BFL naming: diffusers' converter splits img_attn_qkv into to_q/to_k/to_v (one shared A
    when the up is dense, chunked As when it is block-sparse), which the fused-layer rules take back into to_qkv."""
    pytest.importorskip("diffusers")
    g = _gen(17)
    d, r = 64, 6
    n = 3 * d
    manifest = {"layers": {
        "transformer_blocks.0.attn.to_qkv": {"format": FORMAT, "shape": [n, K], "rank": 16, "fused": [
            [f"transformer_blocks.0.attn.to_{c}", d] for c in "qkv"]},
        "transformer_blocks.0.attn.to_out.0": {"format": FORMAT, "shape": [64, n], "rank": 16}}}
    tensors = {"transformer_blocks.0.attn.to_qkv": _layer(n, K, 16, 18),
               "transformer_blocks.0.attn.to_out.0": _layer(64, n, 16, 19)}
    for sparse in (False, True):
        down, up = torch.randn(r, K, generator=g), torch.randn(n, r, generator=g)
        if sparse:   # block-diagonal up: part i reads ranks 2i, 2i+1 only
            mask = torch.zeros(n, r)
            for i in range(3):
                mask[i * d:(i + 1) * d, 2 * i:2 * i + 2] = 1
            up = up * mask
        po_d, po_u = torch.randn(4, n, generator=g), torch.randn(64, 4, generator=g)
        sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
              "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
              "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0),
              "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": po_d,
              "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": po_u}
        mods, fmt = parse(dict(sd), SRC)
        assert fmt.startswith("kohya-flux")
        merged, touched, _, _ = _merge(manifest, tensors, sd)
        assert touched["transformer_blocks.0.attn.to_qkv"]["ranks"] == [16, 16 + r]   # 3 x 2 or one shared 6
        qkv = "transformer_blocks.0.attn.to_qkv"
        check_merged(tensors[qkv], merged[qkv], n, K, _x(8, K, 20), *_update([(0, n, down, up, 0.5)], n, K))
        out = "transformer_blocks.0.attn.to_out.0"
        check_merged(tensors[out], merged[out], 64, n, _x(8, n, 21), *_update([(0, 64, po_d, po_u, 1.0)], 64, n))


# ------------------------------------------------------------------------------------------------ stories260K

@pytest.fixture(scope="module")
def stories_artifact(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip(f"needs ../shared/assets ({STORIES} is absent)")
    from cli_util import run
    d = tmp_path_factory.mktemp("stories")
    calib = d / "calib.txt"   # token ids (the model has no tokenizer); what the branch fits does not matter here
    calib.write_text(" ".join(str((37 * i + 11) % 512) for i in range(4 * 128)))
    out = d / "art"
    code, text = run("compile", STORIES, "--target", "nunchaku", "--rank", "16", "--unsupported", "keep",
                     "--calib", calib, "--calib-chunks", "4", "--calib-seq-len", "128", "-o", out, "-q")
    assert code == 0, text
    return out


LAYERS = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.1.self_attn.v_proj": (32, 64),
          "model.layers.2.mlp.gate_proj": (172, 64), "model.layers.4.self_attn.o_proj": (64, 64)}


def write_loras(d: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """A PEFT-style (rank 4, alpha 8) and a kohya-style (rank 8, alpha 4) LoRA on LAYERS (two each); returns the
    files and {layer: (A, B, alpha / rank)}."""
    g = _gen(seed)
    peft, kohya, want = {}, {}, {}
    for i, (name, (n, k)) in enumerate(LAYERS.items()):
        r, alpha = (4, 8.0) if i % 2 == 0 else (8, 4.0)
        a, b = torch.randn(r, k, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3
        if i % 2 == 0:
            peft |= {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b,
                     f"base_model.model.{name}.alpha": torch.tensor(alpha)}
        else:
            kn = "lora_unet_" + name.removeprefix("model.").replace(".", "_")
            kohya |= {f"{kn}.lora_down.weight": a.half(), f"{kn}.lora_up.weight": b.half(),
                      f"{kn}.alpha": torch.tensor(alpha)}
            a, b = a.half().float(), b.half().float()
        want[name] = (a, b, alpha / r)
    save_file(peft, d / "peft.safetensors")
    save_file(kohya, d / "kohya.safetensors")
    return d / "peft.safetensors", d / "kohya.safetensors", want


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


@needs_stories
def test_stories_merge_matches_float_lora(stories_artifact, tmp_path):
    peft, kohya, want = write_loras(tmp_path)
    strength = 0.75
    one = merge_artifact(load_artifact(stories_artifact), peft, tmp_path / "m1", strength=strength)
    two = merge_artifact(load_artifact(tmp_path / "m1"), kohya, tmp_path / "m2", strength=strength)
    assert one["format"] == "peft" and two["format"] == "kohya"
    assert sorted(one["layers"]) + sorted(two["layers"]) == [n for i, n in enumerate(LAYERS) if i % 2 == 0] + \
        [n for i, n in enumerate(LAYERS) if i % 2 == 1]
    base, merged = _tensors(stories_artifact), _tensors(tmp_path / "m2")
    m = json.loads((tmp_path / "m2" / "dcc.json").read_text())
    assert [r["file"] for r in m["lora"]] == ["peft.safetensors", "kohya.safetensors"]
    worst = 0.0
    for name, (a, b, s) in want.items():
        n, k = LAYERS[name]
        assert m["layers"][name]["rank"] == 16 + a.shape[0] and m["layers"][name]["svd_rank"] == 16
        lay = {t: merged[f"{name}.{t}"] for t in ("qweight", "wscales", "smooth", "smooth_orig", "lora_down",
                                                 "lora_up", "bias")}
        ref = {t: base[f"{name}.{t}"] for t in lay}
        x = _x(16, k, 30)
        worst = max(worst, check_merged(ref, lay, n, k, x, *_update([(0, n, a, b, strength * s)], n, k)))
    assert worst < 2 ** -5
    # everything but the touched layers' lora_down / lora_up is byte-identical (qweight, wscales, smooth, the
    # 16-bit layers, embeddings and norms)
    changed = {f"{n}.{t}" for n in LAYERS for t in ("lora_down", "lora_up")}
    assert set(base) == set(merged)
    for key in base:
        assert (_bytes(base[key]) == _bytes(merged[key])) == (key not in changed), key


@needs_stories
def test_stories_merge_is_deterministic(stories_artifact, tmp_path):
    peft, _, _ = write_loras(tmp_path, seed=1)
    for out in ("a", "b"):
        merge_artifact(load_artifact(stories_artifact), peft, tmp_path / out, strength=0.5)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------------ a single file

@pytest.fixture(scope="module", params=["legacy", "v2"])
def flux_single_file(request, tmp_path_factory):
    """A tiny FLUX transformer compiled to a Nunchaku single file (legacy C++ names, or V2's with proj_down /
    proj_up / smooth_factor)."""
    pytest.importorskip("diffusers")
    import tiny_diffusers as td
    import tiny_diffusers_artifacts as tda
    d = tmp_path_factory.mktemp(f"flux_{request.param}")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, folder = td.save(d / "model", "FluxTransformer2DModel")
        calib = td.write_calib(d / "calib.safetensors", "FluxTransformer2DModel", samples=2)
        extra = ()
        if request.param == "v2":
            (d / "v2.json").write_text(json.dumps({"target": "nunchaku", "options": {"flux": "v2"}}))
            extra = ("--recipe", d / "v2.json")
        code, text = tda.compile_single_file(folder, calib, d / "art", *extra)
    finally:
        torch.set_num_threads(n)
    assert code == 0, text
    return d / "art", calib


# (diffusers module, out, in, rank): a fused part, a one-part layer, the split proj_out (out_proj | mlp_fc2), and a
# rank-24 LoRA that makes its layer's branch the widest (every other layer is padded to it)
FLUX_LORA = [("transformer_blocks.0.attn.to_k", 128, 128, 8), ("transformer_blocks.1.attn.to_out.0", 128, 128, 8),
             ("single_transformer_blocks.0.proj_out", 128, 640, 8),
             ("single_transformer_blocks.1.attn.to_q", 128, 128, 24)]


def test_merge_into_a_single_file(flux_single_file, tmp_path):
    """Per stored W4A4 layer of the new file, the kernel's CPU reference gives the base layer's output plus the
    LoRA's x dW^T within the 16-bit bound above (fused part: its rows; split proj_out: A's columns per part), and
    every untouched layer, padded with zero ranks to the file's new common rank, gives its base output bit for bit;
    the metadata rank, file name and manifest follow; Nunchaku's loader check, `dcc validate` and the rebuilt
    reference model run on it."""
    from cli_util import run
    from dcc.runtime.reference import build_model
    from dcc.targets.nunchaku import singlefile
    from dcc.targets.nunchaku.assign import unsplit
    from dcc.targets.nunchaku.stored import check_file
    art_dir, calib = flux_single_file
    g = _gen(3)
    sd, lora = {}, {}
    for mod, n, k, r in FLUX_LORA:
        a, b = torch.randn(r, k, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3
        _peft(sd, mod, a, b, alpha=2 * r)
        lora[mod] = (a, b, 2.0)
    save_file(sd, tmp_path / "lora.safetensors")
    base = load_artifact(art_dir)
    rec = merge_artifact(base, tmp_path / "lora.safetensors", tmp_path / "merged")
    merged = load_artifact(tmp_path / "merged")
    note = merged.manifest["runtime"]["nunchaku_file"]
    assert rec["file_rank"] == 48 and note["file"] == "svdq-int4_r48.safetensors"   # 16 + 24, padded to 16
    bt, _ = singlefile.read(art_dir / base.manifest["runtime"]["nunchaku_file"]["file"])
    mt, md = singlefile.read(tmp_path / "merged" / note["file"])
    assert md["quantization_config"]["rank"] == 48 and set(mt) == set(bt)
    # the stored layer of each LoRA, its first row there and A's columns, read off the manifest's "stored" entries
    touched = {}
    for mod, (a, b, s) in lora.items():
        col = 0
        for path, e in sorted((p, e) for p, e in merged.manifest["layers"].items()
                              if unsplit(p) == mod and "stored" in e):
            k = e["shape"][1]
            touched[e["stored"]["prefix"]] = (e["stored"]["rows"][0][0], a[:, col:col + k], b, s)
            col += k
        assert col == a.shape[1], mod
    assert set(rec["layers"]) == set(touched)
    x_seed = 0
    for prefix, view in note["layers"].items():
        if view["kind"] != "w4a4":
            continue
        n, k = view["shape"]
        bd = {t: bt[key] for t, key in view["tensors"].items()}
        mdict = {t: mt[key] for t, key in view["tensors"].items()}
        for t in ("qweight", "wscales", "smooth", "smooth_orig", "bias"):
            assert _bytes(bd[t]) == _bytes(mdict[t]), (prefix, t)   # the main branch, byte for byte
        assert layout.unpack_lora_down(mdict["lora_down"]).shape[0] == 48
        x = _x(4, k, x_seed)
        x_seed += 1
        if prefix not in touched:
            assert torch.equal(_ref(bd, n, k, view["format"])(x), _ref(mdict, n, k, view["format"])(x)), prefix
            continue
        start, a, b, s = touched[prefix]
        rows = b.shape[0]
        dw, aw = _update([(start, rows, a, b, s)], n, k)
        check_merged(bd, mdict, n, k, x, dw, aw, fmt=view["format"])
    assert check_file(merged) == []
    code, text = run("validate", tmp_path / "merged")
    assert code == 0, text
    model = build_model(merged)
    from dcc.models.diffusers import DiffusersModel
    from dcc.models.diffusers_calib import CalibInputs
    out = DiffusersModel().outputs(model, CalibInputs.load(calib))
    ref = DiffusersModel().outputs(build_model(base), CalibInputs.load(calib))
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
