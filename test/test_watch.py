"""Watch mode: list, then watch; the real kubectl against the test API server."""

import contextlib
import copy
import json
import os
import re
import sqlite3
import time
import urllib.request

import pytest

import k8svent
from test.pods import generate_items, make_pod
from test.service import Service, service_env

# No duress re-sends nor resyncs unless a test asks: each event is what it sees.
QUIET = [
    "--mode=watch",
    "--interval=600",
    "--resync=0",
    "--retry-interval=0.3",
    "--log-level=debug",
]


@pytest.fixture
def start(kubeapi, kubeconfig, kubectl_path, tmp_path):
    """Start k8svent in watch mode with args; kill it afterwards."""
    started = []

    def run(*args):
        given = {arg.partition("=")[0] for arg in args}
        quiet = [arg for arg in QUIET if arg.partition("=")[0] not in given]
        service = Service(
            [f"--kubectl={kubectl_path}", *quiet, *args],
            service_env(kubeconfig),
            tmp_path / f"run{len(started)}",
        )
        started.append(service)
        return service

    yield run
    for service in started:
        service.kill()


def key(pod):
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def changed(pod, value):
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("labels", {})["change"] = value
    return pod


def has(key_, **want):
    """A predicate: some pod received has this key and these labels/phase/uid."""

    def check(pods):
        return any(key(p) == key_ and all(_field(p, f) == v for f, v in want.items()) for p in pods)

    return check


def _field(pod, name):
    if name == "phase":
        return pod["status"]["phase"]
    if name == "uid":
        return pod["metadata"]["uid"]
    return pod["metadata"].get("labels", {}).get(name)


def watching(kubeapi, count=1):
    assert kubeapi.wait_open_watches(count), "k8svent is not watching"


def lists(kubeapi):
    return sum(
        1
        for method, path in kubeapi.requests
        if method == "GET" and "/pods?" in path and "watch=" not in path
    )


def test_a_change_arrives_within_a_second(kubeapi, start, receivers):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(1)
    watching(kubeapi)
    latencies = []
    for i in range(5):
        began = time.monotonic()
        kubeapi.put_pod(changed(pod, str(i)))
        receiver.wait_for_pods(has("default/web", change=str(i)), f"change {i}")
        latencies.append(time.monotonic() - began)
    assert sorted(latencies)[2] < 1.0, latencies  # the median, on a busy machine
    assert lists(kubeapi) == 1  # one list, then only the watch
    assert service.count(r"WARNING|ERROR") == 0, service.log()


