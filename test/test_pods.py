"""Pure parts: health rules, payloads, signatures, selection and deletion."""

import copy
import json
import os
import re
import sqlite3
import time
import zlib
from pathlib import Path

import pytest
import standardwebhooks
from cloudevents.core.bindings import http as http_binding

import k8svent


def running_pod(**status):
    pod = {
        "metadata": {"namespace": "ns", "name": "p", "resourceVersion": "1"},
        "spec": {},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
            "initContainerStatuses": [
                {
                    "name": "init",
                    "ready": True,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
            ],
            "containerStatuses": [
                {
                    "name": "c",
                    "ready": True,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }
            ],
        },
    }
    pod["status"].update(status)
    return pod


def with_container(state, ready=True, init=False):
    pod = running_pod()
    field = "initContainerStatuses" if init else "containerStatuses"
    pod["status"][field] = [{"name": "x", "ready": ready, "state": state}]
    return pod


@pytest.mark.parametrize(
    "pod, healthy",
    [
        (running_pod(), True),
        (running_pod(phase="Pending"), False),
        (running_pod(phase="Failed"), False),
        (running_pod(phase="Succeeded"), False),
        (running_pod(conditions=[{"type": "Ready", "status": "False"}]), False),
        (running_pod(conditions=[{"type": "Ready", "status": "Unknown"}]), False),
        (running_pod(conditions=[]), True),
        (with_container({"waiting": {"reason": "CrashLoopBackOff"}}, ready=False), False),
        (with_container({"running": {}}, ready=False), False),
        (with_container({"terminated": {"exitCode": 0}}), False),
        (with_container({"running": {}, "waiting": {}}), False),
        (with_container({}), False),
        (with_container({"terminated": {"exitCode": 0}}, init=True), True),
        (with_container({"terminated": {"exitCode": 1}}, init=True), False),
        (with_container({"running": {}}, init=True), True),
        (with_container({"running": {}}, ready=False, init=True), False),
        (with_container({"waiting": {"reason": "PodInitializing"}}, init=True), False),
        (with_container({}, init=True), False),
    ],
)
def test_pod_healthy(pod, healthy):
    assert k8svent.pod_healthy(pod) is healthy


@pytest.mark.parametrize(
    "phase, duress",
    [
        ("Running", False),
        ("Pending", True),
        ("Failed", True),
        ("Unknown", True),
        # Correction to the original: a finished Job pod is not in trouble.
        ("Succeeded", False),
    ],
)
def test_pod_under_duress(phase, duress):
    pod = running_pod(phase=phase)
    assert k8svent.pod_under_duress(pod) is duress


def test_pod_from_item_matches_kubectl_get():
    item = {
        "metadata": {"name": "p", "namespace": "ns", "managedFields": [{"x": 1}]},
        "spec": {"a": 1},
        "status": {"phase": "Running"},
    }
    pod = k8svent.pod_from_item(copy.deepcopy(item))
    assert list(pod)[:2] == ["apiVersion", "kind"]
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    assert "managedFields" not in pod["metadata"]
    assert pod["spec"] == item["spec"]
    assert k8svent.pod_key(pod) == "ns/p"


def test_payload_and_deleted():
    pod_bytes = k8svent.encode_pod({"metadata": {"name": "p"}, "status": {"phase": "Running"}})
    body = json.loads(k8svent.payload(pod_bytes))
    assert body == {"pod": {"metadata": {"name": "p"}, "status": {"phase": "Running"}}}
    deleted = json.loads(k8svent.mark_deleted(pod_bytes))
    assert deleted["status"]["phase"] == "Deleted"
    assert k8svent.fingerprint(pod_bytes) != k8svent.fingerprint(k8svent.mark_deleted(pod_bytes))


# --- CloudEvents (SPEC section 11), parsed by the cloudevents SDK ----------------


def parse_cloudevent(headers, body):
    """A request as a receiver built on the cloudevents SDK (2.2.0) reads it."""
    return http_binding.from_http_event(http_binding.HTTPMessage(headers, body))


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-json"])
@pytest.mark.parametrize("kind", k8svent.KINDS)
def test_cloudevents_parse_with_the_sdk(fmt, kind):
    pod = running_pod()
    body, headers = k8svent.message(
        fmt,
        kind,
        "ns/web#uid-1",
        k8svent.encode_pod(pod),
        "msg_0123",
        1796457600.25,
        "https://api.example.com:6443/k8s/clusters/c%3A1",
    )
    event = parse_cloudevent(headers, body)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == "msg_0123"
    assert event.get_source() == "https://api.example.com:6443/k8s/clusters/c%3A1"
    assert event.get_type() == f"com.atomist.k8svent.pod.{kind}"
    assert event.get_subject() == "/api/v1/namespaces/ns/pods/web"
    assert event.get_time().isoformat() == "2026-12-05T08:00:00.250000+00:00"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == pod
    if fmt == "cloudevents":
        assert body == k8svent.encode_pod(pod) and headers["ce-specversion"] == "1.0"
        assert headers["Content-Type"] == "application/json"
    else:
        assert headers == {"Content-Type": "application/cloudevents+json"}
        assert json.loads(body)["data"] == pod
    # Attribute names as CloudEvents allows them: a-z and 0-9, at most 20.
    names = event.get_attributes()
    assert all(re.fullmatch(r"[a-z0-9]{1,20}", name) for name in names)


def test_k8svent_format_is_the_original_body():
    pod_bytes = k8svent.encode_pod(running_pod())
    body, headers = k8svent.message("k8svent", "new", "ns/p", pod_bytes, "msg_1", 0.0, "/x")
    assert body == b'{"pod":' + pod_bytes + b"}"
    assert headers == {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "unix_seconds, text",
    [
        (0, "1970-01-01T00:00:00.000000Z"),
        (1796457600.25, "2026-12-05T08:00:00.250000Z"),
        (1796457600.9999996, "2026-12-05T08:00:01.000000Z"),
        (1796457600.123456, "2026-12-05T08:00:00.123456Z"),
    ],
)
def test_cloudevents_time(unix_seconds, text):
    assert k8svent.cloudevents_time(unix_seconds) == text


