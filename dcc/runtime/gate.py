"""`dcc validate` as a CI gate: the thresholds (command-line flags over a TOML file's [checks] table), which inputs
each needs, and the checks (dcc.runtime.checks) they make of what validate measured."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from .checks import Check
from .layer_names import natural_key

# threshold -> its command-line flag
FLAGS = {"max_layer_error": "--max-layer-error", "max_kl": "--max-kl", "min_top1": "--min-top1",
         "max_ppl_increase": "--max-ppl-increase"}
# thresholds measured on the model's output distribution over tokens: a causal LM's logits
LOGIT_THRESHOLDS = ("max_kl", "min_top1", "max_ppl_increase")


@dataclass(frozen=True)
class Thresholds:
    """What validate must reach; None = not checked.

    max_layer_error: each quantized layer's output relative error against the float layer (needs --model).
    max_kl: KL(float || artifact) of the next-token distributions, mean per token, in nats (needs --model).
    min_top1: fraction (0-1) of tokens whose top-1 prediction the artifact shares with the float model.
    max_ppl_increase: relative perplexity increase on --text, e.g. 0.05 = 5 % (needs --model and --text).

    Example file (`--checks gate.toml`)::

        [checks]
        max_layer_error = 0.2
        max_kl = 0.05
        min_top1 = 0.9
        max_ppl_increase = 0.05
    """
    max_layer_error: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    max_ppl_increase: float | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{FLAGS[f.name]}: must be a finite number >= 0, not {v!r}")
        if self.min_top1 is not None and self.min_top1 > 1:
            raise ValueError(f"--min-top1: a fraction between 0 and 1, not {self.min_top1} (90 % is 0.9)")

    def given(self) -> list[str]:
        """The thresholds that are set, by field name."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def merged(self, **flags) -> "Thresholds":
        """These thresholds with every flag that is not None put over them (the command line wins over a file)."""
        return Thresholds(**{f.name: flags.get(f.name) if flags.get(f.name) is not None else getattr(self, f.name)
                             for f in fields(self)})


def read_checks_file(path) -> Thresholds:
    """The [checks] table of a TOML file; an unreadable file, a missing table, an unknown key or a value that is no
    number is one line naming the file (and the key)."""
    try:
        import tomllib
    except ImportError:   # Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such checks file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a TOML file ({e})") from None
    table = data.get("checks")
    if not isinstance(table, dict):
        raise ValueError(f"{p}: no [checks] table (keys: {', '.join(FLAGS)})")
    for key, v in table.items():
        if key not in FLAGS:
            raise ValueError(f"{p}: unknown key {key!r} in [checks] (known: {', '.join(FLAGS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{p}: [checks] {key} must be a number, not {v!r}")
    try:
        return Thresholds(**{k: float(v) for k, v in table.items()})
    except ValueError as e:
        raise ValueError(f"{p}: [checks] {e}") from None


def check_inputs(th: Thresholds, kind: str, model, text) -> None:
    """Every threshold has what it needs: --model for all of them, --text for the perplexity, a causal LM for the
    thresholds on next-token distributions and for --text. Otherwise one line saying what to add (the CLI's exit
    2). `kind`: the artifact's model kind (dcc.models.adapter)."""
    given = th.given()
    if given and not model:
        raise ValueError(f"{FLAGS[given[0]]} compares the artifact with the float model: give --model MODEL (the "
                         f"model it was compiled from)")
    if text and not model:
        raise ValueError("--text compares the artifact with the float model on a text: give --model MODEL too")
    what = "a diffusion model" if kind == "diffusers" else f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
    wrong = [k for k in given if k in LOGIT_THRESHOLDS]
    if wrong and kind != "causal-lm":
        raise ValueError(f"{FLAGS[wrong[0]]} measures a causal LM's next-token predictions; this artifact's model is "
                         f"{what}: use --max-layer-error")
    if text and kind != "causal-lm":
        raise ValueError(f"--text compares a causal LM's next-token predictions; this artifact's model is {what} "
                         f"({'compared on --inputs' if kind == 'diffusers' else 'compared on --tokens random ids'})")
    if th.max_ppl_increase is not None and not text:
        raise ValueError("--max-ppl-increase measures perplexity on real text: give --text FILE")


def build_checks(th: Thresholds, exact: dict[str, bool], cmp: dict | None, quantized) -> list[Check]:
    """The checks of one validate run: the decoded weights first (always), then each threshold that is set against
    what `cmp` (dcc.runtime.validate.compare_with_float's report) measured; per layer, the quantized layers only."""
    bad = sum(not ok for ok in exact.values())
    checks = [Check(f"decoded weights equal compiled ({len(exact) - bad}/{len(exact)} layers)", bad, 0,
                    unit="layers differing")]
    if cmp is None:
        return checks
    if th.max_layer_error is not None:
        checks += [Check(f"layer {name} output_rel_err", cmp["layers"][name], th.max_layer_error)
                   for name in sorted(cmp["layers"], key=natural_key) if name in quantized]
    if th.max_kl is not None:
        checks.append(Check("logits KL(float || artifact) per token", cmp["kl"], th.max_kl, unit="nats"))
    if th.min_top1 is not None:
        checks.append(Check("top-1 agreement with the float model", cmp["top1_agreement"], th.min_top1, op=">="))
    if th.max_ppl_increase is not None:
        checks.append(Check("perplexity increase over the float model", cmp["ppl_increase"], th.max_ppl_increase))
    return checks
