"""Leader election and continuity: replicas on a coordination.k8s.io/v1 Lease.

Each replica is a real k8svent process run as a pod would be: its own
HOSTNAME and a fresh state file (a new pod's emptyDir), the real kubectl,
the test API server's Lease API, one real receiver shared by all replicas.
"""

import collections
import json
import re
import signal
import time

import prometheus_client.parser
import pytest
import requests

import k8svent
from test.pods import generate, make_pod
from test.receivers import Receiver
from test.service import Service, service_env
from test.test_pods import deliver_all, owed_rows, poll

PODS = 3000
DURATION = 6  # --lease-duration of the scenarios
LEASE = ("default", "k8svent")
ARGS = [
    "--mode=watch",
    "--interval=600",
    "--resync=0",
    "--retry-interval=0.3",
    "--upgrade=never",
    "--listen=127.0.0.1:0",
    "--log-level=debug",
    f"--lease={LEASE[0]}/{LEASE[1]}",
    f"--lease-duration={DURATION}",
]
RESENDS_ALLOWED = 100


# --- The decision and its parts, as pure functions -----------------------------


def lease(holder, duration=15, rv="7"):
    return {
        "metadata": {"name": "k8svent", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration},
    }


@pytest.mark.parametrize(
    ("read", "observed_at", "now", "action"),
    [
        (None, 0, 100, "create"),
        (lease("me_1"), 0, 100, "renew"),  # mine, even long unrenewed
        (lease(""), 99, 100, "take over"),  # released
        (lease(None), 99, 100, "take over"),
        (lease("other_2"), 90, 100, "wait"),  # 10 s of its 15
        (lease("other_2"), 85, 100, "take over"),  # 15 s unchanged: expired
        (lease("other_2", duration=30), 85, 100, "wait"),  # the holder's own duration rules
        (lease("other_2", duration=None), 85, 100, "take over"),  # else ours
        (lease("other_2", duration=0), 90, 100, "wait"),
    ],
)
def test_lease_action(read, observed_at, now, action):
    assert k8svent.lease_action(read, observed_at, now, "me_1", 15) == action


@pytest.mark.parametrize(
    ("applied", "owed", "mark"),
    [
        ("500", [], "500"),  # nothing owed: settled up to what the store holds
        ("500", ["480", "490"], "479"),  # the oldest change still owed is not settled
        ("500", ["600"], "500"),  # a change the watch is ahead of
        (None, [], None),  # nothing applied yet
        ("500", ["abc"], None),  # not comparable
        ("x1", [], None),
    ],
)
def test_settled_through(applied, owed, mark):
    assert k8svent.settled_through(applied, owed) == mark


def test_lease_watermarks_read_the_annotation_and_ignore_junk():
    annotated = lease("a")
    annotated["metadata"]["annotations"] = {
        k8svent.LEASE_WATERMARK_ANNOTATION: json.dumps({"abc": "1200", "def": 7})
    }
    assert k8svent.lease_watermarks(annotated) == {"abc": "1200", "def": "7"}
    annotated["metadata"]["annotations"][k8svent.LEASE_WATERMARK_ANNOTATION] = "not json"
    assert k8svent.lease_watermarks(annotated) == {}
    assert k8svent.lease_watermarks(lease("a")) == {}
    assert k8svent.lease_watermarks(None) == {}


def test_micro_time_is_rfc3339_with_microseconds():
    assert k8svent.micro_time(1796457600.25) == "2026-12-05T08:00:00.250000Z"


def test_lease_identity_starts_with_the_pod_name_and_is_unique_per_process():
    one = k8svent.lease_identity({"HOSTNAME": "k8svent-7d9f-abcde"})
    two = k8svent.lease_identity({"HOSTNAME": "k8svent-7d9f-abcde"})
    assert one.startswith("k8svent-7d9f-abcde_") and two.startswith("k8svent-7d9f-abcde_")
    assert one != two


def deleted_body(pod):
    return k8svent.mark_deleted(k8svent.encode_pod(pod))


