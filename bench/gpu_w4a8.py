"""W4A8 GPU benchmark (QServe layout): builds csrc/w4a8, checks it against QServe's epilogue order, and times it against
torch fp16 matmul (cuBLAS) and torch._int_mm (int8 x int8 -> int32, cuBLAS).

    PYTHONPATH=. python bench/gpu_w4a8.py [--quick] [--ms 1,16] [--kernels] [--sweep]

M in {1, 16, 128, 1024, 4096} x (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)}; dcc per channel and g128,
each as the GEMM alone (int8 activations given), the activation quantization alone, and both ("e2e"). Timing as
bench/gpu_w4a16.py (whose helpers it imports): a CUDA graph of R calls rotating over R weight copies (> 200 MB, so
weights come from DRAM), median over repetitions of event time / R; every shape's M <= 16 rows run before the large-M
rows (csrc/w4a16/DESIGN.md: clocks drop for a while after seconds of large GEMMs). TOPS = 2*M*N*K / time. --sweep
first times the split-K block shapes and the stream-K kernel of dev/cuda/w4a8 (module dcc_w4a8_dev, built on first
use). JSON (bench/_results.py: commit, machine, date, command, rows) goes to $OUT/gpu_w4a8.json if $OUT is set, else
bench/results/gpu_w4a8.json."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402  (bench/_results.py)
from gpu_w4a16 import ROTATE_BYTES, ceilings, dev_module, log, time_calls  # noqa: E402

from dcc.runtime.cuda import w4a8_ops as ops  # noqa: E402
from dcc.targets.qserve.layout import pack_qweight, pack_s2  # noqa: E402

MS = (1, 16, 128, 1024, 4096)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
G = 128


def make_layers(n: int, k: int, seed: int) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """Per-channel and g128 QServe tensors on the GPU sharing one qweight, plus the integer weights (int8 [N, K]
    on the GPU: codes, and w8 for g128) for the exact reference. s2 and z2 respect QServe's progressive bounds."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int16)
    qw = pack_qweight(codes).cuda()
    s1 = (0.0005 + 0.01 * torch.rand(n, generator=gen, dtype=torch.float64)).to(torch.float16)
    z = torch.randint(0, 16, (n,), generator=gen)
    pc = {"qweight": qw, "s1_scales": s1.cuda(), "s1_szeros": (z * s1.double()).to(torch.float16).cuda(),
          "s2_scales": None, "s2_zeros": None}
    ng = k // G
    s2 = torch.randint(1, 17, (n, ng), generator=gen)
    lo, hi = (15 - 127 // s2).clamp(min=0), (128 // s2).clamp(max=15)
    z2 = lo + (torch.rand(n, ng, generator=gen) * (hi - lo + 1)).floor().long().clamp(max=hi - lo)
    g = {"qweight": qw, "s1_scales": s1.cuda(), "s1_szeros": None, "s2_scales": pack_s2(s2).cuda(),
         "s2_zeros": pack_s2(-z2 * s2).cuda()}
    codes = codes.cuda()
    w8 = (codes.view(n, ng, G).int() - z2.cuda().view(n, ng, 1).int()) * s2.cuda().view(n, ng, 1).int()
    return pc, g, codes.to(torch.int8), w8.view(n, k).to(torch.int8)


def layer_bytes(lay: dict) -> int:
    return sum(t.numel() * t.element_size() for t in lay.values() if t is not None)


def _psum(ints: torch.Tensor, xq) -> torch.Tensor:
    out = None
    for k0 in range(0, xq.shape[1], 4096):   # float64 GEMM of integers: exact
        part = xq[:, k0:k0 + 4096].double() @ ints[:, k0:k0 + 4096].double().t()
        out = part if out is None else out + part
    return out


def engine_ref(lay: dict, ints: torch.Tensor, xq, scale, ssum) -> torch.Tensor:
    """The outputs in QServe's epilogue order (dcc.targets.qserve.numerics: fp32 products and fma, then fp16), which
    dcc's kernels reproduce bit for bit."""
    from dcc.targets.qserve import numerics
    psum = _psum(ints, xq)
    if lay["s1_szeros"] is not None:
        return numerics.epilogue_per_channel(psum, lay["s1_scales"].view(1, -1), lay["s1_szeros"].view(1, -1),
                                             scale.view(-1, 1), ssum.view(-1, 1))
    return numerics.epilogue_scaled(psum, lay["s1_scales"].view(1, -1), scale.view(-1, 1))


def exact_ref(lay: dict, ints: torch.Tensor, xq, scale, ssum) -> torch.Tensor:
    """The exact value of the stored codes and scales, rounded once (to double, then fp16): how far the engine's
    order is from it is reported, not checked."""
    out = _psum(ints, xq) * lay["s1_scales"].double() * scale.double().view(-1, 1)
    if lay["s1_szeros"] is not None:
        out = out - lay["s1_szeros"].double() * ssum.double().view(-1, 1)
    return out.to(torch.float16)


def ulps(a, b):
    def ordered(t):
        v = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(v >= 0, v, -(v & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


def gemm_call(lay, xq, scale, ssum, group, path, out):
    return lambda: ops.gemm(xq, scale, ssum, lay["qweight"], lay["s1_scales"], lay["s1_szeros"], lay["s2_scales"],
                            lay["s2_zeros"], group, path=path, out=out)


def paths_for(m, n, k, group, all_kernels):
    e = ops.ext()
    paths = ["auto"]
    if m <= 16 and e.gemm_gemv_available():
        paths += ["gemv"]
    if all_kernels or m <= 16:
        paths += ["splitk", "tile"] if m <= 32 else ["tile"]
    if e.gemm_wgmma_supported(m, n, k, group):
        paths += ["wgmma"]
    return paths


def check(shapes, ms) -> list[dict]:
    rows = []
    for n, k in shapes:
        pc, g128, codes, w8 = make_layers(n, k, seed=n + k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for name, lay, ints, group in (("per-channel", pc, codes, 0), ("g128", g128, w8, G)):
                xq, scale, ssum = ops.quantize_act(x, with_sum=group == 0)
                ref = engine_ref(lay, ints, xq, scale, ssum)
                exact = exact_ref(lay, ints, xq, scale, ssum)
                for path in paths_for(m, n, k, group, True):
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                    gemm_call(lay, xq, scale, ssum, group, path, out)()
                    d = ulps(out, ref)
                    r = {"N": n, "K": k, "M": m, "layout": name, "path": path,
                         "bit_equal": float((d == 0).float().mean()), "max_ulp": int(d.max()),
                         "finite": bool(torch.isfinite(out).all()),
                         "max_ulp_from_exact": int(ulps(out, exact).max())}
                    r["ok"] = r["finite"] and r["max_ulp"] <= 1 and r["bit_equal"] >= 0.999
                    rows.append(r)
                    log(f"  check {n}x{k} M={m:<5} {name:11} {path:6}: bit-equal {r['bit_equal'] * 100:.3f}%, "
                        f"max {r['max_ulp']} ulp -> {'ok' if r['ok'] else 'FAIL'}")
        del pc, g128, codes, w8
    return rows


def int_mm_call(xq, w8t):
    m = xq.shape[0]
    if m > 16:
        return (lambda: torch._int_mm(xq, w8t)), m
    xp = torch.cat([xq, xq.new_zeros(32 - m, xq.shape[1])])   # some torch versions need M > 16: pad to 32 rows
    return (lambda: torch._int_mm(xp, w8t)), 32


def bench(shapes, ms, all_kernels) -> list[dict]:
    results = []
    phases = [tuple(m for m in ms if m <= 16), tuple(m for m in ms if m > 16)]
    for (n, k), phase_ms in [(shape, p) for p in phases if p for shape in shapes]:
        pc, g128, codes, w8 = make_layers(n, k, seed=n * 7 + k)
        sets = {}
        for name, lay in (("per-channel", pc), ("g128", g128)):
            r = max(2, math.ceil(ROTATE_BYTES / layer_bytes(lay)))
            sets[name] = [lay] + [{kk: (None if v is None else v.clone()) for kk, v in lay.items()}
                                  for _ in range(r - 1)]
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
               for _ in range(max(2, math.ceil(ROTATE_BYTES / (n * k * 2))))]
        w8s = [w8.clone() for _ in range(max(2, math.ceil(ROTATE_BYTES / (n * k))))]
        for m in phase_ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            flops = 2 * m * n * k
            reps = 20 if m <= 128 else 8
            t_fp16, _, _ = time_calls([lambda w=w: x @ w.t() for w in w16], reps)
            xq0, _, _ = ops.quantize_act(x)
            t_int = None
            try:
                calls, mpad = [], m
                for w in w8s:
                    c, mpad = int_mm_call(xq0, w.t())
                    calls.append(c)
                t_int, _, _ = time_calls(calls, reps)
            except RuntimeError as e:
                log(f"  _int_mm unavailable at M={m}: {str(e).splitlines()[0][:100]}")
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(4)]
            t_quant, _, _ = time_calls([lambda xx=xx: ops.quantize_act(xx) for xx in xs], reps)
            base = {"N": n, "K": k, "M": m, "cublas_fp16_us": round(t_fp16, 2),
                    "cublas_fp16_TOPS": round(flops / t_fp16 / 1e6, 1), "int_mm_us": None if t_int is None else
                    round(t_int, 2), "int_mm_TOPS": None if t_int is None else round(flops / t_int / 1e6, 1),
                    "int_mm_padded_to": mpad if mpad != m else None, "quant_us": round(t_quant, 2)}
            log(f"  {n}x{k} M={m}: cuBLAS fp16 {t_fp16:.2f} us ({base['cublas_fp16_TOPS']} TOPS), _int_mm "
                f"{'-' if t_int is None else f'{t_int:.2f}'} us, activation quant {t_quant:.2f} us")
            for name, group in (("per-channel", 0), ("g128", G)):
                xq, scale, ssum = ops.quantize_act(x, with_sum=group == 0)
                out = torch.empty(m, n, device="cuda", dtype=torch.float16)
                for path in paths_for(m, n, k, group, all_kernels):
                    t, tmin, meth = time_calls([gemm_call(lay, xq, scale, ssum, group, path, out)
                                                for lay in sets[name]], reps)
                    row = dict(base, layout=name, path=path, us=round(t, 2), us_min=round(tmin, 2),
                               TOPS=round(flops / t / 1e6, 1), vs_cublas_fp16=round(t_fp16 / t, 3),
                               vs_int_mm=None if t_int is None else round(t_int / t, 3),
                               weight_TBps=round(layer_bytes(sets[name][0]) / t / 1e6, 3), timing=meth)
                    if path == "auto":   # quantization + GEMM, as a linear layer runs
                        def e2e(lay, xx):
                            a = ops.quantize_act(xx, with_sum=group == 0)
                            return ops.gemm(*a, lay["qweight"], lay["s1_scales"], lay["s1_szeros"],
                                            lay["s2_scales"], lay["s2_zeros"], group)
                        te, _, _ = time_calls([lambda lay=lay: e2e(lay, x) for lay in sets[name]], reps)
                        row.update(e2e_us=round(te, 2), e2e_vs_cublas_fp16=round(t_fp16 / te, 3))
                    results.append(row)
                    log(f"  {n:>5}x{k:<5} M={m:<5} {name:11} {path:6} {t:9.2f} us {row['TOPS']:7.1f} TOPS  "
                        f"x{row['vs_cublas_fp16']:5.2f} vs fp16  "
                        f"{'-' if t_int is None else 'x%.2f' % row['vs_int_mm']} vs int_mm  "
                        f"{row['weight_TBps']:.2f} TB/s weights"
                        + (f"  e2e {row['e2e_us']:.2f} us (x{row['e2e_vs_cublas_fp16']:.2f})" if 'e2e_us' in row
                           else ""))
        del sets, w16, w8s, pc, g128, codes, w8
        torch.cuda.empty_cache()
    return results


def dev_gemm_call(dev, lay, xq, scale, ssum, code, out, ws):
    """A dev/cuda/w4a8 kernel by code (dcc_w4a8_dev.gemm_dev_kernel), per channel, on the current stream."""
    m, k = xq.shape
    n = lay["qweight"].shape[0]
    nbytes = dev.gemm_dev_kernel_workspace(code, m, n, k, 0)
    return lambda: dev.gemm_dev_kernel(code, xq.data_ptr(), scale.data_ptr(), ssum.data_ptr(),
                                       lay["qweight"].data_ptr(), lay["s1_scales"].data_ptr(),
                                       lay["s1_szeros"].data_ptr(), 0, 0, out.data_ptr(), m, n, k, 0,
                                       ws.data_ptr() if nbytes else 0, nbytes,
                                       torch.cuda.current_stream().cuda_stream)


def sweep(shapes) -> list[dict]:
    """M <= 16, per channel, the benchmark-only kernels of dev/cuda/w4a8: the stream-K kernel's block shapes
    (sk0..sk3 = (warps, tiles in flight) (8, 8), (8, 4), (4, 8), (4, 16)) and the split-K kernel's ((warps, tiles in
    flight): v0 = (8, 4) default, v1 = (8, 8), v2 = (4, 8), v3 = (16, 4), v4 = (16, 8), v5 = (4, 4); v0 and v4 are
    the product's) with S chosen, and forced split counts."""
    dev = dev_module("w4a8")
    codes = [(f"sk{v}", 3 | (v << 4)) for v in range(4)]
    codes += [(f"v{v}", 1 | (v << 4)) for v in range(6)]
    codes += [(f"v{v} S={s}", 1 | (v << 4) | (s << 8)) for v in (0, 4) for s in (1, 2, 4)]
    rows = []
    for n, k in shapes:
        pc, _, _, _ = make_layers(n, k, seed=n * 7 + k)
        r = max(2, math.ceil(ROTATE_BYTES / layer_bytes(pc)))
        lays = [pc] + [{kk: (None if v is None else v.clone()) for kk, v in pc.items()} for _ in range(r - 1)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xq, scale, ssum = ops.quantize_act(x)
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            line = []
            for label, code in codes:
                # zeroed once; stream-K's accumulators overlap the split-K slots, so each kind has its own
                ws = torch.zeros(max(dev.gemm_dev_kernel_workspace(code, m, n, k, 0), 1), dtype=torch.uint8,
                                 device="cuda")
                t, _, _ = time_calls([dev_gemm_call(dev, lay, xq, scale, ssum, code, out, ws) for lay in lays], 15)
                rows.append({"N": n, "K": k, "M": m, "variant": label, "us": round(t, 2),
                             "weight_TBps": round(layer_bytes(pc) / t / 1e6, 3)})
                line.append(f"{label} {t:.2f}")
            log(f"  sweep {n}x{k} M={m}: " + ", ".join(line))
        del lays, pc
        torch.cuda.empty_cache()
    return rows


def table(results) -> str:
    lines = ["| N x K | M | layout | path | us | TOPS | vs cuBLAS fp16 | vs _int_mm | e2e us (quant+GEMM) | "
             "e2e vs fp16 | cuBLAS fp16 us | _int_mm us |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['layout']} | {r['path']} | {r['us']} | {r['TOPS']} | "
                     f"{r['vs_cublas_fp16']} | {r['vs_int_mm']} | {r.get('e2e_us', '-')} | "
                     f"{r.get('e2e_vs_cublas_fp16', '-')} | {r['cublas_fp16_us']} | {r['int_mm_us']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape")
    ap.add_argument("--ms", default="", help="comma-separated M values (default 1,16,128,1024,4096)")
    ap.add_argument("--kernels", action="store_true", help="time every kernel at every M, not only the choice")
    ap.add_argument("--sweep", action="store_true",
                    help="first time the dev/cuda/w4a8 split-K block shapes and stream-K kernel at M = 1, 16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_w4a8.py needs a CUDA GPU")
    t0 = time.time()
    ops.ext()
    props = torch.cuda.get_device_properties(0)
    log(f"built/loaded dcc_w4a8_ext in {time.time() - t0:.1f} s; device {props.name}, {props.multi_processor_count} "
        f"SMs, torch {torch.__version__}; wgmma built: {ops.ext().gemm_wgmma_supported(4096, 4096, 4096, 0)}")
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else MS
    copy_tbs, peak = ceilings()
    log(f"ceilings: device copy {copy_tbs:.2f} TB/s (read + write), cuBLAS fp16 8192^3 {peak:.0f} TFLOP/s")
    checks = check(shapes[:1], (1, 16, 128, 1024))
    swept = sweep(shapes) if args.sweep else []
    results = bench(shapes, ms, args.kernels)
    out = Path(os.environ["OUT"]) / "gpu_w4a8.json" if os.environ.get("OUT") else None
    path = _results.write("gpu_w4a8", results, out=out, device=props.name, torch=torch.__version__,
                          copy_TBps=copy_tbs, cublas_peak_TFLOPs=peak, checks=checks, sweep=swept)
    log("\n" + table(results))
    log(f"wrote {path}; total {time.time() - t0:.0f} s")
    if not all(c["ok"] for c in checks):
        sys.exit("correctness check FAILED")


if __name__ == "__main__":
    main()
