"""The kubectl section: URLs, watch events, and watch_pods with the real kubectl."""

import contextlib
import json
import os
import queue
import subprocess
import threading
import time

import pytest

import k8svent
from test.pods import make_pod

EVENT_WAIT_SECONDS = 10


# -- pure parts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "namespace, query, url",
    [
        (None, {}, "/api/v1/pods"),
        ("shop", {}, "/api/v1/namespaces/shop/pods"),
        ("a/b", {}, "/api/v1/namespaces/a%2Fb/pods"),
        (None, {"limit": 500, "continue_": None}, "/api/v1/pods?limit=500"),
        (
            None,
            {"limit": 500, "continue_": "eyJ2Ijo+/="},
            "/api/v1/pods?limit=500&continue=eyJ2Ijo%2B%2F%3D",
        ),
        (
            "shop",
            {
                "watch": 1,
                "resourceVersion": "1234",
                "allowWatchBookmarks": True,
                "timeoutSeconds": 300,
            },
            "/api/v1/namespaces/shop/pods?watch=1&resourceVersion=1234&allowWatchBookmarks=true"
            "&timeoutSeconds=300",
        ),
    ],
)
def test_pods_url(namespace, query, url):
    assert k8svent.pods_url(k8svent.Settings(namespace=namespace), **query) == url


def test_watch_event_normalises_the_pod():
    line = (
        b'{"type":"MODIFIED","object":{"metadata":{"name":"p","namespace":"ns",'
        b'"resourceVersion":"7","managedFields":[{"manager":"kubelet"}]},'
        b'"spec":{},"status":{"phase":"Running"}}}\n'
    )
    kind, pod = k8svent.watch_event(line)
    assert kind == "MODIFIED"
    assert pod == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "7"},
        "spec": {},
        "status": {"phase": "Running"},
    }
    assert list(pod) == ["apiVersion", "kind", "metadata", "spec", "status"]


def test_watch_event_passes_a_bookmark_on():
    line = (
        b'{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":'
        b'{"resourceVersion":"12746","creationTimestamp":null},"spec":{"containers":null},'
        b'"status":{}}}\n'
    )
    kind, obj = k8svent.watch_event(line)
    assert (kind, obj["metadata"]["resourceVersion"]) == ("BOOKMARK", "12746")


@pytest.mark.parametrize("code, error", [(410, k8svent.Expired), (500, k8svent.KubectlError)])
def test_watch_event_raises_an_error_event(code, error):
    line = (
        b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},'
        b'"status":"Failure","message":"too old resource version: 1 (5)","reason":"X",'
        b'"code":%d}}\n' % code
    )
    with pytest.raises(error) as raised:
        k8svent.watch_event(line)
    assert type(raised.value) is error
    assert str(raised.value) == f"watch failed: {code} X: too old resource version: 1 (5)"


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"ADDED","object":{"metadata"\n',
        b"[]\n",
        b'{"type":"ADDED"}\n',
        b'{"type":"CHANGED","object":{"metadata":{}}}\n',
        b'{"type":"ADDED","object":{"metadata":"p"}}\n',
        b'{"type":"DELETED","object":{"metadata":{},"status":[]}}\n',
    ],
)
def test_watch_event_refuses_a_malformed_line(line):
    with pytest.raises(k8svent.KubectlError, match="watch event") as raised:
        k8svent.watch_event(line)
    assert type(raised.value) is k8svent.KubectlError


# -- watch_pods, with kubectl and the test API server ----------------------------


class Watching:
    """watch_pods run on a thread; its events in a queue, its end in `error`/`ended`."""

    def __init__(self, settings, resource_version, **kwargs):
        self.stop = threading.Event()
        self.ended = threading.Event()
        self.error = None
        self._events = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(settings, resource_version), kwargs=kwargs, daemon=True
        )
        self._thread.start()

    def _run(self, settings, resource_version, **kwargs):
        try:
            for event in k8svent.watch_pods(settings, resource_version, self.stop, **kwargs):
                self._events.put(event)
        except k8svent.K8sventError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def next_event(self):
        return self._events.get(timeout=EVENT_WAIT_SECONDS)

    def finish(self):
        """Wait for the end; return the events not taken yet and the error raised."""
        assert self.ended.wait(EVENT_WAIT_SECONDS)
        events = []
        while not self._events.empty():
            events.append(self._events.get())
        return events, self.error


