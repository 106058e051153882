"""The fake API server, checked with the real kubectl (and plain HTTP where kubectl cannot).

What ``kubectl get pod NAME -n NS -o json`` prints, relative to the object the
API server holds (the contract k8svent's payloads reproduce), found with
kubectl 1.37.1 and pinned by ``test_get_pod_prints_the_stored_object``:

- the same object (every value, every list in the same order), with
  ``metadata.managedFields`` removed (unless ``--show-managed-fields``);
- ``apiVersion: v1`` and ``kind: Pod`` present;
- keys sorted alphabetically at every level (the server sends Go struct
  order), indented by 4 spaces, with a final newline: exactly
  ``json.dumps(pod, indent=4, sort_keys=True, ensure_ascii=False) + "\\n"``,
  except that Go escapes ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u003c``
  and so on; other non-ASCII text is printed as UTF-8.

``kubectl get pods -A -o json`` prints ``{"apiVersion": "v1", "items": [...],
"kind": "List", "metadata": {"resourceVersion": ""}}`` in the same format, each
item given ``apiVersion``/``kind`` and stripped of managedFields, in the
server's order; it asks for pages of 500 (``--chunk-size``).

On failure kubectl exits 1 but still prints a valid List on stdout: an empty
one when the first request fails (error status, truncated body, timeout),
and the pods of the pages before the failure when a later page fails. So only
the exit status tells a failed poll from an empty or shrunken cluster.

``kubectl get --raw`` of a watch path (``?watch=1&...``; kubectl sends the
query's parameters sorted by name) prints each event line as it arrives,
while the stream is still open. A stream the server ends (``timeoutSeconds``,
or after an ``ERROR`` event) exits 0; a dropped one exits 1 with ``error:
unexpected EOF`` after the events that came whole; an HTTP error prints
``Error from server (REASON): MESSAGE`` and nothing on stdout.
"""

import http.client
import json
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from test import kubeapi as kubeapi_module
from test.kubeapi import EXPIRED_MESSAGE
from test.pods import generate, make_pod

EMPTY_LIST_OUTPUT = (
    '{\n    "apiVersion": "v1",\n    "items": [],\n    "kind": "List",\n'
    '    "metadata": {\n        "resourceVersion": ""\n    }\n}\n'
)


def kubectl(kubectl_path, *args, timeout=30):
    """Run the real kubectl; return the completed process."""
    return subprocess.run(
        [kubectl_path, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def fetch(kubeapi, path):
    """GET a path from the fake server: (status, parsed JSON body)."""
    try:
        with urllib.request.urlopen(kubeapi.url + path, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def without_managed_fields(pod):
    pod = dict(pod, metadata=dict(pod["metadata"]))
    del pod["metadata"]["managedFields"]
    return pod


@pytest.fixture
def five_pods(kubeapi):
    pods = list(generate(5))
    kubeapi.set_pods(pods)
    return sorted(kubeapi.pod_keys())


# -- kubectl ------------------------------------------------------------------


def test_get_pods_all_namespaces(kubeapi, kubeconfig, kubectl_path, five_pods):
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["kind"] == "List"
    keys = [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in listed["items"]]
    assert keys == kubeapi.pod_keys() == five_pods
    for item in listed["items"]:
        stored = kubeapi.get_pod(item["metadata"]["namespace"], item["metadata"]["name"])
        assert item == without_managed_fields(stored)
    assert ("GET", "/api/v1/pods?limit=500") in kubeapi.requests


def test_get_pods_in_one_namespace(kubeapi, kubeconfig, kubectl_path, five_pods):
    result = kubectl(kubectl_path, "get", "pods", "-n", "kube-system", "-o", "json")
    assert result.returncode == 0, result.stderr
    names = [p["metadata"]["name"] for p in json.loads(result.stdout)["items"]]
    assert names == [k.split("/")[1] for k in five_pods if k.startswith("kube-system/")]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"healthy": False},
        {"init_container": True},
        {"phase": "Succeeded"},
        {"phase": "Pending"},
    ],
)
def test_get_pod_prints_the_stored_object(kubeapi, kubeconfig, kubectl_path, options):
    kubeapi.put_pod(make_pod("shop", "web-7c79c4bf97-x2kq9", **options))
    result = kubectl(kubectl_path, "get", "pod", "web-7c79c4bf97-x2kq9", "-n", "shop", "-o", "json")
    assert result.returncode == 0, result.stderr
    expected = without_managed_fields(kubeapi.get_pod("shop", "web-7c79c4bf97-x2kq9"))
    assert (
        result.stdout == json.dumps(expected, indent=4, sort_keys=True, ensure_ascii=False) + "\n"
    )


