"""Lower a compiled diffusers model to ONE Nunchaku single-file checkpoint (singlefile.py), named and laid out as the
model class's loader reads it (naming.py, expected_keys.py): fused layers stacked in the stored row order with one
smoothing and one branch, AdaNorm linears AWQ W4A16 with rows interleaved and the +1 folded into the bias, 16-bit
tensors renamed where the C++ blocks name them differently; ek.check() before anything is written. dcc's manifest
keeps one entry per dcc linear, with "stored" saying where its rows live in the file (stored.py), so that
`dcc validate` decodes every layer back from the file."""
from __future__ import annotations

import json

import torch

from ...ir.ops import is_shifted
from ...ir.rewrite_split import split_paths
from ..artifact import sha256_tensor
from . import expected_keys as ek
from . import layout, layout_awq, naming, singlefile
from .assign import Plan
from .emit import FORMAT, FORMAT_NVFP4, FORMAT_UNSIGNED, NunchakuEmitter, pack_linear
from .stored import FORMAT_AWQ, row_runs


def file_name(precision: str, rank: int) -> str:
    """Nunchaku's own naming of its checkpoints (svdq-int4_r32-flux.1-dev.safetensors, ...)."""
    return f"svdq-{'fp4' if precision == 'nvfp4' else 'int4'}_r{rank}.safetensors"