@pytest.mark.parametrize(
    "server, source",
    [
        ("https://10.96.0.1:443", "https://10.96.0.1:443"),
        ("https://admin:hunter2@api.example.com:6443/", "https://api.example.com:6443"),
        (
            "https://rancher.example.com/k8s/clusters/c-x?token=t#f",
            "https://rancher.example.com/k8s/clusters/c-x",
        ),
        ("https://[::1]:6443", "https://[::1]:6443"),
        (None, "/k8svent"),
        ("", "/k8svent"),
    ],
)
def test_cloudevents_source_is_the_api_server_without_credentials(server, source):
    assert k8svent.cloudevents_source(server) == source


# Known answers: SPEC section 3 (Atomist's sha1) and GitHub's published sha256.
@pytest.mark.parametrize(
    "secret, body, header, expected",
    [
        (
            "The400Unit",
            b'{"jason":"isbell"}',
            "x-atomist-signature",
            "sha1=634212a9128672522f8d9ac32657d996d80ef7be",
        ),
        (
            "It's a Secret to Everybody",
            b"Hello, World!",
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ),
    ],
)
def test_sign_known_answers(secret, body, header, expected):
    assert k8svent.sign(body, secret)[header] == expected


# Known answers of Standard Webhooks: the first is the specification's own
# (standard-webhooks, also Svix's libraries); the others were made with the
# standardwebhooks package: Webhook(secret) for whsec_, else Webhook(secret.encode()).
STANDARD_WEBHOOKS_VECTORS = [
    (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ),
    (
        "The400Unit",
        "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        1700000000,
        b'{"jason":"isbell"}',
        "v1,ZzojFwvDfxrHy8k55FjKQClTv0LYoJxO3cDDmiULlk8=",
    ),
    (
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        "msg_loFOjxBNrRLzqYUf",
        1731705121,
        b'{"pod":{}}',
        "v1,1qF0ZcxjFhqcnnvu8mYz9tCfHvPAwsIEL5BvBA+Z1NE=",
    ),
    # unpadded base64, which the package accepts
    ("whsec_YWI", "msg_1", 1, b"x", "v1,WCxiHgOruXUZip89JISTAUIP52U+rVtS0itFVm/658s="),
]


@pytest.mark.parametrize("secret, message_id, timestamp, body, expected", STANDARD_WEBHOOKS_VECTORS)
def test_standard_webhooks_known_answers(secret, message_id, timestamp, body, expected):
    headers = k8svent.sign(body, secret, message_id, timestamp)
    assert headers["webhook-id"] == message_id
    assert headers["webhook-timestamp"] == str(timestamp)
    assert headers["webhook-signature"] == expected
    # the two older signatures stay, over the same body
    assert headers["x-atomist-signature"] == k8svent.sign(body, secret)["x-atomist-signature"]
    assert headers["X-Hub-Signature-256"] == k8svent.sign(body, secret)["X-Hub-Signature-256"]


@pytest.mark.parametrize(
    "secret", ["s3cr3t", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "ünïcödé", "whsec_YWI"]
)
def test_standard_webhooks_package_verifies(secret):
    body = b'{"pod":{"metadata":{"name":"p"}}}'
    verifier = standardwebhooks.Webhook(secret if secret.startswith("whsec_") else secret.encode())
    headers = k8svent.sign(body, secret, k8svent.new_message_id(), int(time.time()))
    assert verifier.verify(body, headers) == json.loads(body)
    stale = k8svent.sign(body, secret, "msg_1", int(time.time()) - 301)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(body, stale)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(body + b" ", headers)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_!!!!", "whsec_a", "whsec_YW-_"])
def test_bad_whsec_secret_is_refused(secret):
    with pytest.raises(ValueError, match="not base64"):
        k8svent.standard_webhooks_key(secret)


def test_message_ids_are_new_and_well_formed():
    ids = {k8svent.new_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"msg_[0-9a-f]{26}", i) for i in ids)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:pw@host:8443/p?q=1", "https://***@host:8443"),
        # a token as the user name alone, as GitHub and others issue them
        ("https://ghp_T0K3N@host/hooks", "https://***@host:443"),
        ("https://:pw@host/", "https://***@host:443"),
        ("https://@host/", "https://***@host:443"),
        ("https://host/p/T0K3N?token=T0K3N", "https://host:443"),
        ("http://[::1]:8080/x", "http://[::1]:8080"),
    ],
)
def test_redact_url(url, shown):
    assert k8svent.redact_url(url) == shown
    endpoint = k8svent.Endpoint(url, k8svent.Settings(urls=(url,)))
    assert endpoint.label == shown