def test_get_pod_escapes_like_go(kubeapi, kubeconfig, kubectl_path):
    pod = make_pod("shop", "web-7c79c4bf97-x2kq9")
    pod["metadata"]["annotations"]["note"] = "a<b>&c é \u2028 😀"
    kubeapi.put_pod(pod)
    result = kubectl(kubectl_path, "get", "pod", "web-7c79c4bf97-x2kq9", "-n", "shop", "-o", "json")
    assert '"note": "a\\u003cb\\u003e\\u0026c é \\u2028 😀",' in result.stdout
    assert json.loads(result.stdout)["metadata"]["annotations"]["note"] == "a<b>&c é \u2028 😀"


@pytest.mark.parametrize(
    "namespace, message",
    [
        ("default", 'pods "nope" not found'),
        ("nowhere", 'namespaces "nowhere" not found'),  # kubectl then asks for the namespace
    ],
)
def test_get_missing_pod(kubeapi, kubeconfig, kubectl_path, namespace, message):
    result = kubectl(kubectl_path, "get", "pod", "nope", "-n", namespace, "-o", "json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Error from server (NotFound): {message}\n"


def test_listing_an_unknown_namespace_is_empty(kubeapi, kubeconfig, kubectl_path, five_pods):
    result = kubectl(kubectl_path, "get", "pods", "-n", "nowhere", "-o", "json")
    assert (result.returncode, result.stdout, result.stderr) == (0, EMPTY_LIST_OUTPUT, "")


def test_raw_paging_follows_continue(kubeapi, kubeconfig, kubectl_path, five_pods):
    seen, path = [], "/api/v1/pods?limit=2"
    while True:
        result = kubectl(kubectl_path, "get", "--raw", path)
        assert result.returncode == 0, result.stderr
        page = json.loads(result.stdout)
        assert page["kind"] == "PodList" and page["apiVersion"] == "v1"
        for item in page["items"]:
            assert "apiVersion" not in item and "kind" not in item
            assert item["metadata"]["managedFields"]
            seen.append(f"{item['metadata']['namespace']}/{item['metadata']['name']}")
        token = page["metadata"].get("continue")
        if not token:
            assert "remainingItemCount" not in page["metadata"]
            break
        assert page["metadata"]["remainingItemCount"] == 5 - len(seen)
        path = "/api/v1/pods?limit=2&continue=" + urllib.parse.quote(token)
    assert seen == five_pods


def test_error_on_a_later_page_prints_the_earlier_pages(
    kubeapi, kubeconfig, kubectl_path, five_pods
):
    kubeapi.fail(500, page=1)
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json", "--chunk-size=2")
    assert result.returncode == 1
    assert (
        result.stderr
        == "Error from server (InternalError): Internal error occurred: injected failure\n"
    )
    partial = json.loads(result.stdout)
    assert [p["metadata"]["name"] for p in partial["items"]] == [
        k.split("/")[1] for k in five_pods[:2]
    ]


def test_error_on_the_first_page_prints_an_empty_list(kubeapi, kubeconfig, kubectl_path, five_pods):
    kubeapi.fail(403)
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json")
    assert result.returncode == 1
    assert result.stdout == EMPTY_LIST_OUTPUT
    assert result.stderr == "Error from server (Forbidden): injected failure (403)\n"


def test_retry_after_makes_kubectl_retry(kubeapi, kubeconfig, kubectl_path, five_pods):
    kubeapi.fail(503, retry_after=1)
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["items"]) == 5


