"""A fake Kubernetes API server that the real kubectl talks to.

Tests start one (see the ``kubeapi`` fixture in conftest.py), write a
kubeconfig for it with ``kubeconfig(path)`` and set ``KUBECONFIG`` to that
path; from then on ``kubectl get pods -A -o json`` lists the pods the test put
here. It serves plain http on 127.0.0.1, port 0, from a daemon thread.

What it speaks (enough for kubectl 1.37):

- ``GET /version``, legacy discovery (``/api``, ``/apis``, ``/api/v1``). kubectl
  asks for aggregated discovery in its Accept header and takes the legacy
  documents when the answer is plain ``application/json``. No OpenAPI:
  ``kubectl get`` never asks for it.
- ``GET /api/v1/pods`` and ``/api/v1/namespaces/NS/pods``: a PodList whose
  items carry no ``apiVersion``/``kind`` (as the real server sends them), in
  (namespace, name) order, honouring ``limit`` and ``continue``. Paged lists
  are consistent: every page after the first is cut from the snapshot the first
  page came from, as etcd does; a continue token that names an unknown or
  evicted snapshot gets ``410 Expired``, like a compacted resource version.
  ``labelSelector`` (equality, set-based, existence, ``<``/``>``) and
  ``fieldSelector`` (``metadata.namespace`` and ``metadata.name`` with ``=``,
  ``==``, ``!=``) filter the list as the real server does (``matches``): a page
  holds up to ``limit`` selected pods and may come back short, or empty, with a
  continue token; no ``remainingItemCount``; a malformed selector gets ``400``.
  ``metadata.resourceVersion`` is the server's resourceVersion when the list
  (its first page) was cut; every pod carries the resourceVersion of its last
  write.
- The same paths with ``watch=1`` (or ``true``): a watch, streamed with chunked
  transfer encoding, one JSON event a line, ``{"type": ..., "object": ...}``,
  written as it happens. ``resourceVersion=RV`` replays the recorded events
  after RV, then streams live ones; no ``resourceVersion`` (or ``0``) sends an
  ``ADDED`` for every pod first. An RV older than the history kept gets an
  ``ERROR`` event (a ``Status`` with code 410, reason ``Expired``, "too old
  resource version") and the end of the stream. ``allowWatchBookmarks=true``
  adds a ``BOOKMARK`` every ``bookmark_seconds`` (its object a Pod with only
  ``metadata.resourceVersion`` meaningful, as the real server sends it);
  ``timeoutSeconds`` ends the stream normally (default 1800). Objects carry
  ``managedFields``, and ``apiVersion``/``kind`` as the real server sends them
  unless ``typed_watch_objects`` is false; a ``DELETED`` event's object is the
  pod's last state with the resourceVersion of its deletion.
- ``GET /api/v1/namespaces/NS/pods/NAME``: the Pod, with ``apiVersion``/``kind``.
- ``POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`` (what
  ``kubectl auth can-i`` sends): allowed, unless ``deny(verb, resource)``
  said otherwise; ``access_reviews`` keeps each review's resourceAttributes.
- ``GET /api/v1/namespaces/NS``: a built-in namespace or one that holds a pod,
  with a ``metadata.uid`` (``kube-system``'s is ``cluster_uid``, random per server: the
  cluster's identity as many tools read it).
- Leases (``coordination.k8s.io/v1``, in discovery under ``/apis``):
  ``GET``, ``POST`` (create) and ``PUT`` (replace) at
  ``/apis/coordination.k8s.io/v1/namespaces/NS/leases[/NAME]``. Writes are
  compare-and-swap on ``metadata.resourceVersion`` as on the real server: a
  replace with a stale one gets ``409 Conflict``, a create of an existing name
  ``409 AlreadyExists``, so kubectl prints ``(Conflict)``/``(AlreadyExists)``.
  Each write takes the next resourceVersion of the server-wide counter (as
  etcd's revision does) but records no pod event. ``lease(ns, name)`` reads
  one; ``fail_lease_writes(status)`` makes every Lease write answer that
  status until ``fail_lease_writes(None)``. ``?watch=1`` on the collection
  with ``fieldSelector=metadata.name=NAME`` streams each write of that Lease
  (``open_lease_watches`` counts them).
- Every error is a ``Status`` object, as the real server sends it.
- No authentication: the kubeconfig has a user with a token, but client-go
  only sends credentials over TLS, so kubectl sends no Authorization header to
  an http:// server (kubernetes/kubectl#744). Use ``fail(401, path_prefix="/")``
  to see how a client takes a rejection.

Pods are held as compact JSON bytes, each page is joined from them and large
bodies are written in pieces with a Content-Length, so 150,000 pods of 6 KB
(about 900 MB unpaged) cost little more than their bytes.

Every write (``put_pod``, ``set_pods``, ``delete_pod``) takes the next
resourceVersion of one server-wide counter and is recorded as a watch event;
the history keeps the last ``watch_history`` events (``set_watch_history``).
``load_items`` and ``clear`` replace everything at once and forget the
history: watches from before them expire.

Failure injection (``fail``, ``truncate``, ``hang``, ``expire_continue``,
``expire_watch``) applies to the next ``count`` matching pod requests (a
watch is one, but never ``truncate``'s or a ``page``'s); discovery is never
affected unless ``fail`` is given a ``path_prefix`` that covers it.
``cut_watches`` closes the open watch streams at once, as a dropped connection
does; with ``close_watches_at_once`` set, every watch ends as soon as it opens
(no event, a normal end); ``watch_starts`` counts the watches opened;
``open_watches`` says how many there are and ``wait_open_watches`` waits for a
number of them.
"""