@pytest.fixture
def settings(kubeconfig, kubectl_path):
    return k8svent.Settings(kubectl=kubectl_path, kubectl_timeout=10)


@pytest.fixture
def watching(kubeapi, settings):
    """Start watch_pods on a thread: ``watching(rv, opened=True, **kwargs)``; stopped after."""
    started = []

    def start(resource_version, opened=True, settings=settings, **kwargs):
        started.append(Watching(settings, resource_version, **kwargs))
        if opened:
            assert kubeapi.wait_open_watches(1)
        return started[-1]

    yield start
    for one in started:
        one.stop.set()
        assert one.ended.wait(EVENT_WAIT_SECONDS)


def summary(event):
    kind, obj = event
    return kind, k8svent.pod_key(obj), obj["metadata"]["resourceVersion"]


def _wait_for(condition, seconds=EVENT_WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_list_pods_fetches_the_next_page_while_this_one_is_read(kubeapi, kubeconfig, kubectl_path):
    settings = k8svent.Settings(kubectl=kubectl_path, kubectl_timeout=10, chunk_size=2)
    for i in range(5):
        kubeapi.put_pod(make_pod("shop", f"web-7c79c4bf97-{i}abcd"))
    listed = {}
    pods = k8svent.list_pods(settings, listed=listed)
    first = next(pods)

    def continued():
        return sum("continue=" in path for _, path in kubeapi.requests)

    # The first page is not read to its end, and the second is asked for.
    assert _wait_for(lambda: continued() == 1)
    keys = [k8svent.pod_key(first), *(k8svent.pod_key(item) for item in pods)]
    assert keys == sorted(kubeapi.pod_keys()) and listed["pages"] == 3
    assert continued() == 2  # one request a page, no more


def _awkward_pods():
    """Pods that test where a list is cut into items: lists nested in a pod whose
    entries start with "metadata" (as the items do), that separator inside
    strings, text that is not ASCII, and a pod larger than a read."""
    pods = [make_pod("shop", f"web-{i}") for i in range(7)]
    pods[1]["spec"]["templates"] = [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]
    pods[2]["metadata"]["annotations"] = {"note": 'ü},{"metadata":{"name":"x"}}]}'}
    pods[4]["metadata"]["annotations"] = {"big": "é" * k8svent.LIST_READ_BYTES}
    pods[5]["status"]["conditions"] = []
    return pods


@pytest.mark.parametrize("chunk_size", [3, 500])
def test_list_pods_reads_each_item_whole(kubeapi, kubeconfig, kubectl_path, chunk_size):
    settings = k8svent.Settings(kubectl=kubectl_path, kubectl_timeout=10, chunk_size=chunk_size)
    for pod in _awkward_pods():
        kubeapi.put_pod(pod)
    # What the server sent, as json reads it whole.
    expected = []
    token = None
    while True:
        page = json.loads(
            subprocess.run(
                [
                    kubectl_path,
                    "get",
                    "--raw",
                    k8svent.pods_url(settings, limit=chunk_size, continue_=token),
                ],
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                capture_output=True,
                check=True,
            ).stdout
        )
        expected += page["items"]
        token = page["metadata"].get("continue")
        if not token:
            break
    listed = {}
    assert list(k8svent.list_pods(settings, listed=listed)) == expected
    assert listed["pages"] == -(-len(expected) // chunk_size)


def _read_list(tmp_path, data):
    """(items, continue token, resourceVersion) that _PageReader reads from a file."""
    path = tmp_path / "list.json"
    path.write_bytes(data)
    reader = k8svent._PageReader(os.open(path, os.O_RDONLY))
    try:
        return list(reader.items()), reader.token, reader.resource_version
    finally:
        reader.close()


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("metadata_last", [False, True])
def test_a_list_is_read_whatever_its_layout(tmp_path, indent, metadata_last):
    items = _awkward_pods()
    metadata = {"resourceVersion": "12", "continue": "abc"}
    page = {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}
    if metadata_last:
        page["metadata"] = page.pop("metadata")
    separators = (",", ":") if indent is None else None
    data = json.dumps(page, indent=indent, separators=separators, ensure_ascii=False).encode()
    assert _read_list(tmp_path, data) == (items, "abc", "12")


@pytest.mark.parametrize("items", [b"[]", b"null", b" [ ] "])
def test_an_empty_list_is_read(tmp_path, items):
    data = b'{"kind":"PodList","metadata":{"resourceVersion":"3","continue":""},"items":%s}'
    assert _read_list(tmp_path, data % items) == ([], "", "3")


def test_a_key_that_ends_in_items_is_not_the_list(tmp_path):
    data = b'{"kind":"PodList","x\\"items":[{"a":1}],"items":[{"metadata":{"name":"p"}}]}'
    assert _read_list(tmp_path, data)[0] == [{"metadata": {"name": "p"}}]


@pytest.mark.parametrize(
    "data, error",
    [
        (b'{"kind":"PodList","items":[{"metadata":{}},{"metadata":', "cut short"),
        (b'{"kind":"PodList","items":[{"metadata":{}}', "cut short"),
        (b'{"kind":"PodList","items":[{"metadata":{}}]', "not JSON after its items"),
        (b'{"kind":"PodList","metadata":{}}', "no items"),
        (b'{"kind":"PodList","items":{}}', "items is not a list"),
        (b'{"kind":"PodList","items":nul}', "items is not a list"),
        (b'{"kind":"PodList","items":[{"metadata":{}},]}', "a comma after its last item"),
        (b'{"kind":"PodList","items":[{"metadata":{}}{"metadata":{}}]}', "no comma"),
        (b'{"kind":"PodList","items":[{"metadata":{x}}]}', "cut short, or not JSON"),
        (b'{"kind":"Pod"s,"items":[]}', "not JSON before its items"),
    ],
)
def test_what_is_not_a_list_is_refused(tmp_path, data, error):
    with pytest.raises(k8svent._BadList, match=error):
        _read_list(tmp_path, data)


def _kubectl_children():
    """The pids of this process's kubectl children that have not been reaped."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            with open(f"/proc/{entry}/comm") as comm:
                name = comm.read().strip()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if int(fields[1]) == os.getpid() and name == "kubectl":
            pids.append(int(entry))
    return pids


def test_list_pods_stops_both_kubectls_when_the_reader_stops(kubeapi, kubeconfig, kubectl_path):
    settings = k8svent.Settings(kubectl=kubectl_path, kubectl_timeout=10, chunk_size=2)
    for i in range(5):
        kubeapi.put_pod(make_pod("shop", f"web-7c79c4bf97-{i}abcd"))
    kubeapi.hang(60, page=1)  # the next page's kubectl waits for its answer
    pods = k8svent.list_pods(settings)
    next(pods)
    assert _wait_for(lambda: any("continue=" in path for _, path in kubeapi.requests))
    assert _kubectl_children()
    pods.close()
    assert _kubectl_children() == []


@pytest.mark.parametrize("typed", [True, False])
def test_watch_pods_yields_events_as_they_happen(kubeapi, settings, watching, typed):
    kubeapi.typed_watch_objects = typed
    pod = make_pod("shop", "web-7c79c4bf97-x2kq9")
    pod["metadata"]["annotations"]["note"] = "a<b>&c é \u2028 😀"
    watch = watching(kubeapi.resource_version)
    added = kubeapi.put_pod(pod)
    kind, obj = watch.next_event()
    assert not watch.ended.is_set()
    # The same pod, to the byte, as a list gives it: fingerprints agree.
    listed = [k8svent.pod_from_item(item) for item in k8svent.list_pods(settings)]
    assert (kind, k8svent.encode_pod(obj)) == ("ADDED", k8svent.encode_pod(listed[0]))
    assert obj["metadata"]["resourceVersion"] == added and "managedFields" not in obj["metadata"]
    modified = kubeapi.put_pod(make_pod("shop", "web-7c79c4bf97-x2kq9", healthy=False))
    assert summary(watch.next_event()) == ("MODIFIED", "shop/web-7c79c4bf97-x2kq9", modified)
    kubeapi.delete_pod("shop", "web-7c79c4bf97-x2kq9")
    kind, obj = watch.next_event()
    assert (kind, k8svent.pod_key(obj)) == ("DELETED", "shop/web-7c79c4bf97-x2kq9")
    assert obj["metadata"]["resourceVersion"] == kubeapi.resource_version
    assert obj["apiVersion"] == "v1" and obj["kind"] == "Pod"
    assert not k8svent.pod_healthy(obj)  # the last state
    assert not watch.ended.is_set()


def test_watch_pods_calls_idle_once_the_events_within_linger_of_the_first_are_in(kubeapi, settings):
    # The watcher applies what idle() ends as one batch: a burst, not each event.
    order = []  # pod keys and "idle", in the order the reader saw them, with when
    stop = threading.Event()

    def read():
        with contextlib.suppress(k8svent.K8sventError):
            for _, obj in k8svent.watch_pods(
                settings,
                kubeapi.resource_version,
                stop,
                idle=lambda: order.append(("idle", time.monotonic())),
                linger=1.0,
            ):
                order.append((k8svent.pod_key(obj), time.monotonic()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert kubeapi.wait_open_watches(1)
    kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    assert _wait_for(lambda: order)
    kubeapi.put_pod(make_pod("shop", "b-7c79c4bf97-x2kq9"))  # within a second of a
    assert _wait_for(lambda: "idle" in dict(order))
    kubeapi.put_pod(make_pod("shop", "c-7c79c4bf97-x2kq9"))
    assert _wait_for(lambda: [name for name, _ in order].count("idle") == 2)
    stop.set()
    reader.join(EVENT_WAIT_SECONDS)
    assert [name for name, _ in order] == [
        "shop/a-7c79c4bf97-x2kq9",
        "shop/b-7c79c4bf97-x2kq9",
        "idle",
        "shop/c-7c79c4bf97-x2kq9",
        "idle",
    ]
    # No sooner than the linger after the first of a batch, and not much later.
    for first, idle in ((order[0], order[2]), (order[3], order[4])):
        assert 0.95 <= idle[1] - first[1] < 3.0


def test_watch_pods_replays_and_ends_at_the_timeout(kubeapi, watching):
    start = kubeapi.resource_version
    first = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    second = kubeapi.put_pod(make_pod("shop", "b-7c79c4bf97-x2kq9"))
    kubeapi.delete_pod("shop", "a-7c79c4bf97-x2kq9")
    began = time.monotonic()
    events, error = watching(start, opened=False, timeout_seconds=1).finish()
    assert error is None
    assert 1 <= time.monotonic() - began < 5
    assert [summary(e) for e in events] == [
        ("ADDED", "shop/a-7c79c4bf97-x2kq9", first),
        ("ADDED", "shop/b-7c79c4bf97-x2kq9", second),
        ("DELETED", "shop/a-7c79c4bf97-x2kq9", kubeapi.resource_version),
    ]
    assert kubeapi.requests == [
        (
            "GET",
            (
                f"/api/v1/pods?allowWatchBookmarks=true&resourceVersion={start}&timeoutSeconds=1"
                "&watch=1"
            ),
        )
    ]


def test_watch_pods_yields_bookmarks(kubeapi, watching):
    kubeapi.bookmark_seconds = 0.2
    watch = watching(kubeapi.resource_version)
    added = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    kinds = []
    while "ADDED" not in kinds:
        kinds.append(watch.next_event()[0])
    kind, obj = watch.next_event()
    assert (kind, obj["metadata"]["resourceVersion"]) == ("BOOKMARK", added)
    assert set(kinds) <= {"BOOKMARK", "ADDED"}


def test_watch_pods_of_one_namespace(kubeapi, settings, watching):
    start = kubeapi.resource_version
    kubeapi.put_pod(make_pod("other", "a-7c79c4bf97-x2kq9"))
    added = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    kubeapi.put_pod(make_pod("other", "b-7c79c4bf97-x2kq9"))
    shop = k8svent.Settings(kubectl=settings.kubectl, namespace="shop")
    events, error = watching(start, opened=False, settings=shop, timeout_seconds=1).finish()
    assert ([summary(e) for e in events], error) == (
        [("ADDED", "shop/a-7c79c4bf97-x2kq9", added)],
        None,
    )
    assert kubeapi.requests[0][1].startswith("/api/v1/namespaces/shop/pods?")


@pytest.mark.parametrize(
    "expire",
    [
        lambda api: api.set_watch_history(0),  # the server has compacted past the RV
        lambda api: api.expire_watch(),
        lambda api: api.expire_watch(http=True),
        lambda api: api.expire_watch(http=True, reason="Gone"),
    ],
    ids=["compacted", "error-event", "http-410", "http-410-gone"],
)
def test_watch_pods_raises_expired(kubeapi, watching, expire):
    start = kubeapi.resource_version
    kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    expire(kubeapi)
    events, error = watching(start, opened=False).finish()
    assert events == []
    assert isinstance(error, k8svent.Expired)
    assert "too old resource version" in str(error)


@pytest.mark.parametrize("status", [500, 403])
def test_watch_pods_raises_kubectl_error_on_other_failures(kubeapi, watching, status):
    kubeapi.fail(status)
    events, error = watching(kubeapi.resource_version, opened=False).finish()
    assert events == []
    assert type(error) is k8svent.KubectlError
    assert str(error).startswith("kubectl exited 1: Error from server (")


def test_watch_pods_raises_when_the_stream_is_cut(kubeapi, watching):
    watch = watching(kubeapi.resource_version)
    added = kubeapi.put_pod(make_pod("shop", "a-7c79c4bf97-x2kq9"))
    assert watch.next_event()[1]["metadata"]["resourceVersion"] == added
    assert kubeapi.cut_watches() == 1
    events, error = watch.finish()
    assert events == []
    assert type(error) is k8svent.KubectlError
    assert str(error) == "kubectl exited 1: error: unexpected EOF"


def test_watch_pods_stops_promptly(kubeapi, watching):
    watch = watching(kubeapi.resource_version)
    began = time.monotonic()
    watch.stop.set()
    events, error = watch.finish()
    assert time.monotonic() - began < 2
    assert events == []
    assert isinstance(error, k8svent.PollStopped)
    assert str(error) == "stopped while kubectl was watching pods"
    assert kubeapi.wait_open_watches(0)


def test_watch_pods_kills_a_kubectl_that_outlives_the_watch(kubeapi, settings, watching):
    kubeapi.hang(30)
    slow = k8svent.Settings(kubectl=settings.kubectl, kubectl_timeout=1)
    began = time.monotonic()
    events, error = watching(
        kubeapi.resource_version, opened=False, settings=slow, timeout_seconds=1
    ).finish()
    assert 2 <= time.monotonic() - began < 6
    assert (events, type(error)) == ([], k8svent.KubectlError)
    assert str(error).startswith("kubectl killed after")


def test_watch_pods_without_kubectl(kubeapi, watching):
    missing = k8svent.Settings(kubectl="/nonexistent/kubectl")
    events, error = watching("1", opened=False, settings=missing).finish()
    assert (events, str(error)) == ([], "kubectl not found: '/nonexistent/kubectl'")