def test_endpoint_label():
    assert k8svent.endpoint_label("https://user:pw@Host/hooks/T0K3N?x=1") == "https://host:443"
    assert k8svent.endpoint_label("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"


def test_backoff_delays_grow_with_jitter_and_cap():
    class Middle:
        @staticmethod
        def uniform(a, b):
            return (a + b) / 2

    first = [k8svent.backoff_delay(n, Middle) for n in range(1, 31)]
    assert first[:3] == [0.5, 0.75, 1.125]
    assert max(first) == 60
    assert all(0.25 <= k8svent.backoff_delay(n) <= 90 for n in range(1, 31))


# --- Selection and deletion, against the store ---------------------------------


def entries(*pods):
    return [k8svent.pod_entry(pod) for pod in pods]


def named(name, **status):
    pod = running_pod(**status)
    pod["metadata"]["name"] = name
    return pod


def poll(store, *pods):
    store.snapshot.begin_poll()
    counts = store.snapshot.apply_page(entries(*pods))
    counts["deleted"] = len(store.snapshot.finish_poll())
    return counts


def owed_rows(store, endpoint):
    """The head row of every lane owed to an endpoint, due or not, by key."""
    rows = {}
    while claimed := store.outbox.claim(
        endpoint, float("inf"), [row.lane for row in rows.values()]
    ):
        rows[claimed[0].key] = claimed[0]
    return rows


def owed(store, endpoint):
    return sorted(owed_rows(store, endpoint))


def deliver_all(store, endpoint):
    for key, row in owed_rows(store, endpoint).items():
        store.outbox.settle(endpoint, [(key, row.msg_id)])


@pytest.fixture
def store():
    s = k8svent.Store()
    s.outbox.set_endpoints(["e1", "e2"])
    yield s
    s.close()


def test_selection(store):
    a, b, sick = named("a"), named("b"), named("sick", phase="Pending")
    assert poll(store, a, b, sick) == {"new": 3, "changed": 0, "unhealthy": 0, "deleted": 0}
    assert owed(store, "e1") == ["ns/a", "ns/b", "ns/sick"]
    deliver_all(store, "e1")
    # unchanged healthy pods are not owed; the unhealthy one is, every poll
    assert poll(store, a, b, sick) == {"new": 0, "changed": 0, "unhealthy": 1, "deleted": 0}
    assert owed(store, "e1") == ["ns/sick"]
    # e2 got nothing yet: it is owed everything, once (coalesced)
    assert owed(store, "e2") == ["ns/a", "ns/b", "ns/sick"]
    # a change, even of resourceVersion alone, is a change
    b2 = copy.deepcopy(b)
    b2["metadata"]["resourceVersion"] = "2"
    assert poll(store, a, b2, sick)["changed"] == 1
    assert owed(store, "e1") == ["ns/b", "ns/sick"]
    assert json.loads(owed_rows(store, "e2")["ns/b"].body) == b2  # the newest state


def test_deletion_sent_once_then_forgotten(store):
    a, b = named("a"), named("b")
    poll(store, a, b)
    deliver_all(store, "e1")
    deliver_all(store, "e2")
    assert poll(store, a)["deleted"] == 1
    assert owed(store, "e1") == ["ns/b"]
    pod_bytes = owed_rows(store, "e1")["ns/b"].body
    assert json.loads(pod_bytes)["status"]["phase"] == "Deleted"
    assert poll(store, a)["deleted"] == 0  # reported once
    deliver_all(store, "e1")
    store.snapshot.prune()
    assert store.snapshot.count() == 2  # e2 has not been told yet
    deliver_all(store, "e2")
    store.snapshot.prune()
    assert store.snapshot.count() == 1
    assert owed(store, "e1") == [] and owed(store, "e2") == []


def newer(pod):
    """The pod at a later resourceVersion: a change."""
    changed = copy.deepcopy(pod)
    changed["metadata"]["resourceVersion"] = "2"
    return changed


def kinds(store, endpoint):
    return {key: row.kind for key, row in owed_rows(store, endpoint).items()}


def test_each_row_owes_the_kind_of_its_change_and_when_it_was_seen(store):
    a, b, sick = named("a"), named("b"), named("sick", phase="Pending")
    before = time.time()
    poll(store, a, b, sick)
    rows = owed_rows(store, "e1")
    assert {key: row.kind for key, row in rows.items()} == dict.fromkeys(rows, "new")
    assert all(before <= row.seen <= time.time() for row in rows.values())
    deliver_all(store, "e1")
    b2 = newer(b)
    poll(store, b2, sick)
    assert kinds(store, "e1") == {"ns/a": "deleted", "ns/b": "changed", "ns/sick": "unhealthy"}
    # e2 was told nothing yet: what it is owed stays new, but a deletion
    assert kinds(store, "e2") == {"ns/a": "deleted", "ns/b": "new", "ns/sick": "new"}


def test_a_retry_keeps_the_time_of_the_change(store):
    poll(store, named("a"))
    row = owed_rows(store, "e1")["ns/a"]
    store.outbox.retry_at("e1", row.key, row.msg_id, 1, time.time() + 5)
    again = owed_rows(store, "e1")["ns/a"]
    assert (again.msg_id, again.seen, again.kind) == (row.msg_id, row.seen, row.kind)


@pytest.mark.parametrize(
    "send, first, then",
    [
        # only deletions: the first poll owes nothing
        (("deleted",), {}, {"ns/a": "deleted"}),
        # only new pods: a change is not owed, a deletion not either
        (("new",), {"ns/a": "new", "ns/b": "new", "ns/sick": "new"}, {}),
        (("changed", "deleted"), {}, {"ns/a": "deleted", "ns/b": "changed"}),
        # only pods under duress: a new one is too, as unhealthy, at once
        (("unhealthy",), {"ns/sick": "unhealthy"}, {"ns/sick": "unhealthy"}),
    ],
)
def test_only_the_kinds_sent_are_owed(send, first, then):
    store = k8svent.Store(kinds=send)
    store.outbox.set_endpoints(["e1"])
    a, b, sick = named("a"), named("b"), named("sick", phase="Pending")
    try:
        poll(store, a, b, sick)
        assert kinds(store, "e1") == first
        deliver_all(store, "e1")
        b2 = newer(b)
        poll(store, b2, sick)
        assert kinds(store, "e1") == then
        # the outbox holds nothing else: no row waits for nobody
        assert store.outbox.backlog("e1")[0] == len(then)
    finally:
        store.close()


def test_with_only_deletions_sent_no_body_is_kept_and_a_deletion_names_the_pod():
    # --send=deleted: nothing is owed of the first list, so no body stays;
    # a deletion a list finds goes out as who the pod was.
    store = k8svent.Store(kinds=("deleted",))
    store.outbox.set_endpoints(["e1"])
    a = named("a")
    a["metadata"]["uid"] = "u1"
    try:
        poll(store, a)
        assert kinds(store, "e1") == {} and bodies(store) == set()
        poll(store)
        row = owed_rows(store, "e1")["ns/a"]
        assert row.kind == "deleted"
        assert json.loads(row.body) == {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1"},
            "status": {"phase": "Deleted"},
        }
    finally:
        store.close()


def test_a_change_not_sent_drops_a_row_it_would_mislabel():
    # --send=new,changed: a pod changed, then deleted before the change went
    # out, is not sent (its body now says Deleted); one still new stays new.
    store = k8svent.Store(kinds=("new", "changed"))
    store.outbox.set_endpoints(["e1"])
    a, b = named("a"), named("b")
    try:
        poll(store, a)
        deliver_all(store, "e1")
        a2 = newer(a)
        poll(store, a2, b)
        assert kinds(store, "e1") == {"ns/a": "changed", "ns/b": "new"}
        b2 = newer(b)
        poll(store, b2)
        assert kinds(store, "e1") == {"ns/b": "new"}
        assert json.loads(owed_rows(store, "e1")["ns/b"].body) == b2
    finally:
        store.close()


@pytest.mark.parametrize("send, after", [(k8svent.KINDS, {"ns/a": "changed"}), (("new",), {})])
def test_a_state_owed_while_a_new_pod_was_in_flight_is_a_change(send, after):
    store = k8svent.Store(kinds=send)
    store.outbox.set_endpoints(["e1"])
    a = named("a")
    try:
        poll(store, a)
        in_flight = owed_rows(store, "e1")["ns/a"]
        a2 = newer(a)
        poll(store, a2)
        assert kinds(store, "e1") == {"ns/a": "new"}  # the webhook may not hear of it
        store.outbox.settle("e1", [("ns/a", in_flight.msg_id)])  # it has now
        assert kinds(store, "e1") == after
    finally:
        store.close()


def test_a_restart_with_fewer_kinds_forgets_the_rows_of_the_others(tmp_path):
    path = str(tmp_path / "s.db")
    store = k8svent.Store(path)
    store.outbox.set_endpoints(["e1"])
    a, b = named("a"), named("b")
    poll(store, a)
    deliver_all(store, "e1")
    poll(store, b)  # a deleted, b new
    store.close()
    store = k8svent.Store(path, kinds=("deleted",))
    try:
        store.outbox.set_endpoints(["e1"])
        assert kinds(store, "e1") == {"ns/a": "deleted"}
    finally:
        store.close()


def test_a_schema_4_state_file_gets_kinds_and_times(tmp_path):
    path = str(tmp_path / "s.db")
    store = k8svent.Store(path)
    store.outbox.set_endpoints(["e1"])
    a, b = named("a"), named("b")
    poll(store, a, b)
    deliver_all(store, "e1")
    poll(store, a)  # b deleted
    a2 = newer(a)
    poll(store, a2)
    owed_since = {key: row.owed_since for key, row in owed_rows(store, "e1").items()}
    for column in ("kind", "seen"):
        store._db.execute(f"ALTER TABLE outbox DROP COLUMN {column}")
    store._db.execute("UPDATE meta SET value = 4 WHERE name = 'schema'")
    store.close()
    store = k8svent.Store(path)
    try:
        rows = owed_rows(store, "e1")
        assert {key: row.kind for key, row in rows.items()} == {
            "ns/a": "changed",
            "ns/b": "deleted",
        }
        assert {key: row.seen for key, row in rows.items()} == owed_since
    finally:
        store.close()


def test_recreated_pod_is_new(store):
    a = named("a")
    poll(store, a)
    poll(store)
    assert poll(store, a)["new"] == 1


def test_forgotten_endpoints_leave_the_state(store):
    poll(store, named("a"))
    deliver_all(store, "e1")
    store.outbox.set_endpoints(["e2"])
    store.snapshot.prune()
    store.outbox.set_endpoints(["e1", "e2"])
    assert owed(store, "e1") == ["ns/a"]  # e1 has no records left: owed all again


def bodies(store):
    with store.locked() as db:
        return {k for (k,) in db.execute("SELECT key FROM bodies")}


def test_a_body_is_kept_while_owed_or_under_duress_then_dropped(store):
    a, sick = named("a"), named("sick", phase="Pending")
    a["metadata"]["uid"] = "uid-a"
    poll(store, a, sick)
    deliver_all(store, "e1")
    assert bodies(store) == {"ns/a", "ns/sick"}  # e2 is owed both
    deliver_all(store, "e2")
    assert bodies(store) == {"ns/sick"}  # re-sent every interval
    assert store.snapshot.count() == 2  # the snapshot keeps both
    # a deletion found by a list, its body gone: who it was, Deleted
    poll(store, sick)
    (row,) = [r for r in owed_rows(store, "e1").values() if r.key == "ns/a"]
    assert json.loads(row.body) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "ns", "uid": "uid-a"},
        "status": {"phase": "Deleted"},
    }


