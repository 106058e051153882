"""What is sent, end to end: --format (CloudEvents) and --send (kinds of change).

The real kubectl against the test API server; receivers on 127.0.0.1 that
verify every signature; what they get parsed by the cloudevents SDK, as a
receiver built on it would.
"""

import http.server
import json
import re
import threading
import urllib.request
from pathlib import Path

import pytest
from cloudevents.core.bindings import http as http_binding

import k8svent
from test.pods import make_pod
from test.service import Service, service_env
from test.test_watch import changed

SECRET = "whsec_" + "a2V5LWZvci1jbG91ZGV2ZW50cw=="
QUIET = ["--mode=watch", "--interval=600", "--resync=0", "--retry-interval=0.3"]
TYPE = "com.atomist.k8svent.pod."


@pytest.fixture
def start(kubeapi, kubeconfig, kubectl_path, tmp_path):
    """Start k8svent with args (watch mode, quiet, debug log); kill it afterwards."""
    started = []

    def run(*args):
        service = Service(
            [f"--kubectl={kubectl_path}", "--log-level=debug", *args],
            service_env(kubeconfig),
            tmp_path / f"run{len(started)}",
        )
        started.append(service)
        return service

    yield run
    for service in started:
        service.kill()


def event_of(request):
    """The CloudEvent a request carries, as the cloudevents SDK 2.2.0 parses it."""
    return http_binding.from_http_event(http_binding.HTTPMessage(request.headers, request.body))


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-json"])
def test_every_request_retries_included_is_a_cloudevent(fmt, kubeapi, start, receivers):
    web = make_pod("default", "web")
    kubeapi.put_pod(web)
    # Each new delivery is refused once (503), then accepted: every one is retried.
    tried = set()

    def respond(request):
        event = event_of(request)
        if event.get_id() in tried:
            return 200
        tried.add(event.get_id())
        return 503

    receiver = receivers(secret=SECRET, respond=respond)
    service = start(*QUIET, f"--format={fmt}", f"--secret={SECRET}", f"--url={receiver.url}")
    receiver.wait_for(1)
    assert kubeapi.wait_open_watches(1)
    web2 = changed(web, "2")
    kubeapi.put_pod(web2)
    receiver.wait_for(2)
    kubeapi.delete_pod("default", "web")
    received = receiver.wait_for(3)

    events = [event_of(r) for r in received]
    assert [e.get_type() for e in events] == [TYPE + "new", TYPE + "changed", TYPE + "deleted"]
    assert [e.get_data()["metadata"].get("labels", {}).get("change") for e in events] == [
        None,
        "2",
        "2",
    ]
    assert events[2].get_data()["status"]["phase"] == "Deleted"
    source = events[0].get_source()
    assert source == kubeapi.url.rstrip("/")
    for event in events:
        assert event.get_specversion() == "1.0"
        assert event.get_source() == source
        assert event.get_subject() == "/api/v1/namespaces/default/pods/web"
        assert event.get_datacontenttype() == "application/json"
        assert event.get_time() is not None and event.get_time().tzinfo is not None
        assert event.get_data()["metadata"]["name"] == "web"
    assert len({e.get_id() for e in events}) == 3

    # Every request, the refused first attempts too, is an event whose id is
    # its webhook-id; a retry repeats the id and the time of the change.
    requests = receiver.requests
    assert len(requests) == 6
    by_id = {}
    for request in requests:
        event = event_of(request)
        assert event.get_id() == request.headers["webhook-id"]
        by_id.setdefault(event.get_id(), []).append(event)
        if fmt == "cloudevents":
            assert request.headers["ce-specversion"] == "1.0"
            assert request.headers["content-type"] == "application/json"
            assert json.loads(request.body) == event.get_data()
        else:
            assert request.headers["content-type"] == "application/cloudevents+json"
            assert not any(name.startswith("ce-") for name in request.headers)
    assert sorted(map(len, by_id.values())) == [2, 2, 2]
    for first, retry in by_id.values():
        assert first.get_attributes() == retry.get_attributes()
    assert service.stop() == 0


def test_dry_run_prints_structured_cloudevents(kubeapi, kubectl_path, kubeconfig, tmp_path):
    kubeapi.put_pod(make_pod("default", "web"))
    service = Service(
        [f"--kubectl={kubectl_path}", "--dry-run", "--once", "--format=cloudevents"],
        service_env(kubeconfig),
        tmp_path / "run",
    )
    assert service.wait() == 0
    (line,) = service.stdout().splitlines()
    headers = {"Content-Type": "application/cloudevents+json"}
    event = http_binding.from_http_event(http_binding.HTTPMessage(headers, line.encode()))
    assert event.get_type() == TYPE + "new"
    assert event.get_data()["metadata"]["name"] == "web"


