"""dcc.runtime.checks: a threshold against a measurement, the exit code, the failure line, JSON and JUnit XML."""
import json
import math
import xml.etree.ElementTree as ET

import pytest

from dcc.runtime.checks import Check, checks_json, exit_code, junit_xml, write_junit


def test_check_compares_in_the_direction_of_its_op():
    assert Check("err", 0.1, 0.2).passed and not Check("err", 0.3, 0.2).passed
    assert Check("err", 0.2, 0.2).passed   # at the threshold: allowed
    assert Check("top1", 0.95, 0.9, op=">=").passed and not Check("top1", 0.85, 0.9, op=">=").passed


def test_nan_fails_every_check():
    assert not Check("err", math.nan, 1.0).passed
    assert not Check("top1", math.nan, 0.0, op=">=").passed


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        Check("err", 0.1, 0.2, op="<")


def test_line_says_measured_and_allowed():
    assert Check("layer a output_rel_err", 0.25, 0.1).line() == (
        "FAILED: layer a output_rel_err: measured 0.25, allowed <= 0.1")
    assert Check("kl", 0.01, 0.1, unit="nats").line() == "ok: kl: measured 0.01 nats, allowed <= 0.1 nats"


def test_exit_code_and_json():
    ok, bad = Check("a", 1, 2), Check("b", 3, 2)
    assert exit_code([]) == 0 and exit_code([ok]) == 0 and exit_code([ok, bad]) == 1
    js = json.loads(json.dumps(checks_json([ok, bad])))
    assert [c["passed"] for c in js] == [True, False]
    assert js[1] == {"name": "b", "measured": 3, "allowed": 2, "op": "<=", "unit": "", "passed": False}


def test_junit_structure(tmp_path):
    checks = [Check("a", 1, 2), Check("b", 3, 2), Check("c", 0.5, 0.9, op=">=")]
    write_junit(tmp_path / "j.xml", "dcc validate", checks, 1.5, {"artifact": "out/", "inputs": "text"})
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "dcc validate", "3", "2", "0")
    assert float(suite.get("time")) == 1.5
    assert {p.get("name"): p.get("value") for p in suite.iter("property")} == {"artifact": "out/", "inputs": "text"}
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["a", "b", "c"]
    assert [c.find("failure") is not None for c in cases] == [False, True, True]
    assert cases[1].find("failure").get("message") == checks[1].line()
    assert junit_xml("s", []).count("<testcase") == 0
