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
"""

import json
import subprocess
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
    keys = [f'{p["metadata"]["namespace"]}/{p["metadata"]["name"]}' for p in listed["items"]]
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


@pytest.mark.parametrize("options", [
    {}, {"healthy": False}, {"init_container": True}, {"phase": "Succeeded"}, {"phase": "Pending"},
])
def test_get_pod_prints_the_stored_object(kubeapi, kubeconfig, kubectl_path, options):
    kubeapi.put_pod(make_pod("shop", "web-7c79c4bf97-x2kq9", **options))
    result = kubectl(kubectl_path, "get", "pod", "web-7c79c4bf97-x2kq9", "-n", "shop", "-o", "json")
    assert result.returncode == 0, result.stderr
    expected = without_managed_fields(kubeapi.get_pod("shop", "web-7c79c4bf97-x2kq9"))
    assert result.stdout == json.dumps(expected, indent=4, sort_keys=True, ensure_ascii=False) + "\n"


def test_get_pod_escapes_like_go(kubeapi, kubeconfig, kubectl_path):
    pod = make_pod("shop", "web-7c79c4bf97-x2kq9")
    pod["metadata"]["annotations"]["note"] = "a<b>&c é \u2028 😀"
    kubeapi.put_pod(pod)
    result = kubectl(kubectl_path, "get", "pod", "web-7c79c4bf97-x2kq9", "-n", "shop", "-o", "json")
    assert '"note": "a\\u003cb\\u003e\\u0026c é \\u2028 😀",' in result.stdout
    assert json.loads(result.stdout)["metadata"]["annotations"]["note"] == "a<b>&c é \u2028 😀"


@pytest.mark.parametrize("namespace, message", [
    ("default", 'pods "nope" not found'),
    ("nowhere", 'namespaces "nowhere" not found'),  # kubectl then asks for the namespace
])
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
            seen.append(f'{item["metadata"]["namespace"]}/{item["metadata"]["name"]}')
        token = page["metadata"].get("continue")
        if not token:
            assert "remainingItemCount" not in page["metadata"]
            break
        assert page["metadata"]["remainingItemCount"] == 5 - len(seen)
        path = "/api/v1/pods?limit=2&continue=" + urllib.parse.quote(token)
    assert seen == five_pods


def test_error_on_a_later_page_prints_the_earlier_pages(kubeapi, kubeconfig, kubectl_path, five_pods):
    kubeapi.fail(500, page=1)
    result = kubectl(kubectl_path, "get", "pods", "-A", "-o", "json", "--chunk-size=2")
    assert result.returncode == 1
    assert result.stderr == "Error from server (InternalError): Internal error occurred: injected failure\n"
    partial = json.loads(result.stdout)
    assert [p["metadata"]["name"] for p in partial["items"]] == [k.split("/")[1] for k in five_pods[:2]]


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
    assert "unexpected error when reading response body. Please retry. Original error: unexpected EOF" in result.stderr


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


# -- the server on its own ------------------------------------------------------


def test_unknown_continue_token_is_expired(kubeapi):
    status, body = fetch(kubeapi, "/api/v1/pods?limit=1&continue=bm90LWEtdG9rZW4")
    assert status == 410
    assert body == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": EXPIRED_MESSAGE, "reason": "Expired", "code": 410,
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
    names = [f'{p["metadata"]["namespace"]}/{p["metadata"]["name"]}' for p in first["items"] + rest["items"]]
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
        with pytest.raises(Exception):  # http.client.IncompleteRead
            response.read()
    assert length > 5 * 5000


def test_generated_items_match_generated_pods():
    from test.pods import generate_items

    for pod, (namespace, name, data) in zip(generate(20, unhealthy_every=3), generate_items(20, unhealthy_every=3)):
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


@pytest.mark.parametrize("selector, expected", [
    ("app=web", ["prod/cache", "prod/web", "staging/web"]),
    ("app==web,tier!=cache", ["prod/web", "staging/web"]),
    ("env in (prod,staging)", ["prod/cache", "prod/web", "staging/web"]),
    ("env notin (prod, staging)", ["dev/api", "kube-system/dns"]),
    ("canary", ["staging/web"]),
    ("!canary,app", ["dev/api", "prod/cache", "prod/web"]),
    ("replicas>2", ["dev/api"]),
    ("replicas<3", []),
    ("app=nothing", []),
])
def test_kubectl_label_selector(kubeapi, kubeconfig, kubectl_path, labelled_pods, selector,
                                expected):
    result = kubectl(kubectl_path, "get", "pods", "-A", "-l", selector, "-o", "json",
                     "--chunk-size=1")
    assert result.returncode == 0, result.stderr
    keys = [f'{p["metadata"]["namespace"]}/{p["metadata"]["name"]}'
            for p in json.loads(result.stdout)["items"]]
    assert keys == expected
    assert any("labelSelector=" in path for _, path in kubeapi.requests)


@pytest.mark.parametrize("selector, expected", [
    ("metadata.namespace!=prod,metadata.namespace!=kube-system", ["dev/api", "staging/web"]),
    ("metadata.namespace=prod", ["prod/cache", "prod/web"]),
    ("metadata.namespace==dev", ["dev/api"]),
    ("metadata.name=web,metadata.namespace!=prod", ["staging/web"]),
])
def test_kubectl_field_selector(kubeapi, kubeconfig, kubectl_path, labelled_pods, selector,
                                expected):
    result = kubectl(kubectl_path, "get", "pods", "-A", "--field-selector", selector,
                     "-o", "json", "--chunk-size=2")
    assert result.returncode == 0, result.stderr
    keys = [f'{p["metadata"]["namespace"]}/{p["metadata"]["name"]}'
            for p in json.loads(result.stdout)["items"]]
    assert keys == expected


def test_selected_pages_are_short_and_consistent(kubeapi, labelled_pods):
    query = "labelSelector=" + urllib.parse.quote("app=web") + \
        "&fieldSelector=" + urllib.parse.quote("metadata.namespace!=staging")
    status, first = fetch(kubeapi, f"/api/v1/pods?limit=1&{query}")
    # dev/api does not match: the first page walks past it to prod/cache
    assert status == 200 and [p["metadata"]["name"] for p in first["items"]] == ["cache"]
    assert "remainingItemCount" not in first["metadata"]
    kubeapi.delete_pod("prod", "web")
    kubeapi.put_pod(labelled("prod", "late", app="web"))
    seen, token = [], first["metadata"]["continue"]
    while token:
        _, page = fetch(kubeapi, f"/api/v1/pods?limit=1&{query}&continue="
                        + urllib.parse.quote(token))
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        seen += [f'{p["metadata"]["namespace"]}/{p["metadata"]["name"]}' for p in page["items"]]
        token = page["metadata"].get("continue")
    # the snapshot of the first page: prod/web still there, prod/late not yet;
    # the last page (staging/web does not match) is empty
    assert seen == ["prod/web"]
    assert page["items"] == []


@pytest.mark.parametrize("query, message", [
    ("labelSelector=" + urllib.parse.quote("app in (web"), "unable to parse requirement"),
    ("labelSelector=" + urllib.parse.quote("replicas>many"), "must be an integer"),
    ("fieldSelector=" + urllib.parse.quote("spec.secret=x"), "field label not supported"),
    ("fieldSelector=" + urllib.parse.quote("metadata.namespace"), "invalid selector"),
])
def test_bad_selector_is_a_bad_request(kubeapi, labelled_pods, query, message):
    status, body = fetch(kubeapi, f"/api/v1/pods?{query}")
    assert (status, body["reason"]) == (400, "BadRequest")
    assert message in body["message"]


@pytest.mark.parametrize("labels, label_selector, field_selector, selected", [
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
])
def test_matches(labels, label_selector, field_selector, selected):
    pod = {"metadata": {"namespace": "ns", "name": "p", "labels": labels}}
    assert kubeapi_module.matches(pod, label_selector, field_selector) is selected