def owed_backlog(service):
    """k8svent_deliveries_owed of the one webhook, read from /metrics."""
    port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.log()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return float(re.search(r"^k8svent_deliveries_owed\{[^}]*\} (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("mode", ["watch", "poll"])
def test_send_deleted_sends_nothing_at_the_first_list_and_then_only_deletions(
    mode, kubeapi, start, receivers
):
    healthy, sick = make_pod("default", "web"), make_pod("default", "sick", healthy=False)
    kubeapi.put_pod(healthy)
    kubeapi.put_pod(sick)
    receiver = receivers()
    # A short interval: the pod under duress would be owed again and again.
    service = start(
        f"--mode={mode}",
        "--interval=0.3",
        "--resync=0",
        "--retry-interval=0.3",
        "--send=deleted",
        "--listen=127.0.0.1:0",
        f"--url={receiver.url}",
    )
    service.wait_log(r"(?:poll|list): 2 pods seen; sending 0 deleted \(")
    if mode == "watch":
        assert kubeapi.wait_open_watches(1)
    kubeapi.put_pod(changed(healthy, "2"))
    kubeapi.put_pod(make_pod("default", "late"))
    if mode == "watch":
        service.wait_log(r"watch: ADDED default/late \(new\)")
    else:
        service.wait_log(r"poll: 3 pods seen")
    assert owed_backlog(service) == 0  # nothing waits for nobody
    kubeapi.delete_pod("default", "sick")
    kubeapi.delete_pod("default", "late")
    received = receiver.wait_for(2)
    assert sorted(receiver.keys()) == ["default/late", "default/sick"]
    assert all(p["status"]["phase"] == "Deleted" for p in receiver.pods())
    # Nothing else, before or after: a few more duress intervals go by.
    if mode == "poll":
        service.wait_polls(service.polls() + 3)
    else:
        kubeapi.put_pod(changed(healthy, "3"))
        service.wait_log(r"watch: MODIFIED default/web \(changed\)", count=2)
    assert receiver.requests == received
    assert owed_backlog(service) == 0
    assert service.stop() == 0


def test_the_plain_cloudevents_receiver_of_the_docs_reads_both_modes(capsys):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "receiving.md").read_text()
    code = re.search(r"### A plain CloudEvents receiver.*?```python\n(.*?)```", doc, re.S)
    serve = 'http.server.HTTPServer(("127.0.0.1", 8000), Receiver).serve_forever()'
    assert serve in code.group(1)
    scope = {}
    exec(code.group(1).replace(serve, ""), scope)  # noqa: S102 - our own docs
    server = http.server.HTTPServer(("127.0.0.1", 0), scope["Receiver"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pod = make_pod("default", "web")
    try:
        for fmt in ("cloudevents", "cloudevents-json"):
            body, headers = k8svent.message(
                fmt, "deleted", "default/web", k8svent.encode_pod(pod), "msg_1", 0.0, "/k8svent"
            )
            url = f"http://127.0.0.1:{server.server_address[1]}/"
            request = urllib.request.Request(url, data=body, headers=headers)
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 204
    finally:
        server.shutdown()
        server.server_close()
    printed = capsys.readouterr().out.splitlines()
    line = "com.atomist.k8svent.pod.deleted /api/v1/namespaces/default/pods/web Running"
    assert printed == [line, line]


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-json"])
def test_the_ping_of_check_is_a_cloudevent_too(
    fmt, kubeapi, kubeconfig, kubectl_path, receivers, tmp_path
):
    receiver = receivers(secret=SECRET)
    service = Service(
        [
            "check",
            f"--kubectl={kubectl_path}",
            f"--format={fmt}",
            f"--secret={SECRET}",
            f"--url={receiver.url}",
        ],
        service_env(kubeconfig),
        tmp_path / "run",
    )
    assert service.wait(60) == 0, service.stdout()
    (ping,) = receiver.received
    event = event_of(ping)
    assert event.get_type() == "com.atomist.k8svent.ping"
    assert event.get_id() == ping.headers["webhook-id"]
    assert event.get_source() == kubeapi.url.rstrip("/")
    assert event.get_data() == {"version": k8svent.version()}
