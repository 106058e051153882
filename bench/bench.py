"""Benchmark k8svent against the targets of issue 5; print one table.

Usage: python bench/bench.py [--sizes=1000,10000,50000,150000] [--runs=3]
                             [--original-max=10000] [--deliveries=5000]
                             [--slow-deliveries=1000] [--workers=8]

Pods come from test/pods.py (generate_items: realistic ~6 KB Deployment
pods), served by test/kubeapi.py's FakeKubeAPI to the real kubectl. Every
number is the median of --runs runs. Needs nginx (Debian) for the delivery
rows; they are skipped when it is missing.
"""

import argparse
import gc
import http.client
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ijson  # noqa: E402

import k8svent  # noqa: E402
from test.kubeapi import FakeKubeAPI  # noqa: E402
from test.pods import generate_items  # noqa: E402

K8SVENT = ROOT / "k8svent.py"
KUBECTL = shutil.which(Path(sys.executable).parent / "kubectl") or shutil.which("kubectl")
MIB = 1 << 20
SAMPLE_SECONDS = 0.01
SECRET = "bench-secret"
SLOW_SECONDS = 0.05


# --- measuring processes -----------------------------------------------------

def _hwm(pid):
    """VmHWM (peak RSS) of a process in bytes, or 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid):
    """Pids of the direct children of a process."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def run_measured(argv, env, stdout=subprocess.DEVNULL):
    """Run a command; return (wall s, CPU s of it and its children, peak RSS, child peak RSS)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE)
    peak = child_peak = 0
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        for child in _children(proc.pid):
            child_peak = max(child_peak, _hwm(child))
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - began
    reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {err[0][-2000:]!r}")
    return wall, cpu, peak, child_peak


# --- the poll: k8svent, the floor, the original algorithm --------------------

FLOOR = """
import subprocess, sys, ijson
kubectl = subprocess.Popen([sys.argv[1], "get", "--raw", "/api/v1/pods"], stdout=subprocess.PIPE)
count = sum(1 for _ in ijson.items(kubectl.stdout, "items.item"))
assert kubectl.wait() == 0 and count == int(sys.argv[2]), count
"""

ORIGINAL = """
import json, subprocess, sys
def poll():
    out = subprocess.run([sys.argv[1], "get", "pods", "-A", "-o", "json"],
                         capture_output=True, check=True).stdout
    return {(p["metadata"]["namespace"], p["metadata"]["name"]): p
            for p in json.loads(out)["items"]}
previous = poll()          # the snapshot kept between polls
current = poll()           # the poll that is measured, with nothing to send
changed = [k for k, p in current.items() if previous.get(k) != p]
assert len(current) == int(sys.argv[2]) and not changed
"""

RETAINED = """
import gc, os, sys
sys.path.insert(0, sys.argv[1])
import k8svent
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
gc.collect()
before = rss()
settings = k8svent.Settings(dry_run=True, state=sys.argv[2])
store = k8svent.Store(settings.state)
poller = k8svent.Poller(settings, store, [])
for _ in range(2):
    assert poller.poll_once()