def test_a_failed_list_of_new_pods_owes_nothing_and_leaves_no_body(store):
    store.snapshot.begin_poll()
    store.snapshot.apply_page(entries(named("a")))  # the list fails before finish_poll
    store.snapshot.begin_poll()
    store.snapshot.prune()
    assert owed(store, "e1") == [] and store.snapshot.count() == 0 and bodies(store) == set()


def test_poll_mode_keeps_every_body_for_the_deletions_it_finds():
    store = k8svent.Store(keep_bodies=True)
    store.outbox.set_endpoints(["e1"])
    poll(store, named("a"))
    deliver_all(store, "e1")
    assert bodies(store) == {"ns/a"}
    poll(store)
    (row,) = owed_rows(store, "e1").values()
    deleted = json.loads(row.body)
    assert deleted["status"]["phase"] == "Deleted" and deleted["spec"] == {}
    store.close()


def test_a_new_webhook_gets_the_bodies_back_from_the_next_list(store):
    a = named("a")
    poll(store, a)
    deliver_all(store, "e1")
    deliver_all(store, "e2")
    assert bodies(store) == set()
    store.outbox.set_endpoints(["e1", "e2", "e3"])
    assert owed(store, "e3") == [] and store.outbox.next_due("e3") is None  # no body yet
    assert poll(store, a) == {"new": 0, "changed": 0, "unhealthy": 0, "deleted": 0}
    assert owed(store, "e3") == ["ns/a"] and owed(store, "e1") == []


def test_an_older_state_file_is_vacuumed_once_to_hand_free_pages_back(tmp_path):
    import sqlite3

    path = tmp_path / "state.db"
    store = k8svent.Store(str(path))
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA auto_vacuum=NONE")
    db.execute("VACUUM")  # as an older k8svent left it
    assert db.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    db.close()
    store = k8svent.Store(str(path))
    with store.locked() as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental
        assert db.execute("PRAGMA journal_size_limit").fetchone() == (4 << 20,)
    store.close()


