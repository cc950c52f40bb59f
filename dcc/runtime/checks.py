"""CI checks: a threshold compared with a measured value, and the three ways a CI system reads the outcome -- the
exit code (0 every check passed, 1 a check failed; 2 is the CLI's code for bad input), one line per failure, and
JSON or JUnit XML (one testcase per check, a <failure> element where it failed)."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

# how a measured value must stand to its threshold
_OPS = {"<=": lambda m, a: m <= a, ">=": lambda m, a: m >= a}


@dataclass(frozen=True)
class Check:
    """One threshold check. `name` says what was measured (a metric, or a layer and its metric), `op` how it must
    compare with `allowed`. A NaN measurement fails every check."""
    name: str
    measured: float
    allowed: float
    op: str = "<="
    unit: str = ""

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"check {self.name}: op must be one of {sorted(_OPS)}, not {self.op!r}")

    @property
    def passed(self) -> bool:
        return not math.isnan(self.measured) and _OPS[self.op](self.measured, self.allowed)

    def line(self) -> str:
        """One line: what, measured, allowed."""
        u = f" {self.unit}" if self.unit else ""
        return (f"{'ok' if self.passed else 'FAILED'}: {self.name}: measured {self.measured:.6g}{u}, allowed "
                f"{self.op} {self.allowed:.6g}{u}")


def exit_code(checks: list[Check]) -> int:
    """0 when every check passed (or there were none), 1 when any failed."""
    return 0 if all(c.passed for c in checks) else 1


def checks_json(checks: list[Check]) -> list[dict]:
    return [{**asdict(c), "passed": c.passed} for c in checks]


def junit_xml(suite: str, checks: list[Check], time_s: float = 0.0, properties: dict | None = None) -> str:
    """The JUnit XML CI systems read natively: <testsuites><testsuite><testcase/>...; a failed check carries a
    <failure message=...> with its line. `properties` (e.g. the artifact's path and target) go into <properties>."""
    root = ET.Element("testsuites")
    failures = sum(not c.passed for c in checks)
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failures),
                       errors="0", skipped="0", time=f"{time_s:.3f}")
    if properties:
        props = ET.SubElement(ts, "properties")
        for k, v in properties.items():
            ET.SubElement(props, "property", name=str(k), value=str(v))
    for c in checks:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=c.name, time="0")
        if not c.passed:
            f = ET.SubElement(tc, "failure", message=c.line(), type="threshold")
            f.text = c.line()
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path, suite: str, checks: list[Check], time_s: float = 0.0, properties: dict | None = None) -> None:
    Path(path).write_text(junit_xml(suite, checks, time_s, properties))
