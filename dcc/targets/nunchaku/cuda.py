"""Run a Nunchaku artifact on the GPU: its W4A4 linears (INT4 and NVFP4) execute through dcc's W4A4 kernels
(csrc/w4a4: 4-bit activation codes per group, exact int32 group sums, fp32 group accumulation, bias and low-rank
branch in the epilogue, one rounding to 16 bits); everything else is the CPU reference model moved to the GPU. Layers
the kernels do not take (K not a multiple of 64, lora_scales) run their reference module on the CPU
(CpuReferenceLinear: its helpers allocate on the CPU), said once in the log. Also the per-layer check of the kernels
against their CPU emulation (cuda_numerics.py), bit for bit."""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import cuda_numerics
from .reference import NunchakuLinear

log = logging.getLogger("dcc")

# NVFP4 layers on the kernels (gemm_nvfp4); False sends them to their CPU reference module (CpuReferenceLinear)
NVFP4_KERNEL = True


def kernel_problem(ref: NunchakuLinear) -> str | None:
    """Why the W4A4 kernels cannot run this layer (None: they can)."""
    if ref.precision == "nvfp4" and not NVFP4_KERNEL:
        return "NVFP4 (its kernel is switched off: cuda.NVFP4_KERNEL)"
    if ref.in_features % 64:
        return f"in_features {ref.in_features} is not a multiple of 64"
    if ref.lora_scales:
        return "lora_scales (dcc's artifacts have none)"
    if ref.precision == "int4" and ref.wcscales is not None:
        return "INT4 with per-channel wcscales (INT4 artifacts have none)"
    rank = 0 if ref.lora_down is None else ref.lora_down.shape[0]
    if rank % 16:
        return f"rank {rank} is not a multiple of 16"
    return None


class W4A4CudaLinear(nn.Linear):
    """One Nunchaku W4A4 linear (INT4 or NVFP4) on the GPU kernels (an nn.Linear subclass, so hooks that look for
    nn.Linear see it), built from its CPU reference module: the unpacked codes and scales in the kernels' device
    layout (INT4: codes int8 [N, K], wscales [N, K/64] 16-bit; NVFP4: e2m1 patterns uint8 [N, K], e4m3 bytes uint8
    [N, K/16], alpha, wcscales [N]; lora_down transposed [K, R]). Outputs are rounded once to the layer's 16-bit dtype
    and returned in x's dtype, as NunchakuLinear's."""

    def __init__(self, ref: NunchakuLinear, device=None):
        nn.Module.__init__(self)
        problem = kernel_problem(ref)
        if problem:
            raise ValueError(f"the W4A4 kernels cannot run this layer: {problem}")
        self.in_features, self.out_features = ref.in_features, ref.out_features
        self.precision, self.unsigned, self.dtype = ref.precision, ref.unsigned, ref.dtype
        self.alpha = float(ref.wtscale)
        self.weight = None   # the float map stays with the reference module; the kernels read the codes
        dev = torch.device(device) if device is not None else ref.wcodes.device
        put = lambda t: None if t is None else t.to(device=dev).contiguous()   # noqa: E731
        fp4 = self.precision == "nvfp4"
        self.register_buffer("wcodes", put(ref.wcodes.to(torch.uint8 if fp4 else torch.int8)))
        scales = ref.wscales.to(torch.float8_e4m3fn).view(torch.uint8) if fp4 else ref.wscales.to(self.dtype)
        self.register_buffer("wscales", put(scales))
        self.register_buffer("wcscales", put(ref.wcscales) if fp4 else None)
        self.register_buffer("smooth", put(ref.smooth))
        rank = 0 if ref.lora_down is None else ref.lora_down.shape[0]
        self.register_buffer("lora_down_t", put(ref.lora_down.t()) if rank else None)
        self.register_buffer("lora_up", put(ref.lora_up) if rank else None)
        self.register_buffer("stored_bias", put(ref.stored_bias))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ...runtime.cuda import w4a4_ops
        if self.precision == "nvfp4":
            y = w4a4_ops.w4a4_nvfp4_linear(x, self.wcodes, self.wscales, self.alpha, self.dtype, self.wcscales,
                                           self.smooth, self.lora_down_t, self.lora_up, self.stored_bias)
        else:
            y = w4a4_ops.w4a4_linear(x, self.wcodes, self.wscales, self.smooth, self.lora_down_t, self.lora_up,
                                     self.stored_bias, unsigned=self.unsigned)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.precision}, "
                f"dtype={self.dtype}, unsigned={self.unsigned}, "
                f"rank={0 if self.lora_up is None else self.lora_up.shape[1]}")


class CpuReferenceLinear(nn.Linear):
    """A layer the kernels do not take, on its CPU reference module: the input goes to the CPU, the output comes
    back to x's device. The reference (whose helpers allocate on the CPU) is kept outside the module tree, so moving
    the model leaves it where it runs."""

    def __init__(self, ref: NunchakuLinear, why: str):
        nn.Module.__init__(self)
        self.__dict__["ref"] = ref.to("cpu")
        self.in_features, self.out_features, self.why = ref.in_features, ref.out_features, why
        self.weight, self.bias = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["ref"](x.to("cpu")).to(x.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, on the CPU: {self.why}"


def _swap(ref: NunchakuLinear, device, fallbacks: dict[str, int]) -> nn.Module:
    problem = kernel_problem(ref)
    if problem is None:
        return W4A4CudaLinear(ref, device)
    fallbacks[problem] = fallbacks.get(problem, 0) + 1
    return CpuReferenceLinear(ref, problem)


def cudaify(model: nn.Module, device) -> nn.Module:
    """Replace every NunchakuLinear of `model` by a W4A4CudaLinear where the kernels take it: the model's own
    submodules, and the fused layers a Nunchaku single file's read-back keeps outside the module tree (read_back.py
    FusedPart.fused, one per stored layer, shared by its parts). Says once which layers stay on their reference
    module."""
    from .read_back import FusedPart

    fallbacks: dict[str, int] = {}
    swapped: dict[int, nn.Module] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FusedPart):
            fused = mod.__dict__["fused"]
            if id(fused) not in swapped:
                swapped[id(fused)] = _swap(fused, device, fallbacks)
            mod.__dict__["fused"] = swapped[id(fused)]
        elif isinstance(mod, NunchakuLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _swap(mod, device, fallbacks))
    if fallbacks:
        log.info("nunchaku on %s: %s run on their CPU-reference module (inputs copied to the CPU and back)", device,
                 "; ".join(f"{n} layer(s): {why}" for why, n in sorted(fallbacks.items())))
    return model


