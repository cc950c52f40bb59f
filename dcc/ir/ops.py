"""dcc:: operators: the engines' run-time numerics as ops of the graph (torch.library), so that a block's graph
computes what the engine computes, dumps show it, and a later pass can insert more of them (a low-rank branch, an
online rotation). Each op is pure (no mutation) and has a Meta kernel, so graphs holding it can be exported again.

  dcc::quant_act_int8(x)   per-token int8 activation quantization before a W*A8 linear (QServe; ir/actquant.py)
  dcc::quant_kv(x, bits)   the KV cache's per-token, per-head asymmetric quantization of K (after RoPE) or V
  dcc::quant_act_int4(x, group, unsigned, dtype)   Nunchaku's W4A4 INT4 activations, per token and 64-group, in
                           the 16-bit compute dtype (ir/w4a4.py); x is already divided by the smoothing factor, and
                           for unsigned (u4 codes) already shifted: the graph adds SHIFT_GELU before that division
  dcc::quant_act_nvfp4(x, dtype)   Nunchaku's NVFP4 activations: e2m1 with an e4m3 scale per 16

An activation format (Linear.act) is "int8", or "int4" / "uint4" / "nvfp4" with the compute dtype after a colon
("int4:bfloat16"); parse_act reads it. "uint4" is Nunchaku's `act_unsigned` input of a layer fed by a GELU: u4 codes of
(x + SHIFT_GELU) / smooth, the shift taken back by the layer's bias (rewrite.insert_act_quant, shift_compensation).
"""
from __future__ import annotations

import torch

from .actquant import fake_quantize_kv, fake_quantize_tokens_int8
from .w4a4 import INT4_GROUP, SHIFT_GELU, fake_quantize_act_int4, fake_quantize_act_nvfp4

_LIB = torch.library.Library("dcc", "DEF")   # noqa: TOR901 - a fixed set of ops defined once, at import

_LIB.define("quant_act_int8(Tensor x) -> Tensor")
_LIB.define("quant_kv(Tensor x, int bits) -> Tensor")

# CompositeExplicitAutograd: one kernel for every device (the bodies are plain torch); ~6 us of dispatch per call,
# where torch.library.custom_op costs several times that
_LIB.impl("quant_act_int8", fake_quantize_tokens_int8, "CompositeExplicitAutograd")
_LIB.impl("quant_kv", fake_quantize_kv, "CompositeExplicitAutograd")
_LIB.impl("quant_act_int8", lambda x: torch.empty_like(x), "Meta")
_LIB.impl("quant_kv", lambda x, bits: torch.empty_like(x), "Meta")

_LIB.define("quant_act_int4(Tensor x, int group, bool unsigned, str dtype) -> Tensor")
_LIB.define("quant_act_nvfp4(Tensor x, str dtype) -> Tensor")


def _act_int4(x, group: int, unsigned: bool, dtype: str):
    # the smoothed (unsigned: shifted, then smoothed) input rounded to the compute dtype, quantized; returned as
    # codes * scale in x's dtype. The shift is a node before the division, so it is not added here again.
    return fake_quantize_act_int4(x, None, group, unsigned, getattr(torch, dtype), out_dtype=x.dtype, shift=0.0)


def _act_nvfp4(x, dtype: str):
    return fake_quantize_act_nvfp4(x, None, dtype=getattr(torch, dtype), out_dtype=x.dtype)


_LIB.impl("quant_act_int4", _act_int4, "CompositeExplicitAutograd")
_LIB.impl("quant_act_nvfp4", _act_nvfp4, "CompositeExplicitAutograd")
_LIB.impl("quant_act_int4", lambda x, group, unsigned, dtype: torch.empty_like(x), "Meta")
_LIB.impl("quant_act_nvfp4", lambda x, dtype: torch.empty_like(x), "Meta")

quant_act_int8 = torch.ops.dcc.quant_act_int8.default
quant_kv = torch.ops.dcc.quant_kv.default
quant_act_int4 = torch.ops.dcc.quant_act_int4.default
quant_act_nvfp4 = torch.ops.dcc.quant_act_nvfp4.default

ACT_FORMATS = ("int8", "int4", "uint4", "nvfp4")
ACT_DTYPES = ("float16", "bfloat16")


def parse_act(act: str) -> tuple[str, str | None]:
    """"int4:bfloat16" -> ("int4", "bfloat16"); "int8" -> ("int8", None). A bad format is one clear error."""
    fmt, _, dtype = act.partition(":")
    if fmt not in ACT_FORMATS or (fmt == "int8") != (not dtype) or (dtype and dtype not in ACT_DTYPES):
        raise ValueError(f"activation format {act!r}: expected 'int8', or 'int4' / 'uint4' / 'nvfp4' with "
                         f"':float16' or ':bfloat16' (the compute dtype)")
    return fmt, dtype or None


def act_op(act: str) -> tuple:
    """(op, extra arguments after x) that quantize an input in activation format `act`."""
    fmt, dtype = parse_act(act)
    if fmt == "int8":
        return quant_act_int8, ()
    if fmt in ("int4", "uint4"):
        return quant_act_int4, (INT4_GROUP, fmt == "uint4", dtype)
    return quant_act_nvfp4, (dtype,)


def is_shifted(act: str | None) -> bool:
    """Whether a linear of this activation format reads its input shifted by SHIFT_GELU (and its bias takes the
    shift back): "uint4"."""
    return bool(act) and parse_act(act)[0] == "uint4"


def fake_quantize_act(x: torch.Tensor, act: str, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """What the main branch of a linear whose input is in format `act` effectively multiplies, for x already divided
    by smooth: the act_op node's value; for "uint4", the codes of x + SHIFT_GELU / smooth (the kernel's
    (x_raw + shift) / smooth) with the shift taken off again, as the layer's bias does (smooth None: ones)."""
    op, extra = act_op(act)
    if not is_shifted(act):
        return op(x, *extra)
    s = SHIFT_GELU if smooth is None else SHIFT_GELU / smooth.to(x.dtype)
    return op(x + s, *extra) - s



def passthrough(x, *args):
    return x


# the ops that stand for the engine's run-time numerics, each with what it computes in the float function (the one
# the passes preserve and calibrate against): a quantizer is the identity there
FLOAT_EQUIVALENT = {quant_act_int8: passthrough, quant_kv: passthrough, quant_act_int4: passthrough,
                    quant_act_nvfp4: passthrough}
RUNTIME_NUMERICS = frozenset(FLOAT_EQUIVALENT)


def is_runtime_numerics(node) -> bool:
    return node.op == "call_function" and node.target in RUNTIME_NUMERICS