def test_deletion_sends_the_last_state_as_deleted(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.put_pod(make_pod("default", "gone"))
    receiver = receivers()
    start(f"--url={receiver.url}")
    receiver.wait_for(2)
    watching(kubeapi)
    kubeapi.put_pod(changed(kubeapi.get_pod("default", "gone"), "last"))
    kubeapi.delete_pod("default", "gone")
    pods = receiver.wait_for_pods(has("default/gone", phase="Deleted"), "deletion")
    deleted = [p for p in pods if key(p) == "default/gone" and p["status"]["phase"] == "Deleted"]
    assert len(deleted) == 1 and deleted[0]["metadata"]["labels"]["change"] == "last"
    assert not any(key(p) == "default/web" and p["status"]["phase"] == "Deleted" for p in pods)


def test_a_recreated_pod_is_a_deletion_and_a_new_pod(kubeapi, start, receivers):
    old = make_pod("default", "db-0")
    kubeapi.put_pod(old)
    receiver = receivers()
    start(f"--url={receiver.url}")
    receiver.wait_for(1)
    watching(kubeapi)
    new = copy.deepcopy(old)
    new["metadata"]["uid"] = "00000000-0000-4000-8000-00000000beef"
    kubeapi.delete_pod("default", "db-0")
    kubeapi.put_pod(new)
    pods = receiver.wait_for_pods(has("default/db-0", uid=new["metadata"]["uid"]), "new pod")
    receiver.wait_for_pods(
        has("default/db-0", uid=old["metadata"]["uid"], phase="Deleted"), "the old pod's deletion"
    )
    assert pods[-1]["status"]["phase"] == "Running"


def test_a_watch_cut_mid_stream_loses_nothing(kubeapi, start, receivers):
    pods = [make_pod("default", f"web-{i}") for i in range(3)]
    for pod in pods:
        kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(3)
    watching(kubeapi)
    kubeapi.put_pod(changed(pods[0], "before-cut"))
    receiver.wait_for_pods(has("default/web-0", change="before-cut"))
    assert kubeapi.cut_watches() == 1
    kubeapi.put_pod(changed(pods[1], "during-cut"))  # replayed from the last RV
    receiver.wait_for_pods(has("default/web-1", change="during-cut"), "the change made meanwhile")
    watching(kubeapi)
    kubeapi.put_pod(changed(pods[2], "after-cut"))
    received = receiver.wait_for_pods(has("default/web-2", change="after-cut"))
    assert not [p for p in received if p["status"]["phase"] == "Deleted"]
    assert lists(kubeapi) == 1  # watched again, not listed
    assert service.count(r"watch failed") == 1


@pytest.mark.parametrize("http", [False, True], ids=["error-event", "http-410"])
def test_an_expired_watch_lists_again_and_loses_nothing(kubeapi, start, receivers, http):
    pods = [make_pod("default", f"web-{i}") for i in range(3)]
    for pod in pods:
        kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(3)
    watching(kubeapi)
    kubeapi.expire_watch(http=http)
    kubeapi.cut_watches()  # the next watch is the expired one
    kubeapi.put_pod(changed(pods[0], "meanwhile"))
    kubeapi.delete_pod("default", "web-1")
    received = receiver.wait_for_pods(has("default/web-1", phase="Deleted"), "deletion")
    receiver.wait_for_pods(has("default/web-0", change="meanwhile"), "change")
    service.wait_log(r"watch expired .*; listing pods again")
    assert lists(kubeapi) == 2
    assert not [
        p for p in received if p["status"]["phase"] == "Deleted" and key(p) != "default/web-1"
    ]


def test_the_namespaced_path_is_watched(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("shop", "cart"))
    kubeapi.put_pod(make_pod("default", "other"))
    receiver = receivers()
    start(f"--url={receiver.url}", "--namespace=shop")
    receiver.wait_for(1)
    watching(kubeapi)
    kubeapi.put_pod(changed(kubeapi.get_pod("default", "other"), "x"))
    kubeapi.put_pod(changed(kubeapi.get_pod("shop", "cart"), "y"))
    received = receiver.wait_for_pods(has("shop/cart", change="y"))
    assert {key(p) for p in received} == {"shop/cart"}
    assert any(
        "/api/v1/namespaces/shop/pods?" in path and "watch=1" in path
        for _, path in kubeapi.requests
    )


def test_pods_under_duress_are_sent_every_interval_without_a_list(
    kubeapi, kubeconfig, kubectl_path, tmp_path, receivers
):
    kubeapi.put_pod(make_pod("default", "sick", healthy=False))
    kubeapi.put_pod(make_pod("default", "fine"))
    receiver = receivers()
    service = Service(
        [
            f"--kubectl={kubectl_path}",
            "--mode=watch",
            "--interval=0.3",
            "--resync=0",
            "--listen=127.0.0.1:0",
            f"--url={receiver.url}",
        ],
        service_env(kubeconfig),
        tmp_path / "run",
    )
    try:
        received = receiver.wait_for_pods(
            lambda pods: sum(key(p) == "default/sick" for p in pods) >= 4, "4 re-sends"
        )
        assert sum(key(p) == "default/fine" for p in received) == 1
        assert lists(kubeapi) == 1
        # counted as in poll mode: each interval, the pods under duress
        service.wait_log(r"listening on http://")
        url = re.search(r"listening on (http://\S+)", service.log()).group(1)
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        found = re.search(r'^k8svent_pods_selected_total\{reason="unhealthy"\} (\S+)$', text, re.M)
        assert found and float(found.group(1)) >= 3, text
    finally:
        service.kill()


def test_a_resync_sends_what_the_watch_missed(
    kubeapi, kubeconfig, kubectl_path, tmp_path, receivers
):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    # What a resync finds is taken once the watch has caught up with the list:
    # bookmarks (a real server sends one about every minute) tell it has.
    kubeapi.bookmark_seconds = 0.2
    receiver = receivers()
    service = Service(
        [
            f"--kubectl={kubectl_path}",
            "--mode=watch",
            "--interval=600",
            "--resync=1",
            "--listen=127.0.0.1:0",
            f"--url={receiver.url}",
        ],
        service_env(kubeconfig),
        tmp_path / "run",
    )
    try:
        receiver.wait_for(1)
        watching(kubeapi)
        kubeapi.put_pod(changed(pod, "missed"), missed=True)
        receiver.wait_for_pods(has("default/web", change="missed"), "the missed change")
        service.wait_log(r"WARNING resync: the watch missed 1 changes \(new or changed")
        # a deletion the watch missed
        kubeapi.delete_pod("default", "web", missed=True)
        receiver.wait_for_pods(has("default/web", phase="Deleted"), "the missed deletion")
        service.wait_log(r"WARNING resync: the watch missed 1 changes \(deleted")
        url = re.search(r"listening on (http://\S+)", service.log()).group(1)
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert re.search(r"^k8svent_resync_changes_total 2\.0$", text, re.M), text
        assert re.search(r'^k8svent_resyncs_total\{outcome="success"\} [1-9]', text, re.M)
        assert 'reason="resync"' not in text  # a resync no longer stops the watch
        assert re.search(r'^k8svent_watch_events_total\{type="BOOKMARK"\} [1-9]', text, re.M)
        # resyncs that find nothing say nothing
        assert service.count(r"WARNING resync") == 2
    finally:
        service.kill()


def test_what_no_watch_told_arrives_at_the_next_resync_in_a_quiet_cluster(
    kubeapi, start, receivers
):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    kubeapi.put_pod(make_pod("default", "db"))
    kubeapi.bookmark_seconds = 3600  # a quiet cluster: nothing moves the watch on
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--resync=1")
    receiver.wait_for(2)
    watching(kubeapi)
    listed = r"resync: \d+ pods listed"

    def next_resync_sends(predicate, what):
        # a list that began after the change has ended: it is sent by then
        service.wait_log(listed, count=service.count(listed) + 2)
        receiver.wait_for_pods(predicate, what, timeout=2)

    kubeapi.put_pod(changed(pod, "hidden"), missed=True)
    next_resync_sends(has("default/web", change="hidden"), "hidden change")
    kubeapi.delete_pod("default", "db", missed=True)
    next_resync_sends(has("default/db", phase="Deleted"), "hidden deletion")
    kubeapi.put_pod(changed(pod, "told"))  # the watch goes on after them
    receiver.wait_for_pods(has("default/web", change="told"), "a change the watch told")
    assert [(key(p), _field(p, "change"), _field(p, "phase")) for p in receiver.pods()[2:]] == [
        ("default/web", "hidden", "Running"),
        ("default/db", None, "Deleted"),
        ("default/web", "told", "Running"),
    ]
    assert kubeapi.open_watches == 1


def test_once_lists_delivers_and_exits_in_watch_mode(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 0
    assert receiver.keys() == ["default/web"]
    assert not any("watch=1" in path for _, path in kubeapi.requests)


def test_a_quiet_watch_is_healthy(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--listen=127.0.0.1:0")
    receiver.wait_for(1)
    watching(kubeapi)
    service.wait_log(r"listening on http://")
    url = re.search(r"listening on (http://\S+)", service.log()).group(1)
    with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
        assert answer.status == 200
    with urllib.request.urlopen(url + "/readyz", timeout=5) as answer:
        assert answer.status == 200


def test_a_watch_that_keeps_failing_backs_off_and_lists_again(kubeapi, start, receivers):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}")
    receiver.wait_for(1)
    watching(kubeapi)
    kubeapi.fail(500, count=3, path_prefix="/api/v1/pods")
    kubeapi.cut_watches()
    service.wait_log(r"WARNING watch failed \(")
    kubeapi.put_pod(changed(pod, "after"))
    received = receiver.wait_for_pods(has("default/web", change="after"))
    assert not [p for p in received if p["status"]["phase"] == "Deleted"]
    service.wait_log(r"WARNING watch works again after")
    assert service.count(r"WARNING watch") == 2, service.log()  # trouble starts, and ends


def test_a_forbidden_watch_backs_off_with_one_warning_at_start_and_one_at_end(
    kubeapi, start, receivers
):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--retry-interval=1")
    receiver.wait_for(1)
    watching(kubeapi)
    kubeapi.fail(403, count=100000, path_prefix="/api/v1/pods")
    kubeapi.cut_watches()
    began = time.monotonic()
    service.wait_log(r"watch failed \(.*Forbidden")
    before = len(kubeapi.requests)
    time.sleep(6)  # the window measured: requests and log lines during the trouble
    during = len(kubeapi.requests) - before
    assert during <= 10, during  # backed off to --retry-interval (1 s)
    kubeapi.clear_rules()
    kubeapi.put_pod(changed(pod, "after"))
    receiver.wait_for_pods(has("default/web", change="after"), timeout=30)
    service.wait_log(r"WARNING watch works again after")
    warned = [line for line in service.log().splitlines() if " WARNING " in line]
    assert len(warned) == 2, warned
    assert time.monotonic() - began < 40
    assert not service.count(r"ERROR")


def test_a_server_that_closes_every_watch_at_once_sees_few_watches(kubeapi, start, receivers):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    receiver = receivers()
    start(f"--url={receiver.url}", "--retry-interval=30")
    receiver.wait_for(1)
    watching(kubeapi)
    kubeapi.close_watches_at_once = True
    kubeapi.cut_watches()
    before = kubeapi.watch_starts
    time.sleep(10)  # the window measured
    starts = kubeapi.watch_starts - before
    assert 2 <= starts <= 20, starts
    kubeapi.close_watches_at_once = False
    kubeapi.put_pod(changed(pod, "after"))  # told once a watch stays open
    receiver.wait_for_pods(has("default/web", change="after"), timeout=40)


def test_a_watch_that_cannot_be_restarted_is_not_ready_but_live(
    kubeapi, kubeconfig, kubectl_path, tmp_path
):
    settings = k8svent.settings_from(
        k8svent.parse_arguments(
            [
                "--dry-run",
                f"--kubectl={kubectl_path}",
                "--interval=10",
                "--retry-interval=0.2",
                "--kubectl-timeout=5",
            ]
        ),
        {},
    )
    kubeapi.put_pod(make_pod("default", "web"))
    store = k8svent.Store(str(tmp_path / "state.db"))
    watcher = k8svent.Watcher(settings, store, [])
    health = k8svent.Health(watcher, settings)
    watcher.start()
    try:
        watching(kubeapi)
        progress = watcher.last_progress
        assert health.live() == (True, "ok")
        assert health.ready() == (True, "ok")
        # every watch, and every list after them, fails from now on
        kubeapi.fail(500, count=100000, path_prefix="/api/v1/pods")
        kubeapi.cut_watches()
        deadline = time.monotonic() + 20
        before = len(kubeapi.requests)
        # three watches, then lists, all failing
        while sum("/pods?" in path for _, path in kubeapi.requests[before:]) < 6:
            assert time.monotonic() < deadline, "the watcher stopped trying"
            time.sleep(0.05)
        assert any("watch=1" not in path for _, path in kubeapi.requests[before:])
        # the API server is down, not k8svent: not ready, but live (a restart cures nothing)
        assert watcher.last_progress > progress  # each attempt is progress
        ok, why = health.ready()
        assert not ok and "failed" in why, why
        assert health.live() == (True, "ok")
        # a watcher thread that stopped turning is stuck
        late = k8svent.Health(
            watcher, settings, clock=lambda: watcher.last_progress + 3 * 10 + 5 + 1
        )
        ok, why = late.live()
        assert not ok and "no progress" in why
    finally:
        watcher.stop()
        watcher.join(10)
        store.close()


# --- A resync beside the watch ------------------------------------------------


@pytest.mark.parametrize(
    "listed_rv, watch_rv, touched_rv, held_rv, action",
    [
        # the watch has not touched the pod since the list began
        ("10", "20", None, None, "take"),  # the watch is past it: a change it missed
        ("20", "20", None, None, "take"),
        # newer than the watch has told: newer than the snapshot's state, taken now
        ("30", "20", None, "25", "ahead"),
        ("30", "20", None, "20", "ahead"),  # held: at most where the watch is
        ("30", "20", None, "30", "skip"),  # the snapshot holds it already
        ("30", "20", None, "35", "skip"),  # or a newer state
        ("30", "20", None, None, "wait"),  # its held state does not compare: the watch tells
        ("30", "20", None, "x", "wait"),
        # the watch touched it: its state is as new or newer
        ("10", "20", "15", None, "skip"),
        ("15", "20", "15", None, "skip"),
        ("18", "20", "15", None, "take"),  # newer than the watch's last event, and missed
        ("30", "40", "35", None, "skip"),
        ("30", "25", "22", "22", "ahead"),  # newer than both
        ("30", "25", "30", "30", "skip"),
        # resourceVersions that are not integers: the watch wins where it touched
        ("x", "y", None, None, "take"),
        ("x", "y", "z", None, "skip"),
        ("10", "20", k8svent.TOUCHED, None, "skip"),
        ("30", "20", k8svent.TOUCHED, "25", "skip"),
    ],
)
def test_resync_action(listed_rv, watch_rv, touched_rv, held_rv, action):
    assert k8svent.resync_action(listed_rv, watch_rv, touched_rv, held_rv) == action


@pytest.mark.parametrize(
    "interval, took, wait",
    [(20, 5, 15), (20, 12, 10), (20, 30, 10), (5, 30, 2.5), (600, 20, 580)],
)
def test_a_slow_resync_delays_the_next_never_back_to_back(interval, took, wait):
    assert k8svent.resync_wait(interval, took) == wait


def test_the_first_resync_follows_the_first_list_as_resyncs_follow_each_other(
    kubeapi, start, receivers
):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.hang(6, page=0)  # the first list takes 6 s of its --resync=8
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--resync=8", "--kubectl-timeout=30")
    service.wait_log(r"list: 1 pods seen", timeout=30)
    listed = time.monotonic()
    receiver.wait_for(1)
    # 8 s from the start of the first list, but half an interval after its end:
    # 4 s from now (a full --resync, 8 s, before).
    deadline = listed + 6.5
    while lists(kubeapi) < 2:
        assert time.monotonic() < deadline, "no resync yet"
        time.sleep(0.05)
    assert time.monotonic() > listed + 3, "a resync too soon after the first list"


def test_a_slow_resync_list_does_not_hold_up_the_watch(kubeapi, start, receivers):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--resync=1", "--kubectl-timeout=30")
    receiver.wait_for(1)
    watching(kubeapi)
    listed = lists(kubeapi)
    kubeapi.hang(8, count=1000, page=0)  # every list, from now on, takes 8 s
    deadline = time.monotonic() + 10
    while lists(kubeapi) == listed:  # a resync list has begun (and hangs)
        assert time.monotonic() < deadline, "no resync"
        time.sleep(0.05)
    latencies = []
    for i in range(3):
        began = time.monotonic()
        kubeapi.put_pod(changed(pod, str(i)))
        receiver.wait_for_pods(has("default/web", change=str(i)), f"change {i}")
        latencies.append(time.monotonic() - began)
    assert max(latencies) < 2.0, latencies
    assert kubeapi.open_watches == 1  # the watch never stopped
    assert lists(kubeapi) == listed + 1  # never back to back
    assert "Traceback" not in service.log()


def test_a_failed_resync_is_logged_once_and_retried_while_the_watch_goes_on(
    kubeapi, start, receivers
):
    pod = make_pod("default", "web")
    kubeapi.put_pod(pod)
    receiver = receivers()
    service = start(f"--url={receiver.url}", "--resync=1", "--retry-interval=1")
    receiver.wait_for(1)
    watching(kubeapi)
    kubeapi.fail(500, count=4, page=0)  # the next four resync lists
    service.wait_log(r"WARNING resync failed \(")
    kubeapi.put_pod(changed(pod, "during"))
    receiver.wait_for_pods(has("default/web", change="during"), "a change during the trouble")
    service.wait_log(r"WARNING resync works again after", timeout=40)
    assert service.count(r"WARNING resync") == 2, service.log()
    assert service.count(r"resync: \d+ pods listed") >= 1
    assert kubeapi.open_watches == 1


def _versioned(name, rv, label="x"):
    pod = make_pod("default", name)
    pod["metadata"]["resourceVersion"] = str(rv)
    pod["metadata"].setdefault("labels", {})["change"] = label
    return pod


def test_a_batch_of_watch_events_that_fails_changes_nothing(tmp_path):
    # Half a batch committed would hold a change in the snapshot that no
    # webhook is owed: the list that follows would find nothing new in it.
    store = k8svent.Store(str(tmp_path / "s.db"))
    store.outbox.set_endpoints(["e"])
    watcher = k8svent.Watcher(k8svent.Settings(resync=0), store, [])
    store.snapshot.apply([k8svent.pod_entry(_versioned("x", 5))])
    store.outbox.settle("e", [("default/x", row.msg_id) for row in _owed(store)])
    watcher._rv = watcher._applied_rv = "10"
    changed = k8svent.pod_entry(_versioned("x", 11, label="y"))
    broken = k8svent.pod_entry(_versioned("y", 12))._replace(body=None)  # cannot be stored
    with pytest.raises(TypeError):
        watcher._apply_events([("MODIFIED", changed, "11"), ("ADDED", broken, "12")])
    assert _owed(store) == []
    assert (watcher._rv, watcher.applied_rv) == ("10", "10")
    watcher._apply_events([("MODIFIED", changed, "11")])  # the watch from 10, again
    assert [row.key for row in _owed(store)] == ["default/x"]
    assert watcher.applied_rv == "11"


def _owed(store):
    claimed, _ = store.outbox.take("e", float("inf"), (), 10)
    return claimed


def _lanes(store):
    """Each lane's rows owed to webhook e, in order: (kind, pod's change label, phase)."""
    lanes = {}
    while claimed := _owed(store):
        for row in claimed:
            pod = json.loads(row.body)
            lanes.setdefault(row.lane, []).append(
                (row.kind, pod["metadata"].get("labels", {}).get("change"), pod["status"]["phase"])
            )
        store.outbox.settle("e", [(row.key, row.msg_id) for row in claimed])
    return lanes


def test_a_batch_of_watch_events_owes_what_its_events_owe_one_by_one(tmp_path):
    # The new and changed pods of a batch are taken together: what they owe,
    # in each lane's order, is what the same events owe one batch each.
    recreated = _versioned("z", 15, label="again")
    recreated["metadata"]["uid"] = "another-uid"
    events = [
        ("MODIFIED", _versioned("x", 11, label="x11"), "11"),
        ("ADDED", _versioned("n", 12, label="n12"), "12"),
        ("MODIFIED", _versioned("x", 13, label="x13"), "13"),  # x again: after the first
        ("DELETED", _versioned("y", 14), "14"),
        ("MODIFIED", recreated, "15"),  # z deleted and created again, unseen
        ("BOOKMARK", None, "16"),
        ("MODIFIED", _versioned("w", 5), "17"),  # as the snapshot has it: nothing owed
        ("ADDED", _versioned("y", 18, label="y18"), "18"),  # y back, after its deletion
    ]
    outcomes = []
    for batches in ([events], [[event] for event in events]):
        store = k8svent.Store(str(tmp_path / f"{len(batches)}.db"))
        store.outbox.set_endpoints(["e"])
        watcher = k8svent.Watcher(k8svent.Settings(resync=0), store, [])
        store.snapshot.apply([k8svent.pod_entry(_versioned(n, 5)) for n in "wxyz"])
        _lanes(store)
        watcher._rv = "10"
        selected = {r: k8svent.metrics.pods_selected.labels(r)._value.get() for r in k8svent.KINDS}
        for batch in batches:
            watcher._apply_events(
                [(kind, pod and k8svent.pod_entry(pod), rv) for kind, pod, rv in batch]
            )
        counted = {
            r: k8svent.metrics.pods_selected.labels(r)._value.get() - selected[r]
            for r in k8svent.KINDS
        }
        outcomes.append((_lanes(store), counted, watcher.applied_rv))
    assert outcomes[0] == outcomes[1]
    lanes, counted, applied = outcomes[0]
    assert lanes == {
        "default/x": [("changed", "x13", "Running")],
        "default/n": [("new", "n12", "Running")],
        "default/y": [("deleted", "x", "Deleted"), ("new", "y18", "Running")],
        "default/z": [("deleted", None, "Deleted"), ("new", "again", "Running")],  # body dropped
    }
    assert counted == {"new": 3, "changed": 2, "unhealthy": 0, "deleted": 1}
    assert applied == "18"


def test_the_resync_merge_never_undoes_the_watch(tmp_path):
    store = k8svent.Store(str(tmp_path / "s.db"))
    store.outbox.set_endpoints(["e"])
    watcher = k8svent.Watcher(k8svent.Settings(resync=0), store, [])
    old = {n: _versioned(n, 5) for n in ("x", "z", "w", "v", "u", "s", "q")}
    del old["q"]["metadata"]["resourceVersion"]  # its body is never read for its version
    store.snapshot.apply([k8svent.pod_entry(p) for p in old.values()])
    watcher._rv = "10"
    missed = k8svent.metrics.resync_changes

    def event(kind, pod):
        rv = pod["metadata"]["resourceVersion"]
        watcher._apply_events([(kind, k8svent.pod_entry(pod), rv)])  # a batch, as the watch's

    def bookmark(rv):
        watcher._apply_events([("BOOKMARK", None, rv)])

    def resync(listed_rv, pods, before=(), between=()):
        """A resync list at listed_rv of these pods, with watch events before its
        page and between it and the list's end."""
        generation = watcher.begin_resync()
        for kind, pod in before:
            event(kind, pod)
        counts = watcher.resync_page(
            generation,
            [(k8svent.pod_entry(p), p["metadata"].get("resourceVersion")) for p in pods],
        )
        k8svent._report_missed(counts["missed"], "new or changed pods")  # as the Resyncer does
        for kind, pod in between:
            event(kind, pod)
        watcher.finish_resync(generation, {key(p) for p in pods}, listed_rv)

    def state(name):
        rows = store._db.execute(
            "SELECT b.body, p.deleted FROM pods p JOIN bodies b USING (key) WHERE p.key = ?",
            (f"default/{name}",),
        ).fetchone()
        if rows is None:
            return None
        pod = json.loads(k8svent._inflate(rows[0]))
        return pod["metadata"].get("resourceVersion"), pod["status"]["phase"]

    before = missed._value.get()
    # while the list (rv 14) runs, the watch tells x at 12, and creates y at 15 after it
    resync(
        "14",
        [
            _versioned("x", 11, "list"),  # older than what the watch applied: skipped
            _versioned("v", 9, "missed"),  # the watch is past 9 and never told it: taken
            *(old[n] for n in ("w", "q", "u", "s")),
        ],
        before=[("MODIFIED", _versioned("x", 12, "watch"))],
        between=[("ADDED", _versioned("y", 15))],  # not listed: the watch's, kept
    )
    assert state("x") == ("12", "Running")
    assert state("y") == ("15", "Running")
    assert state("v") == ("9", "Running")
    assert state("z") == ("5", "Deleted")  # not listed; the watch is past the list
    assert missed._value.get() == before + 2  # v and z

    # a list (rv 18) newer than the watch (15): w's and q's newer states are taken at once
    listed = [_versioned("x", 12, "watch"), _versioned("y", 15), _versioned("v", 9, "missed")]
    listed += [_versioned("w", 18, "newer"), _versioned("q", 16, "newer"), old["u"], old["s"]]
    resync("18", listed)
    assert state("w") == ("18", "Running")
    assert state("q") == ("16", "Running")
    assert missed._value.get() == before + 2  # w and q may yet be told by the watch
    event("MODIFIED", _versioned("w", 16, "older"))  # an older state: changes nothing
    assert state("w") == ("18", "Running")
    event("MODIFIED", _versioned("w", 18, "newer"))  # w told: it raced the list
    bookmark("20")
    assert state("w") == ("18", "Running")
    assert missed._value.get() == before + 3  # q, not w
    assert not watcher._ahead

    # a list (rv 22) newer than the watch (20) without u and s: deleted at once
    resync("22", listed[:5])
    assert state("u") == ("5", "Deleted")
    assert state("s") == ("5", "Deleted")
    event("MODIFIED", _versioned("u", 21, "before"))  # u's state before its deletion
    assert state("u") == ("5", "Deleted")  # changes nothing: u is never alive again
    event("DELETED", _versioned("u", 22))  # the watch tells u's deletion: it raced the list
    bookmark("23")  # ... but never s's
    assert missed._value.get() == before + 4
    assert not watcher._ahead
    event("ADDED", _versioned("u", 24, "again"))  # created again after the list: the watch's
    assert state("u") == ("24", "Running")
    store.close()


# ---- what the state keeps: a body only while it is owed ----------------------


def _state_bodies(path):
    """The keys of the bodies the state file keeps, and how many pods it knows."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        bodies = {k for (k,) in db.execute("SELECT key FROM bodies")}
        return bodies, db.execute("SELECT count(*) FROM pods").fetchone()[0]


def _wait_state(path, condition, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition(_state_bodies(path)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_body_stays_while_a_webhook_is_owed_it_and_goes_once_all_have_it(
    kubeapi, start, receivers, tmp_path
):
    state = tmp_path / "state.db"
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.put_pod(make_pod("default", "db"))
    up, down = receivers(), receivers()
    down.down()  # refused: owed, and retried
    first = start(f"--state={state}", f"--url={up.url}", f"--url={down.url}")
    up.wait_for(2)
    first.wait_log("is down")
    first.kill()  # kill -9 while `down` is owed both pods
    assert _state_bodies(state) == ({"default/web", "default/db"}, 2)
    down.up()
    up.clear()
    second = start(f"--state={state}", f"--url={up.url}", f"--url={down.url}")
    down.wait_for(2)
    # every webhook has them: the bodies go, the snapshot keeps both pods
    _wait_state(state, lambda kept: kept == (set(), 2), "the bodies to be dropped")
    assert up.received == []
    # a change is owed (a body again) until delivered, then dropped
    web = kubeapi.get_pod("default", "web")
    kubeapi.put_pod(changed(web, "yes"))
    down.wait_for_pods(has("default/web", change="yes"), "the change")
    up.wait_for_pods(has("default/web", change="yes"), "the change")
    _wait_state(state, lambda kept: kept == (set(), 2), "the changed body to be dropped")
    assert second.stop() == 0


def test_the_state_is_a_fraction_of_the_pods_once_they_are_delivered(
    kubeapi, start, receivers, tmp_path
):

    state = tmp_path / "state.db"
    items = list(generate_items(2000))
    kubeapi.load_items(items)
    pods_bytes = sum(
        len(k8svent.encode_pod(k8svent.pod_from_item(json.loads(data)))) for _, _, data in items
    )
    hook = receivers()
    service = start(f"--state={state}", f"--url={hook.url}")
    hook.wait_for(2000, timeout=60)
    watching(kubeapi)

    def state_bytes():
        return sum(
            os.path.getsize(f"{state}{suffix}")
            for suffix in ("", "-wal", "-shm")
            if os.path.exists(f"{state}{suffix}")
        )

    deadline = time.monotonic() + 20
    while state_bytes() > 0.6 * pods_bytes:
        assert time.monotonic() < deadline, (
            f"the state holds {state_bytes():,} bytes for {pods_bytes:,} bytes of pods"
        )
        time.sleep(0.1)
    assert service.stop() == 0
