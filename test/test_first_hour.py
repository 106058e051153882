"""The first hour of a newcomer and an operator (issue 24): k8svent run as a process."""

import http.server
import json
import re
import secrets
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

import k8svent
from test.pods import make_pod
from test.service import Service, service_env


def run(args, env, workdir, timeout=30):
    """Run k8svent to its end: (exit status, stderr, stdout)."""
    service = Service(args, env, workdir)
    status = service.wait(timeout)
    return status, service.log(), service.stdout()


def test_a_host_with_a_space_is_refused_at_start(tmp_path):
    status, err, _ = run(
        ["--url=http://user:hunter2@exa mple.com/x?token=SEKRET", "--once"],
        service_env(tmp_path / "no-kubeconfig"),
        tmp_path,
    )
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("k8svent: error: invalid webhook URL")
    assert "http://***@exa mple.com:80" in err
    assert "hunter2" not in err and "user" not in err and "SEKRET" not in err


def test_ctrl_c_in_watch_mode_stops_quietly(kubeapi, kubeconfig, kubectl_path, receivers, tmp_path):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers()
    service = Service(
        [f"--kubectl={kubectl_path}", f"--url={receiver.url}", "--mode=watch"],
        service_env(kubeconfig),
        tmp_path,
        new_session=True,
    )
    receiver.wait_for(1)
    kubeapi.wait_open_watches(1)
    assert service.interrupt() == 0
    log = service.log()
    assert "received SIGINT; stopping" in log and log.rstrip().endswith("stopped")
    assert " ERROR " not in log and "Traceback" not in log, log


def test_ctrl_c_while_the_modules_load_ends_quietly(tmp_path):
    # A module that k8svent imports stalls as a loaded host does, and says when it has begun.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "docopt.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path(os.environ['LOADING_MARK']).touch()\n"
        "time.sleep(60)\n"
    )
    mark = tmp_path / "loading"
    env = service_env(
        tmp_path / "no-kubeconfig", {"PYTHONPATH": str(shim), "LOADING_MARK": str(mark)}
    )
    service = Service(["--url=http://127.0.0.1:1/", "--once"], env, tmp_path, new_session=True)
    deadline = time.monotonic() + 30
    while not mark.exists():
        assert time.monotonic() < deadline, "k8svent never reached its imports"
        time.sleep(0.01)
    status = service.interrupt()
    assert status in (-2, 130)
    assert service.log() == ""


def test_the_start_line_says_what_is_selected_and_the_list_is_a_list(
    kubeapi, kubeconfig, kubectl_path, tmp_path
):
    pod = make_pod("default", "web")
    pod["metadata"]["labels"] = {"app": "web"}
    kubeapi.put_pod(pod)
    service = Service(
        [
            f"--kubectl={kubectl_path}",
            "--dry-run",
            "--exclude-namespace=kube-system",
            "--selector=app=web",
        ],
        service_env(kubeconfig),
        tmp_path,
    )
    service.wait_log(r"\blist: 1 pods seen")
    assert service.stop() == 0
    log = service.log()
    assert "starting (watch mode): pods of all namespaces but kube-system labelled app=web;" in log
    assert "all namespaces," not in log and "poll" not in log


@pytest.mark.parametrize("state", [False, True])
def test_stopping_with_deliveries_owed_says_how_many_and_their_fate(
    kubeapi, kubeconfig, kubectl_path, receivers, tmp_path, state
):
    for i in range(10):
        kubeapi.put_pod(make_pod("default", f"web-{i}"))
    down = receivers([503] * 10000)
    state_args = [f"--state={tmp_path / 'state.db'}"] if state else []
    service = Service(
        [f"--kubectl={kubectl_path}", f"--url={down.url}?token=SEKRET", *state_args],
        service_env(kubeconfig),
        tmp_path,
    )
    service.wait_log(r"webhook http://127\.0\.0\.1:\d+ is down")
    assert service.stop() == 0
    log = service.log()
    owed = re.search(r"WARNING stopping with deliveries still owed \((.*?)\); (.*)", log)
    assert owed, log
    assert owed.group(1) == f"10 to http://127.0.0.1:{down.port}"
    if state:
        assert owed.group(2) == f"state file {tmp_path / 'state.db'} keeps them"
    else:
        assert owed.group(2).startswith("they are lost: without --state")
    assert "SEKRET" not in log


def test_no_kubeconfig_says_what_to_check(kubectl_path, tmp_path):
    env = service_env(tmp_path / "nowhere" / "kubeconfig", {"HOME": str(tmp_path)})
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        env.pop(name, None)
    status, err, _ = run([f"--kubectl={kubectl_path}", "--dry-run", "--once"], env, tmp_path)
    assert status == 1
    (line,) = [line for line in err.splitlines() if " ERROR " in line]
    assert "localhost:8080" in line
    assert (
        "check KUBECONFIG or ~/.kube/config, --context, or, in a pod, its service account" in line
    )


@pytest.mark.parametrize("content", [None, "replace-me\n", "\n"])
def test_a_missing_or_placeholder_secret_file_stops_k8svent_at_start(tmp_path, content):
    secret_file = tmp_path / "secret"
    if content is not None:
        secret_file.write_text(content)
    env = service_env(
        tmp_path / "kubeconfig",
        {
            "K8SVENT_WEBHOOKS": "https://hooks.example.com/x",
            "K8SVENT_WEBHOOK_SECRET_FILE": str(secret_file),
        },
    )
    status, err, _ = run([], env, tmp_path / "run")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("k8svent: error: ")
    assert str(secret_file) in err
    assert "kubectl -n k8svent create secret generic k8svent" in err


