"""`k8svent.py check`: what a first run needs, one line each, run as a process."""

import json
import re
import socket
import time

import pytest

import k8svent
from test.service import Service, service_env

SECRET = "a-secret-of-our-own"


def check(args, env, workdir):
    """Run `k8svent.py check ARGS`: (exit status, its lines on stdout, stderr)."""
    service = Service(["check", *args], env, workdir)
    status = service.wait(60)
    return status, service.stdout().splitlines(), service.log()


def test_all_is_well(kubeapi, kubeconfig, kubectl_path, receivers, tmp_path):
    receiver = receivers(secret=SECRET)
    state = tmp_path / "state.db"
    status, lines, err = check(
        [
            f"--kubectl={kubectl_path}",
            f"--url={receiver.url}",
            f"--secret={SECRET}",
            f"--state={state}",
        ],
        service_env(kubeconfig),
        tmp_path,
    )
    assert (status, err) == (0, ""), lines
    assert [line.split(":")[0] for line in lines] == [
        "ok   kubectl",
        "ok   cluster",
        "ok   permission list pods",
        "ok   permission watch pods",
        "ok   webhook http",
        "ok   state",
        "ok   secret",
        "all is well",
    ]
    assert re.fullmatch(r"ok   kubectl: v1\.\d+\.\d+ \(.*kubectl\)", lines[0])
    assert lines[1] == f"ok   cluster: {kubeapi.url} answers, Kubernetes v1.37.0"
    assert lines[2] == "ok   permission list pods: may list pods in all namespaces"
    assert re.fullmatch(
        rf"ok   webhook http://127\.0\.0\.1:{receiver.port}: answered a signed ping "
        r"with HTTP 200 in \d+\.\d\d s",
        lines[4],
    )
    assert lines[5] == f"ok   state: {state} does not exist yet and can be created"
    assert not state.exists()  # a check writes nothing
    assert lines[6] == f"ok   secret: set ({len(SECRET)} characters)"
    # One request, signed like every delivery (the receiver checks), and not a pod.
    (ping,) = receiver.received
    assert json.loads(ping.body) == {"ping": {"version": k8svent.version()}}
    assert ping.headers["webhook-id"].startswith("msg_")
    assert [(r["verb"], r["resource"], r.get("namespace", "")) for r in kubeapi.access_reviews] == [
        ("list", "pods", ""),
        ("watch", "pods", ""),
    ]
    assert kubeapi.pod_keys() == [] and not any("/pods" in p for _, p in kubeapi.requests)


def test_each_problem_is_one_line_and_exit_1(
    kubeapi, kubeconfig, kubectl_path, receivers, tmp_path
):
    kubeapi.deny("watch")
    refusing = receivers([500])
    status, lines, err = check(
        [
            f"--kubectl={kubectl_path}",
            f"--url={refusing.url}?token=SEKRET",
            "--url=http://127.0.0.1:1/",
            f"--state={tmp_path / 'missing' / 'state.db'}",
            "--namespace=shop",
        ],
        service_env(kubeconfig),
        tmp_path,
    )
    assert status == 1 and err == ""
    assert lines[:2] == [line for line in lines[:2] if line.startswith("ok   ")]
    assert lines[2:] == [
        "ok   permission list pods: may list pods in namespace shop",
        "FAIL permission watch pods: may not watch pods in namespace shop (see deploy.yaml's "
        "ClusterRole)",
        f"FAIL webhook http://127.0.0.1:{refusing.port}: answered an unsigned ping (no secret) "
        "with HTTP 500; a receiver must answer 2xx (docs/receiving.md, The ping)",
        "FAIL webhook http://127.0.0.1:1: an unsigned ping (no secret) failed (connection refused)",
        f"FAIL state: cannot create {tmp_path / 'missing' / 'state.db'}: its folder does not "
        "exist or is not writable",
        "FAIL secret: none: deliveries would be unsigned (give --secret-file or "
        "K8SVENT_WEBHOOK_SECRET)",
        "5 checks failed",
    ]
    assert "SEKRET" not in "\n".join(lines)
    assert [r.get("namespace") for r in kubeapi.access_reviews] == ["shop", "shop"]


def test_without_kubectl_or_cluster(receivers, tmp_path):
    status, lines, _ = check(
        [
            f"--kubectl={tmp_path / 'no-kubectl'}",
            f"--url={receivers(secret='s').url}",
            "--secret=s",
        ],
        service_env(tmp_path / "kubeconfig"),
        tmp_path,
    )
    assert status == 1
    assert lines[0].startswith("FAIL kubectl: kubectl not found: ")
    assert lines[0].endswith("(get one: README.md, Quick start)")
    assert lines[1:4] == [
        "skip cluster: not checked without kubectl",
        "skip permission list pods: not checked without the cluster",
        "skip permission watch pods: not checked without the cluster",
    ]
    assert lines[-1] == "1 check failed, 3 skipped"


