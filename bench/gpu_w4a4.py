"""W4A4 GPU benchmark (Nunchaku INT4 layout, csrc/w4a4): the Hopper wgmma GEMM with its fused low-rank branch and bias
against torch bf16 (cuBLAS) on the same layer, on the FLUX.1 linear shapes.

    PYTHONPATH=. python bench/gpu_w4a4.py [--quick] [--ms 256,1024] [--mma] [--dtype bf16|fp16] [--only 'tc|k3']

(N, K) in {(3072, 3072), (12288, 3072), (3072, 12288), (9216, 3072)}, M in {256, 1024, 4096, 4608}, rank 32. Per row:
  - cublas: torch.nn.functional.linear(x, W, bias) in the 16-bit dtype; cublas_lr: that plus the unfused low-rank
    branch y += (x @ L1^T) @ L2^T (the layer dcc's kernel replaces);
  - gemm: dcc's GEMM alone (4-bit codes and scales given), rank 32 with bias; gemm_r0: rank 0 (the low-rank
    epilogue's share = 1 - gemm_r0 / gemm); quant: the activation kernel alone (smoothing, codes, fp32 scales,
    lora_act); e2e: quant + gemm; gemm_fp8 / gemm_fp8_r0 / e2e_fp8: the same on the e4m3-operand variant (path
    "wgmma_fp8", same bits); gemm_cvt1: the s8 GEMM with DCC_W4A4_WGMMA=cvt=1; quant_blocked, e2e_fp8_blocked:
    with DCC_W4A4_LORA_DOWN=blocked (token-blocked low-rank down-projection); gemm_k2, gemm_fp8_k2, gemm_fp8_k2_r0,
    gemm_fp8_k2_mc, gemm_fp8_k1: the second kernel (DCC_W4A4_WGMMA=kernel=2: 128 x 128 tiles, TMA-fed low-rank
    epilogue -- mc: with CTA pairs multicasting the activations, mc=1 --) and the first (kernel=1) forced; the
    default rows (gemm, gemm_fp8, ...) take whichever the dispatch picks; quant_fused: the one-pass activation kernel
    (DCC_W4A4_QUANT=fused); e2e_fp8_k2_fused: both; gemm_fp8_k3: the third kernel (kernel=3: the main loop
    pipelined within each warpgroup, same bits); gemm_fp8_k4: the fourth (kernel=4: four warpgroups of 64 x 64
    quadrants, same bits); gemm_tc / gemm_tc_r0 / e2e_tc: path "wgmma_tc" (the third kernel
    with the low rank on the tensor cores: within 1 ulp of exact, not bit-identical); with --mma, the mma.sync GEMM
    too; --only REGEX times only the rows it names (and cuBLAS);
  - TOPS = 2 M N K / time (the low-rank work not counted), fraction of the H100's dense int8 peak (1979 TOPS),
    speed-ups of gemm and e2e over cublas and cublas_lr.
Timing as bench/gpu_w4a16.py (whose time_calls it uses): a CUDA graph of calls rotating over weight copies (> 200 MB,
so weights come from DRAM), warm-up, median of CUDA-event time per call. Before timing, each shape's wgmma outputs
(both variants) are compared bit for bit with the mma.sync kernel's (csrc/w4a4/DESIGN.md). JSON (bench/_results.py)
to $OUT/gpu_w4a4.json if $OUT is set, else bench/results/gpu_w4a4.json; a markdown table is printed."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402  (bench/_results.py)
from gpu_w4a16 import ROTATE_BYTES, log, time_calls  # noqa: E402

from dcc.runtime.cuda import w4a4_ops as ops  # noqa: E402
from dcc.targets.nunchaku import cuda_numerics as cn  # noqa: E402

SHAPES = ((3072, 3072), (12288, 3072), (3072, 12288), (9216, 3072))
MS = (256, 1024, 4096, 4608)
RANK = 32
INT8_PEAK = 1979.0   # H100 SXM dense int8 tensor TOPS


def make_layer(n: int, k: int, dtype, seed: int) -> dict:
    """One layer on the GPU: dcc's device layout (int8 codes, 16-bit scales and their fp32 group-major copy, smooth,
    lora_down^T, lora_up, bias) and the bf16/fp16 dense weight of the same size for cuBLAS."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    d = {"wcodes": torch.randint(-8, 8, (n, k), device="cuda", generator=gen, dtype=torch.int8),
         "wscales": (torch.rand(n, k // 64, device="cuda", generator=gen) * 0.02 + 1e-3).to(dtype),
         "smooth": (torch.rand(k, device="cuda", generator=gen) * 4 + 0.25).to(dtype),
         "lora_down_t": (torch.randn(k, RANK, device="cuda", generator=gen) * 0.05).to(dtype),
         "lora_up": (torch.randn(n, RANK, device="cuda", generator=gen) * 0.05).to(dtype),
         "bias": (torch.randn(n, device="cuda", generator=gen) * 0.5).to(dtype),
         "w": (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)}
    d["wscales_t"] = ops.wscales_t(d["wscales"])
    d["wcodes_e4m3"] = ops.codes_e4m3(d["wcodes"])
    return d


@contextlib.contextmanager
def env(name: str, value: str):
    """Set an environment variable for the block (the kernels' knobs are read per call), then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def copies_of(n: int, k: int) -> int:
    """Weight copies to rotate over so that a graph's calls read > ROTATE_BYTES (the 16-bit dense weight's size)."""
    return max(1, math.ceil(ROTATE_BYTES / (2 * n * k)))


def check(lay: dict, x: torch.Tensor) -> dict:
    """The wgmma kernel's outputs against the mma.sync kernel's (bit-identical by design)."""
    codes, scales, lora_act, st = ops.quantize(x, lay["smooth"], lay["lora_down_t"], scales_t=True)
    args = (codes, scales, lay["wcodes"], lay["wscales"], lay["bias"], lora_act, lay["lora_up"])
    a = ops.gemm(*args, path="wgmma", ascales_f32t=st, wscales_f32t=lay["wscales_t"])
    f = ops.gemm(*args, path="wgmma_fp8", ascales_f32t=st, wscales_f32t=lay["wscales_t"],
                 wcodes_e4m3=lay["wcodes_e4m3"])
    b = ops.gemm(*args, path="mma")
    with env("DCC_W4A4_WGMMA", "kernel=2"):
        a2 = ops.gemm(*args, path="wgmma", ascales_f32t=st, wscales_f32t=lay["wscales_t"])
        f2 = ops.gemm(*args, path="wgmma_fp8", ascales_f32t=st, wscales_f32t=lay["wscales_t"],
                      wcodes_e4m3=lay["wcodes_e4m3"])

    with env("DCC_W4A4_WGMMA", "kernel=3"):
        f3 = ops.gemm(*args, path="wgmma_fp8", ascales_f32t=st, wscales_f32t=lay["wscales_t"],
                      wcodes_e4m3=lay["wcodes_e4m3"])
    tc = ops.gemm(*args, path="wgmma_tc", ascales_f32t=st, wscales_f32t=lay["wscales_t"],
                  wcodes_e4m3=lay["wcodes_e4m3"], lora_up_f32=ops.cached_lora_up_f32(lay["lora_up"]))

    def same(x):
        return int((x.view(torch.int16) == b.view(torch.int16)).sum())
    equal, equal8, equal_k2, equal_k3 = same(a), same(f), min(same(a2), same(f2)), same(f3)
    # wgmma_tc is not bit-identical (the low rank on the tensor cores): how far it is from the bit-exact result,
    # relative to the largest output (an ulp count says little where an output is far smaller than its terms)
    tc_rel = cn.relative_error(tc, b.double())["max"]
    return {"bit_equal": equal == a.numel(), "equal": equal, "n": a.numel(), "fp8_bit_equal": equal8 == a.numel(),
            "fp8_equal": equal8, "k2_bit_equal": equal_k2 == a.numel(), "k2_equal": equal_k2,
            "k3_bit_equal": equal_k3 == a.numel(), "tc_equal": same(tc), "tc_rel_diff": tc_rel}


def bench_shape(n: int, k: int, ms, dtype, with_mma: bool, reps: int, only=None) -> list[dict]:
    copies = copies_of(n, k)
    lays = [make_layer(n, k, dtype, seed=1000 * n + k + i) for i in range(copies)]
    rows = []
    for m in ms:
        gen = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
        chk = check(lays[0], x)
        log(f"N={n} K={k} M={m}: wgmma vs mma.sync bit-equal {chk['bit_equal']} ({chk['equal']}/{chk['n']}), "
            f"fp8 {chk['fp8_bit_equal']} ({chk['fp8_equal']}), "
            f"tile {ops.ext().gemm_wgmma_tile(m, n)}, {copies} weight copies")
        codes, scales, lora_act, st = ops.quantize(x, lays[0]["smooth"], lays[0]["lora_down_t"], scales_t=True)
        codes8 = ops.codes_e4m3(codes)
        out = torch.empty(m, n, device="cuda", dtype=dtype)

        def gemm_call(lay, rank=RANK, path="wgmma"):
            la, up = (lora_act, lay["lora_up"]) if rank else (None, None)
            fp8 = path in ("wgmma_fp8", "wgmma_tc")
            up32 = ops.cached_lora_up_f32(up) if path == "wgmma_tc" and up is not None else None
            return lambda: ops.gemm(codes8 if fp8 else codes, scales, lay["wcodes"], lay["wscales"], lay["bias"], la,
                                    up, out=out, path=path, ascales_f32t=st, wscales_f32t=lay["wscales_t"],
                                    wcodes_e4m3=lay["wcodes_e4m3"] if fp8 else None, lora_up_f32=up32)

        def quant_call(lay):
            return lambda: ops.quantize(x, lay["smooth"], lay["lora_down_t"], scales_t=True)

        def e2e_call(lay, path="wgmma"):
            fp8 = path in ("wgmma_fp8", "wgmma_tc")
            up32 = ops.cached_lora_up_f32(lay["lora_up"]) if path == "wgmma_tc" else None

            def f():
                c, s, la, t = ops.quantize(x, lay["smooth"], lay["lora_down_t"], scales_t=True, fp8_codes=fp8)
                ops.gemm(c, s, lay["wcodes"], lay["wscales"], lay["bias"], la, lay["lora_up"], out=out, path=path,
                         ascales_f32t=t, wscales_f32t=lay["wscales_t"], wcodes_e4m3=lay["wcodes_e4m3"] if fp8 else None,
                         lora_up_f32=up32)
            return f

        def cublas_call(lay, lowrank):
            l1 = lay["lora_down_t"].t().contiguous()   # [R, K]
            def f():
                y = torch.nn.functional.linear(x, lay["w"], lay["bias"])
                if lowrank:
                    y += (x @ l1.t()) @ lay["lora_up"].t()
                return y
            return f

        t = {}

        def tm(name, calls):   # time one row unless --only leaves it out (cuBLAS always runs: the baseline)
            if only is None or name == "cublas" or re.search(only, name):
                t[name] = time_calls(calls, reps)[0]

        tm("cublas", [cublas_call(lay, False) for lay in lays])
        tm("cublas_lr", [cublas_call(lay, True) for lay in lays])
        tm("gemm", [gemm_call(lay) for lay in lays])
        tm("gemm_r0", [gemm_call(lay, rank=0) for lay in lays])
        tm("quant", [quant_call(lay) for lay in lays])
        tm("e2e", [e2e_call(lay) for lay in lays])
        tm("gemm_fp8", [gemm_call(lay, path="wgmma_fp8") for lay in lays])
        tm("gemm_fp8_r0", [gemm_call(lay, rank=0, path="wgmma_fp8") for lay in lays])
        tm("e2e_fp8", [e2e_call(lay, "wgmma_fp8") for lay in lays])
        # the third kernel: bit-exact (kernel=3) and with the low rank on the tensor cores (path wgmma_tc)
        tm("gemm_tc", [gemm_call(lay, path="wgmma_tc") for lay in lays])
        tm("gemm_tc_r0", [gemm_call(lay, rank=0, path="wgmma_tc") for lay in lays])
        tm("e2e_tc", [e2e_call(lay, "wgmma_tc") for lay in lays])
        # the s8 kernel with the other int -> float conversion (integer add + fp32 subtraction instead of I2F), and
        # the token-blocked low-rank down-projection in the activation kernel (knobs read when a launch is captured)
        knob = os.environ.get("DCC_W4A4_WGMMA")
        with env("DCC_W4A4_WGMMA", "kernel=3" + ("," + knob if knob else "")):
            tm("gemm_fp8_k3", [gemm_call(lay, path="wgmma_fp8") for lay in lays])
        with env("DCC_W4A4_WGMMA", "kernel=4" + ("," + knob if knob else "")):
            tm("gemm_fp8_k4", [gemm_call(lay, path="wgmma_fp8") for lay in lays])
        with env("DCC_W4A4_WGMMA", "cvt=1" + ("," + knob if knob else "")):
            tm("gemm_cvt1", [gemm_call(lay) for lay in lays])
        # the second GEMM kernel (128 x 128 CTA tiles, TMA-fed low-rank epilogue; the default where its tiles fill
        # the SMs) and the fused activation kernel (the default from M = 16 x SMs): forced, alone and together
        with env("DCC_W4A4_WGMMA", "kernel=2" + ("," + knob if knob else "")):
            tm("gemm_k2", [gemm_call(lay) for lay in lays])
            tm("gemm_fp8_k2", [gemm_call(lay, path="wgmma_fp8") for lay in lays])
            tm("gemm_fp8_k2_r0", [gemm_call(lay, rank=0, path="wgmma_fp8") for lay in lays])
            with env("DCC_W4A4_QUANT", "fused"):
                tm("quant_fused", [quant_call(lay) for lay in lays])
                tm("e2e_fp8_k2_fused", [e2e_call(lay, "wgmma_fp8") for lay in lays])
        if n % 256 == 0:   # CTA pairs multicasting the activations (opt-in: slower on the first H100 run)
            with env("DCC_W4A4_WGMMA", "kernel=2,mc=1" + ("," + knob if knob else "")):
                tm("gemm_fp8_k2_mc", [gemm_call(lay, path="wgmma_fp8") for lay in lays])
        with env("DCC_W4A4_WGMMA", "kernel=1" + ("," + knob if knob else "")):
            tm("gemm_fp8_k1", [gemm_call(lay, path="wgmma_fp8") for lay in lays])
        with env("DCC_W4A4_QUANT", "old"):   # the two-pass activation kernel (the default below M = 16 x SMs)
            tm("quant_old", [quant_call(lay) for lay in lays])
        with env("DCC_W4A4_LORA_DOWN", "blocked"):
            tm("quant_blocked", [quant_call(lay) for lay in lays])
            tm("e2e_fp8_blocked", [e2e_call(lay, "wgmma_fp8") for lay in lays])
        if with_mma:
            tm("mma", [gemm_call(lay, path="mma") for lay in lays])
        ops_count = 2.0 * m * n * k

        def tops_of(key):
            return round(ops_count / (t[key] * 1e-6) / 1e12, 1) if key in t else None

        def ratio(a, b):
            return round(t[a] / t[b], 2) if a in t and b in t else None

        def share(r0, full):
            return round(1 - t[r0] / t[full], 3) if r0 in t and full in t else None
        tops = tops_of("gemm")
        row = {"N": n, "K": k, "M": m, "rank": RANK, "dtype": str(dtype).replace("torch.", ""),
               **{f"{key}_us": round(v, 2) for key, v in t.items()},
               "gemm_tops": tops, "gemm_peak_frac": round(tops / INT8_PEAK, 3) if tops else None,
               "e2e_tops": tops_of("e2e"),
               "speedup_gemm_vs_cublas": ratio("cublas", "gemm"),
               "speedup_gemm_vs_cublas_lr": ratio("cublas_lr", "gemm"),
               "speedup_e2e_vs_cublas_lr": ratio("cublas_lr", "e2e"),
               "lowrank_share": share("gemm_r0", "gemm"),
               "fp8_tops": tops_of("gemm_fp8"),
               "speedup_fp8_vs_cublas": ratio("cublas", "gemm_fp8"),
               "speedup_e2e_fp8_vs_cublas_lr": ratio("cublas_lr", "e2e_fp8"),
               "fp8_lowrank_share": share("gemm_fp8_r0", "gemm_fp8"),
               "tile": ops.ext().gemm_wgmma_tile(m, n),
               "k2_fp8_tops": tops_of("gemm_fp8_k2"),
               "speedup_k2_fp8_vs_cublas": ratio("cublas", "gemm_fp8_k2"),
               "k2_fp8_lowrank_share": share("gemm_fp8_k2_r0", "gemm_fp8_k2"),
               "speedup_e2e_k2_fused_vs_cublas_lr": ratio("cublas_lr", "e2e_fp8_k2_fused"),
               "k3_fp8_tops": tops_of("gemm_fp8_k3"), "speedup_k3_fp8_vs_cublas": ratio("cublas", "gemm_fp8_k3"),
               "tc_tops": tops_of("gemm_tc"), "tc_peak_frac": round(tops_of("gemm_tc") / INT8_PEAK, 3)
               if "gemm_tc" in t else None,
               "speedup_tc_vs_cublas": ratio("cublas", "gemm_tc"),
               "tc_lowrank_share": share("gemm_tc_r0", "gemm_tc"),
               "speedup_e2e_tc_vs_cublas_lr": ratio("cublas_lr", "e2e_tc"), **chk}
        log("  " + ", ".join(f"{key} {v:.1f} us" for key, v in t.items()) +
            f" | TOPS: default {tops}, wgmma_tc {row['tc_tops']}; x cuBLAS: default {row['speedup_gemm_vs_cublas']}, "
            f"wgmma_tc {row['speedup_tc_vs_cublas']}; low-rank share (wgmma_tc) {row['tc_lowrank_share']}")
        rows.append(row)
    del lays
    torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    cols = (("N x K", lambda r: f"{r['N']}x{r['K']}"), ("M", "M"), ("cuBLAS", "cublas_us"),
            ("cuBLAS + LR", "cublas_lr_us"), ("default GEMM (r32)", "gemm_us"), ("x cuBLAS", "speedup_gemm_vs_cublas"),
            ("fp8 k2", "gemm_fp8_k2_us"), ("fp8 k3", "gemm_fp8_k3_us"), ("fp8 k4", "gemm_fp8_k4_us"),
            ("wgmma_tc", "gemm_tc_us"), ("TOPS", "tc_tops"), ("of peak", "tc_peak_frac"),
            ("x cuBLAS", "speedup_tc_vs_cublas"), ("LR share", "tc_lowrank_share"), ("quant", "quant_us"),
            ("e2e tc", "e2e_tc_us"), ("e2e tc x cuBLAS+LR", "speedup_e2e_tc_vs_cublas_lr"),
            ("bit-equal s8 / fp8 / k3", lambda r: f"{r['bit_equal']} / {r['fp8_bit_equal']} / {r['k3_bit_equal']}"),
            ("tc vs bit-exact (rel.)", lambda r: f"{r['tc_rel_diff']:.1e}"))

    def cell(r, key):
        v = key(r) if callable(key) else r.get(key)
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c[1]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def goals(rows) -> list[str]:
    out = []
    for r in rows:
        want = 1.5 if r["M"] >= 1024 else 1.0
        for name, sp, lr in (("default", "speedup_gemm_vs_cublas", "lowrank_share"),
                             ("fp8", "speedup_fp8_vs_cublas", "fp8_lowrank_share"),
                             ("fp8 kernel 2", "speedup_k2_fp8_vs_cublas", "k2_fp8_lowrank_share"),
                             ("wgmma_tc", "speedup_tc_vs_cublas", "tc_lowrank_share")):
            if r.get(sp) is None or r.get(lr) is None:
                continue
            ok = r[sp] >= want and r[lr] < 0.10
            out.append(f"{r['N']}x{r['K']} M={r['M']} {name}: x{r[sp]} cuBLAS (goal >= {want}), low rank "
                       f"{r[lr]:.1%} (goal < 10%): {'met' if ok else 'NOT met'}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape (3072x3072), M = 256 and 4096")
    ap.add_argument("--ms", default="", help="comma-separated M values (default: 256,1024,4096,4608)")
    ap.add_argument("--mma", action="store_true", help="also time the mma.sync GEMM")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default=None, help="regex over the timed rows' names (cuBLAS always runs), e.g. 'tc|k3'")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else ((256, 4096) if args.quick else MS)
    if not ops.wgmma_supported(max(ms), shapes[0][0], shapes[0][1]):
        sys.exit("the wgmma W4A4 kernel does not run here (needs an sm_90 GPU and the sm_90a build)")
    props = torch.cuda.get_device_properties(0)
    log(f"{props.name}, {props.multi_processor_count} SMs; DCC_W4A4_WGMMA={os.environ.get('DCC_W4A4_WGMMA', '')!r}")
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, ms, dtype, args.mma, args.reps, args.only)
    out = os.path.join(os.environ["OUT"], "gpu_w4a4.json") if os.environ.get("OUT") else None
    path = _results.write("gpu_w4a4", rows, out=out, device=props.name, torch=torch.__version__,
                          knob=os.environ.get("DCC_W4A4_WGMMA", ""), int8_peak_tops=INT8_PEAK)
    log("\n" + table(rows))
    log("\n" + "\n".join(goals(rows)))
    log(f"\nwrote {path}")


if __name__ == "__main__":
    main()
