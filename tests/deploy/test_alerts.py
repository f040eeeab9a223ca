"""k8s/base/prometheusrule.yaml: its rules pass the real promtool's checks and unit tests (alerts_test.yaml: each
alert fires on the series that should fire it, at the time it should, with its labels and annotations, and not on
the others), every alert has such a test, and every metric the rules query is one podmeter exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import yaml
from deploy.test_dashboard import declared_prometheus_names, declared_telemetry_names
from harness import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "k8s", "base", "prometheusrule.yaml")
UNIT_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alerts_test.yaml")
# what is left of an expression once its matchers and label lists are gone, and is not a metric
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "and", "or", "unless", "offset", "bool",
                "group_left", "group_right"}


def groups() -> list[dict]:
    with open(RULES) as f:
        return yaml.safe_load(f)["spec"]["groups"]


def alerts() -> list[dict]:
    return [r for g in groups() for r in g["rules"] if "alert" in r]


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b\d+[smhdw]\b|\"[^\"]*\"", " ", expr)
    return {t for t in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr) if t not in PROMQL_WORDS}


def test_rules_pass_promtool_check_and_unit_tests(tmp_path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "needs promtool (apt-get install prometheus)")
    with open(tmp_path / "rules.yaml", "w") as f:
        yaml.safe_dump({"groups": groups()}, f)
    shutil.copy(UNIT_TESTS, tmp_path / "alerts_test.yaml")
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts_test.yaml"]):
        proc = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    with open(UNIT_TESTS) as f:
        cases = yaml.safe_load(f)["tests"]
    fired = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert {a["alert"] for a in alerts()} == fired
    for a in alerts():
        assert a["labels"]["severity"] in ("critical", "warning", "info"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]


def test_every_metric_the_rules_query_is_one_podmeter_exports():
    declared = set(declared_prometheus_names()) | declared_telemetry_names()
    used = set()
    for a in alerts():
        names = metric_names(a["expr"])
        assert names, a["alert"]
        used |= names
    assert used - declared == set()
    # the extraction sees through matchers, windows, offsets and label lists
    assert metric_names('max by (node, hw_id) (x_total{a="b"}[5m] offset 15m) * on (hw_id) y') == {"x_total", "y"}
