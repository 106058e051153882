"""Hardening (issue 12): private state files, a busy status port, hostile answers."""

import logging
import os
import re
import select
import socket
import sqlite3
import stat
import threading
import time

import pytest
import requests

import k8svent
from test.pods import make_pod
from test.test_e2e import start  # noqa: F401  (a fixture)

# --- private files ----------------------------------------------------------


def _modes(folder):
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in folder.iterdir()}


@pytest.fixture
def open_umask():
    """A umask that hides nothing, as some hosts have; restored afterwards."""
    old = os.umask(0)
    yield
    os.umask(old)


def _write_pods(store):
    store.snapshot.begin_poll()
    store.snapshot.apply_page([k8svent.pod_entry({"metadata": {"namespace": "n", "name": "p"}})])
    store.snapshot.finish_poll()


def test_state_files_are_private_whatever_the_umask(tmp_path, open_umask):
    path = tmp_path / "state.db"
    store = k8svent.Store(str(path))
    _write_pods(store)
    modes = _modes(tmp_path)
    assert {"state.db", "state.db-wal", "state.db-shm", "state.db.lock"} <= set(modes)
    assert modes == {name: 0o600 for name in modes}
    store.close()


def test_an_older_world_readable_state_is_made_private(tmp_path, open_umask):
    path = tmp_path / "state.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    k8svent.Store(str(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_copies_are_private_and_only_the_newest_is_kept(tmp_path, open_umask):
    path = tmp_path / "state.db"
    old = tmp_path / "state.db.corrupt-1000"
    old.write_bytes(b"an older copy")
    (tmp_path / "state.db.corrupt-1000-wal").write_bytes(b"its journal")
    other = tmp_path / "other.db.corrupt-1000"
    other.write_bytes(b"not ours")
    path.write_bytes(b"not a database at all" * 100)
    path.chmod(0o644)
    k8svent.Store(str(path)).close()
    copies = sorted(p.name for p in tmp_path.glob("state.db.corrupt-*"))
    assert len(copies) == 1 and copies[0] != old.name
    assert stat.S_IMODE((tmp_path / copies[0]).stat().st_mode) == 0o600
    assert other.exists()


@pytest.mark.parametrize("link", ["state.db", "state.db.lock", "state.db-wal"])
def test_a_symlinked_state_path_is_refused(tmp_path, link, capsys):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / link).symlink_to(target)
    path = tmp_path / "state.db"
    with pytest.raises(k8svent.StateError, match="symbolic link"):
        k8svent.Store(str(path))
    assert target.read_bytes() == b""
    code = k8svent.main(["-u", "http://127.0.0.1:9/", "--once", f"--state={path}"], {})
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("k8svent: error: ") and err.count("\n") == 1
    assert "symbolic link" in err


def test_a_state_file_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        # Only root can give a file away; /etc/passwd stands for one then.
        path = "/etc/passwd"
        with pytest.raises(k8svent.StateError, match="another user|symbolic"):
            k8svent._open_private(path, create=False)
        return
    path = tmp_path / "state.db"
    sqlite3.connect(path).close()
    os.chown(path, 65534, 65534)
    with pytest.raises(k8svent.StateError, match="belongs to another user"):
        k8svent.Store(str(path))


# --- the status port ----------------------------------------------------------


