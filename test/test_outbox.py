"""The delivery outbox under faults (issue 10): real k8svent processes, the real
kubectl against the test API server, receivers on 127.0.0.1.

Each test is named after the bullet of issue 10 it proves.
"""

import collections
import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from test.kubeapi import FakeKubeAPI
from test.pods import generate_items, make_pod
from test.receivers import CLOSE, RESET
from test.service import K8SVENT, Service, service_env
from test.test_ops import scrape, value, wait_metric

# The poll mode (the tests count polls); the soak runs in both modes.
FAST = ["--mode=poll", "--interval=0.3", "--retry-interval=0.3", "--log-level=debug"]


@pytest.fixture
def start(kubeconfig, kubectl_path, tmp_path):
    """Start k8svent with args (FAST timings unless given); every run is killed afterwards."""
    started = []

    def run(*args, env=None):
        given = {arg.partition("=")[0] for arg in args}
        argv = [
            f"--kubectl={kubectl_path}",
            *(arg for arg in FAST if arg.partition("=")[0] not in given),
            *args,
        ]
        service = Service(argv, service_env(kubeconfig, env), tmp_path / f"run{len(started)}")
        started.append(service)
        return service

    yield run
    for service in started:
        service.kill()


def status_base(service):
    """The base URL of a k8svent started with --listen=127.0.0.1:0."""
    service.wait_log(r"listening on http://127\.0\.0\.1:\d+")
    port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.log()).group(1)
    return f"http://127.0.0.1:{port}"


def key(pod):
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def uid(pod):
    return pod["metadata"]["uid"]


def deleted(pod):
    return pod["status"]["phase"] == "Deleted"


def relabel(pod, value):
    changed = copy.deepcopy(pod)
    changed["metadata"].setdefault("labels", {})["change"] = value
    return changed


def recreated(pod):
    """The pod created again under its name: a new uid."""
    again = copy.deepcopy(pod)
    again["metadata"]["uid"] = str(uuid.uuid4())
    return again


