"""`dcc lora merge` into a Nunchaku single-file artifact (lora.py's scheme, on the stored layers): the stored-layer
view (manifest runtime.nunchaku_file.layers) is the plan's manifest -- a fused layer's "fused" rows take its parts'
LoRAs (lora.py's fused rules), a one-part layer answers to its diffusers module, AWQ and dense layers refuse -- and a
LoRA of a linear the compile split by input columns (FLUX single block proj_out -> out_proj | mlp_fc2) goes to both
stored layers: A's columns split as the layer's were, B whole in each, the LoRA's biases on the part holding the bias
(the last). Tensors are read and written under the file's own keys (V2's proj_down / proj_up where the convention
says so).

Ranks: Nunchaku's Python classes read ONE rank (metadata quantization_config.rank) for every W4A4 layer
(expected_keys' lora_down [R, K]); the C++ FLUX class reads each layer's own. So every W4A4 layer's branch is padded
with zero ranks to the largest one (zero ranks add exact zeros) and the metadata rank, the file name
(svdq-int4_r{rank}) and the manifest follow: the one file loads in every class."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..artifact import MANIFEST, ArtifactWriter, sha256_file
from . import expected_keys as ek
from . import layout, singlefile
from .assign import unsplit
from .emit_file import file_name
from .lora_keys import LoraError, Resolver


def stored_view(art) -> tuple[dict, dict]:
    """(lora.plan's manifest layers, keyed by stored prefix; {split diffusers linear: [(stored prefix, in_features)]
    in column order})."""
    note = art.manifest["runtime"]["nunchaku_file"]
    dcc: dict[str, list[tuple[str, dict]]] = {}
    for path, e in art.manifest["layers"].items():
        if "stored" in e:
            dcc.setdefault(e["stored"]["prefix"], []).append((path, e))
    layers, splits = {}, {}
    for prefix, view in note["layers"].items():
        n, k = view["shape"]
        entry = {"shape": [n, k], "format": view["format"]}
        if view["kind"] == ek.DENSE:
            entry["skip_reason"] = f"16-bit in {note['model_class']}"
        ranks = [int(e.get("rank", 0)) for _, e in dcc.get(prefix, ())]
        if ranks:
            entry["rank"] = max(ranks)
        if "columns_of" in view:
            source, cols = view["columns_of"]
            splits.setdefault(source, []).append((prefix, k, cols))
        elif view.get("fused"):
            entry["fused"] = [list(f) for f in view["fused"]]
        elif len(dcc.get(prefix, ())) == 1 and unsplit(dcc[prefix][0][0]) != prefix:
            entry["fused"] = [[unsplit(dcc[prefix][0][0]), n]]   # the one diffusers module it holds
        layers[prefix] = entry
    covered = {m for e in layers.values() for m, _ in e.get("fused", ())} | set(layers) | set(splits)
    for path, e in art.manifest["layers"].items():   # linears the file keeps 16-bit under their own names
        if "stored" not in e and path not in covered and "skip_reason" in e:
            layers[path] = {"shape": e["shape"], "format": e.get("format"), "skip_reason": e["skip_reason"]}
    order = {"attn": 0, "mlp": 1}
    return layers, {s: [(p, k) for p, k, c in sorted(v, key=lambda t: order[t[2]])] for s, v in splits.items()}


def split_mods(mods: list, splits: dict, names, src: str) -> list:
    """The LoRA modules with each one of a split linear replaced by one per part (A's columns, B whole, biases on
    the last part), named by the part's stored prefix."""
    if not splits:
        return mods
    resolve, out = Resolver(set(names) | set(splits)), []
    for rec in mods:
        mod = resolve(rec, src)
        if mod not in splits:
            out.append(rec)
            continue
        parts, start = splits[mod], 0
        width = sum(k for _, k in parts)
        if rec.down is not None and rec.down.shape[1] != width:
            raise LoraError(f"{src}: tensor {rec.keys['down']} has shape {tuple(rec.down.shape)}, but {mod} has "
                            f"{width} inputs (expected [rank, {width}])")
        for i, (prefix, k) in enumerate(parts):
            last = i == len(parts) - 1
            down = None if rec.down is None else rec.down[:, start:start + k].contiguous()
            part = replace(rec, name=prefix, kohya=False, down=down, up=rec.up if down is not None else None,
                           bias=rec.bias if last else None, diff_b=rec.diff_b if last else None)
            if part.down is not None or part.bias is not None or part.diff_b is not None:
                out.append(part)
            start += k
    return out


