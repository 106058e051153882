"""Webhook receivers for tests: real HTTP servers on 127.0.0.1, port 0."""

import collections
import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks

Received = collections.namedtuple("Received", "path headers body")


class _Server(ThreadingHTTPServer):
    """Keeps its open connections, so that going down cuts keep-alive ones."""

    daemon_threads = True

    def __init__(self, *args):
        self.connections = set()
        self._lock = threading.Lock()
        super().__init__(*args)

    def process_request(self, request, client_address):
        with self._lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self):
        with self._lock:
            for connection in list(self.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self.connections.clear()


def signature_problem(secret, headers, body):
    """Why a request's signatures do not verify with a secret, or None.

    Standard Webhooks is checked by its reference package, as a receiver
    would: Webhook(secret) for a whsec_ secret, else Webhook(secret.encode()).
    """
    if secret is None:
        return (
            "signed, but the receiver has no secret"
            if "webhook-signature" in headers or "x-atomist-signature" in headers
            else None
        )
    verifier = standardwebhooks.Webhook(secret if secret.startswith("whsec_") else secret.encode())
    try:
        verifier.verify(body, headers, json_parse=False)
    except standardwebhooks.webhooks.WebhookVerificationError as exc:
        return f"Standard Webhooks: {exc}"
    for header, name, digest in (
        ("x-atomist-signature", "sha1", hashlib.sha1),
        ("x-hub-signature-256", "sha256", hashlib.sha256),
    ):
        expected = f"{name}=" + hmac.new(secret.encode(), body, digest).hexdigest()
        if not hmac.compare_digest(headers.get(header, ""), expected):
            return f"{header} does not verify"
    return None


# What `respond` may return besides an answer: cut the connection with a TCP
# reset, or close it without a word.
RESET = "reset"
CLOSE = "close"


class Receiver:
    """Records every POST; answers with scripted statuses (200 when none left).

    `answers` is a list of statuses or (status, headers, body) tuples, taken
    in order. `respond(request)`, when given, answers instead: it is called in
    the request's own thread (it may sleep, for a slow answer) and returns a
    status, a (status, headers, body) tuple, RESET or CLOSE. `down()` closes
    the listening socket (connections are refused) and `up()` listens again on
    the same port. With a `secret`, every request must verify (all three
    signatures); without, none may be signed. A request that fails is answered
    401 and its reason kept in `problems`.
    """

    def __init__(self, answers=(), secret=None, respond=None):
        self.received = []
        self.requests = []  # every request, whatever the answer
        self.problems = []
        self.secret = secret
        self.answers = collections.deque(answers)
        self.respond = respond
        self.statuses = []
        self._cond = threading.Condition()
        self._server = None
        self.port = 0
        self.up()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                problem = signature_problem(receiver.secret, request.headers, body)
                with receiver._cond:
                    receiver.requests.append(request)
                    receiver._cond.notify_all()
                    if problem:
                        receiver.problems.append(problem)
                        answer = 401
                    elif receiver.respond is None:
                        answer = receiver.answers.popleft() if receiver.answers else 200
                    else:
                        answer = None
                if answer is None:
                    answer = receiver.respond(request)
                if answer in (RESET, CLOSE):
                    self._hang_up(answer)
                    return
                status, headers, reply = answer if isinstance(answer, tuple) else (answer, {}, b"")
                with receiver._cond:
                    # Recorded before the answer goes out: the next delivery
                    # of a pod never overtakes this one in `received`.
                    if 200 <= status < 300:
                        receiver.received.append(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                with receiver._cond:
                    receiver.statuses.append(status)
                    receiver._cond.notify_all()

            def _hang_up(self, how):
                """No answer: a TCP reset (RESET) or a plain close (CLOSE)."""
                self.close_connection = True
                if how == RESET:
                    # Linger 0: the close sends RST instead of FIN. Closed here,
                    # before the server's shutdown() would send a FIN.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    os.close(self.connection.detach())
                with receiver._cond:
                    receiver.statuses.append(how)
                    receiver._cond.notify_all()

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self):
        """Stop listening and cut every open connection."""
        self._server.shutdown()
        self._server.server_close()
        self._server.cut_connections()

    def wait_for(self, count, timeout=20):
        """Wait until `count` deliveries were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.received)} of {count} deliveries arrived: "
                        f"{sorted(self.keys())}; refused: {self.problems}"
                    )
                self._cond.wait(left)
            return list(self.received)

    def wait_attempts(self, count, timeout=20):
        """Wait until `count` requests were answered, whatever the status."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.statuses) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.statuses)} of {count} attempts")
                self._cond.wait(left)

    def wait_for_pods(self, predicate, what="the condition", timeout=20):
        """Wait until predicate(pods received so far) is true; return those pods."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(pods := [json.loads(r.body)["pod"] for r in self.received]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} in {len(pods)} deliveries")
                self._cond.wait(left)
            return pods

    def pods(self):
        """The pods received, in order."""
        with self._cond:
            return [json.loads(r.body)["pod"] for r in self.received]

    def keys(self):
        return [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in self.pods()]

    def latest(self):
        """{key: the pod last received under that key}."""
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in self.pods()}

    def wait_until(self, condition, timeout=20, what="the condition"):
        """Wait until condition() holds, looking again after each request."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                # Also look now and then: the condition may hang on more than requests.
                self._cond.wait(min(left, 0.2))

    def clear(self):
        with self._cond:
            self.received.clear()
            self.requests.clear()
            self.statuses.clear()

    def close(self):
        self.down()
