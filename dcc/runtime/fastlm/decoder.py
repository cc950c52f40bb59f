"""A hand-written Llama decoder over an artifact's stored tensors (embedding, RMSNorm, RoPE, GQA attention on a
static KV cache, SwiGLU MLP, final norm, head): prefill runs the prompt, step runs one token per sequence with no
Python-side state beyond fixed buffers, so a CUDA graph can capture it (graph.py). The residual stream is float32,
as in the reference model (runtime/reference.py, float32 on the CPU); on the GPU the linears take 16-bit inputs
(TinyChat: the artifact's dtype; QServe: fp16, quantized per token to int8). QServe artifacts its engine runs use its
fused norm + quantization and silu_and_mul (numerics_fused.py), as the reference model does (prepare_reference)."""
from __future__ import annotations

import os

import torch

from . import ops
from .cache import KV4Cache, KV16Cache
from .linear import load_group, run_group
from .rope import rope_tables
from .spec import ATTN, MLP, read_spec


class Layer:
    """One decoder layer's weights: norms and linear groups (q/k/v and gate/up fused where the layout allows)."""

    def __init__(self, art, i: int, spec, device, dtype, norm_dtype):
        p = f"model.layers.{i}"
        get = lambda n: art.tensors.get(f"{p}.{n}.weight").to(device=device, dtype=norm_dtype)  # noqa: E731
        self.in_norm, self.post_norm = get("input_layernorm"), get("post_attention_layernorm")
        at, ml = [f"{p}.self_attn.{n}" for n in ATTN], [f"{p}.mlp.{n}" for n in MLP]
        self.qkv = load_group(art, at[:3], device, dtype)
        self.o = load_group(art, at[3:], device, dtype)[0]
        # gate_up with SwiGLU in the GEMM's epilogue where the kind has it (TinyChat on a GPU), else one GEMM (two
        # for QServe, whose silu_and_mul reads gate and up as two arrays) and silu_mul
        self.glu = None if spec.engine else spec.kind.load_glu(art, ml[0], ml[1], device, dtype)
        self.gate_up = [] if self.glu is not None else load_group(art, ml[:2], device, dtype, fuse=not spec.engine)
        self.down = load_group(art, ml[2:], device, dtype)[0]
        self.qkv_sum = any(getattr(lin, "group", None) == 0 and hasattr(lin, "fmt") for lin in self.qkv)
        self.gu_sum = any(getattr(lin, "group", None) == 0 and hasattr(lin, "fmt") for lin in self.gate_up)