import base64
import binascii
import bisect
import collections
import functools
import itertools
import json
import re
import select
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PROTOBUF_MAGIC = b"k8s\x00"
ACCESS_REVIEWS_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
SERVER_VERSION = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
FIRST_RESOURCE_VERSION = 1000
SNAPSHOTS_KEPT = 16
WATCH_HISTORY_EVENTS = 1000
BOOKMARK_SECONDS = 60
WATCH_TIMEOUT_SECONDS = 1800
HANG_UP_CHECK_SECONDS = 0.1  # how often an idle watch looks for a client that went away
WRITE_CHUNK_ITEMS = 256
TOKEN = "fake-token"
BUILTIN_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
LEASES_GROUP = "coordination.k8s.io"
LEASE_RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "coordination.k8s.io/v1",
    "resources": [
        {
            "name": "leases",
            "singularName": "lease",
            "namespaced": True,
            "kind": "Lease",
            "verbs": [
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ],
            "storageVersionHash": "gqkMMb/YqFM=",
        }
    ],
}

EXPIRED_MESSAGE = (
    "The provided continue parameter is too old to display a consistent list "
    "result. You can start a new list without the continue parameter, or use "
    "the continue token in this response to retrieve the remainder of the "
    "results. Continuing with the provided token results in an inconsistent "
    "list - objects that were created, modified, or deleted between the time "
    "the first chunk was returned and now may show up in the list."
)
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

POD_RESOURCES = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [
        {
            "name": "namespaces",
            "singularName": "namespace",
            "namespaced": False,
            "kind": "Namespace",
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": ["ns"],
            "storageVersionHash": "Q3oi5N2YM8M=",
        },
        {
            "name": "pods",
            "singularName": "pod",
            "namespaced": True,
            "kind": "Pod",
            "verbs": [
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ],
            "shortNames": ["po"],
            "categories": ["all"],
            "storageVersionHash": "xPOwRZ+Yhw8=",
        },
        {
            "name": "pods/status",
            "singularName": "",
            "namespaced": True,
            "kind": "Pod",
            "verbs": ["get", "patch", "update"],
        },
    ],
}


_RV_RE = re.compile(rb'"resourceVersion":"(\d+)"')


def status_object(code, message, reason=None, details=None):
    """A metav1.Status for an error, as the API server sends it."""
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, HTTPStatus(code).phrase.replace(" ", "")),
    }
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


