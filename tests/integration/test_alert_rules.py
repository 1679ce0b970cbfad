"""rlmon's Prometheus alert rules: promtool validates them and runs their unit tests."""

from __future__ import annotations

import re
import subprocess

from tests.integration.helpers import REPO, promtool
from tests.integration.prometheus import ALERT_RULES, RULES_DIR

RULE_TESTS = RULES_DIR / "rlmon_alerts_test.yml"


def _alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", ALERT_RULES.read_text(), re.MULTILINE)


def test_promtool_check_rules_passes():
    """`promtool check rules` accepts the rules file and finds every alert in it."""
    result = subprocess.run([promtool(), "check", "rules", str(ALERT_RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    """`promtool test rules` passes the unit tests (series in, alerts and annotations out)."""
    result = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULES_DIR,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_severity_and_delay():
    """Each alert is exercised by the unit tests and declares `for:` and a severity label."""
    rules, tests = ALERT_RULES.read_text(), RULE_TESTS.read_text()
    names = _alert_names()
    tested = set(re.findall(r"^\s*alertname: (\w+)$", tests, re.MULTILINE))
    assert len(names) == len(set(names)) >= 10
    assert sorted(set(names) - tested) == []
    blocks = re.split(r"^\s*- alert: ", rules, flags=re.MULTILINE)[1:]
    for name, block in zip(names, blocks):
        assert re.search(r"^\s+for: \d+[smh]$", block, re.MULTILINE), name
        assert re.search(r"^\s+severity: (warning|critical)$", block, re.MULTILINE), name


def test_alert_rules_use_only_documented_metrics():
    """Every rlmon_* name in the rules is listed in docs/metrics.md (the exporter's contract)."""
    documented = (REPO / "docs" / "metrics.md").read_text()
    code = "\n".join(line for line in ALERT_RULES.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\brlmon_[a-z_]+", code))
    assert used and sorted(name for name in used if f"`{name}`" not in documented) == []
