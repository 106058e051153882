"""Health, metrics and structured logs: real k8svent processes, scraped over HTTP."""

import json
import re
import socket
import time
from pathlib import Path

import prometheus_client.parser
import pytest
import requests

import k8svent
from test.pods import make_pod
from test.service import Service, service_env

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
FAST = ["--mode=poll", "--interval=0.3", "--retry-interval=0.3", "--log-level=debug"]


@pytest.fixture
def start(kubeapi, kubeconfig, kubectl_path, tmp_path):
    """Start k8svent listening on 127.0.0.1:0; return (service, base URL)."""
    started = []

    def run(*args, env=None):
        argv = [f"--kubectl={kubectl_path}", "--listen=127.0.0.1:0", *FAST, *args]
        service = Service(argv, service_env(kubeconfig, env), tmp_path / f"run{len(started)}")
        started.append(service)
        service.wait_log(r"listening on http://127\.0\.0\.1:\d+")
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.log()).group(1)
        return service, f"http://127.0.0.1:{port}"

    yield run
    for service in started:
        service.kill()


def scrape(base):
    """GET /metrics and parse it: {(sample name, sorted labels): value}."""
    response = requests.get(f"{base}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in prometheus_client.parser.text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metric(base, predicate, timeout=30):
    """Scrape until predicate(samples) holds; return those samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {samples}")
        time.sleep(0.1)


def status(base, path):
    return requests.get(f"{base}{path}", timeout=5).status_code


def test_metrics_count_polls_pods_and_deliveries(kubeapi, start, receivers):
    pods = [make_pod("default", f"web-{i}") for i in range(3)] + [
        make_pod("default", "sick", healthy=False)
    ]
    for pod in pods:
        kubeapi.put_pod(pod)
    good = receivers()
    # the failing endpoint: a path and query that must never become a label
    failing = receivers([503] * 10000)
    failing_url = failing.url + "/t0ken?key=s3cr3t"
    service, base = start(f"--url={good.url}", f"--url={failing_url}")
    good_label = f"http://127.0.0.1:{good.port}"
    failing_label = f"http://127.0.0.1:{failing.port}"
    good.wait_for(4)
    service.wait_polls(3)
    samples = wait_metric(
        base,
        lambda s: (
            value(s, "k8svent_deliveries_total", endpoint=failing_label, outcome="retry") >= 3
        ),
    )

    assert value(samples, "k8svent_polls_total", outcome="success") >= 3
    assert value(samples, "k8svent_polls_total", outcome="failure") == 0
    assert value(samples, "k8svent_poll_duration_seconds_count") >= 3
    assert value(samples, "k8svent_pods_seen") == 4
    assert value(samples, "k8svent_pods_selected_total", reason="new") == 4
    assert value(samples, "k8svent_pods_selected_total", reason="unhealthy") >= 2
    assert value(samples, "k8svent_pods_selected_total", reason="deleted") == 0
    assert (
        time.time() - 30
        < value(samples, "k8svent_last_successful_poll_timestamp_seconds")
        <= time.time()
    )
    # the healthy endpoint took every pod (the sick one again on each poll)
    assert value(samples, "k8svent_deliveries_total", endpoint=good_label, outcome="success") >= 4
    assert value(samples, "k8svent_deliveries_total", endpoint=good_label, outcome="retry") == 0
    # the failing one: every attempt counted as a retry, nothing delivered
    assert (
        value(samples, "k8svent_deliveries_total", endpoint=failing_label, outcome="success") == 0
    )
    assert value(samples, "k8svent_delivery_latency_seconds_count", endpoint=failing_label) >= 3
    assert value(samples, "k8svent_deliveries_owed", endpoint=failing_label) == 4
    assert value(samples, "k8svent_build_info", version=k8svent.version()) == 1
    assert value(samples, "k8svent_newer_version_available", version="") == 0
    text = requests.get(f"{base}/metrics", timeout=5).text
    assert "t0ken" not in text and "s3cr3t" not in text and "/hook" not in text

    kubeapi.delete_pod("default", "web-0")
    samples = wait_metric(
        base, lambda s: value(s, "k8svent_pods_selected_total", reason="deleted") == 1
    )
    assert value(samples, "k8svent_pods_seen") == 3
    assert service.stop() == 0


def test_rejected_deliveries_are_counted(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers([401])
    service, base = start(f"--url={receiver.url}")
    label = f"http://127.0.0.1:{receiver.port}"
    receiver.wait_attempts(1)  # rejected: that state is not sent again
    samples = wait_metric(
        base,
        lambda s: value(s, "k8svent_deliveries_total", endpoint=label, outcome="rejected") == 1,
    )
    assert value(samples, "k8svent_deliveries_total", endpoint=label, outcome="success") == 0
    kubeapi.put_pod(make_pod("default", "web"))  # a new resourceVersion
    receiver.wait_for(1)
    wait_metric(
        base, lambda s: value(s, "k8svent_deliveries_total", endpoint=label, outcome="success") == 1
    )
    assert service.stop() == 0


def test_owed_rises_during_an_outage_and_falls_after(kubeapi, start, receivers):
    pods = [make_pod("default", f"web-{i}") for i in range(3)]
    for pod in pods:
        kubeapi.put_pod(pod)
    receiver = receivers()
    service, base = start(f"--url={receiver.url}")
    label = f"http://127.0.0.1:{receiver.port}"
    receiver.wait_for(3)
    wait_metric(
        base, lambda s: value(s, "k8svent_deliveries_total", endpoint=label, outcome="success") == 3
    )
    assert value(scrape(base), "k8svent_deliveries_owed", endpoint=label) == 0

    receiver.down()
    for i in range(3, 8):
        kubeapi.put_pod(make_pod("default", f"web-{i}"))
    samples = wait_metric(base, lambda s: value(s, "k8svent_deliveries_owed", endpoint=label) == 5)
    samples = wait_metric(
        base, lambda s: value(s, "k8svent_deliveries_total", endpoint=label, outcome="retry") >= 5
    )
    assert value(samples, "k8svent_deliveries_total", endpoint=label, outcome="success") == 3

    receiver.up()
    receiver.wait_for(8, timeout=30)
    # The receiver has the body before k8svent has read the answer and
    # counted it: wait for both numbers rather than read one after the other.
    wait_metric(
        base,
        lambda s: (
            value(s, "k8svent_deliveries_owed", endpoint=label) == 0
            and value(s, "k8svent_deliveries_total", endpoint=label, outcome="success") == 8
        ),
    )
    assert sorted(receiver.keys()) == sorted(f"default/web-{i}" for i in range(8))
    assert service.stop() == 0


def test_readyz_waits_for_the_first_successful_poll(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.hang(3)  # the first list is slow, well within its timeout
    receiver = receivers()
    service, base = start(f"--url={receiver.url}", "--kubectl-timeout=20")
    assert status(base, "/readyz") == 503
    assert status(base, "/healthz") == 200
    receiver.wait_for(1)
    assert status(base, "/readyz") == 200
    assert status(base, "/healthz") == 200
    assert status(base, "/nothing") == 404
    assert service.stop() == 0


def test_a_slow_kubectl_within_its_timeout_is_not_stuck(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers()
    # stuck after 3 x 0.3 s + 8 s without progress; the list takes 4 s
    service, base = start(f"--url={receiver.url}", "--kubectl-timeout=8")
    receiver.wait_for(1)
    kubeapi.hang(4)
    # A poll may be under way already: the hung one has ended once two more
    # polls have; the longest wait between two polls is the slow one.
    began = last = time.monotonic()
    polls = seen = service.polls()
    longest, answers = 0.0, []
    while seen < polls + 2:
        answers.append(status(base, "/healthz"))
        assert time.monotonic() - began < 20, "the slow poll never finished"
        time.sleep(0.1)
        if service.polls() != seen:
            seen, now = service.polls(), time.monotonic()
            longest, last = max(longest, now - last), now
    assert longest >= 3.5, "kubectl was not slow"
    assert set(answers) == {200}
    assert "poll failed" not in service.log()
    assert service.stop() == 0


def test_a_failing_kubectl_is_not_stuck_either(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers()
    service, base = start(f"--url={receiver.url}")
    receiver.wait_for(1)
    kubeapi.fail(500, count=1000)
    service.wait_log("poll failed, nothing changed", 3)
    samples = scrape(base)
    assert value(samples, "k8svent_polls_total", outcome="failure") >= 3
    assert value(samples, "k8svent_kubernetes_api_up") == 0
    # the API server is in trouble, not k8svent: live, not ready, and why
    assert status(base, "/healthz") == 200
    answer = requests.get(f"{base}/readyz", timeout=5)
    assert answer.status_code == 503 and "listing pods failed" in answer.text
    kubeapi.clear_rules()
    polls = service.polls()
    service.wait_polls(polls + 1)
    assert status(base, "/readyz") == 200
    assert value(scrape(base), "k8svent_kubernetes_api_up") == 1
    assert service.stop() == 0


def _settings(*argv):
    return k8svent.settings_from(k8svent.parse_arguments(list(argv)), {})


def test_healthz_503_when_the_poller_thread_is_dead(tmp_path):
    settings = _settings(
        "--dry-run", "--kubectl=/nonexistent/kubectl", "--interval=0.1", "--retry-interval=0.1"
    )
    store = k8svent.Store(str(tmp_path / "state.db"))
    poller = k8svent.Poller(settings, store, [])
    server = k8svent.StatusServer(("127.0.0.1", 0))
    server.start(k8svent.Health(poller, settings))
    try:
        assert status(server.url, "/healthz") == 503  # not started yet
        poller.start()
        assert status(server.url, "/healthz") == 200
        assert status(server.url, "/readyz") == 503  # kubectl is missing
        poller.stop()
        poller.join(5)
        assert not poller.is_alive()
        response = requests.get(f"{server.url}/healthz", timeout=5)
        assert response.status_code == 503
        assert "not running" in response.text
    finally:
        server.stop()
        store.close()


def test_healthz_503_when_the_poller_makes_no_progress(kubeapi, kubeconfig, kubectl_path, tmp_path):
    settings = _settings(
        "--dry-run",
        f"--kubectl={kubectl_path}",
        "--interval=10",
        "--retry-interval=5",
        "--kubectl-timeout=60",
    )
    assert k8svent.stuck_after_seconds(settings) == 3 * 10 + 60
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.hang(3)
    store = k8svent.Store(str(tmp_path / "state.db"))
    poller = k8svent.Poller(settings, store, [])
    later = [0.0]
    health = k8svent.Health(poller, settings, clock=lambda: time.monotonic() + later[0])
    poller.start()
    try:
        deadline = time.monotonic() + 10
        while not any("/pods" in path for _, path in kubeapi.requests):
            assert time.monotonic() < deadline, "kubectl never asked for pods"
            time.sleep(0.05)
        # the poller is inside a kubectl that hangs
        assert health.live() == (True, "ok")
        later[0] = 85
        assert health.live() == (True, "ok")
        later[0] = 91
        ok, why = health.live()
        assert not ok and re.search(r"no progress for 9\d s \(limit 90 s\)", why)
    finally:
        poller.stop()
        poller.join(10)
        store.close()


@pytest.mark.parametrize(
    "alive, idle, trouble",
    [
        (True, 0, None),
        (True, 90, None),
        (True, 90.5, "no progress"),
        (False, 0, "not running"),
    ],
)
def test_poller_trouble(alive, idle, trouble):
    found = k8svent.poller_trouble(alive, idle, 90)
    assert (found is None) if trouble is None else (trouble in found)


def test_the_docs_document_every_metric():
    text = OPERATIONS.read_text()
    section = text.split("\n## Health and metrics\n", 1)[1].split("\n## ", 1)[0]
    suffix = {"counter": "_total", "info": "_info"}
    names = [
        family.name + suffix.get(family.type, "") for family in k8svent.metrics.registry.collect()
    ]
    assert len(names) >= 10
    for name in names:
        assert f"`{name}`" in section, f"{name} is not in docs/operations.md"


def test_newer_version_gauge():
    metrics = k8svent.Metrics()
    metrics.set_newer_version("1.2.3")
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert 'k8svent_newer_version_available{version="1.2.3"} 1.0' in text
    assert 'version=""' not in text
    metrics.set_newer_version(None)
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert 'k8svent_newer_version_available{version=""} 0.0' in text
    assert "1.2.3" not in text


def test_an_address_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert k8svent.main(["--dry-run", f"--listen=127.0.0.1:{port}"], {}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"k8svent: error: cannot listen on 127.0.0.1:{port}: ")


def test_json_logs_are_one_object_per_line(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.put_pod(make_pod("default", "sick", healthy=False))
    receiver = receivers(
        [503, 401, (200, {"Content-Type": "application/json"}, b'{"correlation_id": "abc-123"}')]
    )
    service, _ = start(f"--url={receiver.url}/path?token=s3cr3t", "--log-format=json")
    receiver.wait_for(3)
    service.wait_polls(service.polls() + 2)
    assert service.stop() == 0
    lines = service.log().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == len(lines) > 5
    for entry in entries:
        assert {"time", "level", "message"} <= entry.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert entry["level"] in ("debug", "info", "warning", "error")
    label = f"http://127.0.0.1:{receiver.port}"
    about_pods = [e for e in entries if "pod" in e]
    assert about_pods
    for entry in about_pods:
        assert entry["endpoint"] == label
        assert entry["pod"] in ("default/web", "default/sick")
    assert any(e.get("status") == 503 and e["level"] == "debug" for e in entries)
    assert any(e.get("status") == 401 and e["level"] == "error" for e in entries)
    assert any(e.get("correlation_id") == "abc-123" and e.get("status") == 200 for e in entries)
    assert any(e["message"].startswith("listening on http://127.0.0.1:") for e in entries)
