"""IR dumps for engineers: after every pass, a readable text listing and a JSON per block; once per run, an ONNX file
of the first block's graph (ops in a custom 'dcc.aten' domain, shapes kept) that graph viewers such as Netron open."""
from __future__ import annotations

import json
from pathlib import Path

import torch

_ONNX_DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7, "int32": 6, "bool": 9, "int8": 3}


def _wstats(w: torch.Tensor) -> dict:
    w = w.detach().float()
    return {"absmax": round(float(w.abs().max()), 6), "std": round(float(w.std()), 6)}


def block_record(block, step: int, name: str, result) -> dict:
    """A JSON-able view of the block after a pass: nodes, linears (spec, stats), groups and the pass result."""
    linears = {}
    for n, lin in block.linears.items():
        mod = block.linear_module(n)
        rec = {"shape": [lin.out_features, lin.in_features], "bias": lin.has_bias,
               "spec": lin.spec.short() if lin.spec else None, "quantized": lin.qtensor is not None,
               "skip_reason": lin.skip_reason, **_wstats(mod.weight)}
        rec.update({k: (v if not isinstance(v, torch.Tensor) else {"mean": round(float(v.float().mean()), 5)})
                    for k, v in lin.stats.items()})
        if lin.clip is not None:
            rec["clip"] = {"mean": round(float(torch.as_tensor(lin.clip).float().mean()), 5)}
        linears[n] = rec
    res = None
    if result is not None:
        res = {"changed": result.changed, "message": result.message,
               "details": json.loads(json.dumps(result.details, default=str))}
    return {
        "block": block.prefix, "step": step, "pass": name, "result": res,
        "nodes": [vars(n) | {"shape": list(n.shape) if n.shape else None} for n in block.nodes],
        "linears": linears,
        "norms": [vars(g) for g in block.norms],
        "attention": [vars(a) for a in block.attentions],
        "mlp": [vars(m) for m in block.mlps],
        "residual": vars(block.residual) if block.residual else None,
        "input_readers": list(block.input_readers),
    }


def render_text(rec: dict) -> str:
    """The readable listing: groups, linears with specs and stats, then every node."""
    out = [f"# {rec['block']} after step {rec['step']}: {rec['pass']}"]
    if rec["result"]:
        out.append(f"# result: changed={rec['result']['changed']} {rec['result']['message']}")
    for g in rec["norms"]:
        shared = "" if g.get("exclusive", True) else " (its output also feeds the residual: no scale folds into it)"
        out.append(f"norm {g['norm']} ({g['kind']}, gain {g['weight']}, offset {g['offset']}) -> "
                   f"{', '.join(g['linears'])}{shared}")
    for a in rec["attention"]:
        out.append(f"attention q={a['q']} k={a['k']} v={a['v']} -> o={a['o']} heads {a['num_heads']}/"
                   f"{a['num_kv_heads']} x {a['head_dim']} rope={a['rope']}")
    for m in rec["mlp"]:
        out.append(f"mlp {', '.join(m['ups'])} (gate {m['gate']}, {m['act']}) -> {m['down']}")
    if rec["residual"]:
        out.append(f"residual writers {rec['residual']['writers']} readers {rec['residual']['readers']}")
    if rec.get("input_readers"):
        out.append(f"block input (normalised before the block) -> {', '.join(rec['input_readers'])}")
    out.append("")
    out.append(f"{'linear':32} {'shape':>12} {'spec':36} {'absmax':>10} {'std':>9}  stats")
    for n, l in rec["linears"].items():
        extra = {k: v for k, v in l.items() if k not in ("shape", "bias", "spec", "quantized", "skip_reason",
                                                          "absmax", "std")}
        spec = l["spec"] or f"16-bit ({l['skip_reason'] or 'no spec'})"
        out.append(f"{n:32} {'x'.join(map(str, l['shape'])):>12} {spec:36} {l['absmax']:>10.4g} {l['std']:>9.4g}  "
                   f"{json.dumps(extra) if extra else ''}")
    out.append("")
    out.append(f"{'node':28} {'kind':10} {'op':30} {'shape':20} {'dtype':9} module")
    for n in rec["nodes"]:
        shape = "x".join(map(str, n["shape"])) if n["shape"] else "-"
        out.append(f"{n['name']:28} {n['kind']:10} {n['target'][:30]:30} {shape:20} {n['dtype'] or '-':9} {n['module']}")
    return "\n".join(out) + "\n"


def write_onnx(block, path: Path) -> None:
    """The block's graph as ONNX for viewing (not for running): one node per ATen op, tensors named as in the IR."""
    import onnx
    from onnx import helper

    def vinfo(n):
        dt = _ONNX_DTYPES.get(n.dtype or "", 1)
        return helper.make_tensor_value_info(n.name, dt, list(n.shape) if n.shape is not None else None)

    inputs = [vinfo(n) for n in block.nodes if n.kind in ("input", "param") and n.shape is not None]
    known = {v.name for v in inputs}
    nodes, outputs = [], []
    for n in block.nodes:
        if n.kind in ("input", "param"):
            continue
        if n.kind == "output":
            outputs = [vinfo(next(m for m in block.nodes if m.name == i)) for i in n.inputs]
            continue
        attrs = {"module": n.module, "kind": n.kind}
        nodes.append(helper.make_node(n.target, [i for i in n.inputs if i in known], [n.name], name=n.name,
                                      domain="dcc.aten", **attrs))
        known.add(n.name)
    graph = helper.make_graph(nodes, block.prefix, inputs, outputs,
                              value_info=[vinfo(n) for n in block.nodes if n.kind not in ("input", "param", "output")
                                          and n.shape is not None])
    model = helper.make_model(graph, producer_name="dcc",
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("dcc.aten", 1)])
    onnx.save(model, str(path))


class Dumper:
    """Writes dump_dir/<block>/<step>_<pass>.{txt,json} and dump_dir/<first block>.onnx."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._onnx_done = False

    def path_for(self, block, step: int) -> Path:
        return self.root / block.prefix

    def dump_model(self, phase: str, step: int, name: str, result) -> None:
        """What a pass did outside the blocks (its model prologue or epilogue): dump_dir/model/<phase>_<step>_<pass>."""
        d = self.root / "model"
        d.mkdir(parents=True, exist_ok=True)
        rec = {"phase": phase, "step": step, "pass": name,
               "result": None if result is None else {"changed": result.changed, "message": result.message,
                                                      "details": json.loads(json.dumps(result.details, default=str))}}
        (d / f"{phase}_{step:02d}_{name}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")

    def dump(self, block, step: int, name: str, result) -> None:
        d = self.root / block.prefix
        d.mkdir(parents=True, exist_ok=True)
        rec = block_record(block, step, name, result)
        (d / f"{step:02d}_{name}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
        (d / f"{step:02d}_{name}.txt").write_text(render_text(rec))
        if not self._onnx_done and block.nodes:
            write_onnx(block, self.root / f"{block.prefix}.onnx")
            self._onnx_done = True
