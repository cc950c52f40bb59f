"""W4A16 GPU benchmark: builds the CUDA runtime, checks it, and times it against cuBLAS fp16 (torch x @ w.T).

    PYTHONPATH=. python bench/gpu_w4a16.py [--quick] [--ms 1,4] [--shapes 28672x4096] [--variants] [--smoke]
        [--wgmma-cfg 'gsplit=1;rot=1']

Shapes: M in {1, 4, 16, 32, 64, 128, 256, 1024, 4096} x (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)}
(--shapes: others, such as the fast decoder's fused gate_up and qkv), group 128, fp16. Timing: each measurement
captures one CUDA graph of R calls that rotate over R copies of the weights (R chosen so the copies exceed the L2
several times: every call reads its weights from DRAM), replays it with warm-up, and takes the median over
repetitions of (CUDA-event time / R). Reports microseconds, GB/s of the bytes the call must move (qweight + scales +
zeros + activations + output; fp16 weights for cuBLAS), TFLOP/s, the speedup over cuBLAS, and the floors: bytes at
the measured copy bandwidth and flops at the measured cuBLAS peak. --variants also times the benchmark-only GEMV
variants of dev/cuda/w4a16 (module dcc_w4a16_dev, built on first use). JSON (bench/_results.py:
commit, machine, date, command, rows) goes to $OUT/gpu_w4a16.json if $OUT is set, else bench/results/gpu_w4a16.json."""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcc.runtime import cuda as rt  # noqa: E402
from dcc.targets.common.awq_layout import decode_weight, pack_qweight, pack_scales  # noqa: E402

import _results  # noqa: E402  (bench/_results.py)

MS = (1, 4, 16, 32, 64, 128, 256, 1024, 4096)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
G = 128
ROTATE_BYTES = 200 << 20  # > 3x the H100's 50 MB L2


def log(*a):
    print(*a, flush=True)