def test_a_change_has_the_same_message_id_on_every_replica():
    pod = make_pod("default", "web", resource_version="1234")
    body = k8svent.encode_pod(pod)
    ident = k8svent.change_message_id(body)
    assert re.fullmatch(r"msg_[0-9a-f]{26}", ident)
    assert k8svent.change_message_id(k8svent.encode_pod(json.loads(body))) == ident
    assert k8svent.change_message_id(deleted_body(pod)) != ident  # another kind
    newer = make_pod("default", "web", resource_version="1235")
    assert k8svent.change_message_id(k8svent.encode_pod(newer)) != ident
    row = k8svent.Owed(
        "default/web", "msg_" + "0" * 26, 0, 0.0, body, "default/web", "changed", 0.0
    )
    assert k8svent.delivery_message_id(row) == ident  # whatever the row's own id
    resend = row._replace(msg_id=k8svent.RESEND_ID_PREFIX + "1" * 26)
    assert k8svent.delivery_message_id(resend) == "msg_" + "1" * 26  # a new message


def test_a_rows_message_id_is_its_bodys_on_every_path():
    # The store keeps each pod's uid and resourceVersion beside its body, so
    # that a delivery's id need not parse the body: it must be the body's.
    store = k8svent.Store()
    ids = []

    def check():
        while rows := owed_rows(store, "e1"):  # lane by lane, head by head
            for row in rows.values():
                assert k8svent.delivery_message_id(row) == k8svent.change_message_id(row.body)
                ids.append(k8svent.delivery_message_id(row))
            deliver_all(store, "e1")

    try:
        store.outbox.set_endpoints(["e1"])
        web = make_pod("default", "web", resource_version="10")
        db = make_pod("default", "db-0", resource_version="11")
        db["metadata"]["uid"] = "uid-gone"
        poll(store, web, db)  # new, by a list
        check()
        changed = make_pod("default", "web", resource_version="12", healthy=False)
        store.snapshot.apply_event(k8svent.pod_entry(changed))  # changed, by the watch
        check()
        store.snapshot.apply_deletion(k8svent.pod_entry(changed))  # deleted, by the watch
        check()
        again = make_pod("default", "db-0", resource_version="13")
        again["metadata"]["uid"] = "uid-new"
        poll(store, again)  # another uid: db-0's deletion (a stub: its body was dropped)
        check()
        poll(store)  # deleted, by a list (a stub: its body was dropped)
        check()
        assert len(ids) == len(set(ids)) == 7
    finally:
        store.close()


def test_a_re_send_under_duress_is_a_new_message_in_the_store():
    store = k8svent.Store()
    try:
        store.outbox.set_endpoints(["e1"])
        sick = make_pod("default", "sick", phase="Running", healthy=False)
        poll(store, sick)
        (first,) = owed_rows(store, "e1").values()
        assert k8svent.delivery_message_id(first) == k8svent.change_message_id(first.body)
        deliver_all(store, "e1")
        poll(store, sick)  # unchanged, still under duress: owed again
        (again,) = owed_rows(store, "e1").values()
        assert again.msg_id.startswith(k8svent.RESEND_ID_PREFIX)
        assert k8svent.delivery_message_id(again) != k8svent.change_message_id(again.body)
    finally:
        store.close()


def test_a_replayed_deletion_goes_ahead_of_the_new_pod_of_its_name():
    store = k8svent.Store()
    try:
        store.outbox.set_endpoints(["e1"])
        old = make_pod("default", "db-0", resource_version="10")
        old["metadata"]["uid"] = "uid-old"
        new = make_pod("default", "db-0", resource_version="20")
        new["metadata"]["uid"] = "uid-new"
        poll(store, new)  # a fresh replica: its list finds the new pod, owed
        assert store.snapshot.owe_missed_deletion(k8svent.pod_entry(old))
        (head,) = owed_rows(store, "e1").values()  # one lane, its head first
        assert json.loads(head.body)["metadata"]["uid"] == "uid-old"
        assert json.loads(head.body)["status"]["phase"] == "Deleted"
        deliver_all(store, "e1")
        (head,) = owed_rows(store, "e1").values()
        assert json.loads(head.body)["metadata"]["uid"] == "uid-new"
        deliver_all(store, "e1")
        assert owed_rows(store, "e1") == {}
        # The new pod delivered: a replayed deletion of the old one is owed
        # alone, and the new pod is not sent again.
        assert not store.snapshot.owe_missed_deletion(k8svent.pod_entry(new))
        assert store.snapshot.owe_missed_deletion(k8svent.pod_entry(old))
        (head,) = owed_rows(store, "e1").values()
        assert json.loads(head.body)["metadata"]["uid"] == "uid-old"
        deliver_all(store, "e1")
        assert owed_rows(store, "e1") == {}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ({"--lease": "k8svent"}, (None, "k8svent")),
        ({"--lease": "ops/k8svent.leader"}, ("ops", "k8svent.leader")),
        ({}, None),
    ],
)
def test_lease_settings(given, parsed):
    settings = k8svent.settings_from(
        k8svent.parse_arguments(
            ["--url=http://127.0.0.1/x", *(f"{k}={v}" for k, v in given.items())]
        ),
        {},
    )
    assert settings.lease == parsed
    assert settings.lease_duration == 15


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--lease=Bad_Name"], {}, "--lease must be [NAMESPACE/]NAME"),
        (["--lease=ns!/x"], {}, "not a namespace name"),
        ([], {"K8SVENT_LEASE": "ops/"}, "K8SVENT_LEASE (--lease) must be"),
        (["--lease=x", "--lease-duration=1"], {}, "--lease-duration must be at least 3"),
        (["--lease=x", "--once"], {}, "cannot be combined with --once"),
    ],
)
def test_bad_lease_settings(argv, environ, message):
    with pytest.raises(k8svent.SettingsError, match=re.escape(message)):
        k8svent.settings_from(k8svent.parse_arguments(["--url=http://127.0.0.1/x", *argv]), environ)


