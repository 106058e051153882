"""End to end: the real kubectl, the test API server, receivers on 127.0.0.1."""

import base64
import collections
import copy
import hashlib
import hmac
import json
import re
import subprocess
import time

import pytest

from test.pods import make_pod
from test.service import Service, service_env, signal

# The poll mode, whose tests count polls; test_watch.py has the watch mode.
FAST = ["--mode=poll", "--interval=0.5", "--retry-interval=0.3", "--log-level=debug"]


@pytest.fixture
def start(kubeapi, kubeconfig, kubectl_path, tmp_path):
    """Start k8svent with args (FAST timings unless given); stop it afterwards."""
    started = []

    def run(*args, env=None, fast=True, kubectl=None):
        argv = [f"--kubectl={kubectl or kubectl_path}", *(FAST if fast else ()), *args]
        service = Service(argv, service_env(kubeconfig, env), tmp_path / f"run{len(started)}")
        started.append(service)
        return service

    yield run
    for service in started:
        service.kill()


def put(kubeapi, *pods):
    for pod in pods:
        kubeapi.put_pod(pod)


def key(pod):
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def relabel(pod, value):
    changed = copy.deepcopy(pod)
    changed["metadata"].setdefault("labels", {})["change"] = value
    return changed


def test_first_poll_sends_every_pod_to_every_url(kubeapi, start, receivers):
    pods = [make_pod("default", f"web-{i}") for i in range(5)] + [make_pod("kube-system", "dns")]
    put(kubeapi, *pods)
    first, second = receivers(), receivers()
    service = start(f"--url={first.url}", f"--url={second.url}", "--chunk-size=2")
    for receiver in (first, second):
        receiver.wait_for(6)
        assert sorted(receiver.keys()) == sorted(key(p) for p in pods)
    service.wait_polls(3)
    # unchanged healthy pods are not sent again
    assert len(first.received) == 6 and len(second.received) == 6
    assert service.stop() == 0


def test_unhealthy_changed_and_deleted(kubeapi, start, receivers):
    healthy = make_pod("default", "healthy")
    sick = make_pod("default", "sick", healthy=False)
    doomed = make_pod("default", "doomed")
    job = make_pod("default", "job", phase="Succeeded")
    put(kubeapi, healthy, sick, doomed, job)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(4)
    polls = service.polls()
    service.wait_polls(polls + 3)
    keys = receiver.keys()
    # the unhealthy pod is re-sent every poll; the rest, including the
    # finished Job pod, only once
    assert keys.count("default/sick") >= 3
    assert keys.count("default/healthy") == keys.count("default/doomed") == 1
    assert keys.count("default/job") == 1

    kubeapi.put_pod(relabel(healthy, "yes"))
    kubeapi.delete_pod("default", "doomed")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
        receiver.keys().count("default/healthy") == 2
        and receiver.keys().count("default/doomed") == 2
    ):
        time.sleep(0.05)
    service.wait_polls(service.polls() + 3)
    pods = receiver.pods()
    healthy_sent = [p for p in pods if key(p) == "default/healthy"]
    doomed_sent = [p for p in pods if key(p) == "default/doomed"]
    assert len(healthy_sent) == 2 and healthy_sent[1]["metadata"]["labels"]["change"] == "yes"
    # deleted: the last known object, once, with phase Deleted
    assert len(doomed_sent) == 2
    assert doomed_sent[1]["status"]["phase"] == "Deleted"
    assert doomed_sent[1]["metadata"] == doomed_sent[0]["metadata"]
    assert service.stop() == 0


