"""The README's benchmark tables, rendered from the committed results (bench/results/*.json, bench/_results.py).

    python bench/readme_tables.py            # print every table
    python bench/readme_tables.py --check    # exit 1 unless README.md holds each table exactly as rendered

After a benchmark run rewrites a JSON file, paste the printed table into README.md (the text around it cites the
file's commit, machine and date)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def bold_min(values: list[float | None], fmt: str) -> list[str]:
    best = min((v for v in values if v is not None), default=None)
    return ["-" if v is None else (f"**{v:{fmt}}**" if v == best else f"{v:{fmt}}") for v in values]


def accuracy() -> str:
    """accuracy.json (float zero points, 4 and 3 bits) and accuracy_integer_zero.json (integer zero points)."""
    labels = {"rtn": "RTN", "awq": "AWQ (scales + clip)", "gptq": "GPTQ", "awq+gptq": "AWQ + clip + GPTQ"}
    rows = load("accuracy")["rows"] + load("accuracy_integer_zero")["rows"]
    float_ppl = next(r["ppl"] for r in rows if r["method"] == "float")
    keys = [(a, z) for a in labels for z in ("float", "integer")
            if any(r["method"] == a and r.get("zero") == z for r in rows)]

    def get(a, z, bits, field):
        r = next((r for r in rows if r["method"] == a and r.get("zero") == z and r["bits"] == bits), None)
        return None if r is None else r[field]
    p4 = bold_min([get(a, z, 4, "ppl") for a, z in keys], ".2f")
    p3 = bold_min([get(a, z, 3, "ppl") for a, z in keys], ".2f")
    body = [["float (source)", "-", f"{float_ppl:.2f}", f"{float_ppl:.2f}", "-"]]
    for i, (a, z) in enumerate(keys):
        body.append([labels[a], z, p4[i], p3[i], f"{get(a, z, 4, 'compile_s'):.1f}"])
    return md(["method", "zero point", "4-bit ppl (artifact)", "3-bit ppl (fake-quant)", "4-bit compile s"], body)


def compile_time() -> str:
    body = []
    for r in load("compile_time")["rows"]:
        passes = ", ".join(f"{k} {v:.1f}" for k, v in r["passes_s"].items())
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        body.append([r["algo"], r["wall_s"], r["blocks_s"], passes, rss])
    return md(["algo", "wall s (whole command)", "blocks s", "per pass s", "peak RSS MB"], body)


def qserve_accuracy() -> str:
    """Bold: the best row of each family (bits, KV bits, group size)."""
    doc = load("qserve_accuracy")
    rows = doc["rows"]
    fam = lambda r: (r.get("bits"), r.get("kv_bits"), r.get("group_size"))  # noqa: E731
    best = {}
    for r in rows[1:]:
        if fam(r) not in best or r["ppl"] < best[fam(r)]:
            best[fam(r)] = r["ppl"]
    body = []
    for r in rows:
        ppl = f"{r['ppl']:.2f}"
        if r["row"] != "float" and r["ppl"] == best[fam(r)]:
            ppl = f"**{ppl}**"
        body.append([r["row"], ppl, " -> ".join(r.get("passes", [])) or "-", ", ".join(r.get("engines", [])) or "-",
                     f"{r['compile_s']:.0f}"])
    w = doc.get("args", {}).get("windows", 8), doc.get("args", {}).get("seq_len", 512)
    return md(["row", f"WikiText-2 ppl ({w[0]}x{w[1]})", "passes", "loads in", "compile s"], body)


def gpu_w4a16() -> str:
    rows = [r for r in load("gpu_w4a16")["rows"] if r["path"].startswith("auto")]
    body = []
    for n, k in SHAPES:
        one = next(r for r in rows if (r["N"], r["K"], r["M"]) == (n, k, 1))
        big = next(r for r in rows if (r["N"], r["K"], r["M"]) == (n, k, 4096))
        body.append([f"{n} x {k}", f"{one['us']:.2f}", f"{one['cublas_us']:.2f}", f"{one['speedup_vs_cublas']:.2f}x",
                     f"{big['us']:.1f}", f"{big['cublas_us']:.1f}", f"{big['speedup_vs_cublas']:.2f}x"])
    return md(["N x K", "M = 1", "cuBLAS M = 1", "speedup", "M = 4096", "cuBLAS M = 4096", "ratio"], body)


def gpu_w4a8() -> str:
    """GEMM alone, automatic choice; TOPS shown from M = 128 per channel and at M = 4096 for g128."""
    rows = [r for r in load("gpu_w4a8")["rows"] if r["path"] == "auto"]
    body = []
    for n, k in SHAPES:
        for m in sorted({r["M"] for r in rows if (r["N"], r["K"]) == (n, k)}):
            pc, g = (next(r for r in rows if (r["N"], r["K"], r["M"], r["layout"]) == (n, k, m, lay))
                     for lay in ("per-channel", "g128"))
            im = "-" if pc["int_mm_us"] is None else f"{pc['int_mm_us']:.2f}"
            if pc.get("int_mm_padded_to"):
                im += f" (M padded to {pc['int_mm_padded_to']})"
            pcs = f"{pc['us']:.2f}" + (f" ({pc['TOPS']:.0f} TOPS)" if m >= 128 else "")
            gs = f"{g['us']:.2f}" + (f" ({g['TOPS']:.0f} TOPS)" if m == 4096 else "")
            body.append([f"{n} x {k}", m, f"{pc['cublas_fp16_us']:.2f}", im, pcs, f"{pc['vs_cublas_fp16']:.2f}x", gs,
                         f"{g['vs_cublas_fp16']:.2f}x"])
    return md(["N x K", "M", "cuBLAS fp16", "torch._int_mm", "W4A8 per channel", "speedup", "W4A8 g128", "speedup"],
              body)


def scale() -> str:
    """scale.json (bench/scale.py on the GPU): its own table."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _scale_report
    return _scale_report.table(load("scale")["rows"])


TABLES = {"accuracy": accuracy, "compile_time": compile_time, "qserve_accuracy": qserve_accuracy,
          "gpu_w4a16": gpu_w4a16, "gpu_w4a8": gpu_w4a8, "scale": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail unless README.md holds every table as rendered")
    args = ap.parse_args()
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, fn in TABLES.items():
        table = fn()
        if args.check:
            if table not in readme:
                missing.append(name)
        else:
            print(f"<!-- {name} -->\n{table}\n")
    if missing:
        sys.exit(f"README.md does not hold the table(s) rendered from bench/results: {', '.join(missing)}")
    if args.check:
        print(f"README.md holds all {len(TABLES)} tables of bench/results")


if __name__ == "__main__":
    main()
