"""LoRA merged into a Nunchaku artifact without requantizing (issue 26, part 4; Nunchaku's own scheme, nunchaku
`lora/flux`, research/nunchaku_2026.md B.3): each targeted layer's 16-bit low-rank branch gains the LoRA's ranks
after its SVD ranks -- lora_down [R, K] gains the rows scale * A, lora_up [N, R] the columns B, scale = strength *
alpha / rank -- repacked by layout.py in 16x16 fragments with the rank padded to 16; qweight, wscales, smooth and
smooth_orig stay byte for byte; LoRA biases (lora_B's bias, kohya's diff_b) add into the packed bias.

Why A applies as it is: the branch reads the raw x, not x / smooth (svd_lowrank stores lora_down = Vh / lambda;
reference.lora_down_act and Nunchaku's quantize kernel feed it the unsmoothed 16-bit input, and an act_unsigned
layer's branch the unshifted GELU output), so no un-smoothing and no shift compensation.
Each merged LoRA starts at a multiple of 16 ranks, so the SVD branch keeps its own 16-rank tiles and a runtime's
lora_scales (one float per 16 ranks, Nunchaku's setLoraScale) could scale a LoRA apart from it.

Fused layers (the manifest contract a fusing emitter writes, checked here): a quantized layer's entry in
manifest["layers"] may carry "fused": [[module_path, out_features], ...], the source modules whose weights were
stacked on the output axis into this one stored layer, in row order (to_q, to_k, to_v -> to_qkv). module_path is a
module path of the source model (the namespace of the layer names, not itself a key of manifest["layers"]); the
out_features are positive and sum to the layer's shape[0]; every part has the layer's in_features. A LoRA on a part
goes into that part's rows: parts whose LoRAs have the same A (equal tensors and equal scale) share one down and
their Bs stack into one up; other parts get a down of their own and a block-diagonal up (B in the part's rows and
its own rank columns). A LoRA naming the fused layer itself covers all its rows.

The manifest records, per merged LoRA, {"file", "sha256", "strength", "format", "base_manifest_sha256", "layers":
{layer: {"ranks": [start, stop] | null, "bias": bool, "modules": [...]}}, "skipped": [...]} in the list "lora", and
per touched layer the new "rank" (the end of its last LoRA's ranks) and "svd_rank" (the compiled branch's).

A Nunchaku single-file artifact (manifest runtime.nunchaku_file) is merged on its stored layers by lora_file.py,
with these rules, and written as a new single file."""
from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifact import MANIFEST, ArtifactWriteError, ArtifactWriter, sha256_file
from . import layout
from .emit import FORMAT, FORMAT_NVFP4, FORMAT_UNSIGNED
from .lora_keys import LoraError, LoraModule, Resolver, parse

log = logging.getLogger(__name__)
# the formats whose branch and bias a LoRA can join: the 16-bit lora_down / lora_up / bias are packed alike in all
# three, the branch reads the raw x in all three, and the bias is added after the main branch's scales in all three
MERGEABLE = (FORMAT, FORMAT_UNSIGNED, FORMAT_NVFP4)


@dataclass
class Part:
    """A LoRA placed in a stored layer: its module's rows [start, start + rows) of the layer."""
    module: str
    start: int
    rows: int
    rec: LoraModule


@dataclass
class Plan:
    """Which LoRA goes where: layer -> its parts; the LoRA modules the artifact did not quantize, with why."""
    layers: dict[str, list[Part]] = field(default_factory=dict)
    skipped: list[tuple[LoraModule, str]] = field(default_factory=list)


def fused_parts(layer: str, entry: dict) -> list[tuple[str, int, int]]:
    """(module, first row, rows) of each part of a fused layer, checked against the contract above."""
    n = entry["shape"][0]
    parts, start = [], 0
    for item in entry.get("fused") or ():
        ok = (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] > 0)
        if not ok:
            raise LoraError(f"manifest: layer {layer}: fused entry {item!r} is not [module_path, out_features]")
        parts.append((item[0], start, item[1]))
        start += item[1]
    if parts and start != n:
        raise LoraError(f"manifest: layer {layer}: its fused parts have {start} rows in all, the layer {n}")
    return parts