def test_payload_is_what_kubectl_get_prints(kubeapi, kubeconfig, kubectl_path, start, receivers):
    pod = make_pod("default", "web", init_container=True)
    put(kubeapi, pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 0
    printed = subprocess.run(
        [kubectl_path, "get", "pod", "web", "-n", "default", "-o", "json"],
        env=service_env(kubeconfig),
        capture_output=True,
        check=True,
    ).stdout
    (received,) = receiver.received
    assert json.loads(received.body) == {"pod": json.loads(printed)}
    assert received.headers["content-type"] == "application/json"
    assert received.headers["user-agent"].startswith("k8svent/")


@pytest.mark.parametrize("secret", ["s3cr3t", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
def test_signatures_verify(kubeapi, start, receivers, secret):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers(secret=secret)  # verifies all three signatures
    began = int(time.time())
    service = start(f"--url={receiver.url}", "--once", env={"K8SVENT_WEBHOOK_SECRET": secret})
    assert service.wait() == 0
    (received,) = receiver.received
    body = received.body
    assert (
        received.headers["x-atomist-signature"]
        == "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    )
    assert (
        received.headers["x-hub-signature-256"]
        == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    )
    assert re.fullmatch(r"msg_[0-9a-f]{26}", received.headers["webhook-id"])
    assert began <= int(received.headers["webhook-timestamp"]) <= time.time()
    assert received.headers["webhook-signature"].startswith("v1,")
    log = service.log()
    assert secret not in log
    for header in ("x-atomist-signature", "x-hub-signature-256", "webhook-signature"):
        assert received.headers[header][5:] not in log


def test_unsigned_without_a_secret(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers()  # refuses any signed request
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 0
    (received,) = receiver.received
    assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & received.headers.keys()


def test_retries_repeat_the_webhook_id(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers([503], secret="s3cr3t")
    service = start(f"--url={receiver.url}", "--once", env={"K8SVENT_WEBHOOK_SECRET": "s3cr3t"})
    assert service.wait() == 0
    assert receiver.statuses == [503, 200]
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body


def test_new_deliveries_get_new_webhook_ids(kubeapi, start, receivers):
    web, sick = make_pod("default", "web"), make_pod("default", "sick", healthy=False)
    put(kubeapi, web, sick)
    receiver = receivers(secret="s3cr3t")
    service = start(f"--url={receiver.url}", env={"K8SVENT_WEBHOOK_SECRET": "s3cr3t"})
    receiver.wait_for(3)  # web, and sick twice: re-sent on the next poll
    kubeapi.put_pod(relabel(web, "changed"))
    deadline = time.monotonic() + 20
    while receiver.keys().count("default/web") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.stop() == 0
    ids = collections.defaultdict(list)
    for received in receiver.received:
        ids[key(json.loads(received.body)["pod"])].append(received.headers["webhook-id"])
    assert len(ids["default/sick"]) >= 2 and len(ids["default/web"]) == 2
    every = ids["default/sick"] + ids["default/web"]
    assert len(set(every)) == len(every)


def test_503_then_200_gets_the_newest_state(kubeapi, start, receivers):
    pod = make_pod("default", "web")
    put(kubeapi, pod)
    receiver = receivers([503, 503, 503])
    service = start(f"--url={receiver.url}")
    receiver.wait_attempts(1)
    kubeapi.put_pod(relabel(pod, "newest"))
    receiver.wait_for(1)
    service.wait_polls(service.polls() + 2)
    pods = receiver.pods()
    assert len(pods) == 1, "a stale state was delivered besides the newest"
    assert pods[0]["metadata"]["labels"]["change"] == "newest"
    # no line per attempt; at most one down and one back up (503s of a
    # delivery that failed before do not count: they may be about the pod)
    down = service.count(r"WARNING webhook http://127\.0\.0\.1:\d+ is down \(HTTP 503\)")
    assert down <= 1 and down == service.count(
        r"WARNING webhook http://127\.0\.0\.1:\d+ "
        r"is back up"
    )
    assert service.count(r"WARNING") == 2 * down
    assert service.stop() == 0


def test_receiver_down_for_three_polls_gets_every_missed_change_once(kubeapi, start, receivers):
    steady, changing, doomed = (make_pod("default", n) for n in ("steady", "changing", "doomed"))
    put(kubeapi, steady, changing, doomed)
    up, flaky = receivers(), receivers()
    service = start(f"--url={up.url}", f"--url={flaky.url}")
    flaky.wait_for(3)
    flaky.wait_attempts(3)  # answered too: going down cuts no answer on its way
    up.wait_for(3)
    flaky.down()
    born = make_pod("default", "born")
    for step in range(3):
        kubeapi.put_pod(relabel(changing, f"v{step}"))
        if step == 1:
            kubeapi.delete_pod("default", "doomed")
            kubeapi.put_pod(born)
        service.wait_polls(service.polls() + 1)
    service.wait_polls(service.polls() + 1)
    flaky.up()
    flaky.wait_for(6, timeout=30)
    service.wait_polls(service.polls() + 3)
    missed = flaky.pods()[3:]
    assert sorted(key(p) for p in missed) == ["default/born", "default/changing", "default/doomed"]
    latest = {key(p): p for p in missed}
    assert latest["default/changing"]["metadata"]["labels"]["change"] == "v2"
    assert latest["default/doomed"]["status"]["phase"] == "Deleted"
    # the endpoint that stayed up saw every change, and was not held back
    assert up.keys().count("default/changing") == 4
    assert service.stop() == 0


def test_400_is_not_retried(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers([400])
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 1
    assert receiver.statuses == [400]
    assert "rejected (HTTP 400); not retrying" in service.log()


def test_4xx_fails_that_state_for_good_but_not_the_next(kubeapi, start, receivers):
    pod = make_pod("default", "web")
    put(kubeapi, pod)
    receiver = receivers([404])
    service = start(f"--url={receiver.url}")
    receiver.wait_attempts(1)
    service.wait_polls(service.polls() + 3)
    assert receiver.statuses == [404], "a rejected state was sent again"
    kubeapi.put_pod(relabel(pod, "next"))
    (received,) = receiver.wait_for(1)
    assert receiver.pods()[0]["metadata"]["labels"]["change"] == "next"
    assert service.stop() == 0


def test_sigterm_during_a_hung_poll_exits_promptly(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--kubectl-timeout=60")
    receiver.wait_for(1)
    asked = len(kubeapi.requests)
    kubeapi.hang(30)
    deadline = time.monotonic() + 10
    while not any("/pods" in path for _, path in kubeapi.requests[asked:]):
        assert time.monotonic() < deadline, "no poll asked for pods"
        time.sleep(0.05)  # then that poll hangs in kubectl
    began = time.monotonic()
    assert service.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began < 5
    assert "Deleted" not in [p["status"]["phase"] for p in receiver.pods()]


def test_signal_during_once_with_undelivered_pods_exits_1(kubeapi, start, receivers):
    put(kubeapi, *(make_pod("default", f"web-{i}") for i in range(3)))
    receiver = receivers([503] * 1000)
    service = start(f"--url={receiver.url}", "--once", "--workers=1")
    receiver.wait_attempts(1)
    assert service.stop(signal.SIGTERM) == 1


@pytest.mark.parametrize(
    "failure", ["500 on a later page", "truncated body", "expired continue", "kubectl hangs"]
)
def test_failing_polls_send_no_deletions(kubeapi, start, receivers, failure):
    put(kubeapi, *(make_pod("default", f"web-{i}") for i in range(5)))
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--chunk-size=2", "--kubectl-timeout=2")
    receiver.wait_for(5)
    polls = service.polls()
    if failure == "500 on a later page":
        kubeapi.fail(500, page=1)
    elif failure == "truncated body":
        kubeapi.truncate(page=1)
    elif failure == "expired continue":
        kubeapi.expire_continue()
    else:
        kubeapi.hang(10)
    if failure == "expired continue":
        service.wait_log("continue token expired; listing pods again")
    else:
        service.wait_log("poll failed, nothing changed", timeout=30)
    service.wait_polls(polls + 2)
    assert "Deleted" not in [p["status"]["phase"] for p in receiver.pods()]
    assert len(receiver.received) == 5
    assert service.stop() == 0


def test_kubectl_missing_sends_nothing_and_keeps_going(
    kubeapi, start, receivers, kubectl_path, tmp_path
):
    put(kubeapi, make_pod("default", "web"))
    link = tmp_path / "kubectl"
    link.symlink_to(kubectl_path)
    receiver = receivers()
    service = start(f"--url={receiver.url}", kubectl=str(link))
    receiver.wait_for(1)
    link.unlink()
    service.wait_log("poll failed, nothing changed; retrying in 0.3 s: kubectl not found", 2)
    assert receiver.keys() == ["default/web"]
    link.symlink_to(kubectl_path)
    service.wait_polls(service.polls() + 2)
    assert receiver.keys() == ["default/web"]
    assert service.stop() == 0


def test_once_says_it_exits_rather_than_a_retry_it_will_not_make(start, receivers, tmp_path):
    service = start(f"--url={receivers().url}", "--once", kubectl=str(tmp_path / "nokubectl"))
    assert service.wait() == 1
    assert "poll failed, nothing changed; exiting with status 1: kubectl not found" in service.log()
    assert "retrying" not in service.log()


def test_sigterm_exits_0_promptly(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", fast=False)
    receiver.wait_for(1)
    began = time.monotonic()
    assert service.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began < 5
    assert "received SIGTERM; stopping" in service.log()


def test_sigterm_does_not_wait_for_a_dead_endpoint_beyond_the_drain(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers([503] * 1000)
    service = start(f"--url={receiver.url}")
    receiver.wait_attempts(2)
    began = time.monotonic()
    assert service.stop(signal.SIGINT) == 0
    assert time.monotonic() - began < 12


def test_dry_run_once_prints_the_payloads(kubeapi, start):
    put(kubeapi, make_pod("default", "a"), make_pod("default", "b"))
    service = start("--dry-run", "--once")
    assert service.wait() == 0
    lines = service.stdout().splitlines()
    assert [json.loads(line)["pod"]["metadata"]["name"] for line in sorted(lines)] == ["a", "b"]


def test_url_password_never_logged(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers([503], secret="s3cr3t")
    url = receiver.url.replace("http://", "http://user:hunter2@")
    service = start(f"--url={url}", "--once", env={"K8SVENT_WEBHOOK_SECRET": "s3cr3t"})
    assert service.wait() == 0
    (received,) = receiver.received
    assert (
        received.headers["authorization"] == "Basic " + base64.b64encode(b"user:hunter2").decode()
    )
    log = service.log()
    assert "failed (HTTP 503)" in log
    assert "hunter2" not in log and "s3cr3t" not in log
    assert "://***@127.0.0.1" in log and "user:" not in log


def test_redirect_is_not_followed(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    target = receivers()
    receiver = receivers([(307, {"Location": target.url}, b"")])
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 1
    assert target.received == []


def test_retry_after_is_honoured_and_correlation_id_logged(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    receiver = receivers(
        [
            (429, {"Retry-After": "2"}, b""),
            (200, {"Content-Type": "application/json"}, b'{"correlation_id": "abc-123"}'),
        ]
    )
    service = start(f"--url={receiver.url}", "--once")
    began = time.monotonic()
    assert service.wait() == 0
    assert time.monotonic() - began >= 2
    assert "correlation_id abc-123" in service.log()


def test_http_proxy_is_used_and_no_proxy_honoured(kubeapi, start, receivers):
    put(kubeapi, make_pod("default", "web"))
    proxy, direct = receivers(), receivers()
    service = start(
        "--url=http://webhook.invalid/hook",
        f"--url={direct.url}",
        "--once",
        env={"HTTP_PROXY": f"http://user:pw@127.0.0.1:{proxy.port}", "NO_PROXY": "127.0.0.1"},
    )
    assert service.wait() == 0
    (via_proxy,) = proxy.received
    assert via_proxy.path == "http://webhook.invalid:80/hook"
    assert (
        via_proxy.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"user:pw").decode()
    )
    assert direct.keys() == ["default/web"] and direct.received[0].path == "/hook"


def labelled(namespace, name, **labels):
    pod = make_pod(namespace, name)
    pod["metadata"]["labels"] = labels
    return pod


SELECTION_PODS = [
    labelled("prod", "web", app="web", tier="front"),
    labelled("prod", "cache", app="web", tier="cache"),
    labelled("staging", "web", app="web", canary="yes"),
    labelled("dev", "web", app="web"),
    labelled("dev", "api", app="api"),
    labelled("kube-system", "dns", app="dns"),
]


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--selector=app=web,tier!=cache"], {}, ["dev/web", "prod/web", "staging/web"]),
        (
            [],
            {"K8SVENT_SELECTOR": "app in (web, dns), !canary"},
            ["dev/web", "kube-system/dns", "prod/cache", "prod/web"],
        ),
        (
            ["--exclude-namespace=kube-system", "--exclude-namespace=dev"],
            {},
            ["prod/cache", "prod/web", "staging/web"],
        ),
        (["--selector=app=web"], {"K8SVENT_EXCLUDE_NAMESPACES": "prod,staging"}, ["dev/web"]),
    ],
)
def test_only_selected_pods_arrive(kubeapi, start, receivers, args, env, expected):
    put(kubeapi, *SELECTION_PODS)
    receiver = receivers()
    # one pod a page: most pages of a selected list come back short or empty
    service = start(f"--url={receiver.url}", "--once", "--chunk-size=1", *args, env=env)
    assert service.wait() == 0, service.log()
    assert sorted(receiver.keys()) == expected
    lists = [path for _, path in kubeapi.requests if path.startswith("/api/v1/pods?")]
    assert lists and all("labelSelector=" in p or "fieldSelector=" in p for p in lists)


def test_another_selection_starts_a_fresh_snapshot(kubeapi, start, receivers, tmp_path):
    put(kubeapi, *SELECTION_PODS)
    receiver = receivers()
    state = f"--state={tmp_path / 'state.db'}"
    assert start(f"--url={receiver.url}", "--once", state, "--selector=app=web").wait() == 0
    assert len(receiver.received) == 4
    receiver.clear()
    service = start(f"--url={receiver.url}", "--once", state, "--selector=app=api")
    assert service.wait() == 0
    # the pods that left the selection are not reported deleted
    assert receiver.keys() == ["dev/api"]
    assert [p["status"]["phase"] for p in receiver.pods()] == ["Running"]
    assert "starting a fresh snapshot" in service.log()


def test_bad_selector_exits_2_in_one_line(kubeapi, start):
    service = start("--url=http://127.0.0.1:9/hook", "--selector=app in (web")
    assert service.wait() == 2
    assert service.log() == (
        "k8svent: error: K8SVENT_SELECTOR (--selector) 'app in (web' is "
        "not a label selector: expected , or ) in the values of app\n"
    )
