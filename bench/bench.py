"""Benchmark k8svent against the targets of issues 5, 11 and 22; print one table.

Usage: python bench/bench.py [--sizes=1000,10000,50000,150000] [--runs=3]
                             [--original-max=10000] [--deliveries=5000]
                             [--slow-deliveries=1000] [--workers=8]
                             [--latency-pods=20000] [--changes-per-second=300]
                             [--latency-seconds=20] [--resync-pods=50000]
                             [--resync-changes-per-second=50] [--resync-seconds=70]
                             [--takeover-pods=150000]

Pods come from test/pods.py (generate_items: realistic ~6 KB Deployment
pods), served by test/kubeapi.py's FakeKubeAPI to the real kubectl. Every
number is the median of --runs runs. Each figure with a target is checked
against it and marked when it misses; a figure that was not measured says why.
Needs nginx (Debian) for the nginx delivery row.
"""

import argparse
import collections
import gc
import http.client
import json
import os
import re
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import k8svent  # noqa: E402
from test.kubeapi import FakeKubeAPI  # noqa: E402
from test.pods import generate_items  # noqa: E402

K8SVENT = ROOT / "k8svent.py"
KUBECTL = shutil.which(Path(sys.executable).parent / "kubectl") or shutil.which("kubectl")
MIB = 1 << 20
SAMPLE_SECONDS = 0.01
SECRET = "bench-secret"
SLOW_SECONDS = 0.05
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
SEQ_LABEL = "k8svent-bench-seq"  # the latency row's changes carry their number here
SEQ_PATTERN = re.compile(rb'"k8svent-bench-seq":"([0-9]+-[0-9]+)"')
WATCH_SAMPLE_SECONDS = 0.05  # how often the latency row reads /proc
WATCH_OPEN_TIMEOUT_SECONDS = 600  # the list of 150,000 pods comes first
SETTLE_SECONDS = 2  # after the watch opened, before the first change
DRAIN_TIMEOUT_SECONDS = 30  # for receipts after the last change
MISS = "✗ MISS"
LEASE_IDLE_SECONDS = 60  # how long the takeover row measures the idle Lease's CPU
TAKEOVER_CHANGES = 10  # pods changed while no replica delivers


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


def _cpu_seconds(pid):
    """utime + stime of a process in seconds, or 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


class ChildSampler(threading.Thread):
    """Reads the peak RSS and CPU time of a process's children from /proc, until stopped."""

    def __init__(self, pid):
        super().__init__(name="child-sampler", daemon=True)
        self._pid = pid
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.peak_rss_bytes = 0
        self._cpu_at_mark = {}  # pid -> CPU s when mark() was called
        self._cpu_since_mark = {}  # pid -> CPU s last read, for children seen since

    def run(self):
        while not self._stop_event.wait(WATCH_SAMPLE_SECONDS):
            self.sample()

    def sample(self):
        """Read every child once."""
        for child in _children(self._pid):
            rss, cpu = _hwm(child), _cpu_seconds(child)
            with self._lock:
                self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
                if self._cpu_at_mark is not None and cpu:
                    self._cpu_since_mark[child] = cpu

    def mark(self):
        """Start counting the children's CPU time from now."""
        cpu = {child: _cpu_seconds(child) for child in _children(self._pid)}
        with self._lock:
            self._cpu_at_mark, self._cpu_since_mark = cpu, dict(cpu)

    def cpu_seconds_since_mark(self):
        """CPU time the children used since mark() (children that ended count until last read)."""
        self.sample()
        with self._lock:
            return sum(
                cpu - self._cpu_at_mark.get(child, 0.0)
                for child, cpu in self._cpu_since_mark.items()
            )

    def stop(self):
        self._stop_event.set()
        self.join()


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


def k8svent_argv(*options):
    """The command line of a k8svent process: default settings but for these options."""
    return [sys.executable, str(K8SVENT), f"--kubectl={KUBECTL}", *options]


def state_bytes(state):
    """The bytes of a state file with its -wal and -shm."""
    return sum(
        os.path.getsize(f"{state}{suffix}")
        for suffix in ("", "-wal", "-shm")
        if os.path.exists(f"{state}{suffix}")
    )


def pods_json_bytes(n):
    """The bytes of n generated pods as `kubectl get pod -o json` prints them (compact)."""
    return sum(
        len(k8svent.encode_pod(k8svent.pod_from_item(json.loads(data))))
        for _, _, data in generate_items(n)
    )