def _wait_until(condition, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _hung_up(sock):
    """Whether the server has closed a client socket (EOF or reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1024) == b""
    except OSError:
        return True


@pytest.fixture
def status_server(kubeapi, kubeconfig, kubectl_path):
    """A StatusServer on 127.0.0.1 (1 s per request, 8 connections) over a real poller."""
    settings = k8svent.Settings(kubectl=kubectl_path, urls=("http://127.0.0.1:9/",))
    store = k8svent.Store()
    poller = k8svent.Poller(settings, store, [])
    server = k8svent.StatusServer(("127.0.0.1", 0), request_seconds=1, max_connections=8)
    poller.start()
    server.start(k8svent.Health(poller, settings))
    yield server
    server.stop()
    poller.stop()
    poller.join(10)
    store.close()


def test_idle_connections_neither_pile_up_threads_nor_block_healthz(status_server):
    before = threading.active_count()
    host, port = status_server.url.removeprefix("http://").split(":")
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(sock)
        peak = threading.active_count()
        started = time.monotonic()
        answer = requests.get(status_server.url + "/healthz", timeout=10)
        assert answer.status_code == 200 and answer.text == "ok\n"
        assert time.monotonic() - started < 3
        assert peak - before <= 8 + 2
        # Every idle connection is closed: the oldest to make room, the rest
        # after their second.
        _wait_until(lambda: all(_hung_up(s) for s in idle), what="idle connections closed")
        _wait_until(lambda: threading.active_count() <= before, what="threads to end")
    finally:
        for sock in idle:
            sock.close()


def test_a_dripping_client_is_cut_off_at_the_deadline(status_server):
    host, port = status_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        started = time.monotonic()
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if _hung_up(sock):
                break
            time.sleep(0.1)  # the drip itself, not a wait for a condition
        _wait_until(lambda: _hung_up(sock), what="the dripping client cut off")
        assert time.monotonic() - started < 3


# --- receivers' answers -------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"correlation_id": "abc"}', "abc"),
        (b"[" * 100_000, None),  # too large to look at
        (b"[" * 4000, None),  # small, but nested past the recursion limit
        (b'{"correlation_id": "' + b"x" * 5000 + b'"}', None),
        (b'["correlation_id"]', None),
        (b"\xff\xfe", None),
    ],
)
def test_correlation_id_of_any_answer(body, expected):
    assert k8svent.correlation_id(k8svent.Response(200, JSON, body)) == expected


def test_deeply_nested_answer_is_still_a_success(kubeapi, start, receivers):
    kubeapi.put_pod(make_pod("default", "web"))
    kubeapi.put_pod(make_pod("default", "db"))
    receiver = receivers([(200, JSON, b"[" * 100_000), (200, JSON, b"[" * 4000)])
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 0, service.log()
    assert "RecursionError" not in service.log(), service.log()
    assert service.count(r"DEBUG delivered default/") == 2


class DrippingReceiver:
    """Answers every POST with a 200 whose body comes a byte every 0.2 s."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with self._listener:
            conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not self._closed.wait(0.2):
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    def close(self):
        self._closed.set()


def test_a_dripping_answer_ends_at_the_deadline():
    receiver = DrippingReceiver()
    endpoint = k8svent.Endpoint(
        receiver.url, k8svent.Settings(urls=(receiver.url,)), deadline_seconds=1.5
    )
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            endpoint.post(b"{}", "msg_1")
        assert time.monotonic() - started < 3
    finally:
        receiver.close()
        endpoint.close()


# --- log injection ------------------------------------------------------------

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def test_a_hostile_pod_name_cannot_forge_a_log_line(kubeapi, start, receivers):
    forged = "web\n2030-01-01 00:00:00,000 ERROR forged line\r\x1b[2J\x1b[31m"
    kubeapi.put_pod(make_pod("default", forged))
    receiver = receivers([400])
    service = start(f"--url={receiver.url}", "--once")
    assert service.wait() == 1
    log = service.log()
    assert "\x1b" not in log and "\r" not in log
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log
    assert "web\\n2030-01-01 00:00:00,000 ERROR forged line\\r\\x1b[2J" in log


def test_text_log_escapes_messages_and_arguments():
    formatter = k8svent._TextFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "k8svent", logging.INFO, __file__, 1, "a\nb %s", ("c\x1b[0m\r\n",), None
    )
    assert formatter.format(record) == "INFO a\\nb c\\x1b[0m\\r\\n"


# --- kubectl's environment ----------------------------------------------------


def _recording_kubectl(tmp_path, kubectl_path):
    """A kubectl that writes its environment to a file, then runs the real one."""
    script = tmp_path / "kubectl-recording"
    script.write_text(f'#!/bin/sh\nenv > "{tmp_path}/env.$$"\nexec "{kubectl_path}" "$@"\n')
    script.chmod(0o755)
    return script


def _recorded(tmp_path):
    return [path.read_text() for path in tmp_path.glob("env.*")]


def test_kubectl_never_sees_k8svents_secrets(kubeapi, start, receivers, tmp_path, kubectl_path):
    kubeapi.put_pod(make_pod("default", "web"))
    receiver = receivers(secret="s3cr3t")
    kubectl = _recording_kubectl(tmp_path, kubectl_path)
    service = start(
        "--once",
        kubectl=str(kubectl),
        env={
            "K8SVENT_WEBHOOKS": receiver.url + "?token=HOOKTOKEN",
            "K8SVENT_WEBHOOK_SECRET": "s3cr3t",
            "KEEP_ME": "kept",
        },
    )
    assert service.wait() == 0, service.log()
    recorded = _recorded(tmp_path)
    assert recorded
    for env in recorded:
        assert "KEEP_ME=kept" in env and "KUBECONFIG=" in env
        assert "K8SVENT_" not in env and "s3cr3t" not in env and "HOOKTOKEN" not in env


def test_own_pod_look_up_never_passes_secrets(
    kubeapi, kubeconfig, kubectl_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("K8SVENT_WEBHOOK_SECRET", "s3cr3t")
    kubeapi.put_pod(make_pod("k8svent", "me"))
    kubectl = _recording_kubectl(tmp_path, kubectl_path)
    settings = k8svent.Settings(kubectl=str(kubectl))
    k8svent.get_own_image(settings, "me", "k8svent")
    (env,) = _recorded(tmp_path)
    assert "s3cr3t" not in env and "K8SVENT_" not in env
