"""Where a layer of an artifact sits: its block (the position of its repeated block in the model's forward order,
from the manifest's source.block_lists) and its kind within the block ("self_attn.q_proj"), and the natural order of
layer names (layers.2 before layers.10) that diff and report list them in."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key: digit runs compare as numbers ("layers.2" < "layers.10")."""
    return tuple(int(p) if p.isdigit() else p for p in _NUM.split(name))


@dataclass(frozen=True)
class Place:
    block: int | None     # global block index in forward order (None: outside the repeated blocks)
    prefix: str | None    # the block's module path, e.g. "model.layers.3"
    kind: str             # the layer's path inside its block, e.g. "mlp.down_proj" (the full name outside blocks)


def block_lists(manifest: dict) -> list[str]:
    """The repeated-block lists of the source model, in forward order (a causal LM has one, "model.layers")."""
    src = manifest.get("source") or {}
    lists = src.get("block_lists")
    if lists:
        return list(lists)
    blocks = src.get("blocks") or ""
    return [b.strip() for b in str(blocks).split(",") if b.strip()]


def placer(manifest: dict, names) -> Callable[[str], Place]:
    """A function name -> Place for this manifest: blocks of later lists are numbered after all of the earlier
    lists' blocks (FLUX: transformer_blocks 0..n-1, then single_transformer_blocks n..)."""
    lists = sorted(block_lists(manifest), key=len, reverse=True)   # longest prefix first: nested lists
    counts: dict[str, int] = {}
    for name in names:
        for lst in lists:
            m = re.match(re.escape(lst) + r"\.(\d+)\.", name)
            if m:
                counts[lst] = max(counts.get(lst, 0), int(m.group(1)) + 1)
                break
    offsets, start = {}, 0
    for lst in block_lists(manifest):
        offsets[lst] = start
        start += counts.get(lst, 0)

    def place(name: str) -> Place:
        for lst in lists:
            m = re.match(re.escape(lst) + r"\.(\d+)\.(.+)$", name)
            if m:
                i = int(m.group(1))
                return Place(offsets[lst] + i, f"{lst}.{i}", m.group(2))
        return Place(None, None, name)
    return place