def cpu_seconds(pid):
    """User plus system CPU time of a process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def arrivals(receiver, label=None):
    """A function giving the keys (or a label's values) received so far.

    Each body is parsed once: a condition looked at after every request
    must not parse them all each time.
    """
    got, position = set(), [0]

    def arrived():
        for request in receiver.received[position[0] :]:
            pod = json.loads(request.body)["pod"]
            got.add(key(pod) if label is None else pod["metadata"].get("labels", {}).get(label))
            position[0] += 1
        return got

    return arrived


def warnings(service):
    return [line for line in service.log().splitlines() if " WARNING " in line]


# --- Busy loop ---------------------------------------------------------------


def test_no_busy_loop_when_the_endpoint_is_down_with_fewer_owed_than_workers(
    kubeapi, start, receivers
):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.put_pod(make_pod("default", "stuck", phase="Pending"))  # under duress
    receiver = receivers()
    receiver.down()
    service = start(f"--url={receiver.url}", "--workers=8", "--interval=0.2")
    service.wait_log("is down")
    polls, used = service.polls(), cpu_seconds(service.proc.pid)
    time.sleep(5)  # the measurement window itself, not a wait for a condition
    used = cpu_seconds(service.proc.pid) - used
    print(f"CPU seconds in 5 s with the endpoint down: {used:.2f}")
    assert service.polls() - polls >= 5, "the poller did not keep polling"
    assert used < 1.0, f"{used:.2f} CPU-s in 5 s: a busy loop"


# --- Starvation --------------------------------------------------------------


def test_no_starvation_many_pods_under_duress_one_worker_slow_receiver(kubeapi, start, receivers):
    pods = [make_pod("default", f"pending-{i:03d}", phase="Pending") for i in range(200)] + [
        make_pod("default", f"web-{i:03d}") for i in range(100)
    ]
    kubeapi.set_pods(pods)

    def slowly(request):
        time.sleep(0.007)
        return 200

    receiver = receivers(respond=slowly)
    # 200 pods under duress take longer than an interval to send.
    service = start(f"--url={receiver.url}", "--workers=1", "--interval=1")
    began = time.monotonic()
    everything = {key(p) for p in pods}
    arrived = arrivals(receiver)
    receiver.wait_until(lambda: everything <= arrived(), timeout=30, what="every pod")
    print(f"all 300 pods arrived in {time.monotonic() - began:.1f} s")
    # The pods under duress go on being sent; a change to a healthy pod
    # still gets its turn.
    service.wait_polls(service.polls() + 2)
    kubeapi.put_pod(relabel(pods[-1], "later"))
    began = time.monotonic()
    changes = arrivals(receiver, "change")
    receiver.wait_until(lambda: "later" in changes(), timeout=20, what="the later change")
    print(f"the later change arrived in {time.monotonic() - began:.1f} s")
    assert receiver.keys().count("default/pending-199") >= 2


# --- Head-of-line blocking ---------------------------------------------------


def test_no_head_of_line_blocking_by_pods_the_receiver_refuses_with_500(kubeapi, start, receivers):
    bad = [make_pod("default", f"bad-{i}") for i in range(6)]
    good = [make_pod("default", f"good-{i:02d}") for i in range(34)]
    kubeapi.set_pods(bad + good)

    def answer(request):
        return (
            500 if json.loads(request.body)["pod"]["metadata"]["name"].startswith("bad-") else 200
        )

    receiver = receivers(respond=answer)
    service = start(f"--url={receiver.url}", "--workers=2")
    receiver.wait_for(34, timeout=5)
    assert sorted(receiver.keys()) == sorted(key(p) for p in good)

    def attempts(name):
        return sum(json.loads(r.body)["pod"]["metadata"]["name"] == name for r in receiver.requests)

    receiver.wait_until(
        lambda: all(attempts(p["metadata"]["name"]) >= 2 for p in bad),
        timeout=10,
        what="every refused pod retried",
    )
    assert "rejected" not in service.log()


# --- The backlog metric ------------------------------------------------------


def test_owed_metric_is_the_true_backlog_and_up_follows_the_endpoint(kubeapi, start, receivers):
    kubeapi.load_items(generate_items(2000))
    receiver = receivers()
    receiver.down()
    service = start(f"--url={receiver.url}", "--listen=127.0.0.1:0", "--interval=5")
    base = status_base(service)
    label = f"http://127.0.0.1:{receiver.port}"
    samples = wait_metric(
        base,
        lambda s: (
            value(s, "k8svent_deliveries_owed", endpoint=label) == 2000
            and ("k8svent_endpoint_up", (("endpoint", label),)) in s
            and value(s, "k8svent_endpoint_up", endpoint=label) == 0
            and value(s, "k8svent_delivery_oldest_owed_seconds", endpoint=label) > 0
        ),
    )
    assert value(samples, "k8svent_deliveries_total", endpoint=label, outcome="success") == 0
    receiver.up()
    receiver.wait_for(2000, timeout=60)
    wait_metric(
        base,
        lambda s: (
            value(s, "k8svent_deliveries_owed", endpoint=label) == 0
            and value(s, "k8svent_endpoint_up", endpoint=label) == 1
            and value(s, "k8svent_delivery_oldest_owed_seconds", endpoint=label) == 0
        ),
    )
    assert len(set(receiver.keys())) == 2000


# --- No hammering, no log floods ---------------------------------------------


def test_no_hammering_and_no_log_flood_during_an_outage(kubeapi, start, receivers):
    kubeapi.load_items(generate_items(2000))
    outage_seconds = 8
    first = []

    def outage(request):
        now = time.monotonic()
        if not first:
            first.append(now)
        return 503 if now < first[0] + outage_seconds else 200

    receiver = receivers(respond=outage)
    service = start(f"--url={receiver.url}", "--interval=5")
    receiver.wait_for(2000, timeout=60)
    during = len(receiver.statuses) - len(receiver.received)  # every 503
    print(f"{during} requests during the {outage_seconds} s outage")
    assert 3 <= during <= 100, f"{during} requests during the outage"
    service.wait_log("is back up")
    assert service.count("is down") == 1
    assert service.count("still down") <= 1
    assert service.count("is back up") == 1
    assert re.search(r"is down \(HTTP 503\); \d+ deliveries owed", service.log())
    assert len(warnings(service)) <= 3, "\n".join(warnings(service))


# --- Retries go on past the retry budget -------------------------------------


def test_past_the_retry_budget_a_delivery_is_counted_once_and_stays_owed(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    failing = threading.Event()
    failing.set()
    receiver = receivers(respond=lambda request: 503 if failing.is_set() else 200)
    service = start(
        f"--url={receiver.url}", "--listen=127.0.0.1:0", "--retry-budget=1", "--interval=5"
    )
    base = status_base(service)
    label = f"http://127.0.0.1:{receiver.port}"
    service.wait_log("still owed after the retry budget")
    # more attempts after the budget, and housekeeping rounds (every 2 s) with them
    attempts = len(receiver.statuses)
    receiver.wait_attempts(attempts + 2, timeout=20)
    samples = scrape(base)
    assert value(samples, "k8svent_deliveries_total", endpoint=label, outcome="failed") == 1
    assert value(samples, "k8svent_deliveries_owed", endpoint=label) == 1
    assert service.count("still owed after the retry budget") == 1
    failing.clear()
    receiver.wait_for(1, timeout=30)
    wait_metric(base, lambda s: value(s, "k8svent_deliveries_owed", endpoint=label) == 0)
    assert value(scrape(base), "k8svent_deliveries_total", endpoint=label, outcome="failed") == 1
    assert service.count("still owed after the retry budget") == 1


# --- --dry-run ---------------------------------------------------------------


def test_dry_run_leaves_a_live_state_file_alone(kubeapi, start, receivers, tmp_path):
    web, changing, doomed = (
        make_pod("default", "web"),
        make_pod("default", "changing"),
        make_pod("default", "doomed"),
    )
    kubeapi.set_pods([web, changing, doomed])
    receiver = receivers()
    state = tmp_path / "state.db"
    first = start(f"--url={receiver.url}", f"--state={state}")
    receiver.wait_for(3)
    first.wait_polls(first.polls() + 1)
    assert first.stop() == 0
    kubeapi.put_pod(relabel(changing, "yes"))
    kubeapi.delete_pod("default", "doomed")
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("state.db*")}

    dry = start("--dry-run", "--once", f"--state={state}")
    assert dry.wait() == 0
    assert sorted(key(json.loads(line)["pod"]) for line in dry.stdout().splitlines()) == [
        "default/changing",
        "default/web",
    ]
    assert {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("state.db*")
    } == files

    receiver.clear()
    real = start(f"--url={receiver.url}", f"--state={state}", "--once")
    assert real.wait() == 0
    pods = receiver.latest()
    assert sorted(receiver.keys()) == ["default/changing", "default/doomed"]
    assert pods["default/changing"]["metadata"]["labels"]["change"] == "yes"
    assert deleted(pods["default/doomed"])


def test_dry_run_once_into_head_ends_at_once_without_a_traceback(
    kubeapi, kubeconfig, kubectl_path, tmp_path
):
    kubeapi.load_items(generate_items(300))
    command = (
        f"'{sys.executable}' '{K8SVENT}' --kubectl='{kubectl_path}' --dry-run --once | head -1"
    )
    began = time.monotonic()
    process = subprocess.Popen(
        ["sh", "-c", command],
        env=service_env(kubeconfig),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("k8svent --dry-run --once | head -1 did not end in 15 s")
    took = time.monotonic() - began
    print(f"--dry-run --once | head -1 took {took:.1f} s")
    assert took < 10
    (line,) = out.decode().splitlines()
    assert key(json.loads(line)["pod"])
    assert b"Traceback" not in err, err.decode()


# --- A pod deleted and created again under its name --------------------------


def test_a_pod_recreated_between_two_polls_is_a_deletion_and_a_new_pod(kubeapi, start, receivers):
    old = make_pod("default", "db-0")
    kubeapi.put_pod(old)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(1)
    new = recreated(old)
    kubeapi.put_pod(new)  # one write: no poll sees the name free
    receiver.wait_for(3)
    told = {(uid(p), deleted(p)) for p in receiver.pods()[1:]}
    assert told == {(uid(old), True), (uid(new), False)}
    assert "sending 1 new, 0 changed" in service.log()
    # a receiver keyed by name ends with the pod that exists
    assert uid(receiver.latest()["default/db-0"]) == uid(new)
    assert not deleted(receiver.latest()["default/db-0"])


def test_a_pod_recreated_before_its_deletion_was_delivered(kubeapi, start, receivers):
    old = make_pod("default", "db-0")
    kubeapi.put_pod(old)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(1)
    receiver.down()
    kubeapi.delete_pod("default", "db-0")
    service.wait_polls(service.polls() + 2)  # a poll saw it deleted
    new = recreated(old)
    kubeapi.put_pod(new)
    service.wait_polls(service.polls() + 2)  # and one saw it again
    receiver.up()
    receiver.wait_for(3, timeout=30)
    told = {(uid(p), deleted(p)) for p in receiver.pods()[1:]}
    assert told == {(uid(old), True), (uid(new), False)}
    assert uid(receiver.latest()["default/db-0"]) == uid(new)
    assert not deleted(receiver.latest()["default/db-0"])


# --- Lanes: one delivery of a pod name at a time, in order ----------------------


def lane_order_problem(pods):
    """Why a receiver's pods (in the order received) break some lane's order, or None.

    Per name, each uid's deliveries form one run (an older pod never comes back
    after a newer one) and after a uid's Deleted only its Deleted may follow.
    """
    runs = {}  # name -> [(uid, deleted)] of each run
    for pod in pods:
        name, pod_uid = key(pod), uid(pod)
        lane = runs.setdefault(name, [])
        if lane and lane[-1][0] == pod_uid:
            if lane[-1][1] and not deleted(pod):
                return f"{name}: {pod_uid} received again after its deletion"
            lane[-1] = (pod_uid, lane[-1][1] or deleted(pod))
        elif any(run_uid == pod_uid for run_uid, _ in lane):
            return f"{name}: {pod_uid} received again after {lane[-1][0]}"
        else:
            lane.append((pod_uid, deleted(pod)))
    return None


@pytest.mark.parametrize("mode", ["poll", "watch"])
def test_a_slow_receiver_gets_the_old_state_then_its_deletion_then_the_new_pod(
    kubeapi, start, receivers, mode
):
    old = make_pod("default", "db-0")
    kubeapi.put_pod(old)
    kubeapi.put_pod(make_pod("default", "web"))
    lock, in_flight, most = threading.Lock(), collections.Counter(), collections.Counter()
    slow = threading.Event()

    def respond(request):
        name = key(json.loads(request.body)["pod"])
        with lock:
            in_flight[name] += 1
            most[name] = max(most[name], in_flight[name])
        if name == "default/db-0" and not slow.is_set():
            slow.set()
            time.sleep(1.5)  # over the pod's first state
        with lock:
            in_flight[name] -= 1
        return 200

    receiver = receivers(respond=respond)
    start(f"--url={receiver.url}", f"--mode={mode}", "--workers=4")
    assert slow.wait(20)
    new = recreated(old)
    kubeapi.delete_pod("default", "db-0")
    kubeapi.put_pod(new)  # StatefulSets do this under the same name
    receiver.wait_for_pods(
        lambda pods: any(uid(p) == uid(new) for p in pods), "the new pod", timeout=20
    )
    lane = [(uid(p), deleted(p)) for p in receiver.pods() if key(p) == "default/db-0"]
    assert lane == [(uid(old), False), (uid(old), True), (uid(new), False)]
    assert most["default/db-0"] == 1
    assert lane_order_problem(receiver.pods()) is None


def test_a_newer_state_goes_out_as_soon_as_the_one_in_flight_is_answered(kubeapi, start, receivers):
    # Its lane is free once the delivery in flight is settled (within 50 ms):
    # it must not wait for the housekeeping's next look (every 2 s).
    pod = make_pod("default", "db-0")
    kubeapi.put_pod(pod)
    arrived, release, answered = threading.Event(), threading.Event(), []

    def respond(request):
        if "change" not in json.loads(request.body)["pod"]["metadata"].get("labels", {}):
            arrived.set()
            assert release.wait(20)
            answered.append(time.monotonic())
        return 200

    receiver = receivers(respond=respond)
    service = start(f"--url={receiver.url}", "--mode=watch", "--workers=4")
    assert arrived.wait(20)
    kubeapi.put_pod(relabel(pod, "new"))
    service.wait_log(r"watch: MODIFIED default/db-0 \(changed\)")
    release.set()
    receiver.wait_for_pods(
        lambda pods: any(p["metadata"].get("labels", {}).get("change") for p in pods),
        "the newer state",
    )
    assert time.monotonic() - answered[0] < 0.5
    assert len(receiver.received) == 2


# --- Start-up ----------------------------------------------------------------


def test_a_url_given_twice_is_one_webhook(kubeapi, start, receivers):
    kubeapi.set_pods([make_pod("default", f"web-{i}") for i in range(3)])
    receiver = receivers()
    service = start(f"--url={receiver.url}", f"--url={receiver.url}")
    receiver.wait_for(3)
    service.wait_polls(service.polls() + 3)
    assert sorted(receiver.keys()) == ["default/web-0", "default/web-1", "default/web-2"]
    assert service.count("given more than once") == 1
    assert service.stop() == 0


def test_a_missing_ca_bundle_is_one_line_exit_2_and_no_temporary_file(start, tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    service = start(
        "--url=https://127.0.0.1:9/hook",
        env={"REQUESTS_CA_BUNDLE": "/nonexistent", "TMPDIR": str(temporary)},
    )
    assert service.wait() == 2
    (line,) = service.log().splitlines()
    assert line.startswith("k8svent: error: ")
    assert list(temporary.iterdir()) == []


# --- Scope: the cluster kubectl talks to -------------------------------------


def two_context_kubeconfig(path, first, second):
    """A kubeconfig with contexts "one" and "two" (current: "one")."""
    clusters, users, contexts = [], [], []
    for name, api in (("one", first), ("two", second)):
        clusters.append(f"- name: {name}\n  cluster:\n    server: {api.url}\n")
        users.append(f"- name: {name}\n  user:\n    token: {api.token}\n")
        contexts.append(f"- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n")
    path.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n"
        + "".join(clusters)
        + "users:\n"
        + "".join(users)
        + "contexts:\n"
        + "".join(contexts)
        + "current-context: one\n"
    )
    return path


def test_switching_the_current_context_is_not_every_pod_deleted(
    kubeapi, kubectl_path, start, receivers, tmp_path
):
    kubeapi.set_pods([make_pod("default", f"one-{i}") for i in range(3)])
    with FakeKubeAPI() as other:
        other.set_pods([make_pod("default", f"two-{i}") for i in range(2)])
        config = two_context_kubeconfig(tmp_path / "two-clusters", kubeapi, other)
        env = {"KUBECONFIG": str(config)}
        receiver = receivers()
        state = tmp_path / "state.db"
        assert start(f"--url={receiver.url}", f"--state={state}", "--once", env=env).wait() == 0
        assert sorted(receiver.keys()) == ["default/one-0", "default/one-1", "default/one-2"]
        receiver.clear()
        subprocess.run(
            [kubectl_path, "config", "use-context", "two"],
            check=True,
            env=service_env(config),
            capture_output=True,
        )
        service = start(f"--url={receiver.url}", f"--state={state}", "--once", env=env)
        assert service.wait() == 0
    assert sorted(receiver.keys()) == ["default/two-0", "default/two-1"]
    assert not any(deleted(p) for p in receiver.pods())
    assert "starting a fresh snapshot" in service.log()


# --- The soak ----------------------------------------------------------------

SOAK_SECONDS = 25
SOAK_KILLS = 4


def faulty(rng, faults):
    """A receiver's answers: random 5xx, resets, closes and slow answers while faults is set."""
    lock = threading.Lock()

    def respond(request):
        if not faults.is_set():
            return 200
        with lock:
            roll, pause, status = rng.random(), rng.uniform(0.05, 0.4), rng.choice((500, 502, 503))
        if roll < 0.12:
            return status
        if roll < 0.18:
            return RESET
        if roll < 0.24:
            return CLOSE
        if roll < 0.26:
            return 429, {"Retry-After": "1"}, b""
        if roll < 0.40:
            time.sleep(pause)
        return 200

    return respond