def pad_ranks(tensors: dict, views: dict) -> int:
    """Pad every W4A4 layer's lora_down / lora_up (in `tensors`, by file key) with zero ranks to the largest rank;
    returns it."""
    w4a4 = [v for v in views.values() if v["kind"] == ek.W4A4]
    rank = max(layout.unpack_lora_down(tensors[v["tensors"]["lora_down"]]).shape[0] for v in w4a4)
    for v in w4a4:
        kd, ku = v["tensors"]["lora_down"], v["tensors"]["lora_up"]
        d, u = layout.unpack_lora_down(tensors[kd], kd), layout.unpack_lora_up(tensors[ku], ku)
        if d.shape[0] == rank:
            continue
        dd = torch.zeros(rank, d.shape[1], dtype=d.dtype)
        uu = torch.zeros(u.shape[0], rank, dtype=u.dtype)
        dd[:d.shape[0]], uu[:, :u.shape[1]] = d, u
        tensors[kd], tensors[ku] = layout.pack_lora_down(dd, kd), layout.pack_lora_up(uu, ku)
    return rank


def merge_single_file(art, mods, fmt: str, src, out, strength: float, force: bool, skip_unmatched: bool,
                      log) -> dict:
    """Write `out`: the single-file artifact `art` with the LoRA modules `mods` merged; the manifest's record."""
    from .lora import merge_tensors, plan
    note = art.manifest["runtime"]["nunchaku_file"]
    path = art.path / note["file"]
    tensors, md = singlefile.read(path)
    layers, splits = stored_view(art)
    mods = split_mods(mods, splits, set(layers) | {m for e in layers.values() for m, _ in e.get("fused", ())}, str(src))
    p = plan({"layers": layers}, tensors.keys(), mods, str(src), skip_unmatched)
    if not p.layers:
        raise LoraError(f"{src}: none of its modules is a W4A4 layer of {art.path}'s {note['file']}")
    views = note["layers"]

    def key(layer: str, t: str) -> str:
        if t not in views[layer]["tensors"]:
            raise KeyError(f"{layer}.{t}")
        return views[layer]["tensors"][t]
    new, touched = merge_tensors(layers, tensors.__getitem__, p, strength, key=key)
    tensors.update(new)
    rank = pad_ranks(tensors, views)
    manifest = {k: v for k, v in art.manifest.items() if k != "files"}
    manifest["layers"] = {k: dict(v) for k, v in art.manifest["layers"].items()}
    for e in manifest["layers"].values():   # each dcc linear follows its stored layer's new branch
        st = e.get("stored")
        if st is not None and st["prefix"] in touched:
            le = layers[st["prefix"]]
            e.setdefault("svd_rank", int(e.get("rank", 0)))
            e["rank"] = le["rank"]
    qcfg = dict(md["quantization_config"], rank=rank)
    new_md = singlefile.metadata(md["config"], md["model_class"], qcfg, md.get("comfy_config"))
    precision = art.manifest["recipe"]["options"].get("precision", "int4")
    name = file_name(precision, rank)
    manifest["runtime"] = dict(manifest["runtime"], nunchaku_file=dict(note, file=name))
    record = {"file": src.name, "sha256": sha256_file(src), "strength": float(strength), "format": fmt,
              "base_manifest_sha256": sha256_file(art.path / MANIFEST), "layers": touched,
              "skipped": sorted(f"{r.name} ({why})" for r, why in p.skipped), "file_rank": rank}
    manifest["lora"] = [*art.manifest.get("lora", []), record]
    writer = ArtifactWriter(out, force=force, protect=(art.path, src), need_bytes=path.stat().st_size, log=log)
    try:
        singlefile.write(writer.tmp / name, tensors, new_md)
        writer.finalize(art.config, manifest)
    except BaseException:
        writer.abort()
        raise
    return record