def prepare_state(n, api, env, tmp, receiver):
    """A state file in which every one of n pods has reached the receiver; its size.

    k8svent runs as a service (watch mode, a state file) until every pod has
    reached the receiver and its watch is open; the state file with its -wal
    and -shm is measured then, before it is stopped.
    """
    state = tmp / f"state-{n}.db"
    before = receiver.count
    began = time.monotonic()
    proc = subprocess.Popen(
        k8svent_argv(f"--state={state}", f"--url={receiver.url}", "--upgrade=never"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while receiver.count - before < n:
            if proc.poll() is not None or time.monotonic() > began + WATCH_OPEN_TIMEOUT_SECONDS:
                raise RuntimeError(f"k8svent delivered {receiver.count - before} of {n} pods")
            time.sleep(WATCH_SAMPLE_SECONDS)
        wall = time.monotonic() - began
        if not api.wait_open_watches(1, timeout=60):
            raise RuntimeError("k8svent opened no watch")
        time.sleep(SETTLE_SECONDS)
        size = state_bytes(state)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    if receiver.count - before != n:
        raise RuntimeError(f"k8svent delivered {receiver.count - before} pods, not {n}")
    print(
        f"  state: {n:,} pods listed and delivered in {wall:.1f} s; "
        f"state file {size / MIB:.1f} MiB",
        file=sys.stderr,
        flush=True,
    )
    return state, size


def bench_size(n, runs, original_max, env, tmp, state, receiver):
    """The relist rows for n pods; `state` already holds every pod, delivered."""
    row = {}
    floors, steady, first, original, retained = [], [], [], [], []
    delivered_before = receiver.count
    for run in range(runs):
        floors.append(run_measured(python(FLOOR, KUBECTL, str(n)), env))
        # Default settings: --mode=watch, --chunk-size=5000; --once lists and exits.
        steady.append(
            run_measured(k8svent_argv(f"--state={state}", f"--url={receiver.url}", "--once"), env)
        )
        # --dry-run keeps no state: every pod is new, printed to /dev/null.
        first.append(run_measured(k8svent_argv("--dry-run", "--once"), env))
        if n <= original_max:
            original.append(run_measured(python(ORIGINAL, KUBECTL, str(n)), env))
        scratch = tmp / f"retained-{n}-{run}.db"
        out = subprocess.run(
            python(RETAINED, str(ROOT), str(scratch)),
            env=env,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        retained.append(int(out) / n)
        for path in tmp.glob(f"retained-{n}-{run}.db*"):
            path.unlink()
    if receiver.count != delivered_before:
        raise RuntimeError(f"steady relists delivered {receiver.count - delivered_before} pods")
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


# --- the watch: latency from the API server's event to the webhook ----------


class Receiver:
    """A webhook in this process on 127.0.0.1: answers 200; times bodies while recording."""

    def __init__(self):
        self.count = 0  # bodies received, recorded or not
        self._received = []  # (time.monotonic(), body) while recording
        self._recording = False
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver._take(time.monotonic(), body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                # A k8svent stopped (SIGTERM) with a connection open resets it:
                # not a failure of the bench.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="receiver",
            daemon=True,
        )

    def _take(self, at, body):
        with self._lock:
            self.count += 1
            if self._recording:
                self._received.append((at, body))

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def record(self):
        """Forget the counts so far and keep every body from now on."""
        with self._lock:
            self.count, self._received, self._recording = 0, [], True

    def reset(self):
        """Stop keeping bodies; count from zero."""
        with self._lock:
            self.count, self._received, self._recording = 0, [], False

    def receipts(self):
        """{sequence label: time.monotonic() of its first receipt} of the bodies kept."""
        with self._lock:
            received = list(self._received)
        first = {}
        for at, body in received:
            match = SEQ_PATTERN.search(body)
            if match:
                first.setdefault(match.group(1).decode(), at)
        return first


def change_pods(api, keys, run, rate_per_second, seconds, missed_every=0, missed=None):
    """Relabel `rate_per_second` pods a second; return {sequence label: time put_pod returned}.

    With missed_every, every such change is one no watch tells (only a list
    finds it); its label goes into the set `missed`.
    """
    total = int(rate_per_second * seconds)
    stride = max(1, len(keys) // total)
    changed = {}
    began = time.monotonic()
    for k in range(total):
        delay = began + k / rate_per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        namespace, name = keys[(k * stride + run) % len(keys)].split("/", 1)
        pod = api.get_pod(namespace, name)
        seq = f"{run}-{k}"
        pod["metadata"].setdefault("labels", {})[SEQ_LABEL] = seq
        unseen = bool(missed_every) and k % missed_every == missed_every - 1
        api.put_pod(pod, missed=unseen)
        if unseen:
            missed.add(seq)
        changed[seq] = time.monotonic()
    return changed


def watch_latency_once(
    api, env, tmp, state, receiver, args, run, options=(), rate=None, seconds=None, missed_every=0
):
    """One latency run: k8svent --mode=watch (the default) while pods change at a steady rate.

    `options` go to k8svent; with missed_every, every such change is one the
    watch never tells (a resync must find it): those are timed apart.
    """
    rate = args.changes_per_second if rate is None else rate
    seconds = args.latency_seconds if seconds is None else seconds
    missed = set()
    log_path = tmp / f"watch-{run}.log"
    if not api.wait_open_watches(0, timeout=30):
        raise RuntimeError("the watch of the run before is still open")
    delivered_before = receiver.count
    with open(log_path, "wb") as log_file:
        # Defaults but for --upgrade=never: no registry is reachable from here.
        proc = subprocess.Popen(
            k8svent_argv(f"--state={state}", f"--url={receiver.url}", "--upgrade=never", *options),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    sampler = ChildSampler(proc.pid)
    sampler.start()
    try:
        if not api.wait_open_watches(1, timeout=WATCH_OPEN_TIMEOUT_SECONDS):
            raise RuntimeError(f"k8svent opened no watch; log: {log_path.read_text()[-2000:]}")
        time.sleep(SETTLE_SECONDS)
        listed_delivered = receiver.count - delivered_before
        keys = api.pod_keys()
        receiver.record()
        sampler.mark()
        cpu_before, began = _cpu_seconds(proc.pid), time.monotonic()
        changed = change_pods(api, keys, run, rate, seconds, missed_every, missed)
        changing_seconds = time.monotonic() - began
        resyncs = [float(s) for s in RESYNC_LISTED.findall(log_path.read_bytes())]
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS + (4 * seconds if missed else 0)
        while True:
            received = receiver.receipts()
            if len(received) >= len(changed) or time.monotonic() >= deadline:
                break
            time.sleep(WATCH_SAMPLE_SECONDS)
        ended = max(received.values(), default=time.monotonic())
        cpu = _cpu_seconds(proc.pid) - cpu_before
        kubectl_cpu = sampler.cpu_seconds_since_mark()
        peak_rss = _hwm(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        sampler.stop()
        receiver.reset()
    latencies = sorted(
        received[seq] - at for seq, at in changed.items() if seq in received and seq not in missed
    )
    missed_latencies = sorted(
        received[seq] - at for seq, at in changed.items() if seq in received and seq in missed
    )
    if missed:
        # When each change only a list could find was made and received, and
        # when each resync list ended, in seconds from the first change.
        offsets = sorted(
            (at - began, received.get(seq, float("nan")) - began)
            for seq, at in changed.items()
            if seq in missed
        )
        print(
            "  made -> received: " + ", ".join(f"{m:.0f}->{r:.0f}" for m, r in offsets),
            file=sys.stderr,
        )
        ends = [line for line in log_path.read_text().splitlines() if "pods listed (" in line]
        window = time.time() - (time.monotonic() - began)
        print(
            f"  window began at {time.strftime('%H:%M:%S', time.localtime(window))}",
            file=sys.stderr,
        )
        print("  " + "\n  ".join(ends), file=sys.stderr, flush=True)
    if listed_delivered:
        print(
            f"  warning: the list before the watch delivered {listed_delivered} pods",
            file=sys.stderr,
        )
    return {
        "made": len(changed),
        "delivered": len(latencies) + len(missed_latencies),
        "missed made": len(missed),
        "missed max": missed_latencies[-1] if missed_latencies else float("nan"),
        "resync lists": len(resyncs),
        "resync list seconds": resyncs,
        "rate": len(changed) / changing_seconds,
        "p50": _percentile(latencies, 50),
        "p99": _percentile(latencies, 99),
        "max": latencies[-1] if latencies else float("nan"),
        "cpu cores": cpu / max(ended - began, 1e-9),
        "kubectl cpu cores": kubectl_cpu / max(ended - began, 1e-9),
        "cpu ms per change": cpu * 1000 / max(len(changed), 1),
        "kubectl cpu ms per change": kubectl_cpu * 1000 / max(len(changed), 1),
        "rss": peak_rss / MIB,
        "kubectl rss": sampler.peak_rss_bytes / MIB,
    }


def _percentile(values, percent):
    """The nearest-rank percentile of sorted values (nan when there are none)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, -(-len(values) * percent // 100) - 1))]


def bench_latency(api, env, tmp, state, receiver, args):
    """The latency rows: medians over --runs runs of watch_latency_once."""
    runs = []
    for run in range(args.runs):
        runs.append(watch_latency_once(api, env, tmp, state, receiver, args, run))
        last = runs[-1]
        print(
            f"  watch run {run + 1}: p50 {last['p50']:.3f} s, p99 {last['p99']:.3f} s, "
            f"max {last['max']:.3f} s, {last['delivered']}/{last['made']} received, "
            f"{last['rate']:.0f} changes/s, CPU {last['cpu cores']:.2f} cores "
            f"(kubectl {last['kubectl cpu cores']:.2f}), "
            f"{last['cpu ms per change']:.2f} ms/change "
            f"(kubectl {last['kubectl cpu ms per change']:.2f}), RSS {last['rss']:.0f} MiB "
            f"(kubectl {last['kubectl rss']:.0f})",
            file=sys.stderr,
            flush=True,
        )
    row = {
        key: statistics.median(r[key] for r in runs)
        for key in runs[0]
        if key != "resync list seconds"
    }
    row["made"] = sum(r["made"] for r in runs)
    row["delivered"] = sum(r["delivered"] for r in runs)
    return row


RESYNC_SECONDS = (20, 5)  # the rows of issue 20: lists shorter, then longer, than the interval
RESYNC_MISSED_EVERY = 100  # one change in this many is one no watch tells
RESYNC_LISTED = re.compile(rb"resync: \d+ pods listed \(([\d.]+) s\)")  # k8svent's log line


def bench_resync(api, env, tmp, state, receiver, args):
    """The resync rows: {resync seconds: one run's figures} with changes the watch misses."""
    rows = {}
    for index, resync in enumerate(RESYNC_SECONDS):
        row = watch_latency_once(
            api,
            env,
            tmp,
            state,
            receiver,
            args,
            100 + index,  # runs of their own: other pods change, other logs
            options=(f"--resync={resync}",),
            rate=args.resync_changes_per_second,
            seconds=args.resync_seconds,
            missed_every=RESYNC_MISSED_EVERY,
        )
        print(
            f"  --resync={resync}: p50 {row['p50']:.3f} s, p99 {row['p99']:.3f} s, "
            f"max {row['max']:.3f} s, {row['delivered']}/{row['made']} received "
            f"({row['missed made']} only a list could find, the last after "
            f"{row['missed max']:.1f} s), {row['resync lists']} resync lists in the window "
            f"({', '.join(f'{s:.1f} s' for s in row['resync list seconds'])})",
            file=sys.stderr,
            flush=True,
        )
        rows[resync] = row
    return rows


def resync_table(rows, n, args):
    """The resync rows of issue 20, in Markdown."""
    out = [
        f"| {n:,} pods, {args.resync_changes_per_second:g} changes/s for "
        f"{args.resync_seconds:g} s | received / made | p50 | p99 | max | missed by the watch: "
        "the last received after | resync lists in the window |",
        "|---|---|---|---|---|---|---|",
    ]
    for resync, row in rows.items():
        out.append(
            f"| --resync={resync} | {row['delivered']}/{row['made']} | {row['p50']:.3f} s | "
            f"{row['p99']:.3f} s | {row['max']:.3f} s | {row['missed max']:.1f} s | "
            f"{row['resync lists']} |"
        )
    return "\n".join(out)


# --- the takeover: two replicas on a Lease -------------------------------------


def _tree_cpu_seconds(pid):
    """CPU s of a process and of its children it has reaped (kubectl runs), 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS_PER_SECOND


def _listening_port(log_path, proc, timeout=WATCH_OPEN_TIMEOUT_SECONDS):
    """The port a k8svent logged it listens on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        time.sleep(WATCH_SAMPLE_SECONDS)
    raise RuntimeError(f"k8svent is not listening; log: {log_path.read_text()[-2000:]}")


def _owed(port):
    """The deliveries a k8svent owes (k8svent_deliveries_owed, summed), from /metrics.

    None when /metrics does not answer within 30 s (the standby is busy listing).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("k8svent_deliveries_owed{")
    )


def _wait(condition, what, timeout=WATCH_OPEN_TIMEOUT_SECONDS):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(WATCH_SAMPLE_SECONDS)


def bench_takeover(api, env, tmp, state, receiver, n):
    """kill -9 of the holder of the Lease: seconds to the first owed change, re-sends, idle CPU.

    The holder starts from `state` (every pod delivered); the standby is a new
    pod (a fresh state file) that lists every pod and settles its outbox by the
    holder's watermark. Both idle for LEASE_IDLE_SECONDS (their CPU, kubectl
    included); then the holder is killed and TAKEOVER_CHANGES pods change.
    """
    holder_state = tmp / "takeover-holder.db"
    shutil.copy(state, holder_state)
    procs = {}
    logs = {}
    for name, state_file in (("holder", holder_state), ("standby", tmp / "takeover-standby.db")):
        logs[name] = tmp / f"takeover-{name}.log"
        with open(logs[name], "wb") as log_file:
            procs[name] = subprocess.Popen(
                k8svent_argv(
                    f"--state={state_file}",
                    f"--url={receiver.url}",
                    "--upgrade=never",
                    "--lease=default/k8svent-bench",
                    "--listen=127.0.0.1:0",
                    # No resync: a list of every pod every 600 s is not the
                    # Lease's cost, and could fall in the idle minute.
                    "--resync=0",
                ),
                env={**env, "HOSTNAME": f"bench-{name}"},
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        if name == "holder":
            _wait(lambda: "holding Lease" in logs["holder"].read_text(), "the holder")
    try:
        port = _listening_port(logs["standby"], procs["standby"])
        _wait(lambda: "competing for Lease" in logs["standby"].read_text(), "the standby's list")
        _wait(lambda: _owed(port) == 0, "the standby to settle by the watermark")
        cpu = {name: _tree_cpu_seconds(proc.pid) for name, proc in procs.items()}
        time.sleep(LEASE_IDLE_SECONDS)
        idle = {
            name: (_tree_cpu_seconds(proc.pid) - cpu[name]) / LEASE_IDLE_SECONDS
            for name, proc in procs.items()
        }
        receiver.record()
        procs["holder"].kill()
        killed = time.monotonic()
        procs["holder"].wait()
        keys = api.pod_keys()
        for k in range(TAKEOVER_CHANGES):
            namespace, name = keys[k * (len(keys) // TAKEOVER_CHANGES)].split("/", 1)
            pod = api.get_pod(namespace, name)
            pod["metadata"].setdefault("labels", {})[SEQ_LABEL] = f"99-{k}"  # as SEQ_PATTERN reads
            api.put_pod(pod)
        _wait(lambda: len(receiver.receipts()) >= TAKEOVER_CHANGES, "the owed changes", 120)
        first = min(receiver.receipts().values()) - killed
        time.sleep(SETTLE_SECONDS)
        resent = receiver.count - len(receiver.receipts())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        receiver.reset()
    print(
        f"  takeover: first owed change {first:.1f} s after kill -9, {resent} re-sent; idle "
        f"CPU holder {idle['holder']:.3f}, standby {idle['standby']:.3f} cores",
        file=sys.stderr,
        flush=True,
    )
    return {"first": first, "resent": resent, **idle}


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
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL)
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
    # It keeps every body: each run owes them again to a new endpoint, with
    # no list between to bring dropped bodies back.
    store = k8svent.Store(keep_bodies=True)
    store.snapshot.begin_poll()
    batch = []
    for _namespace, _name, data in generate_items(count):
        batch.append(k8svent.pod_entry(k8svent.pod_from_item(__import__("json").loads(data))))
    store.snapshot.apply_page(batch)
    store.snapshot.finish_poll()
    return store, [k8svent.payload(entry.body) for entry in batch]


def k8svent_rate(url, store, workers, count):
    """Deliveries per second of one k8svent Sender, signed, from the store."""
    settings = k8svent.Settings(urls=(url,), secret=SECRET, workers=workers)
    endpoint = k8svent.Endpoint(url, settings)
    store.outbox.set_endpoints([])  # forget earlier runs' deliveries
    store.outbox.set_endpoints([endpoint.id])
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
    """The delivery rows: {"nginx": (ours, base) or a reason it was not run, "slow": ...}."""
    rows = {"nginx": "not run: no nginx (apt-get install nginx-light)"}
    nginx, url = start_nginx(tmp)
    if nginx is not None:
        try:
            store, bodies = owed_store(args.deliveries)
            ours = [
                k8svent_rate(url, store, args.workers, args.deliveries) for _ in range(args.runs)
            ]
            base = [http_client_rate(url, bodies) for _ in range(args.runs)]
            store.close()
            rows["nginx"] = (statistics.median(ours), statistics.median(base))
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait()
    slow, url = start_slow_receiver()
    try:
        store, _ = owed_store(args.slow_deliveries)
        ours = [
            k8svent_rate(url, store, args.workers, args.slow_deliveries) for _ in range(args.runs)
        ]
        store.close()
        rows["slow"] = (statistics.median(ours), args.workers / SLOW_SECONDS)
    finally:
        slow.terminate()
        slow.wait()
    return rows


# --- the table ----------------------------------------------------------------


class Target(collections.namedtuple("Target", "text limit at_most")):
    """A target: at most (or at least) a limit; `text` is what the table shows."""

    def met(self, value):
        return value <= self.limit if self.at_most else value >= self.limit


def at_most(limit, unit=""):
    return Target(f"<= {limit:g}{unit}", limit, True)


def at_least(limit, unit=""):
    return Target(f">= {limit:g}{unit}", limit, False)


# A cell: its text and the number checked against the row's target (None: nothing to check).
Cell = collections.namedtuple("Cell", "text value")
BLANK = Cell("", None)


def checked(row_name, column, cell, target, misses):
    """The cell's text, marked when its value misses the target (noted in `misses`)."""
    if target is None or cell.value is None:
        return cell.text
    if cell.value != cell.value or not target.met(cell.value):  # nan: not measured
        misses.append(f"{row_name} at {column}")
        return f"{cell.text} {MISS}"
    return cell.text


def table(sizes, polls, delivery, latency, takeover, args):
    """The one table, in Markdown, and the lines that follow it."""

    def cells(fmt, key, ratio_to=None, absent="not run"):
        out = []
        for n in sizes:
            row = polls[n]
            if key not in row:
                out.append(Cell(absent, None))
                continue
            text = fmt.format(row[key])
            value = row[key]
            if ratio_to:
                value = row[key] / row[ratio_to]
                text += f" ({value:.2f}x)"
            out.append(Cell(text, value))
        return out

    def single(cell, n=None):
        """A figure of one run that is not per size: in the column of n, else the first."""
        at = sizes.index(n) if n in sizes else 0
        return [cell if i == at else BLANK for i in range(len(sizes))]

    above = f"not run: above --original-max={args.original_max:,}"
    lines = [
        ("floor: `kubectl get --raw` \\| ijson, wall s", cells("{:.2f}", "floor"), None),
        (
            (
                "steady relist at default settings (`--once`, chunk 5000, nothing to send), "
                "wall s (x floor)"
            ),
            cells("{:.2f}", "steady wall", "floor"),
            at_most(1.5, "x"),
        ),
        ("steady relist CPU s (k8svent + kubectl)", cells("{:.2f}", "steady cpu"), None),
        (
            "first poll `--dry-run` wall s (x floor)",
            cells("{:.2f}", "first wall", "floor"),
            at_most(2, "x"),
        ),
        ("first poll CPU s", cells("{:.2f}", "first cpu"), None),
        (
            "state file + -wal + -shm once the first list is delivered (watch mode), MiB "
            "(x the pods' JSON)",
            cells("{:.1f}", "state MiB", "pods MiB"),
            at_most(0.6, "x"),
        ),
        ("k8svent peak RSS, steady relist, MiB", cells("{:.0f}", "steady rss"), at_most(100)),
        ("k8svent peak RSS, first poll, MiB", cells("{:.0f}", "first rss"), at_most(100)),
        ("kubectl peak RSS (either), MiB", cells("{:.0f}", "kubectl rss"), at_most(64)),
        ("floor peak RSS (ijson process), MiB", cells("{:.0f}", "floor rss"), None),
        ("retained bytes/pod between polls", cells("{:.0f}", "retained"), at_most(400)),
        (
            "original: `get pods -A -o json` + json.loads, wall s",
            cells("{:.2f}", "original wall", "floor", above),
            None,
        ),
        ("original: Python peak RSS, MiB", cells("{:.0f}", "original rss", absent=above), None),
        (
            "original: kubectl peak RSS, MiB",
            cells("{:.0f}", "original kubectl rss", absent=above),
            None,
        ),
    ]
    watch = (
        f"watch, {args.latency_pods:,} pods, {args.changes_per_second:g} changes/s "
        f"for {args.latency_seconds:g} s:"
    )
    if isinstance(latency, str):
        lines.append(
            ("watch: event to webhook receipt, CPU, peak RSS", single(Cell(latency, None)), None)
        )
    else:
        n = args.latency_pods
        made, delivered = latency["made"], latency["delivered"]
        lines += [
            (
                f"{watch} event to webhook receipt p50, s",
                single(Cell(f"{latency['p50']:.3f}", None), n),
                None,
            ),
            (
                f"{watch} event to webhook receipt p99, s",
                single(Cell(f"{latency['p99']:.3f}", latency["p99"]), n),
                at_most(1),
            ),
            (
                f"{watch} changes received / made (all runs)",
                single(Cell(f"{delivered:,} / {made:,}", delivered / made), n),
                Target("all", 1, False),
            ),
            (
                f"{watch} k8svent CPU, cores",
                single(Cell(f"{latency['cpu cores']:.2f}", latency["cpu cores"]), n),
                at_most(0.5),
            ),
            (
                f"{watch} k8svent CPU per change, ms (kubectl's)",
                single(
                    Cell(
                        f"{latency['cpu ms per change']:.2f} "
                        f"({latency['kubectl cpu ms per change']:.2f})",
                        latency["cpu ms per change"],
                    ),
                    n,
                ),
                at_most(1),
            ),
            (
                f"{watch} kubectl CPU, cores",
                single(Cell(f"{latency['kubectl cpu cores']:.2f}", None), n),
                None,
            ),
            (
                f"{watch} k8svent peak RSS (list + watch), MiB",
                single(Cell(f"{latency['rss']:.0f}", latency["rss"]), n),
                at_most(100),
            ),
            (
                f"{watch} kubectl peak RSS (list + watch), MiB",
                single(Cell(f"{latency['kubectl rss']:.0f}", latency["kubectl rss"]), n),
                at_most(64),
            ),
        ]
    duration = 15  # --lease-duration's default
    if isinstance(takeover, str):
        lines.append(("takeover after kill -9 of the holder", single(Cell(takeover, None)), None))
    else:
        n = args.takeover_pods
        lines += [
            (
                f"takeover, {n:,} pods: kill -9 of the holder to the first owed change "
                "delivered, s",
                single(Cell(f"{takeover['first']:.1f}", takeover["first"]), n),
                at_most(2 * duration + 5),
            ),
            (
                f"takeover, {n:,} pods: pods delivered before and sent again",
                single(Cell(f"{takeover['resent']}", takeover["resent"]), n),
                at_most(100),
            ),
            (
                f"Lease, idle holder, {n:,} pods: k8svent + kubectl CPU, % of a core",
                single(Cell(f"{100 * takeover['holder']:.1f}", 100 * takeover["holder"]), n),
                at_most(3),
            ),
            (
                f"Lease, idle standby, {n:,} pods: k8svent + kubectl CPU, % of a core",
                single(Cell(f"{100 * takeover['standby']:.1f}", 100 * takeover["standby"]), n),
                at_most(3),
            ),
        ]
    name = f"deliveries/s to nginx, signed ({args.deliveries:,}) / http.client loop"
    if isinstance(delivery["nginx"], str):
        lines.append((name, single(Cell(delivery["nginx"], None)), at_least(0.4, "x")))
    else:
        ours, base = delivery["nginx"]
        lines.append(
            (
                name,
                single(Cell(f"{ours:.0f} / {base:.0f} ({ours / base:.2f}x)", ours / base)),
                at_least(0.4, "x"),
            )
        )
    ours, base = delivery["slow"]
    lines.append(
        (
            (f"deliveries/s to a 50 ms receiver ({args.slow_deliveries:,}) / workers/0.05 s"),
            single(Cell(f"{ours:.0f} / {base:.0f} ({ours / base:.2f}x)", ours / base)),
            at_least(0.8, "x"),
        )
    )

    columns = [f"{n:,} pods" for n in sizes]
    header = [f"measure (median of {args.runs} runs)", *columns, "target"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    misses, checks, absent = [], 0, []
    for name, values, target in lines:
        texts = []
        for column, cell in zip(columns, values, strict=True):
            checks += target is not None and cell.value is not None
            if cell.value is None and cell.text.startswith("not run"):
                absent.append(name)
            texts.append(checked(name, column, cell, target, misses))
        out.append("| " + " | ".join([name, *texts, target.text if target else ""]) + " |")
    out.append("")
    if misses:
        out.append(
            f"{MISS}: {len(misses)} of {checks} figures with a target miss it: "
            + "; ".join(misses)
            + "."
        )
    else:
        out.append(f"All {checks} figures with a target meet it.")
    if absent:
        out.append("Not run (the cell says why): " + "; ".join(dict.fromkeys(absent)) + ".")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000,150000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--original-max",
        type=int,
        default=10000,
        help="largest size to run the original algorithm at",
    )
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--slow-deliveries", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--latency-pods",
        type=int,
        default=20000,
        help="pods listed for the watch latency rows (0: skip them)",
    )
    parser.add_argument("--changes-per-second", type=float, default=300)
    parser.add_argument(
        "--takeover-pods",
        type=int,
        default=150000,
        help="pods listed for the takeover and Lease rows (0: skip them)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=20, help="how long pods change in each latency run"
    )
    parser.add_argument(
        "--resync-pods",
        type=int,
        default=50000,
        help="pods listed for the resync rows (0: skip them)",
    )
    parser.add_argument("--resync-changes-per-second", type=float, default=50)
    parser.add_argument("--resync-seconds", type=float, default=70)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else []
    resync_rows = None
    polls = {}
    latency = "not run: --latency-pods=0"
    takeover = "not run: --takeover-pods=0"
    receiver = Receiver().start()
    with tempfile.TemporaryDirectory(prefix="k8svent-bench-") as tmp:
        tmp = Path(tmp)
        todo = list(sizes)
        if args.latency_pods and args.latency_pods not in sizes:
            todo.append(args.latency_pods)
        if args.resync_pods and args.resync_pods not in todo:
            todo.append(args.resync_pods)
        if args.takeover_pods and args.takeover_pods not in todo:
            todo.append(args.takeover_pods)
        for n in todo:
            with FakeKubeAPI() as api:
                api.load_items(generate_items(n))
                env = {k: v for k, v in os.environ.items() if not k.startswith("K8SVENT_")}
                env["KUBECONFIG"] = str(api.kubeconfig(tmp / "kubeconfig"))
                env["KUBECACHEDIR"] = str(tmp / "kube-cache")
                print(f"{n:,} pods ...", file=sys.stderr, flush=True)
                # The state's scope names this API server (its port): one per size.
                state, size = prepare_state(n, api, env, tmp, receiver)
                if n in sizes:
                    polls[n] = bench_size(
                        n, args.runs, args.original_max, env, tmp, state, receiver
                    )
                    polls[n]["state MiB"] = size / MIB
                    polls[n]["pods MiB"] = pods_json_bytes(n) / MIB
                if n == args.latency_pods:
                    print(f"watch latency at {n:,} pods ...", file=sys.stderr, flush=True)
                    latency = bench_latency(api, env, tmp, state, receiver, args)
                if n == args.resync_pods:
                    print(f"resync beside the watch at {n:,} pods ...", file=sys.stderr, flush=True)
                    resync_rows = bench_resync(api, env, tmp, state, receiver, args)
                if n == args.takeover_pods:
                    print(f"takeover at {n:,} pods ...", file=sys.stderr, flush=True)
                    takeover = bench_takeover(api, env, tmp, state, receiver, n)
                for path in tmp.glob(f"state-{n}.db*"):
                    path.unlink()
            gc.collect()
        receiver.stop()
        print("deliveries ...", file=sys.stderr, flush=True)
        delivery = bench_delivery(args, tmp)
    print(table(sizes, polls, delivery, latency, takeover, args))
    if resync_rows:
        print()
        print(resync_table(resync_rows, args.resync_pods, args))


if __name__ == "__main__":
    main()