def test_a_webhook_refusing_every_pod_logs_a_line_a_minute_not_one_per_pod(
    kubeapi, kubeconfig, kubectl_path, receivers, tmp_path
):
    for i in range(50):
        kubeapi.put_pod(make_pod("default", f"web-{i:02}"))
    refusing = receivers([400] * 40 + [404] * 10)
    status, err, _ = run(
        [f"--kubectl={kubectl_path}", f"--url={refusing.url}", "--once", "--log-format=json"],
        service_env(kubeconfig),
        tmp_path,
    )
    assert status == 1
    entries = [json.loads(line) for line in err.splitlines()]
    for entry in entries:  # RFC 3339, UTC, milliseconds
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    refusals = [e["message"] for e in entries if "rejected" in e["message"]]
    assert len(refusals) == 2, refusals
    assert re.fullmatch(
        r"POST of default/web-\d\d to http://127\.0\.0\.1:\d+ rejected \(HTTP 400\); "
        r"not retrying this state of the pod; more refusals are summed up once a minute",
        refusals[0],
    )
    assert re.fullmatch(
        r"49 more deliveries to http://127\.0\.0\.1:\d+ rejected in the last \d+ s "
        r"\(HTTP 400: 39, HTTP 404: 10; one was default/web-\d\d, HTTP 40[04]\); "
        r"not retrying those states of the pods",
        refusals[1],
    )


def test_a_long_first_list_shows_its_progress_in_the_log_and_on_readyz(
    kubeapi, kubeconfig, kubectl_path, tmp_path
):
    kubeapi.set_pods([make_pod("default", f"web-{i:03}") for i in range(600)])
    kubeapi.hang(6, page=3)  # the fourth page: after 300 pods
    service = Service(
        [
            f"--kubectl={kubectl_path}",
            "--dry-run",
            "--chunk-size=100",
            "--listen=127.0.0.1:0",
        ],
        service_env(kubeconfig),
        tmp_path,
    )
    try:
        service.wait_log(r"listening on http://127\.0\.0\.1:\d+")
        base = re.search(r"listening on (http://127\.0\.0\.1:\d+)", service.log()).group(1)
        deadline = time.monotonic() + 5
        while True:  # the list waits for its fourth page
            answer = requests.get(f"{base}/readyz", timeout=5)
            if "300 so far, 3 pages" in answer.text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer.status_code == 503
        assert re.fullmatch(
            r"listing pods: 300 so far, 3 pages in \d+ s, \d+ pods/s\n", answer.text
        )
        service.wait_log(r"\blist: 600 pods seen")
        progress = re.findall(r"INFO (listing pods: .*)", service.log())
        # Every 5 s (checked each 256 pods): at least once, after the 6 s wait.
        for line in progress:
            assert re.fullmatch(
                r"listing pods: (256|512) so far, \d pages in \d+ s, \d+ pods/s", line
            )
        assert progress[-1].startswith("listing pods: 512 so far, 5 pages in ")
        assert requests.get(f"{base}/readyz", timeout=5).text == "ok\n"
    finally:
        service.kill()


README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start():
    return README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_says_where_kubectl_comes_from_and_what_git_ignores():
    text = quick_start()
    assert "https://kubernetes.io/docs/tasks/tools/" in text
    assert "requirements-kubectl.txt" in text
    assert "within one minor version of the API server" in " ".join(text.split())
    written = re.findall(r"> ([\w.-]+)", text) + re.findall(r"as `([\w.-]+)`", text)
    assert sorted(written) == ["receiver.py", "secret.txt", "would-send.jsonl"]
    for name in written:  # files the quick start writes into the checkout
        ignored = subprocess.run(["git", "check-ignore", "-q", name], cwd=README.parent)
        assert ignored.returncode == 0, f"{name} is not in .gitignore"
    # The usage block is --help verbatim: 210 lines before --format and --send,
    # and the three lines of usage and one of Deploying that --lease added.
    assert len(README.read_text().splitlines()) <= 217


def test_the_quick_start_gets_signed_pods_to_its_receiver_with_check_green(
    kubeapi, kubeconfig, kubectl_path, tmp_path, monkeypatch, capsys
):
    """The README's receiver and commands, on port 0 instead of 8000."""
    kubeapi.put_pod(make_pod("default", "web"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text(secrets.token_hex(32) + "\n")
    text = quick_start()
    (receiver_code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    code, serve = receiver_code.rsplit("\n\n\n", 1)
    assert serve.strip() == 'http.server.HTTPServer(("127.0.0.1", 8000), Receiver).serve_forever()'
    scope = {}
    exec(code, scope)  # noqa: S102 - the README's own example
    server = http.server.HTTPServer(("127.0.0.1", 0), scope["Receiver"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        commands = re.findall(r"^python k8svent\.py (.*)$", text, re.M)
        check_args, run_args = (
            shlex.split(c.replace("8000", str(server.server_port))) for c in commands[:2]
        )
        env = service_env(kubeconfig)
        status, _, out = run([f"--kubectl={kubectl_path}", *check_args], env, tmp_path / "c")
        assert status == 0 and out.splitlines()[-1] == "all is well", out
        assert run_args[-1] == "--interval=10"
        status, err, _ = run(
            [f"--kubectl={kubectl_path}", *run_args[:-1], "--once"], env, tmp_path / "r"
        )
        assert status == 0, err
    finally:
        server.shutdown()
        server.server_close()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"ping from k8svent {k8svent.version()}", "default web Running True"]
