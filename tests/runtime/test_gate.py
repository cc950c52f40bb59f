"""dcc.runtime.gate: thresholds (flags over a [checks] file), which inputs each needs, and the checks built from
what validate measured."""
import math

import pytest

from dcc.runtime.gate import Thresholds, build_checks, check_inputs, read_checks_file

CMP = {"layers": {"model.layers.0.q": 0.05, "model.layers.0.k": 0.3, "lm_head": 0.9}, "kl": 0.02,
       "top1_agreement": 0.8, "ppl_increase": 0.07}
QUANTIZED = {"model.layers.0.q", "model.layers.0.k"}   # lm_head kept 16-bit: not checked per layer


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="--min-top1: a fraction between 0 and 1"):
        Thresholds(min_top1=90)
    with pytest.raises(ValueError, match="--max-kl: must be a finite number >= 0"):
        Thresholds(max_kl=-1)
    with pytest.raises(ValueError, match="--max-layer-error"):
        Thresholds(max_layer_error=math.inf)
    assert Thresholds(max_kl=0.1, min_top1=0.9).given() == ["max_kl", "min_top1"]


def test_flags_override_the_file():
    file = Thresholds(max_layer_error=0.1, max_kl=0.2)
    th = file.merged(max_layer_error=0.5, max_kl=None, min_top1=0.9)
    assert th == Thresholds(max_layer_error=0.5, max_kl=0.2, min_top1=0.9)


def test_read_checks_file(tmp_path):
    f = tmp_path / "gate.toml"
    f.write_text("[checks]\nmax_layer_error = 0.25\nmin_top1 = 1\n[other]\nx = 'ignored'\n")
    assert read_checks_file(f) == Thresholds(max_layer_error=0.25, min_top1=1.0)


@pytest.mark.parametrize("text, says", [
    ("[checks]\nmax_kl = 0.1\nmin_top_1 = 0.9\n", "unknown key 'min_top_1' in [checks]"),
    ("[checks]\nmax_kl = '0.1'\n", "[checks] max_kl must be a number"),
    ("[checks]\nmax_kl = true\n", "[checks] max_kl must be a number"),
    ("[checks]\nmin_top1 = 2\n", "[checks] --min-top1: a fraction between 0 and 1"),
    ("max_kl = 0.1\n", "no [checks] table"),
    ("[checks\n", "not a TOML file"),
])
def test_bad_checks_files_name_the_file(tmp_path, text, says):
    f = tmp_path / "gate.toml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        read_checks_file(f)
    assert str(e.value).startswith(f"{f}: ") and says in str(e.value)


def test_missing_checks_file(tmp_path):
    with pytest.raises(ValueError, match="no such checks file"):
        read_checks_file(tmp_path / "nope.toml")


def test_inputs_each_threshold_needs():
    check_inputs(Thresholds(), "causal-lm", None, None)   # nothing asked: nothing needed
    with pytest.raises(ValueError, match="^--max-layer-error compares .* give --model MODEL"):
        check_inputs(Thresholds(max_layer_error=0.1), "causal-lm", None, None)
    with pytest.raises(ValueError, match="--max-ppl-increase measures perplexity on real text: give --text"):
        check_inputs(Thresholds(max_ppl_increase=0.1), "causal-lm", "model", None)
    check_inputs(Thresholds(max_ppl_increase=0.1, max_kl=1), "causal-lm", "model", "text.txt")
    with pytest.raises(ValueError, match="--max-kl measures a causal LM's .* a diffusion model: use --max-layer-error"):
        check_inputs(Thresholds(max_kl=0.1), "diffusers", "model", None)
    with pytest.raises(ValueError, match="--min-top1 .* an encoder"):
        check_inputs(Thresholds(min_top1=0.1), "encoder", "model", None)
    check_inputs(Thresholds(max_layer_error=0.1), "diffusers", "model", None)
    with pytest.raises(ValueError, match="^--text compares .* give --model MODEL"):
        check_inputs(Thresholds(), "causal-lm", None, "text.txt")
    with pytest.raises(ValueError, match="--text compares a causal LM's .* an encoder"):
        check_inputs(Thresholds(), "encoder", "model", "text.txt")


def test_checks_from_a_report():
    exact = {"model.layers.0.q": True, "model.layers.0.k": True}
    th = Thresholds(max_layer_error=0.1, max_kl=0.05, min_top1=0.9, max_ppl_increase=0.1)
    checks = build_checks(th, exact, CMP, QUANTIZED)
    assert [c.name for c in checks] == [
        "decoded weights equal compiled (2/2 layers)", "layer model.layers.0.k output_rel_err",
        "layer model.layers.0.q output_rel_err", "logits KL(float || artifact) per token",
        "top-1 agreement with the float model", "perplexity increase over the float model"]
    assert [c.passed for c in checks] == [True, False, True, True, False, True]
    top1 = checks[4]
    assert (top1.measured, top1.allowed, top1.op) == (0.8, 0.9, ">=")


def test_only_what_is_asked_is_checked():
    exact = {"a": True, "b": False}
    checks = build_checks(Thresholds(max_kl=1.0), exact, CMP, QUANTIZED)
    assert [c.name for c in checks] == ["decoded weights equal compiled (1/2 layers)",
                                        "logits KL(float || artifact) per token"]
    assert not checks[0].passed and checks[0].measured == 1 and checks[1].passed
    assert [c.name for c in build_checks(Thresholds(max_kl=1.0), exact, None, QUANTIZED)] == [checks[0].name]