def test_truncated_body(kubeapi, kubeconfig, kubectl_path, five_pods):
    kubeapi.truncate()
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json")
    assert result.returncode == 1
    assert result.stdout == EMPTY_LIST_OUTPUT
    assert (
        "unexpected error when reading response body. Please retry. Original error: unexpected EOF"
        in result.stderr
    )


def test_expired_continue(kubeapi, kubeconfig, kubectl_path, five_pods):
    kubeapi.expire_continue()
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json", "--chunk-size=2")
    assert result.returncode == 1
    assert result.stderr == f"Error from server (Expired): {EXPIRED_MESSAGE}\n"
    assert len(json.loads(result.stdout)["items"]) == 2


def test_hang_meets_the_request_timeout(kubeapi, kubeconfig, kubectl_path, five_pods):
    kubeapi.hang(10)
    started = time.monotonic()
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json", "--request-timeout=1s")
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert result.stdout == EMPTY_LIST_OUTPUT
    # The cause varies with timing: "Client.Timeout exceeded while awaiting
    # headers" or "context deadline exceeded".
    assert result.stderr.startswith("Unable to connect to the server: ")


# -- watch, with kubectl ---------------------------------------------------------

LINE_WAIT_SECONDS = 10


class Watch:
    """``kubectl get --raw`` of a watch path, its stdout read line by line as it comes."""

    def __init__(self, kubectl_path, path):
        self.process = subprocess.Popen(
            [kubectl_path, "get", "--raw", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_event(self):
        """The next event kubectl prints (parsed), or None at the end of its output."""
        line = self._lines.get(timeout=LINE_WAIT_SECONDS)
        if line is None:
            return None
        assert line.endswith(b"\n")
        return json.loads(line)

    def rest(self):
        """Every event until kubectl exits; then (events, exit status, stderr)."""
        events = list(iter(self.next_event, None))
        status = self.process.wait(timeout=LINE_WAIT_SECONDS)
        return events, status, self.process.stderr.read().decode()

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def watch(kubeapi, kubeconfig, kubectl_path):
    """Start kubectl watching a path; killed after the test.

    ``opened`` waits until the server holds it open (not for streams that end at once,
    nor while an earlier one is open).
    """
    started = []

    def start(path, opened=True):
        started.append(Watch(kubectl_path, path))
        if opened:
            assert kubeapi.wait_open_watches(len(started))
        return started[-1]

    yield start
    for one in started:
        one.close()


def watch_path(resource_version=None, *, namespace=None, timeout=30, bookmarks=False):
    path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
    query = {"watch": 1}
    if resource_version is not None:
        query["resourceVersion"] = resource_version
    if bookmarks:
        query["allowWatchBookmarks"] = "true"
    query["timeoutSeconds"] = timeout
    return f"{path}?{urllib.parse.urlencode(query)}"


def summary(event):
    """(type, namespace/name, resourceVersion) of an event."""
    meta = event["object"]["metadata"]
    return event["type"], f"{meta.get('namespace')}/{meta.get('name')}", meta["resourceVersion"]


def test_watch_prints_each_event_while_the_stream_is_open(kubeapi, watch):
    pod = make_pod("shop", "web-7c79c4bf97-x2kq9")
    watching = watch(watch_path(kubeapi.resource_version))
    added = kubeapi.put_pod(pod)
    event = watching.next_event()
    # Read while kubectl still runs and the server still holds the stream open.
    assert watching.process.poll() is None and kubeapi.open_watches == 1
    assert summary(event) == ("ADDED", "shop/web-7c79c4bf97-x2kq9", added)
    assert event["object"] == dict(kubeapi.get_pod("shop", "web-7c79c4bf97-x2kq9"))
    assert list(event["object"])[:3] == ["kind", "apiVersion", "metadata"]
    assert event["object"]["metadata"]["managedFields"]
    modified = kubeapi.put_pod(pod)
    assert summary(watching.next_event()) == ("MODIFIED", "shop/web-7c79c4bf97-x2kq9", modified)
    last = kubeapi.get_pod("shop", "web-7c79c4bf97-x2kq9")
    kubeapi.delete_pod("shop", "web-7c79c4bf97-x2kq9")
    event = watching.next_event()
    assert summary(event) == ("DELETED", "shop/web-7c79c4bf97-x2kq9", kubeapi.resource_version)
    assert int(kubeapi.resource_version) > int(modified)
    # The last state, but for the resourceVersion of the deletion.
    assert event["object"] == dict(
        last, metadata=dict(last["metadata"], resourceVersion=kubeapi.resource_version)
    )
    assert watching.process.poll() is None


@pytest.mark.parametrize("typed", [True, False])
def test_watch_replays_from_a_resource_version(kubeapi, watch, typed):
    kubeapi.typed_watch_objects = typed
    first = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    second = kubeapi.put_pod(make_pod("shop", "b-7c79c4bf97-x2kq9"))
    third = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9", healthy=False))
    kubeapi.delete_pod("shop", "b-7c79c4bf97-x2kq9")
    events, status, stderr = watch(watch_path(first, timeout=1)).rest()
    assert (status, stderr) == (0, "")
    assert [summary(e) for e in events] == [
        ("ADDED", "shop/b-7c79c4bf97-x2kq9", second),
        ("MODIFIED", "shop/a-7c79c4bf97-x2kq9", third),
        ("DELETED", "shop/b-7c79c4bf97-x2kq9", kubeapi.resource_version),
    ]
    for event in events:
        assert ("kind" in event["object"]) is typed and ("apiVersion" in event["object"]) is typed
        assert event["object"]["metadata"]["managedFields"]


def test_watch_without_a_resource_version_starts_with_every_pod(kubeapi, watch, five_pods):
    watching = watch(watch_path())
    initial = [watching.next_event() for _ in five_pods]
    assert [summary(e)[:2] for e in initial] == [("ADDED", key) for key in five_pods]
    added = kubeapi.put_pod(make_pod("aaa", "new-7c79c4bf97-x2kq9"))
    assert summary(watching.next_event()) == ("ADDED", "aaa/new-7c79c4bf97-x2kq9", added)


def test_watch_of_one_namespace(kubeapi, watch):
    start = kubeapi.resource_version
    kubeapi.put_pod(make_pod("other", "a-7c79c4bf97-x2kq9"))
    replayed = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    watching = watch(watch_path(start, namespace="shop"))
    assert summary(watching.next_event()) == ("ADDED", "shop/a-7c79c4bf97-x2kq9", replayed)
    kubeapi.put_pod(make_pod("other", "b-7c79c4bf97-x2kq9"))
    live = kubeapi.put_pod(make_pod("shop", "b-7c79c4bf97-x2kq9"))
    assert summary(watching.next_event()) == ("ADDED", "shop/b-7c79c4bf97-x2kq9", live)
    # kubectl sorts the query's parameters by name.
    assert kubeapi.requests == [
        ("GET", f"/api/v1/namespaces/shop/pods?resourceVersion={start}&timeoutSeconds=30&watch=1")
    ]


def test_watch_bookmarks_carry_the_current_resource_version(kubeapi, watch):
    kubeapi.bookmark_seconds = 0.2
    start = kubeapi.resource_version
    watching = watch(watch_path(start, bookmarks=True))
    assert watching.next_event() == {
        "type": "BOOKMARK",
        "object": {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": start, "creationTimestamp": None},
            "spec": {"containers": None},
            "status": {},
        },
    }
    added = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    event = watching.next_event()
    while event["type"] == "BOOKMARK":
        event = watching.next_event()
    assert summary(event) == ("ADDED", "shop/a-7c79c4bf97-x2kq9", added)
    assert summary(watching.next_event()) == ("BOOKMARK", "None/None", added)


def test_watch_without_bookmarks_allowed_gets_none(kubeapi, watch):
    kubeapi.bookmark_seconds = 0.1
    events, status, _ = watch(watch_path(kubeapi.resource_version, timeout=1)).rest()
    assert (events, status) == ([], 0)


def test_watch_timeout_ends_the_stream_normally(kubeapi, watch):
    started = time.monotonic()
    events, status, stderr = watch(watch_path(kubeapi.resource_version, timeout=1)).rest()
    assert (events, status, stderr) == ([], 0, "")
    assert 1 <= time.monotonic() - started < 5
    assert kubeapi.wait_open_watches(0)


def test_watch_from_a_compacted_resource_version_gets_410(kubeapi, watch):
    kubeapi.set_watch_history(2)
    start = kubeapi.resource_version
    first = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))  # the event at `first` goes
    events, status, stderr = watch(watch_path(start), opened=False).rest()
    assert (status, stderr) == (0, "")
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {start} ({first})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    events, status, _ = watch(watch_path(first, timeout=1), opened=False).rest()
    assert ([e["type"] for e in events], status) == (["MODIFIED", "MODIFIED"], 0)