def _compact(obj):
    """Compact JSON bytes, non-ASCII kept as UTF-8 like Go's encoder."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class SelectorError(ValueError):
    """A labelSelector or fieldSelector the real server refuses with 400."""


_WORD = r"[^\s!=,()<>]+"
_LABEL_TERM_RES = (
    ("!", re.compile(rf"!\s*(?P<key>{_WORD})")),
    ("set", re.compile(rf"(?P<key>{_WORD})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")),
    ("value", re.compile(rf"(?P<key>{_WORD})\s*(?P<op>==|!=|=|<|>)\s*(?P<value>{_WORD})?")),
    ("exists", re.compile(rf"(?P<key>{_WORD})")),
)
FIELD_PATHS = {
    "metadata.namespace": ("metadata", "namespace"),
    "metadata.name": ("metadata", "name"),
}


@functools.lru_cache(maxsize=64)
def parse_label_selector(text):
    """(key, operator, values) terms of a labelSelector, or SelectorError."""
    terms = []
    # Commas separate terms, except inside the parentheses of in/notin.
    for term in re.split(r",(?![^()]*\))", text) if text.strip() else ():
        term = term.strip()
        for kind, pattern in _LABEL_TERM_RES:  # noqa: B007 - used after the loop
            found = pattern.fullmatch(term)
            if found:
                break
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
        key = found["key"]
        if kind in ("!", "exists"):
            terms.append((key, kind, ()))
        elif kind == "set":
            values = frozenset(v.strip() for v in found["values"].split(","))
            terms.append((key, found["op"], values))
        else:
            value = found["value"] or ""
            if found["op"] in ("<", ">") and not re.fullmatch(r"-?\d+", value):
                raise SelectorError(
                    f"invalid value {value!r}: for 'Gt', 'Lt' operators, "
                    f"the value must be an integer"
                )
            terms.append((key, found["op"], (value,)))
    return tuple(terms)


@functools.lru_cache(maxsize=64)
def parse_field_selector(text):
    """(field, operator, value) terms of a pods fieldSelector, or SelectorError."""
    terms = []
    for term in text.split(",") if text.strip() else ():
        found = re.fullmatch(r"\s*([^!=\s]+)\s*(==|!=|=)\s*(\S*)\s*", term)
        if not found:
            raise SelectorError(f"invalid selector: {term!r}; can't understand {term!r}")
        if found[1] not in FIELD_PATHS:
            raise SelectorError(f"field label not supported: {found[1]}")
        terms.append((found[1], "!=" if found[2] == "!=" else "=", found[3]))
    return tuple(terms)


def _label_matches(labels, key, operator, values):
    """Whether labels meet one requirement (apimachinery's Requirement.Matches)."""
    if operator == "exists":
        return key in labels
    if operator in ("!", "notin", "!="):
        return key not in labels or (operator != "!" and labels[key] not in values)
    if key not in labels:
        return False
    if operator in ("<", ">"):
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have < want if operator == "<" else have > want
    return labels[key] in values  # =, ==, in


def _selection(query):
    """(labelSelector, fieldSelector) of a query, or None when it selects every pod."""
    label_selector = query.get("labelSelector", "")
    field_selector = query.get("fieldSelector", "")
    return (label_selector, field_selector) if label_selector or field_selector else None


def matches(pod, label_selector="", field_selector=""):
    """Whether a pod (a dict) is selected by a labelSelector and a fieldSelector.

    The selectors are the query's strings; a malformed one raises SelectorError.
    """
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    if not all(_label_matches(labels, *term) for term in parse_label_selector(label_selector)):
        return False
    for field, operator, value in parse_field_selector(field_selector):
        section, name = FIELD_PATHS[field]
        have = (pod.get(section) or {}).get(name, "")
        if (have == value) != (operator == "="):
            return False
    return True


@dataclass
class _Rule:
    """One injected failure: what it does, how often, and what it matches."""

    kind: str  # "fail", "truncate", "hang", "expire" or "expire_watch"
    count: int
    status: int = 500
    page: int | None = None
    path_prefix: str | None = None
    seconds: float = 0.0
    message: str | None = None
    retry_after: int | None = None
    http: bool = False
    reason: str | None = None

    def matches(self, path, page, has_continue, is_pod_request):
        """Whether this rule applies to a request."""
        if self.kind == "expire":
            return has_continue
        if self.path_prefix is not None:
            if not path.startswith(self.path_prefix):
                return False
        elif not is_pod_request:
            return False
        return self.page is None or self.page == page


@dataclass(frozen=True)
class _Snapshot:
    """The pods at one resource version, for consistent paged lists."""

    ident: int
    resource_version: int
    keys: list  # sorted (namespace, name)
    items: list  # compact JSON bytes, aligned with keys


class _Request:
    """What the handler learned about a pod request before answering."""

    def __init__(self):
        self.page = None
        self.has_continue = False
        self.watch = False


class FakeKubeAPI:
    """A Kubernetes API server for pods, good enough for the real kubectl."""

    def __init__(
        self,
        host="127.0.0.1",
        port=0,
        token=TOKEN,
        *,
        watch_history=WATCH_HISTORY_EVENTS,
        bookmark_seconds=BOOKMARK_SECONDS,
        typed_watch_objects=True,
    ):
        self.host = host
        self.token = token
        self._requested_port = port
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server = None
        self._thread = None
        self._resource_version = itertools.count(FIRST_RESOURCE_VERSION + 1)
        self._last_resource_version = FIRST_RESOURCE_VERSION
        self._pods = {}  # (namespace, name) -> compact JSON bytes, no apiVersion/kind
        self._keys = []  # sorted keys of _pods
        self._current = None  # _Snapshot of the current state, built on demand
        self._snapshots = collections.OrderedDict()  # ident -> _Snapshot
        self._snapshot_ids = itertools.count(1)
        self._rules = []
        self.requests = []  # (method, path with query), in arrival order
        self._changed = threading.Condition(self._lock)  # wakes the watches
        self._history = collections.deque()  # (resourceVersion, type, namespace, bytes)
        self._history_limit = watch_history
        self._compacted = FIRST_RESOURCE_VERSION  # watches from an older RV expire
        self._open_watches = 0
        self._cuts = 0  # cut_watches() calls so far
        self.close_watches_at_once = False
        self.watch_starts = 0
        self.bookmark_seconds = bookmark_seconds
        self.typed_watch_objects = typed_watch_objects
        self.server_version = SERVER_VERSION  # what GET /version answers
        self._denied = set()  # (verb, resource, group) that access reviews deny
        self.access_reviews = []  # resourceAttributes of each review, in arrival order
        self.cluster_uid = str(uuid.uuid4())  # each server a cluster of its own
        self._leases = {}  # (namespace, name) -> Lease dict, as stored
        self._lease_write_failure = None  # a status every Lease write answers
        self._open_lease_watches = 0

    # -- life cycle -------------------------------------------------------

    def start(self):
        """Bind 127.0.0.1:port and serve from a daemon thread."""
        self._stopping.clear()
        self._server = _Server((self.host, self._requested_port), _Handler)
        self._server.api = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeKubeAPI:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self):
        """Stop serving, wake hanging requests and close the socket."""
        if self._server is None:
            return
        self._stopping.set()
        with self._lock:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def port(self):
        """The port the server listens on."""
        return self._server.server_address[1]

    @property
    def url(self):
        """The server's base URL, http://127.0.0.1:PORT."""
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self, path):
        """Write a kubeconfig for this server (context "fake") and return its path.

        Tests point kubectl at it with ``KUBECONFIG=<path>``; the
        ``kubeconfig`` fixture does that through monkeypatch.
        """
        path = Path(path)
        path.write_text(
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: fake\n"
            "  cluster:\n"
            f"    server: {self.url}\n"
            "users:\n"
            "- name: fake\n"
            "  user:\n"
            f"    token: {self.token}\n"
            "contexts:\n"
            "- name: fake\n"
            "  context:\n"
            "    cluster: fake\n"
            "    user: fake\n"
            "    namespace: default\n"
            "current-context: fake\n"
        )
        return path

    # -- state ------------------------------------------------------------

    def put_pod(self, pod, *, bump_resource_version=True, missed=False):
        """Add or replace a pod (an ADDED or MODIFIED event); return its resourceVersion.

        With ``bump_resource_version`` the pod gets the next resourceVersion of
        the server's counter, as every write to a real server does; without it
        the pod's own ``metadata.resourceVersion`` is kept (the counter and the
        event still move on). ``missed`` records no event: a watch never hears
        of the change (as a watch cache that lost an event), only a list does.
        """
        with self._lock:
            key, data, version = self._encode(pod, bump_resource_version)
            existed = key in self._pods
            if not existed:
                bisect.insort(self._keys, key)
            self._pods[key] = data
            self._current = None
            if not missed:
                self._record_event("MODIFIED" if existed else "ADDED", key[0], data)
            return version

    def set_pods(self, pods, *, bump_resource_version=True):
        """Replace every pod with these: an event for each pod written or gone."""
        with self._lock:
            old, self._pods = self._pods, {}
            for pod in pods:
                key, data, _ = self._encode(pod, bump_resource_version)
                existed = key in old or key in self._pods
                self._pods[key] = data
                self._record_event("MODIFIED" if existed else "ADDED", key[0], data)
            for key in sorted(old.keys() - self._pods.keys()):
                self._record_deletion(key, old[key])
            self._keys = sorted(self._pods)
            self._current = None

    def load_items(self, items):
        """Replace every pod with ready-made list items: ``(namespace, name, bytes)``.

        The bytes are compact JSON of the pod without ``apiVersion``/``kind``
        (``pods.generate_items`` makes them) and are served as they are; their
        resourceVersions are the caller's; the server's counter moves past the
        largest of them. The fast way to hold 150,000 pods.
        No events are recorded: the history is forgotten, so watches from before
        expire.
        """
        with self._lock:
            self._pods = {(namespace, name): data for namespace, name, data in items}
            self._keys = sorted(self._pods)
            self._current = None
            # Past every item's resourceVersion, as a real server's counter is.
            highest = max(
                (int(m.group(1)) for d in self._pods.values() if (m := _RV_RE.search(d))),
                default=0,
            )
            while self._last_resource_version < highest:
                self._last_resource_version = next(self._resource_version)
            self._forget_history()

    def delete_pod(self, namespace, name, *, missed=False):
        """Remove a pod (a DELETED event, none if ``missed``); return whether it was there."""
        with self._lock:
            data = self._pods.pop((namespace, name), None)
            if data is None:
                return False
            del self._keys[bisect.bisect_left(self._keys, (namespace, name))]
            self._current = None
            if missed:
                self._last_resource_version = next(self._resource_version)
            else:
                self._record_deletion((namespace, name), data)
            return True

    def get_pod(self, namespace, name):
        """The stored pod as a GET returns it (with apiVersion/kind), or None."""
        with self._lock:
            data = self._pods.get((namespace, name))
        if data is None:
            return None
        return {"apiVersion": "v1", "kind": "Pod", **json.loads(data)}

    def pod_keys(self):
        """The stored pods' keys, "namespace/name", in list order."""
        with self._lock:
            return [f"{ns}/{name}" for ns, name in self._keys]

    @property
    def resource_version(self):
        """The server's current resourceVersion (of its last write), as a string."""
        with self._lock:
            return str(self._last_resource_version)

    def clear(self):
        """Forget every pod, snapshot, injected failure, recorded request and event."""
        with self._lock:
            self._pods = {}
            self._keys = []
            self._current = None
            self._snapshots.clear()
            self._rules = []
            self.requests = []
            self._forget_history()

    def _encode(self, pod, bump_resource_version):
        """Key, list-item bytes and resourceVersion of a pod dict; moves the counter."""
        metadata = dict(pod["metadata"])
        self._last_resource_version = next(self._resource_version)
        if bump_resource_version or "resourceVersion" not in metadata:
            metadata["resourceVersion"] = str(self._last_resource_version)
        item = {"metadata": metadata}
        item.update((k, v) for k, v in pod.items() if k not in ("apiVersion", "kind", "metadata"))
        key = (metadata.get("namespace", "default"), metadata["name"])
        return key, _compact(item), metadata["resourceVersion"]

    # -- leases -----------------------------------------------------------

    def lease(self, namespace, name):
        """The stored Lease (a copy), or None."""
        with self._lock:
            lease = self._leases.get((namespace, name))
            return None if lease is None else json.loads(json.dumps(lease))

    @property
    def open_lease_watches(self):
        """How many watches of leases are open now."""
        with self._lock:
            return self._open_lease_watches

    def fail_lease_writes(self, status):
        """Answer every Lease create and replace with ``status`` from now on (None: stop)."""
        with self._lock:
            self._lease_write_failure = status

    def _write_lease(self, namespace, name, lease, create):
        """Create or replace a Lease: (HTTP status, the stored Lease or a Status)."""
        with self._lock:
            if self._lease_write_failure is not None:
                code = self._lease_write_failure
                return code, status_object(code, _failure_message(code))
            existing = self._leases.get((namespace, name))
            qualified = f'leases.{LEASES_GROUP} "{name}"'
            details = {"name": name, "group": LEASES_GROUP, "kind": "leases"}
            if create and existing is not None:
                return 409, status_object(
                    409, f"{qualified} already exists", "AlreadyExists", details
                )
            if not create and existing is None:
                return 404, status_object(404, f"{qualified} not found", details=details)
            metadata = dict(lease.get("metadata") or {})
            if (
                not create
                and metadata.get("resourceVersion") != (existing["metadata"]["resourceVersion"])
            ):
                return 409, status_object(
                    409,
                    f"Operation cannot be fulfilled on {qualified}: the object has been "
                    "modified; please apply your changes to the latest version and try again",
                    "Conflict",
                    details,
                )
            self._last_resource_version = next(self._resource_version)
            metadata.update(
                name=name,
                namespace=namespace,
                resourceVersion=str(self._last_resource_version),
                uid=(existing or {}).get("metadata", {}).get("uid")
                or f"lease-{namespace}-{name}-{self._last_resource_version}",
            )
            metadata.setdefault(
                "creationTimestamp",
                (existing or {}).get("metadata", {}).get("creationTimestamp")
                or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            stored = {
                "kind": "Lease",
                "apiVersion": f"{LEASES_GROUP}/v1",
                "metadata": metadata,
                "spec": dict(lease.get("spec") or {}),
            }
            self._leases[(namespace, name)] = stored
            self._changed.notify_all()  # the watches of leases
            return (201 if create else 200), json.loads(json.dumps(stored))

    # -- watch events -----------------------------------------------------

    def set_watch_history(self, events):
        """Keep only the last ``events`` events for watches to replay."""
        with self._lock:
            self._history_limit = events
            self._trim_history()

    @property
    def open_watches(self):
        """How many watch streams are open now."""
        with self._lock:
            return self._open_watches

    def wait_open_watches(self, count, timeout=10):
        """Wait until exactly ``count`` watch streams are open; return whether they were."""
        with self._lock:
            return self._changed.wait_for(lambda: self._open_watches == count, timeout)

    def cut_watches(self):
        """Close every open watch stream at once, without its end; return how many."""
        with self._lock:
            self._cuts += 1
            self._changed.notify_all()
            return self._open_watches

    def _record_event(self, kind, namespace, data):
        """Remember an event at the current resourceVersion and wake the watches."""
        self._history.append((self._last_resource_version, kind, namespace, data))
        self._trim_history()
        self._changed.notify_all()

    def _record_deletion(self, key, data):
        """Move the counter and record a DELETED event: the last state, at the new RV."""
        self._last_resource_version = next(self._resource_version)
        item = json.loads(data)
        item["metadata"]["resourceVersion"] = str(self._last_resource_version)
        self._record_event("DELETED", key[0], _compact(item))

    def _trim_history(self):
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft()[0]

    def _forget_history(self):
        """Move the counter past a wholesale change: older watches expire."""
        self._last_resource_version = next(self._resource_version)
        self._history.clear()
        self._compacted = self._last_resource_version
        self._changed.notify_all()

    def _watch_step(self, position, cuts, wake_at, hung_up):
        """What a watch at ``position`` does next, waiting until ``wake_at`` for news.

        ("cut", None), ("expired", compacted RV), ("events", [(RV, type,
        namespace, bytes)]), or ("idle", RV it can bookmark) when it woke with
        nothing to send. ``hung_up()`` tells whether the client went away.
        """
        with self._lock:
            while True:
                if self._stopping.is_set() or cuts != self._cuts or hung_up():
                    return "cut", None
                if position < self._compacted:
                    return "expired", self._compacted
                if self._history and self._history[-1][0] > position:
                    start = bisect.bisect_right(self._history, position, key=lambda e: e[0])
                    return "events", list(itertools.islice(self._history, start, None))
                remaining = wake_at - time.monotonic()
                if remaining <= 0:
                    return "idle", max(position, self._last_resource_version)
                self._changed.wait(min(remaining, HANG_UP_CHECK_SECONDS))

    def _snapshot(self):
        """The current state as an immutable snapshot (built once per change)."""
        with self._lock:
            if self._current is None:
                keys = list(self._keys)
                self._current = _Snapshot(
                    ident=next(self._snapshot_ids),
                    resource_version=self._last_resource_version,
                    keys=keys,
                    items=[self._pods[k] for k in keys],
                )
            return self._current

    def _remember(self, snapshot):
        """Keep a snapshot for continue tokens, evicting the oldest."""
        with self._lock:
            self._snapshots[snapshot.ident] = snapshot
            self._snapshots.move_to_end(snapshot.ident)
            while len(self._snapshots) > SNAPSHOTS_KEPT:
                self._snapshots.popitem(last=False)

    def _recall(self, ident):
        """A remembered snapshot, or None when it expired."""
        with self._lock:
            return self._snapshots.get(ident)

    # -- failure injection ------------------------------------------------

    def fail(self, status, count=1, page=None, path_prefix=None, *, message=None, retry_after=None):
        """Answer the next ``count`` matching requests with a Status ``status``.

        ``page`` limits it to that 0-based page of a list; ``path_prefix`` to
        paths starting with it (give "/" to include discovery). ``retry_after``
        adds a Retry-After header (client-go then retries 429 and 5xx itself).
        """
        self._add(
            _Rule(
                "fail",
                count,
                status=status,
                page=page,
                path_prefix=path_prefix,
                message=message,
                retry_after=retry_after,
            )
        )

    def clear_rules(self):
        """Forget the failures still to inject."""
        with self._lock:
            self._rules = []

    def truncate(self, count=1, page=None):
        """Send the next ``count`` matching bodies half-way, then close the connection.

        The status line and Content-Length are those of the whole body.
        """
        self._add(_Rule("truncate", count, page=page))

    def hang(self, seconds, count=1, page=None):
        """Sleep ``seconds`` before answering the next ``count`` pod requests.

        ``page`` limits it to that 0-based page of a list.
        """
        self._add(_Rule("hang", count, page=page, seconds=seconds))

    def expire_continue(self, count=1):
        """Answer the next ``count`` requests carrying a continue token with 410."""
        self._add(_Rule("expire", count))

    def expire_watch(self, count=1, *, http=False, reason="Expired"):
        """Expire the next ``count`` watch requests, whatever their resourceVersion.

        The stream opens, sends one ERROR event (a Status of code 410) and ends,
        as the real server does; with ``http`` the request is answered with an
        HTTP 410 Status instead. ``reason`` is the Status's reason.
        """
        self._add(_Rule("expire_watch", count, status=410, http=http, reason=reason))

    def deny(self, verb, resource="pods", group=""):
        """Answer access reviews (``kubectl auth can-i``) of verb on resource: not allowed."""
        with self._lock:
            self._denied.add((verb, resource, group))

    def _review_access(self, attributes):
        """Whether a SelfSubjectAccessReview's resourceAttributes are allowed."""
        with self._lock:
            self.access_reviews.append(attributes)
            wanted = (
                attributes.get("verb"),
                attributes.get("resource"),
                attributes.get("group", ""),
            )
            return wanted not in self._denied

    def _add(self, rule):
        with self._lock:
            self._rules.append(rule)

    def _take(self, kind, path, request, is_pod_request):
        """Consume and return the first matching rule of this kind, or None."""
        with self._lock:
            for rule in self._rules:
                if rule.kind == kind and rule.matches(
                    path, request.page, request.has_continue, is_pod_request
                ):
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                    return rule
        return None

    def _record(self, method, path):
        with self._lock:
            self.requests.append((method, path))


def _protobuf_fields(data):
    """{field number: [values]} of one protobuf message: ints, or bytes if length-delimited."""
    fields = collections.defaultdict(list)
    position = 0

    def varint():
        nonlocal position
        value = shift = 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[number].append(varint())
        elif wire_type == 2:
            length = varint()
            fields[number].append(data[position : position + length])
            position += length
        else:
            raise ValueError(f"protobuf wire type {wire_type} is not used here")
    return fields


def _protobuf_resource_attributes(body):
    """spec.resourceAttributes of a SelfSubjectAccessReview in Kubernetes' protobuf envelope."""
    # runtime.Unknown {1 typeMeta, 2 raw}; the review {1 metadata, 2 spec};
    # its spec {1 resourceAttributes}; ResourceAttributes {1 namespace, 2 verb,
    # 3 group, 4 version, 5 resource, 6 subresource, 7 name}.
    raw = _protobuf_fields(body[len(PROTOBUF_MAGIC) :])[2][0]
    spec = _protobuf_fields(_protobuf_fields(raw)[2][0])
    attributes = _protobuf_fields(spec[1][0]) if spec.get(1) else {}
    names = ("namespace", "verb", "group", "version", "resource", "subresource", "name")
    return {
        name: attributes[number][0].decode()
        for number, name in enumerate(names, 1)
        if attributes.get(number)
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    api: FakeKubeAPI


def _encode_continue(snapshot, index, page, namespace):
    """An opaque continue token, shaped like the real server's base64 JSON."""
    token = {
        "v": "meta.k8s.io/v1",
        "rv": snapshot.resource_version,
        "start": "/".join(snapshot.keys[index]) + "\x00",
        "snap": snapshot.ident,
        "index": index,
        "page": page,
        "ns": namespace,
    }
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def _decode_continue(token):
    """The dict in a continue token, or None when it is not one of ours."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, UnicodeError):
        return None
    if not isinstance(value, dict) or not {"snap", "index", "page"} <= value.keys():
        return None
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeKubeAPI"
    sys_version = ""
    server: _Server
    _truncating = False

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        """Stay quiet: tests read FakeKubeAPI.requests instead."""

    # -- dispatch ---------------------------------------------------------

    def do_GET(self):
        api = self.server.api
        api._record("GET", self.path)
        self._truncating = False
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        request = _Request()
        pod_request = self._pod_route(parts)
        if pod_request is not None:
            request.has_continue = bool(query.get("continue"))
            request.watch = pod_request[0] == "list" and query.get("watch") in ("1", "true")
            if pod_request[0] == "list" and not request.watch:
                request.page = self._page_of(query)
        if self._inject(url.path, request, pod_request is not None):
            return
        lease = self._lease_route(parts)
        if lease is not None and lease[1] is not None:
            self._get_lease(*lease)
        elif lease is not None and query.get("watch") in ("1", "true"):
            self._watch_lease(lease[0], query)
        elif pod_request is None and len(parts) == 4 and parts[:3] == ["api", "v1", "namespaces"]:
            self._namespace(parts[3])
        elif pod_request is None:
            self._discovery(url.path)
        elif request.watch:
            self._watch(pod_request[1], query)
        elif pod_request[0] == "list":
            self._list(pod_request[1], query, request)
        else:
            self._get(*pod_request[1:])

    def _other(self):
        self.server.api._record(self.command, self.path)
        body = self._drain()
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        lease = self._lease_route(parts)
        if lease is not None and (self.command, lease[1] is None) in (
            ("POST", True),
            ("PUT", False),
        ):
            self._put_lease(lease[0], lease[1], body)
            return
        self._send_status(
            405, f"the server does not allow this method on the requested resource ({self.command})"
        )

    do_PUT = do_PATCH = do_DELETE = _other

    def do_POST(self):
        if urlsplit(self.path).path != ACCESS_REVIEWS_PATH:
            self._other()
            return
        self.server.api._record("POST", self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if body.startswith(PROTOBUF_MAGIC):  # what kubectl sends for built-in types
            attributes = _protobuf_resource_attributes(body)
        else:
            attributes = (json.loads(body).get("spec") or {}).get("resourceAttributes") or {}
        allowed = self.server.api._review_access(attributes)
        status = {"allowed": allowed}
        if not allowed:
            status["reason"] = "denied by the test"
        # JSON, which kubectl accepts too (its Accept lists both).
        review = {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {},
            "spec": {"resourceAttributes": attributes},
            "status": status,
        }
        self._send_json(201, review)

    @staticmethod
    def _lease_route(parts):
        """(namespace, name or None) for a Lease path, else None."""
        if (
            len(parts) in (6, 7)
            and parts[:4] == ["apis", LEASES_GROUP, "v1", "namespaces"]
            and parts[5] == "leases"
        ):
            return parts[4], parts[6] if len(parts) == 7 else None
        return None

    def _get_lease(self, namespace, name):
        lease = self.server.api.lease(namespace, name)
        if lease is None:
            self._send_status(
                404,
                f'leases.{LEASES_GROUP} "{name}" not found',
                details={"name": name, "group": LEASES_GROUP, "kind": "leases"},
            )
            return
        self._send_json(200, lease)

    def _watch_lease(self, namespace, query):
        """Stream the Lease named by fieldSelector=metadata.name=NAME as it is written.

        Each write is an event (ADDED or MODIFIED) with the Lease as stored; a
        Lease newer than ``resourceVersion`` is sent at once. Ends at
        ``timeoutSeconds``; no history, no bookmarks.
        """
        api = self.server.api
        match = re.fullmatch(r"metadata\.name==?([^,]+)", query.get("fieldSelector", ""))
        if match is None:
            self._send_status(400, "a watch of leases needs fieldSelector=metadata.name=NAME")
            return
        name = match.group(1)
        try:
            seen = int(query.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        except ValueError:
            self._send_status(400, f"invalid watch parameters: {self.path}")
            return
        with api._lock:
            api._open_lease_watches += 1
            api._changed.notify_all()
        try:
            self._start_chunked()
            while True:
                with api._lock:
                    while True:
                        lease = api._leases.get((namespace, name))
                        version = int(lease["metadata"]["resourceVersion"]) if lease else 0
                        remaining = deadline - time.monotonic()
                        if version > seen or remaining <= 0 or api._stopping.is_set():
                            break
                        if self._hung_up():
                            return
                        api._changed.wait(min(remaining, HANG_UP_CHECK_SECONDS))
                    lease = json.loads(json.dumps(lease)) if version > seen else None
                if lease is None:
                    break
                kind = "ADDED" if seen == 0 else "MODIFIED"
                seen = version
                self._write_chunk(_compact({"type": kind, "object": lease}) + b"\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with api._lock:
                api._open_lease_watches -= 1
                api._changed.notify_all()

    def _put_lease(self, namespace, name, body):
        try:
            lease = json.loads(body)
            if not isinstance(lease, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self._send_status(400, f"the body of the request is not a Lease: {exc}")
            return
        create = name is None
        if create:
            name = (lease.get("metadata") or {}).get("name")
            if not name:
                self._send_status(
                    422, "Lease.coordination.k8s.io is invalid: metadata.name: Required value"
                )
                return
        code, answer = self.server.api._write_lease(namespace, name, lease, create)
        self._send_json(code, answer)

    def _drain(self):
        """Read the request's body (kubectl's --raw -f sends it chunked); return it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(body)
                body.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _pod_route(parts):
        """("list", ns|None), ("get", ns, name) or None for a non-pod path."""
        if parts == ["api", "v1", "pods"]:
            return ("list", None)
        if len(parts) in (5, 6) and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            if len(parts) == 5:
                return ("list", parts[3])
            return ("get", parts[3], parts[5])
        return None

    @staticmethod
    def _page_of(query):
        """The 0-based page index a list request asks for (None if its token is bad)."""
        if not query.get("continue"):
            return 0
        token = _decode_continue(query["continue"])
        return None if token is None else token["page"]

    def _inject(self, path, request, is_pod_request):
        """Apply injected failures; return True when the request was answered."""
        api = self.server.api
        rule = api._take("hang", path, request, is_pod_request)
        if rule is not None:
            api._stopping.wait(rule.seconds)
        rule = api._take("expire", path, request, is_pod_request)
        if rule is not None:
            self._send_status(410, EXPIRED_MESSAGE)
            return True
        rule = api._take("fail", path, request, is_pod_request)
        if rule is not None:
            headers = {}
            if rule.retry_after is not None:
                headers["Retry-After"] = str(rule.retry_after)
            message = rule.message or _failure_message(rule.status)
            self._send_status(rule.status, message, headers=headers)
            return True
        if not request.watch:
            self._truncating = api._take("truncate", path, request, is_pod_request) is not None
        return False

    # -- answers ----------------------------------------------------------

    def _discovery(self, path):
        if path == "/version":
            self._send_json(200, self.server.api.server_version)
        elif path == "/api":
            self._send_json(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {
                            "clientCIDR": "0.0.0.0/0",
                            "serverAddress": f"{self.server.api.host}:{self.server.api.port}",
                        }
                    ],
                },
            )
        elif path == "/apis":
            version = {"groupVersion": f"{LEASES_GROUP}/v1", "version": "v1"}
            group = {"name": LEASES_GROUP, "versions": [version], "preferredVersion": version}
            self._send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})
        elif path == f"/apis/{LEASES_GROUP}/v1":
            self._send_json(200, LEASE_RESOURCES)
        elif path == "/api/v1":
            self._send_json(200, POD_RESOURCES)
        else:
            self._send_status(404, "the server could not find the requested resource")

    def _namespace(self, namespace):
        """A Namespace exists when it is a built-in one or holds a pod."""
        api = self.server.api
        with api._lock:
            index = bisect.bisect_left(api._keys, (namespace,))
            holds_pods = index < len(api._keys) and api._keys[index][0] == namespace
        if not holds_pods and namespace not in BUILTIN_NAMESPACES:
            self._send_status(
                404,
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )
            return
        self._send_json(
            200,
            {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": namespace,
                    "uid": api.cluster_uid
                    if namespace == "kube-system"
                    else f"00000000-0000-4000-8000-{zlib.crc32(namespace.encode()):012x}",
                    "labels": {"kubernetes.io/metadata.name": namespace},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            },
        )

    def _get(self, namespace, name):
        api = self.server.api
        with api._lock:
            data = api._pods.get((namespace, name))
        if data is None:
            self._send_status(
                404, f'pods "{name}" not found', details={"name": name, "kind": "pods"}
            )
            return
        # The stored item starts with '{"metadata":'; put apiVersion/kind in front.
        self._send_bytes(200, b'{"kind":"Pod","apiVersion":"v1",' + data[1:])

    def _list(self, namespace, query, request):
        api = self.server.api
        try:
            limit = max(0, int(query.get("limit") or 0))
        except ValueError:
            limit = 0
        if request.has_continue:
            token = _decode_continue(query["continue"])
            snapshot = None if token is None else api._recall(token["snap"])
            if snapshot is None:
                self._send_status(410, EXPIRED_MESSAGE)
                return
            start, page = token["index"], token["page"]
        else:
            snapshot = api._snapshot()
            start, page = None, 0
        low, high = 0, len(snapshot.keys)
        if namespace is not None:
            low = bisect.bisect_left(snapshot.keys, (namespace,))
            high = bisect.bisect_left(snapshot.keys, (namespace + "\x00",))
        if start is not None:
            low = max(low, start)
        label_selector = query.get("labelSelector", "")
        field_selector = query.get("fieldSelector", "")
        items = snapshot.items
        try:
            selecting = bool(
                parse_label_selector(label_selector) or parse_field_selector(field_selector)
            )
        except SelectorError as exc:
            self._send_status(400, str(exc))
            return
        if selecting:
            # Like etcd's list: walk the snapshot until `limit` pods match;
            # a continue token whenever keys remain, matching or not.
            chosen, end = [], low
            while end < high and not (limit and len(chosen) >= limit):
                if matches(json.loads(items[end]), label_selector, field_selector):
                    chosen.append(items[end])
                end += 1
            items, low, stop = chosen, 0, len(chosen)
        else:
            end = stop = min(high, low + limit) if limit else high
        metadata = {"resourceVersion": str(snapshot.resource_version)}
        if end < high:
            api._remember(snapshot)
            metadata["continue"] = _encode_continue(snapshot, end, page + 1, namespace)
            if not selecting:  # the real server leaves it out for selectors
                metadata["remainingItemCount"] = high - end
        head = (
            b'{"kind":"PodList","apiVersion":"v1","metadata":' + _compact(metadata) + b',"items":['
        )
        tail = b"]}\n"
        length = len(head) + len(tail) + max(0, stop - low - 1)
        for i in range(low, stop):
            length += len(items[i])
        pieces = self._list_pieces(head, items, low, stop, tail)
        self._send_stream(200, length, pieces)

    @staticmethod
    def _list_pieces(head, items, low, end, tail):
        yield head
        for chunk_start in range(low, end, WRITE_CHUNK_ITEMS):
            chunk = b",".join(items[chunk_start : min(end, chunk_start + WRITE_CHUNK_ITEMS)])
            yield (b"," + chunk) if chunk_start > low else chunk
        yield tail

    def _watch(self, namespace, query):
        """Stream watch events until timeoutSeconds, an expiry, a cut or the server's stop."""
        api = self.server.api
        version = query.get("resourceVersion") or "0"
        try:
            timeout = float(query.get("timeoutSeconds") or WATCH_TIMEOUT_SECONDS)
            position = int(version)
        except ValueError:
            self._send_status(400, f"invalid watch parameters: {self.path}")
            return
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        rule = api._take("expire_watch", "", _Request(), True)
        if rule is not None and rule.http:
            self._send_json(
                410,
                status_object(410, _too_old(position, api.resource_version), reason=rule.reason),
            )
            return
        deadline = time.monotonic() + timeout
        with api._lock:
            cuts = api._cuts
            api._open_watches += 1
            api.watch_starts += 1
            api._changed.notify_all()
        try:
            self._start_chunked()
            if api.close_watches_at_once:
                pass
            elif rule is not None:
                self._send_error_event(position, api.resource_version, rule.reason)
            elif not self._stream_events(
                namespace, position, version == "0", cuts, deadline, bookmarks, _selection(query)
            ):
                self.close_connection = True  # cut: no last chunk, as a dropped connection
                return
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with api._lock:
                api._open_watches -= 1
                api._changed.notify_all()

    def _stream_events(
        self, namespace, position, initial, cuts, deadline, bookmarks, selection=None
    ):
        """Write events as they happen; False when cut, True at timeoutSeconds or expiry.

        With a selection (labelSelector, fieldSelector), only the events whose
        object it selects (the real server also turns a MODIFIED that leaves
        the selection into a DELETED; this one leaves such events out).
        """
        api = self.server.api

        def wanted(ns, data):
            return namespace in (None, ns) and (
                selection is None or matches(json.loads(data), *selection)
            )

        if initial:
            snapshot = api._snapshot()
            position = snapshot.resource_version
            self._write_events(
                ("ADDED", data)
                for key, data in zip(snapshot.keys, snapshot.items, strict=True)
                if wanted(key[0], data)
            )
        next_bookmark = time.monotonic() + api.bookmark_seconds
        while True:
            wake_at = min(deadline, next_bookmark) if bookmarks else deadline
            step, value = api._watch_step(position, cuts, wake_at, self._hung_up)
            if step == "cut":
                return False
            if step == "expired":
                self._send_error_event(position, value)
                return True
            if step == "events":
                position = value[-1][0]
                self._write_events((kind, data) for _, kind, ns, data in value if wanted(ns, data))
                continue
            position = value
            now = time.monotonic()
            if now >= deadline:
                return True
            if bookmarks and now >= next_bookmark:
                self._write_bookmark(position)
                next_bookmark = now + api.bookmark_seconds

    def _hung_up(self):
        """Whether the client closed the connection (a watch's client sends nothing more)."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _write_events(self, events):
        """Write (type, list-item bytes) events as lines of one chunk."""
        typed = self.server.api.typed_watch_objects
        lines = []
        for kind, data in events:
            if typed:  # the item starts with '{"metadata":'; the real server puts these first
                data = b'{"kind":"Pod","apiVersion":"v1",' + data[1:]
            lines.append(b'{"type":"' + kind.encode() + b'","object":' + data + b"}\n")
        if lines:
            self._write_chunk(b"".join(lines))

    def _write_bookmark(self, position):
        # What the real server sends: a Pod that is empty but for its resourceVersion.
        bookmark = {
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(position), "creationTimestamp": None},
                "spec": {"containers": None},
                "status": {},
            },
        }
        self._write_chunk(_compact(bookmark) + b"\n")

    def _send_error_event(self, position, compacted, reason="Expired"):
        status = status_object(410, _too_old(position, compacted), reason=reason)
        self._write_chunk(_compact({"type": "ERROR", "object": status}) + b"\n")

    # -- writing ----------------------------------------------------------

    def _start_chunked(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _send_status(self, code, message, *, details=None, headers=None):
        self._send_json(code, status_object(code, message, details=details), headers=headers)

    def _send_json(self, code, obj, headers=None):
        self._send_bytes(code, _compact(obj) + b"\n", headers=headers)

    def _send_bytes(self, code, body, headers=None):
        self._send_stream(code, len(body), [body], headers=headers)

    def _send_stream(self, code, length, pieces, headers=None):
        """Send a body of known length piece by piece, or cut it if truncating."""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        budget = length // 2 if self._truncating else length
        try:
            for piece in pieces:
                if len(piece) >= budget:
                    self.wfile.write(piece[:budget])
                    break
                self.wfile.write(piece)
                budget -= len(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if self._truncating:
            self._truncating = False
            self.close_connection = True


def _too_old(position, compacted):
    """The real server's message for a watch from a compacted resourceVersion."""
    return f"too old resource version: {position} ({compacted})"


def _failure_message(code):
    """The message the real server would give for a status it made up."""
    if code == 500:
        return "Internal error occurred: injected failure"
    if code == 429:
        return "Too many requests, please try again later."
    if code == 503:
        return "the server is currently unable to handle the request"
    if code == 504:
        return (
            "the server was unable to return a response in the time allotted, "
            "but may still be processing the request"
        )
    return f"injected failure ({code})"
