"""Lower compiled blocks to TinyChat's checkpoint tensors (qweight int16 [N/4, K], scales and scaled_zeros
[Kg, N]); everything else 16-bit (BaseEmitter)."""
from __future__ import annotations

from ..checksums import sha256_later
from ..common.emit import BaseEmitter
from ..common.awq_layout import KERNEL_GROUP_SIZES, pack_qweight, pack_scales
from . import loader_spec

FORMAT = "tinychat-w4a16-v2"


def engines_for(group_size: int, layers: dict[str, dict] | None = None) -> list[str]:
    """Who can load and run the artifact: TinyChat where its loader takes every layer and its kernels run every
    layer's shape correctly and in bounds (loader_spec.check: group 128, N % 128, K % 256, K >= 768, ...); dcc's
    runtime takes every group the layout defines."""
    ok = group_size in KERNEL_GROUP_SIZES and not (layers and loader_spec.check(None, layers, None))
    return ["tinychat", "dcc-runtime"] if ok else ["dcc-runtime"]


class TinyChatEmitter(BaseEmitter):
    """TinyChat's tensors for each quantized linear."""

    def quantized(self, full: str, lin, mod, entry: dict) -> None:
        qt = lin.qtensor
        self.writer.add(f"{full}.qweight", pack_qweight(qt.codes))
        scales, szeros = pack_scales(qt.scale, qt.zero, qt.spec.group_size, self.dtype,
                                     float_zero=qt.spec.zero_mode == "float")
        self.writer.add(f"{full}.scales", scales)
        self.writer.add(f"{full}.scaled_zeros", szeros)
        # the fake-quant weight that was evaluated, as the 16-bit values the kernel reconstructs
        entry.update(format=FORMAT, spec=qt.spec.to_dict())
        sha256_later(entry, "weight_sha256", mod.weight.data.to(self.dtype))