def test_loading_items_expires_open_watches(kubeapi, watch):
    watching = watch(watch_path(kubeapi.resource_version))
    kubeapi.load_items(generate_items_for_test(3))
    events, status, _ = watching.rest()
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
    assert status == 0


def test_expire_watch_sends_an_error_event(kubeapi, watch):
    kubeapi.expire_watch()
    events, status, _ = watch(watch_path(kubeapi.resource_version), opened=False).rest()
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [
        ("ERROR", 410, "Expired")
    ]
    assert status == 0


@pytest.mark.parametrize("reason", ["Expired", "Gone"])
def test_expire_watch_with_http_410(kubeapi, watch, reason):
    start = kubeapi.resource_version
    kubeapi.expire_watch(http=True, reason=reason)
    events, status, stderr = watch(watch_path(start), opened=False).rest()
    assert (events, status) == ([], 1)
    assert stderr == f"Error from server ({reason}): too old resource version: {start} ({start})\n"


def test_cut_watches_drops_the_stream(kubeapi, watch):
    watching = watch(watch_path(kubeapi.resource_version))
    added = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    assert summary(watching.next_event())[2] == added
    assert kubeapi.cut_watches() == 1
    events, status, stderr = watching.rest()
    assert (events, status, stderr) == ([], 1, "error: unexpected EOF\n")
    assert kubeapi.wait_open_watches(0)


