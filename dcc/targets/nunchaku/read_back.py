"""Read a Nunchaku single file back under the source diffusers model's names (Target.read_back), for dcc's CPU
reference: the 16-bit tensors with naming.stored_param's renames undone, AWQ and dense layers decoded with the row
order of naming.stored_rows and the AdaNorm +1 of naming.stored_bias taken back out, and per W4A4 dcc linear a module
computing exactly the rows of it that Nunchaku's kernel computes: the whole stored (fused) layer, once per input,
sliced -- each output row of the fused GEMM (main branch, low-rank branch, bias) depends on its own weight rows only,
and the activation quantization on the input only, so slicing is exact."""
from __future__ import annotations

import torch
from torch import nn

from ..base import ReadBack
from . import expected_keys as ek
from . import layout, naming
from .assign import unsplit
from .emit import FORMAT_NVFP4, FORMAT_UNSIGNED, unpack_linear
from .reference import NunchakuLinear
from .stored import FORMAT_AWQ, decode_stored


def _index(runs: list) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, s) for a, b, s in runs])


class FusedPart(nn.Linear):
    """The rows of one dcc linear in a stored (fused) W4A4 layer: the fused NunchakuLinear runs once per input tensor
    (q, k and v read the same x) and each part takes its rows of the output. `weight` and `bias` are the part's rows
    of the fused layer's float map (NunchakuLinear's), for code that reads them."""

    def __init__(self, fused: NunchakuLinear, rows: torch.Tensor, bias: bool):
        nn.Module.__init__(self)
        self.__dict__["fused"] = fused   # not a submodule: the block graph stands in for each part, not the fused
        self.register_buffer("rows", rows)
        self.in_features, self.out_features = fused.in_features, len(rows)
        self.weight = nn.Parameter(fused.weight.data[rows].clone(), requires_grad=False)
        self.bias = nn.Parameter(fused.bias.data[rows].clone(), requires_grad=False) \
            if bias and fused.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        seen = f.__dict__.get("_last")
        if seen is None or seen[0] is not x or seen[1] != x._version:
            seen = f.__dict__["_last"] = (x, x._version, f(x))
        return seen[2].index_select(-1, self.rows.to(seen[2].device))

    def _apply(self, fn, *args, **kwargs):
        self.fused._apply(fn, *args, **kwargs)   # idempotent (.to): each part of the layer moves it alike
        return super()._apply(fn, *args, **kwargs)


def _names(art) -> naming.NunchakuNames:
    """The stored layers and renames of the artifact, as its compile made them (naming.nunchaku_names on the same
    quantized paths)."""
    layers = art.manifest["layers"]
    w4a4 = sorted({unsplit(p) for p, e in layers.items() if (e.get("stored") or {}).get("kind") == ek.W4A4})
    flux = art.manifest["recipe"]["options"].get("flux", "legacy")
    cls = art.manifest["source"]["architecture"]
    return naming.nunchaku_names(cls, w4a4, sorted({unsplit(p) for p in layers}), flux)


def _fused(art, view: dict) -> NunchakuLinear:
    n, k = view["shape"]
    t = {s: art.tensors.get(key) for s, key in view["tensors"].items()}
    if "bias" not in t:   # the engine has no bias here: zeros (what pack_linear writes where it reads one)
        t["bias"] = layout.pack_channel_vector(layout.pad_channel_vector(torch.zeros(n, dtype=art.dtype)))
    u = unpack_linear(t, n, k)
    bias = u["bias"] if view["bias"] else None
    if view["format"] == FORMAT_NVFP4:
        return NunchakuLinear("nvfp4", u["codes"], u["scales"], u["smooth"], u["lora_down"], u["lora_up"], bias,
                              wtscale=u["wtscale"], wcscales=u["wcscales"], dtype=u["smooth"].dtype)
    return NunchakuLinear("int4", u["codes"], u["scales"], u["smooth"], u["lora_down"], u["lora_up"], bias,
                          unsigned=view["format"] == FORMAT_UNSIGNED, dtype=u["scales"].dtype)


def _bias(art, sl: naming.StoredLayer, view: dict, runs: list) -> torch.Tensor:
    """A part's bias from the stored one: the AdaNorm +1 taken back out of the scale rows (exact in float32: a 16-bit
    value minus 1), then its rows in the part's order."""
    b = art.tensors.get(view["tensors"]["bias"]).float()
    b = layout.crop(b, (view["shape"][0],)) if b.shape[0] != view["shape"][0] else b.clone()
    if sl.layer.rows == "adanorm":
        s = sl.layer.splits
        for j in {1, s - 2}:
            b.view(-1, s)[:, j] -= 1
    return b[_index(runs)]


def read_back(art) -> ReadBack | None:
    """The single file of `art` under the source model's names (base.ReadBack); None without a Nunchaku file."""
    note = (art.manifest.get("runtime") or {}).get("nunchaku_file") or {}
    if not note.get("written"):
        return None
    names = _names(art)
    by_prefix = {sl.prefix: sl for sl in names.layers}
    views = note["layers"]
    rb = ReadBack({})
    fused: dict[str, NunchakuLinear] = {}
    for path, entry in art.manifest["layers"].items():
        st = entry.get("stored")
        if st is None:
            continue
        sl, view = by_prefix[st["prefix"]], views[st["prefix"]]
        if unsplit(path) != path:
            rb.splits.setdefault(unsplit(path), []).append(path)
        has_bias = bool(entry.get("has_bias", False))
        if st["kind"] == ek.W4A4:
            if st["prefix"] not in fused:
                fused[st["prefix"]] = _fused(art, view)
            rb.modules[path] = FusedPart(fused[st["prefix"]], _index(st["rows"]), has_bias)
            continue
        if st["kind"] == ek.AWQ:
            rb.tensors[f"{path}.weight"] = decode_stored(art.tensors, path, {**entry, "format": FORMAT_AWQ})
        else:   # dense: the 16-bit weight in the part's row order
            w = art.tensors.get(view["tensors"]["weight"])
            rb.tensors[f"{path}.weight"] = w[:view["shape"][0], :view["shape"][1]][_index(st["rows"])]
        if view["bias"]:
            rb.tensors[f"{path}.bias"] = _bias(art, sl, view, st["rows"])
            if not has_bias and sl.layer.rows != "adanorm":
                rb.optional.add(f"{path}.bias")   # a zero bias the engine stores always
    for parts in rb.splits.values():
        parts.sort()
    stored = {key for v in views.values() for key in v["tensors"].values()}
    back = {dst: src for src, dst in names.renames.items()}
    for key in art.tensors.keys():
        if key in stored:
            continue
        module = key.rsplit(".", 1)[0]
        dst = max((d for d in back if module == d or module.startswith(d + ".")), key=len, default=None)
        rb.tensors[key if dst is None else back[dst] + key[len(dst):]] = art.tensors.get(key)
    return rb
