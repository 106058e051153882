"""The first hour of a newcomer and an operator (issue 24): k8svent run as a process."""

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
