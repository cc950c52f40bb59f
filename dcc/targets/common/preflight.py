"""Layout preflight shared by the targets: check every linear of a model against a layout before any work, refuse
an artifact in which nothing would be quantized, and suggest only options that would succeed (computed by trying
the other group sizes the layout defines on the same shapes)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

# check(name, out_features, in_features, group_size) raises a ValueError naming the layer and what is wrong
Check = Callable[[str, int, int, int], None]


def model_linears(lm) -> list[tuple[str, int, int]]:
    """(full name, out_features, in_features) of every linear in every block (shapes come from the meta skeleton)."""
    return [(f"{lm.block_prefix(i)}.{n}", m.out_features, m.in_features) for i, b in enumerate(lm.blocks)
            for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)]


def problems_for(linears: Iterable[tuple[str, int, int]], check: Check, group_size: int) -> dict[str, str]:
    """name -> the layout's reason, for every linear the layout cannot take at this group size."""
    out = {}
    for name, n, k in linears:
        try:
            check(name, n, k, group_size)
        except ValueError as e:
            out[name] = str(e)
    return out


def advice(linears: list[tuple[str, int, int]], check: Check, group_size: int, candidates: Iterable[int],
           describe: Callable[[int], str] = lambda g: "") -> str:
    """What to do instead, listing only options that work: other group sizes under which every linear fits;
    --unsupported keep only where some linear would still be quantized (an artifact of 16-bit layers is refused),
    at this group size or, failing that, at another one."""
    others = [g for g in candidates if g != group_size]
    n_bad = {g: len(problems_for(linears, check, g)) for g in [group_size, *others]}
    opts = [f"--group-size {g}{describe(g)}" for g in others if n_bad[g] == 0]
    keep = "--unsupported keep (those layers stay 16-bit)"
    if n_bad[group_size] < len(linears):
        opts.append(keep)
    elif not opts:
        # the group size that quantizes the most layers (candidates come largest first, so ties take the larger)
        partial = [g for g in others if n_bad[g] < len(linears)]
        if partial:
            g = min(partial, key=lambda g: n_bad[g])
            opts.append(f"--group-size {g}{describe(g)} with {keep}")
    if not opts:
        return "no group size of this layout fits any of these layers"
    return "use " + " or ".join(opts)


def refuse(problems: list[str], hint: str, error: type[Exception]) -> None:
    """Raise `error` naming the first bad layer, how many more there are, and the hint."""
    more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
    raise error(f"{problems[0]}{more}; {hint}")


def preflight(lm, check: Check, group_size: int, on_unsupported: str, candidates: Iterable[int],
              error: type[Exception], describe: Callable[[int], str] = lambda g: "") -> list[str]:
    """Check every block's linears against the layout before any work. Returns the reasons for the layers that
    will stay 16-bit (on_unsupported 'keep'); raises `error` under 'error', and always when no linear fits."""
    linears = model_linears(lm)
    problems = list(problems_for(linears, check, group_size).values())
    if not problems:
        return []
    hint = advice(linears, check, group_size, candidates, describe)
    if len(problems) == len(linears) and on_unsupported == "keep":
        refuse(problems, f"no linear layer of the model takes this layout, and an artifact with nothing quantized "
                         f"is refused; {hint}", error)
    if on_unsupported == "error":
        refuse(problems, hint, error)
    return problems