def test_corrupt_state_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    s = k8svent.Store(str(path))
    s.close()
    aside = list(tmp_path.glob("state.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "unreadable" in caplog.text and "starting fresh" in caplog.text


def test_temporary_state_is_removed():
    s = k8svent.Store()
    path = s.path
    s.close()
    import os

    assert not os.path.exists(path)


def test_state_path_errors_are_one_line_and_touch_nothing(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    argv = ["--url=http://127.0.0.1:9/", "--once", "--upgrade=never", "--kubectl=/nonexistent"]
    assert k8svent.main([*argv, f"--state={folder}"], {}) == 2
    assert folder.is_dir() and not list(tmp_path.glob("*.corrupt-*"))
    assert k8svent.main([*argv, f"--state={tmp_path}/missing/s.db"], {}) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"k8svent: error: state file {str(folder)!r} is a directory",
        f"k8svent: error: the folder of state file "
        f"{str(tmp_path / 'missing/s.db')!r} does not exist",
    ]


def test_two_stores_never_share_a_file(tmp_path):
    path = str(tmp_path / "s.db")
    first = k8svent.Store(path)
    with pytest.raises(k8svent.StateError, match="in use by another k8svent"):
        k8svent.Store(path)
    first.close()
    k8svent.Store(path).close()  # free again once the first is closed


def test_a_locked_database_is_not_taken_for_corruption(tmp_path):
    import sqlite3

    path = str(tmp_path / "s.db")
    k8svent.Store(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(k8svent.StateError, match="cannot open state file"):
            k8svent.Store(path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_another_scope_starts_a_fresh_snapshot(tmp_path, caplog):
    path = str(tmp_path / "s.db")
    settings = k8svent.Settings()
    s = k8svent.Store(path, scope=k8svent.state_scope(settings, "https://a:6443"))
    s.outbox.set_endpoints(["e1"])
    poll(s, named("a"))
    s.close()
    s = k8svent.Store(path, scope=k8svent.state_scope(settings, "https://b:6443"))
    s.outbox.set_endpoints(["e1"])
    assert poll(s) == {"new": 0, "changed": 0, "unhealthy": 0, "deleted": 0}
    assert "starting a fresh snapshot" in caplog.text
    s.close()


def test_a_failed_poll_changes_nothing(store):
    a = named("a")
    poll(store, a)
    deliver_all(store, "e1")
    a2 = copy.deepcopy(a)
    a2["metadata"]["resourceVersion"] = "2"
    store.snapshot.begin_poll()
    store.snapshot.apply_page(entries(a2))  # then the listing fails
    assert owed(store, "e1") == []  # nothing owed from a failed poll
    assert poll(store, a2)["changed"] == 1  # the next poll sees the change
    assert owed(store, "e1") == ["ns/a"]


# --- Lanes: one delivery per pod name at a time, in the order of its changes ---


def recreated(pod, uid):
    again = copy.deepcopy(pod)
    again["metadata"]["uid"] = uid
    return again


def phase_and_uid(row):
    pod = json.loads(row.body)
    return pod["status"]["phase"], pod["metadata"]["uid"]


def drain_lane(store, endpoint, in_flight):
    """Deliver a lane one row at a time, the first one already claimed; what was sent."""
    sent = []
    row = in_flight
    while row is not None:
        assert store.outbox.claim(endpoint, float("inf"), [row.lane]) == []  # the lane is busy
        sent.append(phase_and_uid(row))
        store.outbox.settle(endpoint, [(row.key, row.msg_id)])
        claimed = store.outbox.claim(endpoint, float("inf"), [], limit=10)
        assert len(claimed) <= 1  # one lane, one row at a time
        row = claimed[0] if claimed else None
    return sent


def watch(store, *events):
    for kind, pod in events:
        if kind == "DELETED":
            store.snapshot.apply_deletion(k8svent.pod_entry(pod))
        else:
            store.snapshot.apply_event(k8svent.pod_entry(pod))


@pytest.mark.parametrize("how", ["poll", "poll, seen deleted first", "watch"])
def test_a_lane_sends_the_old_state_then_its_deletion_then_the_new_pod(store, how):
    a = named("db-0")
    a["metadata"]["uid"] = "uid-a"
    b = recreated(a, "uid-b")
    poll(store, a)
    (in_flight,) = store.outbox.claim("e1", float("inf"), [], limit=10)  # a slow receiver has it
    assert in_flight.lane == "ns/db-0"
    if how == "poll":
        poll(store, b)  # one write: no poll saw the name free
    elif how == "poll, seen deleted first":
        poll(store)
        poll(store, b)
    else:
        watch(store, ("DELETED", a), ("ADDED", b))
    assert drain_lane(store, "e1", in_flight) == [
        ("Running", "uid-a"),
        ("Deleted", "uid-a"),
        ("Running", "uid-b"),
    ]
    # e2 had nothing in flight: the deletion first, then the new pod
    assert drain_lane(store, "e2", store.outbox.claim("e2", float("inf"))[0]) == [
        ("Deleted", "uid-a"),
        ("Running", "uid-b"),
    ]


def test_a_lane_coalesces_to_its_newest_state_and_each_earlier_deletion(store):
    a = named("db-0")
    a["metadata"]["uid"] = "uid-a"
    a2 = copy.deepcopy(a)
    a2["metadata"]["resourceVersion"] = "2"
    b = recreated(a, "uid-b")
    b2 = copy.deepcopy(b)
    b2["metadata"]["resourceVersion"] = "3"
    c = recreated(a, "uid-c")
    poll(store, a)
    poll(store, a2)  # a's rows now owe a2
    poll(store, b)
    poll(store, b2)
    poll(store, c)
    assert drain_lane(store, "e1", store.outbox.claim("e1", float("inf"))[0]) == [
        ("Deleted", "uid-a"),
        ("Deleted", "uid-b"),
        ("Running", "uid-c"),
    ]


def test_a_deletion_of_an_earlier_pod_told_late_by_the_watch_is_not_sent_after_the_new_pod(
    store,
):
    a = named("db-0")
    a["metadata"]["uid"] = "uid-a"
    b = recreated(a, "uid-b")
    poll(store, a)
    poll(store, b)
    deliver_all(store, "e1")  # the deletion of a
    deliver_all(store, "e1")  # and b
    watch(store, ("DELETED", a))
    assert owed(store, "e1") == []


def test_claims_take_one_row_per_lane_and_skip_busy_lanes(store):
    poll(store, *(named(f"p{i}") for i in range(5)))
    claimed = store.outbox.claim("e1", float("inf"), ["ns/p1", "ns/p3"], limit=10)
    assert [row.lane for row in claimed] == ["ns/p0", "ns/p2", "ns/p4"]
    assert store.outbox.next_due("e1", ["ns/p0", "ns/p1", "ns/p2", "ns/p3", "ns/p4"]) is None
    assert store.outbox.next_due("e1", ["ns/p0"]) is not None


def test_a_take_claims_what_is_due_and_says_when_the_next_is(store):
    poll(store, *(named(f"p{i}") for i in range(3)))
    owed_at = store.outbox.next_due("e1")
    claimed, later = store.outbox.take("e1", owed_at, ["ns/p1"], limit=1)
    assert [row.lane for row in claimed] == ["ns/p0"]
    (first,) = store.outbox.claim("e1", owed_at, ["ns/p1"])
    assert first == claimed[0]  # the same row as a claim's, body and all
    (row,) = store.outbox.claim("e1", owed_at, ["ns/p0", "ns/p1"])
    store.outbox.retry_at("e1", "ns/p2", row.msg_id, 1, owed_at + 30)  # p2 backs off
    assert store.outbox.take("e1", owed_at + 1, ["ns/p0", "ns/p1"], limit=8) == ([], owed_at + 30)
    claimed, later = store.outbox.take("e1", owed_at + 31, ["ns/p0", "ns/p1"], limit=8)
    assert [row.lane for row in claimed] == ["ns/p2"]
    assert store.outbox.take("e1", owed_at, ["ns/p0", "ns/p1", "ns/p2"]) == ([], None)


def _plan(store, sql, *args):
    return " ".join(row[-1] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql, args))


def test_the_claim_walks_an_index_of_lane_heads_without_sorting(store, mocker):
    queries = []
    execute = store._db.execute
    db = mocker.Mock(wraps=store._db)
    db.execute.side_effect = lambda sql, *a: (queries.append(sql), execute(sql, *a))[1]
    store._db = db
    store.outbox.claim("e1", 1.0, ["ns/a"], limit=4, untried_first=True)
    store.outbox.next_due("e1", ["ns/a"])
    store.outbox.take("e1", 1.0, ["ns/a"], limit=4)
    store._db = db._mock_wraps
    assert len(queries) == 4
    for sql in queries:
        plan = _plan(store, sql, *(["e1", 1.0, "ns/a", 4] if "LIMIT ?" in sql else ["e1", "ns/a"]))
        assert "outbox_heads" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


def test_what_the_last_settles_dropped_is_handed_back_by_the_housekeeping(tmp_path):
    # A settle that drains the outbox reclaims at most once a second: one
    # right after another reclaim leaves the last bodies' pages in the file.
    path = str(tmp_path / "s.db")
    store = k8svent.Store(path)
    store.outbox.set_endpoints(["e1"])
    many = k8svent._RECLAIM_AFTER_BODIES
    store.snapshot.begin_poll()
    store.snapshot.apply_page(entries(*(named(f"p{i}") for i in range(many + 500))))
    store.snapshot.finish_poll()
    done = [(key, row.msg_id) for key, row in owed_rows(store, "e1").items()]
    store.outbox.settle("e1", done[:many])  # reclaimed: that many dropped
    store.outbox.settle("e1", done[many:])  # drained, within the second
    assert store._dropped == 500 and os.path.getsize(path + "-wal") > 0
    store._reclaimed -= k8svent._RECLAIM_SECONDS  # the clock, a second on
    store.outbox.reclaim_drained()
    assert store._dropped == 0 and os.path.getsize(path + "-wal") == 0
    store.close()


def test_a_schema_5_state_file_is_taken_in_place_with_its_zlib_bodies(tmp_path):
    path = str(tmp_path / "s.db")
    store = k8svent.Store(path)
    store.outbox.set_endpoints(["e1"])
    a = named("a")
    poll(store, a)
    with store.transaction() as db:
        (body,) = db.execute("SELECT body FROM bodies WHERE key = 'ns/a'").fetchone()
        pod_bytes = k8svent._inflate(body)
        db.execute("UPDATE bodies SET body = ?", (zlib.compress(pod_bytes, 1),))
        db.execute("UPDATE meta SET value = 5 WHERE name = 'schema'")
    store.close()
    store = k8svent.Store(path)
    assert store._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (6,)
    assert json.loads(owed_rows(store, "e1")["ns/a"].body) == a
    store.close()


@pytest.mark.parametrize(
    "older",
    [
        pytest.param(lambda pod_bytes: pod_bytes, id="json"),
        pytest.param(lambda pod_bytes: zlib.compress(pod_bytes, 1), id="zlib"),
    ],
)
def test_bodies_an_older_k8svent_left_are_read_as_they_are(store, older):
    # Before bodies were compressed (state schema 3, early 4) they were JSON,
    # then zlib until zstd: a self-upgrade finds them owed, and must send them.
    a, b = named("a"), named("b")
    poll(store, a, b)
    with store.transaction() as db:
        for key, body in db.execute("SELECT key, body FROM bodies").fetchall():
            assert body.startswith(k8svent._ZSTD_MAGIC)
            db.execute(
                "UPDATE bodies SET body = ? WHERE key = ?", (older(k8svent._inflate(body)), key)
            )
    assert store.outbox.owed_versions("e1", 10) == ["1", "1"]
    assert {key: json.loads(row.body) for key, row in owed_rows(store, "e1").items()} == {
        "ns/a": a,
        "ns/b": b,
    }
    assert poll(store, a)["deleted"] == 1  # b's last state, from its JSON body
    assert json.loads(owed_rows(store, "e2")["ns/b"].body)["status"]["phase"] == "Deleted"


def test_a_claim_at_150k_owed_rows_takes_milliseconds(tmp_path):
    store = k8svent.Store(str(tmp_path / "s.db"))
    body = k8svent._deflate(json.dumps(named("p")).encode())
    with store.transaction() as db:
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 149999)"
            " INSERT INTO pods SELECT 'ns/p' || i, randomblob(8), 0, 0, 'uid-' || i, i FROM n"
        )
        db.execute("INSERT INTO bodies SELECT key, ? FROM pods", (body,))
    store.outbox.set_endpoints(["e1"])  # a new webhook is owed every pod
    now = time.time() + 1
    # A down webhook: most rows tried and backing off, the probe's claim.
    store._db.execute("UPDATE outbox SET attempts = 3, due = due + 0.5 WHERE seq % 3 != 0")
    busy = [f"ns/p{i}" for i in range(0, 60, 3)]
    started = time.perf_counter()
    for _ in range(20):
        assert store.outbox.claim("e1", now, busy, limit=1, untried_first=True)
        assert store.outbox.claim("e1", now, busy, limit=8)
        assert store.outbox.next_due("e1", busy) is not None
    per_claim = (time.perf_counter() - started) / 20
    store.close()
    assert per_claim < 0.005, f"{per_claim * 1000:.1f} ms"


def test_a_schema_3_outbox_gets_its_lanes_in_place(tmp_path):
    path = str(tmp_path / "s.db")
    store = k8svent.Store(path)
    store.outbox.set_endpoints(["e1"])
    a = named("db-0")
    a["metadata"]["uid"] = "uid-a"
    poll(store, a, named("web"))
    poll(store, recreated(a, "uid-b"), named("web"))
    store.close()
    # The outbox as schema 3 wrote it: no lanes; KEY#UID rows sent before KEY.
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        """
        CREATE TABLE outbox_3 (endpoint TEXT NOT NULL, key TEXT NOT NULL,
            msg_id TEXT NOT NULL, fp BLOB NOT NULL, attempts INTEGER NOT NULL,
            due REAL NOT NULL, owed_since REAL NOT NULL, expired INTEGER NOT NULL,
            PRIMARY KEY (endpoint, key));
        INSERT INTO outbox_3 SELECT endpoint, key, msg_id, fp, attempts, due, owed_since,
            expired FROM outbox ORDER BY key DESC;
        DROP TABLE outbox;
        ALTER TABLE outbox_3 RENAME TO outbox;
        CREATE INDEX outbox_due ON outbox (endpoint, due);
        CREATE INDEX outbox_age ON outbox (endpoint, expired, owed_since);
        UPDATE meta SET value = 3 WHERE name = 'schema';
        """
    )
    db.close()
    store = k8svent.Store(path)
    assert store._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (
        k8svent._SCHEMA_VERSION,
    )
    assert owed(store, "e1") == ["ns/db-0#uid-a", "ns/web"]
    store.outbox.settle("e1", [("ns/web", owed_rows(store, "e1")["ns/web"].msg_id)])
    assert drain_lane(store, "e1", owed_rows(store, "e1")["ns/db-0#uid-a"]) == [
        ("Deleted", "uid-a"),
        ("Running", "uid-b"),
    ]
    store.close()