def test_failures_apply_to_watches(kubeapi, watch):
    kubeapi.fail(500)
    events, status, stderr = watch(watch_path(kubeapi.resource_version), opened=False).rest()
    assert (events, status) == ([], 1)
    assert "(InternalError)" in stderr


# -- the server on its own ------------------------------------------------------


def test_list_carries_the_servers_resource_version(kubeapi, five_pods):
    _, listed = fetch(kubeapi, "/api/v1/pods")
    assert listed["metadata"]["resourceVersion"] == kubeapi.resource_version
    before = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in listed["items"]}
    namespace, name = five_pods[0].split("/")
    modified = kubeapi.put_pod(kubeapi.get_pod(namespace, name))
    _, listed = fetch(kubeapi, "/api/v1/pods")
    after = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in listed["items"]}
    assert listed["metadata"]["resourceVersion"] == kubeapi.resource_version == modified
    assert after == dict(before, **{name: modified})
    assert int(modified) > max(int(v) for v in before.values())


def test_unknown_continue_token_is_expired(kubeapi):
    status, body = fetch(kubeapi, "/api/v1/pods?limit=1&continue=bm90LWEtdG9rZW4")
    assert status == 410
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": EXPIRED_MESSAGE,
        "reason": "Expired",
        "code": 410,
    }


def test_unknown_path_is_a_not_found_status(kubeapi):
    status, body = fetch(kubeapi, "/apis/apps/v1/deployments")
    assert (status, body["kind"], body["reason"], body["code"]) == (404, "Status", "NotFound", 404)