# --- Replicas as processes -------------------------------------------------------


class Replica:
    """One k8svent process with a HOSTNAME of its own and a fresh state file."""

    def __init__(self, service, hostname):
        self.service, self.hostname = service, hostname
        service.wait_log(r"listening on http://127\.0\.0\.1:\d+", timeout=60)
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.log()).group(1)
        self.base = f"http://127.0.0.1:{port}"

    def metric(self, name):
        text = requests.get(f"{self.base}/metrics", timeout=5).text
        for family in prometheus_client.parser.text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        raise AssertionError(f"no {name} in /metrics")

    def ready(self):
        return requests.get(f"{self.base}/readyz", timeout=5).status_code == 200


@pytest.fixture
def receiver():
    made = Receiver()
    yield made
    made.close()


@pytest.fixture
def replica(kubeapi, kubeconfig, kubectl_path, tmp_path, receiver):
    """Start a replica named HOSTNAME; every one is killed afterwards."""
    started = []

    def start(hostname, *extra):
        env = service_env(kubeconfig, {"HOSTNAME": hostname})
        service = Service(
            [
                f"--kubectl={kubectl_path}",
                f"--url={receiver.url}",
                f"--state={tmp_path / hostname}.db",
                *ARGS,
                *extra,
            ],
            env,
            tmp_path / hostname,
        )
        started.append(service)
        return Replica(service, hostname)

    yield start
    for service in started:
        service.kill()


def holder(kubeapi):
    found = kubeapi.lease(*LEASE)
    return None if found is None else found["spec"].get("holderIdentity") or ""


def wait_holder(kubeapi, hostname, timeout):
    """Wait until the Lease names a process of HOSTNAME; return the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while not (holder(kubeapi) or "").startswith(f"{hostname}_"):
        if time.monotonic() > deadline:
            raise AssertionError(f"the Lease is held by {holder(kubeapi)!r}, not {hostname}")
        time.sleep(0.05)
    return time.monotonic() - started


def wait_watermark(kubeapi, resource_version, timeout):
    """Wait until the Lease's watermark of every webhook is at resource_version or past it."""
    deadline = time.monotonic() + timeout
    while True:
        marks = k8svent.lease_watermarks(kubeapi.lease(*LEASE))
        if marks and all(int(mark) >= int(resource_version) for mark in marks.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the Lease's watermarks {marks} are short of {resource_version}")
        time.sleep(0.05)


def change(pod, value):
    pod = json.loads(json.dumps(pod))
    pod["metadata"].setdefault("labels", {})["change"] = str(value)
    return pod


class Parsed:
    """The receiver's deliveries, parsed once each (a check must not hold up the receiver)."""

    def __init__(self, receiver):
        self._receiver, self._pods = receiver, []

    def pods(self):
        with self._receiver._cond:
            fresh = self._receiver.received[len(self._pods) :]
        self._pods.extend(json.loads(r.body)["pod"] for r in fresh)
        return self._pods


_parsed = {}


def parsed(receiver):
    return _parsed.setdefault(id(receiver), Parsed(receiver)).pods()


def latest(receiver):
    """{key: the last state received}."""
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in parsed(receiver)}