def test_a_state_file_of_a_newer_k8svent_is_refused_and_kept(tmp_path, capsys):
    path = tmp_path / "s.db"
    k8svent.Store(str(path)).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE meta SET value = 9 WHERE name = 'schema'")
    db.close()
    before = path.read_bytes()
    argv = ["--url=http://127.0.0.1:9/", "--once", "--upgrade=never", "--kubectl=/nonexistent"]
    assert k8svent.main([*argv, f"--state={path}"], {}) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"k8svent: error: state file {str(path)!r} has schema version 9, from a newer "
        f"k8svent; this one knows versions up to {k8svent._SCHEMA_VERSION}"
    ]
    assert path.read_bytes() == before and not list(tmp_path.glob("*.corrupt-*"))


def test_a_failed_begin_does_not_leak_the_lock(store, mocker):
    import sqlite3

    db = store._db
    store._db = mocker.Mock(wraps=db)
    store._db.execute.side_effect = sqlite3.OperationalError("database is locked")
    with pytest.raises(sqlite3.OperationalError):
        store.snapshot.begin_poll()
    store._db = db
    import threading

    free = []

    def other_thread():
        got = store._lock.acquire(timeout=1)
        free.append(got)
        if got:
            store._lock.release()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert free == [True]


# A scope other than the file's starts a fresh snapshot: the API server that
# kubectl talks to (whatever context names it), the namespace and the selection.
@pytest.mark.parametrize(
    "fields, scope",
    [
        ({}, "https://a:6443|"),
        ({"namespace": "shop"}, "https://a:6443|shop"),
        ({"context": "prod"}, "https://a:6443|"),
        ({"selector": "app=web"}, "https://a:6443|?labelSelector=app=web"),
        (
            {"exclude_namespaces": ("a", "b")},
            "https://a:6443|?fieldSelector=metadata.namespace!=a,metadata.namespace!=b",
        ),
        (
            {"context": "c", "selector": "!canary", "exclude_namespaces": ("a",)},
            "https://a:6443|?labelSelector=!canary&fieldSelector=metadata.namespace!=a",
        ),
    ],
)
def test_state_scope(fields, scope):
    assert k8svent.state_scope(k8svent.Settings(**fields), "https://a:6443") == scope