def soak_pod(rng, name):
    phase, healthy = rng.choice([("Running", True)] * 5 + [("Running", False), ("Pending", True)])
    return make_pod(rng.choice(("default", "prod")), name, phase=phase, healthy=healthy)


@pytest.mark.parametrize("mode", ["poll", "watch"])
def test_soak_every_webhook_gets_every_pods_newest_state_and_every_deletion(
    kubeapi, kubeconfig, kubectl_path, start, receivers, tmp_path, mode
):
    seed = int(os.environ.get("K8SVENT_SOAK_SEED") or random.randrange(1 << 32))
    replay = f"soak seed {seed} (replay with K8SVENT_SOAK_SEED={seed})"
    print(replay)
    rng = random.Random(seed)
    faults = threading.Event()
    faults.set()
    hooks = [receivers(respond=faulty(random.Random(rng.random()), faults)) for _ in range(2)]
    pods = {}  # key -> the pod as last written
    for i in range(60):
        pod = soak_pod(rng, f"app-{i:02d}")
        pods[key(pod)] = pod
    kubeapi.set_pods(pods.values())
    gone = {}  # key -> a deleted pod that may come back under a new uid
    args = [
        *(f"--url={hook.url}" for hook in hooks),
        f"--state={tmp_path / 'state.db'}",
        "--kubectl-timeout=2",
        "--workers=3",
        "--chunk-size=25",
        "--log-level=info",
        f"--mode={mode}",
    ]
    service = start(*args)
    kills = sorted(rng.uniform(2, SOAK_SECONDS) for _ in range(SOAK_KILLS))
    changes = 0
    ended = time.monotonic() + SOAK_SECONDS
    began = time.monotonic()
    while time.monotonic() < ended:
        if kills and time.monotonic() - began >= kills[0]:
            kills.pop(0)
            service.kill()  # SIGKILL: kill -9
            service = start(*args)
        roll = rng.random()
        changes += 1
        if roll < 0.35 and pods:  # a change
            name = rng.choice(sorted(pods))
            pods[name] = relabel(pods[name], str(changes))
            kubeapi.put_pod(pods[name])
        elif roll < 0.45 and pods:  # a deletion
            name = rng.choice(sorted(pods))
            gone[name] = pods.pop(name)
            kubeapi.delete_pod(*name.split("/"))
        elif roll < 0.55 and gone:  # created again after its deletion
            name = rng.choice(sorted(gone))
            pods[name] = recreated(gone.pop(name))
            kubeapi.put_pod(pods[name])
        elif roll < 0.65 and pods:  # deleted and created again at once
            name = rng.choice(sorted(pods))
            pods[name] = recreated(pods[name])
            kubeapi.put_pod(pods[name])
        elif roll < 0.70:  # a new pod
            pod = soak_pod(rng, f"new-{changes}")
            pods[key(pod)] = pod
            kubeapi.put_pod(pod)
        elif roll < 0.78 and pods:  # health (phase) changes
            name = rng.choice(sorted(pods))
            namespace, pod_name = name.split("/")
            pod = soak_pod(rng, pod_name)
            pod["metadata"] = pods[name]["metadata"]
            pods[name] = pod
            kubeapi.put_pod(pod)
        elif roll < 0.88:
            kubeapi.fail(rng.choice((500, 503)))
        elif roll < 0.91:
            kubeapi.hang(3)  # longer than --kubectl-timeout
        time.sleep(rng.uniform(0.05, 0.25))  # the pace of the faults
    faults.clear()

    def current():
        """{key: (uid, resourceVersion)} of the pods that exist now."""
        return {
            name: (uid(pod), pod["metadata"]["resourceVersion"])
            for name, pod in (
                (name, kubeapi.get_pod(*name.split("/"))) for name in kubeapi.pod_keys()
            )
        }

    def trouble(hook, now, told_uids):
        """What a webhook has not been told yet, or None."""
        latest = hook.latest()
        for name, (pod_uid, version) in now.items():
            got = latest.get(name)
            if (
                got is None
                or deleted(got)
                or (uid(got), got["metadata"].get("resourceVersion")) != (pod_uid, version)
            ):
                return f"{name} is {pod_uid}@{version}, last received " + (
                    "nothing"
                    if got is None
                    # a deletion found by a list may be a stub with no resourceVersion
                    else f"{uid(got)}@{got['metadata'].get('resourceVersion')} "
                    f"{got['status']['phase']}"
                )
        for name, got in latest.items():
            if name not in now and not deleted(got):
                return f"{name} is gone but was last received as {got['status']['phase']}"
        existing = {pod_uid for pod_uid, _ in now.values()}
        deletions = {uid(p) for p in hook.pods() if deleted(p)}
        untold = told_uids - existing - deletions
        if untold:
            return f"deleted pods never received as Deleted: {sorted(untold)}"
        return None

    def told():
        """Every uid some webhook received: k8svent saw those pods."""
        return {uid(p) for hook in hooks for p in hook.pods()}

    deadline = time.monotonic() + 45
    while True:
        now, told_uids = current(), told()
        problems = [trouble(hook, now, told_uids) for hook in hooks]
        if not any(problems):
            break
        assert time.monotonic() < deadline, f"{replay}: never settled: {problems}"
        time.sleep(0.2)
    settled = time.monotonic() - ended
    # What kubectl prints is what each webhook last received, whole.
    printed = json.loads(
        subprocess.run(
            [kubectl_path, "get", "pods", "-A", "-o", "json"],
            env=service_env(kubeconfig),
            capture_output=True,
            check=True,
        ).stdout
    )["items"]
    assert {key(p) for p in printed} == set(now), replay
    for hook in hooks:
        latest = hook.latest()
        for pod in printed:
            assert latest[key(pod)] == pod, f"{replay}: {key(pod)} differs"
    for hook in hooks:  # and each pod name's deliveries came in the order of its changes
        assert lane_order_problem(hook.pods()) is None, (
            f"{replay}: {lane_order_problem(hook.pods())}"
        )
    lost = told_uids - {pod_uid for pod_uid, _ in now.values()}
    print(
        f"{changes} changes, {SOAK_KILLS} kill -9, {len(printed)} pods, "
        f"{len(lost)} deletions told; settled {settled:.1f} s after the faults; "
        f"requests per webhook {[len(h.requests) for h in hooks]}"
    )
    assert service.proc.poll() is None, service.log()
    assert "Traceback" not in service.log(), service.log()