def build_nunchaku_cuda_model(art, device: str = "cuda"):
    """The CPU reference model of a Nunchaku artifact (float32; its blocks run as graphs) on `device`, with every
    W4A4 linear replaced by W4A4CudaLinear (those the kernels do not take: CpuReferenceLinear)."""
    from ...runtime.reference import build_model

    model = build_model(art, compute_dtype=torch.float32, device="cpu")
    return cudaify(model, device).to(device)


# ------------------------------------------------------------------------------------------------- layer check

def reference_layers(art) -> dict[str, tuple[NunchakuLinear, list[str]]]:
    """Each W4A4 layer the artifact's kernels run, as its CPU reference module, with the dcc layers it stands for:
    a dcc-named artifact's quantized linears one by one, a single file's stored (possibly fused) layers once each."""
    out: dict[str, tuple[NunchakuLinear, list[str]]] = {}
    stored = any("stored" in e for e in art.manifest["layers"].values())
    if stored:
        from .read_back import FusedPart, read_back
        rb = read_back(art)
        for path, mod in (rb.modules if rb is not None else {}).items():
            if isinstance(mod, FusedPart):   # the parts of one stored layer share its module
                key = art.manifest["layers"][path]["stored"]["prefix"]
                out.setdefault(key, (mod.__dict__["fused"], []))[1].append(path)
        return out
    for name, entry in art.quantized_layers().items():
        fmt = art.format_of(name)
        if fmt.reference is None:
            continue
        n, k = entry["shape"]
        tensors = {t: art.tensors.get(f"{name}.{t}") for t in fmt.tensors}
        ref = fmt.reference(tensors, n, k, None)
        if isinstance(ref, NunchakuLinear):
            out[name] = (ref, [name])
    return out


def layer_input(k: int, tokens: int, unsigned: bool, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random activations [tokens, k] in dtype: normal with a few outlier channels (x20), one all-zero token; an
    unsigned layer gets GELU outputs (>= -0.17, as after fc1's GELU)."""
    x = torch.randn(tokens, k, generator=gen)
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 20.0
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x[0] = 0
    return x.to(dtype)


def check_layer_cuda(ref: NunchakuLinear, x: torch.Tensor, device) -> dict:
    """One layer on the GPU against its emulation (and, for information, both against the exact result of the codes
    and scales). {bit_equal, max_ulp, ok, kernel, rel_err_exact, rel_err_reference}."""
    problem = kernel_problem(ref)
    if problem is not None:   # the fallback (the reference on the CPU) against the reference
        want = ref(x.float())
        got = CpuReferenceLinear(ref, problem)(x.float().to(device)).cpu()
        ulp = cuda_numerics.ulp_distance(got.to(ref.dtype), want.to(ref.dtype))
        return {"bit_equal": float((ulp == 0).float().mean()), "max_ulp": int(ulp.max()) if ulp.numel() else 0,
                "ok": bool((ulp == 0).all()), "kernel": f"CPU reference module ({problem})"}
    args = (ref.wcodes, ref.wscales, ref.smooth, ref.lora_down, ref.lora_up, ref.stored_bias)
    if ref.precision == "nvfp4":
        kw = dict(wtscale=ref.wtscale, wcscales=ref.wcscales, dtype=ref.dtype)
        want = cuda_numerics.w4a4_nvfp4_linear_cuda(x, *args, **kw)
        exact = cuda_numerics.exact_nvfp4_linear(x, *args, **kw)
    else:
        kw = dict(unsigned=ref.unsigned, dtype=ref.dtype)
        want = cuda_numerics.w4a4_int4_linear_cuda(x, *args, **kw)
        exact = cuda_numerics.exact_int4_linear(x, *args, **kw)
    got = W4A4CudaLinear(ref, device)(x.to(device)).cpu()
    ulp = cuda_numerics.ulp_distance(got, want)
    nunchaku = ref(x.float()).to(ref.dtype)
    return {"bit_equal": float((ulp == 0).float().mean()), "max_ulp": int(ulp.max()) if ulp.numel() else 0,
            "ok": bool((ulp == 0).all()), "kernel": f"w4a4 {ref.precision}",
            "rel_err_exact": cuda_numerics.relative_error(got, exact)["max"],
            "rel_err_reference": cuda_numerics.relative_error(nunchaku, exact)["max"]}


def check_layers_cuda(art, device: str = "cuda", tokens: int = 37, seed: int = 0) -> dict[str, dict]:
    """dcc layer -> check_layer_cuda on random activations (layer_input): ok = every output bit-equal to the
    emulation (layers on their CPU reference module: to that module)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, (ref, names) in reference_layers(art).items():
        res = check_layer_cuda(ref, layer_input(ref.in_features, tokens, ref.unsigned, ref.dtype, gen), device)
        res["layer"] = key
        for name in names:
            out[name] = res
    return out