def test_no_cluster_configured(kubectl_path, receivers, tmp_path):
    env = service_env(tmp_path / "nowhere", {"HOME": str(tmp_path)})
    env.pop("KUBERNETES_SERVICE_HOST", None)
    status, lines, _ = check(
        [f"--kubectl={kubectl_path}", f"--url={receivers(secret='s').url}", "--secret=s"],
        env,
        tmp_path,
    )
    assert status == 1
    assert lines[1].startswith("FAIL cluster: ")
    assert "check KUBECONFIG or ~/.kube/config, --context" in lines[1]


def test_a_kubectl_outside_the_skew_is_a_warning(kubeapi, kubeconfig, kubectl_path, tmp_path):
    kubeapi.server_version = {"major": "1", "minor": "30", "gitVersion": "v1.30.4"}
    status, lines, _ = check(
        [f"--kubectl={kubectl_path}", "--dry-run", "--secret=s"], service_env(kubeconfig), tmp_path
    )
    assert lines[1].startswith(f"warn cluster: {kubeapi.url} answers, Kubernetes v1.30.4; kubectl ")
    assert "outside the skew Kubernetes supports" in lines[1]
    assert lines[2].startswith("ok   permission list pods")
    assert "FAIL webhooks: none given (--url or K8SVENT_WEBHOOKS)" in lines
    assert lines[-1] == "1 check failed"
    assert status == 1


@pytest.mark.parametrize(
    "argv, needed",
    [
        ([], [("list", "pods", None), ("watch", "pods", None)]),
        (["--mode=poll"], [("list", "pods", None)]),
        (["-n", "shop"], [("list", "pods", "shop"), ("watch", "pods", "shop")]),
        (
            ["--mode=poll", "--lease=ops/k8svent"],
            [
                ("list", "pods", None),
                ("get", "leases.coordination.k8s.io/k8svent", "ops"),
                ("update", "leases.coordination.k8s.io/k8svent", "ops"),
                ("watch", "leases.coordination.k8s.io/k8svent", "ops"),
                ("create", "leases.coordination.k8s.io", "ops"),
            ],
        ),
        (
            ["--mode=poll", "--lease=k8svent"],  # the Lease in the pod's own namespace
            [
                ("list", "pods", None),
                ("get", "leases.coordination.k8s.io/k8svent", "mine"),
                ("update", "leases.coordination.k8s.io/k8svent", "mine"),
                ("watch", "leases.coordination.k8s.io/k8svent", "mine"),
                ("create", "leases.coordination.k8s.io", "mine"),
            ],
        ),
    ],
)
def test_required_permissions(argv, needed):
    settings = k8svent.settings_from(
        k8svent.parse_arguments(["check", "-u", "http://a", *argv]), {}
    )
    assert settings.check and k8svent.required_permissions(settings, "mine") == needed


@pytest.mark.parametrize(
    "client, server, fine",
    [
        ("37", "37", True),
        ("37", "36", True),
        ("36", "37", True),
        ("37", "35", False),
        ("30", "37", False),
        ("37+", "36", True),  # managed clusters add a +
        ("", "37", True),  # a kubectl built from source: nothing to say
    ],
)
def test_kubectl_skew(client, server, fine):
    found = k8svent.kubectl_skew(
        {"major": "1", "minor": client, "gitVersion": f"v1.{client}.0"},
        {"major": "1", "minor": server, "gitVersion": f"v1.{server}.0"},
    )
    assert (found is None) == fine, found


def test_ctrl_c_while_a_webhook_keeps_check_waiting_is_quiet(
    kubeapi, kubeconfig, kubectl_path, tmp_path
):
    silent = socket.socket()  # takes the connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    service = Service(
        [
            "check",
            f"--kubectl={kubectl_path}",
            f"--url=http://127.0.0.1:{silent.getsockname()[1]}/",
        ],
        service_env(kubeconfig),
        tmp_path,
        new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "permission watch pods" not in service.stdout():
            assert time.monotonic() < deadline and service.proc.poll() is None, service.log()
            time.sleep(0.05)
        assert service.interrupt() == 130
        assert service.log() == ""
    finally:
        service.kill()
        silent.close()