def test_paged_list_is_a_consistent_snapshot(kubeapi, five_pods):
    _, first = fetch(kubeapi, "/api/v1/pods?limit=2")
    kubeapi.delete_pod(*five_pods[4].split("/"))
    kubeapi.put_pod(make_pod("aaa", "new-7c79c4bf97-x2kq9"))
    _, rest = fetch(kubeapi, "/api/v1/pods?limit=10&continue=" + first["metadata"]["continue"])
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    names = [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in first["items"] + rest["items"]
    ]
    assert names == five_pods
    _, fresh = fetch(kubeapi, "/api/v1/pods")
    assert len(fresh["items"]) == 5 and fresh["items"][0]["metadata"]["namespace"] == "aaa"
    assert int(fresh["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])


def test_put_pod_bumps_the_resource_version(kubeapi):
    pod = make_pod("shop", "web-7c79c4bf97-x2kq9")
    first = kubeapi.put_pod(pod)
    second = kubeapi.put_pod(pod)
    assert int(second) > int(first)
    assert kubeapi.put_pod(pod, bump_resource_version=False) == pod["metadata"]["resourceVersion"]
    assert kubeapi.get_pod("shop", "web-7c79c4bf97-x2kq9")["metadata"]["resourceVersion"] == "1"


def test_large_list_is_streamed_whole(kubeapi):
    kubeapi.load_items(generate_items_for_test(3000))
    with urllib.request.urlopen(kubeapi.url + "/api/v1/pods", timeout=30) as response:
        body = response.read()
        assert int(response.headers["Content-Length"]) == len(body)
    assert len(json.loads(body)["items"]) == 3000


def test_truncated_body_is_cut_in_the_middle(kubeapi, five_pods):
    kubeapi.truncate()
    with urllib.request.urlopen(kubeapi.url + "/api/v1/pods", timeout=10) as response:
        length = int(response.headers["Content-Length"])
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    assert length > 5 * 5000


def test_generated_items_match_generated_pods():
    from test.pods import generate_items

    for pod, (namespace, name, data) in zip(
        generate(20, unhealthy_every=3), generate_items(20, unhealthy_every=3), strict=True
    ):
        assert (namespace, name) == (pod["metadata"]["namespace"], pod["metadata"]["name"])
        assert {"apiVersion": "v1", "kind": "Pod", **json.loads(data)} == pod


def generate_items_for_test(n):
    from test.pods import generate_items

    return generate_items(n)


# -- selectors ------------------------------------------------------------------


def labelled(namespace, name, **labels):
    pod = make_pod(namespace, name)
    pod["metadata"]["labels"] = labels
    return pod


@pytest.fixture
def labelled_pods(kubeapi):
    pods = [
        labelled("prod", "web", app="web", env="prod", tier="front"),
        labelled("prod", "cache", app="web", env="prod", tier="cache"),
        labelled("staging", "web", app="web", env="staging", canary="yes"),
        labelled("dev", "api", app="api", env="dev", replicas="3"),
        labelled("kube-system", "dns", **{"k8s-app": "kube-dns"}),
    ]
    kubeapi.set_pods(pods)
    return pods


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("app=web", ["prod/cache", "prod/web", "staging/web"]),
        ("app==web,tier!=cache", ["prod/web", "staging/web"]),
        ("env in (prod,staging)", ["prod/cache", "prod/web", "staging/web"]),
        ("env notin (prod, staging)", ["dev/api", "kube-system/dns"]),
        ("canary", ["staging/web"]),
        ("!canary,app", ["dev/api", "prod/cache", "prod/web"]),
        ("replicas>2", ["dev/api"]),
        ("replicas<3", []),
        ("app=nothing", []),
    ],
)
def test_kubectl_label_selector(
    kubeapi, kubeconfig, kubectl_path, labelled_pods, selector, expected
):
    result = kubectl(
        kubectl_path, "get", "pods", "-A", "-l", selector, "-o", "json", "--chunk-size=1"
    )
    assert result.returncode == 0, result.stderr
    keys = [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in json.loads(result.stdout)["items"]
    ]
    assert keys == expected
    assert any("labelSelector=" in path for _, path in kubeapi.requests)


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("metadata.namespace!=prod,metadata.namespace!=kube-system", ["dev/api", "staging/web"]),
        ("metadata.namespace=prod", ["prod/cache", "prod/web"]),
        ("metadata.namespace==dev", ["dev/api"]),
        ("metadata.name=web,metadata.namespace!=prod", ["staging/web"]),
    ],
)
def test_kubectl_field_selector(
    kubeapi, kubeconfig, kubectl_path, labelled_pods, selector, expected
):
    result = kubectl(
        kubectl_path,
        "get",
        "pods",
        "-A",
        "--field-selector",
        selector,
        "-o",
        "json",
        "--chunk-size=2",
    )
    assert result.returncode == 0, result.stderr
    keys = [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in json.loads(result.stdout)["items"]
    ]
    assert keys == expected