def make_layer(n, k, g, dtype=torch.float16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
    ng = k // g
    scale = (0.002 + 0.02 * torch.rand(n, ng, device="cuda", generator=gen, dtype=torch.float64)).to(dtype)
    zero = torch.randint(0, 16, (n, ng), device="cuda", generator=gen)
    qw = pack_qweight(codes)
    s, sz = pack_scales(scale, zero, g, dtype)
    return qw, s, sz


def time_calls(calls, reps, warmup=3):
    """Median per-call microseconds of the list of calls (run back to back), via a CUDA graph when capturable."""
    for c in calls:  # warm-up outside the graph: module load, cuBLAS handle and heuristics, allocator
        c()
    torch.cuda.synchronize()
    method = "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 - fall back to eager launches, and say so
        log(f"  (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}; timing eagerly)")
        torch.cuda.synchronize()
        method = "eager"

        def run():
            for c in calls:
                c()
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return statistics.median(times), min(times), method


def ceilings():
    n = 512 << 20  # 1 GiB copy
    src = torch.empty(n, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    t, _, _ = time_calls([lambda: dst.copy_(src)], reps=10)
    copy_tbs = 2 * src.numel() * 2 / (t * 1e-6) / 1e12
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t, _, _ = time_calls([lambda: a @ b], reps=10)
    tflops = 2 * 8192 ** 3 / (t * 1e-6) / 1e12
    return copy_tbs, tflops


def dev_module(family):
    """The benchmark-only kernels of dev/cuda/<family> (dcc_<family>_dev), built on first use."""
    sys.path.insert(0, str(ROOT / "dev" / "cuda"))
    import dev_ext
    return dev_ext.load(family, verbose=True)


def correctness(ext_sizes):
    rows = []
    for (m, n, k, path) in ext_sizes:
        qw, s, sz = make_layer(n, k, G, seed=m + n + k)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        y = rt.w4a16_linear(x, qw, s, sz, G, path=path, out=out)
        w = decode_weight(qw, s, sz, G, k)
        ref = x.double() @ w.double().t()
        err = float((y.double() - ref).norm() / ref.norm())
        finite = bool(torch.isfinite(y).all())
        exact = bool(torch.equal(rt.dequantize(qw, s, sz, G, k).view(torch.int16), w.view(torch.int16)))
        ok = finite and err < 2e-3 and exact
        rows.append({"M": m, "N": n, "K": k, "path": path, "rel_err": err, "all_written": finite,
                     "dequant_bit_exact": exact, "ok": ok})
        log(f"  check M={m:<5} N={n:<6} K={k:<6} {path:5}: rel err {err:.2e}, all written {finite}, "
            f"dequant bit-exact {exact} -> {'ok' if ok else 'FAIL'}")
    return rows


def bench(args, copy_tbs, peak_tflops):
    dev = dev_module("w4a16") if args.variants else None
    results = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes.split(","))
    ms = (1, 16, 4096) if args.quick else MS
    if args.ms:
        ms = tuple(int(v) for v in args.ms.split(","))
    # two phases: every shape's small-M (memory-bound) rows first, then the large-M GEMMs. Timed right after
    # seconds of M = 4096 GEMMs, every kernel ran 10-20% slower for a while (clocks; cuBLAS 2-4%), which made the
    # M = 1 row of the next shape depend on the order of the table (csrc/w4a16/DESIGN.md)
    phases = [tuple(m for m in ms if m <= 16), tuple(m for m in ms if m > 16)]
    for (n, k), phase_ms in [(shape, p) for p in phases if p for shape in shapes]:
        qw, s, sz = make_layer(n, k, G, seed=n * 7 + k)
        qbytes = qw.numel() * 2 + s.numel() * 2 + sz.numel() * 2
        r_q = max(2, math.ceil(ROTATE_BYTES / qbytes))
        qsets = [(qw, s, sz)] + [(qw.clone(), s.clone(), sz.clone()) for _ in range(r_q - 1)]
        wbytes = n * k * 2
        r_w = max(2, math.ceil(ROTATE_BYTES / wbytes))
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(r_w)]
        for m in phase_ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            act = m * k * 2 + m * n * 2
            flops = 2 * m * n * k
            reps = 20 if m <= 256 else 8
            t_cublas, _, meth_c = time_calls([lambda w=w: x @ w.t() for w in w16], reps)
            paths = ["auto"]
            if m in (16, 64, 256, 1024):
                paths += ["fused", "gemm"]
            if m > 1 and rt.load().gemm_wgmma_supported(m, n, k, G):
                paths += ["wgmma"] + [f"wgmma@{c}" for c in args.wgmma_cfg.split(";") if c]
            if m in (256, 4096):
                paths += ["gemm_ext"]
            if dev is not None and m in (1, 4, 16):
                names = dev.gemv_variant_names()
                pat = re.compile(args.vfilter) if args.vfilter else None
                paths += [f"v{v}" for v in range(len(names))
                          if dev.gemv_variant_max_m(v) >= m and (m < 16 or dev.gemv_variant_max_m(v) == 16)
                          and (pat is None or pat.search(names[v]))]
            if m == 1:
                paths += ["dequant"]
            floor_bytes_us = (qbytes + act) / (copy_tbs * 1e12) * 1e6
            floor_flops_us = flops / (peak_tflops * 1e12) * 1e6
            for path in paths:
                if path.startswith("v"):
                    v = int(path[1:])
                    outv = torch.empty(m, n, device="cuda", dtype=torch.float16)

                    def call(q, v=v, outv=outv):
                        dev.gemv_variant(v, x.data_ptr(), q[0].data_ptr(), q[1].data_ptr(), q[2].data_ptr(), 0,
                                         outv.data_ptr(), m, n, k, G, "float16",
                                         torch.cuda.current_stream().cuda_stream)
                    calls = [lambda q=q, call=call: call(q) for q in qsets]
                    label = f"dev:{dev.gemv_variant_names()[v]}"
                elif path == "dequant":
                    calls = [lambda q=q: rt.dequantize(q[0], q[1], q[2], G, k) for q in qsets]
                    label = "dequant only"
                else:
                    calls = [lambda q=q, p=path.split("@")[0]: rt.w4a16_linear(x, q[0], q[1], q[2], G, path=p)
                             for q in qsets]
                    label = path if path != "auto" else f"auto:{auto_path(m, n, k)}"
                # wgmma@CFG: the launch configuration is read when a call is made (and frozen in the timing graph)
                saved = os.environ.get("DCC_W4A16_WGMMA_CFG")
                if "@" in path:
                    os.environ["DCC_W4A16_WGMMA_CFG"] = path.split("@", 1)[1]
                try:
                    t, tmin, meth = time_calls(calls, reps)
                except ValueError as e:  # a shape-restricted variant
                    log(f"  {n:>5}x{k:<5} M={m:<5} {label:18} skipped: {str(e).splitlines()[0][:90]}")
                    continue
                finally:
                    if "@" in path:
                        os.environ.pop("DCC_W4A16_WGMMA_CFG", None)
                        if saved is not None:
                            os.environ["DCC_W4A16_WGMMA_CFG"] = saved
                nbytes = qbytes + n * k * 2 if path == "dequant" else qbytes + act
                row = {"N": n, "K": k, "M": m, "path": label, "us": round(t, 2), "us_min": round(tmin, 2),
                       "cublas_us": round(t_cublas, 2), "speedup_vs_cublas": round(t_cublas / t, 3),
                       "GBps": round(nbytes / (t * 1e-6) / 1e9, 1),
                       "TFLOPs": round(flops / (t * 1e-6) / 1e12, 2) if path != "dequant" else None,
                       "cublas_GBps": round((wbytes + act) / (t_cublas * 1e-6) / 1e9, 1),
                       "cublas_TFLOPs": round(flops / (t_cublas * 1e-6) / 1e12, 2),
                       "floor_bytes_us": round(floor_bytes_us, 2), "floor_flops_us": round(floor_flops_us, 2),
                       "rotation": len(calls), "timing": meth if meth == meth_c else f"{meth}/{meth_c}"}
                results.append(row)
                log(f"  {n:>5}x{k:<5} M={m:<5} {label:18} {t:9.2f} us  cuBLAS {t_cublas:9.2f} us  "
                    f"x{t_cublas / t:5.2f}  {row['GBps']:7.0f} GB/s  "
                    f"{(row['TFLOPs'] or 0):6.1f} TF  floor {max(floor_bytes_us, floor_flops_us):7.2f} us")
        del qsets, w16
        torch.cuda.empty_cache()
    return results