class NunchakuFileEmitter(NunchakuEmitter):
    """Collects each block's stored layers (packed as soon as the block is done) and writes the single file in
    finish(); the manifest's per-layer entries say where each dcc linear lives in it."""

    def __init__(self, writer, dtype: torch.dtype, plan: Plan, precision: str, rank: int):
        super().__init__(writer, dtype)
        self.plan, self.precision, self.rank = plan, precision, rank
        self.names = plan.names
        self.spec = ek.model_spec(self.names.model_class)
        self.tensors: dict[str, torch.Tensor] = {}
        self.expected: dict[str, ek.Expect] = {}
        self.packed: set[str] = set()
        self.views: dict[str, dict] = {}
        self.ranks: set[int] = set()
        self.file: str | None = None
        self.md: dict | None = None

    # ---------------------------------------------------------------------------------------------- per block
    def _dcc_path(self, sl: naming.StoredLayer, part: str) -> str:
        if sl.layer.cols == "all":
            return part
        return split_paths(part, 2)[0 if sl.layer.cols == "attn" else 1]

    def on_block(self, block, ctx=None) -> None:
        mine = [sl for sl in self.names.layers if sl.parts[0].startswith(block.prefix + ".")]
        owned = set()
        for sl in mine:
            paths = [self._dcc_path(sl, p) for p in sl.parts]
            owned |= set(paths) | set(sl.parts)
            self._stored_layer(block, sl, [p[len(block.prefix) + 1:] for p in paths])
        for name, lin in block.linears.items():   # linears Nunchaku does not store as a layer: 16-bit, named as is
            full = f"{block.prefix}.{name}"
            if full in owned:
                continue
            if lin.qtensor is not None:
                raise naming.NamingError(f"{full}: quantized, but {self.names.model_class} has no place for it")
            mod = block.linear_module(name)
            self.layers[full] = {"shape": [lin.out_features, lin.in_features], "format": self._dense_format(),
                                 "skip_reason": lin.skip_reason or "no quantization spec"}
            owned.add(full)
            self._plain_param(f"{full}.weight", mod.weight.data)
            if mod.bias is not None:
                self._plain_param(f"{full}.bias", mod.bias.data)
        for pname, p in block.module.named_parameters():
            full = f"{block.prefix}.{pname}"
            if full.rpartition(".")[0] not in owned:
                self._plain_param(full, p.data)
        if ctx is not None and getattr(ctx, "block_error", None) is not None:
            self.blocks[block.prefix] = {"output_rel_err": ctx.block_error}

    def _dense_format(self) -> str:
        return "float16" if self.dtype == torch.float16 else "bfloat16"

    def _plain_param(self, name: str, t: torch.Tensor) -> None:
        key = self.names.stored_param(name)
        if key is None:
            return
        t = t.to(self.dtype) if t.is_floating_point() else t
        self.tensors[key] = t.detach().cpu().contiguous()
        self.expected[key] = ek.Expect(tuple(t.shape), t.dtype, "required")

    def _stored_layer(self, block, sl: naming.StoredLayer, locals_: list[str]) -> None:
        lins = [block.linears.get(p) for p in locals_]
        if None in lins:
            raise naming.NamingError(f"{sl.prefix}: {block.prefix}.{locals_[lins.index(None)]} is not a linear of "
                                     f"the compiled block")
        mods = [block.linear_module(p) for p in locals_]
        dcc = [f"{block.prefix}.{p}" for p in locals_]
        outs = [l.out_features for l in lins]
        ks = {l.in_features for l in lins}
        if len(ks) != 1:
            raise naming.NamingError(f"{sl.prefix}: parts {dcc} read different input widths {sorted(ks)}")
        k = ks.pop()
        biases = [m.bias.data if m.bias is not None else None for m in mods]
        if sl.layer.bias == "zeros" and any(b is not None and bool(b.any()) for b in biases):
            raise naming.NamingError(f"{dcc[0]}: has a nonzero bias, but {sl.prefix} stores zeros")
        if sl.layer.bias == "never" and any(b is not None and bool(b.any()) for b in biases):
            raise naming.NamingError(f"{dcc[0]}: has a nonzero bias, which {self.names.model_class} drops "
                                     f"({sl.prefix} has none); refused rather than written wrong")
        if sl.layer.bias == "diffusers" and any(b is not None for b in biases) and \
                not all(p in self.plan.biased for p in sl.parts):
            # e.g. an unsigned input's shift compensation put a bias on a linear the Python class builds without one
            raise naming.NamingError(f"{dcc[0]}: the compiled linear has a bias, but {self.names.model_class} builds "
                                     f"{sl.prefix} without one (as the diffusers module)")
        runs = row_runs(sl, outs)
        n = int(sum(outs)) if sl.layer.rows in ("concat", "adanorm") else \
            naming.stored_shape(sl, {p: (o, k) for p, o in zip(sl.parts, outs)})[0]
        bias = naming.stored_bias(sl, biases, n)
        if sl.kind == ek.W4A4:
            t, info = self._w4a4(sl, lins, mods, dcc, bias)
        elif sl.kind == ek.AWQ:
            t, info = self._awq(sl, lins, mods, dcc, bias)
        elif sl.kind == ek.DENSE:
            w = naming.stored_rows(sl, [m.weight.data for m in mods]).to(self.dtype)
            t = {"weight": w} | ({"bias": bias.to(self.dtype)} if bias is not None else {})
            info = {}
        else:
            raise naming.NamingError(f"{sl.prefix}: dcc does not write {sl.kind} layers")
        rank = info.pop("rank", 0)
        exp = ek.layer_tensors(self.spec, sl.layer, sl.prefix, n, k, bias is not None, self.precision, self.dtype,
                               rank)
        keys = {}
        for suffix, tensor in t.items():
            key = f"{sl.prefix}.{self.names.suffix(suffix) if sl.kind == ek.W4A4 else suffix}"
            if key in exp and exp[key].need != "absent":
                self.tensors[key] = tensor.detach().cpu().contiguous()
                keys[suffix] = key
        self.expected.update(exp)
        self.packed.add(sl.prefix)
        # the stored layer's own view (runtime.nunchaku_file.layers), in lora.py's contract: keyed by the stored
        # prefix, its [N, K], and "fused": the source modules stacked on its rows (concatenated row orders only)
        fmt = info[dcc[0]]["format"] if dcc[0] in info else self._dense_format()
        view = {"kind": sl.kind, "format": fmt, "shape": [n, k], "bias": bias is not None, "rows": sl.layer.rows,
                "tensors": dict(sorted(keys.items()))}
        if sl.layer.rows == "concat" and len(sl.parts) > 1:
            view["fused"] = [[p, o] for p, o in zip(sl.parts, outs)]
        if sl.layer.cols != "all":
            view["columns_of"] = [sl.parts[0], sl.layer.cols]   # the FLUX single block's proj_out, split
        self.views[sl.prefix] = view
        fused = [[p, o] for p, o in zip(dcc, outs)] if len(dcc) > 1 else None
        for i, (path, lin, mod) in enumerate(zip(dcc, lins, mods)):
            stored = {"prefix": sl.prefix, "kind": sl.kind, "shape": [n, k], "bias": bias is not None,
                      "rows": runs[i],
                      "tensors": {s: keys[s] for s in ("qweight", "wscales", "wzeros", "wtscale", "wcscales",
                                                       "weight") if s in keys}}
            if fused:
                stored["fused"] = fused
            entry = {"shape": [lin.out_features, lin.in_features],
                     **{a: v for a, v in lin.stats.items() if not isinstance(v, torch.Tensor)}}
            if sl.kind == ek.DENSE:
                entry.update(format=self._dense_format(), skip_reason=lin.skip_reason or "16-bit in Nunchaku")
            else:
                entry.update(info[path])
            entry["stored"] = stored
            self.layers[path] = entry

    def _w4a4(self, sl, lins, mods, dcc, bias):
        unsigned = sl.unsigned(self.precision)
        for path, lin in zip(dcc, lins):
            if lin.qtensor is None:
                raise naming.NamingError(f"{path}: {sl.prefix} is W4A4 in {self.names.model_class}, but the linear "
                                         f"was not quantized ({lin.skip_reason})")
            if is_shifted(lin.act) != unsigned:
                raise naming.NamingError(f"{path}: its input is quantized {'un' if is_shifted(lin.act) else ''}signed"
                                         f", but {self.names.model_class}'s {sl.prefix} reads it "
                                         f"{'un' if unsigned else ''}signed")
        get = lambda m, a: getattr(m, a, None)   # noqa: E731 - svd_lowrank's buffers, if it ran
        smooth, down = get(mods[0], "smooth"), get(mods[0], "lora_down")
        for path, m in zip(dcc[1:], mods[1:]):
            # one smoothing and one branch input for the stored layer: svd_lowrank's group must be the fused group
            for a, ref in (("smooth", smooth), ("lora_down", down)):
                mine = get(m, a)
                if (mine is None) != (ref is None) or (ref is not None and not torch.equal(mine, ref)):
                    raise naming.NamingError(f"{path}: its {a} differs from {dcc[0]}'s, but {sl.prefix} stores one "
                                             f"for all of {', '.join(dcc)} (svd_lowrank did not group them)")
        qts = [l.qtensor for l in lins]
        fp4 = qts[0].spec.micro_scale is not None
        codes = naming.stored_rows(sl, [q.codes for q in qts])
        scales = naming.stored_rows(sl, [q.scale.float() if fp4 else q.scale for q in qts])
        up = naming.stored_rows(sl, [get(m, "lora_up") for m in mods]) if down is not None else None
        # NVFP4: each part has its own per-tensor scale; stored as wtscale 1 and per-row wcscales (16-bit values, so
        # exact), which every Nunchaku loader reads (SDXL's has no wtscale at all)
        t = pack_linear(codes, scales, smooth, down, up, bias, self.dtype, 1.0 if fp4 else None)
        if fp4:
            wc = naming.stored_rows(sl, [torch.full((q.codes.shape[0],), float(q.scale0.reshape(())))
                                         for q in qts])
            t["wcscales"] = layout.pack_channel_vector(layout.pad_channel_vector(wc.to(self.dtype)), "wcscales")
        # DeepCompressor writes smooth_orig as the packed, padded smooth (nothing reads it but LoRA tools)
        t["smooth_orig"] = t["smooth"].clone()
        if bias is None:
            del t["bias"]
        rank = int(t["lora_down"].shape[1])
        self.ranks.add(rank)
        info = {"rank": rank}
        for path, lin, mod in zip(dcc, lins, mods):
            fmt = FORMAT_NVFP4 if fp4 else FORMAT_UNSIGNED if is_shifted(lin.act) else FORMAT
            info[path] = {"format": fmt, "spec": lin.qtensor.spec.to_dict(), "rank": rank,
                          "has_bias": mod.bias is not None, "weight_sha256": sha256_tensor(mod.weight.data.float())}
        return t, info

    def _awq(self, sl, lins, mods, dcc, bias):
        (lin,), (mod,), (path,) = lins, mods, dcc
        qt = lin.qtensor
        if qt is None or qt.spec.zero_mode != "scaled" or qt.spec.group_size != layout_awq.GROUP_SIZE:
            raise naming.NamingError(f"{path}: {sl.prefix} is AWQ W4A16 g64 in {self.names.model_class}, but the "
                                     f"linear is {'16-bit' if qt is None else qt.spec.short()}")
        codes = naming.stored_rows(sl, [qt.codes])
        scale = naming.stored_rows(sl, [qt.scale])
        zero = naming.stored_rows(sl, [qt.zero])
        wscales, wzeros = layout_awq.pack_scales(scale, zero, dtype=self.dtype)
        t = {"qweight": layout_awq.pack_qweight(codes), "wscales": wscales, "wzeros": wzeros}
        if bias is not None:
            t["bias"] = bias.to(self.dtype)
        # the kernel reconstructs the 16-bit weight (one fma per element): that is what decode() gives back
        info = {path: {"format": FORMAT_AWQ, "spec": qt.spec.to_dict(), "has_bias": mod.bias is not None,
                       "weight_sha256": sha256_tensor(mod.weight.data.to(self.dtype))}}
        return t, info

    # ---------------------------------------------------------------------------------------------- the file
    def finish(self, lm) -> None:
        for name, p in lm.model.named_parameters():
            if not lm.in_blocks(name):
                self._plain_param(name, p.data)
        missing = [sl.prefix for sl in self.names.layers if sl.prefix not in self.packed]
        if missing:
            raise naming.NamingError(f"{missing[0]}: no compiled block held its parts (Nunchaku's loader reads it)")
        if len(self.ranks) > 1:
            raise naming.NamingError(f"the W4A4 layers have branches of ranks {sorted(self.ranks)}; "
                                     f"{self.names.model_class} reads one rank from quantization_config")
        rank = self.ranks.pop() if self.ranks else self.rank
        problems = ek.check(self.tensors, self.expected, self.spec.strict)
        if problems:
            raise naming.NamingError(f"{self.names.model_class}'s loader would not take the file: {problems[0]}"
                                     + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        cfg_file = lm.path / "config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else dict(lm.config)
        qcfg = singlefile.quantization_config(self.precision, rank, self.names.skip_refiners)
        self.md = singlefile.metadata(config, self.names.model_class, qcfg)
        self.file = file_name(self.precision, rank)
        singlefile.write(self.writer.tmp / self.file, self.tensors, self.md)
        self.tensors = {}

    def summary(self) -> dict:
        """The manifest's note on the file (runtime.nunchaku_file)."""
        return {"written": True, "file": self.file, "model_class": self.names.model_class,
                "convention": self.names.convention, "stored_layers": len(self.names.layers),
                "layers": dict(sorted(self.views.items())),
                **({"skip_refiners": self.names.skip_refiners} if self.names.skip_refiners is not None else {})}