def test_selected_pages_are_short_and_consistent(kubeapi, labelled_pods):
    query = (
        "labelSelector="
        + urllib.parse.quote("app=web")
        + "&fieldSelector="
        + urllib.parse.quote("metadata.namespace!=staging")
    )
    status, first = fetch(kubeapi, f"/api/v1/pods?limit=1&{query}")
    # dev/api does not match: the first page walks past it to prod/cache
    assert status == 200 and [p["metadata"]["name"] for p in first["items"]] == ["cache"]
    assert "remainingItemCount" not in first["metadata"]
    kubeapi.delete_pod("prod", "web")
    kubeapi.put_pod(labelled("prod", "late", app="web"))
    seen, token = [], first["metadata"]["continue"]
    while token:
        _, page = fetch(
            kubeapi, f"/api/v1/pods?limit=1&{query}&continue=" + urllib.parse.quote(token)
        )
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        seen += [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in page["items"]]
        token = page["metadata"].get("continue")
    # the snapshot of the first page: prod/web still there, prod/late not yet;
    # the last page (staging/web does not match) is empty
    assert seen == ["prod/web"]
    assert page["items"] == []


@pytest.mark.parametrize(
    "query, message",
    [
        ("labelSelector=" + urllib.parse.quote("app in (web"), "unable to parse requirement"),
        ("labelSelector=" + urllib.parse.quote("replicas>many"), "must be an integer"),
        ("fieldSelector=" + urllib.parse.quote("spec.secret=x"), "field label not supported"),
        ("fieldSelector=" + urllib.parse.quote("metadata.namespace"), "invalid selector"),
    ],
)
def test_bad_selector_is_a_bad_request(kubeapi, labelled_pods, query, message):
    status, body = fetch(kubeapi, f"/api/v1/pods?{query}")
    assert (status, body["reason"]) == (400, "BadRequest")
    assert message in body["message"]


@pytest.mark.parametrize(
    "labels, label_selector, field_selector, selected",
    [
        ({"a": "1"}, "", "", True),
        ({"a": "1"}, "a", "", True),
        ({"a": "1"}, "!a", "", False),
        ({}, "!a", "", True),
        ({"a": "1"}, "a=1", "", True),
        ({"a": "1"}, "a==2", "", False),
        ({}, "a!=1", "", True),
        ({"a": "1"}, "a in (1,2)", "", True),
        ({}, "a in (1,2)", "", False),
        ({}, "a notin (1,2)", "", True),
        ({"a": "3"}, "a notin (1,2)", "", True),
        ({"a": "x"}, "a>1", "", False),
        ({"a": ""}, "a=", "", True),
        ({"a": "1"}, "a=1,b", "", False),
        ({"a": "1"}, "", "metadata.namespace=ns", True),
        ({"a": "1"}, "", "metadata.namespace!=ns", False),
        ({"a": "1"}, "a=1", "metadata.namespace!=other,metadata.name==p", True),
    ],
)
def test_matches(labels, label_selector, field_selector, selected):
    pod = {"metadata": {"namespace": "ns", "name": "p", "labels": labels}}
    assert kubeapi_module.matches(pod, label_selector, field_selector) is selected


LEASES = "/apis/coordination.k8s.io/v1/namespaces/default/leases"


def lease_body(name, holder, resource_version=None):
    metadata = {"name": name}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return json.dumps(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
        }
    )