@pytest.mark.parametrize(
    "fields, token, query",
    [
        ({}, None, "limit=500"),
        ({"chunk_size": 2}, "abc=", "limit=2&continue=abc%3D"),
        (
            {"selector": "env in (a,b)", "exclude_namespaces": ("x", "y")},
            None,
            "limit=500&labelSelector=env%20in%20%28a%2Cb%29"
            "&fieldSelector=metadata.namespace%21%3Dx%2Cmetadata.namespace%21%3Dy",
        ),
    ],
)
def test_list_query(fields, token, query):
    settings = k8svent.Settings(**{"chunk_size": 500, **fields})
    assert (
        k8svent.pods_url(settings, limit=settings.chunk_size, continue_=token)
        == "/api/v1/pods?" + query
    )


@pytest.mark.parametrize("secret", ["s3cr3t", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
def test_documented_verifiers_accept_what_sign_makes(secret):
    text = (Path(__file__).resolve().parent.parent / "docs" / "receiving.md").read_text()
    section = text.split("\n## Signatures\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    namespace = {}
    for block in blocks:
        exec(block, namespace)  # noqa: S102 - our own docs
    body = b'{"pod":{"metadata":{"name":"p"}}}'
    headers = k8svent.sign(body, secret, k8svent.new_message_id(), int(time.time()))
    assert namespace["verified_sha1"](body, headers, secret)
    assert namespace["verified_sha256"](body, headers, secret)
    assert namespace["verified_pod"](body, headers, secret) == json.loads(body)
    assert not namespace["verified_sha256"](body + b" ", headers, secret)


# --- Reading a webhook's answer --------------------------------------------------


@pytest.mark.parametrize(
    "raw, status, body, reusable",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 200, b"", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
        (
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n",
            503,
            b"abcde",
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
        (b"HTTP/1.1 200 OK\r\n\r\nto the end", 200, b"to the e", False),  # cut at 8
        # longer than the limit (8 bytes here): cut, and the connection not kept
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n0123456789ab", 200, b"01234567", False),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n0123456789ab\r\n0\r\n\r\n",
            200,
            b"",
            False,
        ),
    ],
)
def test_read_answer(raw, status, body, reusable):
    import io

    got = k8svent.read_answer(io.BufferedReader(io.BytesIO(raw)), 8)
    assert (got[0], got[2], got[3]) == (status, body, reusable)


def test_read_answer_headers_by_any_case():
    import io

    raw = b"HTTP/1.1 429 Slow\r\nRetry-After: 7\r\nContent-Type: a/json\r\n\r\n"
    _, headers, _, _ = k8svent.read_answer(io.BufferedReader(io.BytesIO(raw)), 8)
    assert headers.get("retry-after") == headers.get("Retry-After") == "7"
    assert headers.get("Content-TYPE") == "a/json"


@pytest.mark.parametrize(
    "raw, error",
    [
        (b"", "RemoteDisconnected"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "BadStatusLine"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "IncompleteRead"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "HTTPException"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "HTTPException"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "HTTPException"),
    ],
)
def test_read_answer_failures_are_http_errors(raw, error):
    import http.client
    import io

    with pytest.raises(http.client.HTTPException) as caught:
        k8svent.read_answer(io.BufferedReader(io.BytesIO(raw)), 8)
    assert type(caught.value).__name__ == error


def _a_failure_is_logged_once_and_the_workers_live_on(caplog, store, failure, mend, error):
    """Start a stdout Sender on `store`, whose outbox fails to be read; wait until
    the log says `failure`; `mend()` the store: one delivery, one ERROR line
    saying `error`, and every worker alive."""
    import threading

    stop = threading.Event()
    sender = k8svent.Sender(k8svent.StdoutEndpoint(), store, k8svent.Settings(workers=2), stop)
    # Whether or not main() made it stop propagating: a record may then reach
    # caplog twice (this handler and the root's), so records are counted once.
    k8svent.log.addHandler(caplog.handler)
    sender.start()
    try:
        deadline = time.monotonic() + 10
        while failure not in caplog.text:
            assert time.monotonic() < deadline, f"never logged: {failure}"
            time.sleep(0.05)
        mend()
        sender.wake()
        assert sender.wait_idle(10) and sender.succeeded == 1
        errors = list({id(r): r for r in caplog.records if r.levelname == "ERROR"}.values())
        assert len(errors) == 1 and error in errors[0].message
        assert all(thread.is_alive() for thread in sender._threads)
    finally:
        k8svent.log.removeHandler(caplog.handler)
        stop.set()
        sender.wake()
        sender.join(5)
        store.close()


def test_a_failing_store_is_logged_once_and_the_workers_live_on(caplog):
    store = k8svent.Store()
    store.outbox.set_endpoints(["stdout"])
    store._db.execute("ALTER TABLE outbox RENAME TO outbox_away")  # every query fails

    def mend():
        store._db.execute("ALTER TABLE outbox_away RENAME TO outbox")  # works again
        poll(store, named("a"))

    _a_failure_is_logged_once_and_the_workers_live_on(
        caplog, store, "no such table", mend, "cannot read the outbox for stdout"
    )


def test_a_take_that_crashes_is_logged_once_and_the_workers_live_on(caplog):
    store = k8svent.Store()
    store.outbox.set_endpoints(["stdout"])
    poll(store, named("a"))
    with store.transaction() as db:  # neither JSON, zstd nor zlib: reading it raises
        db.execute("UPDATE bodies SET body = ? WHERE key = 'ns/a'", (b"\x00garbage",))
    _a_failure_is_logged_once_and_the_workers_live_on(
        caplog,
        store,
        "crashed",
        lambda: poll(store, named("a", phase="Pending")),  # a new state, readable
        "taking a delivery for stdout crashed",
    )


class _FlakyEndpoint:
    """An endpoint that answers 503 to each pod's first POST, then 200; records them."""

    id = "flaky"
    label = "flaky"

    def __init__(self, step):
        self.posts = []
        self._step = step

    def post(self, body, message_id=None, headers=None):
        self._step[0] = 0.0
        self.posts.append(json.loads(body)["pod"]["metadata"]["name"])
        status = 503 if self.posts.count(self.posts[-1]) == 1 else 200
        return k8svent.Response(status, {}, b"")

    def close(self):
        pass


@pytest.mark.parametrize("step_seconds", [3600, -3600])
def test_a_wall_clock_stepped_by_an_hour_neither_stalls_nor_floods_deliveries(mocker, step_seconds):
    import threading

    real_time = time.time
    step = [0.0]
    mocker.patch("time.time", side_effect=lambda: real_time() + step[0])
    store = k8svent.Store()
    store.outbox.set_endpoints(["flaky"])
    step[0] = step_seconds
    poll(store, *(named(f"p{i}") for i in range(5)))  # owed an hour off
    endpoint = _FlakyEndpoint(step)  # and the clock steps back at the first POST
    stop = threading.Event()
    sender = k8svent.Sender(endpoint, store, k8svent.Settings(workers=2), stop)
    sender.start()
    try:
        assert sender.wait_idle(15), endpoint.posts  # retried after ~0.5 s, not an hour
        assert sender.succeeded == 5
        assert sorted(endpoint.posts) == sorted([f"p{i}" for i in range(5)] * 2)  # no flood
    finally:
        stop.set()
        sender.wake()
        sender.join(5)
        store.close()