def plan(manifest: dict, tensor_keys, mods: list[LoraModule], src: str, skip_unmatched: bool = False) -> Plan:
    """Each LoRA module to its place. A module whose layer is 16-bit, or of another format, is an error; one that
    dcc did not quantize (outside the blocks, not a linear, not in the artifact) is an error unless skip_unmatched."""
    layers = manifest["layers"]
    where: dict[str, tuple[str, int, int]] = {}      # module -> (quantized layer, first row, rows)
    kept = {n: n for n, e in layers.items() if "skip_reason" in e}   # module -> its 16-bit layer
    for name, e in layers.items():
        if "skip_reason" not in e:
            where[name] = (name, 0, e["shape"][0])
        for mod, start, rows in fused_parts(name, e):
            if mod in layers or mod in where or mod in kept:
                owner = "a layer" if mod in layers else f"a part of {where[mod][0] if mod in where else kept[mod]}"
                raise LoraError(f"manifest: layer {name}: fused part {mod} is also {owner}")
            if "skip_reason" in e:
                kept[mod] = name
            else:
                where[mod] = (name, start, rows)
    names = set(layers) | set(where) | set(kept) | {k.rpartition(".")[0] for k in tensor_keys}
    resolve, out, seen = Resolver(names), Plan(), {}
    for rec in mods:
        mod = resolve(rec, src)
        if mod is not None and mod in seen:
            raise LoraError(f"{src}: tensors {seen[mod].first_key} and {rec.first_key} are both a LoRA of {mod}")
        if mod is not None:
            seen[mod] = rec
        if mod in kept:
            layer = kept[mod]
            raise LoraError(f"{src}: tensor {rec.first_key}: layer {layer} is 16-bit in this artifact "
                            f"({layers[layer]['skip_reason']}); dcc merges LoRAs into the low-rank branch of "
                            f"quantized layers only, never into a float weight")
        if mod not in where:
            if mod is not None:
                why = "not quantized by dcc (outside the blocks, or not a linear)"
            elif rec.name.startswith(("text_encoder", "lora_te")):
                why = "a text encoder's module (not part of this artifact)"
            else:
                why = "not a module of this artifact"
            if not skip_unmatched:
                raise LoraError(f"{src}: tensor {rec.first_key} is a LoRA of {mod or rec.name}, which is {why}; "
                                f"--skip-unmatched leaves such LoRA modules out (and lists them)")
            out.skipped.append((rec, why))
            continue
        layer, start, rows = where[mod]
        if layers[layer].get("format") not in MERGEABLE:
            raise LoraError(f"{src}: tensor {rec.first_key}: layer {layer} is stored as {layers[layer].get('format')}"
                            f"; LoRA merging takes {', '.join(MERGEABLE)} layers")
        _check_shapes(rec, layer, mod, start, rows, layers[layer]["shape"][1], src)
        out.layers.setdefault(layer, []).append(Part(mod, start, rows, rec))
    return out


def _check_shapes(rec: LoraModule, layer: str, mod: str, start: int, rows: int, k: int, src: str) -> None:
    what = f"layer {layer}" if mod == layer else f"{mod} (rows {start}..{start + rows - 1} of layer {layer})"
    if rec.down is not None and rec.down.shape[1] != k:
        raise LoraError(f"{src}: tensor {rec.keys['down']} has shape {tuple(rec.down.shape)}, but {what} has "
                        f"{k} inputs (expected [rank, {k}])")
    if rec.up is not None and rec.up.shape[0] != rows:
        raise LoraError(f"{src}: tensor {rec.keys['up']} has shape {tuple(rec.up.shape)}, but {what} has {rows} "
                        f"outputs (expected [{rows}, rank])")
    for role in ("bias", "diff_b"):
        t = getattr(rec, role)
        if t is not None and t.shape[0] != rows:
            raise LoraError(f"{src}: tensor {rec.keys[role]} has {t.shape[0]} entries, but {what} has {rows} outputs")


