"""The first hour of a newcomer and an operator (issue 24): k8svent run as a process."""

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
