"""The suite's alert rules (deploy/helm/maas/files/maas-alerts.yml, the one copy) checked by
Prometheus's own `promtool`: valid rules, and unit tests in deploy/prometheus/ that see each
alert fire and stay quiet.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "helm" / "maas" / "files" / "maas-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "maas-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
ALERTS = ("MaasServiceDown", "MaasHighErrorRatio", "MaasRpcLatencyP99OverSlo",
          "MaasDeploymentLatencyP99OverSlo", "MaasJobsWaitingTooLong", "MaasTritonNotReady",
          "MaasRegistryDiskNearlyFull", "MaasShadowDisagreement")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian: prometheus) missing")


def promtool(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *arguments], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def rules_by_alert(document: dict) -> dict[str, dict]:
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


def test_the_rules_file_is_valid_and_names_every_promised_alert():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert set(rules_by_alert(yaml.safe_load(RULES.read_text()))) == set(ALERTS)


def test_the_unit_tests_pass():
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_seen_firing():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case["exp_alerts"]}
    assert firing == set(ALERTS)


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_is_seen_quiet(tmp_path, alert):
    """An alert that fired on anything (its expression or a constant) fails the unit tests:
    they check its quiet cases too."""
    document = yaml.safe_load(RULES.read_text())
    rule = rules_by_alert(document)[alert]
    rule["expr"] = f"({rule['expr'].strip()}) or vector(1)"
    (tmp_path / "helm" / "maas" / "files").mkdir(parents=True)
    (tmp_path / "helm" / "maas" / "files" / RULES.name).write_text(yaml.safe_dump(document))
    (tmp_path / "prometheus").mkdir()
    shutil.copy(RULE_TESTS, tmp_path / "prometheus" / RULE_TESTS.name)
    tested = promtool("test", "rules", str(tmp_path / "prometheus" / RULE_TESTS.name))
    assert tested.returncode != 0
    assert alert in tested.stdout + tested.stderr