def resends(receiver):
    """How many deliveries repeated a state (uid, resourceVersion, phase) already delivered."""
    counts = collections.Counter(
        (p["metadata"]["uid"], p["metadata"]["resourceVersion"], p["status"].get("phase"))
        for p in parsed(receiver)
    )
    return sum(n - 1 for n in counts.values())


def wait_all_delivered(receiver, kubeapi, deletions=(), timeout=90):
    """Wait until the receiver's latest state of every pod is the server's (and each
    deletion arrived as Deleted); return the receiver's latest states."""
    deadline = time.monotonic() + timeout
    while True:
        got = latest(receiver)
        behind = [
            key
            for key in kubeapi.pod_keys()
            if (got.get(key) or {}).get("metadata", {}).get("resourceVersion")
            != kubeapi.get_pod(*key.split("/"))["metadata"]["resourceVersion"]
        ]
        behind += [
            k for k in deletions if (got.get(k) or {}).get("status", {}).get("phase") != "Deleted"
        ]
        if not behind:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(behind)} changes never arrived, such as {behind[:3]}")
        time.sleep(0.2)


def assert_no_living_pod_deleted(receiver, kubeapi):
    got = latest(receiver)
    wrongly = [k for k in kubeapi.pod_keys() if got[k]["status"].get("phase") == "Deleted"]
    assert not wrongly, f"living pods reported Deleted: {wrongly[:5]}"


@pytest.fixture
def pods(kubeapi):
    made = list(generate(PODS))
    kubeapi.set_pods(made)
    return made


def start_pair(replica, kubeapi, receiver):
    """A holder that delivered every pod and a standby that has listed them."""
    first = replica("k8svent-a")
    wait_holder(kubeapi, "k8svent-a", 60)
    receiver.wait_for(PODS, timeout=120)
    # ... and said so in the Lease: else a kill now re-sends them all.
    wait_watermark(kubeapi, kubeapi.resource_version, 60)
    second = replica("k8svent-b")
    second.service.wait_log("competing for Lease", timeout=120)
    return first, second


def make_changes(kubeapi, pods, tag):
    """A change, an addition and a deletion; return (added pod, deleted key)."""
    kubeapi.put_pod(change(pods[10], tag))
    added = make_pod("default", f"born-{tag}")
    kubeapi.put_pod(added)
    gone = pods[20 + len(tag)]
    kubeapi.delete_pod(gone["metadata"]["namespace"], gone["metadata"]["name"])
    return added, f"{gone['metadata']['namespace']}/{gone['metadata']['name']}"


def test_one_replica_holds_the_other_stands_by(kubeapi, replica, receiver, pods):
    first, second = start_pair(replica, kubeapi, receiver)
    assert holder(kubeapi).startswith("k8svent-a_")
    assert first.metric("k8svent_leader") == 1
    assert second.metric("k8svent_leader") == 0
    assert first.ready() and second.ready()
    kubeapi.put_pod(change(pods[5], "steady"))
    kubeapi.put_pod(change(pods[6], "steady"))
    receiver.wait_for(PODS + 2)
    # The standby's watch has both changes too: it would send them if it delivered.
    second.service.wait_log(r"watch: MODIFIED .* \(changed\)", count=2)
    time.sleep(2 * DURATION * k8svent.LEASE_RENEW_SHARE)  # two more renewals
    assert len(receiver.received) == PODS + 2
    assert resends(receiver) == 0
    assert second.service.proc.poll() is None
    assert "delivered" not in re.sub(r"delivered by it", "", second.service.log())


def test_kill_of_the_holder_the_standby_takes_over_and_loses_nothing(
    kubeapi, replica, receiver, pods
):
    first, second = start_pair(replica, kubeapi, receiver)
    first.service.proc.kill()
    first.service.wait()
    added, gone = make_changes(kubeapi, pods, "kill")
    took = wait_holder(kubeapi, "k8svent-b", 2 * DURATION + 5)
    assert took <= 2 * DURATION + 5
    latest = wait_all_delivered(receiver, kubeapi, deletions=[gone])
    assert latest[f"default/{added['metadata']['name']}"]["status"]["phase"] != "Deleted"
    assert resends(receiver) <= RESENDS_ALLOWED
    assert_no_living_pod_deleted(receiver, kubeapi)
    assert second.metric("k8svent_leader") == 1