def kubectl_write(kubectl_path, verb, path, body):
    return subprocess.run(
        [kubectl_path, verb, "--raw", path, "-f", "-"],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_lease_get_create_replace_with_compare_and_swap(kubeapi, kubeconfig, kubectl_path):
    missing = kubectl(kubectl_path, "get", "--raw", f"{LEASES}/k8svent")
    assert missing.returncode == 1
    assert '(NotFound): leases.coordination.k8s.io "k8svent" not found' in missing.stderr

    created = kubectl_write(kubectl_path, "create", LEASES, lease_body("k8svent", "a"))
    assert created.returncode == 0, created.stderr
    lease = json.loads(created.stdout)
    assert lease["spec"]["holderIdentity"] == "a"
    rv = lease["metadata"]["resourceVersion"]
    assert int(rv) > kubeapi_module.FIRST_RESOURCE_VERSION
    assert kubeapi.resource_version == rv  # a write moves the server's counter

    again = kubectl_write(kubectl_path, "create", LEASES, lease_body("k8svent", "b"))
    assert again.returncode == 1 and "(AlreadyExists)" in again.stderr

    replaced = kubectl_write(
        kubectl_path, "replace", f"{LEASES}/k8svent", lease_body("k8svent", "b", rv)
    )
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["metadata"]["resourceVersion"] != rv
    stale = kubectl_write(
        kubectl_path, "replace", f"{LEASES}/k8svent", lease_body("k8svent", "c", rv)
    )
    assert stale.returncode == 1 and "(Conflict)" in stale.stderr
    got = json.loads(kubectl(kubectl_path, "get", "--raw", f"{LEASES}/k8svent").stdout)
    assert got["spec"]["holderIdentity"] == "b"
    assert kubeapi.lease("default", "k8svent") == got


def test_lease_writes_can_be_made_to_fail(kubeapi, kubeconfig, kubectl_path):
    kubeapi.fail_lease_writes(500)
    failed = kubectl_write(kubectl_path, "create", LEASES, lease_body("k8svent", "a"))
    assert failed.returncode == 1 and "(InternalError)" in failed.stderr
    assert kubeapi.lease("default", "k8svent") is None
    kubeapi.fail_lease_writes(None)
    assert kubectl_write(kubectl_path, "create", LEASES, lease_body("k8svent", "a")).returncode == 0


def test_kubectl_knows_the_lease_api_and_the_cluster_uid(kubeapi, kubeconfig, kubectl_path):
    explained = kubectl(kubectl_path, "api-resources", "--api-group=coordination.k8s.io")
    assert explained.returncode == 0 and "leases" in explained.stdout
    namespace = json.loads(
        kubectl(kubectl_path, "get", "--raw", "/api/v1/namespaces/kube-system").stdout
    )
    assert namespace["metadata"]["uid"] == kubeapi.cluster_uid


def test_watch_of_a_lease_streams_its_writes(kubeapi, kubeconfig, kubectl_path):
    created = json.loads(
        kubectl_write(kubectl_path, "create", LEASES, lease_body("k8svent", "a")).stdout
    )
    rv = created["metadata"]["resourceVersion"]
    query = urllib.parse.urlencode(
        {
            "watch": "1",
            "fieldSelector": "metadata.name=k8svent",
            "resourceVersion": rv,
            "timeoutSeconds": "5",
        }
    )
    watcher = subprocess.Popen(
        [kubectl_path, "get", "--raw", f"{LEASES}?{query}"], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while kubeapi.open_lease_watches != 1:
            assert time.monotonic() < deadline, "the watch never opened"
            time.sleep(0.05)
        replaced = kubectl_write(
            kubectl_path, "replace", f"{LEASES}/k8svent", lease_body("k8svent", "b", rv)
        )
        assert replaced.returncode == 0, replaced.stderr
        event = json.loads(watcher.stdout.readline())
        assert event["type"] == "MODIFIED"
        assert event["object"]["spec"]["holderIdentity"] == "b"
        assert watcher.wait(10) == 0  # timeoutSeconds ends it normally
    finally:
        watcher.kill()
        watcher.wait()
