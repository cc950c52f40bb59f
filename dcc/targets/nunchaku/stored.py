"""How a dcc linear of a diffusers model lives in Nunchaku's single file (emit_file.py writes it): the manifest
entry's "stored" mapping, the row runs that pick a layer's rows out of a fused or reordered stored layer, the
decode of each dcc layer from the stored tensors (what `dcc validate` compares with the compiled weights), and the
check of the file against what the model class's loader reads.

The contract, per dcc linear of a stored layer (manifest["layers"][path]):
    "stored": {"prefix": stored layer, "kind": w4a4 | awq | dense, "shape": [N, K] of the stored layer before the
               engine's padding, "bias": whether it stores one, "rows": [[start, stop, step], ...] (the stored rows
               of this layer, in its own row order: their concatenation), "tensors": {dcc suffix: key in the file},
               "fused": [[dcc linear, out_features], ...] (every part of the stored layer, in stored order; only for
               fused layers)}
The entry keeps its format name (nunchaku-w4a4-int4[-unsigned] | nunchaku-w4a4-nvfp4 | nunchaku-awq-w4a16), shape
(the dcc linear's [out, in]) and weight_sha256 (of the dcc linear's fake-quant weight)."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from . import expected_keys as ek
from . import layout, layout_awq, naming, singlefile
from .emit import FORMAT_NVFP4
from .reference import decode_int4_weight, decode_nvfp4_weight

FORMAT_AWQ = "nunchaku-awq-w4a16"
TENSORS_AWQ = ("qweight", "wscales", "wzeros")


def row_runs(sl: naming.StoredLayer, outs: list[int]) -> list[list[list[int]]]:
    """Per part, the [start, stop, step] runs of stored rows that give the part's rows in order (naming.stored_rows
    applied to row numbers, so every row order -- concat, AdaNorm interleave, SANA's sections -- is read, not
    re-derived)."""
    idx = torch.arange(1, sum(outs) + 1, dtype=torch.float64)     # 0 marks the engine's padding rows
    stored = naming.stored_rows(sl, list(idx.split(outs)))
    out, start = [], 0
    for n in outs:
        pos = torch.nonzero((stored > start) & (stored <= start + n)).flatten()
        pos = pos[torch.argsort(stored[pos])].tolist()
        runs = []
        for p in pos:
            r = runs[-1] if runs else None
            if r is not None and ((len(r) == 1 and p > r[0]) or (len(r) > 1 and p - r[-1] == r[1] - r[0])):
                r.append(p)
            else:
                runs.append([p])
        out.append([[r[0], r[-1] + (r[1] - r[0] if len(r) > 1 else 1), r[1] - r[0] if len(r) > 1 else 1]
                    for r in runs])
        start += n
    return out


def _select(w: torch.Tensor, runs: list) -> torch.Tensor:
    return w[torch.cat([torch.arange(a, b, s) for a, b, s in runs])]


def decode_stored(tensors, prefix: str, entry: dict) -> torch.Tensor:
    """The weight of dcc layer `prefix` read from the stored layer its entry names: the stored layer decoded as the
    kernel reconstructs it (W4A4: codes * scales exact in float32, NVFP4 times wtscale and wcscales; AWQ: the 16-bit
    fma q * s + wzeros of gemv_awq), then its rows picked out."""
    st = entry["stored"]
    n, k = st["shape"]
    get = lambda s: tensors.get(st["tensors"][s])   # noqa: E731
    if entry["format"] == FORMAT_AWQ:
        codes = layout_awq.unpack_qweight(get("qweight"))
        s, sz = layout_awq.unpack_scales(get("wscales"), get("wzeros"))
        g = k // layout_awq.GROUP_SIZE
        s = s[:, :g].repeat_interleave(layout_awq.GROUP_SIZE, 1).to(torch.float64)
        sz = sz[:, :g].repeat_interleave(layout_awq.GROUP_SIZE, 1).to(torch.float64)
        # q * s is exact in float64 and so is the sum: the one rounding is the kernel's, to 16 bits
        w = (codes[:n, :k].to(torch.float64) * s + sz).to(get("wscales").dtype)
        return _select(w, st["rows"])
    fp4 = entry["format"] == FORMAT_NVFP4
    codes = layout.crop(layout.unpack_qweight(get("qweight"), fp4=fp4), (n, k))
    if not fp4:
        scales = layout.crop(layout.unpack_wscales(get("wscales")), (n, k // layout.INT4_GROUP_SIZE))
        return _select(decode_int4_weight(codes, scales).float(), st["rows"])
    micro = layout.crop(layout.unpack_micro_scales(get("wscales")), (n, k // layout.FP4_GROUP_SIZE))
    wt = float(get("wtscale").reshape(()).to(torch.float32)) if "wtscale" in st["tensors"] else 1.0
    wc = layout.crop(layout.unpack_channel_vector(get("wcscales"), "wcscales"), (n,)).to(torch.float64)
    return _select((decode_nvfp4_weight(codes, micro) * wt * wc.view(-1, 1)).float(), st["rows"])


_ST_DTYPES = {v: k for k, v in singlefile._DTYPES.items()}


def check_file(art) -> list[str] | None:
    """What the model class's loader would find wrong in the artifact's single file (one line each): the metadata it
    reads, and every stored layer's tensors (present, shape, dtype; the 16-bit parameters are not re-derived here),
    read from the file's header only; None for an artifact without a Nunchaku file."""
    note = (art.manifest.get("runtime") or {}).get("nunchaku_file") or {}
    if not note.get("written"):
        return None
    path = art.path / note["file"]
    try:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
    except Exception as e:   # safetensors raises its own error types
        return [f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"]
    missing = [k for k in singlefile.REQUIRED if k not in md]
    if missing:
        return [f"{path}: metadata lacks {missing[0]!r}, which Nunchaku's loaders read"]
    md["quantization_config"] = json.loads(md["quantization_config"])
    problems = [f"metadata model_class is {md.get('model_class')!r}, the manifest's {note['model_class']!r}"
                ] if md.get("model_class") != note["model_class"] else []
    spec = ek.model_spec(note["model_class"])
    precision = art.manifest["recipe"]["options"].get("precision", "int4")
    rank = int(md["quantization_config"].get("rank", 32))
    expected, seen = {}, set()
    for entry in art.manifest["layers"].values():
        st = entry.get("stored")
        if st is None or st["prefix"] in seen:
            continue
        seen.add(st["prefix"])
        n, k = st["shape"]
        layer = ek.Layer(st["prefix"].rpartition(".")[2], st["kind"], ())   # layer_tensors reads only the kind
        expected.update(ek.layer_tensors(spec, layer, st["prefix"], n, k, st["bias"], precision, art.dtype, rank))
    keys = art.tensors.keys()
    metas = {}
    for key in keys:
        dt, shape = art.tensors.header(key)
        metas[key] = torch.empty(shape, dtype=_ST_DTYPES[dt], device="meta")
    return problems + ek.check(metas, expected, strict=False)
