"""monitoring/: the PrometheusRule, its promtool unit tests, the PodMonitor and
the Grafana dashboard; and /metrics as promtool checks it.

promtool comes from Debian's `prometheus` package (.ci/run installs it); with
`CI` set a missing promtool fails these tests instead of skipping them.
"""

import re
import subprocess
import urllib.request

import pytest
import yaml

import k8svent
from test.pods import make_pod
from test.service import Service, service_env
from test.test_ship import ROOT, find_tool, pod_spec, the_container, the_one

MONITORING = ROOT / "monitoring"
RULE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "rules-test.yaml"
POD_MONITOR = MONITORING / "podmonitor.yaml"
DASHBOARD = MONITORING / "dashboard.json"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
RUNBOOK_URL = "https://github.com/atomist/k8svent/blob/main/docs/alerts.md#"
# Metrics the alerts and the dashboard may name before k8svent exports them:
# k8svent_leader comes with the Lease (issue 21, high availability).
NOT_YET_EXPORTED = {"k8svent_leader"}
# What Grafana puts in place of its variables, for promtool.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
}


def promtool():
    return find_tool("promtool", requirements="Debian's prometheus package")


def load(path):
    with path.open() as f:
        return yaml.safe_load(f)


def alerts():
    """The alerting rules of the PrometheusRule, by name."""
    rules = [rule for group in load(RULE)["spec"]["groups"] for rule in group["rules"]]
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


def exported_metrics():
    """Every series name k8svent's registry exports."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "info": ["_info"],
        "gauge": [""],
    }
    return {
        family.name + suffix
        for family in k8svent.Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def named_metrics(expr):
    return set(re.findall(r"\bk8svent_[a-z_]+\b", expr))


def dashboard_queries():
    """Every PromQL query of the dashboard, Grafana's variables filled in."""
    dashboard = yaml.safe_load(DASHBOARD.read_text())  # JSON is YAML
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, LABEL) is Grafana's: its metric is the query.
            found = re.fullmatch(r"label_values\((.+), *\w+\)", variable["definition"])
            queries.append(found.group(1))
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def test_prometheus_rule_groups_pass_promtool_check_rules(tmp_path):
    rules = tmp_path / "k8svent.rules.yaml"
    rules.write_text(yaml.safe_dump(load(RULE)["spec"]))
    checked = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout.decode()


def test_promtool_unit_tests_pass(tmp_path):
    (tmp_path / "k8svent.rules.yaml").write_text(yaml.safe_dump(load(RULE)["spec"]))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    tested = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True
    )
    assert tested.returncode == 0, tested.stdout.decode() + tested.stderr.decode()


def test_every_alert_has_a_test_that_fires_and_one_that_stays_silent():
    fires, silent = set(), set()
    for case in load(RULE_TESTS)["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert fires == set(alerts()) and silent == set(alerts())
    assert {"K8sventDeliveriesLagging", "K8sventWebhookDown", "K8sventAbsent"} <= set(alerts())
    assert "k8svent_delivery_oldest_owed_seconds" in alerts()["K8sventDeliveriesLagging"]["expr"]
    assert "k8svent_endpoint_up" in alerts()["K8sventWebhookDown"]["expr"]


def test_every_alert_has_a_summary_a_description_and_a_runbook_section():
    headings = re.findall(r"^## (\S+)$", ALERTS_DOC.read_text(), re.M)
    for name, rule in alerts().items():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == RUNBOOK_URL + name.lower()
        assert name in headings, f"docs/alerts.md has no section ## {name}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_dashboard_queries_parse(tmp_path):
    # As recording rules: promtool parses each expression.
    queries = dashboard_queries()
    rules = tmp_path / "dashboard.rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"k8svent:dashboard_query_{i}", "expr": query}
                            for i, query in enumerate(queries)
                        ],
                    }
                ]
            }
        )
    )
    checked = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert "$" not in "".join(queries), "a Grafana variable the test does not fill in"


def test_alerts_and_dashboard_name_only_metrics_k8svent_exports():
    exported = exported_metrics()
    assert "k8svent_deliveries_total" in exported and "k8svent_endpoint_up" in exported
    for expr in [*dashboard_queries(), *(rule["expr"] for rule in alerts().values())]:
        assert named_metrics(expr), f"names no k8svent metric: {expr}"
        unknown = named_metrics(expr) - exported - NOT_YET_EXPORTED
        assert not unknown, f"{expr} names metrics k8svent does not export: {unknown}"


def test_dashboard_shows_lag_backlog_outcomes_health_and_the_leader():
    named = set().union(*map(named_metrics, dashboard_queries()))
    assert {
        "k8svent_delivery_oldest_owed_seconds",
        "k8svent_deliveries_owed",
        "k8svent_deliveries_total",
        "k8svent_endpoint_up",
        "k8svent_leader",
    } <= named


def test_pod_monitor_scrapes_the_pods_of_deploy_yaml():
    monitor = load(POD_MONITOR)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    deployment = the_one("Deployment")
    spec = monitor["spec"]
    assert spec["namespaceSelector"]["matchNames"] == [deployment["metadata"]["namespace"]]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = spec["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in the_container()["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    # the port k8svent listens on, and the one the pod's annotations name
    listen = {e["name"]: e.get("value") for e in the_container()["env"]}["K8SVENT_LISTEN"]
    assert listen.endswith(f":{ports[endpoint['port']]}")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports[endpoint["port"]])
    # k8svent's `endpoint` label must not become exported_endpoint
    assert endpoint["honorLabels"] is True
    assert pod_spec()["serviceAccountName"]  # deploy.yaml is what was read


def test_metrics_pass_promtool_check_metrics(
    kubeapi, kubeconfig, kubectl_path, tmp_path, receivers
):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers(answers=[503])  # a retry, then a success: every family has series
    service = Service(
        [
            f"--kubectl={kubectl_path}",
            "--listen=127.0.0.1:0",
            "--upgrade=never",
            "--retry-interval=0.3",
            f"--url={receiver.url}",
        ],
        service_env(kubeconfig),
        tmp_path / "run",
    )
    try:
        receiver.wait_for(1)
        service.wait_log(r"listening on http://127\.0\.0\.1:\d+")
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.log()).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read()
    finally:
        service.kill()
    assert b'k8svent_deliveries_total{endpoint="http://127.0.0.1:' in text
    checked = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    # Every family says what it means.
    families = re.findall(rb"^# TYPE (\S+) ", text, re.M)
    helps = dict(re.findall(rb"^# HELP (\S+) (.+)$", text, re.M))
    assert families and all(len(helps.get(name, b"")) >= 20 for name in families)