def auto_path(m, n, k):
    """The path w4a16_linear's "auto" takes (dcc/runtime/cuda/ops.py)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return rt.ops.choose_path(m, n, sms, rt.load().gemm_wgmma_supported(m, n, k, G))


def table(results):
    lines = ["| N x K | M | path | us | cuBLAS fp16 us | speedup | GB/s | TFLOP/s | bytes floor us | flops floor us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['path']} | {r['us']} | {r['cublas_us']} | "
                     f"{r['speedup_vs_cublas']} | {r['GBps']} | {r['TFLOPs'] if r['TFLOPs'] is not None else '-'} | "
                     f"{r['floor_bytes_us']} | {r['floor_flops_us']} |")
    return "\n".join(lines)


def goals(results):
    out = []
    for (n, k) in SHAPES:
        for m, want, rule in ((1, 3.0, ">= 3x faster than cuBLAS"), (4096, 1 / 1.3, "within 1.3x of cuBLAS")):
            r = [x for x in results if x["N"] == n and x["K"] == k and x["M"] == m and x["path"].startswith("auto")]
            if r:
                sp = r[0]["speedup_vs_cublas"]
                out.append({"shape": f"{n}x{k}", "M": m, "goal": rule, "speedup": sp, "met": sp >= want})
        for m in (16, 32, 64, 128, 256):   # issue 29: W4A16 at M = 16-256 at least as fast as cuBLAS fp16
            r = [x for x in results if x["N"] == n and x["K"] == k and x["M"] == m and x["path"].startswith("auto")]
            if r:
                sp = r[0]["speedup_vs_cublas"]
                out.append({"shape": f"{n}x{k}", "M": m, "goal": ">= cuBLAS fp16", "speedup": sp, "met": sp >= 1.0})
    return out


def smoke(variants=False):
    """Small odd shapes through every kernel instantiation (for compute-sanitizer: bounds and initialisation); with
    variants, the benchmark-only ones of dev/cuda/w4a16 too."""
    ext = rt.load()
    dev = dev_module("w4a16") if variants else None
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        # the last two shapes fit the lean (l_*) and persistent (lp*, default for M <= 8 there) kernels: 512 row tiles,
        # and 364 (100 past an H100's 264 resident blocks: the tail split of the dev variant v8)
        for (m, n, k, g) in ((3, 20, 192, 64), (9, 36, 320, 32), (70, 52, 128, 128), (5, 8192, 256, 64),
                             (3, 5824, 1024, 128)):
            qw, s, sz = make_layer(n, k, g, dtype, seed=m)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(n, device="cuda", dtype=dtype)
            out = torch.empty(m, n, device="cuda", dtype=dtype)
            st = torch.cuda.current_stream().cuda_stream
            for mt in (1, 2, 4, 8):
                ext.gemv(x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), b.data_ptr(), out.data_ptr(),
                         m, n, k, g, name, mt, st)
            for v in range(len(dev.gemv_variant_names()) if dev is not None else 0):
                try:
                    dev.gemv_variant(v, x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), 0, out.data_ptr(),
                                     min(m, dev.gemv_variant_max_m(v)), n, k, g, name, st)
                except ValueError as e:  # shape-restricted variants
                    if "does not fit" not in str(e):
                        raise
            rt.w4a16_linear(x, qw, s, sz, g, b, path="gemm")
            rt.w4a16_linear(x, qw, s, sz, g, b, path="gemm_ext")
            rt.dequantize(qw, s, sz, g, k)
            if ext.gemm_wgmma_supported(m, 256, 256, g):   # its own shape rule: N % 128 == 0
                x2 = torch.randn(m, 256, device="cuda", dtype=dtype)
                qw2, s2, sz2 = make_layer(256, 256, g, dtype, seed=m + 1)
                rt.w4a16_linear(x2, qw2, s2, sz2, g, b[:256] if n >= 256 else None, path="wgmma")
    torch.cuda.synchronize()
    log("smoke: all kernels ran")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, three M")
    ap.add_argument("--variants", action="store_true",
                    help="also time the benchmark-only GEMV variants (dev/cuda/w4a16) at M = 1, 4, 16")
    ap.add_argument("--ms", default="", help="comma-separated M values to time (default: all)")
    ap.add_argument("--shapes", default="",
                    help="comma-separated NxK weight shapes to time instead of the three Llama-3-8B layers, e.g. the "
                         "fast decoder's fused ones: 28672x4096 (gate_up), 6144x4096 (qkv)")
    ap.add_argument("--wgmma-cfg", default="",
                    help="';'-separated DCC_W4A16_WGMMA_CFG values to time the wgmma GEMM under too, each as a row "
                         "wgmma@CFG, e.g. 'gsplit=1;gsplit=1,rot=1' (csrc/w4a16/gemm_wgmma.cu)")
    ap.add_argument("--vfilter", default="", help="with --variants: only the variants whose name matches this regex")
    ap.add_argument("--smoke", action="store_true",
                    help="only run every kernel once on small odd shapes (with --variants: the dev kernels too)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_w4a16.py needs a CUDA GPU")
    if args.smoke:
        return smoke(args.variants)
    t0 = time.time()
    rt.load(verbose=True)
    log(f"built/loaded the extension in {time.time() - t0:.1f} s; FUSED_MAX_M = {rt.FUSED_MAX_M}")
    props = torch.cuda.get_device_properties(0)
    log(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    copy_tbs, peak = ceilings()
    log(f"ceilings: device copy {copy_tbs:.2f} TB/s (read + write), cuBLAS fp16 8192^3 {peak:.0f} TFLOP/s")
    checks = correctness([(1, 4096, 4096, "fused"), (7, 4096, 14336, "fused"), (16, 14336, 4096, "fused"),
                          (64, 4096, 4096, "fused"), (300, 4096, 4096, "gemm"), (33, 14336, 4096, "gemm")]
                         + ([(64, 4096, 4096, "wgmma"), (200, 14336, 4096, "wgmma"), (48, 4096, 14336, "wgmma")]
                            if rt.load().gemm_wgmma_supported(64, 4096, 4096, G) else []))
    results = bench(args, copy_tbs, peak)
    out = Path(os.environ["OUT"]) / "gpu_w4a16.json" if os.environ.get("OUT") else None
    path = _results.write("gpu_w4a16", results, out=out, device=props.name, torch=torch.__version__,
                          copy_TBps=copy_tbs, cublas_peak_TFLOPs=peak, fused_max_m=rt.FUSED_MAX_M, checks=checks,
                          goals=goals(results))
    log("\n" + table(results))
    for gl in goals(results):
        log(f"goal {gl['shape']} M={gl['M']} {gl['goal']}: x{gl['speedup']} -> {'met' if gl['met'] else 'MISSED'}")
    log(f"wrote {path}; total {time.time() - t0:.0f} s")
    if not all(c["ok"] for c in checks):
        sys.exit("correctness check FAILED")


if __name__ == "__main__":
    main()