def branch(n: int, k: int, parts: list[Part], strength: float):
    """(down [r, K], up [N, r], bias change [N] or None) in float64 for one stored layer: the fused-layer rules
    above (parts with the same A and scale share one down; others are block-diagonal), parts in row order."""
    groups: list[list[Part]] = []
    for p in sorted((p for p in parts if p.rec.down is not None), key=lambda p: (p.start, p.module)):
        whole = p.rows == n
        g = next((g for g in groups if not whole and g[0].rows != n and torch.equal(g[0].rec.down, p.rec.down)
                  and g[0].rec.scale(strength) == p.rec.scale(strength)), None)
        (g.append(p) if g is not None else groups.append([p]))
    downs, ups = [], []
    for g in groups:
        a = g[0].rec.down.double() * g[0].rec.scale(strength)
        up = torch.zeros(n, a.shape[0], dtype=torch.float64)
        for p in g:
            up[p.start:p.start + p.rows] = p.rec.up.double()
        downs.append(a)
        ups.append(up)
    down = torch.cat(downs) if downs else torch.zeros(0, k, dtype=torch.float64)
    up = torch.cat(ups, dim=1) if ups else torch.zeros(n, 0, dtype=torch.float64)
    dbias = None
    for p in parts:
        for t, s in ((p.rec.bias, p.rec.scale(strength)), (p.rec.diff_b, strength)):
            if t is not None:
                dbias = torch.zeros(n, dtype=torch.float64) if dbias is None else dbias
                dbias[p.start:p.start + p.rows] += s * t.double()
    return down, up, dbias


def merge_layer(tensors: dict, layer: str, entry: dict, down: torch.Tensor, up: torch.Tensor,
                dbias: torch.Tensor | None) -> tuple[dict, list[int] | None]:
    """The new packed lora_down / lora_up / bias of one layer (only those that change) and the LoRA's [start, stop)
    ranks. The first entry["rank"] ranks are copied bit for bit; the LoRA's factors are rounded once to the branch's
    16-bit dtype; the new ranks start at a multiple of 16 and the total is padded to 16."""
    n, k = entry["shape"]
    rank = int(entry.get("rank", 0))
    out, seg = {}, None
    if down.shape[0]:
        old_d = layout.unpack_lora_down(tensors["lora_down"], f"{layer}.lora_down")    # [R', K']
        old_u = layout.unpack_lora_up(tensors["lora_up"], f"{layer}.lora_up")          # [N', R']
        if old_d.shape[0] < rank or old_u.shape[1] < rank:
            raise LoraError(f"artifact: layer {layer} records rank {rank} but stores lora_down/lora_up of rank "
                            f"{old_d.shape[0]}/{old_u.shape[1]}")
        dt = old_d.dtype
        start = layout.padded(rank, layout.RANK_ALIGN)
        stop = start + down.shape[0]
        total = layout.padded(stop, layout.RANK_ALIGN)
        d = torch.zeros(total, old_d.shape[1], dtype=dt)
        u = torch.zeros(old_u.shape[0], total, dtype=dt)
        d[:rank], u[:, :rank] = old_d[:rank], old_u[:, :rank]
        d[start:stop, :k], u[:n, start:stop] = down.to(dt), up.to(dt)
        out["lora_down"] = layout.pack_lora_down(d, f"{layer}.lora_down")
        out["lora_up"] = layout.pack_lora_up(u, f"{layer}.lora_up")
        seg = [start, stop]
    if dbias is not None:
        b = layout.unpack_channel_vector(tensors["bias"], f"{layer}.bias").clone()
        b[:n] = (b[:n].double() + dbias).to(b.dtype)   # one rounding of the sum to the stored 16-bit dtype
        out["bias"] = layout.pack_channel_vector(b, f"{layer}.bias")
    return out, seg