class FastLlama:
    """The decoder of a TinyChat or QServe Llama artifact on `device` (cuda: the kernels; cpu: torch, in float32 as
    the reference model). approx: QServe's fused norm and SiLU with the engine's MUFU instructions (1) or their
    correctly rounded stand-ins (0, bit-equal to the CPU emulation). sdpa: a 16-bit cache's decode step attends
    through scaled_dot_product_attention (masked, every slot) instead of csrc/attn's kernel (DCC_FASTLM_SDPA=1)."""

    def __init__(self, art, device="cuda", approx: int = 1, sdpa: bool | None = None):
        self.spec = s = read_spec(art)
        self.device = torch.device(device)
        cpu = self.device.type == "cpu"
        self.dtype = torch.float32 if cpu else s.kind.gpu_dtype(art)
        self.approx, self.config = approx, art.config
        self.sdpa = os.environ.get("DCC_FASTLM_SDPA", "0") == "1" if sdpa is None else sdpa
        norm_dtype = torch.float32 if cpu else self.dtype
        self.embed = art.tensors.get("model.embed_tokens.weight").to(device=device, dtype=self.dtype)
        self.layers = [Layer(art, i, s, device, self.dtype, norm_dtype) for i in range(s.layers)]
        self.norm = art.tensors.get("model.norm.weight").to(device=device, dtype=norm_dtype)
        if s.tied:
            from .linear import Dense
            self.head = Dense(self.embed)
        else:
            self.head = load_group(art, ["lm_head"], device, self.dtype)[0]
        self.sizes_qkv = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
        self.sizes_gu = [s.intermediate, s.intermediate]
        self.cache = None
        self.norm_counter = None   # the fused GEMV + norm's arrival counter (allocate)

    # -- state ------------------------------------------------------------------------------------------------------
    def allocate(self, batch: int, capacity: int) -> None:
        """The static cache for `batch` sequences of up to `capacity` positions, and the RoPE tables (once a run)."""
        s = self.spec
        if self.cache is not None and (self.cache.batch, self.cache.capacity) == (batch, capacity):
            return
        self.cache = None
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" \
            else 1
        if s.kv_bits == 4:
            self.cache = KV4Cache(s.layers, batch, s.kv_heads, capacity, s.head_dim, s.heads, self.device, sms)
        else:
            self.cache = KV16Cache(s.layers, batch, s.kv_heads, capacity, s.head_dim, s.heads, self.device,
                                   self.dtype, sms, sdpa=self.sdpa)
        self.cos, self.sin = rope_tables(self.config, capacity, self.device)
        if self.device.type == "cuda" and self.norm_counter is None:
            self.norm_counter = torch.zeros(1, dtype=torch.int32, device=self.device)

    # -- pieces -----------------------------------------------------------------------------------------------------
    def _norm_in(self, h, delta, weight, with_sum):
        """h += delta, then the norm a layer's input linears read (QServe engine: fused norm + int8 quantization)."""
        s = self.spec
        if s.engine:
            x16 = ops.add_rmsnorm(h, delta, weight, s.eps, torch.float16, norm=False)
            return s.kind.norm_quant(x16, weight, s.eps, with_sum, self.approx)
        return ops.add_rmsnorm(h, delta, weight, s.eps, self.dtype)

    def _act(self, L: Layer, x):
        """SiLU(x Wg^T) * (x Wu^T), the down projection's input."""
        if L.glu is not None:
            return L.glu(x)
        gate, up = run_group(L.gate_up, x, self.sizes_gu)
        if self.spec.engine:
            return self.spec.kind.silu_mul(gate, up, self.approx)
        return ops.silu_mul(gate, up, self.dtype)

    def _mlp(self, L: Layer, h, delta):
        return L.down(self._act(L, self._norm_in(h, delta, L.post_norm, L.gu_sum)))

    def _linear_norm(self, lin, inp, h, weight):
        """h += lin(inp), then the norm the next linears read, in the linear's own launch where its kind has that
        (TinyChat's GEMV at batch <= 8: the same bits); None where it has not (then the caller runs both)."""
        fused = getattr(lin, "add_rmsnorm", None)
        if fused is None or self.spec.engine or self.norm_counter is None:
            return None
        return fused(inp, h, weight, self.spec.eps, self.norm_counter)

    # -- forward ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] (positions 0..S-1) -> float32 logits [B, V] after the last token; fills cache slots 0..S-1."""
        s, cache = self.spec, self.cache
        b, n = ids.shape
        d = s.head_dim
        h = self.embed[ids.reshape(-1)].to(torch.float32)
        delta = None
        for i, L in enumerate(self.layers):
            x = self._norm_in(h, delta, L.in_norm, L.qkv_sum)
            q, k, v = run_group(L.qkv, x, self.sizes_qkv)
            # RoPE + cache write (one kernel on the GPU), then causal attention
            o = cache.prefill_rows(i, q, k, v, b, self.cos, self.sin).transpose(1, 2).reshape(b * n, s.heads * d)
            delta = L.o(o)
            delta = self._mlp(L, h, delta)
        last = torch.arange(b, device=ids.device) * n + n - 1
        y = ops.add_rmsnorm(h, delta, self.norm, s.eps, self.dtype)[last]
        return self.head(y).to(torch.float32)

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok [B] (int64) at positions pos [B] (int64, on the device) -> float32 logits [B, V]; writes cache slot
        pos[b] of each sequence. Every shape is fixed by (batch, capacity): capturable in a CUDA graph."""
        s, cache = self.spec, self.cache
        b = tok.shape[0]
        h = self.embed[tok].to(torch.float32)
        delta, x = None, None   # x: the next linears' normalized input where a fused GEMV made it
        for i, L in enumerate(self.layers):
            if x is None:
                x = self._norm_in(h, delta, L.in_norm, L.qkv_sum)
            qkv = L.qkv[0](x) if len(L.qkv) == 1 else torch.cat([lin(x) for lin in L.qkv], -1)
            o = cache.decode(i, qkv, pos, self.cos, self.sin).reshape(b, s.heads * s.head_dim)
            x = self._linear_norm(L.o, o, h, L.post_norm)
            if x is None:
                x = self._norm_in(h, L.o(o), L.post_norm, L.gu_sum)
            act = self._act(L, x)
            x = self._linear_norm(L.down, act, h, self.layers[i + 1].in_norm if i + 1 < s.layers else self.norm)
            delta = L.down(act) if x is None else None
        y = x if x is not None else ops.add_rmsnorm(h, delta, self.norm, s.eps, self.dtype)
        return self.head(y).to(torch.float32)