gc.collect()
print(rss() - before)
"""


def python(code, *args):
    return [sys.executable, "-c", code, *args]


def bench_size(n, runs, original_max, env, tmp):
    """The poll rows for n pods."""
    row = {}
    floors, steady, first, original, retained = [], [], [], [], []
    for run in range(runs):
        floors.append(run_measured(python(FLOOR, KUBECTL, str(n)), env))
        state = tmp / f"state-{n}-{run}.db"
        base = [sys.executable, str(K8SVENT), f"--kubectl={KUBECTL}", f"--state={state}",
                "--dry-run", "--once", "--log-level=warning"]
        first.append(run_measured(base, env))
        steady.append(run_measured(base, env))
        if n <= original_max:
            original.append(run_measured(python(ORIGINAL, KUBECTL, str(n)), env))
        out = subprocess.run(python(RETAINED, str(ROOT), str(state)), env=env,
                             capture_output=True, check=True, text=True).stdout
        retained.append(int(out) / n)
        for path in tmp.glob(f"state-{n}-{run}.db*"):
            path.unlink()
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    row["floor"] = med(floors, 0)
    row["steady wall"] = med(steady, 0)
    row["steady cpu"] = med(steady, 1)
    row["first wall"] = med(first, 0)
    row["first cpu"] = med(first, 1)
    row["steady rss"] = med(steady, 2) / MIB
    row["first rss"] = med(first, 2) / MIB
    row["kubectl rss"] = max(med(steady, 3), med(first, 3)) / MIB
    row["floor rss"] = med(floors, 2) / MIB
    row["retained"] = statistics.median(retained)
    if original:
        row["original wall"] = med(original, 0)
        row["original rss"] = med(original, 2) / MIB
        row["original kubectl rss"] = med(original, 3) / MIB
    return row


# --- delivery -----------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(tmp):
    """nginx answering `return 200` on 127.0.0.1; return (process, url)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        return None, None
    port = free_port()
    prefix = tmp / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200; }}
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf)],
                            stderr=subprocess.DEVNULL)
    _wait_listening(port)
    return proc, f"http://127.0.0.1:{port}/hook"