def test_sigterm_hands_over_within_five_seconds(kubeapi, replica, receiver, pods):
    first, second = start_pair(replica, kubeapi, receiver)
    added, gone = make_changes(kubeapi, pods, "term")
    assert first.service.stop(signal.SIGTERM) == 0
    exited = time.monotonic()
    assert "released Lease default/k8svent" in first.service.log()
    wait_holder(kubeapi, "k8svent-b", 5)
    assert time.monotonic() - exited <= 5
    added2, gone2 = make_changes(kubeapi, pods, "after")
    wait_all_delivered(receiver, kubeapi, deletions=[gone, gone2])
    assert resends(receiver) <= RESENDS_ALLOWED
    assert_no_living_pod_deleted(receiver, kubeapi)


def test_a_holder_whose_lease_writes_fail_stops_delivering(kubeapi, replica, receiver, pods):
    only = replica("k8svent-a")
    wait_holder(kubeapi, "k8svent-a", 60)
    receiver.wait_for(PODS, timeout=120)
    kubeapi.fail_lease_writes(500)
    only.service.wait_log("could not renew Lease default/k8svent", timeout=3 * DURATION)
    assert only.metric("k8svent_leader") == 0
    count = len(receiver.received)
    added, gone = make_changes(kubeapi, pods, "fenced")
    only.service.wait_log(r"watch: DELETED .* \(deleted\)")
    time.sleep(2 * DURATION * k8svent.LEASE_RETRY_SHARE + 1)  # rounds that fail again
    assert len(receiver.received) == count  # fenced: nothing goes out
    assert only.service.count("could not renew Lease") == 1  # said once
    kubeapi.fail_lease_writes(None)
    wait_all_delivered(receiver, kubeapi, deletions=[gone])
    assert only.metric("k8svent_leader") == 1
    assert resends(receiver) <= RESENDS_ALLOWED


@pytest.mark.parametrize("compacted", [False, True])
def test_a_fresh_pod_without_standby_resumes_from_the_watermark(
    kubeapi, replica, receiver, pods, compacted
):
    first = replica("k8svent-a")
    wait_holder(kubeapi, "k8svent-a", 60)
    receiver.wait_for(PODS, timeout=120)
    # Two renewals later the watermark covers every pod delivered.
    first.service.wait_log("delivered", timeout=5)
    time.sleep(2 * DURATION * k8svent.LEASE_RENEW_SHARE + 1)
    assert first.service.stop(signal.SIGTERM) == 0
    # While none runs: changes, an addition and a deletion.
    added, gone = make_changes(kubeapi, pods, "gap")
    if compacted:
        kubeapi.set_watch_history(0)  # the history from the watermark is gone
    fresh = replica("k8svent-c")
    wait_holder(kubeapi, "k8svent-c", 60)
    if compacted:
        latest = wait_all_delivered(receiver, kubeapi)
        assert gone not in latest or latest[gone]["status"].get("phase") != "Deleted"
        fresh.service.wait_log("cannot be known")
        assert fresh.service.count("cannot be known") == 1
        assert fresh.metric("k8svent_continuity_gaps_total") == 1
    else:
        wait_all_delivered(receiver, kubeapi, deletions=[gone])
        assert fresh.metric("k8svent_continuity_gaps_total") == 0
    assert resends(receiver) <= RESENDS_ALLOWED
    assert_no_living_pod_deleted(receiver, kubeapi)


def test_the_outbox_settles_by_a_watermark_a_batch_at_a_time():
    store = k8svent.Store()
    try:
        store.outbox.set_endpoints(["e"])
        pods = [
            make_pod("default", f"p{i}", resource_version=str(1000 + i))
            for i in range(2 * k8svent._SQL_BATCH + 7)
        ]
        pods.append(make_pod("default", "opaque", resource_version="x7"))
        store.snapshot.begin_poll()
        store.snapshot.apply_page([k8svent.pod_entry(p) for p in pods])
        store.snapshot.finish_poll()
        assert len(store.outbox.owed_versions("e", 10000)) == len(pods)
        assert store.outbox.owed_versions("e", 10) is None  # too many to read at each renewal
        mark = 1000 + k8svent._SQL_BATCH + 3
        settled, left = store.outbox.forget_through("e", str(mark))
        assert settled == mark - 1000 + 1
        assert left == len(pods) - settled  # the opaque one among them
        owed = store.outbox.owed_versions("e", 10000)
        assert "x7" in owed and all(v == "x7" or int(v) > mark for v in owed)
        assert store.outbox.forget_through("e", "not a number") == (None, None)
    finally:
        store.close()
