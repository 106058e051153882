"""Restarts with the same --state: real processes, the real kubectl, receivers on 127.0.0.1."""

import contextlib
import sqlite3
import time

import pytest

from test.pods import generate_items, make_pod
from test.receivers import Receiver
from test.service import Service, service_env

# The poll mode, whose tests count polls; test_watch.py has the watch mode.
FAST = ["--mode=poll", "--interval=0.5", "--retry-interval=0.3", "--log-level=debug"]


@pytest.fixture
def receiver():
    made = Receiver()
    yield made
    made.close()


@pytest.fixture
def run(kubeconfig, kubectl_path, tmp_path):
    """Start k8svent with --state in tmp_path; every run is killed afterwards."""
    started = []

    def start(*args, state=None):
        argv = [
            f"--kubectl={kubectl_path}",
            f"--state={state or tmp_path / 'state.db'}",
            *FAST,
            *args,
        ]
        service = Service(argv, service_env(kubeconfig), tmp_path / f"run{len(started)}")
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


def key(pod):
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def test_second_run_sends_only_changed_unhealthy_and_deleted(kubeapi, run, receiver):
    steady, changing, sick, doomed = (
        make_pod("default", "steady"),
        make_pod("default", "changing"),
        make_pod("default", "sick", healthy=False),
        make_pod("default", "doomed"),
    )
    for pod in (steady, changing, sick, doomed):
        kubeapi.put_pod(pod)
    assert run(f"--url={receiver.url}", "--once").wait() == 0
    assert sorted(receiver.keys()) == [
        "default/changing",
        "default/doomed",
        "default/sick",
        "default/steady",
    ]
    receiver.clear()
    # while k8svent is down: one pod changes, one is deleted, one is born
    changing["metadata"].setdefault("labels", {})["change"] = "yes"
    kubeapi.put_pod(changing)
    kubeapi.delete_pod("default", "doomed")
    kubeapi.put_pod(make_pod("default", "born"))
    service = run(f"--url={receiver.url}", "--once")
    assert service.wait() == 0
    pods = {key(p): p for p in receiver.pods()}
    assert sorted(pods) == ["default/born", "default/changing", "default/doomed", "default/sick"]
    assert len(receiver.received) == 4
    assert pods["default/changing"]["metadata"]["labels"]["change"] == "yes"
    assert pods["default/doomed"]["status"]["phase"] == "Deleted"
    assert "sending 1 new, 1 changed, 1 unhealthy, 1 deleted" in service.log()
    # a third run: the deletion was told, only the unhealthy pod goes again
    receiver.clear()
    assert run(f"--url={receiver.url}", "--once").wait() == 0
    assert receiver.keys() == ["default/sick"]


def test_endpoint_down_before_the_restart_still_gets_what_it_was_owed(kubeapi, run, receiver):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.put_pod(make_pod("default", "doomed"))
    up = Receiver()
    try:
        receiver.down()
        service = run(f"--url={up.url}", f"--url={receiver.url}", "--retry-budget=0.5")
        up.wait_for(2)
        service.wait_log("still owed after the retry budget")
        assert service.stop() == 0
        kubeapi.delete_pod("default", "doomed")
        receiver.up()
        up.clear()
        service = run(f"--url={up.url}", f"--url={receiver.url}", "--once")
        assert service.wait() == 0
        pods = {key(p): p for p in receiver.pods()}
        assert sorted(pods) == ["default/doomed", "default/web"]
        assert pods["default/doomed"]["status"]["phase"] == "Deleted"
        # the endpoint that was up only hears of the deletion
        assert up.keys() == ["default/doomed"]
    finally:
        up.close()


def test_corrupt_state_is_set_aside_and_everything_sent(kubeapi, run, receiver, tmp_path):
    kubeapi.put_pod(make_pod("default", "web"))
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not an SQLite database" * 200)
    service = run(f"--url={receiver.url}", "--once", state=state)
    assert service.wait() == 0
    assert receiver.keys() == ["default/web"]
    aside = list(tmp_path.glob("state.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert f"state file {state} is unreadable" in service.log()
    assert f"moved it to {aside[0]}" in service.log()
    assert "every pod will be sent again" in service.log()


def staged_rows(state):
    """How many pods a poll in progress has staged in a state file."""
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
        return db.execute("SELECT count(*) FROM staged").fetchone()[0]


def test_kill_9_mid_poll_loses_nothing(kubeapi, run, receiver, tmp_path):
    # 1,200 pods in pages of 500: the third page hangs, kill -9 lands mid-poll,
    # once the first pages are staged in the state (a batch of 500 at a time).
    def items(restarts):
        return (
            (ns, name, data.replace(b'"restartCount":0', b'"restartCount":%d' % restarts))
            for ns, name, data in generate_items(1200, unhealthy_every=0)
        )

    kubeapi.load_items(items(0))
    everything = set(kubeapi.pod_keys())
    first = run(f"--url={receiver.url}", "--chunk-size=500", "--once")
    assert first.wait() == 0
    assert set(receiver.keys()) == everything
    receiver.clear()
    # change every pod, then hang the third page of the next poll
    kubeapi.load_items(items(1))
    kubeapi.hang(30, page=2)
    victim = run(f"--url={receiver.url}", "--chunk-size=500", "--kubectl-timeout=60")
    deadline = time.monotonic() + 20
    while staged_rows(tmp_path / "state.db") < 500:
        assert time.monotonic() < deadline, "no page was staged"
        time.sleep(0.05)
    victim.kill()
    assert receiver.received == []  # nothing was delivered: the poll never ended
    kubeapi.clear()
    kubeapi.load_items(items(1))
    survivor = run(f"--url={receiver.url}", "--chunk-size=500", "--once")
    assert survivor.wait() == 0
    got = {key(p): p for p in receiver.pods()}
    assert set(got) == everything
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 1 for p in got.values())
    assert "Deleted" not in {p["status"]["phase"] for p in got.values()}


def test_a_delivery_keeps_its_webhook_id_across_a_kill(kubeapi, run, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    hook = receivers([503, 503, 503, 503, 503, 503, 503, 503], secret="s3cr3t")
    service = run(f"--url={hook.url}", "--secret=s3cr3t")
    hook.wait_attempts(1)
    service.kill()  # kill -9: the outbox row, with its id, is in the state file
    hook.answers.clear()
    assert run(f"--url={hook.url}", "--secret=s3cr3t", "--once").wait() == 0
    ids = {received.headers["webhook-id"] for received in hook.requests}
    assert len(ids) == 1 and hook.statuses[-1] == 200