SLOW_RECEIVER = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(float(sys.argv[2]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def start_slow_receiver():
    port = free_port()
    proc = subprocess.Popen(python(SLOW_RECEIVER, str(port), str(SLOW_SECONDS)))
    _wait_listening(port)
    return proc, f"http://127.0.0.1:{port}/hook"


def _wait_listening(port):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def owed_store(count):
    """A temporary Store that owes `count` realistic pods to every endpoint."""
    store = k8svent.Store()
    store.begin_poll()
    batch = []
    for namespace, name, data in generate_items(count):
        batch.append(k8svent.pod_entry(k8svent.pod_from_item(__import__("json").loads(data))))
    store.apply_page(batch)
    store.finish_poll()
    return store, [k8svent.payload(entry.body) for entry in batch]


def k8svent_rate(url, store, workers, count):
    """Deliveries per second of one k8svent Sender, signed, from the store."""
    settings = k8svent.Settings(urls=(url,), secret=SECRET, workers=workers)
    endpoint = k8svent.Endpoint(url, settings)
    store.set_endpoints([])                     # forget earlier runs' deliveries
    store.set_endpoints([endpoint.id])
    stop = threading.Event()
    sender = k8svent.Sender(endpoint, store, settings, stop)
    began = time.perf_counter()
    sender.start()
    sender.wait_idle()
    elapsed = time.perf_counter() - began
    sender.close()
    assert sender.succeeded == count and not sender.failed, (sender.succeeded, sender.failed)
    return count / elapsed


def http_client_rate(url, bodies):
    """Deliveries per second of a bare http.client keep-alive loop."""
    port = int(url.split(":")[2].split("/")[0])
    connection = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}
    began = time.perf_counter()
    for body in bodies:
        connection.request("POST", "/hook", body, headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    elapsed = time.perf_counter() - began
    connection.close()
    return len(bodies) / elapsed


def bench_delivery(args, tmp):
    rows = {}
    nginx, url = start_nginx(tmp)
    if nginx is not None:
        try:
            store, bodies = owed_store(args.deliveries)
            ours = [k8svent_rate(url, store, args.workers, args.deliveries)
                    for _ in range(args.runs)]
            base = [http_client_rate(url, bodies) for _ in range(args.runs)]
            store.close()
            rows["nginx"] = (statistics.median(ours), statistics.median(base))
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait()
    slow, url = start_slow_receiver()
    try:
        store, _ = owed_store(args.slow_deliveries)
        ours = [k8svent_rate(url, store, args.workers, args.slow_deliveries)
                for _ in range(args.runs)]
        store.close()
        rows["slow"] = (statistics.median(ours), args.workers / SLOW_SECONDS)
    finally:
        slow.terminate()
        slow.wait()
    return rows


# --- the table ----------------------------------------------------------------

def table(sizes, polls, delivery, args):
    """The one table, in Markdown."""
    def cells(fmt, key, ratio_to=None):
        out = []
        for n in sizes:
            row = polls[n]
            if key not in row:
                out.append("skipped")
                continue
            text = fmt.format(row[key])
            if ratio_to:
                text += f" ({row[key] / row[ratio_to]:.2f}x)"
            out.append(text)
        return out

    lines = [
        ("floor: `kubectl get --raw` \\| ijson, wall s", cells("{:.2f}", "floor"), ""),
        ("steady poll wall s (x floor)", cells("{:.2f}", "steady wall", "floor"), "<= 1.5x"),
        ("steady poll CPU s (k8svent + kubectl)", cells("{:.2f}", "steady cpu"), ""),
        ("first poll `--dry-run` wall s (x floor)", cells("{:.2f}", "first wall", "floor"), ""),
        ("first poll CPU s", cells("{:.2f}", "first cpu"), ""),
        ("k8svent peak RSS, steady, MiB", cells("{:.0f}", "steady rss"), "<= 150"),
        ("k8svent peak RSS, first poll, MiB", cells("{:.0f}", "first rss"), "<= 150"),
        ("kubectl peak RSS (either poll), MiB", cells("{:.0f}", "kubectl rss"), "<= 64"),
        ("floor peak RSS (ijson process), MiB", cells("{:.0f}", "floor rss"), ""),
        ("retained bytes/pod between polls", cells("{:.0f}", "retained"), "<= 400"),
        ("original: `get pods -A -o json` + json.loads, wall s",
         cells("{:.2f}", "original wall", "floor"), ""),
        ("original: Python peak RSS, MiB", cells("{:.0f}", "original rss"), ""),
        ("original: kubectl peak RSS, MiB", cells("{:.0f}", "original kubectl rss"), ""),
    ]
    blank = [""] * (len(sizes) - 1)
    if "nginx" in delivery:
        ours, base = delivery["nginx"]
        lines.append((f"deliveries/s to nginx, signed ({args.deliveries:,}) / http.client loop",
                      [f"{ours:.0f} / {base:.0f} ({ours / base:.2f}x)"] + blank, ">= 0.4x"))
    ours, base = delivery["slow"]
    lines.append((f"deliveries/s to a 50 ms receiver ({args.slow_deliveries:,}) / "
                  f"workers/0.05 s", [f"{ours:.0f} / {base:.0f} ({ours / base:.2f}x)"] + blank,
                  ">= 0.8x"))
    header = ["measure (median of %d runs)" % args.runs] + [f"{n:,} pods" for n in sizes] + \
        ["target"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values, target in lines:
        out.append("| " + " | ".join([name, *values, target]) + " |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000,150000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--original-max", type=int, default=10000,
                        help="largest size to run the original algorithm at")
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--slow-deliveries", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    polls = {}
    with tempfile.TemporaryDirectory(prefix="k8svent-bench-") as tmp:
        tmp = Path(tmp)
        for n in sizes:
            with FakeKubeAPI() as api:
                api.load_items(generate_items(n))
                env = {k: v for k, v in os.environ.items() if not k.startswith("K8SVENT_")}
                env["KUBECONFIG"] = str(api.kubeconfig(tmp / "kubeconfig"))
                env["KUBECACHEDIR"] = str(tmp / "kube-cache")
                print(f"{n:,} pods ...", file=sys.stderr, flush=True)
                polls[n] = bench_size(n, args.runs, args.original_max, env, tmp)
            gc.collect()
        print("deliveries ...", file=sys.stderr, flush=True)
        delivery = bench_delivery(args, tmp)
    print(table(sizes, polls, delivery, args))


if __name__ == "__main__":
    main()
