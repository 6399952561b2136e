"""The Prometheus alert rules in ``conf/alerts``: ``promtool check rules`` accepts them,
``promtool test rules`` passes their unit tests, every alert has a case where it fires and
one where it must not (on the series it reads), and those tests catch a rule that never
fires. promtool comes with Debian's ``prometheus`` package; without it these tests fail
(MS1_NO_PROMTOOL=1 skips them). That every metric the rules use is on ms1's /metrics is
``tests/test_dashboard.py``'s."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from opsconf import (
    RULE_TESTS,
    RULES,
    load_yaml,
    metric_names,
    rule_exprs,
    run_promtool,
)


def rules() -> dict[str, Any]:
    data = load_yaml(RULES.read_text())
    assert isinstance(data, dict)
    return data


def unit_tests() -> dict[str, Any]:
    data = load_yaml(RULE_TESTS.read_text())
    assert isinstance(data, dict)
    return data


def alerts() -> dict[str, str]:
    """Each alert's expression, by name."""
    return {rule["alert"]: rule["expr"] for group in rules()["groups"]
            for rule in group["rules"] if "alert" in rule}


def series_name(series: str) -> str:
    """The metric name of an input series, ``name{labels}``."""
    match = re.match(r"\s*([a-zA-Z_:][\w:]*)", series)
    assert match is not None, series
    return match.group(1)


def test_promtool_check_rules_accepts_every_rule() -> None:
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found is not None, result.stdout
    # promtool (a full YAML parser) and the tests' reader see the same rules
    assert int(found.group(1)) == len(rule_exprs(rules()))


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout, result.stdout


def test_the_alerts_the_operator_needs_are_there() -> None:
    names = set(alerts())
    assert {"MS1ApiKeyRejected", "MS1BreakerOpen", "MS1DeadLettersGrowing",
            "MS1BacklogDrainOverAnHour", "MS1NoDeliveryWithBacklog", "MS1RedisUnreachable",
            "MS1PipelineThreadDown"} <= names
    for group in rules()["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_has_a_firing_case_and_a_silent_one_on_its_own_series() -> None:
    tests = unit_tests()
    assert tests["rule_files"] == [RULES.name]
    fires: dict[str, int] = {}
    silent: dict[str, int] = {}
    for case in tests["tests"]:
        present = {series_name(s["series"]) for s in case["input_series"]}
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            assert name in alerts(), f"{case['name']!r}: no alert {name!r}"
            if check["exp_alerts"]:
                fires[name] = fires.get(name, 0) + 1
                continue
            # a silent check means something only if the alert's series are there
            missing = set(metric_names(alerts()[name])) - present
            assert not missing, f"{case['name']!r}: {name} is silent without its series " \
                                f"{sorted(missing)}"
            silent[name] = silent.get(name, 0) + 1
    assert set(fires) == set(alerts()), f"never seen firing: {set(alerts()) - set(fires)}"
    # at least one silent check outside the "not yet" instants of the firing cases
    silent_cases = {check["alertname"] for case in tests["tests"]
                    if all(not check["exp_alerts"] for check in case["alert_rule_test"])
                    for check in case["alert_rule_test"]}
    assert silent_cases == set(alerts()), \
        f"no case where it must not fire: {set(alerts()) - silent_cases}"


@pytest.mark.parametrize("alert", sorted(alerts()))
def test_the_unit_tests_catch_a_rule_that_never_fires(alert: str, tmp_path: Path) -> None:
    """Replace one alert's expression by one that never returns anything: promtool's
    tests must fail, naming that alert."""
    text = RULES.read_text()
    block = re.search(rf"- alert: {alert}\n(.*?)(?=\n      - alert: |\Z)", text, re.DOTALL)
    assert block is not None
    expr = re.search(r"\n        expr: (?:>-\n(?:          .*\n)+|.*\n)", block.group(0))
    assert expr is not None
    broken = block.group(0).replace(expr.group(0), "\n        expr: absent(vector(1))\n")
    assert broken != block.group(0)
    (tmp_path / RULES.name).write_text(text.replace(block.group(0), broken))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    assert run_promtool("check", "rules", tmp_path / RULES.name).returncode == 0
    result = run_promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}," in result.stdout, result.stdout