def merge_artifact(art, lora_file, out, strength: float = 1.0, force: bool = False,
                   skip_unmatched: bool = False) -> dict:
    """Write `out`: the artifact `art` (as dcc.runtime.artifact.load_artifact reads it, checksums verified: path,
    manifest, config, tensors with keys() and get(); a target does not import the runtime) with the LoRA
    `lora_file` merged (see the module docstring). Returns the manifest's record of the merge. The output is written
    to a temporary folder and renamed at the end; an existing `out` is replaced only with force (and only if it is
    a dcc artifact other than the inputs)."""
    from safetensors.torch import load_file
    if not math.isfinite(strength):
        raise LoraError(f"--strength {strength}: must be a finite number")
    m = art.manifest
    if m.get("target") != "nunchaku":
        raise LoraError(f"{art.path}: a {m.get('target')} artifact; `dcc lora merge` takes Nunchaku-target "
                        f"artifacts (the LoRA goes into their 16-bit low-rank branch)")
    src = Path(lora_file)
    if not src.is_file():
        raise LoraError(f"{src}: no such LoRA file")
    try:
        sd = load_file(str(src))
    except Exception as e:   # safetensors raises its own types for a truncated or foreign file
        raise LoraError(f"{src}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    mods, fmt = parse(sd, str(src))
    if ((m.get("runtime") or {}).get("nunchaku_file") or {}).get("written"):   # a Nunchaku single file
        from .lora_file import merge_single_file
        return merge_single_file(art, mods, fmt, src, out, strength, force, skip_unmatched, log.warning)
    p = plan(m, art.tensors.keys(), mods, str(src), skip_unmatched)
    if not p.layers:
        raise LoraError(f"{src}: none of its {len(mods)} modules is a quantized layer of {art.path}")
    need = sum((art.path / f).stat().st_size for f in m.get("files", {}))
    writer = ArtifactWriter(out, force=force, protect=(art.path, src), need_bytes=need, log=log.warning)
    try:
        manifest, new = _merged(art, p, src, fmt, strength)
        for key in sorted(art.tensors.keys()):
            writer.add(key, new.get(key, art.tensors.get(key)))
        for f in m.get("files", {}):   # tokenizer and other files travel as they are; their checksums are redone
            if not (f.endswith(".safetensors") or f in (MANIFEST, "config.json", "model.safetensors.index.json")):
                try:
                    shutil.copyfile(art.path / f, writer.tmp / f)
                except OSError as e:
                    raise ArtifactWriteError(f"{writer.tmp / f}: cannot write ({e.strerror or e})") from e
        writer.finalize(art.config, manifest)
    except BaseException:
        writer.abort()
        raise
    return manifest["lora"][-1]


def merge_tensors(layers: dict, get, p: Plan, strength: float, key=None) -> tuple[dict, dict]:
    """(the changed tensors by key, per touched layer {"ranks", "bias", "modules"}) for the manifest's `layers`
    (entries are updated in place: rank, svd_rank, has_bias); get(key) reads a stored tensor; key(layer, suffix) is
    its key (default "layer.suffix"; a single file's own keys in lora_file.py)."""
    key = key or (lambda layer, t: f"{layer}.{t}")
    new, touched = {}, {}
    for layer in sorted(p.layers):
        entry = layers[layer]
        n, k = entry["shape"]
        down, up, dbias = branch(n, k, p.layers[layer], strength)
        try:
            stored = {t: get(key(layer, t)) for t in ("lora_down", "lora_up") + (("bias",) if dbias is not None
                                                                                  else ())}
        except KeyError as e:
            raise LoraError(f"artifact: layer {layer} is missing tensor {e}") from None
        changed, seg = merge_layer(stored, layer, entry, down, up, dbias)
        new.update({key(layer, t): v for t, v in changed.items()})
        if seg is not None:
            entry.setdefault("svd_rank", int(entry.get("rank", 0)))
            entry["rank"] = seg[1]
        if dbias is not None:
            entry["has_bias"] = True
        touched[layer] = {"ranks": seg, "bias": dbias is not None,
                          "modules": sorted(pt.module for pt in p.layers[layer])}
    return new, touched


def _merged(art, p: Plan, src: Path, fmt: str, strength: float) -> tuple[dict, dict]:
    """(the new manifest, the changed tensors by key)."""
    manifest = {k: v for k, v in art.manifest.items() if k != "files"}
    manifest["layers"] = {k: dict(v) for k, v in art.manifest["layers"].items()}
    new, touched = merge_tensors(manifest["layers"], art.tensors.get, p, strength)
    record = {"file": src.name, "sha256": sha256_file(src), "strength": float(strength), "format": fmt,
              "base_manifest_sha256": sha256_file(art.path / MANIFEST), "layers": touched,
              "skipped": sorted(f"{r.name} ({why})" for r, why in p.skipped)}
    manifest["lora"] = [*art.manifest.get("lora", []), record]
    return manifest, new
