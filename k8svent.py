"""k8svent: send Kubernetes pods, as JSON, to webhook endpoints.

Usage:
  k8svent.py [options] [--url=URL ...] [--exclude-namespace=NS ...]
  k8svent.py check [options] [--url=URL ...] [--exclude-namespace=NS ...]
  k8svent.py --version
  k8svent.py -h | --help

Options:
  -u URL, --url=URL            Webhook URL to POST pods to; repeat for several.
                               Env: K8SVENT_WEBHOOKS (comma-separated), used
                               only when no URL is given here.
  -s SECRET, --secret=SECRET   Sign each payload with this secret.
                               Env: K8SVENT_WEBHOOK_SECRET.
  --secret-file=PATH           Read the signing secret from this file.
                               Env: K8SVENT_WEBHOOK_SECRET_FILE.
  -n NS, --namespace=NS        Only pods of this namespace (default: all).
                               Env: K8SVENT_NAMESPACE.
  --exclude-namespace=NS       Leave out the pods of this namespace; repeat
                               for several (not with --namespace).
                               Env: K8SVENT_EXCLUDE_NAMESPACES (comma-separated),
                               used only when none is given here.
  --selector=SELECTOR          Only pods whose labels match this Kubernetes
                               label selector, such as app=web,tier!=cache.
                               Env: K8SVENT_SELECTOR.
  -l LEVEL, --log-level=LEVEL  debug, info, warning or error.
                               Env: K8SVENT_LOG_LEVEL [default: info].
  --log-format=FORMAT          text, or json for one object per line.
                               Env: K8SVENT_LOG_FORMAT [default: text].
  --listen=ADDR:PORT           Serve /healthz, /readyz and /metrics on this
                               address, such as 0.0.0.0:8080 (default: off).
                               Env: K8SVENT_LISTEN.
  --mode=MODE                  watch: list, then report each change as the
                               API server sends it; poll: list every interval.
                               Env: K8SVENT_MODE [default: watch].
  --interval=SECONDS           Seconds between successful polls (poll), or
                               between re-sends of pods under duress (watch).
                               Env: K8SVENT_INTERVAL [default: 120].
  --resync=SECONDS             watch: list every pod this often and send what
                               the watch missed; 0 for never.
                               Env: K8SVENT_RESYNC [default: 600].
  --retry-interval=SECONDS     Seconds before listing again after a failure.
                               Env: K8SVENT_RETRY_INTERVAL [default: 30].
  --context=NAME               kubectl context (KUBECONFIG works as usual).
                               Env: K8SVENT_CONTEXT.
  --kubectl=PATH               The kubectl to run.
                               Env: K8SVENT_KUBECTL [default: kubectl].
  --kubectl-timeout=SECONDS    Kill a kubectl that runs longer than this.
                               Env: K8SVENT_KUBECTL_TIMEOUT [default: 60].
  --chunk-size=N               Pods per page of the API list.
                               Env: K8SVENT_CHUNK_SIZE [default: 5000].
  --workers=N                  Concurrent deliveries per webhook.
                               Env: K8SVENT_WORKERS [default: 8].
  --retry-budget=SECONDS       Log and count a delivery as failed once it has
                               been owed this long; it is still retried.
                               Env: K8SVENT_RETRY_BUDGET [default: 900].
  --state=PATH                 SQLite file that remembers what each webhook
                               got, across restarts (default: a temporary
                               file, removed at exit). Env: K8SVENT_STATE.
  --image=REPO                 Image repository to watch for newer versions
                               (auto: the one the pod runs, unless given).
                               Env: K8SVENT_IMAGE
                               [default: docker.io/atomist/k8svent].
  --upgrade=MODE               auto, always or never: exit (for Kubernetes to
                               restart onto the new image) when the registry
                               has a newer version; auto only in a pod that
                               runs a channel tag, once that tag has moved.
                               Env: K8SVENT_UPGRADE [default: auto].
  --upgrade-interval=SECONDS   Seconds between checks (+-10 %); 86400 when
                               running a release, 14400 a prerelease.
                               Env: K8SVENT_UPGRADE_INTERVAL.
  --lease=[NAMESPACE/]NAME     Deliver only while holding this Lease, renewed
                               within --lease-duration. Env: K8SVENT_LEASE.
  --lease-duration=SECONDS     Env: K8SVENT_LEASE_DURATION [default: 15].
  --once                       List once and deliver; exit 0 when every
                               delivery succeeded, 1 when one was refused or
                               still owed after --retry-budget.
  --format=FORMAT              k8svent, cloudevents or cloudevents-json.
                               Env: K8SVENT_FORMAT [default: k8svent].
  --send=KINDS                 new, changed, unhealthy, deleted, or all: the
                               changes to send. Env: K8SVENT_SEND [default: all].
  --dry-run                    Print each payload as a JSON line on stdout
                               instead of posting it; needs no URL.
  --version                    Print the version and exit.
  -h, --help                   Print this help and exit.

check: one line each on what a run with these options needs (kubectl, cluster,
permissions, a signed ping to each webhook, state file, secret); exit 0 or 1.
"""

import signal
import sys

if __name__ == "__main__":
    # Loading the modules below takes a second or two on a busy host: a Ctrl-C
    # meanwhile ends k8svent at once, with no traceback (the shell says 130).
    # The bottom of the file gives Ctrl-C back to Python for main().
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import fcntl
import functools
import hashlib
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import select
import shlex
import socket
import sqlite3
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import certifi
import docopt
import orjson
import prometheus_client
import prometheus_client.core
import prometheus_client.exposition
import requests
import requests.utils
import semver
import sh
import zstandard

# What a lone copy of k8svent.py calls itself. An image is stamped with its
# version (K8SVENT_VERSION); a git checkout computes it as .ci/version does.
__version__ = "0.0.0-dev"

# How it fits together. main() reads the Settings, opens the Store (SQLite: the
# snapshot of pods, their bodies, and an outbox per webhook) and starts:
#   - one Poller thread (--mode=poll) or Watcher thread (--mode=watch): it runs
#     kubectl (list, then watch), compares pods with the snapshot and, in one
#     transaction, updates the snapshot and upserts outbox rows: at most one
#     per (webhook, pod), always the pod's newest state;
#   - per webhook, a Sender with --workers threads (--dry-run's stdout: one):
#     each takes the earliest-due outbox row, POSTs it, and deletes the row or
#     moves its due time on;
#   - a StatusServer thread (--listen) for /healthz, /readyz and /metrics
#     (the metrics of the outbox are read from the Store at each scrape);
#   - an Upgrader thread, which asks main to stop when a newer image is out.
# Threads report; main() alone decides to exit (_shut_down, _exit_now).

# --- Constants ---------------------------------------------------------------

CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 30
REQUEST_DEADLINE_SECONDS = 30  # one POST: connect, send, the whole answer
BACKOFF_START_SECONDS = 0.5
BACKOFF_FACTOR = 1.5
BACKOFF_CAP_SECONDS = 60
DRAIN_SECONDS = 10
MAX_SECONDS = 365 * 86400  # far below threading.TIMEOUT_MAX
MAX_WAIT_SECONDS = 86400  # the longest a server's Retry-After makes us wait
# After this many connection-level failures in a row (refused, timeout, TLS,
# 5xx, 429) a webhook counts as down: one probe at a time until it answers.
DOWN_AFTER_FAILURES = 3
DOWN_LOG_SECONDS = 60  # while a webhook is down, a line this often
REFUSED_LOG_SECONDS = 60  # refused deliveries: one line per webhook this often
HOUSEKEEPING_SECONDS = 2  # how often a webhook's outbox is looked over
# Deliveries done are settled (their rows deleted) together, one transaction
# for those of up to this long or this many: a commit each costs more than
# the rows. Their lanes stay busy until then.
SETTLE_SECONDS = 0.05
SETTLE_BATCH = 64
EARLY_PROBE_SECONDS = 5  # new work probes a down webhook at most this often
PIPE_BUFFER_BYTES = 1 << 20
WATCH_TIMEOUT_SECONDS = 300
WATCH_READ_BYTES = 1 << 16
# Events that arrive within this of the first of a batch are applied with it:
# one transaction and one wake of the senders for a burst, at most this late.
WATCH_LINGER_SECONDS = 0.005
WATCH_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")
FOREIGN_TEXT_CHARS = 300
RESPONSE_BODY_BYTES = 1 << 16
ANSWER_LINE_BYTES = 1 << 16  # the longest status or header line of an answer
ANSWER_HEADERS = 100
CORRELATION_BODY_BYTES = 4096  # larger answers are not parsed for an id
LOG_LEVELS = ("debug", "info", "warning", "error")
MODES = ("watch", "poll")
WATCH_RESTART_REASONS = ("ended", "expired", "error")
RESYNC_OUTCOMES = ("success", "failure", "error")
WATCH_RELIST_AFTER = 3  # failed watches in a row before listing again
# A watch open this long, or with an event, ends the back-off of watches.
WATCH_STEADY_SECONDS = 5
TROUBLE_LOG_SECONDS = 60  # while a watch or resync keeps failing, a line this often
LIST_RESTARTS = 3  # lists started again after an expired continue token
LIST_PROGRESS_SECONDS = 5  # a list that takes longer logs its progress this often
LOG_FORMATS = ("text", "json")
FORMATS = ("k8svent", "cloudevents", "cloudevents-json")
# The kinds of change, by the rules that choose what is sent (SPEC section 2).
KINDS = ("new", "changed", "unhealthy", "deleted")
CLOUDEVENTS_TYPE_PREFIX = "com.atomist.k8svent.pod."
CLOUDEVENTS_PING_TYPE = "com.atomist.k8svent.ping"  # `check`'s test request
CLOUDEVENTS_JSON_TYPE = "application/cloudevents+json"
CLOUDEVENTS_SOURCE_UNKNOWN = "/k8svent"  # when kubectl cannot tell the API server
SIGNATURE_SHA1_HEADER = "x-atomist-signature"
SIGNATURE_SHA256_HEADER = "X-Hub-Signature-256"
WEBHOOK_ID_HEADER = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"
WEBHOOK_SECRET_PREFIX = "whsec_"
MESSAGE_ID_PREFIX = "msg_"
MESSAGE_ID_RANDOM_BYTES = 13  # 26 hex characters
# An outbox row that re-sends a pod under duress (not a change) has an id of
# its own; other rows are sent with their change's id (change_message_id).
RESEND_ID_PREFIX = "again_"
NAME_MAX_CHARS = 63  # a namespace, a label name or value
SUBDOMAIN_MAX_CHARS = 253  # a label key's prefix
DELETED_PHASE = "Deleted"
DEFAULT_IMAGE = "docker.io/atomist/k8svent"
UPGRADE_MODES = ("auto", "always", "never")
UPGRADE_RELEASE_SECONDS = 86400
UPGRADE_PRERELEASE_SECONDS = 14400
UPGRADE_ERROR_SECONDS = 3600
UPGRADE_JITTER_FRACTION = 0.10
UPGRADE_READY_WAIT_SECONDS = 0.5  # how often a wait for the first poll looks at stop
CHANNEL_TAGS = ("latest", "next")
REGISTRY_TIMEOUT_SECONDS = 30
REGISTRY_MAX_PAGES = 100
REGISTRY_BODY_BYTES = 1 << 20
REGISTRY_MAX_REDIRECTS = 5
# What a HEAD of a manifest accepts: the digest is that of the index (a
# multi-architecture image) or manifest the registry holds, as the kubelet
# records it in a container's imageID.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
RETRY_AFTER_MAX_SECONDS = 86400
REGISTRY_TOKEN_DEFAULT_SECONDS = 60
REGISTRY_CLIENT_ID = "k8svent"
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_API = "https://registry-1.docker.io"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Schemes an error message may name: anything else may be a token.
KNOWN_URL_SCHEMES = ("ftp", "ftps", "file", "ws", "wss", "mailto", "ssh", "git", "data")
# Signing secrets that are examples, never a user's choice: refused at start.
PLACEHOLDER_SECRETS = ("replace-me", "replaceme", "changeme", "change-me", "placeholder", "secret")
SECRET_HINT = (
    "in a cluster: kubectl -n k8svent create secret generic k8svent "
    "--from-literal=webhooks=URL --from-literal=secret=KEY; README.md, Deploying"
)
LEASE_MIN_SECONDS = 3
LEASE_RENEW_DEADLINE_SHARE = 2 / 3  # of the duration: client-go's 10 s of 15
LEASE_RETRY_SHARE = 2 / 15  # of the duration: client-go's 2 s of 15
# How often a holder renews the Lease (of its duration): a kubectl each, about
# 85-115 ms of CPU, under 2.3 % of a core every 5 s. A standby watches the Lease
# instead (one kubectl for as long as the Lease would last unrenewed, and a
# read when that watch ends): a release is seen at once.
LEASE_RENEW_SHARE = 1 / 3
LEASE_WATERMARK_ANNOTATION = "k8svent.atomist.com/watermarks"
LEASE_WATERMARK_ROWS = 10000  # a larger backlog keeps the last watermark
SERVICE_ACCOUNT_NAMESPACE_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

log = logging.getLogger("k8svent")


# --- Errors ------------------------------------------------------------------


class K8sventError(Exception):
    """Base of every error k8svent raises on purpose."""


class SettingsError(K8sventError):
    """Bad arguments or environment: reported in one line, exit status 2."""


class KubectlError(K8sventError):
    """kubectl failed, hung, or printed something that is not a pod list."""

    def __init__(self, message, stderr=b""):
        super().__init__(message)
        self.stderr = stderr


class PollStopped(KubectlError):
    """The poll was stopped (SIGTERM, upgrade) before it finished."""


class StateError(K8sventError):
    """The state file cannot be used (not corruption: that is set aside)."""


class Expired(KubectlError):
    """A continue token or a watch's resourceVersion the API server no longer has (410)."""


class OutputClosed(K8sventError):
    """--dry-run: whoever read stdout has closed it (`| head`)."""


class RegistryError(K8sventError):
    """A registry or token request failed; never holds a token."""

    def __init__(self, message, url=None, status=None, retry_after_seconds=None):
        super().__init__(message)
        self.url = url
        self.status = status
        self.retry_after_seconds = retry_after_seconds


# --- Settings ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the service is configured with, validated."""

    urls: tuple = ()
    secret: str | None = None
    namespace: str | None = None
    exclude_namespaces: tuple = ()
    selector: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    listen: tuple | None = None
    mode: str = "watch"
    interval: float = 120.0
    resync: float = 600.0
    retry_interval: float = 30.0
    context: str | None = None
    kubectl: str = "kubectl"
    kubectl_timeout: float = 60.0
    chunk_size: int = 5000
    workers: int = 8
    retry_budget: float = 900.0
    state: str | None = None
    image: str = DEFAULT_IMAGE
    image_given: bool = False  # --image or K8SVENT_IMAGE named the repository
    upgrade: str = "auto"
    upgrade_interval: float | None = None
    once: bool = False
    dry_run: bool = False
    repeated_urls: int = 0
    check: bool = False  # `k8svent.py check`: check what a run needs, then exit
    format: str = "k8svent"
    send: tuple = KINDS
    lease: tuple | None = None  # (namespace or None: the pod's own, name)
    lease_duration: float = 15.0

    def __repr__(self):
        # The secret and URL credentials must never reach a log line.
        shown = dataclasses.replace(
            self,
            secret="***" if self.secret else None,
            urls=tuple(redact_url(u) for u in self.urls),
        )
        fields = ", ".join(f"{f.name}={getattr(shown, f.name)!r}" for f in dataclasses.fields(self))
        return f"Settings({fields})"


_DEFAULT_RE = re.compile(r"\s*\[default: [^\]]*\]", re.IGNORECASE)


def _option_defaults(doc):
    """The [default: ...] of each long option in the usage text."""
    defaults = {}
    section = doc.split("Options:", 1)[1]
    for block in re.split(r"\n(?=\s*-)", section):
        name = re.search(r"--[a-z-]+", block)
        default = re.search(r"\[default: ([^\]]*)\]", block)
        if name and default:
            defaults[name.group()] = default.group(1)
    return defaults


_DEFAULTS = _option_defaults(__doc__)


def parse_arguments(argv):
    """Parse the command line against the usage text, without defaults."""
    # docopt fills in defaults, which would hide whether a flag was given and
    # so whether the environment should be read; the defaults are applied in
    # settings_from() instead.
    try:
        return docopt.docopt(_DEFAULT_RE.sub("", __doc__), argv, default_help=False)
    except docopt.DocoptExit as exc:
        message = str(exc).strip()
        first = message.splitlines()[0] if message else ""
        unknown = re.findall(r"(?:Option|Argument)\([^']*'([^']*)'", first)
        if unknown:
            detail = "unexpected argument " + ", ".join(unknown)
        elif first and not first.startswith("Usage"):
            detail = first
        else:
            detail = "unexpected arguments"
        raise SettingsError(f"{detail} (see --help)") from None


def _number(name, text, kind=float, minimum=0):
    """Convert an option's text to a number, or raise SettingsError."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(value) or value > MAX_SECONDS:
        raise SettingsError(
            f"{name} must be a finite number of at most {MAX_SECONDS}, not {text!r}"
        )
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {text!r}")
    return value


def _check_url(url):
    """Return the URL if it is an absolute http(s) URL, else raise."""
    # The messages name no part of the URL but a well-known scheme: the rest
    # (and a "scheme" that is really a user name) may hold a token.
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise SettingsError(
            "invalid webhook URL: its host or port cannot be read "
            "(the URL is not shown: it may hold a token)"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        scheme = parts.scheme.lower()
        shown = (
            f"the scheme {scheme!r}"
            if scheme in KNOWN_URL_SCHEMES
            else "another scheme (not shown: it may be a user name)"
            if scheme
            else "no scheme (a missing '://'?)"
        )
        raise SettingsError(
            f"webhook URL must start with http:// or https://; this one has {shown}"
        )
    if not is_host(parts.hostname):
        raise SettingsError(
            f"invalid webhook URL {escape_controls(redact_url(url))}: the host is neither "
            f"a host name nor an IP address"
        )
    return url


_HOST_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def is_host(hostname):
    """Whether a URL's (lower-cased) host is an IP address or a DNS name, IDNs included."""
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        pass
    try:
        ascii_name = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_name.removesuffix(".").split(".")
    return len(ascii_name) <= SUBDOMAIN_MAX_CHARS and all(
        _HOST_LABEL_RE.fullmatch(label) for label in labels
    )


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def parse_listen(text, name="--listen"):
    """(host, port) from ADDR:PORT ([ADDR]:PORT for IPv6), or raise."""
    bad = SettingsError(f"{name} must be ADDR:PORT, such as 0.0.0.0:8080, not {text!r}")
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise bad
    if not colon or not port.isdigit() or int(port) > 65535:
        raise bad
    return host, int(port)


def settings_from(args, environ):
    """Build the Settings from docopt's arguments and the environment."""

    given = {}  # flag -> how errors name it: what the user typed it as

    def pick(flag, variable):
        value = args.get(flag)
        given[flag] = flag
        if value is None or value is False:
            value = environ.get(variable) or None
            given[flag] = f"{variable} ({flag})"
        if value is None:
            value = _DEFAULTS.get(flag)
            given[flag] = flag
        return value

    def number(flag, variable, kind=float, minimum=0):
        return (
            _number(given[flag], pick(flag, variable), kind, minimum)
            if pick(flag, variable) is not None
            else None
        )

    def choice(flag, variable, choices):
        value = pick(flag, variable).lower()
        if value not in choices:
            raise SettingsError(
                f"{given[flag]} must be {', '.join(choices[:-1])} or {choices[-1]}, not {value!r}"
            )
        return value

    urls = args.get("--url") or []
    if not urls:
        urls = [u.strip() for u in environ.get("K8SVENT_WEBHOOKS", "").split(",")]
    urls = [_check_url(u) for u in urls if u]
    repeated_urls = len(urls) - len(set(urls))
    urls = tuple(dict.fromkeys(urls))

    secret = args.get("--secret")
    secret_file = args.get("--secret-file")
    if secret is None and secret_file is None:
        secret = environ.get("K8SVENT_WEBHOOK_SECRET") or None
        secret_file = environ.get("K8SVENT_WEBHOOK_SECRET_FILE") or None
    secret_source = "--secret" if secret is not None else "K8SVENT_WEBHOOK_SECRET"
    if args.get("--secret") is not None and os.path.isfile(secret):
        # The value is a file's name, not a secret: never sign with it.
        raise SettingsError("--secret names a file: did you mean --secret-file?")
    if secret is None and secret_file is not None:
        secret_source = f"secret file {secret_file!r}"
        try:
            with open(secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except FileNotFoundError:
            raise SettingsError(
                f"secret file {secret_file!r} does not exist (make one: umask 077 && "
                f"openssl rand -hex 32 > {shlex.quote(secret_file)}; {SECRET_HINT})"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"cannot read secret file {secret_file!r}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        if not secret:
            raise SettingsError(f"secret file {secret_file!r} is empty ({SECRET_HINT})")
    if secret is not None and secret.lower() in PLACEHOLDER_SECRETS:
        # Never the secret in a message; a placeholder is not one.
        raise SettingsError(
            f"the signing secret ({secret_source}) is still the placeholder "
            f"{secret!r} ({SECRET_HINT})"
        )

    log_level = choice("--log-level", "K8SVENT_LOG_LEVEL", LOG_LEVELS)
    log_format = choice("--log-format", "K8SVENT_LOG_FORMAT", LOG_FORMATS)

    image = pick("--image", "K8SVENT_IMAGE")
    try:
        parse_image(image)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    upgrade = choice("--upgrade", "K8SVENT_UPGRADE", UPGRADE_MODES)
    upgrade_interval = number("--upgrade-interval", "K8SVENT_UPGRADE_INTERVAL", minimum=1)
    running = version(environ)
    if upgrade != "never" and parse_version(running) is None:
        raise SettingsError(
            f"version {running!r} (K8SVENT_VERSION) is not a "
            f"semantic version; fix it or use --upgrade=never"
        )
    mode = choice("--mode", "K8SVENT_MODE", MODES)
    listen = pick("--listen", "K8SVENT_LISTEN")
    listen = parse_listen(listen, given["--listen"]) if listen else None
    if secret is not None and secret.startswith(WEBHOOK_SECRET_PREFIX):
        try:
            standard_webhooks_key(secret)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    namespace = pick("--namespace", "K8SVENT_NAMESPACE") or None
    if namespace is not None:
        _check_namespace(namespace, "K8SVENT_NAMESPACE (--namespace)")
    excluded = args.get("--exclude-namespace") or []
    if not excluded:
        excluded = [environ.get("K8SVENT_EXCLUDE_NAMESPACES", "")]
    excluded = [n.strip() for names in excluded for n in names.split(",")]
    excluded = tuple(
        sorted(
            {
                _check_namespace(n, "K8SVENT_EXCLUDE_NAMESPACES (--exclude-namespace)")
                for n in excluded
                if n
            }
        )
    )
    if excluded and namespace is not None:
        raise SettingsError(
            "K8SVENT_EXCLUDE_NAMESPACES (--exclude-namespace) cannot be "
            "combined with K8SVENT_NAMESPACE (--namespace)"
        )
    selector = pick("--selector", "K8SVENT_SELECTOR")
    if selector:
        try:
            selector = format_label_selector(parse_label_selector(selector))
        except ValueError as exc:
            raise SettingsError(
                f"K8SVENT_SELECTOR (--selector) {selector!r} is not a label selector: {exc}"
            ) from None

    send = parse_kinds(pick("--send", "K8SVENT_SEND"), given["--send"])
    lease = pick("--lease", "K8SVENT_LEASE")
    lease = parse_lease(lease, given["--lease"]) if lease else None
    lease_duration = number("--lease-duration", "K8SVENT_LEASE_DURATION", minimum=LEASE_MIN_SECONDS)
    if lease is not None and args.get("--once"):
        raise SettingsError(f"{given['--lease']} cannot be combined with --once")

    dry_run = bool(args.get("--dry-run"))
    if not urls and not dry_run:
        raise SettingsError("no webhook URL: give --url or K8SVENT_WEBHOOKS (or --dry-run)")

    return Settings(
        urls=urls,
        secret=secret,
        namespace=namespace,
        exclude_namespaces=excluded,
        selector=selector or None,
        log_level=log_level,
        log_format=log_format,
        listen=listen,
        mode=mode,
        interval=number("--interval", "K8SVENT_INTERVAL"),
        resync=number("--resync", "K8SVENT_RESYNC"),
        retry_interval=number("--retry-interval", "K8SVENT_RETRY_INTERVAL"),
        context=pick("--context", "K8SVENT_CONTEXT"),
        kubectl=pick("--kubectl", "K8SVENT_KUBECTL"),
        kubectl_timeout=number("--kubectl-timeout", "K8SVENT_KUBECTL_TIMEOUT", minimum=1),
        chunk_size=number("--chunk-size", "K8SVENT_CHUNK_SIZE", int, minimum=1),
        workers=number("--workers", "K8SVENT_WORKERS", int, minimum=1),
        retry_budget=number("--retry-budget", "K8SVENT_RETRY_BUDGET"),
        state=pick("--state", "K8SVENT_STATE"),
        image=image,
        image_given=bool(args.get("--image") or environ.get("K8SVENT_IMAGE")),
        upgrade=upgrade,
        upgrade_interval=upgrade_interval,
        once=bool(args.get("--once")),
        dry_run=dry_run,
        repeated_urls=repeated_urls,
        check=bool(args.get("check")),
        format=choice("--format", "K8SVENT_FORMAT", FORMATS),
        send=send,
        lease=lease,
        lease_duration=lease_duration,
    )


def parse_kinds(text, name="--send"):
    """The kinds of change named in a comma-separated list (or all), in KINDS order, or raise."""
    named = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in named if kind.lower() not in (*KINDS, "all")]
    if unknown or not named:
        raise SettingsError(
            f"{name}: unknown kind {', '.join(map(repr, unknown))}; choose among "
            f"{', '.join(KINDS)}, or all"
            if unknown
            else f"{name} names no kind; choose among {', '.join(KINDS)}, or all"
        )
    named = {kind.lower() for kind in named}
    return KINDS if "all" in named else tuple(kind for kind in KINDS if kind in named)


_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_lease(text, name="--lease"):
    """(namespace or None, name) from [NAMESPACE/]NAME, or raise SettingsError."""
    namespace, _, lease = text.rpartition("/")
    if namespace:
        _check_namespace(namespace, name)
    if not (len(lease) <= SUBDOMAIN_MAX_CHARS and _SUBDOMAIN_RE.fullmatch(lease)):
        raise SettingsError(
            f"{name} must be [NAMESPACE/]NAME, NAME a lower-case DNS name such as "
            f"k8svent, not {text!r}"
        )
    return namespace or None, lease


# --- Pods: health and payloads -----------------------------------------------


def pod_key(pod):
    """The identity of a pod: namespace/name."""
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def container_healthy(status, init):
    """Whether one (init) container status counts as healthy."""
    state = status.get("state") or {}
    if not status.get("ready") or "waiting" in state:
        return False
    if init:
        terminated = state.get("terminated")
        if terminated is not None:
            return terminated.get("exitCode") == 0
        return "running" in state
    return "terminated" not in state and "running" in state


def pod_healthy(pod):
    """Whether a pod is healthy by the rules of SPEC section 2."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    if any(c.get("status") != "True" for c in status.get("conditions") or ()):
        return False
    if not all(container_healthy(s, True) for s in status.get("initContainerStatuses") or ()):
        return False
    return all(container_healthy(s, False) for s in status.get("containerStatuses") or ())


def pod_under_duress(pod):
    """Whether a pod is re-sent every poll: unhealthy and not completed."""
    # A Succeeded pod (a finished Job) is not in trouble: send it on change.
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", DELETED_PHASE) and not pod_healthy(pod)


def _looks_like_pod(item):
    """Whether a list item has the shape of a pod (objects where pods have them)."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("metadata"), dict)
        and all(isinstance(item.get(field, {}), dict) for field in ("spec", "status"))
    )


def pod_from_item(item):
    """Turn a PodList item into what `kubectl get pod -o json` prints."""
    (item.get("metadata") or {}).pop("managedFields", None)
    pod = {"apiVersion": "v1", "kind": "Pod"}
    pod.update(item)
    return pod


def encode_pod(pod):
    """The compact JSON bytes of a pod."""
    # orjson is about eight times faster than json here, and every pod of
    # every poll is encoded to fingerprint it. It refuses integers beyond 64
    # bits, which json takes.
    try:
        return orjson.dumps(pod)
    except TypeError:
        return json.dumps(pod, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(pod_bytes):
    """A short digest that changes whenever anything in the pod changes."""
    return hashlib.blake2b(pod_bytes, digest_size=16).digest()


def payload(pod_bytes):
    """The request body for a pod: {"pod": POD}."""
    return b'{"pod":' + pod_bytes + b"}"


def mark_deleted(pod_bytes):
    """The last known pod, with status.phase set to Deleted."""
    pod = json.loads(pod_bytes)
    pod.setdefault("status", {})["phase"] = DELETED_PHASE
    return encode_pod(pod)


def pod_subject(key):
    """The API path of the pod a key (or a deleted pod's KEY#UID) names."""
    namespace, _, name = key.partition(_GONE_SEPARATOR)[0].partition("/")
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def cloudevents_time(unix_seconds):
    """A Unix time as RFC 3339 in UTC with microseconds: 2026-12-05T08:00:00.000000Z."""
    moment = datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def cloudevents_source(server):
    """The CloudEvents source of a cluster: its API server URL without user info or query."""
    if not server:
        return CLOUDEVENTS_SOURCE_UNKNOWN
    parts = urllib.parse.urlsplit(server)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path.rstrip("/"), "", ""))


# What a ce-* header may hold as it is (CloudEvents HTTP binding 3.1.3.2):
# printable ASCII but space, double quote and percent; the rest is %-encoded.
_CE_HEADER_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in ' "%')


def message(fmt, kind, key, pod_bytes, message_id, seen, source):
    """(body, headers) of one delivery of a pod in a --format (SPEC sections 3 and 11)."""
    if fmt == "k8svent":
        return payload(pod_bytes), {"Content-Type": "application/json"}
    attributes = {
        "specversion": "1.0",
        "id": message_id,
        "source": source,
        "type": CLOUDEVENTS_TYPE_PREFIX + kind,
        "subject": pod_subject(key),
        "time": cloudevents_time(seen),
    }
    return cloudevent(fmt, attributes, pod_bytes)


def cloudevent(fmt, attributes, data):
    """(body, headers) of a CloudEvent with JSON `data` (bytes) in a --format's mode."""
    if fmt == "cloudevents":  # binary mode: the data is the body
        headers = {"Content-Type": "application/json"}
        for name, value in attributes.items():
            headers[f"ce-{name}"] = urllib.parse.quote(value, safe=_CE_HEADER_SAFE)
        return data, headers
    # Structured mode: the attributes and the data (as it is) in one object.
    head = json.dumps({**attributes, "datacontenttype": "application/json"}, separators=(",", ":"))
    return head.encode()[:-1] + b',"data":' + data + b"}", {"Content-Type": CLOUDEVENTS_JSON_TYPE}


# --- Delivery: signatures, back-off, what logs may show ------------------------


def standard_webhooks_key(secret):
    """The Standard Webhooks key: whsec_<base64> decoded, else the UTF-8 bytes."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return secret.encode()
    text = secret[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        # Padding may be left out, as the standardwebhooks package allows.
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        # Never the secret itself in the message: it ends up in logs.
        raise ValueError(
            f"the secret starts with {WEBHOOK_SECRET_PREFIX} but the rest is "
            f"not base64 of at least one byte"
        )
    return key


def new_message_id():
    """A new Standard Webhooks message id: msg_ and 26 random hex digits."""
    return MESSAGE_ID_PREFIX + secrets.token_hex(MESSAGE_ID_RANDOM_BYTES)


def change_message_id(pod_bytes):
    """The webhook-id of a change: one per (pod uid, resourceVersion, kind), on any replica."""
    pod = orjson.loads(pod_bytes)
    metadata = pod.get("metadata") or {}
    deleted = (pod.get("status") or {}).get("phase") == DELETED_PHASE
    return _change_id(metadata.get("uid"), metadata.get("resourceVersion"), deleted)


def _change_id(uid, resource_version, deleted):
    """change_message_id from a pod's uid and resourceVersion, and whether it was deleted."""
    change = f"{uid}|{resource_version}|{'deleted' if deleted else 'changed'}"
    return (
        MESSAGE_ID_PREFIX
        + hashlib.sha256(change.encode()).hexdigest()[: 2 * MESSAGE_ID_RANDOM_BYTES]
    )


def delivery_message_id(owed):
    """The webhook-id of an outbox row: its change's, or a new one for a deliberate re-send."""
    if owed.msg_id.startswith(RESEND_ID_PREFIX):  # a pod under duress, sent again
        return MESSAGE_ID_PREFIX + owed.msg_id[len(RESEND_ID_PREFIX) :]
    if owed.rv is not None:  # as the body says, without reading it
        return _change_id(owed.uid, owed.rv, owed.deleted)
    return change_message_id(owed.body)


def sign(body, secret, message_id=None, timestamp=None):
    """Signature headers of a body; with an id and Unix time, Standard Webhooks' too."""
    key = secret.encode()
    headers = {
        SIGNATURE_SHA1_HEADER: "sha1=" + hmac.new(key, body, hashlib.sha1).hexdigest(),
        SIGNATURE_SHA256_HEADER: "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
    }
    if message_id is not None:
        timestamp = int(timestamp)
        signed = f"{message_id}.{timestamp}.".encode() + body
        digest = hmac.new(standard_webhooks_key(secret), signed, hashlib.sha256).digest()
        headers[WEBHOOK_ID_HEADER] = message_id
        headers[WEBHOOK_TIMESTAMP_HEADER] = str(timestamp)
        headers[WEBHOOK_SIGNATURE_HEADER] = "v1," + base64.b64encode(digest).decode()
    return headers


def redact_url(url):
    """A URL fit for logs: scheme://host:port, ***@ for any user info, no path or query."""
    # A user name alone may be a token (https://TOKEN@host/), and paths and
    # queries often hold one: none of them is shown.
    label = endpoint_label(url)
    if "@" in urllib.parse.urlsplit(url).netloc:
        label = label.replace("://", "://***@", 1)
    return label


def endpoint_label(url):
    """scheme://host:port of a URL: no credentials, path or query."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def backoff_delay(attempts, rng=random):
    """The delay after a delivery's attempts-th failed attempt (0.5 s x1.5, +-50 %, <= 60 s)."""
    delay = min(
        BACKOFF_START_SECONDS * BACKOFF_FACTOR ** min(attempts - 1, 64), BACKOFF_CAP_SECONDS
    )
    return delay * rng.uniform(0.5, 1.5)


def retry_after_seconds(value, now=None):
    """Seconds to wait from a Retry-After header (seconds or HTTP date)."""
    if not value:
        return None
    # Clamped: Event.wait refuses anything beyond threading.TIMEOUT_MAX.
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), RETRY_AFTER_MAX_SECONDS)


def cut(text, limit=FOREIGN_TEXT_CHARS):
    """Foreign text (stderr, response bodies) cut to a bounded length, on one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return escape_controls(text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text):
    """Text with its control characters escaped as Python does (\\n, \\x1b)."""
    # A newline in a pod name must not start a forged log line, nor an ESC
    # sequence reach a terminal.
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


# --- Selection: which pods are listed ---------------------------------------

# Kubernetes' grammar of names (apimachinery's validation package).
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
# A label selector's tokens, as apimachinery's lexer splits them.
_SELECTOR_TOKEN_RE = re.compile(r"!=|==|=|!|\(|\)|,|<|>|[^\s!=,()<>]+")
_SET_OPERATORS = ("in", "notin")
_VALUE_OPERATORS = ("=", "==", "!=", "<", ">")


def is_namespace_name(name):
    """Whether a name is a valid namespace name (an RFC 1123 DNS label)."""
    return len(name) <= NAME_MAX_CHARS and _DNS_LABEL_RE.fullmatch(name) is not None


def _check_namespace(name, source):
    """Return a namespace name, or raise SettingsError naming its source."""
    if not is_namespace_name(name):
        raise SettingsError(
            f"{source} {name!r} is not a namespace name (at most "
            f"{NAME_MAX_CHARS} lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit)"
        )
    return name


def _check_label_key(key):
    """Return a label key ([prefix/]name), or raise ValueError."""
    if key is None:
        raise ValueError("expected a label key, found the end")
    if key in (",", "(", ")", "!", *_VALUE_OPERATORS, *_SET_OPERATORS):
        raise ValueError(f"expected a label key, found {key!r}")
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > SUBDOMAIN_MAX_CHARS or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        raise ValueError(f"the prefix of label key {key!r} is not a DNS subdomain")
    if len(name) > NAME_MAX_CHARS or not _LABEL_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{key!r} is not a label key (a name of at most "
            f"{NAME_MAX_CHARS} letters, digits, '-', '_' and '.', "
            f"starting and ending with a letter or digit)"
        )
    return key


def _check_label_value(value):
    """Return a label value (may be empty), or raise ValueError."""
    if value and (len(value) > NAME_MAX_CHARS or not _LABEL_NAME_RE.fullmatch(value)):
        raise ValueError(
            f"{value!r} is not a label value (at most {NAME_MAX_CHARS} "
            f"letters, digits, '-', '_' and '.', starting and ending "
            f"with a letter or digit)"
        )
    return value


def parse_label_selector(text):
    """The requirements of a label selector, (key, operator, values), or ValueError.

    The operators are Kubernetes': = == != in notin < >, "exists" for a bare
    key and "!" for !key. An empty selector selects every pod.
    """
    tokens = _SELECTOR_TOKEN_RE.findall(text)
    requirements = []
    i = 0

    def at(index):
        return tokens[index] if index < len(tokens) else None

    while tokens:
        if at(i) == "!":
            requirements.append((_check_label_key(at(i + 1)), "!", ()))
            i += 2
        else:
            key = _check_label_key(at(i))
            operator = at(i + 1)
            i += 2
            if operator in (None, ","):
                requirements.append((key, "exists", ()))
                i -= 1
            elif operator in _SET_OPERATORS:
                if at(i) != "(":
                    raise ValueError(f"expected ( after {key} {operator}")
                values, i = set(), i + 1
                while True:
                    value = "" if at(i) in (",", ")", None) else at(i)
                    values.add(_check_label_value(value))
                    i += 1 if value else 0
                    if at(i) == ")":
                        break
                    if at(i) != ",":
                        raise ValueError(f"expected , or ) in the values of {key}")
                    i += 1
                i += 1
                requirements.append((key, operator, tuple(sorted(values))))
            elif operator in _VALUE_OPERATORS:
                value = "" if at(i) in (",", None) else at(i)
                _check_label_value(value)
                if operator in ("<", ">") and not re.fullmatch(r"-?[0-9]+", value):
                    raise ValueError(f"{key}{operator} needs an integer, not {value!r}")
                requirements.append((key, operator, (value,)))
                i += 1 if value else 0
            else:
                raise ValueError(f"expected an operator after {key}, found {operator!r}")
        if at(i) is None:
            break
        if at(i) != ",":
            raise ValueError(f"expected , or the end, found {at(i)!r}")
        i += 1
    return tuple(requirements)


def format_label_selector(requirements):
    """The text of parsed requirements, spaced as Kubernetes prints them."""
    terms = []
    for key, operator, values in requirements:
        if operator == "exists":
            terms.append(key)
        elif operator == "!":
            terms.append("!" + key)
        elif operator in _SET_OPERATORS:
            terms.append(f"{key} {operator} ({','.join(values)})")
        else:
            terms.append(f"{key}{operator}{values[0]}")
    return ",".join(terms)


# --- Versions ----------------------------------------------------------------

# Repository path components, as the OCI distribution spec defines them.
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]+)?")

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def parse_version(tag):
    """Return the semantic version a tag names (a leading 'v' allowed), else None."""
    text = tag[1:] if tag.startswith("v") else tag
    try:
        return semver.Version.parse(text)
    except (ValueError, TypeError):
        return None


def is_release(version):
    """Tell whether a semantic version has no prerelease part."""
    return version.prerelease is None


def newer_version(current, tags):
    """Return the tag of the newest version strictly newer than current, else None.

    A release only looks at release tags; a prerelease looks at every
    semantic version tag, so it may move to a release. Other tags are ignored.
    """
    running = parse_version(current)
    if running is None:
        raise ValueError(f"not a semantic version: {current!r}")
    best_tag, best = None, running
    for tag in tags:
        candidate = parse_version(tag)
        if candidate is None:
            continue
        if is_release(running) and not is_release(candidate):
            continue
        if candidate > best:
            best_tag, best = tag, candidate
    return best_tag


def non_version_tags(tags):
    """Return the tags that are not semantic versions, in order."""
    return [tag for tag in tags if parse_version(tag) is None]


def split_image_ref(image_ref):
    """Split IMAGE[:TAG][@DIGEST] into (name, tag or None, digest or None)."""
    name, _, digest = image_ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, (digest or None)


def parse_image(image):
    """Turn an image repository into (registry base URL, repository path).

    Docker's rule: the first component is a registry host when it has a '.'
    or ':' or is 'localhost'; otherwise the image is on Docker Hub, where a
    single-component name lives under 'library/'. Plain http is used only for
    loopback hosts. A tag or digest is rejected: --image names a repository.
    """
    name, tag, digest = split_image_ref(image)
    if tag is not None or digest is not None:
        raise ValueError(f"image must be a repository without tag or digest: {image!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = "docker.io", name
    if not _HOST.fullmatch(host):
        raise ValueError(f"invalid registry host in image {image!r}")
    components = path.split("/")
    if not all(_REPO_COMPONENT.fullmatch(part) for part in components):
        raise ValueError(f"invalid repository name in image {image!r}")
    if host.lower() in DOCKER_HUB_HOSTS:
        if len(components) == 1:
            path = "library/" + path
        return DOCKER_HUB_API, path
    if host.startswith("["):
        hostname = host[: host.index("]") + 1]
    else:
        hostname = host.split(":")[0]
    scheme = "http" if hostname.lower() in LOOPBACK_HOSTS else "https"
    return f"{scheme}://{host}", path


def image_channel(image_ref):
    """Return 'channel' for tags latest, next or none, 'pinned' for any other tag or a digest."""
    _, tag, digest = split_image_ref(image_ref)
    if digest is not None:
        return "pinned"
    if tag is None or tag in CHANNEL_TAGS:
        return "channel"
    return "pinned"


def same_repository(image_ref, image_repo):
    """Tell whether an image reference is from the given repository."""
    name, _, _ = split_image_ref(image_ref)
    try:
        return parse_image(name) == parse_image(image_repo)
    except ValueError:
        return False


def own_container(pod, image_repo):
    """Return the k8svent container (its spec) of a pod object, else None.

    The container named 'k8svent' wins; else the first whose image is from
    the configured repository.
    """
    containers = (pod.get("spec") or {}).get("containers") or []
    for container in containers:
        if container.get("name") == "k8svent" and container.get("image"):
            return container
    for container in containers:
        image = container.get("image")
        if image and same_repository(image, image_repo):
            return container
    return None


def own_image(pod, image_repo):
    """Return the image of the k8svent container in a pod object, else None."""
    container = own_container(pod, image_repo)
    return container["image"] if container else None


def running_digest(pod, container_name):
    """Return the digest (sha256:...) a container runs, from its status's imageID, else None."""
    # imageID is REPO@sha256:... (docker-pullable://REPO@... under dockershim):
    # the digest of the manifest or index the kubelet pulled by tag.
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        if isinstance(status, dict) and status.get("name") == container_name:
            digest = str(status.get("imageID") or "").rpartition("@")[2]
            return digest if _DIGEST.fullmatch(digest) else None
    return None


def upgrade_decision(mode, version_env_set, own_image_ref):
    """Decide whether to check the registry, and say why, for the log.

    never: no; always: yes; auto: only when running from the k8svent image
    (K8SVENT_VERSION set) in a pod whose k8svent container follows a channel
    tag (latest, next or none) rather than a pinned version or a digest.
    """
    if mode == "never":
        return False, "--upgrade=never"
    if mode == "always":
        return True, "--upgrade=always"
    if mode != "auto":
        raise ValueError(f"unknown upgrade mode: {mode!r}")
    if not version_env_set:
        return False, "not running from the k8svent image (K8SVENT_VERSION is not set)"
    if own_image_ref is None:
        return False, "own pod or its k8svent container not found"
    if image_channel(own_image_ref) != "channel":
        return False, f"image {own_image_ref} is pinned"
    return True, f"image {own_image_ref} follows a channel"


@dataclasses.dataclass(frozen=True)
class UpgradePlan:
    """What a check looks at: the repository, and for auto the channel tag and the digest run."""

    image: str
    channel_tag: str | None = None  # None: any newer version means exit
    running_digest: str | None = None  # None: unknown, so never exit for it


def upgrade_plan(mode, version_env_set, pod, image_repo, image_given):
    """Return (UpgradePlan, why) when to check, else (None, why); pod is ours or None.

    always: the configured repository, exit on any newer version. auto: the
    repository the pod runs (the configured one when given), exit only when
    the channel tag has moved off the digest running.
    """
    container = own_container(pod, image_repo) if pod else None
    image_ref = container["image"] if container else None
    wanted, why = upgrade_decision(mode, version_env_set, image_ref)
    if not wanted:
        return None, why
    if mode == "always":
        return UpgradePlan(image_repo), why
    name, tag, _ = split_image_ref(image_ref)
    if not image_given:
        try:
            parse_image(name)
        except ValueError:
            return None, f"image {image_ref} is not in a registry k8svent can read"
        image_repo = name
    return UpgradePlan(image_repo, tag or "latest", running_digest(pod, container.get("name"))), why


def upgrade_interval_seconds(version, configured):
    """Return the configured interval, else 24 h for a release, 4 h for a prerelease."""
    if configured is not None:
        return float(configured)
    parsed = parse_version(version)
    if parsed is not None and not is_release(parsed):
        return float(UPGRADE_PRERELEASE_SECONDS)
    return float(UPGRADE_RELEASE_SECONDS)


def jittered(seconds, rng):
    """Spread an interval by +-10 % so that many clusters do not poll in step."""
    return seconds * rng.uniform(1 - UPGRADE_JITTER_FRACTION, 1 + UPGRADE_JITTER_FRACTION)


_AUTH_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_AUTH_PARAM = re.compile(r"\s*(" + _AUTH_TOKEN + r')\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')
_AUTH_SCHEME = re.compile(r"\s*(" + _AUTH_TOKEN + r")(?:\s+|$)")
_AUTH_SKIP = re.compile(r"\s*(?:[^,]*)(?:,|$)")


def parse_www_authenticate(header):
    """Return the parameters of the Bearer challenge in a WWW-Authenticate value.

    Keys are lower-cased; an empty dict means there is no Bearer challenge.
    """
    challenges, current, pos = {}, None, 0
    header = header or ""
    while pos < len(header):
        param = _AUTH_PARAM.match(header, pos)
        if param and current is not None:
            value = param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            current[param.group(1).lower()] = value
            pos = param.end()
            continue
        scheme = _AUTH_SCHEME.match(header, pos)
        if scheme and not param:
            current = challenges.setdefault(scheme.group(1).lower(), {})
            pos = scheme.end()
            continue
        # a token68 or something malformed: skip to the next comma
        pos = max(_AUTH_SKIP.match(header, pos).end(), pos + 1)
    return challenges.get("bearer", {})


_LINK = re.compile(r"\s*<([^>]*)>\s*((?:;\s*[^;,]*)*)(?:,|$)")
_LINK_PARAM = re.compile(r';\s*([^=;,\s]+)\s*=\s*("[^"]*"|[^;,\s]*)')


def parse_link_next(header, base_url):
    """Return the absolute URL of the rel="next" link in a Link value, else None."""
    for match in _LINK.finditer(header or ""):
        for name, value in _LINK_PARAM.findall(match.group(2)):
            rels = value.strip('"').lower().split()
            if name.lower() == "rel" and "next" in rels:
                return urllib.parse.urljoin(base_url, match.group(1).strip())
    return None


# --- State: the snapshot of pods and the outbox of each webhook --------------

# Pods and their bodies live apart: a poll reads and writes the small rows
# of every pod, and only the bodies of the pods that changed. The outbox holds
# at most one row per (webhook, pod): the pod's newest state is read from
# `bodies` when the row is sent, so a row never carries a stale copy.
#
# A pod's name (namespace/name) is its lane. Per webhook, a lane's rows leave
# one at a time in `seq` order (the order they were first owed in): an older
# state of the pod, then the deletion of each earlier uid, then the pod that
# holds the name now. Only a lane's first row (its head: set as a row joins
# an empty lane, passed on by the trigger as it leaves) can be claimed, so a
# claim walks an index of heads by due time and skips nothing but the few
# lanes in flight, however long the outbox is.
# What a list stages until it is complete (`staged`, in the file), and a
# change taken at once (a watch event, a resync's page) while it is applied
# (`applying`, TEMP: it writes no pages to the file).
_STAGING_COLUMNS = """(
    key TEXT PRIMARY KEY,
    fp BLOB NOT NULL,
    duress INTEGER NOT NULL,
    body BLOB NOT NULL,
    uid TEXT,
    rv TEXT
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pods (
    key TEXT PRIMARY KEY,
    fp BLOB NOT NULL,
    duress INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    uid TEXT,
    rv TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bodies (key TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    endpoint TEXT NOT NULL,
    lane TEXT NOT NULL,
    key TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    fp BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    due REAL NOT NULL,
    owed_since REAL NOT NULL,
    expired INTEGER NOT NULL,
    head INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'changed',
    seen REAL NOT NULL DEFAULT 0,
    UNIQUE (endpoint, key)
);
CREATE INDEX IF NOT EXISTS outbox_lane ON outbox (endpoint, lane, seq);
CREATE INDEX IF NOT EXISTS outbox_heads ON outbox (endpoint, due) WHERE head = 1;
CREATE INDEX IF NOT EXISTS outbox_age ON outbox (endpoint, expired, owed_since);
CREATE TRIGGER IF NOT EXISTS outbox_lane_moved_on AFTER DELETE ON outbox WHEN OLD.head = 1
BEGIN UPDATE outbox SET head = 1 WHERE seq = (SELECT min(seq) FROM outbox
    WHERE endpoint = OLD.endpoint AND lane = OLD.lane); END;
CREATE TABLE IF NOT EXISTS staged {_STAGING_COLUMNS};
CREATE TEMP TABLE IF NOT EXISTS applying {_STAGING_COLUMNS};
CREATE TEMP TABLE IF NOT EXISTS marked (key TEXT PRIMARY KEY, kind TEXT NOT NULL);
CREATE TEMP TABLE IF NOT EXISTS sending (kind TEXT PRIMARY KEY);
"""
# 6: bodies are zstd frames (5 wrote zlib, which 6 reads): a k8svent of 5 would
# fail on them, and refuses the file instead.
_SCHEMA_VERSION = 6
# Columns added since a schema version was written, each NULL in older rows
# (and ignored by an older k8svent): added in place on open, no new version.
# pods.rv is the resourceVersion of the state the row and its body hold, or
# NULL when not known (a stub, a row from before).
_ADDED_COLUMNS = (("pods", "rv", "TEXT"), ("staged", "rv", "TEXT"))
# Bodies are stored as zstd frames at level 1: about 2.4x smaller than the
# JSON, as zlib's level 1 is, in a third of its CPU. Older k8svents wrote zlib
# (or the JSON itself), which reads as it is.
_BODY_ZSTD_LEVEL = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_codecs = threading.local()  # zstd (de)compressors serve one thread at a time
# The -wal file is cut back to this after a checkpoint (SQLite leaves it at
# the size of the largest transaction, such as a first list, otherwise).
_JOURNAL_SIZE_LIMIT_BYTES = 4 << 20
# Free pages are handed back to the file system (incremental vacuum) and the
# WAL truncated once this many bodies were dropped (a list delivered), when
# the outbox is empty (at most every _RECLAIM_SECONDS), and after each poll.
# Not more often: under a stream of changes the outbox empties many times a
# second and the pages freed are taken again at once, so that handing them
# back each second cost a tenth of the CPU of a change.
_RECLAIM_AFTER_BODIES = 2000
_RECLAIM_SECONDS = 30
# Whether some webhook is owed the pod p: one look-up per webhook (CROSS JOIN
# keeps that order; the planner would rather scan the outbox for each pod).
_OWED_SQL = (
    "EXISTS (SELECT 1 FROM endpoints e CROSS JOIN outbox o"
    " WHERE o.endpoint = e.id AND o.key = p.key)"
)
CLUSTER_UID_SCOPE = "cluster uid "  # a scope's cluster, by kube-system's uid
_SQL_BATCH = 500
# A new message id in SQL, of the same form as new_message_id().
_NEW_MSG_ID_SQL = "'msg_' || lower(hex(randomblob(13)))"
# The id of a re-send under duress: a new message, not a change (delivery_message_id).
_RESEND_MSG_ID_SQL = f"'{RESEND_ID_PREFIX}' || lower(hex(randomblob(13)))"
# A pod deleted and created again under its name has a new uid: the old one
# is kept apart (in `pods`, `bodies` and the outbox) under KEY#UID, in the
# same lane, until its deletion has reached every webhook.
_GONE_SEPARATOR = "#"
# The lane of a snapshot key: the pod's name, without the #UID of an old pod.
_LANE_SQL = (
    f"CASE WHEN instr({{key}}, '{_GONE_SEPARATOR}')"
    f" THEN substr({{key}}, 1, instr({{key}}, '{_GONE_SEPARATOR}') - 1) ELSE {{key}} END"
)
# Owe the pods chosen by {where} to every webhook (those of {endpoints}): a new
# row, or the existing row when it owes an older state (a new delivery: a new
# message id, attempts from 0; its place in the lane and the time it was first
# owed are kept, and so is whether that time is past the retry budget). A row
# that owes this very state is left alone. A new row heads its lane when the
# lane has no row yet. `due` is on this process's monotonic clock (a stepped
# wall clock must not stall or flood deliveries); `owed_since` is wall-clock
# time, shown as an age. The row owes a change of {kind} (seen `now`), and
# only the kinds in `sending` (--send) are owed: a row whose kind is not sent
# goes (_UNSENT_SQL), rather than wait for nobody. Run through _owe.
_OWE_SQL = f"""
INSERT INTO outbox (endpoint, lane, key, msg_id, fp, attempts, due, owed_since, expired, head,
    kind, seen)
SELECT e.id, {_LANE_SQL.format(key="p.key")}, p.key, {_NEW_MSG_ID_SQL}, p.fp, 0, :due, :now, 0,
    NOT EXISTS (SELECT 1 FROM outbox o WHERE o.endpoint = e.id
        AND o.lane = {_LANE_SQL.format(key="p.key")}), {{owed_kind}}, :now
FROM pods p, endpoints e WHERE {{where}} AND {{endpoints}}
    AND (instr(p.key, '{_GONE_SEPARATOR}') > 0) = :gone
    AND {{owed_kind}} IN (SELECT kind FROM sending)
ON CONFLICT (endpoint, key) DO UPDATE SET
    msg_id = excluded.msg_id, fp = excluded.fp, attempts = 0, due = excluded.due,
    kind = excluded.kind, seen = excluded.seen
WHERE outbox.fp != excluded.fp
"""
# The kind a row owes once a change of {kind} joins it: a deletion is a
# deletion; a pod the webhook has not yet been told of stays new; else the change's.
_OWED_KIND_SQL = """CASE WHEN {kind} = 'deleted' THEN 'deleted'
    WHEN (SELECT o.kind FROM outbox o WHERE o.endpoint = e.id AND o.key = p.key) = 'new'
    THEN 'new' ELSE {kind} END"""
_UNSENT_SQL = """
DELETE FROM outbox WHERE rowid IN (
    SELECT o.rowid FROM pods p, endpoints e, outbox o
    WHERE {where} AND {endpoints} AND o.endpoint = e.id AND o.key = p.key
    AND o.fp != p.fp AND {owed_kind} NOT IN (SELECT kind FROM sending))
"""


def _owe(
    db,
    where,
    kind,
    endpoints="1",
    all_sent=False,
    msg_id_sql=_NEW_MSG_ID_SQL,
    gone=True,
    **params,
):
    """Owe the pods chosen by `where` as changes of `kind` (SQL; see _OWE_SQL), in the
    order of a lane's changes.

    The deletions of earlier uids first (unless `gone` is false: none can be
    chosen), then the pods that hold the names: one statement each, so that
    each new row sees those before it. With
    all_sent (every kind is sent), no row can owe a kind not sent: _UNSENT_SQL,
    half the CPU of a change, is skipped. New message ids are made by
    `msg_id_sql`.
    """
    parts = {"where": where, "endpoints": endpoints}
    parts["owed_kind"] = _OWED_KIND_SQL.format(kind=kind)
    if not all_sent:
        db.execute(_UNSENT_SQL.format(**parts), params)
    sql = _OWE_SQL.replace(_NEW_MSG_ID_SQL, msg_id_sql)
    for apart in (1, 0) if gone else (0,):
        db.execute(sql.format(**parts), {**_owe_times(), **params, "gone": apart})


def _owe_times():
    """The times of rows owed now: `now` (wall clock, owed_since) and `due` (monotonic)."""
    return {"now": time.time(), "due": time.monotonic()}


def _corrupt(exc):
    """Whether an SQLite error means the file is damaged or not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    # Our own checks (integrity, schema) raise without a code.
    return code is None or code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _open_private(path, create):
    """Open PATH (creating it when asked) for its owner only; return the fd, None if missing.

    Refuses (StateError) a symlink or a file of another user: the state
    holds every pod, and what it owes is signed and sent as it is.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
    else:
        if stat.S_ISLNK(info.st_mode):
            raise StateError(
                f"state file {path!r} is a symbolic link; give the path of the file itself"
            )
        if info.st_uid != os.geteuid():
            raise StateError(f"state file {path!r} belongs to another user (uid {info.st_uid})")
    # O_NOFOLLOW and fstat: the same checks, should the path change meanwhile.
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise StateError(f"state file {path!r} belongs to another user")
        os.fchmod(fd, 0o600)  # whatever the umask, or an older k8svent, made it
    except BaseException:
        os.close(fd)
        raise
    return fd


def state_scope(settings, server=""):
    """What a snapshot is of: the API server kubectl talks to, namespace and selection."""
    scope = f"{server}|{settings.namespace or ''}"
    selection = selection_query(settings)
    if selection:
        scope += "?" + "&".join(f"{name}={value}" for name, value in selection.items())
    return scope


def endpoint_id(url):
    """A stable id for an endpoint that keeps its URL out of the state file."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


PodEntry = collections.namedtuple("PodEntry", "key uid fp duress body rv")


def pod_entry(pod):
    """What the store keeps of a pod: key, uid, fingerprint, duress, bytes and resourceVersion."""
    pod_bytes = encode_pod(pod)
    metadata = pod.get("metadata") or {}
    return PodEntry(
        pod_key(pod),
        metadata.get("uid"),
        fingerprint(pod_bytes),
        pod_under_duress(pod),
        pod_bytes,
        metadata.get("resourceVersion"),
    )


# A row to deliver. uid, rv and deleted are its pod's (the snapshot's row), when
# known, for the id of the change (delivery_message_id): rv None when not.
Owed = collections.namedtuple(
    "Owed",
    "key msg_id attempts owed_since body lane kind seen uid rv deleted",
    defaults=(None, None, False),
)


def _owed(row):
    """The Owed of a row of Outbox._heads (its due time first, its body compressed)."""
    return Owed(*row[1:5], _inflate(row[5]), *row[6:])


def _deflate(pod_bytes):
    """A pod's JSON bytes as a body is stored: a zstd frame."""
    compressor = getattr(_codecs, "compressor", None)
    if compressor is None:
        compressor = _codecs.compressor = zstandard.ZstdCompressor(level=_BODY_ZSTD_LEVEL)
    return compressor.compress(pod_bytes)


def _inflate(body):
    """The JSON bytes of a stored body: a zstd frame, or as an older k8svent wrote
    it (zlib; JSON before bodies were compressed, state schema 3 and early 4)."""
    # A JSON object starts with "{", a zlib stream with 0x78.
    if body[:4] == _ZSTD_MAGIC:
        decompressor = getattr(_codecs, "decompressor", None)
        if decompressor is None:
            decompressor = _codecs.decompressor = zstandard.ZstdDecompressor()
        return decompressor.decompress(body)
    return body if body[:1] == b"{" else zlib.decompress(body)


def deleted_stub(key, uid):
    """What is sent of a deleted pod whose body was dropped: who it was, Deleted."""
    namespace, _, name = key.partition("/")
    meta = {"name": name, "namespace": namespace}
    if uid is not None:
        meta["uid"] = uid
    return encode_pod(
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {"phase": DELETED_PHASE}}
    )


def _other_pod(old_uid, uid):
    """Whether a uid names another pod than the one known (None: not known)."""
    return old_uid is not None and uid is not None and old_uid != uid


def _same_scope(old, new):
    """Whether a scope written by an older k8svent names the same pods."""
    # Schema 2 knew no API server: its state is kept when the namespace agrees,
    # so that an upgrade does not send every pod again. Nor did an older scope
    # know the cluster's uid: one of a server is kept once for the uid.
    if "|" in old:
        return (
            new.startswith(CLUSTER_UID_SCOPE)
            and not old.startswith(CLUSTER_UID_SCOPE)
            and old.partition("|")[2] == new.partition("|")[2]
        )
    return old.partition("/")[2] == new.partition("|")[2]


@contextlib.contextmanager
def _migration(db):
    """`with`: one transaction that brings a state to _SCHEMA_VERSION, or changes nothing."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (_SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _migrate_from_2(db):
    """Turn a schema 2 state (what each webhook last got) into outboxes."""
    with _migration(db):
        db.execute("ALTER TABLE pods ADD COLUMN uid TEXT")
        db.execute("DROP TABLE staged")
        db.execute("""CREATE TABLE staged (key TEXT PRIMARY KEY, fp BLOB NOT NULL,
            duress INTEGER NOT NULL, body BLOB NOT NULL, uid TEXT)""")
        _owe(
            db,
            "NOT EXISTS (SELECT 1 FROM delivered d WHERE d.endpoint = e.id"
            " AND d.key = p.key AND d.fp = p.fp)",
            "CASE WHEN p.deleted = 1 THEN 'deleted' WHEN EXISTS (SELECT 1 FROM delivered d"
            " WHERE d.endpoint = e.id AND d.key = p.key) THEN 'changed' ELSE 'new' END",
        )
        db.execute("DROP TABLE delivered")


def _statements(script):
    """The statements of an SQL script one by one, to run in a transaction of the caller's."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


def _migrate_from_3(db):
    """Give a schema 3 outbox its lanes: each row's pod name and its place in the lane."""
    with _migration(db):
        for index in ("outbox_due", "outbox_age"):
            db.execute(f"DROP INDEX IF EXISTS {index}")
        db.execute("ALTER TABLE outbox RENAME TO outbox_3")
        for statement in _statements(_SCHEMA):
            db.execute(statement)
        # Schema 3 sent a name's deletions (KEY#UID) before its pod (KEY).
        db.execute(
            "INSERT INTO outbox (endpoint, lane, key, msg_id, fp, attempts, due,"
            " owed_since, expired)"
            f" SELECT endpoint, {_LANE_SQL.format(key='key')}, key, msg_id, fp, attempts, due,"
            f" owed_since, expired FROM outbox_3 ORDER BY instr(key, '{_GONE_SEPARATOR}') = 0,"
            " rowid"
        )
        db.execute(
            "UPDATE outbox SET head = 1 WHERE seq IN"
            " (SELECT min(seq) FROM outbox GROUP BY endpoint, lane)"
        )
        db.execute("DROP TABLE outbox_3")
        db.execute(_KINDS_OF_OLD_ROWS_SQL)


# Schemas 3 and 4 kept no kind nor time of a change: a row owes a deletion or
# a change, seen when first owed.
_KINDS_OF_OLD_ROWS_SQL = (
    "UPDATE outbox SET seen = owed_since, kind = CASE WHEN EXISTS (SELECT 1"
    " FROM pods p WHERE p.key = outbox.key AND p.deleted = 1) THEN 'deleted'"
    " ELSE 'changed' END"
)


def _migrate_from_4(db):
    """Give schema 4's outbox rows the kind and time of their change."""
    with _migration(db):
        db.execute("ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'changed'")
        db.execute("ALTER TABLE outbox ADD COLUMN seen REAL NOT NULL DEFAULT 0")
        db.execute(_KINDS_OF_OLD_ROWS_SQL)


def _migrate_from_5(db):
    """Schema 5's zlib bodies read as they are: only the version moves on."""
    with _migration(db):
        pass


def _schema_version(db):
    """The schema version a state file was written with; None for a new file."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
        return None
    row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    return None if row is None else row[0]


class Store:
    """The state file: one SQLite connection and its transactions, holding the
    snapshot (what the cluster looks like) and the outbox (what each webhook is
    owed).

    A change to the snapshot and the rows it owes are written in one
    transaction: Snapshot methods hand the keys they mark to the Outbox. Only
    changes of the `kinds` given (--send) are owed.
    """

    def __init__(self, path=None, scope="", keep_bodies=False, kinds=KINDS):
        self._temporary = path is None
        # A body is kept only while a webhook is owed it or its pod is under
        # duress, unless keep_bodies (--mode=poll: a list is its only news of
        # a deletion, which carries the last known object).
        self.keep_bodies = keep_bodies
        self.kinds = frozenset(kinds)
        self.all_sent = self.kinds == frozenset(KINDS)
        self._dropped = 0  # bodies dropped since free pages were last reclaimed
        self._reclaimed = -math.inf  # when (time.monotonic())
        if path is None:
            # mkstemp creates it 0600; SQLite gives -wal and -shm its mode.
            fd, path = tempfile.mkstemp(prefix="k8svent-", suffix=".db")
            os.close(fd)
        elif os.path.islink(path):
            raise StateError(
                f"state file {path!r} is a symbolic link; give the path of the file itself"
            )
        elif os.path.isdir(path):
            raise StateError(f"state file {path!r} is a directory")
        elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise StateError(f"the folder of state file {path!r} does not exist")
        self.path = path
        self._lock = threading.RLock()
        self._lock_file = None if self._temporary else self._claim(path)
        try:
            if not self._temporary:
                # SQLite creates -wal and -shm with the mode of the main file.
                for suffix in ("", "-wal", "-shm", "-journal"):
                    fd = _open_private(path + suffix, create=not suffix)
                    if fd is not None:
                        os.close(fd)
            self._db = self._open(path, kinds)
        except (StateError, OSError):
            self._release()
            raise
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                self._release()
                raise StateError(f"cannot open state file {path!r}: {exc}") from None
            aside = self._set_aside(path)
            log.error(
                "state file %s is unreadable (%s); moved it to %s and "
                "starting fresh: every pod will be sent again",
                path,
                exc,
                aside,
            )
            os.close(_open_private(path, create=True))
            self._db = self._open(path, kinds)
        self._check_scope(scope)
        self.outbox = Outbox(self)
        self.snapshot = Snapshot(self, self.outbox)
        with self.transaction() as db:
            self.drop_bodies(db)
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            # A state from before: once, rewritten to hand free pages back.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")
        self.reclaim()

    @staticmethod
    def drop_orphans(db):
        """Drop the bodies of new names a failed list wrote (never merged into pods)."""
        db.execute(
            "DELETE FROM bodies WHERE NOT EXISTS (SELECT 1 FROM pods p WHERE p.key = bodies.key)"
        )

    def drop_bodies(self, db, keys=None):
        """Drop the bodies (of these keys, or all) no webhook is owed nor re-sent under duress."""
        if self.keep_bodies:
            return
        unneeded = (
            "NOT EXISTS (SELECT 1 FROM pods p WHERE p.key = bodies.key AND p.duress = 1)"
            f" AND NOT {_OWED_SQL.replace('p.key', 'bodies.key')}"
        )
        if keys is None:
            self._dropped += db.execute(f"DELETE FROM bodies WHERE {unneeded}").rowcount
        else:
            self._dropped += db.executemany(
                f"DELETE FROM bodies WHERE key = ? AND {unneeded}", [(k,) for k in keys]
            ).rowcount

    def reclaim(self, force=False):
        """Hand the pages of dropped bodies back to the file system and truncate the WAL."""
        with self._lock:
            if self._temporary or (not force and self._dropped < _RECLAIM_AFTER_BODIES):
                return  # a temporary store (--dry-run) reuses its free pages, then goes
            self._dropped = 0
            self._reclaimed = time.monotonic()
            # executescript: execute() would step the pragma once, freeing one page.
            self._db.executescript("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def reclaim_drained(self):
        """Reclaim what was dropped once nothing is owed, if the last settle could not
        (it came within _RECLAIM_SECONDS of a reclaim): the housekeeping's."""
        with self._lock:
            if self.reclaim_if_drained(self._db):
                self.reclaim(force=True)

    def reclaim_if_drained(self, db):
        """After bodies were dropped: reclaim if nothing is owed (at most every
        _RECLAIM_SECONDS)."""
        return (
            not self._temporary  # reclaim() does nothing for it
            and self._dropped
            and time.monotonic() >= self._reclaimed + _RECLAIM_SECONDS
            and not db.execute("SELECT 1 FROM outbox LIMIT 1").fetchone()
        )

    @staticmethod
    def _claim(path):
        """Lock PATH.lock so that two k8svents never share a state file."""
        try:
            fd = _open_private(path + ".lock", create=True)
        except OSError as exc:
            raise StateError(
                f"cannot create the lock file of state file {path!r}: {exc.strerror or exc}"
            ) from None
        lock_file = os.fdopen(fd, "a")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise StateError(f"state file {path!r} is in use by another k8svent") from None
        return lock_file

    @staticmethod
    def _set_aside(path):
        """Move a damaged state file (and its journals) to PATH.corrupt-TIME; return that."""
        # Only the newest copy is kept: a file that keeps breaking must not
        # fill the disk, and each copy holds every pod.
        folder, name = os.path.split(os.path.abspath(path))
        older = re.compile(re.escape(name) + r"\.corrupt-\d+(-wal|-shm|-journal)?")
        for entry in os.listdir(folder):
            if older.fullmatch(entry):
                os.remove(os.path.join(folder, entry))
        aside = f"{path}.corrupt-{int(time.time())}"
        os.replace(path, aside)
        os.chmod(aside, 0o600)
        # A journal left beside it belongs to the old file, not the new one.
        for suffix in ("-wal", "-shm", "-journal"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        return aside

    def _release(self):
        """Let another k8svent use the state file."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _check_scope(self, scope):
        """Start afresh if the state was written for another cluster or selection.

        None: the cluster is not known (kubectl cannot tell): the state is kept.
        """
        if scope is None:
            return
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE name='scope'").fetchone()
            if row is not None and row[0] != scope and not _same_scope(row[0], scope):
                log.warning(
                    "state file %s was written for another cluster, "
                    "namespace or selection (%s, now %s); starting a "
                    "fresh snapshot",
                    self.path,
                    row[0] or "default",
                    scope or "default",
                )
                for table in ("pods", "bodies", "outbox"):
                    db.execute(f"DELETE FROM {table}")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('scope', ?)", (scope,))

    @staticmethod
    def _open(path, kinds):
        """Open (or create) the database and check it is ours and sound."""
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT_BYTES}")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            version = _schema_version(db)
            if isinstance(version, int) and version > _SCHEMA_VERSION:
                # After a rollback: wiping it would send every pod again.
                raise StateError(
                    f"state file {path!r} has schema version {version}, from a newer "
                    f"k8svent; this one knows versions up to {_SCHEMA_VERSION}"
                )
            if version == 3:
                _migrate_from_3(db)
            elif version == 4:
                _migrate_from_4(db)
            elif version == 5:
                _migrate_from_5(db)
            if version is None:
                # Before the first table: a new file hands freed pages back
                # (incremental vacuum); an older one is vacuumed once to it.
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO sending VALUES (?)", [(kind,) for kind in kinds])
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif version == 2:
                _migrate_from_2(db)
            elif version not in (3, 4, 5, _SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown schema version {version}")
            # Dropped since: an index every change wrote twice (as its row was
            # owed, then settled) for a down webhook's probe alone, which the
            # heads' index serves.
            db.execute("DROP INDEX IF EXISTS outbox_untried")
            for table, column, kind in _ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self):
        """Close the database; remove it if it was temporary."""
        with self._lock:
            self._db.close()
        self._release()
        self.remove_temporary()

    def remove_temporary(self):
        """Remove a temporary database's files (open or not: the process is ending)."""
        if self._temporary:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.remove(self.path + suffix)
                except FileNotFoundError:
                    pass

    def transaction(self):
        """`with`: hold the lock and run the block in one transaction; gives the connection."""
        return _Transaction(self._db, self._lock)

    def open_batch(self):
        """Until close_batch, what this thread changes is one transaction (a burst of events)."""
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def close_batch(self, commit=True):
        """Commit what was changed since open_batch (rolled back if that fails), or
        roll it back."""
        try:
            if not commit:
                self._roll_back()
                return
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._roll_back()
                raise
        finally:
            self._lock.release()

    def _roll_back(self):
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    @contextlib.contextmanager
    def locked(self):
        """`with`: hold the lock for statements of their own; gives the connection."""
        with self._lock:
            yield self._db


class Outbox:
    """What each webhook is owed: at most one row per (webhook, pod), in lanes.

    Rows are owed from the snapshot's pods in the transaction that changed
    them (owe_marked, owe_duress); the delivery workers claim a lane's head,
    settle it or move its due time on.
    """

    def __init__(self, store):
        self._store = store

    def reclaim_drained(self):
        """Hand back the pages of the bodies dropped, once nothing is owed."""
        self._store.reclaim_drained()

    def set_endpoints(self, ids):
        """Record the configured webhooks: forget others, owe every pod to new ones.

        What a state file owes of kinds no longer sent (--send) goes too.
        """
        with self._store.transaction() as db:
            known = {i for (i,) in db.execute("SELECT id FROM endpoints")}
            db.execute("DELETE FROM endpoints")
            db.executemany("INSERT INTO endpoints VALUES (?)", [(i,) for i in ids])
            db.execute("DELETE FROM outbox WHERE endpoint NOT IN (SELECT id FROM endpoints)")
            db.execute("DELETE FROM outbox WHERE kind NOT IN (SELECT kind FROM sending)")
            # Each process counts a delivery past the retry budget anew.
            db.execute("UPDATE outbox SET expired = 0 WHERE expired = 1")
            # Due times are on the monotonic clock of the process that wrote
            # them: what an earlier one had put off is due now.
            now = time.monotonic()
            db.execute("UPDATE outbox SET due = ? WHERE due > ?", (now, now))
            for new in set(ids) - known:
                # Where a body was dropped, the first list brings it back.
                _owe(
                    db,
                    "p.deleted = 0",
                    "'new'",
                    "e.id = :endpoint",
                    all_sent=self._store.all_sent,
                    gone=False,
                    endpoint=new,
                )
            self._store.drop_bodies(db)

    def owe_marked(self, db):
        """Owe every pod the snapshot marked to every webhook (in the caller's transaction)."""
        gone = db.execute(
            f"SELECT 1 FROM marked WHERE instr(key, '{_GONE_SEPARATOR}') > 0 LIMIT 1"
        ).fetchone()
        _owe(
            db,
            "p.key IN (SELECT key FROM marked)",
            "(SELECT m.kind FROM marked m WHERE m.key = p.key)",
            all_sent=self._store.all_sent,
            gone=gone is not None,
        )
        if not self._store.all_sent:
            # A change of a kind not sent is owed to nobody: its body goes now.
            self._store.drop_bodies(db, [key for (key,) in db.execute("SELECT key FROM marked")])
        db.execute("DELETE FROM marked")

    def owe_duress(self, db=None):
        """Owe every pod under duress again (a no-op where one is still owed); how many."""
        if db is None:
            with self._store.transaction() as db:
                return self.owe_duress(db)
        # A deliberate re-send: a new message (its id marked), not a change.
        _owe(
            db,
            "p.duress = 1 AND p.deleted = 0",
            "'unhealthy'",
            all_sent=self._store.all_sent,
            msg_id_sql=_RESEND_MSG_ID_SQL,
            gone=False,  # an earlier uid's row is a deleted pod
        )
        (count,) = db.execute("SELECT count(*) FROM pods WHERE duress = 1 AND deleted = 0")
        return count[0]

    @staticmethod
    def hand_over(db, key, old_key):
        """A new pod took `key`: its rows now owe the old pod (`old_key`), in their place."""
        # The rows keep their place in the lane: what was in flight or owed
        # for the old pod goes out (as its deletion) before the new pod.
        db.execute(
            "DELETE FROM outbox WHERE key = ? AND endpoint IN (SELECT id FROM endpoints)",
            (old_key,),
        )
        db.execute(
            "UPDATE outbox SET key = ? WHERE key = ? AND endpoint IN (SELECT id FROM endpoints)",
            (old_key, key),
        )

    def claim(self, endpoint, now, busy=(), limit=1, untried_first=False):
        """The earliest-due heads of lanes owed to a webhook (none of the `busy` lanes).

        At most `limit` rows, one per lane. With untried_first, rows never
        attempted come before the others.
        """
        parts = ("AND o.attempts = 0", "AND o.attempts > 0") if untried_first else ("",)
        rows = []
        with self._store.locked() as db:
            for tried in parts:
                if len(rows) < limit:
                    rows += self._heads(db, endpoint, now, busy, limit - len(rows), tried)
        return [_owed(row) for row in rows]

    def take(self, endpoint, now, busy=(), limit=1):
        """claim (without untried_first) and next_due in one query:
        (the rows claimed, when the next head is due or None when none is owed)."""
        with self._store.locked() as db:
            rows = self._heads(db, endpoint, math.inf, busy, limit)
        claimed = [_owed(row) for row in rows if row[0] <= now]
        # Heads come by due time: past what was claimed, the next one due.
        later = rows[len(claimed)][0] if len(claimed) < len(rows) else None
        return claimed, later

    @staticmethod
    def _heads(db, endpoint, due_by, busy, limit, tried=""):
        """Rows (due first) of the earliest-due heads of lanes, with their bodies."""
        return db.execute(
            "SELECT o.due, o.key, o.msg_id, o.attempts, o.owed_since, b.body, o.lane, o.kind,"
            " o.seen, p.uid, p.rv, p.deleted = 1"
            " FROM outbox o JOIN bodies b ON b.key = o.key LEFT JOIN pods p ON p.key = o.key"
            " WHERE o.endpoint = ? AND o.head = 1 AND o.due <= ?"
            f" AND o.lane NOT IN ({','.join('?' * len(busy))}) {tried}"
            " ORDER BY o.due, o.seq LIMIT ?",
            (endpoint, due_by, *busy, limit),
        ).fetchall()

    def next_due(self, endpoint, busy=()):
        """When the next head owed to a webhook (not of the `busy` lanes) is due, or None."""
        skip = ",".join("?" * len(busy))
        with self._store.locked() as db:
            # A row whose body the next list brings back (a new webhook) is not due yet.
            row = db.execute(
                "SELECT o.due FROM outbox o WHERE o.endpoint = ? AND o.head = 1"
                f" AND o.lane NOT IN ({skip})"
                " AND EXISTS (SELECT 1 FROM bodies b WHERE b.key = o.key)"
                " ORDER BY o.due LIMIT 1",
                (endpoint, *busy),
            ).fetchone()
        return None if row is None else row[0]

    def settle(self, endpoint, done):
        """Deliveries done with (2xx or refused), as (key, msg_id): their rows go,
        unless one owes a newer state by now."""
        with self._store.transaction() as db:
            db.executemany(
                "DELETE FROM outbox WHERE endpoint = ? AND key = ? AND msg_id = ?",
                [(endpoint, key, msg_id) for key, msg_id in done],
            )
            # A newer state owed meanwhile was owed as new, the webhook not yet
            # told of the pod (_OWED_KIND_SQL): it has been now. What it owes
            # is a change, and goes if changes are not sent.
            keys = [(endpoint, key) for key, _ in done]
            db.executemany(
                "UPDATE outbox SET kind = 'changed'"
                " WHERE endpoint = ? AND key = ? AND kind = 'new'",
                keys,
            )
            db.executemany(
                "DELETE FROM outbox WHERE endpoint = ? AND key = ?"
                " AND kind NOT IN (SELECT kind FROM sending)",
                keys,
            )
            self._store.drop_bodies(db, [key for key, _ in done])
            drained = self._store.reclaim_if_drained(db)
        self._store.reclaim(force=bool(drained))

    def retry_at(self, endpoint, key, msg_id, attempts, due):
        """A delivery failed: try it again at `due` (a newer state keeps its own)."""
        with self._store.locked() as db:
            db.execute(
                "UPDATE outbox SET attempts = ?, due = ? WHERE endpoint = ?"
                " AND key = ? AND msg_id = ?",
                (attempts, due, endpoint, key, msg_id),
            )

    def expire(self, endpoint, owed_before):
        """Flag the rows owed since before `owed_before`; return how many were new."""
        with self._store.locked() as db:
            return db.execute(
                "UPDATE outbox SET expired = 1 WHERE endpoint = ? AND expired = 0"
                " AND owed_since < ?",
                (endpoint, owed_before),
            ).rowcount

    def pending(self, endpoint):
        """How many rows a webhook is owed that are not past the retry budget."""
        with self._store.locked() as db:
            return db.execute(
                "SELECT count(*) FROM outbox WHERE endpoint = ? AND expired = 0", (endpoint,)
            ).fetchone()[0]

    def backlog(self, endpoint):
        """(rows owed to a webhook, the oldest owed_since or None)."""
        # Through outbox_age: the oldest is the smaller of the two `expired` runs.
        with self._store.locked() as db:
            (count,) = db.execute(
                "SELECT count(*) FROM outbox WHERE endpoint = ?", (endpoint,)
            ).fetchone()
            oldest = [
                db.execute(
                    "SELECT min(owed_since) FROM outbox WHERE endpoint = ? AND expired = ?",
                    (endpoint, expired),
                ).fetchone()[0]
                for expired in (0, 1)
            ]
        oldest = [since for since in oldest if since is not None]
        return count, min(oldest) if oldest else None

    # Continuity: what the holder of a Lease owes, by resourceVersion.

    def owed_versions(self, endpoint, limit):
        """The resourceVersions of the states owed to a webhook; None if more than `limit`."""
        with self._store.locked() as db:
            (count,) = db.execute(
                "SELECT count(*) FROM outbox WHERE endpoint = ?", (endpoint,)
            ).fetchone()
            if count > limit:
                return None
            # A row without its body (a new webhook's, until a list brings
            # it back) has no known version: no watermark passes it.
            rows = db.execute(
                "SELECT b.body FROM outbox o LEFT JOIN bodies b ON b.key = o.key"
                " WHERE o.endpoint = ?",
                (endpoint,),
            )
            return [None if body is None else _body_version(body) for (body,) in rows]

    def forget_through(self, endpoint, resource_version):
        """Drop the rows owing a state at or before `resource_version` (another replica
        settled them); return (how many, how many are left), (None, None) if not comparable."""
        try:
            mark = int(resource_version)
        except (TypeError, ValueError):
            return None, None
        settled = left = 0
        after = ""
        while True:
            # A batch at a time, in key order: the lock (the watch, the
            # metrics) is never held for long, nor are many bodies in memory.
            with self._store.transaction() as db:
                rows = db.execute(
                    "SELECT o.key, o.msg_id, b.body FROM outbox o JOIN bodies b ON b.key = o.key"
                    " WHERE o.endpoint = ? AND o.key > ? ORDER BY o.key LIMIT ?",
                    (endpoint, after, _SQL_BATCH),
                ).fetchall()
                done = []
                for key, msg_id, body in rows:
                    try:
                        if int(_body_version(body)) <= mark:
                            done.append((endpoint, key, msg_id))
                    except (TypeError, ValueError):
                        continue  # not comparable: stays owed
                db.executemany(
                    "DELETE FROM outbox WHERE endpoint = ? AND key = ? AND msg_id = ?", done
                )
                self._store.drop_bodies(db, [key for _, key, _ in done])
            settled += len(done)
            left += len(rows) - len(done)
            if len(rows) < _SQL_BATCH:
                self._store.reclaim()  # the bodies dropped, past a threshold
                return settled, left
            after = rows[-1][0]


class Snapshot:
    """What the cluster looks like: every pod known (a small row and its body),
    and the deleted ones until every webhook has been told.

    Lists stage their pages and merge them once complete; watch events apply
    one at a time. What a change owes is handed to the outbox in the same
    transaction.
    """

    def __init__(self, store, outbox):
        self._store = store
        self._outbox = outbox
        self._seen = set()
        self._unfinished = True  # a list may have been cut short before this process
        self.replaced = 0

    def begin_poll(self):
        """Start a poll: forget what a failed one had read."""
        self._seen = set()
        with self._store.transaction() as db:
            db.execute("DELETE FROM staged")
            if self._unfinished:  # a list that failed (or a process killed) mid-way
                self._store.drop_orphans(db)
        self._unfinished = True

    def apply_page(self, entries):
        """Stage one page of PodEntry; count by reason (new, changed, unhealthy)."""
        # The keys seen by this poll, for its deletions: in memory for the
        # length of a poll only (about 100 bytes a pod).
        self._seen.update(e.key for e in entries)
        with self._store.transaction() as db:
            return self._stage(db, entries)

    def _stage(self, db, entries, table="staged", reasons=None):
        """apply_page in a transaction of the caller's, staging in `table`; each
        pod's reason into `reasons` if given (see apply)."""
        counts = {"new": 0, "changed": 0, "unhealthy": 0}
        if reasons is None:
            reasons = {}
        keys = [e.key for e in entries]
        known = {}
        # `lacks`: an unchanged pod whose body was dropped but is needed again
        # (a webhook new since, or --mode=poll): it is written back as listed.
        needed = "1" if self._store.keep_bodies else f"p.duress = 1 OR {_OWED_SQL}"
        for start in range(0, len(keys), _SQL_BATCH):
            batch = keys[start : start + _SQL_BATCH]
            known.update(
                (k, (fp, deleted, uid, lacks))
                for k, fp, deleted, uid, lacks in db.execute(
                    f"SELECT p.key, p.fp, p.deleted, p.uid, b.key IS NULL AND ({needed})"
                    " FROM pods p LEFT JOIN bodies b ON b.key = p.key WHERE p.key IN "
                    f"({','.join('?' * len(batch))})",
                    batch,
                )
            )
        upserts, bodies = [], []
        for entry in entries:
            old = known.get(entry.key)
            if old is None:
                # No body of that name to keep should the list fail: it goes
                # where it will be read from (a first list writes each once),
                # and is staged empty.
                counts["new"] += 1
                reasons[entry.key] = "new"
                bodies.append((entry.key, _deflate(entry.body)))
                upserts.append((entry.key, entry.fp, int(entry.duress), b"", entry.uid, entry.rv))
                continue
            if old[1] or _other_pod(old[2], entry.uid):
                reason = "new"
            elif old[0] != entry.fp:
                reason = "changed"
            else:
                reasons[entry.key] = None
                if entry.duress:
                    counts["unhealthy"] += 1
                if old[3]:
                    bodies.append((entry.key, _deflate(entry.body)))
                continue
            counts[reason] += 1
            reasons[entry.key] = reason
            upserts.append(
                (
                    entry.key,
                    entry.fp,
                    int(entry.duress),
                    _deflate(entry.body),
                    entry.uid,
                    entry.rv,
                )
            )
        # New and changed pods wait in `staged` until the listing is
        # complete: a poll that fails changes nothing. A refill is the very
        # state the snapshot holds already.
        db.executemany(
            f"INSERT OR REPLACE INTO {table} (key, fp, duress, body, uid, rv)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            upserts,
        )
        db.executemany("INSERT OR REPLACE INTO bodies (key, body) VALUES (?, ?)", bodies)
        return counts

    def finish_poll(self):
        """After a complete listing: take what changed, delete pods not seen, owe.

        Returns the keys of the pods not seen (now deleted). `replaced`
        counts the pods found deleted because another took their name.
        """
        seen, self._seen = self._seen, set()
        self._unfinished = False
        with self._store.transaction() as db:
            self.replaced = self._merge_staged(db)
            gone = [
                key
                for (key,) in db.execute("SELECT key FROM pods WHERE deleted = 0")
                if key not in seen
            ]
            del seen
            self._mark_deleted(db, gone)
            self._outbox.owe_marked(db)
            self._outbox.owe_duress(db)
        return gone

    def delete(self, keys):
        """Mark these pods (those still there) deleted and owe their deletion; return how many."""
        with self._store.transaction() as db:
            known = [
                key
                for key in keys
                if db.execute("SELECT 1 FROM pods WHERE key = ? AND deleted = 0", (key,)).fetchone()
            ]
            self._mark_deleted(db, known)
            self._outbox.owe_marked(db)
        return len(known)

    def present(self):
        """The keys of the pods known and not deleted."""
        with self._store.locked() as db:
            return {key for (key,) in db.execute("SELECT key FROM pods WHERE deleted = 0")}

    def apply(self, entries, reasons=None):
        """Take these pods now (outside a list), owing the new and changed; counts by reason.

        `reasons`, a dict, gets each pod's: "new", "changed", or None (unchanged).
        """
        # Staged in a TEMP table: a change of a few pods writes no staging
        # pages to the state file, and a list staging meanwhile keeps its own.
        with self._store.transaction() as db:
            counts = self._stage(db, entries, "applying", reasons)
            if counts["new"] or counts["changed"]:
                self._merge_staged(db, "applying")
                self._outbox.owe_marked(db)
        return counts

    def apply_event(self, entry):
        """A watch event ADDED or MODIFIED: take the pod and owe it if new or changed.

        Returns the reason ("new", "changed") or None when nothing changed.
        """
        reasons = {}
        self.apply([entry], reasons)
        return reasons[entry.key]

    def apply_deletion(self, entry):
        """A watch event DELETED: the pod's last state goes out as deleted; True if owed."""
        pod_bytes = mark_deleted(entry.body)
        with self._store.transaction() as db:
            row = db.execute("SELECT uid, deleted FROM pods WHERE key = ?", (entry.key,)).fetchone()
            if row is None or row[1]:
                return False  # never listed (nothing to tell), or a list found it first
            if _other_pod(row[0], entry.uid):
                # An earlier pod of this name: its deletion was owed when a
                # list found the new one, ahead of it in the lane.
                return False
            self._put_deleted(db, entry.key, entry.uid, pod_bytes, entry.rv)
            db.execute("INSERT OR REPLACE INTO marked VALUES (?, 'deleted')", (entry.key,))
            self._outbox.owe_marked(db)
        return True

    @staticmethod
    def _merge_staged(db, table="staged"):
        """Move staged pods into the snapshot and mark them to be owed.

        Returns how many pods this found deleted: those created again under
        their name (a new uid).
        """
        # A pod whose uid changed was deleted and created again: its last
        # state goes out as deleted, apart from the new pod. So does a deleted
        # pod not yet told to every webhook when a new one takes its name.
        replaced = db.execute(
            f"SELECT s.key, p.uid, p.deleted, b.body, p.rv FROM {table} s"
            " JOIN pods p ON p.key = s.key LEFT JOIN bodies b ON b.key = s.key"
            f" WHERE (p.deleted = 0 AND p.uid != s.uid) OR (p.deleted = 1 AND {_OWED_SQL})"
        ).fetchall()
        for key, uid, deleted, body, rv in replaced:
            apart = f"{key}{_GONE_SEPARATOR}{uid}"
            pod_bytes = Snapshot._deleted_bytes(key, uid, body, deleted)
            Snapshot._put_deleted(db, apart, uid, pod_bytes, None if body is None else rv)
            Outbox.hand_over(db, key, apart)
            if not deleted:
                db.execute("INSERT OR REPLACE INTO marked VALUES (?, 'deleted')", (apart,))
        # New: a name not known, known deleted, or taken by another uid.
        db.execute(
            "INSERT OR IGNORE INTO marked SELECT s.key, CASE WHEN p.key IS NULL"
            " OR p.deleted = 1 OR p.uid != s.uid THEN 'new' ELSE 'changed' END"
            f" FROM {table} s LEFT JOIN pods p ON p.key = s.key"
        )
        db.execute(
            "INSERT OR REPLACE INTO pods (key, fp, duress, deleted, uid, rv)"
            f" SELECT key, fp, duress, 0, uid, rv FROM {table}"
        )
        db.execute(
            f"INSERT OR REPLACE INTO bodies (key, body) SELECT key, body FROM {table}"
            " WHERE length(body) > 0"
        )
        db.execute(f"DELETE FROM {table}")
        return sum(1 for _, _, deleted, _, _ in replaced if not deleted)

    @staticmethod
    def _deleted_bytes(key, uid, body, deleted=False):
        """The bytes that tell a pod's deletion: its last known state, else a stub."""
        if body is None:  # dropped once delivered (a pod under duress keeps it)
            return deleted_stub(key, uid)
        pod_bytes = _inflate(body)
        return pod_bytes if deleted else mark_deleted(pod_bytes)

    @staticmethod
    def _put_deleted(db, key, uid, pod_bytes, rv):
        """Write a deleted pod's row and body (pod_bytes already say Deleted; rv is theirs)."""
        db.execute(
            "INSERT OR REPLACE INTO pods (key, fp, duress, deleted, uid, rv)"
            " VALUES (?, ?, 0, 1, ?, ?)",
            (key, fingerprint(pod_bytes), uid, rv),
        )
        db.execute(
            "INSERT OR REPLACE INTO bodies VALUES (?, ?)",
            (key, _deflate(pod_bytes)),
        )

    @staticmethod
    def _mark_deleted(db, keys):
        """Give these pods status.phase Deleted and mark them to be owed."""
        rows, bodies = [], []
        for key in keys:
            uid, body = db.execute(
                "SELECT p.uid, b.body FROM pods p LEFT JOIN bodies b ON b.key = p.key"
                " WHERE p.key = ?",
                (key,),
            ).fetchone()
            pod_bytes = Snapshot._deleted_bytes(key, uid, body)
            # A stub (the body was dropped) carries no resourceVersion.
            rows.append((fingerprint(pod_bytes), body is not None, key))
            bodies.append((key, _deflate(pod_bytes)))
        db.executemany(
            "UPDATE pods SET fp=?, deleted=1, duress=0, rv=CASE WHEN ? THEN rv END WHERE key=?",
            rows,
        )
        db.executemany("INSERT OR REPLACE INTO bodies (key, body) VALUES (?, ?)", bodies)
        db.executemany("INSERT OR REPLACE INTO marked VALUES (?, 'deleted')", [(k,) for k in keys])

    def prune(self):
        """Forget deleted pods once every webhook has been told; reclaim free pages."""
        with self._store.transaction() as db:
            told = [
                (key,)
                for (key,) in db.execute(
                    f"SELECT p.key FROM pods p WHERE p.deleted = 1 AND NOT {_OWED_SQL}"
                )
            ]
            for table in ("pods", "bodies"):
                db.executemany(f"DELETE FROM {table} WHERE key = ?", told)
            self._store.drop_bodies(db)
        self._store.reclaim()

    def owe_missed_deletion(self, entry):
        """A deletion this snapshot never saw (replayed from a watermark): owe it; True if owed."""
        pod_bytes = mark_deleted(entry.body)
        with self._store.transaction() as db:
            row = db.execute("SELECT uid FROM pods WHERE key = ?", (entry.key,)).fetchone()
            if row is not None and not _other_pod(row[0], entry.uid):
                return False  # the pod it knows: its own list or watch told it
            key = entry.key
            if row is not None:
                # An earlier pod of the name the new one holds: its deletion
                # goes first in the lane, in the place of what the new pod is
                # owed, which is owed again behind it.
                key = f"{entry.key}{_GONE_SEPARATOR}{entry.uid}"
                owed = db.execute(
                    "SELECT kind FROM outbox WHERE key = ? LIMIT 1", (entry.key,)
                ).fetchone()
                if owed is not None:
                    Outbox.hand_over(db, entry.key, key)
                    db.execute("INSERT OR REPLACE INTO marked VALUES (?, ?)", (entry.key, owed[0]))
            self._put_deleted(db, key, entry.uid, pod_bytes, entry.rv)
            db.execute("INSERT OR REPLACE INTO marked VALUES (?, 'deleted')", (key,))
            self._outbox.owe_marked(db)
        return True

    def count(self):
        """How many pods the snapshot holds (deleted ones included)."""
        with self._store.locked() as db:
            return db.execute("SELECT count(*) FROM pods").fetchone()[0]


def _body_version(body):
    """The resourceVersion of a stored (compressed) pod body, or None."""
    pod = orjson.loads(_inflate(body))
    return (pod.get("metadata") or {}).get("resourceVersion")


class _Transaction:
    """`with`: hold the store's lock and run the block in one transaction."""

    def __init__(self, db, lock):
        self._db, self._lock = db, lock

    def __enter__(self):
        self._lock.acquire()
        # Inside this thread's Store.open_batch: part of that transaction.
        self._nested = self._db.in_transaction
        if not self._nested:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._lock.release()
                raise
        return self._db

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._nested:
                pass
            elif exc_type is None:
                try:
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            else:
                self._rollback()
        finally:
            self._lock.release()

    def _rollback(self):
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


# --- kubectl -----------------------------------------------------------------


def selection_query(settings):
    """The labelSelector and fieldSelector of every list (and watch) of pods."""
    query = {}
    if settings.selector:
        query["labelSelector"] = settings.selector
    if settings.exclude_namespaces:
        # Terms of a field selector are ANDed.
        query["fieldSelector"] = ",".join(
            f"metadata.namespace!={namespace}" for namespace in settings.exclude_namespaces
        )
    return query


def describe_selection(settings):
    """Which pods are listed, in words: the namespaces, then the label selector."""
    if settings.namespace:
        where = f"pods of namespace {settings.namespace}"
    elif settings.exclude_namespaces:
        where = f"pods of all namespaces but {', '.join(settings.exclude_namespaces)}"
    else:
        where = "pods of all namespaces"
    return f"{where} labelled {settings.selector}" if settings.selector else where


def pods_url(settings, **query):
    """The API path and query that list or watch the pods (of one namespace or all).

    The selection (labelSelector, fieldSelector) comes with every one.
    Parameters that are None are left out, a trailing underscore is dropped
    from a name (``continue_``) and booleans are written true or false.
    """
    path = "/api/v1/pods"
    if settings.namespace:
        path = f"/api/v1/namespaces/{urllib.parse.quote(settings.namespace, safe='')}/pods"
    pairs = [
        (name.rstrip("_"), str(value).lower() if isinstance(value, bool) else value)
        for name, value in {**query, **selection_query(settings)}.items()
        if value is not None
    ]
    if not pairs:
        return path
    return f"{path}?{urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)}"


def _kubectl_command(settings):
    """The sh.Command for kubectl, or raise KubectlError."""
    try:
        return sh.Command(settings.kubectl)
    except sh.CommandNotFound:
        raise KubectlError(f"kubectl not found: {settings.kubectl!r}") from None


def _kubectl_failure(exc, settings):
    """The KubectlError for one of sh's exceptions."""
    if isinstance(exc, sh.TimeoutException):
        return KubectlError(
            f"kubectl killed after {settings.kubectl_timeout:g} s without finishing"
        )
    if isinstance(exc, sh.ErrorReturnCode):
        stderr = exc.stderr or b""
        kind = (
            Expired
            if any(mark in stderr for mark in (b"(Expired)", b"(Gone)", b" 410"))
            else KubectlError
        )
        return kind(f"kubectl exited {exc.exit_code}: {cut(stderr)}{kubectl_hint(stderr)}", stderr)
    return KubectlError(f"cannot run kubectl {settings.kubectl!r}: {exc.strerror or exc}")


def kubectl_hint(stderr):
    """What to check, for a kubectl failure whose cause is not in its words ("" if none)."""
    # With no kubeconfig and no in-cluster service account, kubectl falls
    # back to localhost:8080, and its error names that, not the missing config.
    if b"localhost:8080" in stderr or b"127.0.0.1:8080" in stderr:
        return (
            " (kubectl found no cluster configuration: check KUBECONFIG or ~/.kube/config, "
            "--context, or, in a pod, its service account)"
        )
    return ""


def kubectl_environment(environ=None):
    """The environment of a kubectl child: ours without K8SVENT_* (secrets among them)."""
    # kubectl passes its environment on to exec credential plugins, which
    # have no business with the webhook URLs or the signing secret.
    environ = os.environ if environ is None else environ
    return {
        name: value for name, value in environ.items() if not name.upper().startswith("K8SVENT_")
    }


def run_kubectl(settings, *args):
    """Run kubectl with args; return its stdout bytes or raise KubectlError."""
    # Every kubectl runs in a process group of its own: a Ctrl-C at the
    # terminal reaches k8svent alone, which then stops its kubectl itself.
    context = ("--context", settings.context) if settings.context else ()
    command = _kubectl_command(settings)
    try:
        return command(
            *context,
            *args,
            _env=kubectl_environment(),
            _return_cmd=True,
            _timeout=settings.kubectl_timeout,
            _out_bufsize=PIPE_BUFFER_BYTES,
            _internal_bufsize=PIPE_BUFFER_BYTES,
            _tty_out=False,
            _new_group=True,
        ).stdout
    except (sh.TimeoutException, sh.ErrorReturnCode, OSError) as exc:
        raise _kubectl_failure(exc, settings) from None


def write_raw(settings, verb, path, body, timeout):
    """`kubectl create|replace --raw PATH -f -` with body on stdin; return its stdout.

    A 409 (Conflict, AlreadyExists) raises LeaseConflict: a lost race.
    """
    context = ("--context", settings.context) if settings.context else ()
    command = _kubectl_command(settings)
    try:
        return command(
            *context,
            verb,
            "--raw",
            path,
            "-f",
            "-",
            _in=body,
            _env=kubectl_environment(),
            _return_cmd=True,
            _timeout=timeout,
            _tty_out=False,
        ).stdout
    except sh.ErrorReturnCode as exc:
        stderr = exc.stderr or b""
        if b"(Conflict)" in stderr or b"(AlreadyExists)" in stderr:
            raise LeaseConflict(f"kubectl {verb}: {cut(stderr)}", stderr) from None
        raise _kubectl_failure(exc, settings) from None
    except (sh.TimeoutException, OSError) as exc:
        raise _kubectl_failure(exc, settings) from None


# A PodList is read from kubectl's pipe as it arrives and cut into its items,
# each parsed by orjson: five times faster than ijson's parser, which builds
# every item out of events. Kubernetes writes each item with the same first
# key ("metadata"), so an item ends where `},{"metadata":` begins the next one
# (the separator, learnt from the list itself). Only a whole value
# parses: a cut that falls inside an item (a nested list whose entries start
# with that key) leaves a value that does not end, and the next cut is tried.
# Without such cuts (pretty-printed JSON, say), the value that starts the
# buffer is parsed whole and cut where it ends, once LIST_TRY_BYTES are in.
LIST_READ_BYTES = 1 << 18
LIST_TRY_BYTES = 1 << 20
_ITEMS_KEY = b'"items":'
_JSON_SPACE = b" \t\r\n"
_OPEN, _COMMA, _CLOSE = b"[,]"
_NULL = b"null"


class _BadList(ValueError):
    """kubectl's output is not a pod list (what is wrong, for KubectlError)."""


def _leading_value(data, start, end):
    """(the JSON value that starts data[start:end], where it ends), or None when
    no whole value does (it goes on past `end`, or is not valid)."""
    piece = data[start:end]
    try:
        return orjson.loads(piece), end
    except orjson.JSONDecodeError as exc:
        at = exc.pos  # counts characters, not bytes
    try:
        text = str(piece, "utf-8")
    except UnicodeDecodeError:
        return None  # cut inside a character, or not UTF-8
    if at >= len(text):
        return None
    # A whole value, then more: it ends where the rest begins.
    cut = len(text[:at].encode())
    try:
        return orjson.loads(piece[:cut]), start + cut
    except orjson.JSONDecodeError:
        return None


class _PageReader:
    """kubectl's output, a PodList, read as it arrives: the list's metadata
    (Kubernetes sends it first: the continue token), then its items."""

    def __init__(self, fd):
        self._stream = os.fdopen(fd, "rb", buffering=0)
        self._data = b""
        self.token = None
        self.resource_version = None
        self.has_metadata = False
        self.at_eof = False

    def close(self):
        self._stream.close()

    def _more(self, keep):
        """Read on, keeping what is from `keep` on; False at the end of the output."""
        chunk = self._stream.read(LIST_READ_BYTES)
        self._data = self._data[keep:] + chunk
        self.at_eof = not chunk
        return bool(chunk)

    def _skip_space(self, at):
        """The data, and where the first byte past JSON whitespace from `at` is in it
        (what was before `at` may be dropped)."""
        while True:
            data = self._data
            while at < len(data) and data[at] in _JSON_SPACE:
                at += 1
            if at < len(data):
                return data, at
            if not self._more(at):
                raise _BadList("cut short")
            at = 0

    def _take_metadata(self, top):
        metadata = top.get("metadata") if isinstance(top, dict) else None
        if isinstance(metadata, dict) and not self.has_metadata:
            self.has_metadata = True
            token, version = metadata.get("continue"), metadata.get("resourceVersion")
            self.token = token if isinstance(token, str) else None
            self.resource_version = version if isinstance(version, str) else None

    def items(self):
        """Yield the list's items; at its end, its metadata is read whatever its place."""
        at = 0
        while True:
            at = self._data.find(_ITEMS_KEY, at)
            if at < 0:
                at = max(0, len(self._data) - len(_ITEMS_KEY) + 1)
                if not self._more(0):
                    raise _BadList("no items")
            elif self._data[:at].rstrip(_JSON_SPACE)[-1:] in (b"{", b","):
                break
            else:
                at += 1  # the end of another key, one with an escaped quote
        head = self._data[:at]
        try:
            self._take_metadata(orjson.loads(head + b'"items":[]}'))
        except orjson.JSONDecodeError:
            raise _BadList("not JSON before its items") from None
        data, pos = self._skip_space(at + len(_ITEMS_KEY))
        if data[pos] == _NULL[0]:  # no items, as Go writes an empty list it never made
            while len(data) < pos + len(_NULL) and self._more(pos):
                data, pos = self._data, 0
            if not data.startswith(_NULL, pos):
                raise _BadList("items is not a list")
            self._read_tail(head, data, pos + len(_NULL))
            return
        if data[pos] != _OPEN:
            raise _BadList("items is not a list")
        data, pos = self._skip_space(pos + 1)
        # The cut between items: the compact one until another is seen.
        colon = data.find(b":", pos, pos + 64)
        separator = b"}," + data[pos : colon + 1] if colon > 0 else None
        search, try_at = pos, LIST_TRY_BYTES
        while data[pos] != _CLOSE:
            cut = data.find(separator, search) if separator else -1
            if cut >= 0:
                value = _leading_value(data, pos, cut + 1)
            elif self.at_eof:
                value = _leading_value(data, pos, len(data))
            elif len(data) - pos >= try_at:  # up to a brace: not inside a character
                value = _leading_value(data, pos, data.rfind(b"}", pos) + 1 or len(data))
            else:
                value = False  # read on
            if not value:
                if cut >= 0:
                    search = cut + 1  # a cut inside the item: try the next
                    continue
                if value is None:
                    if self.at_eof:
                        raise _BadList("cut short, or not JSON")
                    try_at = 2 * (len(data) - pos)
                search = max(pos, len(data) - len(separator or b"") + 1)
                self._more(pos)
                data, search, pos = self._data, search - pos, 0
                continue
            item, end = value
            yield item
            before = data
            data, pos = self._skip_space(end)
            if data[pos] == _COMMA:
                data, pos = self._skip_space(pos + 1)
                if data[pos] == _CLOSE:
                    raise _BadList("a comma after its last item")
                if cut < 0 and data is before:  # learn the cut from how these two meet
                    colon = data.find(b":", pos, pos + 64)
                    if colon > 0:
                        separator = data[end - 1 : colon + 1]
                search, try_at = pos, LIST_TRY_BYTES
            elif data[pos] != _CLOSE:
                raise _BadList("no comma between items")
        self._read_tail(head, data, pos + 1)

    def _read_tail(self, head, data, pos):
        """Read and check the rest of the list, from data[pos] past its items: small
        (its metadata, if sent last)."""
        tail = bytearray(data[pos:])
        while self._more(len(self._data)):
            tail += self._data
            if len(tail) > LIST_TRY_BYTES:
                raise _BadList("too long after its items")
        try:
            self._take_metadata(orjson.loads(head + b'"items":[]' + tail))
        except orjson.JSONDecodeError:
            raise _BadList("not JSON after its items") from None


def _stop_quietly(process, kill):
    """Reap a kubectl (killing it first if asked), ignoring how it ended."""
    try:
        if kill:
            process.kill()
    except (OSError, sh.SignalException):
        pass
    try:
        process.wait()
    except (sh.ErrorReturnCode, sh.TimeoutException):
        pass


class _Watchdog(threading.Thread):
    """Kills a kubectl that outlives its timeout, or at once when told to stop."""

    def __init__(self, process, timeout, stop=None):
        super().__init__(name="kubectl-watchdog", daemon=True)
        # Not self._stop: threading.Thread calls a method of that name (on
        # join, is_alive, and in a child after fork).
        self._process, self.timeout, self._stop_event = process, timeout, stop
        self._done = threading.Event()
        self.finished = threading.Event()  # killed for taking too long
        self.stopped = threading.Event()  # killed because of a stop

    def run(self):
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.finished.set()
                break
            # Our own watch rather than sh's _timeout, whose watcher notices
            # the end of a process only every 0.1 s: a poll runs one a page.
            if self._done.wait(remaining if self._stop_event is None else min(remaining, 0.2)):
                return
            if self._stop_event is not None and self._stop_event.is_set():
                self.stopped.set()
                break
        _stop_quietly(self._process, True)

    def cancel(self):
        self._done.set()


def _start_get_raw(settings, path, timeout, stop):
    """Start `kubectl get --raw PATH` in the background, printing into a pipe.

    Returns (process, its _Watchdog, the pipe's read end); `_end_get_raw`
    releases them.
    """
    context = ("--context", settings.context) if settings.context else ()
    command = _kubectl_command(settings)
    read_fd, write_fd = os.pipe()
    try:
        process = command(
            *context,
            "get",
            "--raw",
            path,
            _out=write_fd,
            _bg=True,
            _bg_exc=False,
            _tty_out=False,
            _new_group=True,
            _env=kubectl_environment(),
        )
    except (sh.ErrorReturnCode, OSError) as exc:
        os.close(read_fd)
        raise _kubectl_failure(exc, settings) from None
    finally:
        os.close(write_fd)  # kubectl has its own copy: EOF when it exits
    timer = _Watchdog(process, timeout, stop)
    timer.start()
    return process, timer, read_fd


def _end_get_raw(process, timer, stream):
    """Cancel the watchdog, close the pipe and reap kubectl, killed if still running."""
    timer.cancel()
    stream.close()
    if process.is_alive():
        _stop_quietly(process, kill=True)


class _Page:
    """One page of a pod list on its way: its kubectl, printing into a pipe, and the
    _PageReader that reads the pipe."""

    def __init__(self, settings, path, stop):
        self.process, self.timer, read_fd = _start_get_raw(
            settings, path, settings.kubectl_timeout, stop
        )
        self.reader = _PageReader(read_fd)

    def items(self, settings):
        """Yield the page's items as kubectl prints them; return (continue token, RV)."""
        reader = self.reader
        try:
            yield from reader.items()
        except _BadList as exc:
            if reader.at_eof:  # a kubectl that failed explains it better
                _wait_kubectl(self.process, self.timer, settings)
            raise KubectlError(f"kubectl printed no valid pod list ({exc})") from None
        _wait_kubectl(self.process, self.timer, settings)
        return reader.token, reader.resource_version

    def close(self):
        _end_get_raw(self.process, self.timer, self.reader)


def stream_pod_page(settings, path, stop=None):
    """Yield the items of one page as kubectl prints them; return (continue token, RV).

    kubectl writes into a pipe that is read as it arrives (_PageReader), so
    only a chunk of it and the pod being parsed are in memory, whatever the
    size of the page.
    """
    page = _Page(settings, path, stop)
    try:
        return (yield from page.items(settings))
    finally:
        page.close()


def _wait_kubectl(process, timer, settings, doing="listing pods"):
    """Wait for a kubectl to exit; raise KubectlError unless it succeeded."""
    failure = None
    try:
        process.wait()
    except sh.ErrorReturnCode as exc:
        failure = exc
    # Asked after the wait, not only on a failure: sh raises for an exit once,
    # and the watchdog that killed kubectl may have reaped it first.
    if timer.stopped.is_set():
        raise PollStopped(f"stopped while kubectl was {doing}")
    if timer.finished.is_set():
        raise KubectlError(f"kubectl killed after {timer.timeout:g} s without finishing")
    if failure is not None:
        raise _kubectl_failure(failure, settings)


def list_pods(settings, stop=None, listed=None):
    """Yield the pods of the cluster one at a time, as PodList items, a page per kubectl run.

    `listed`, a dict, gets the list's resourceVersion (to watch from). A
    continue token the server no longer knows raises Expired: the caller
    lists again from the start, forgetting what it read.

    A PodList's metadata, and so its continue token, comes before its items:
    the next page's kubectl starts as soon as the token is read, so its start
    and the API server's time to the page's first byte pass while this page is
    parsed. At most two kubectls run at once; the next one's output waits in
    its pipe (kubectl streams: about 12 MiB of its own memory while it waits).
    """
    page = _Page(settings, pods_url(settings, limit=settings.chunk_size), stop)
    following = None
    first = True
    try:
        while True:
            items = page.items(settings)
            while True:
                try:
                    item = next(items)
                except StopIteration as end:
                    token, resource_version = end.value
                    break
                if following is None and page.reader.has_metadata and page.reader.token:
                    following = _Page(
                        settings,
                        pods_url(settings, limit=settings.chunk_size, continue_=page.reader.token),
                        stop,
                    )
                yield item
            page.close()
            if listed is not None:
                listed["pages"] = listed.get("pages", 0) + 1
                if first:
                    listed["resourceVersion"] = resource_version
            first = False
            if not token:
                return
            page, following = following, None
            if page is None:  # a page of no items, or metadata after them
                page = _Page(
                    settings, pods_url(settings, limit=settings.chunk_size, continue_=token), stop
                )
    finally:
        page.close()
        if following is not None:
            following.close()


def watch_event(line):
    """The (type, object) of one line of a watch, its pod normalised like a list item.

    An ERROR event raises Expired (code 410: list again) or KubectlError;
    a line that is not an event raises KubectlError.
    """
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise KubectlError(f"kubectl printed no valid watch event ({cut(str(exc), 100)})") from None
    kind = event.get("type") if isinstance(event, dict) else None
    obj = event.get("object") if isinstance(event, dict) else None
    if kind not in WATCH_EVENT_TYPES or not isinstance(obj, dict):
        raise KubectlError("kubectl printed no valid watch event (no type or object)")
    if kind == "ERROR":
        error = Expired if obj.get("code") == 410 else KubectlError
        raise error(
            f"watch failed: {obj.get('code')} {obj.get('reason')}: "
            f"{cut(str(obj.get('message', '')))}"
        )
    if kind == "BOOKMARK":
        return kind, obj
    if not _looks_like_pod(obj):
        raise KubectlError(f"kubectl printed a {kind} watch event whose object is not a pod")
    return kind, pod_from_item(obj)


def watch_pods(
    settings,
    resource_version,
    stop=None,
    timeout_seconds=WATCH_TIMEOUT_SECONDS,
    idle=None,
    linger=WATCH_LINGER_SECONDS,
):
    """Yield (type, object) for each pod event after resource_version until the watch ends.

    One kubectl streams the watch for up to timeout_seconds (whole seconds),
    read a line (an event) at a time as it prints it. ADDED, MODIFIED and
    DELETED carry the pod normalised as `pod_from_item` does; a BOOKMARK's
    object is as sent: only its metadata.resourceVersion means anything.
    Returns when the server ends the stream; raises Expired on a 410 (an
    ERROR event or the HTTP status), PollStopped when stop is set, and
    KubectlError on any other failure.
    """
    path = pods_url(
        settings,
        watch=1,
        resourceVersion=resource_version,
        allowWatchBookmarks=True,
        timeoutSeconds=math.ceil(timeout_seconds),
    )
    process, timer, read_fd = _start_get_raw(
        settings, path, timeout_seconds + settings.kubectl_timeout, stop
    )
    # Read as it arrives: `idle()`, if given, is called once the events
    # yielded are all that came within `linger` seconds of the first of them,
    # before waiting for more (a burst is one batch).
    stream = os.fdopen(read_fd, "rb", buffering=0)
    readable = select.poll()  # not select.select: it takes no descriptor past 1023
    readable.register(read_fd, select.POLLIN)
    try:
        rest = b""
        since = None  # when the first event not yet followed by idle() was yielded
        while True:
            if idle is not None and since is not None:
                left = since + linger - time.monotonic()
                if left <= 0 or not readable.poll(math.ceil(left * 1000)):
                    idle()
                    since = None
            chunk = stream.read(WATCH_READ_BYTES)
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    if since is None:
                        since = time.monotonic()
                    yield watch_event(line)
        if rest:  # cut short: a kubectl that failed explains it better
            _wait_kubectl(process, timer, settings, "watching pods")
            raise KubectlError("kubectl printed a partial watch event")
        _wait_kubectl(process, timer, settings, "watching pods")
    finally:
        _end_get_raw(process, timer, stream)


# --- Webhooks: endpoints and the delivery workers ----------------------------


class Response:
    """What a webhook answered: status, headers and (a bounded part of) the body."""

    def __init__(self, status_code, headers, body):
        self.status_code, self.headers, self.body = status_code, headers, body

    def json(self):
        return json.loads(self.body)


class _Headers(dict):
    """An answer's headers, by lower-case name; get() takes any case."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


def read_answer(reader, limit):
    """(status, headers, body, reusable) of one HTTP/1.x answer from a buffered reader.

    The body is cut at `limit` bytes; `reusable` says whether the connection
    can carry the next request. Failures raise http.client's exceptions.
    """
    # What http.client does, without the email parser it runs on the
    # headers, which costs more than the rest of a POST to a fast receiver.
    while True:
        line = reader.readline(ANSWER_LINE_BYTES + 1)
        if not line:
            raise http.client.RemoteDisconnected("closed without an answer")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise http.client.BadStatusLine(cut(line, 100))
        headers = _Headers()
        for _ in range(ANSWER_HEADERS):
            line = reader.readline(ANSWER_LINE_BYTES + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.partition(b":")
            if colon:
                headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
        else:
            raise http.client.HTTPException("too many headers")
        status = int(code)
        if not 100 <= status < 200:  # 1xx: interim, the answer follows
            break
    reusable = version == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, whole = _read_chunked(reader, limit)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise http.client.HTTPException("bad Content-Length") from None
        body = reader.read(min(length, limit))
        if len(body) < min(length, limit):
            raise http.client.IncompleteRead(body)
        whole = length <= limit
    elif status in (204, 304):
        body, whole = b"", True
    else:  # the body ends with the connection
        body, whole = reader.read(limit), False
    return status, headers, body, reusable and whole


def _read_chunked(reader, limit):
    """(body, whole) of a chunked body; not whole when cut at `limit`."""
    parts, size = [], 0
    while True:
        line = reader.readline(ANSWER_LINE_BYTES + 1)
        try:
            chunk = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise http.client.HTTPException("bad chunk size") from None
        if chunk == 0:
            for _ in range(ANSWER_HEADERS):  # trailers, then the end
                if reader.readline(ANSWER_LINE_BYTES + 1) in (b"\r\n", b"\n", b""):
                    return b"".join(parts), True
            raise http.client.HTTPException("too many trailers")
        if size + chunk > limit:
            return b"".join(parts), False
        data = reader.read(chunk)
        if len(data) < chunk or reader.read(2) != b"\r\n":
            raise http.client.IncompleteRead(data)
        parts.append(data)
        size += chunk


class _DeadlineReader(io.RawIOBase):
    """The reading side of a socket that gives up (TimeoutError) at a deadline.

    A socket timeout bounds one read only: a peer that sends a byte at a time
    would hold the reader far longer without one deadline for the whole.
    """

    def __init__(self, sock, deadline, read_timeout_seconds=READ_TIMEOUT_SECONDS):
        super().__init__()
        self._sock, self._deadline = sock, deadline
        self._read_timeout_seconds = read_timeout_seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no whole answer within the deadline")
        self._sock.settimeout(min(remaining, self._read_timeout_seconds))
        return self._sock.recv_into(buffer)

    def makefile(self, mode="rb"):
        """A buffered file over this reader: http.client reads a socket so."""
        return io.BufferedReader(self)


class Endpoint:
    """One webhook URL: its label for logs and how to POST to it.

    Each delivery worker keeps one keep-alive http.client connection, to the
    webhook or to its proxy: requests costs several times more per POST. The
    proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) and CA bundle are looked up
    once, as requests would.
    """

    def __init__(self, url, settings, deadline_seconds=REQUEST_DEADLINE_SECONDS):
        parts = urllib.parse.urlsplit(url)
        self._deadline_seconds = deadline_seconds
        # `id` keys the webhook's outbox (the URL stays out of the state file);
        # `label` names it in logs and metrics: no path, query or user info.
        self.id = endpoint_id(url)
        self.label = redact_url(url)
        self._secret = settings.secret
        self._headers = {"Content-Type": "application/json", "User-Agent": f"k8svent/{version()}"}
        if parts.username is not None:
            self._headers["Authorization"] = _basic_auth(parts.username, parts.password)
        self._host, self._port = (
            parts.hostname,
            parts.port or {"http": 80, "https": 443}[parts.scheme],
        )
        default_port = {"http": 80, "https": 443}[parts.scheme]
        self._host_header = (f"[{self._host}]" if ":" in self._host else self._host) + (
            "" if self._port == default_port else f":{self._port}"
        )
        self._tls = parts.scheme == "https"
        self._target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self._proxy = None
        proxies = requests.utils.get_environ_proxies(url)
        proxy = proxies.get(parts.scheme) or proxies.get("all")
        if proxy:
            if "://" not in proxy:
                proxy = "http://" + proxy
            self._proxy = urllib.parse.urlsplit(proxy)
            if not self._tls:  # plain http goes to the proxy as a full URL
                host = f"[{self._host}]" if ":" in self._host else self._host
                self._target = urllib.parse.urlunsplit(
                    ("http", f"{host}:{self._port}", parts.path or "/", parts.query, "")
                )
                self._headers.update(self._proxy_headers())
        self._context = None
        if self._tls or (self._proxy and self._proxy.scheme == "https"):
            ca_bundle = (
                os.environ.get("REQUESTS_CA_BUNDLE")
                or os.environ.get("CURL_CA_BUNDLE")
                or certifi.where()
            )
            self._context = ssl.create_default_context(
                cafile=None if os.path.isdir(ca_bundle) else ca_bundle,
                capath=ca_bundle if os.path.isdir(ca_bundle) else None,
            )
        self._local = threading.local()
        self._connections = set()
        self._lock = threading.Lock()

    def _connect(self):
        """A new connection (not yet opened) to the webhook or its proxy."""
        host, port, tls = self._host, self._port, self._tls
        tunnel = None
        if self._proxy is not None:
            tunnel = (host, port) if tls else None
            host = self._proxy.hostname
            port = self._proxy.port or (443 if self._proxy.scheme == "https" else 80)
            tls = self._proxy.scheme == "https"
            if tunnel and tls:
                raise OSError(
                    "an https:// proxy for an https:// webhook is "
                    "not supported; use an http:// proxy"
                )
        if tls or tunnel:
            connection = http.client.HTTPSConnection(
                host, port, timeout=CONNECT_TIMEOUT_SECONDS, context=self._context
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT_SECONDS)
        if tunnel:
            headers = self._proxy_headers()
            connection.set_tunnel(*tunnel, headers=headers)
        return connection

    def _proxy_headers(self):
        """Proxy-Authorization, when the proxy URL has credentials."""
        if self._proxy is None or self._proxy.username is None:
            return {}
        return {"Proxy-Authorization": _basic_auth(self._proxy.username, self._proxy.password)}

    def post(self, body, message_id, headers=None):
        """POST one body, with these headers too; return the Response (no redirects followed).

        Every attempt of one delivery gives the same message id; the
        Standard Webhooks timestamp is the attempt's.
        """
        started = time.monotonic()
        try:
            return self._post(body, message_id, headers or {})
        finally:
            metrics.posted(self.label, time.monotonic() - started)

    def _post(self, body, message_id, extra_headers):
        """post() without the timing."""
        # One deadline for the whole attempt, a new connection included.
        deadline = time.monotonic() + self._deadline_seconds
        headers = dict(self._headers)
        headers.update(extra_headers)
        if self._secret:
            headers.update(sign(body, self._secret, message_id, int(time.time())))
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            try:
                return self._exchange(connection, body, headers, deadline)
            except (ConnectionError, http.client.HTTPException):
                # The server may close an idle keep-alive connection at any
                # time: try once more on a new one.
                self._drop(connection)
        connection = self._connect()
        with self._lock:
            self._connections.add(connection)
        self._local.connection = connection
        try:
            return self._exchange(connection, body, headers, deadline)
        except BaseException:
            self._drop(connection)
            raise

    def _exchange(self, connection, body, headers, deadline):
        """Send one request on a connection and read the whole answer by the deadline."""
        if connection.sock is None:
            connection.connect()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no whole answer within the deadline")
        # sendall's timeout bounds the whole write.
        connection.sock.settimeout(min(remaining, READ_TIMEOUT_SECONDS))
        # The request line, headers and body in one write: http.client would
        # build the headers a call at a time and send the body apart.
        lines = [
            f"POST {self._target} HTTP/1.1",
            f"Host: {self._host_header}",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        connection.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        reader = io.BufferedReader(_DeadlineReader(connection.sock, deadline))
        status, headers, data, reusable = read_answer(reader, RESPONSE_BODY_BYTES)
        if not reusable:
            self._drop(connection)  # closed by the server, or too long to keep
        return Response(status, headers, data)

    def _drop(self, connection):
        connection.close()
        with self._lock:
            self._connections.discard(connection)
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None

    def close(self):
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()


def _basic_auth(username, password):
    """The value of a Basic Authorization header for URL-quoted credentials."""
    credentials = f"{urllib.parse.unquote(username)}:{urllib.parse.unquote(password or '')}"
    try:
        raw = credentials.encode("latin-1")  # as requests does
    except UnicodeEncodeError:
        raw = credentials.encode()
    return "Basic " + base64.b64encode(raw).decode()


class StdoutEndpoint:
    """--dry-run: print each payload as a line instead of posting it."""

    id = "stdout"
    label = "stdout"

    def __init__(self, stream=None):
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def post(self, body, message_id=None, headers=None):
        try:
            with self._lock:
                self._stream.write(body.decode() + "\n")
                self._stream.flush()
        except BrokenPipeError:
            raise OutputClosed("stdout was closed") from None
        return None

    def close(self):
        pass


def correlation_id(response):
    """The correlation_id of a small JSON response body, if it has one."""
    if (
        "json" not in response.headers.get("Content-Type", "")
        or len(response.body) > CORRELATION_BODY_BYTES
    ):
        return None
    try:
        found = response.json().get("correlation_id")
    except (ValueError, AttributeError, TypeError, RecursionError):
        # Whatever a receiver answers, a success stays a success.
        return None
    return cut(str(found), 100) if found is not None else None


def retryable(status):
    """Whether an HTTP status is worth retrying (429 and 5xx)."""
    return status == 429 or status >= 500


def failure_cause(exc):
    """What went wrong with a request, as the OS or TLS said it, in a few words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message or 'certificate verify failed'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"DNS: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):  # a ConnectionResetError too
        return "closed without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP answer ({type(exc).__name__})"
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).lower()


class Sender:
    """Delivers one webhook's outbox with a pool of worker threads.

    Workers take the earliest-due row of the outbox (the head of a lane no
    other worker holds: one delivery per pod name at a time), POST the pod's
    newest state, and settle the row (2xx, or a refusal) or move its due time
    on (back-off); none sleeps holding a row.
    After DOWN_AFTER_FAILURES failures in a row that are the webhook's (a
    connection that fails, or a 5xx/429 for a row never tried) it is down:
    one probe at a time, backing off to 60 s, until one succeeds.
    """

    def __init__(
        self,
        endpoint,
        store,
        settings,
        stop,
        rng=random,
        clock=time.monotonic,
        source=CLOUDEVENTS_SOURCE_UNKNOWN,
        gate=None,
    ):
        self.endpoint = endpoint
        # With a Lease: whether this replica may deliver (LeaderElector.may_deliver).
        self._gate = gate
        self._outbox = store.outbox
        self._settings = settings
        self._source = source
        # --dry-run prints bodies alone: binary-mode events go out structured.
        stdout = isinstance(endpoint, StdoutEndpoint)
        self._format = settings.format
        if self._format == "cloudevents" and stdout:
            self._format = "cloudevents-json"
        self._stop = stop
        self._rng = rng
        self._clock = clock
        self._cond = threading.Condition()
        self._busy = set()  # lanes in flight, in _ready or in _done: one delivery each
        self._done = []  # (lane, key, msg_id) delivered, their rows not yet deleted
        self._settle_at = 0.0  # when _done is settled at the latest
        self._ready = collections.deque()  # claimed rows no worker has taken yet
        # The last look claimed every head due, and nothing was owed or freed
        # since: the next look would find nothing, and is not made.
        self._all_taken = False
        self._idle_waiters = 0  # threads in wait_idle
        self.up = True
        self._failures = 0  # connection-level failures in a row
        self._cause = None  # of the last of them
        self._down_since = None
        self._down_logged = 0.0
        self._probe_key = None  # the key of the probe in flight, when down
        self._probes_failed = 0  # failed probes (and the going down) since down
        self._probe_due = 0.0
        self._early_probe_at = 0.0
        self._housekept = 0.0
        self._started = clock()
        self.succeeded = 0
        self.failed = 0  # refused, or past the retry budget
        self.output_closed = False
        self._store_failing = False  # logged once until the store works again
        self._refusals = Refusals()
        # stdout (--dry-run) is one stream that never waits on a network:
        # one worker writes it, a batch claimed at a time.
        workers = 1 if stdout else settings.workers
        self._claim_limit = SETTLE_BATCH if stdout else settings.workers
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name=f"deliver-{endpoint.label}-{i}")
            for i in range(workers)
        ]

    def start(self):
        for thread in self._threads:
            thread.start()

    def wake(self):
        """New rows may be owed: let idle workers look (and a down webhook be probed soon)."""
        with self._cond:
            if not self.up and self._probe_key is None:
                # New work may succeed where the old failed; at most one such
                # early probe every EARLY_PROBE_SECONDS.
                now = self._clock()
                self._probe_due = min(self._probe_due, max(now, self._early_probe_at))
                self._early_probe_at = self._probe_due + EARLY_PROBE_SECONDS
            self._all_taken = False
            self._call_workers(1)

    def _call_workers(self, count):
        """Wake `count` waiting workers (lock held); every waiter when stopping or waited on."""
        # Waking every worker for each change costs each a claim that finds
        # nothing: one looks, and calls others for the rows it claims.
        if self._stop.is_set() or self._idle_waiters:
            self._cond.notify_all()
        else:
            self._cond.notify(count)

    def _work(self):
        """A worker: take a due row, attempt it, settle it; wait when none is due."""
        while not self._stop.is_set():
            with self._cond:
                try:
                    taken, wait = self._take()
                    self._store_failing = False
                except sqlite3.Error as exc:  # a full disk, say: try again later
                    self._store_failed("cannot read the outbox", exc)
                    taken, wait = None, HOUSEKEEPING_SECONDS
                except Exception:  # a bug: logged whole once, and the worker lives on
                    if not self._store_failing:
                        log.exception("taking a delivery for %s crashed", self.endpoint.label)
                    self._store_failing = True
                    taken, wait = None, HOUSEKEEPING_SECONDS
                if taken is None:
                    self._cond.wait(wait)
                    continue
            try:
                outcome = self._attempt(taken)
            except OutputClosed:
                self.output_closed = True
                self._stop.set()
                outcome = None
            except Exception:  # a bug, not a delivery failure: log it whole
                log.exception("delivery of %s to %s crashed", taken.key, self.endpoint.label)
                outcome = ("retry", "crashed", None, None)
            if outcome is not None:
                try:
                    self._record(taken, *outcome)
                except sqlite3.Error as exc:
                    # The row stays as it was: sent again later, with its id.
                    self._store_failed(f"cannot record the delivery of {taken.key}", exc)
            with self._cond:
                if outcome is not None and outcome[0] in ("success", "rejected"):
                    if not self._done:
                        self._settle_at = self._clock() + SETTLE_SECONDS
                    self._done.append((taken.lane, taken.key, taken.msg_id))  # busy till settled
                else:
                    self._busy.discard(taken.lane)
                    self._all_taken = False
                if outcome is not None:
                    self._note_health(taken, *outcome)
                # This worker looks again itself (what it freed included): only
                # a wait_idle needs telling.
                if self._idle_waiters:
                    self._cond.notify_all()
        with self._cond:
            # Rows claimed but never attempted stay owed, and are not in flight.
            self._busy.difference_update(owed.lane for owed in self._ready)
            self._ready.clear()
            self._settle_done()
            self._cond.notify_all()

    def _store_failed(self, what, exc):
        """Log a failing store once (at error) until it works again; then at debug."""
        level = logging.DEBUG if self._store_failing else logging.ERROR
        self._store_failing = True
        log.log(level, "%s for %s: %s", what, self.endpoint.label, exc)

    def settle(self):
        """Settle the deliveries done so far now, rather than with the next batch."""
        with self._cond:
            self._settle_done()

    def _settle_done(self):
        """Delete the rows of the deliveries done since the last time, in one go (lock held)."""
        # One transaction for a batch of deliveries rather than one each: a
        # crash before it sends them again, with their ids (receivers de-dup).
        if self._done:
            done, self._done = self._done, []
            self._all_taken = False
            try:
                self._outbox.settle(self.endpoint.id, [(key, msg_id) for _, key, msg_id in done])
            finally:
                self._busy.difference_update(lane for lane, _, _ in done)

    def _take(self):
        """(the row to attempt, None) or (None, seconds to wait) (lock held)."""
        if self._gate is not None and not self._gate():
            # A standby, or a holder past its renew deadline (fenced): nothing
            # is claimed; rows claimed but not attempted stay owed.
            self._busy.difference_update(owed.lane for owed in self._ready)
            self._ready.clear()
            self._settle_done()
            self._all_taken = False
            return None, HOUSEKEEPING_SECONDS
        if self._ready:
            return self._ready.popleft(), None
        now = self._clock()
        if len(self._done) >= SETTLE_BATCH or now >= self._settle_at:
            self._settle_done()
        if now >= self._housekept + HOUSEKEEPING_SECONDS:
            self._housekeep(now)
        limit = HOUSEKEEPING_SECONDS
        if not self.up:
            if self._probe_key is not None:
                return None, limit
            if now < self._probe_due:
                return None, min(limit, self._probe_due - now)
        if self.up and self._all_taken:
            wait = min(limit, max(0.01, self._settle_at - now)) if self._done else limit
            return None, wait
        # Rows are claimed a few at a time (one query for several deliveries);
        # all of them count as busy until attempted.
        # A probe tries what was never tried first: when only a few pods fail
        # (a receiver that refuses them), new work shows at once that it is up.
        if self.up:
            claimed, due = self._outbox.take(self.endpoint.id, now, self._busy, self._claim_limit)
            self._all_taken = len(claimed) < self._claim_limit and due is None
        else:
            claimed = self._outbox.claim(self.endpoint.id, now, self._busy, 1, untried_first=True)
            due = None if claimed else self._outbox.next_due(self.endpoint.id, self._busy)
        if not claimed:
            if self._done:  # its lanes may be owed more: look again once settled
                due = self._settle_at if due is None else min(due, self._settle_at)
            return None, limit if due is None else min(limit, max(0.01, due - now))
        self._busy.update(owed.lane for owed in claimed)
        if not self.up:
            self._probe_key = claimed[0].key
        self._ready.extend(claimed[1:])
        if self._ready:
            self._call_workers(len(self._ready))
        return claimed[0], None

    def _attempt(self, owed):
        """POST the newest state of one pod: (outcome, reason, status, retry_after)."""
        msg_id = delivery_message_id(owed)  # a change's, the same on every replica
        body, headers = message(
            self._format, owed.kind, owed.key, owed.body, msg_id, owed.seen, self._source
        )
        try:
            response = self.endpoint.post(body, msg_id, headers)
        except OutputClosed:
            raise
        except (OSError, http.client.HTTPException) as exc:
            return "retry", failure_cause(exc), None, None
        if response is None or 200 <= response.status_code < 300:
            cid = correlation_id(response) if response is not None else None
            log.debug(
                "delivered %s to %s%s",
                owed.key,
                self.endpoint.label,
                f" (correlation_id {cid})" if cid else "",
                extra={
                    "pod": owed.key,
                    "endpoint": self.endpoint.label,
                    "status": getattr(response, "status_code", None),
                    "correlation_id": cid,
                },
            )
            return "success", None, None, None
        status = response.status_code
        cid = correlation_id(response)
        if not retryable(status):
            # Each at debug; at error the first, then a sum once a minute: a
            # receiver that refuses every pod must not write a line per pod.
            with self._cond:
                first = self._refusals.add(owed.key, status, cid, self._clock())
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "POST of %s to %s rejected (HTTP %s%s); not retrying this state of the pod%s",
                owed.key,
                self.endpoint.label,
                status,
                f", correlation_id {cid}" if cid else "",
                "; more refusals are summed up once a minute" if first else "",
                extra={
                    "pod": owed.key,
                    "endpoint": self.endpoint.label,
                    "status": status,
                    "correlation_id": cid,
                },
            )
            return "rejected", None, status, None
        return (
            "retry",
            f"HTTP {status}",
            status,
            retry_after_seconds(response.headers.get("Retry-After")),
        )

    def _record(self, owed, outcome, reason, status, retry_after):
        """Record an attempt's outcome in the outbox and the metrics."""
        label = self.endpoint.label
        if outcome in ("success", "rejected"):
            metrics.delivered(label, outcome)  # the row goes with the next batch
            return
        metrics.delivered(label, "retry")
        attempts = owed.attempts + 1
        delay = backoff_delay(attempts, self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_WAIT_SECONDS))
        self._outbox.retry_at(
            self.endpoint.id, owed.key, owed.msg_id, attempts, self._clock() + delay
        )
        log.debug(
            "attempt %d to POST %s to %s failed (%s); retrying in %.1f s",
            attempts,
            owed.key,
            self.endpoint.label,
            reason,
            delay,
            extra={"pod": owed.key, "endpoint": label, "status": status},
        )

    def _note_health(self, owed, outcome, reason, status, retry_after):
        """Count an attempt towards the webhook's health: down, probing, back up (lock held)."""
        now = self._clock()
        was_probe = owed.key == self._probe_key
        if was_probe:
            self._probe_key = None
        if outcome in ("success", "rejected"):
            if outcome == "success":
                self.succeeded += 1
            else:
                self.failed += 1
            self._failures = 0
            if not self.up:
                self._back_up(now)
            return
        # A connection that fails says the webhook is down; an HTTP error says
        # so only for a delivery never tried before: one that failed already
        # may be refused for what it holds (a receiver that answers 500 for a
        # few pods), which says nothing of the others.
        if status is None or owed.attempts == 0 or was_probe:
            self._failures += 1
        self._cause = reason
        if self.up and self._failures >= DOWN_AFTER_FAILURES:
            self._go_down(now)
        if not self.up and (was_probe or not self._probes_failed):
            self._probes_failed += 1
            wait = backoff_delay(self._probes_failed, self._rng)
            if retry_after is not None:
                wait = max(wait, min(retry_after, MAX_WAIT_SECONDS))
            self._probe_due = now + wait

    def _backlog(self):
        """(rows owed, seconds the oldest has waited) for this webhook."""
        try:
            count, oldest = self._outbox.backlog(self.endpoint.id)
        except sqlite3.Error:  # for a log line: not worth a worker
            return -1, 0.0
        return count, 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def _go_down(self, now):
        self.up = False
        # Rows claimed but not yet attempted wait for the webhook to come back.
        self._busy.difference_update(owed.lane for owed in self._ready)
        self._ready.clear()
        self._down_since = self._down_logged = now
        self._probes_failed = 0
        count, age = self._backlog()
        log.warning(
            "webhook %s is down (%s); %d deliveries owed, the oldest for "
            "%.0f s; probing with one request at a time",
            self.endpoint.label,
            self._cause,
            count,
            age,
            extra={"endpoint": self.endpoint.label},
        )

    def _back_up(self, now):
        self.up = True
        self._all_taken = False
        self._probes_failed = 0
        count, age = self._backlog()
        log.warning(
            "webhook %s is back up after %.0f s; %d deliveries owed, the oldest for %.0f s",
            self.endpoint.label,
            now - self._down_since,
            count,
            age,
            extra={"endpoint": self.endpoint.label},
        )
        self._cond.notify_all()

    def _housekeep(self, now):
        """Count deliveries past the retry budget; say every minute that a webhook is down;
        hand back the pages of the bodies dropped once all is delivered."""
        self._housekept = now
        self._all_taken = False  # what the look missed, if anything, is found now
        self._outbox.reclaim_drained()
        # A process gives every row its whole budget: one owed since before a
        # restart is not counted (nor, under --once, given up) at once.
        expired = 0
        if now - self._started >= self._settings.retry_budget:
            expired = self._outbox.expire(
                self.endpoint.id, time.time() - self._settings.retry_budget
            )
        if expired:
            self.failed += expired
            metrics.delivered(self.endpoint.label, "failed", expired)
            log.error(
                "%d deliveries to %s are still owed after the retry budget "
                "(%g s); they stay owed and are retried",
                expired,
                self.endpoint.label,
                self._settings.retry_budget,
                extra={"endpoint": self.endpoint.label},
            )
        self._report_refusals(now)
        if not self.up and now >= self._down_logged + DOWN_LOG_SECONDS:
            self._down_logged = now
            count, age = self._backlog()
            log.warning(
                "webhook %s is still down after %.0f s (%s); %d deliveries "
                "owed, the oldest for %.0f s",
                self.endpoint.label,
                now - self._down_since,
                self._cause,
                count,
                age,
                extra={"endpoint": self.endpoint.label},
            )

    def _report_refusals(self, now, final=False):
        """Log the refusals summed up since the last line, once a minute (lock held)."""
        summary = self._refusals.report(now, final)
        if summary is not None:
            count, statuses, (key, status, cid), seconds = summary
            log.error(
                "%d more deliveries to %s rejected in the last %.0f s (%s; one was %s, HTTP %s%s); "
                "not retrying those states of the pods",
                count,
                self.endpoint.label,
                seconds,
                ", ".join(f"HTTP {code}: {n}" for code, n in sorted(statuses.items())),
                key,
                status,
                f", correlation_id {cid}" if cid else "",
                extra={"endpoint": self.endpoint.label, "pod": key, "status": status},
            )

    def idle(self):
        """Whether nothing is in flight and nothing owed is within its retry budget."""
        with self._cond:
            if not self._ready and len(self._done) == len(self._busy):
                self._settle_done()
            if self._busy:
                return False
            self._housekeep(self._clock())
            return self._outbox.pending(self.endpoint.id) == 0

    def wait_idle(self, timeout=None):
        """Wait until idle() (or a stop, with nothing in flight); True if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.idle():
                return True
            with self._cond:
                if self._stop.is_set() and not self._busy:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle_waiters += 1
                try:
                    self._cond.wait(
                        HOUSEKEEPING_SECONDS
                        if remaining is None
                        else min(remaining, HOUSEKEEPING_SECONDS)
                    )
                finally:
                    self._idle_waiters -= 1

    def unfinished(self):
        """Whether anything owed was left unsent (after a stop)."""
        with self._cond:
            return bool(self._busy) or self._outbox.pending(self.endpoint.id) > 0

    def join(self, timeout):
        """Wait up to `timeout` s for the workers to end (after a stop); True if they did."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def close(self):
        """Stop the workers without waiting for them; log the refusals not yet logged."""
        self._stop.set()
        self.wake()
        with self._cond:
            self._report_refusals(self._clock(), final=True)
        self.endpoint.close()


class Refusals:
    """A webhook's refused deliveries, for one log line a minute: a count and an example."""

    def __init__(self):
        self._window_start = None  # when the first refusal of this minute was logged
        self._count = 0  # refusals since, not yet logged
        self._statuses = collections.Counter()
        self._example = None

    def add(self, key, status, cid, now):
        """Count a refusal; True if it is the first in a minute (to log whole)."""
        if self._window_start is None:
            self._window_start = now
            return True
        self._count += 1
        self._statuses[status] += 1
        if self._example is None:
            self._example = (key, status, cid)
        return False

    def report(self, now, final=False):
        """(count, {status: count}, example, seconds) to log now, or None; starts a new minute."""
        if self._window_start is None or not (
            final or now >= self._window_start + REFUSED_LOG_SECONDS
        ):
            return None
        summary = (
            (self._count, dict(self._statuses), self._example, now - self._window_start)
            if self._count
            else None
        )
        # A minute with no refusal after the line: the next refusal is logged whole.
        self._window_start = now if self._count else None
        self._count, self._statuses, self._example = 0, collections.Counter(), None
        return summary


# --- Registry ----------------------------------------------------------------


class RegistryClient:
    """Lists an image repository's tags over the OCI distribution API.

    One requests.Session, a timeout on every call, anonymous bearer tokens
    fetched on a 401 challenge and kept until they expire. Tokens are never
    logged nor put in an error.
    """

    def __init__(
        self,
        image,
        *,
        user_agent="k8svent",
        timeout_seconds=REGISTRY_TIMEOUT_SECONDS,
        logger=None,
        clock=time.monotonic,
        session=None,
    ):
        self.base_url, self.repository = parse_image(image)
        self.image = image
        self.timeout_seconds = timeout_seconds
        self.log = logger or logging.getLogger("k8svent")
        self._clock = clock
        self._session = session or requests.Session()
        # No ~/.netrc credentials sent behind our back: the environment is
        # not trusted wholesale; its proxies and CA bundle are read below.
        self._session.trust_env = False
        self._session.headers["User-Agent"] = user_agent
        self._verify = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        )
        self._token = None
        self._token_expires = 0.0

    def close(self):
        """Release the session's connections."""
        self._session.close()

    def tags_url(self):
        """Return the URL of the first page of the tags list."""
        return f"{self.base_url}/v2/{self.repository}/tags/list"

    def list_tags(self):
        """Return every tag of the repository, following Link rel="next" pages."""
        tags, url, seen = [], self.tags_url(), set()
        while url is not None:
            if url in seen:
                raise RegistryError(f"tags list of {self.image} pages in a loop", url=url)
            if len(seen) >= REGISTRY_MAX_PAGES:
                raise RegistryError(
                    f"tags list of {self.image} has more than {REGISTRY_MAX_PAGES} pages", url=url
                )
            if not same_origin(url, self.base_url):
                # The bearer token is for the registry; nothing else gets it.
                raise RegistryError(
                    f"tags list of {self.image} links to another origin ({endpoint_label(url)})",
                    url=self.tags_url(),
                )
            seen.add(url)
            response, body = self._get(url)
            tags.extend(self._page_tags(response, body, url))
            url = parse_link_next(response.headers.get("Link"), url)
        if not tags:
            raise RegistryError(f"registry lists no tags for {self.image}", url=self.tags_url())
        return tags

    def manifest_digest(self, tag):
        """Return the digest (sha256:...) the registry gives a tag's manifest."""
        url = f"{self.base_url}/v2/{self.repository}/manifests/{urllib.parse.quote(tag)}"
        response, _ = self._get(url, method="HEAD", accept=", ".join(MANIFEST_MEDIA_TYPES))
        digest = response.headers.get("Docker-Content-Digest", "")
        if not _DIGEST.fullmatch(digest):
            raise RegistryError(
                f"no digest for {self.image}:{tag} in the registry's answer",
                url=url,
                status=response.status_code,
            )
        return digest

    def _page_tags(self, response, body, url):
        """Return the tags of one tags/list page, or raise RegistryError."""
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise RegistryError(
                f"invalid JSON in tags list from {url}", url=url, status=response.status_code
            ) from error
        tags = body.get("tags") if isinstance(body, dict) else None
        if tags is None and isinstance(body, dict) and "tags" in body:
            return []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RegistryError(
                f"no tags array in tags list from {url}", url=url, status=response.status_code
            )
        return tags

    def _get(self, url, method="GET", accept="application/json"):
        """Send a request with a bearer token when one is needed; (response, body)."""
        response, body = self._request(method, url, self._valid_token(), accept)
        if response.status_code == 401:
            challenge = parse_www_authenticate(response.headers.get("WWW-Authenticate"))
            if not challenge.get("realm"):
                raise RegistryError(
                    f"registry refused {url} (401) without a bearer challenge", url=url, status=401
                )
            self._fetch_token(challenge)
            response, body = self._request(method, url, self._token, accept)
        if response.status_code != 200:
            self._raise_for(method, response, body, url)
        return response, body

    def _request(self, method, url, token, accept):
        """Send one request, turning connection failures into RegistryError."""
        headers = {"Accept": accept}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response, body = self._fetch(method, url, headers)
        self.log.debug("%s %s: %s", method, url, response.status_code)
        return response, body

    def _fetch(self, method, url, headers, params=None):
        """One request: redirects followed on the same origin only, the body read up to a cap."""
        for _ in range(REGISTRY_MAX_REDIRECTS + 1):
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=headers,
                    params=params,
                    timeout=self.timeout_seconds,
                    allow_redirects=False,
                    stream=True,
                    verify=self._verify,
                    proxies=requests.utils.get_environ_proxies(url),
                )
                body = _read_capped(response, REGISTRY_BODY_BYTES)
            except requests.RequestException as error:
                raise RegistryError(
                    f"{method} {url} failed: {type(error).__name__}", url=url
                ) from error
            if body is None:
                raise RegistryError(
                    f"{method} {url} answered more than {REGISTRY_BODY_BYTES} bytes",
                    url=url,
                    status=response.status_code,
                )
            if not response.is_redirect:
                return response, body
            target = urllib.parse.urljoin(response.url, response.headers["Location"])
            if not same_origin(target, url):
                raise RegistryError(
                    f"{method} {url} redirects to another origin ({endpoint_label(target)})",
                    url=url,
                    status=response.status_code,
                )
            url, params = target, None
        raise RegistryError(
            f"{method} {url} redirects more than {REGISTRY_MAX_REDIRECTS} times", url=url
        )

    def _raise_for(self, method, response, body, url):
        """Raise the RegistryError that a non-200 answer means."""
        status = response.status_code
        retry_after = None
        if status in (429, 503):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        detail = f": {cut(body)}" if body and status < 500 else ""
        message = f"{method} {url} answered {status}{detail}"
        if retry_after is not None:
            message += f" (retry after {retry_after:.0f} s)"
        raise RegistryError(message, url=url, status=status, retry_after_seconds=retry_after)

    def _valid_token(self):
        """Return the cached token while it has not expired."""
        if self._token and self._clock() < self._token_expires:
            return self._token
        self._token = None
        return None

    def _fetch_token(self, challenge):
        """Get an anonymous token from the challenge's realm and cache it."""
        realm = challenge["realm"]
        parts = urllib.parse.urlsplit(realm)
        if not parts.hostname or not (
            parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname))
        ):
            raise RegistryError(
                f"token realm of {self.image} is not an https URL ({cut(realm, 100)})",
                url=self.base_url,
                status=401,
            )
        params = {"client_id": REGISTRY_CLIENT_ID}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        params["scope"] = challenge.get("scope") or f"repository:{self.repository}:pull"
        try:
            response, body = self._fetch("GET", realm, {"Accept": "application/json"}, params)
        except RegistryError as error:
            raise RegistryError(
                f"token request to {realm} failed: {error}", url=realm, status=error.status
            ) from error
        self.log.debug("GET %s (token): %s", realm, response.status_code)
        if response.status_code != 200:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise RegistryError(
                f"token request to {realm} answered {response.status_code}",
                url=realm,
                status=response.status_code,
                retry_after_seconds=retry_after,
            )
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise RegistryError(
                f"invalid JSON from token service {realm}", url=realm, status=200
            ) from error
        token = None
        if isinstance(body, dict):
            token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"no token in answer from {realm}", url=realm, status=200)
        expires_in = body.get("expires_in")
        if not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = REGISTRY_TOKEN_DEFAULT_SECONDS
        self._token = token
        self._token_expires = self._clock() + min(expires_in, MAX_SECONDS)


def _read_capped(response, limit):
    """The body of a streamed response, or None when it is longer than limit bytes."""
    try:
        body = bytearray()
        for chunk in response.iter_content(1 << 16):
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)
    finally:
        response.close()


def _loopback(hostname):
    """Whether a URL's host name is a loopback host (where plain http is allowed)."""
    return (f"[{hostname}]" if ":" in hostname else hostname).lower() in LOOPBACK_HOSTS


def same_origin(url, other):
    """Whether two URLs have the same scheme, host and port."""
    return endpoint_label(url) == endpoint_label(other)


def locate_own_pod(
    pod_name, pod_namespace, hostname, namespace_path=SERVICE_ACCOUNT_NAMESPACE_PATH
):
    """Return (name, namespace) of the pod k8svent runs in, else None.

    POD_NAME/POD_NAMESPACE come from the downward API; failing that, a pod's
    hostname is its name and the service account knows its namespace.
    """
    name = pod_name or hostname
    namespace = pod_namespace
    if not namespace:
        try:
            namespace = Path(namespace_path).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    if not name or not namespace:
        return None
    return name, namespace


def get_own_pod(settings, name, namespace):
    """Ask kubectl for k8svent's own pod object, or raise KubectlError."""
    output = run_kubectl(settings, "get", "pod", name, "-n", namespace, "-o", "json")
    try:
        pod = json.loads(output)
    except (ValueError, RecursionError):
        raise KubectlError(f"kubectl get pod {name} printed invalid JSON") from None
    if not isinstance(pod, dict):
        raise KubectlError(f"kubectl get pod {name} printed no pod")
    return pod


def get_own_image(settings, name, namespace):
    """Ask kubectl for k8svent's own pod; return its container's image, else None."""
    return own_image(get_own_pod(settings, name, namespace), settings.image)


# --- Polling and watching ----------------------------------------------------


class Poller:
    """The worker that polls pods on a timer and hands out what is owed."""

    def __init__(self, settings, store, senders):
        self._settings = settings
        self._store = store
        self._snapshot = store.snapshot
        self._outbox = store.outbox
        self._senders = senders
        self.stop_event = threading.Event()
        self.last_poll_ok = None
        self.listed_rv = None
        self.api_failure = None  # why the API server cannot be read now, for /readyz
        self.first_listed_rv = None  # of this process's first list: what it knows since
        self.last_progress = time.monotonic()  # for Health: is it stuck?
        self.listing = None  # the ListProgress of the list under way, for /readyz
        self.first_poll_done = threading.Event()
        self._thread = threading.Thread(target=self.run, name="poller", daemon=True)

    def _name(self):
        """What the log calls one cycle: a poll (the Watcher: its list)."""
        return "poll"

    def poll_once(self):
        """One whole cycle: list, merge, mark deletions, deliver; True if ok.

        The list's resourceVersion is kept in `listed_rv`.
        """
        started = time.monotonic()
        snapshot = self._snapshot
        listed = {}
        name = self._name()
        try:
            for restarts in range(LIST_RESTARTS + 1):
                try:
                    counts, seen = self._list(listed)
                    break
                except Expired:
                    # The list took longer than the server keeps a snapshot:
                    # all over again, forgetting what this one read.
                    if restarts == LIST_RESTARTS:
                        raise
                    log.warning("continue token expired; listing pods again")
        except PollStopped:
            log.info("%s stopped before it finished; nothing changed", name)
            return False
        except KubectlError as exc:
            if self.stop_event.is_set():  # a kubectl we stopped ourselves
                log.info("%s stopped before it finished; nothing changed", name)
                return False
            metrics.polled("failure")
            self._list_failed(exc)
            self.api_failure = f"listing pods failed: {exc}"
            metrics.api_up.set(0)
            return False
        finally:
            self.listing = None
        self.api_failure = None
        metrics.api_up.set(1)
        unseen = snapshot.finish_poll()
        counts["deleted"] = snapshot.replaced + len(unseen)
        self._wake_senders()
        snapshot.prune()
        self.listed_rv = listed.get("resourceVersion")
        if self.first_listed_rv is None:
            self.first_listed_rv = self.listed_rv
        self.last_poll_ok = time.time()
        metrics.polled("success", time.monotonic() - started, seen, counts)
        log.info(
            "%s: %d pods seen; sending %s (%.2f s)",
            name,
            seen,
            ", ".join(f"{counts[kind]} {kind}" for kind in self._settings.send),
            time.monotonic() - started,
        )
        return True

    def _list_failed(self, exc):
        """Log a failed list (each one: they are --retry-interval apart)."""
        log.error(
            "%s failed, nothing changed; %s: %s",
            self._name(),
            "exiting with status 1"
            if self._settings.once
            else f"retrying in {self._settings.retry_interval:g} s",
            exc,
        )

    def _list(self, listed):
        """List every pod into the snapshot's staging area; return (counts, pods seen)."""
        self._snapshot.begin_poll()
        counts = {"new": 0, "changed": 0, "unhealthy": 0, "deleted": 0}
        seen = 0
        batch = []
        progress = self.listing = ListProgress(time.monotonic(), listed)
        for item in list_pods(self._settings, self.stop_event, listed):
            batch.append(_listed_entry(item))
            progress.count()
            if len(batch) >= _SQL_BATCH:
                if self.stop_event.is_set():
                    raise PollStopped("stopped while listing pods")
                self._apply(batch, counts)
                seen += len(batch)
                batch = []
        self._apply(batch, counts)
        return counts, seen + len(batch)

    def _apply(self, batch, counts):
        """Stage a batch of pods and add up the reasons."""
        for reason, n in self._snapshot.apply_page(batch).items():
            counts[reason] += n
        self.last_progress = time.monotonic()  # for /healthz: not stuck

    @property
    def applied_rv(self):
        """The resourceVersion up to which the store holds every change (None: not known)."""
        return self.listed_rv

    def _wake_senders(self):
        for sender in self._senders:
            sender.wake()

    def run(self):
        """Poll at once, then every interval (retry interval after a failure)."""
        while not self.stop_event.is_set():
            try:
                ok = self.poll_once()
            except Exception:  # never let the poller die silently
                log.exception("poll crashed; retrying in %g s", self._settings.retry_interval)
                metrics.polled("error")
                ok = False
            self.last_progress = time.monotonic()
            if ok:
                self.first_poll_done.set()
            wait = self._settings.interval if ok else self._settings.retry_interval
            if self.stop_event.wait(wait):
                return

    def start(self):
        self._thread.start()

    def stop(self):
        self.stop_event.set()

    def join(self, timeout=None):
        self._thread.join(timeout)

    def is_alive(self):
        return self._thread.is_alive()

    def threads_alive(self):
        """Whether every thread of this worker runs (for /healthz)."""
        return self.is_alive()


class ListProgress:
    """How far a list has got, logged every LIST_PROGRESS_SECONDS while it lasts."""

    def __init__(self, started, listed, clock=time.monotonic):
        self._started = self._logged = started
        self._listed = listed  # list_pods counts the pages it has read in it
        self._pages_before = listed.get("pages", 0)
        self._clock = clock
        self.pods = 0

    def count(self):
        """One more pod listed; log the progress when it is due."""
        self.pods += 1
        if self.pods % 256 == 0:  # the clock a pod would cost more than the pod
            now = self._clock()
            if now - self._logged >= LIST_PROGRESS_SECONDS:
                self._logged = now
                log.info("%s", self.text(now))

    def text(self, now=None):
        """listing pods: N so far, N pages, N pods/s."""
        seconds = max((self._clock() if now is None else now) - self._started, 1e-3)
        pages = self._listed.get("pages", 0) - self._pages_before
        return (
            f"listing pods: {self.pods} so far, {pages} pages in {seconds:.0f} s, "
            f"{self.pods / seconds:.0f} pods/s"
        )


def _listed_entry(item):
    """The PodEntry of a list item (KubectlError if it is not a pod)."""
    if not _looks_like_pod(item):
        raise KubectlError("kubectl printed a pod list with an item that is not a pod")
    return pod_entry(pod_from_item(item))


def _report_missed(count, what, sent="sending them now"):
    """Count and log what a resync found that the watch had missed."""
    metrics.resync_changes.inc(count)
    if count:
        log.warning("resync: the watch missed %d changes (%s); %s", count, what, sent)


def _newer_rv(resource_version, than):
    """Whether a resourceVersion is later than another (False when either is not a number)."""
    # resourceVersions are opaque to clients, but every Kubernetes API server
    # writes etcd's revision: comparing them tells a change made after the
    # watch stopped (not missed) from one it never reported.
    newer, older = _rv_number(resource_version), _rv_number(than)
    return newer is not None and older is not None and newer > older


def _rv_number(resource_version):
    """A resourceVersion as an integer, or None when it is not one."""
    try:
        return int(resource_version)
    except (TypeError, ValueError):
        return None


# What the watch applied to a pod since a resync's list began, when its
# event carried no resourceVersion.
TOUCHED = "touched"


def resync_action(listed_rv, watch_rv, touched_rv, held_rv):
    """Merge one pod of a resync's list with the watch: "take", "ahead", "skip" or "wait".

    listed_rv is the pod's resourceVersion in the list or, for a pod known but
    not listed, the list's own (it was gone by then); watch_rv is how far the
    watch has told; touched_rv is that of the watch's last event for the pod
    since the list began (TOUCHED when it carried none), or None; held_rv is
    that of the state the snapshot holds, or one above it (None when not
    known; it matters only when the list is newer than the watch).

    "skip": the snapshot holds as new a state or a newer one (the watch
    applied it since the list began, or an earlier list); the list's must not
    overwrite it (nor delete a pod the watch created or changed).
    "take": the watch is past it and never told it: the listed state (or the
    deletion) now, a change the watch missed.
    "ahead": newer than the watch has told and than the snapshot's state: the
    listed state (or the deletion) now; the watch may still tell it (a change
    that races the list), and its events up to listed_rv then change nothing.
    "wait": newer than the watch has told, and the snapshot's state cannot be
    compared: the watch will tell it, and if it has not once it is past the
    list, the list's state is taken then.
    """
    if touched_rv is not None and not _newer_rv(listed_rv, touched_rv):
        return "skip"
    if not _newer_rv(listed_rv, watch_rv):
        return "take"
    if _rv_number(held_rv) is None:
        return "wait"
    return "ahead" if _newer_rv(listed_rv, held_rv) else "skip"


def watch_retry_delay(attempts, cap_seconds, rng=random):
    """Seconds before watching again after `attempts` watches in a row that failed or
    ended at once (0: watch again at once)."""
    return 0.0 if attempts <= 0 else min(backoff_delay(attempts, rng), cap_seconds)


class _Trouble:
    """The log of a trouble that lasts: one warning when it starts, one a minute
    while it lasts, one when it ends; every failure in between at debug."""

    def __init__(self, what, clock=time.monotonic):
        self._what = what
        self._clock = clock
        self._since = None
        self._logged = 0.0

    def failed(self, cause, retry_seconds):
        """One more failure, retried in `retry_seconds`."""
        now = self._clock()
        if self._since is None:
            self._since = self._logged = now
            log.warning("%s failed (%s); retrying in %.1f s", self._what, cause, retry_seconds)
        elif now - self._logged >= TROUBLE_LOG_SECONDS:
            self._logged = now
            log.warning(
                "%s still failing after %.0f s (%s); retrying in %.1f s",
                self._what,
                now - self._since,
                cause,
                retry_seconds,
            )
        else:
            log.debug("%s failed (%s); retrying in %.1f s", self._what, cause, retry_seconds)

    def ended(self):
        """It works again."""
        if self._since is not None:
            log.warning("%s works again after %.0f s", self._what, self._clock() - self._since)
            self._since = None


class ResyncAborted(K8sventError):
    """A full list of the watcher's own took over from a resync under way."""


class Watcher(Poller):
    """--mode=watch: list, then watch for changes; re-send pods under duress on a timer.

    One thread: a paged list (a poll) gives the snapshot and a resourceVersion;
    one kubectl then streams the watch from it, each event applied to the
    snapshot as it arrives. Every --interval the pods under duress are owed
    again. A watch that ends at once or fails is started again after a
    back-off (up to --retry-interval); a 410 (the resourceVersion is too old)
    lists again. Beside it, a Resyncer lists every --resync with a kubectl of
    its own and merges what it finds through resync_page and finish_resync,
    while the watch goes on.
    """

    def __init__(self, settings, store, senders, clock=time.monotonic):
        super().__init__(settings, store, senders)
        self._clock = clock
        self._rv = None  # where the watch is (a batch being applied included)
        self._applied_rv = None  # where it is, committed
        # Between the watch and a resync: the watch's position, the pods it
        # touched since the resync's list began, what a resync took ahead of
        # the watch ({key: [resourceVersion, deleted, told]}: the watch's
        # events up to it change nothing), and what it left for the watch to
        # tell (pods newer than the watch whose held state does not compare,
        # and pods not listed) until the watch is past the list's.
        self._merge_lock = threading.Lock()
        self._touched = None
        self._resync_generation = 0
        self._ahead = {}
        self.pending = {}
        self._suspects = set()
        self._suspects_rv = None
        self._trouble = _Trouble("watch", clock)
        self._resyncer = Resyncer(self, settings) if settings.resync else None
        self._thread.name = "watcher"

    def _name(self):
        return "list"  # a resync logs as resync: (the Resyncer)

    def run(self):
        """List, then watch from the list's resourceVersion, until stopped."""
        settings = self._settings
        next_duress = self._clock() + settings.interval
        quick = 0  # watches in a row that failed or ended at once
        try:
            while not self.stop_event.is_set():
                try:
                    if self._rv is None:
                        self._relist()
                    now = self._clock()
                    if now >= next_duress:
                        next_duress = now + settings.interval
                        duress = self._outbox.owe_duress()
                        metrics.selected["unhealthy"].inc(duress)
                        self._snapshot.prune()
                        self._wake_senders()
                    began = self._clock()
                    events = self._watch(max(1.0, next_duress - now))
                    metrics.watch_restarts.labels("ended").inc()
                    if events or self._clock() - began >= WATCH_STEADY_SECONDS:
                        quick = 0
                        self._trouble.ended()
                    else:
                        quick += 1  # closed at once: no restart loop against the server
                        self._pause(watch_retry_delay(quick, settings.retry_interval))
                except PollStopped:
                    raise
                except Expired as exc:
                    log.info("watch expired (%s); listing pods again", exc)
                    metrics.watch_restarts.labels("expired").inc()
                    self._rv = None
                except KubectlError as exc:
                    if self.stop_event.is_set():  # a kubectl we stopped ourselves
                        return
                    quick += 1
                    metrics.watch_restarts.labels("error").inc()
                    delay = watch_retry_delay(quick, settings.retry_interval)
                    self._trouble.failed(exc, delay)
                    self.api_failure = f"the watch failed: {exc}"
                    metrics.api_up.set(0)
                    self.last_progress = self._clock()  # trying: not stuck
                    if quick == WATCH_RELIST_AFTER:  # once per trouble: lists fail alike
                        self._rv = None
                    self._pause(delay)
                except Exception:  # never let the watcher die silently
                    log.exception("watch crashed; listing again in %g s", settings.retry_interval)
                    metrics.polled("error")
                    self._rv = None
                    self._pause(settings.retry_interval)
        except PollStopped:
            return
        finally:
            if self._resyncer is not None:
                self._resyncer.stop()

    def _relist(self):
        """List every pod (no resync runs meanwhile); watch from the list's resourceVersion."""
        with self._merge_lock:
            self._resync_generation += 1  # a resync under way gives up
            self._touched = None
            self._ahead = {}
            self.pending = {}
            self._suspects.clear()
        while True:
            began = time.monotonic()
            if self.poll_once():
                break
            self._pause(self._settings.retry_interval)
        took = time.monotonic() - began
        self._trouble.ended()  # the API server answers again
        self.first_poll_done.set()
        if self.listed_rv is None:
            # resourceVersion 0: any point, each pod as ADDED first (applied
            # as no-ops where nothing changed).
            log.warning("the pod list carried no resourceVersion; watching from now")
        with self._merge_lock:
            self._rv = self._applied_rv = self.listed_rv or "0"
        if self._resyncer is not None and not self._resyncer.started:
            # The first list is a list like a resync's: the first resync
            # follows it as a resync follows the one before.
            self._resyncer.start(resync_wait(self._settings.resync, took))

    def _list_failed(self, exc):
        if self._settings.once:  # the one list: its failure is the run's
            super()._list_failed(exc)
            return
        self._trouble.failed(f"listing pods: {exc}", self._settings.retry_interval)
        self.last_progress = self._clock()  # trying: not stuck

    @property
    def applied_rv(self):
        """The resourceVersion the watch has applied up to, committed (None while it
        lists)."""
        return None if self._rv is None else self._applied_rv

    def _pause(self, seconds):
        # A stop ends run() through its outer `except PollStopped`, from an
        # except clause of the loop too.
        if self.stop_event.wait(seconds):
            raise PollStopped("stopped")

    def _watch(self, seconds):
        """Apply the events of one watch of up to `seconds` to the snapshot; how many came.

        The events that arrived together (within WATCH_LINGER_SECONDS of the
        first) are read, then applied in one transaction (the merge lock held
        for them, then the store's), and the senders are woken once for
        them: a burst costs less than its events one by one, and no lock is
        held while the rest of a burst is awaited.
        """
        batch = []  # (type, PodEntry or None, resourceVersion): read, not yet applied

        def flush():
            if batch:
                events = batch[:]
                batch.clear()
                self._apply_events(events)

        try:
            return self._watch_events(seconds, batch, flush)
        finally:
            flush()

    def _watch_events(self, seconds, batch, flush):
        """_watch's loop: each event read into the batch that `flush` applies."""
        events = 0
        for kind, obj in watch_pods(self._settings, self._rv, self.stop_event, seconds, flush):
            events += 1
            self.last_progress = self._clock()  # a live watch is not stuck
            self._trouble.ended()
            self.api_failure = None
            metrics.api_up.set(1)
            metrics.events.get(kind, metrics.events["other"]).inc()
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            entry = None
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                if not _looks_like_pod(obj):
                    raise KubectlError(f"a watch event {kind} carried no pod")
                entry = pod_entry(obj)
            batch.append((kind, entry, rv))
        self.last_progress = self._clock()
        return events

    def _apply_events(self, events):
        """Apply a batch of watch events in one transaction, all or none of them;
        then wake the senders if it owes anything.

        A batch that fails changes nothing, and the watch's position stays
        before it (the watcher lists again). The senders are woken with no
        lock held: a worker holds its own while it waits for the store's.
        """
        with self._merge_lock:
            before = self._rv
            self._store.open_batch()
            try:
                try:
                    owed = self._apply_batch(events)
                except BaseException:
                    self._store.close_batch(commit=False)
                    raise
                self._store.close_batch()
            except BaseException:  # applied or committed, it failed: none of it is in
                self._rv = before
                raise
            self._applied_rv = self._rv  # what the Lease's watermark may say is in
        if owed:
            self._wake_senders()

    def _apply_batch(self, events):
        """_apply_events' work (locks held, its transaction open); True if anything is owed."""
        owed = False
        # New and changed pods are taken together, one set of statements for
        # them all (a pod's events in order: a second one waits for the
        # first), unless what a resync left decides the order of the events.
        together = not (self._ahead or self._suspects or self.pending)
        group = {}  # key: (type, PodEntry, resourceVersion)
        for kind, entry, rv in events:
            if entry is not None:
                if not together or kind == "DELETED" or entry.key in group:
                    owed = self._apply_together(group) or owed
                    group = {}
                if together and kind != "DELETED":
                    group[entry.key] = (kind, entry, rv)
                elif self._apply_event(kind, entry, rv):
                    owed = True
            if rv:
                self._rv = rv
                self._confirm_ahead()
                owed = self._confirm_suspects() or owed
        return self._apply_together(group) or owed

    def _apply_together(self, group):
        """Apply ADDED and MODIFIED events of different pods at once (locks held);
        True if any is owed."""
        if not group:
            return False
        reasons = {}
        self._snapshot.apply([entry for _, entry, _ in group.values()], reasons)
        for kind, entry, rv in group.values():
            self._applied(kind, entry, rv, reasons[entry.key])
        return any(reasons.values())

    def _apply_event(self, kind, entry, rv):
        """Apply one watch event to the snapshot (merge lock held); True if owed."""
        if self._behind_resync(kind, entry.key, rv):
            return False
        if kind == "DELETED":
            reason = "deleted" if self._snapshot.apply_deletion(entry) else None
        else:
            reason = self._snapshot.apply_event(entry)
        return self._applied(kind, entry, rv, reason)

    def _applied(self, kind, entry, rv, reason):
        """Note a watch event applied, owed for `reason` or not (merge lock held);
        True if owed."""
        if reason is not None:
            metrics.selected[reason].inc()
            log.debug("watch: %s %s (%s)", kind, entry.key, reason, extra={"pod": entry.key})
        if self._touched is not None:
            self._touched[entry.key] = rv or TOUCHED
        self._suspects.discard(entry.key)
        self.pending.pop(entry.key, None)
        return reason is not None

    def _behind_resync(self, kind, key, rv):
        """Whether a resync took a state of this pod as new as this event's, or newer
        (lock held): the event changes nothing, and may be the one that tells it."""
        ahead = self._ahead.get(key)
        if ahead is None:
            return False
        listed_rv, deleted, _ = ahead
        event_rv = _rv_number(rv)
        if event_rv is None or event_rv > listed_rv:
            return False  # past it (_confirm_ahead counts it), or not comparable
        if (kind == "DELETED") if deleted else event_rv == listed_rv:
            ahead[2] = True  # the watch told it: it raced the list, not missed
        return True

    def _confirm_ahead(self):
        """Count what a resync took ahead of the watch and the watch, now past it,
        never told: changes it missed (lock held)."""
        if not self._ahead:
            return
        position = _rv_number(self._rv)
        if position is None:
            return
        missed = collections.Counter()
        for key, (listed_rv, deleted, told) in list(self._ahead.items()):
            if listed_rv <= position:
                del self._ahead[key]
                if not told:
                    missed[deleted] += 1
        _report_missed(missed[False], "new or changed pods", "a resync sent them")
        _report_missed(missed[True], "deleted pods", "a resync sent them")

    # A resync, called from the Resyncer's thread.

    def join(self, timeout=None):
        super().join(timeout)
        if self._resyncer is not None:
            self._resyncer.join(timeout)

    def threads_alive(self):
        """Whether the watch thread runs, and the resync thread once started."""
        resyncer = self._resyncer
        return self.is_alive() and (resyncer is None or not resyncer.started or resyncer.is_alive())

    def begin_resync(self):
        """A resync's list begins: its generation, or None while the watcher lists itself."""
        with self._merge_lock:
            if self._rv is None:
                return None
            self._touched = {}
            return self._resync_generation

    def resync_page(self, generation, batch):
        """Merge a page of (PodEntry, resourceVersion) with the watch.

        Counts by reason the pods taken (new, changed) and, of those, the
        changes the watch missed (missed).
        """
        with self._merge_lock:
            if generation != self._resync_generation:
                raise ResyncAborted("the watcher lists pods itself")
            take, ahead = [], []
            for entry, rv in batch:
                # This list decides anew what an earlier one left waiting.
                self.pending.pop(entry.key, None)
                self._suspects.discard(entry.key)
                touched = self._touched.get(entry.key)
                action = resync_action(rv, self._rv, touched, self._held(entry.key))
                if action == "take":
                    take.append(entry)
                elif action == "ahead":
                    ahead.append(entry)
                    self._ahead[entry.key] = [int(rv), False, False]
                elif action == "wait":
                    self.pending[entry.key] = entry
            counts = collections.Counter(self._snapshot.apply(take))
            counts["missed"] = counts["new"] + counts["changed"]
            counts.update(self._snapshot.apply(ahead) if ahead else {})
        if counts["new"] or counts["changed"]:
            self._wake_senders()
        return counts

    def _held(self, key):
        """The resourceVersion of the snapshot's state of a pod, or one above it (lock held)."""
        # Every state the snapshot holds came from the watch, or from a list
        # the watch is past (the first, a resync's "take"), or is one a resync
        # took ahead of the watch: its resourceVersion is at most the watch's,
        # or the one in _ahead. No body need be read (most are not kept).
        ahead = self._ahead.get(key)
        return str(ahead[0]) if ahead is not None else self._rv

    def finish_resync(self, generation, listed_keys, listed_rv):
        """The list is complete: delete what it did not have and the watch missed."""
        with self._merge_lock:
            if generation != self._resync_generation:
                raise ResyncAborted("the watcher lists pods itself")
            unlisted = self._snapshot.present() - listed_keys
            gone, ahead = [], []
            for key in unlisted:
                touched = self._touched.get(key)
                action = resync_action(listed_rv, self._rv, touched, self._held(key))
                if action == "take":
                    gone.append(key)
                elif action == "ahead":
                    ahead.append(key)
                    self._ahead[key] = [int(listed_rv), True, False]
                elif action == "wait":
                    self._suspects.add(key)
            self._touched = None
            deleted = self._snapshot.delete(sorted(gone))
            deleted_ahead = self._snapshot.delete(sorted(ahead))
            metrics.selected["deleted"].inc(deleted + deleted_ahead)
            _report_missed(deleted, "deleted pods")
            self._suspects_rv = listed_rv
            confirmed = self._confirm_suspects()
        if deleted or deleted_ahead or confirmed:
            self._wake_senders()

    def _confirm_suspects(self):
        """Once the watch is past a resync's list, take what it did not tell (lock held);
        whether that owes anything (the caller wakes the senders, its locks let go)."""
        if not (self._suspects or self.pending) or _newer_rv(self._suspects_rv, self._rv):
            return False
        if self._touched is not None:
            return False  # a resync lists: this waits for its end, when the list's rv is known
        counts = self._snapshot.apply(list(self.pending.values()))
        changed = counts["new"] + counts["changed"]
        metrics.selected["new"].inc(counts["new"])
        metrics.selected["changed"].inc(counts["changed"])
        self.pending = {}
        deleted = self._snapshot.delete(sorted(self._suspects))
        self._suspects.clear()
        metrics.selected["deleted"].inc(deleted)
        _report_missed(changed, "new or changed pods, found by the list")
        _report_missed(deleted, "deleted pods")
        return bool(changed or deleted)


def resync_wait(interval_seconds, took_seconds):
    """Seconds from the end of a resync to the start of the next.

    Every --resync from the start of the last (the watcher's first list too),
    but never sooner than half an interval after its end: a list slower than
    the interval delays the next, never back to back.
    """
    return max(interval_seconds - took_seconds, interval_seconds / 2)


class Resyncer:
    """--resync beside the watch: a list of its own every --resync, merged with the watch.

    resync_wait spaces them; a failed list is logged once and retried with
    back-off (up to --retry-interval) while the watch goes on.
    """

    def __init__(self, watcher, settings):
        self._watcher = watcher
        self._settings = settings
        self._stop = watcher.stop_event  # one stop for the watch and its resyncs
        self._trouble = _Trouble("resync")
        self.started = False
        self._first_wait = settings.resync
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self.run, name="resync", daemon=True)

    def start(self, first_wait=None):
        """Start resyncing, the first time after `first_wait` seconds (else --resync)."""
        self._first_wait = self._settings.resync if first_wait is None else first_wait
        self.started = True
        self._thread.start()

    def stop(self):
        self._stop.set()

    def join(self, timeout=None):
        if self.started:
            self._thread.join(timeout)

    def is_alive(self):
        return self._thread.is_alive()

    def run(self):
        """Resync every --resync until stopped."""
        failures = 0
        interval = self._settings.resync
        wait = self._first_wait
        while not self._stop.wait(wait):
            started = time.monotonic()
            try:
                self.resync_once()
                wait = resync_wait(interval, time.monotonic() - started)
                failures = 0
                self._trouble.ended()
            except (PollStopped, ResyncAborted):
                wait = interval
                continue
            except KubectlError as exc:
                metrics.resyncs.labels("failure").inc()
                failures += 1
                wait = watch_retry_delay(failures, self._settings.retry_interval)
                self._trouble.failed(exc, wait)
            except Exception:  # never let the resync die silently
                wait = interval
                log.exception("resync crashed; trying again in %g s", wait)
                metrics.resyncs.labels("error").inc()
            self.last_progress = time.monotonic()

    def resync_once(self):
        """List every pod and merge the list with the watch's state."""
        watcher = self._watcher
        generation = watcher.begin_resync()
        if generation is None:
            return
        started = time.monotonic()
        listed = {}
        keys = set()  # for the deletions: about 100 bytes a pod, for one list
        counts = collections.Counter()
        batch = []
        for item in list_pods(self._settings, self._stop, listed):
            entry = _listed_entry(item)
            keys.add(entry.key)
            batch.append((entry, item["metadata"].get("resourceVersion")))
            if len(batch) >= _SQL_BATCH:
                if self._stop.is_set():
                    raise PollStopped("stopped while listing pods")
                counts.update(watcher.resync_page(generation, batch))
                self.last_progress = time.monotonic()
                batch = []
        counts.update(watcher.resync_page(generation, batch))
        watcher.finish_resync(generation, keys, listed.get("resourceVersion"))
        metrics.selected["new"].inc(counts["new"])
        metrics.selected["changed"].inc(counts["changed"])
        metrics.resyncs.labels("success").inc()
        _report_missed(counts["missed"], "new or changed pods")
        log.info("resync: %d pods listed (%.2f s)", len(keys), time.monotonic() - started)


# --- Leader election: a Lease, and the watermark it carries -------------------

# client-go's leaderelection, as one pure decision (lease_action) and a thread
# around it (LeaderElector). Only the holder delivers; a standby lists and
# watches like it, so a takeover needs no fresh list. The holder writes, with
# each renewal, a watermark per webhook into the Lease: the resourceVersion up
# to which every change is settled. A new holder owes what came after it.


def lease_action(lease, observed_at, now, identity, duration_seconds):
    """What to do with the Lease as read: "create", "renew", "take over" or "wait".

    `observed_at` is when this replica last saw the Lease change, on its own
    monotonic clock, like `now`: another host's renewTime is never compared
    with ours. The holder's own leaseDurationSeconds rules its expiry.
    """
    if lease is None:
        return "create"
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    if not holder:
        return "take over"  # released
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, int | float) or duration <= 0:
        duration = duration_seconds
    return "take over" if now >= observed_at + duration else "wait"


def lease_identity(environ):
    """This process's holderIdentity: the pod's name and a suffix of its own."""
    host = environ.get("HOSTNAME") or socket.gethostname() or "k8svent"
    return f"{host}_{secrets.token_hex(4)}"


def micro_time(seconds):
    """An RFC 3339 MicroTime, as a Lease's acquireTime and renewTime are written."""
    moment = time.gmtime(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(seconds % 1 * 1e6):06d}Z"


def lease_watermarks(lease):
    """The watermarks a Lease carries: {endpoint id: resourceVersion} (empty if none)."""
    annotations = ((lease or {}).get("metadata") or {}).get("annotations") or {}
    try:
        marks = json.loads(annotations.get(LEASE_WATERMARK_ANNOTATION) or "{}")
    except ValueError:
        return {}
    if not isinstance(marks, dict):
        return {}
    return {str(k): str(v) for k, v in marks.items() if isinstance(v, str | int)}


def settled_through(applied_rv, owed_versions):
    """The watermark of one webhook: every change up to it is settled; None if unknown.

    `applied_rv`: the store holds every change up to it; `owed_versions`: the
    resourceVersions of the states still owed. A change is settled unless its
    pod still owes a state, which is the same change or a later one.
    """
    try:
        mark = int(applied_rv)
        for version in owed_versions:
            mark = min(mark, int(version) - 1)
    except (TypeError, ValueError):
        return None
    return str(mark)


def lease_namespace(settings, environ, namespace_path=SERVICE_ACCOUNT_NAMESPACE_PATH):
    """The namespace of a Lease given without one: the pod's, kubectl's, else default."""
    try:
        own = Path(namespace_path).read_text(encoding="utf-8").strip()
    except OSError:
        own = ""
    if own:
        return own
    try:
        context = run_kubectl(
            settings, "config", "view", "--minify", "-o", "jsonpath={..namespace}"
        )
        context = context.decode().strip()
    except (KubectlError, UnicodeError):
        context = ""
    return context if is_namespace_name(context) else "default"


class LeaseConflict(KubectlError):
    """A Lease write lost a race (409 Conflict or AlreadyExists)."""


class LeaderElector:
    """The thread that holds the Lease or stands by for it; only its holder delivers.

    `may_deliver()` is the gate the delivery workers check before each claim:
    true while this replica holds the Lease, has resumed from the last
    holder's watermark, and renewed it less than the renew deadline ago
    (measured from before the write was sent: fencing).
    """

    def __init__(
        self, settings, namespace, name, identity, store, poller, senders, clock=time.monotonic
    ):
        self._settings = settings
        self.namespace, self.name, self.identity = namespace, name, identity
        self._store, self._poller, self._senders = store, poller, senders
        self._clock = clock
        quoted = urllib.parse.quote(namespace, safe="")
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{quoted}/leases"
        self._path = f"{self._collection}/{urllib.parse.quote(name, safe='')}"
        duration = settings.lease_duration
        self.renew_deadline = duration * LEASE_RENEW_DEADLINE_SHARE
        self.retry_period = duration * LEASE_RETRY_SHARE
        self.renew_period = duration * LEASE_RENEW_SHARE
        self._lease = None  # as last read or written
        self._observed = (None, 0.0)  # (resourceVersion, when it was first seen)
        self._renewed_at = None  # monotonic, before the write that renewed it
        self._resumed = False  # owes what the last holder's watermark says
        self._leading = False  # as last said in the log and metrics
        self._failing = False  # a Lease call failed (logged once until one works)
        self._applied_rv = None  # the last resourceVersion the poller had applied
        self._marks = {}  # the watermarks last written
        self._forgotten = {}  # the watermarks a standby last settled its outbox by
        self._non_integer_said = False
        self._waiting_on = None  # the Lease another holds, while standing by
        self._fresh = None  # the Lease as a watch just told it
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self.run, name="leader-elector", daemon=True)

    @property
    def lease_name(self):
        return f"{self.namespace}/{self.name}"

    def may_deliver(self):
        """Whether this replica holds the Lease, resumed and within its renew deadline."""
        renewed_at = self._renewed_at
        return (
            self._resumed
            and renewed_at is not None
            and self._clock() < renewed_at + self.renew_deadline
        )

    def start(self):
        self._thread.start()

    def stop(self):
        self.stop_event.set()

    def join(self, timeout=None):
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def is_alive(self):
        return self._thread.is_alive()

    def run(self):
        """Compete once the first list is done; then hold or stand by until stopped."""
        # A replica without a snapshot could not deliver: it does not compete.
        while not self._poller.first_poll_done.wait(UPGRADE_READY_WAIT_SECONDS):
            if self.stop_event.is_set():
                return
        log.info(
            "competing for Lease %s as %s (%g s; renew deadline %g s)",
            self.lease_name,
            self.identity,
            self._settings.lease_duration,
            self.renew_deadline,
        )
        while not self.stop_event.is_set():
            try:
                self.try_once()
                if self._failing:
                    self._failing = False
                    log.info("Lease %s can be read and written again", self.lease_name)
                if self._waiting_on is not None:  # a standby: until the Lease changes
                    self._note_leading()
                    self._await_change(self._waiting_on)
                    continue
            except LeaseConflict as exc:
                log.debug("lost a race for Lease %s: %s", self.lease_name, exc)
            except PollStopped:
                return
            except KubectlError as exc:
                if not self._failing:
                    log.error("cannot read or write Lease %s: %s", self.lease_name, exc)
                self._failing = True
            except Exception:  # never let the elector die silently
                log.exception("leader election crashed; trying again")
                self._failing = True
            self._note_leading()
            wait = self.retry_period if self._failing else self.renew_period
            if self._leading:  # wake at the renew deadline, to say it passed
                wait = min(wait, max(0.05, self._renewed_at + self.renew_deadline - self._clock()))
            self.stop_event.wait(wait)

    def try_once(self):
        """One round of client-go's tryAcquireOrRenew, then resume or settle by watermarks."""
        now = self._clock()
        lease, self._waiting_on = self._lease, None
        if not (self._resumed and lease is not None and self._holds(lease)):
            lease, self._fresh = self._fresh or self._read(), None
            self._observe(lease, now)
        action = lease_action(
            lease, self._observed[1], now, self.identity, self._settings.lease_duration
        )
        if action == "wait":
            self._lose(f"now held by {lease['spec'].get('holderIdentity')}")
            self._settle_by(lease_watermarks(lease))
            self._waiting_on = lease
            return
        try:
            written = self._write(lease, action, now)
        except LeaseConflict:
            self._lease = None  # read it afresh next time
            raise
        self._renewed_at = now
        self._lease = written
        self._observe(written, now)
        if not self._resumed:
            self.resume(lease_watermarks(lease))

    def _await_change(self, lease):
        """A standby: watch the Lease until it would expire unrenewed, or is released.

        Each renewal the watch shows is observed (a later expiry) and its
        watermarks settle this replica's outbox. Returns when the watch ends
        (at the expiry as last known, for a read to judge) or at a release.
        """
        duration = (lease.get("spec") or {}).get("leaseDurationSeconds")
        if not isinstance(duration, int | float) or duration <= 0:
            duration = self._settings.lease_duration
        remaining = self._observed[1] + duration - self._clock()
        if remaining <= 0:
            return
        query = urllib.parse.urlencode(
            {
                "watch": "1",
                "fieldSelector": f"metadata.name={self.name}",
                "resourceVersion": lease["metadata"].get("resourceVersion") or "0",
                "timeoutSeconds": str(math.ceil(remaining)),
            }
        )
        process, timer, read_fd = _start_get_raw(
            self._settings,
            f"{self._collection}?{query}",
            remaining + self._settings.kubectl_timeout,
            self.stop_event,
        )
        stream = os.fdopen(read_fd, "rb")
        try:
            for line in stream:
                if not line.strip():
                    continue
                try:
                    event = orjson.loads(line)
                    seen = event["object"]
                    seen["metadata"]["resourceVersion"]  # noqa: B018 - a Lease has one
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    raise KubectlError(f"the watch of the Lease failed: {cut(line)}") from None
                self._observe(seen, self._clock())
                self._settle_by(lease_watermarks(seen))
                holder = (seen.get("spec") or {}).get("holderIdentity")
                if not holder or holder == self.identity:
                    self._fresh = seen  # released: take it over at once
                    break
            else:
                _wait_kubectl(process, timer, self._settings, "watching the Lease")
        finally:
            _end_get_raw(process, timer, stream)

    def _holds(self, lease):
        return (lease.get("spec") or {}).get("holderIdentity") == self.identity

    def _observe(self, lease, now):
        rv = None if lease is None else lease["metadata"].get("resourceVersion")
        if rv != self._observed[0]:
            self._observed = (rv, now)

    def _read(self):
        """The Lease, or None when there is none."""
        try:
            output = run_kubectl(self._settings, "get", "--raw", self._path)
        except KubectlError as exc:
            if b"(NotFound)" in exc.stderr:
                return None
            raise
        return _lease_from(output)

    def _write(self, lease, action, now, holder=None, duration=None):
        """Create or replace the Lease for `action`; return it as the server stored it."""
        wall = time.time()
        spec = dict((lease or {}).get("spec") or {})
        metadata = dict((lease or {}).get("metadata") or {"name": self.name})
        metadata.pop("managedFields", None)
        if action != "renew":
            spec["acquireTime"] = micro_time(wall)
            if lease is not None:
                spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            else:
                spec["leaseTransitions"] = 0
        spec["holderIdentity"] = self.identity if holder is None else holder
        spec["leaseDurationSeconds"] = duration or max(1, round(self._settings.lease_duration))
        spec["renewTime"] = micro_time(wall)
        if self._resumed:
            marks = self._watermarks()
            if marks:
                annotations = dict(metadata.get("annotations") or {})
                annotations[LEASE_WATERMARK_ANNOTATION] = json.dumps(marks, sort_keys=True)
                metadata["annotations"] = annotations
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }
        verb, path = ("create", self._collection) if lease is None else ("replace", self._path)
        timeout = max(1.0, min(self._settings.kubectl_timeout, self.renew_deadline))
        return _lease_from(write_raw(self._settings, verb, path, orjson.dumps(body), timeout))

    def _watermarks(self):
        """{endpoint id: resourceVersion} up to which every change is settled, per webhook."""
        # The poller's resourceVersion first: a change it applies after this
        # read is owed in the outbox, read second, or above the mark anyway.
        applied = self._poller.applied_rv
        if applied is not None:
            self._applied_rv = applied
        marks = {}
        for sender in self._senders:
            last = self._marks.get(sender.endpoint.id)
            if last is not None:
                marks[sender.endpoint.id] = last
            owed = self._store.outbox.owed_versions(sender.endpoint.id, LEASE_WATERMARK_ROWS)
            if owed is None:
                continue  # too many to read each renewal: keep the last
            mark = settled_through(self._applied_rv, owed)
            if mark is None:
                self._say_non_integer()
                continue
            marks[sender.endpoint.id] = mark
        self._marks = marks
        return marks

    def _say_non_integer(self):
        if not self._non_integer_said:
            self._non_integer_said = True
            log.warning(
                "resourceVersions are not integers here: no watermark is kept, and a "
                "new holder of Lease %s sends every pod again",
                self.lease_name,
            )

    def resume(self, marks):
        """Newly the holder: settle what the last holder's watermarks cover, then deliver."""
        started = self._clock()
        forgotten, owed = 0, 0
        for sender in self._senders:
            mark = marks.get(sender.endpoint.id)
            if mark is None:
                continue  # a webhook the last holder did not send to: it is owed everything
            settled, left = self._store.outbox.forget_through(sender.endpoint.id, mark)
            if settled is None:
                self._say_non_integer()
                continue
            forgotten += settled
            owed = max(owed, left)
        lowest = min((int(m) for m in marks.values() if m.lstrip("-").isdigit()), default=None)
        replayed = self._replay_deletions(lowest) if lowest is not None else 0
        self._resumed = True
        self._marks = dict(marks)  # valid until this holder computes its own
        log.info(
            "holding Lease %s as %s; resumed from the last holder's watermark "
            "(%d deliveries settled by it, %d deletions replayed) in %.1f s; delivering",
            self.lease_name,
            self.identity,
            forgotten,
            replayed,
            self._clock() - started,
        )
        for sender in self._senders:
            sender.wake()

    def _replay_deletions(self, mark):
        """Owe the deletions after `mark` that happened before this replica's first list."""
        first = self._poller.first_listed_rv
        if not _newer_rv(first, mark):
            return 0  # the snapshot has seen every change since the mark
        replayed, rv = 0, str(mark)
        try:
            while _newer_rv(first, rv):
                events = 0
                for kind, obj in watch_pods(
                    self._settings, rv, self.stop_event, max(1.0, self.retry_period)
                ):
                    events += 1
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if kind == "DELETED" and not _newer_rv(rv, first):
                        replayed += self._store.snapshot.owe_missed_deletion(pod_entry(obj))
                    if not _newer_rv(first, rv):
                        break
                if not events:
                    break
        except Expired:
            metrics.continuity_gaps.inc()
            log.warning(
                "the API server no longer has the changes after the last holder's "
                "watermark (%s): pods deleted meanwhile cannot be known; the pods "
                "changed since are sent",
                mark,
            )
        except KubectlError as exc:
            log.error("cannot replay the deletions after watermark %s: %s", mark, exc)
        return replayed

    def _settle_by(self, marks):
        """A standby: drop from the outbox what the holder's watermarks say it settled."""
        if marks == self._forgotten:
            return
        self._forgotten = marks
        for sender in self._senders:
            mark = marks.get(sender.endpoint.id)
            if mark is not None:
                self._store.outbox.forget_through(sender.endpoint.id, mark)

    def _lose(self, why):
        """No longer the holder (or never was): stop delivering; say so once."""
        if self._resumed or self._renewed_at is not None:
            self._resumed = False
            self._renewed_at = None
            self._lease = None
            if self._leading:
                log.warning("lost Lease %s (%s); stopped delivering", self.lease_name, why)

    def _note_leading(self):
        """Log and count a change of leading; fence a holder past its renew deadline."""
        leading = self.may_deliver()
        if self._leading and not leading and self._renewed_at is not None:
            # Fenced: the gate closed by itself at the deadline; this says so.
            log.warning(
                "could not renew Lease %s within %g s; stopped delivering; competing again",
                self.lease_name,
                self.renew_deadline,
            )
            self._resumed = False
            self._renewed_at = None
            self._lease = None
        self._leading = leading

    def release(self):
        """ReleaseOnCancel: write the last watermarks and an empty holder (after a stop)."""
        self.stop()
        self.join(self.renew_deadline + self._settings.kubectl_timeout)
        lease = self._lease
        if lease is None or not self._holds(lease):
            return
        try:
            self._write(lease, "renew", self._clock(), holder="", duration=1)
        except KubectlError as exc:
            log.warning("cannot release Lease %s: %s; it expires instead", self.lease_name, exc)
            return
        finally:
            self._renewed_at = None
            self._resumed = False
        log.info("released Lease %s", self.lease_name)


def _lease_from(output):
    """The Lease in kubectl's output, or raise KubectlError."""
    try:
        lease = orjson.loads(output)
    except orjson.JSONDecodeError:
        lease = None
    if not isinstance(lease, dict) or not isinstance(lease.get("metadata"), dict):
        raise KubectlError("kubectl printed no Lease")
    return lease


# --- Upgrades ----------------------------------------------------------------


class Upgrader:
    """Checks the registry for a newer version now and then, in a daemon thread.

    decide() says what to check before each check: an UpgradePlan, or None
    (with why) to stop checking; an error (its own pod not found) is retried
    later. Without it, any newer version in client's repository counts. When
    one counts, it logs it, calls on_newer(version) once and ends; main decides
    how to exit. A newer version that the channel tag does not carry yet is
    logged once and handed to on_available. Errors are logged and retried
    later; they never end it. With `ready`, the first check waits for it (the
    first successful poll).
    """

    def __init__(
        self,
        client,
        current_version,
        interval_seconds,
        on_newer,
        logger,
        *,
        error_seconds=UPGRADE_ERROR_SECONDS,
        first_delay_seconds=0.0,
        rng=None,
        decide=None,
        ready=None,
        on_available=None,
        client_for=None,
    ):
        self.decide = decide
        self.client = client
        self._clients = {client.image: client}
        self._client_for = client_for or (
            lambda image: RegistryClient(image, user_agent=f"k8svent/{current_version}")
        )
        self.ready = ready
        self.on_available = on_available or (lambda newer: None)
        self._plan_shown = None
        self._announced = set()
        self.current_version = current_version
        self.interval_seconds = interval_seconds
        self.error_seconds = error_seconds
        self.first_delay_seconds = first_delay_seconds
        self.on_newer = on_newer
        self.log = logger
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="k8svent-upgrader", daemon=True)

    def start(self):
        """Start the checking thread."""
        self._thread.start()

    def stop(self):
        """Ask the thread to stop; it does at once, between checks."""
        self._stop.set()

    def join(self, timeout=None):
        """Wait for the thread to end."""
        self._thread.join(timeout)

    def is_alive(self):
        """Tell whether the thread is still running."""
        return self._thread.is_alive()

    def run(self):
        """After `ready`: check, then wait, until stopped, told not to, or upgrading."""
        if self.ready is not None:
            # A restart must first do what it is for: a poll, not a check.
            while not self.ready.wait(UPGRADE_READY_WAIT_SECONDS):
                if self._stop.is_set():
                    return
        delay = self.first_delay_seconds
        while not self._stop.wait(delay):
            delay = self.check_once()
            if delay is None:
                return

    def check_once(self):
        """Do one check; return the seconds to wait before the next, or None to end."""
        digest = None
        try:
            plan = self._plan()
            if plan is None:
                return None
            client = self._client_of(plan.image)
            tags = client.list_tags()
            ignored = non_version_tags(tags)
            if ignored:
                self.log.debug(
                    "ignoring %d tags that are not semantic versions: %s",
                    len(ignored),
                    cut(" ".join(ignored)),
                )
            newer = newer_version(self.current_version, tags)
            if newer is not None and plan.channel_tag is not None:
                digest = client.manifest_digest(plan.channel_tag)
        except K8sventError as error:
            return self._after_error(str(error), getattr(error, "retry_after_seconds", None))
        except Exception as error:  # a bug must not end the thread
            self.log.error("upgrade check failed unexpectedly", exc_info=True)
            return self._after_error(type(error).__name__, None)
        delay = jittered(self.interval_seconds, self._rng)
        if newer is None:
            self.log.debug(
                "no version newer than %s among %d tags of %s; next check in %.0f s",
                self.current_version,
                len(tags),
                plan.image,
                delay,
            )
            return delay
        if plan.channel_tag is not None and plan.running_digest in (None, digest):
            # Exiting would pull the same image again, and again: a stray tag,
            # a release whose image is not built yet, a lagging mirror.
            if newer not in self._announced:
                self._announced.add(newer)
                self.log.info(
                    "newer version %s found (running %s), but %s:%s %s; not restarting "
                    "until the tag moves",
                    newer,
                    self.current_version,
                    plan.image,
                    plan.channel_tag,
                    "is still the image running"
                    if plan.running_digest
                    else "cannot be compared with the image running (its digest is unknown)",
                )
            self._call(self.on_available, newer)
            return delay
        self.log.info(
            "newer version %s found (running %s); exiting to upgrade", newer, self.current_version
        )
        self._call(self.on_newer, newer)
        return None

    def _plan(self):
        """What to check now (logged when it changes), or None to stop checking."""
        if self.decide is None:
            plan = UpgradePlan(self.client.image)
        else:
            plan, why = self.decide()
            if plan is None:
                self.log.info("not checking for newer versions: %s", why)
                return None
        if plan != self._plan_shown:
            self._plan_shown = plan
            self.log.info(
                "checking %s for a version newer than %s every %.0f s (+-10 %%)%s",
                plan.image,
                self.current_version,
                self.interval_seconds,
                f"; restarting when {plan.channel_tag} moves off the image running"
                if plan.channel_tag
                else "",
            )
        return plan

    def _client_of(self, image):
        """The registry client for a repository, made once."""
        if image not in self._clients:
            self._clients[image] = self._client_for(image)
        return self._clients[image]

    def _call(self, callback, newer):
        """Call on_newer or on_available, logging (not raising) what goes wrong."""
        try:
            callback(newer)
        except Exception:
            self.log.error("upgrade callback failed", exc_info=True)

    def _after_error(self, reason, retry_after_seconds):
        """Log a failed check in one line and return the delay before the next."""
        delay = self.error_seconds
        if retry_after_seconds is not None:
            delay = min(max(1.0, retry_after_seconds), RETRY_AFTER_MAX_SECONDS)
        self.log.warning("upgrade check failed: %s; retrying in %.0f s", reason, delay)
        return delay


# --- Health and metrics ------------------------------------------------------

# The poller counts as stuck when it has made no progress (a page listed, a
# poll finished or failed) for this many intervals plus one kubectl timeout.
STUCK_INTERVALS = 3
POLL_DURATION_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The status port: a whole request within this, at most this many at once
# (the oldest is closed to make room), and how long a new one waits for that.
STATUS_REQUEST_SECONDS = 5
STATUS_MAX_CONNECTIONS = 16
STATUS_SLOT_WAIT_SECONDS = 1
POLL_OUTCOMES = ("success", "failure", "error")
SELECT_REASONS = ("new", "changed", "unhealthy", "deleted")
DELIVERY_OUTCOMES = ("success", "retry", "rejected", "failed")


class Metrics:
    """k8svent's Prometheus metrics, in a registry of their own."""

    def __init__(self):
        # No *_created series: they double the output and nobody graphs them.
        prometheus_client.disable_created_metrics()
        self.registry = registry = prometheus_client.CollectorRegistry()
        self.polls = prometheus_client.Counter(
            "k8svent_polls",
            "Polls of the pod list by outcome: success, "
            "failure (kubectl failed; nothing changed) or error (a bug).",
            ["outcome"],
            registry=registry,
        )
        self.poll_duration = prometheus_client.Histogram(
            "k8svent_poll_duration_seconds",
            "Seconds a successful poll took: list, compare, hand out.",
            buckets=POLL_DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.pods_seen = prometheus_client.Gauge(
            "k8svent_pods_seen", "Pods listed by the last successful poll.", registry=registry
        )
        self.pods_selected = prometheus_client.Counter(
            "k8svent_pods_selected",
            "Pods found to send, by reason: new, changed, unhealthy or deleted "
            "(--send chooses the reasons that are sent).",
            ["reason"],
            registry=registry,
        )
        self.deliveries = prometheus_client.Counter(
            "k8svent_deliveries",
            "Deliveries by endpoint and outcome: success, "
            "retry (an attempt failed, another follows), rejected (a 3xx or "
            "4xx, not retried) or failed (retry budget spent).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.latency = prometheus_client.Histogram(
            "k8svent_delivery_latency_seconds",
            "Seconds from sending a POST to its answer (or error), by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.last_poll = prometheus_client.Gauge(
            "k8svent_last_successful_poll_timestamp_seconds",
            "Unix time at which the last successful poll finished.",
            registry=registry,
        )
        self.watch_events = prometheus_client.Counter(
            "k8svent_watch_events",
            "Watch events received, by type: ADDED, MODIFIED, DELETED, BOOKMARK, ERROR (or other).",
            ["type"],
            registry=registry,
        )
        self.watch_restarts = prometheus_client.Counter(
            "k8svent_watch_restarts",
            "Watches started again, by why the last one "
            "ended: ended (its timeout, or the server closed it), expired (410: "
            "listed again) or error (kubectl failed).",
            ["reason"],
            registry=registry,
        )
        self.resync_changes = prometheus_client.Counter(
            "k8svent_resync_changes",
            "Changes a resync list found that the watch had missed (new, changed or deleted pods).",
            registry=registry,
        )
        self.api_up = prometheus_client.Gauge(
            "k8svent_kubernetes_api_up",
            "1 while the last list or watch of pods worked, 0 while they fail.",
            registry=registry,
        )
        self.resyncs = prometheus_client.Counter(
            "k8svent_resyncs",
            "Resync lists beside the watch, by outcome: success, failure (kubectl "
            "failed) or error.",
            ["outcome"],
            registry=registry,
        )
        self.newer_version = prometheus_client.Gauge(
            "k8svent_newer_version_available",
            "1 when the registry has a newer version (its label), else 0.",
            ["version"],
            registry=registry,
        )
        self.leader = prometheus_client.Gauge(
            "k8svent_leader",
            "1 while this replica delivers (it holds the Lease, or runs without one), else 0.",
            registry=registry,
        )
        self.continuity_gaps = prometheus_client.Counter(
            "k8svent_continuity_gaps",
            "Takeovers whose watermark the API server's history no longer reached: "
            "deletions in the gap could not be known.",
            registry=registry,
        )
        self.build = prometheus_client.Info(
            "k8svent_build",
            "Always 1; its version label is the running version of k8svent.",
            registry=registry,
        )
        registry.register(_OutboxCollector(self))
        self._lock = threading.Lock()
        self.senders = ()
        self.store = None
        for outcome in POLL_OUTCOMES:
            self.polls.labels(outcome)
        # The children counted per change, looked up once (labels() costs more
        # than inc()).
        self.selected = {reason: self.pods_selected.labels(reason) for reason in SELECT_REASONS}
        self.events = {
            kind: self.watch_events.labels(kind) for kind in (*WATCH_EVENT_TYPES, "other")
        }
        self._per_endpoint = {}
        for reason in WATCH_RESTART_REASONS:
            self.watch_restarts.labels(reason)
        for outcome in RESYNC_OUTCOMES:
            self.resyncs.labels(outcome)
        self.set_newer_version(None)

    def watch(self, senders, store, running_version):
        """Report the build, these senders' endpoints and their outboxes from now on."""
        self.build.info({"version": running_version})
        self.senders = tuple(senders)
        self.store = store
        for sender in self.senders:
            for outcome in DELIVERY_OUTCOMES:
                self.deliveries.labels(sender.endpoint.label, outcome)

    def polled(self, outcome, seconds=None, seen=None, selected=None):
        """Count a poll; for a successful one, its duration, pods and choices."""
        self.polls.labels(outcome).inc()
        if outcome != "success":
            return
        self.poll_duration.observe(seconds)
        self.pods_seen.set(seen)
        for reason, count in selected.items():
            self.selected[reason].inc(count)
        self.last_poll.set_to_current_time()

    def delivered(self, endpoint, outcome, count=1):
        """Count delivery outcomes (or retried attempts) for an endpoint."""
        self._child(self.deliveries, endpoint, outcome).inc(count)

    def posted(self, endpoint, seconds):
        """Observe how long one POST to an endpoint took."""
        self._child(self.latency, endpoint).observe(seconds)

    def _child(self, metric, *labels):
        """metric.labels(*labels), looked up once."""
        key = (metric, *labels)
        child = self._per_endpoint.get(key)
        if child is None:
            child = self._per_endpoint[key] = metric.labels(*labels)
        return child

    def set_newer_version(self, newer):
        """Say which newer version the registry has, or None for none."""
        with self._lock:
            self.newer_version.clear()
            self.newer_version.labels(newer or "").set(1 if newer else 0)


class _OutboxCollector:
    """What each webhook is owed, read from the outbox at each scrape, and its health."""

    OWED = (
        "k8svent_deliveries_owed",
        "Deliveries owed to an endpoint (the outbox's rows), by endpoint.",
    )
    OLDEST = (
        "k8svent_delivery_oldest_owed_seconds",
        "Seconds the oldest delivery owed to an endpoint has waited (0 when "
        "none is owed): the lag to alert on.",
    )
    UP = ("k8svent_endpoint_up", "1 while an endpoint answers, 0 while it counts as down.")

    def __init__(self, metrics):
        self._metrics = metrics

    def _families(self):
        return [
            prometheus_client.core.GaugeMetricFamily(name, text, labels=["endpoint"])
            for name, text in (self.OWED, self.OLDEST, self.UP)
        ]

    def describe(self):
        yield from self._families()

    def collect(self):
        owed, oldest, up = self._families()
        senders = self._metrics.senders
        now = time.time()
        by_label = {}
        # URLs on one scheme://host:port share a label, so they share a series.
        for sender in senders:
            sender.settle()  # a delivery done is not owed, settled or not
            count, since = self._metrics.store.outbox.backlog(sender.endpoint.id)
            age = 0.0 if since is None else max(0.0, now - since)
            total, worst, all_up = by_label.get(sender.endpoint.label, (0, 0.0, True))
            by_label[sender.endpoint.label] = (total + count, max(worst, age), all_up and sender.up)
        for label, (count, age, is_up) in by_label.items():
            owed.add_metric([label], count)
            oldest.add_metric([label], age)
            up.add_metric([label], 1 if is_up else 0)
        yield from (owed, oldest, up)


metrics = Metrics()


def stuck_after_seconds(settings):
    """How long the poller may make no progress before it counts as stuck."""
    return (
        STUCK_INTERVALS * max(settings.interval, settings.retry_interval) + settings.kubectl_timeout
    )


def poller_trouble(alive, idle_seconds, limit_seconds):
    """Why the poller is not healthy, or None if it is."""
    if not alive:
        return "the poller thread is not running"
    if idle_seconds > limit_seconds:
        return (
            f"the poller has made no progress for {idle_seconds:.0f} s (limit {limit_seconds:g} s)"
        )
    return None


class Health:
    """Liveness and readiness, for the probes.

    Liveness fails only when k8svent itself is stuck (a thread dead, or a
    loop that stopped turning): a restart cures that. An API server or a
    webhook that is down is not cured by a restart: it shows on readiness
    and in the metrics.
    """

    def __init__(self, poller, settings, clock=time.monotonic, senders=()):
        self._poller = poller
        self._limit = stuck_after_seconds(settings)
        self._clock = clock
        self._senders = senders

    def live(self):
        """(True, text) while the poller runs and progresses, else (False, why)."""
        trouble = poller_trouble(
            self._poller.threads_alive(), self._clock() - self._poller.last_progress, self._limit
        )
        return trouble is None, trouble or "ok"

    def ready(self):
        """(True, text) once a poll has succeeded and nothing is down, else (False, why).

        While a list runs, the text says how far it has got.
        """
        listing = self._poller.listing
        if self._poller.last_poll_ok is None:
            return False, listing.text() if listing else "no successful poll yet"
        if self._poller.api_failure:
            return False, self._poller.api_failure
        down = [sender.endpoint.label for sender in self._senders if not sender.up]
        if down:
            return False, f"webhooks down: {', '.join(down)}"
        return True, f"ok; {listing.text()}" if listing else "ok"


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """GET /healthz, /readyz and /metrics."""

    def setup(self):
        super().setup()
        # One deadline for the whole request: a client that sends a byte at
        # a time, or nothing, cannot hold its thread.
        seconds = self.server.request_seconds
        self.connection.settimeout(seconds)
        self.rfile.close()
        self.rfile = _DeadlineReader(
            self.connection, time.monotonic() + seconds, seconds
        ).makefile()

    def version_string(self):
        return f"k8svent/{version()}"

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = prometheus_client.exposition.choose_encoder(
                self.headers.get("Accept", "")
            )
            self._send(200, encoder(metrics.registry), content_type)
        elif path in ("/healthz", "/readyz"):
            health = self.server.health
            ok, text = health.live() if path == "/healthz" else health.ready()
            self._send(200 if ok else 503, f"{text}\n".encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("status server: %s %s", self.address_string(), format % args)


class _StatusHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them.

    When all are taken, the oldest connection is closed to make room: the
    probes of the kubelet get an answer even while idle or slow clients hold
    every slot (each for at most request_seconds).
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, request_seconds, max_connections):
        self.request_seconds = request_seconds
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open = {}  # connection -> None, oldest first
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        """Serve a connection in a thread once a slot is free; close it if none frees."""
        if not self._slots.acquire(blocking=False):
            self._close_oldest()
            if not self._slots.acquire(timeout=STATUS_SLOT_WAIT_SECONDS):
                self.shutdown_request(request)
                return
        with self._open_lock:
            self._open[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def _close_oldest(self):
        """Hang up on the oldest connection: its thread ends at once."""
        with self._open_lock:
            oldest = next(iter(self._open), None)
        if oldest is not None:
            try:
                oldest.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # Probes and scrapers hang up early; that is no reason for a traceback.
        log.debug("status server: request from %s failed", client_address[0], exc_info=True)


class _StatusHTTPServer6(_StatusHTTPServer):
    address_family = socket.AF_INET6


class StatusServer:
    """The --listen server: /healthz, /readyz, /metrics, in a daemon thread."""

    def __init__(
        self,
        address,
        request_seconds=STATUS_REQUEST_SECONDS,
        max_connections=STATUS_MAX_CONNECTIONS,
    ):
        """Bind the address at once (raises OSError), serve after start()."""
        host, port = address
        kind = _StatusHTTPServer6 if ":" in host else _StatusHTTPServer
        self._server = kind((host, port), _StatusHandler, request_seconds, max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status", daemon=True
        )

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self, health):
        self._server.health = health
        self._thread.start()

    def stop(self):
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def join(self, timeout=None):
        self._thread.join(timeout)


# --- Check: what a first run needs --------------------------------------------

CHECK_DEADLINE_SECONDS = 10  # a webhook's answer to the ping
KUBECTL_SKEW_MINORS = 1  # kubectl supports API servers this many minor versions away


def required_permissions(settings, lease_namespace=None):
    """(verb, resource, namespace or None for all) that a run needs, for `kubectl auth can-i`.

    With --lease, `lease_namespace` is where its Lease is (the pod's own when
    --lease names none).
    """
    # One line of `check` each; a feature that needs more (a Lease) adds its own.
    verbs = ("list", "watch") if settings.mode == "watch" else ("list",)
    needed = [(verb, "pods", settings.namespace) for verb in verbs]
    if settings.lease is not None:
        namespace = settings.lease[0] or lease_namespace
        needed += [
            (verb, f"leases.coordination.k8s.io/{settings.lease[1]}", namespace)
            for verb in ("get", "update", "watch")
        ]
        needed.append(("create", "leases.coordination.k8s.io", namespace))
    return needed


def ping_payload():
    """The body of check's test request: a ping, not a pod (docs/receiving.md)."""
    return orjson.dumps({"ping": {"version": version()}})


def ping_message(fmt, message_id, source, now):
    """(body, headers) of check's ping in a --format: a CloudEvent in theirs."""
    if fmt == "k8svent":
        return ping_payload(), {}
    attributes = {
        "specversion": "1.0",
        "id": message_id,
        "source": source,
        "type": CLOUDEVENTS_PING_TYPE,
        "time": cloudevents_time(now),
    }
    return cloudevent(fmt, attributes, orjson.dumps({"version": version()}))


def kubectl_skew(client, server):
    """Why kubectl (its version info) may not work with the API server, or None."""
    try:
        minors = [int(re.match(r"\d+", v.get("minor", "")).group()) for v in (client, server)]
        majors = [v.get("major") for v in (client, server)]
    except (AttributeError, TypeError):
        return None  # a version kubectl cannot name: nothing to say
    if majors[0] != majors[1] or abs(minors[0] - minors[1]) > KUBECTL_SKEW_MINORS:
        return (
            f"kubectl {client.get('gitVersion')} is more than {KUBECTL_SKEW_MINORS} minor "
            f"version from the API server, outside the skew Kubernetes supports; k8svent's "
            f"calls (core v1 pods) likely work, but use a kubectl within one"
        )
    return None


def _kubectl_json(settings, *args):
    """kubectl's output as JSON, or raise KubectlError."""
    try:
        return orjson.loads(run_kubectl(settings, *args))
    except orjson.JSONDecodeError:
        raise KubectlError(f"kubectl {' '.join(args)} printed no JSON") from None


def _check_kubectl(settings):
    """(ok, text, kubectl's version info or None)."""
    try:
        client = _kubectl_json(settings, "version", "--client", "-o", "json")["clientVersion"]
    except (KubectlError, KeyError, TypeError) as exc:
        return False, f"{exc} (get one: README.md, Quick start)", None
    return True, f"{client.get('gitVersion')} ({settings.kubectl})", client


def _check_cluster(settings, environ, client):
    """(ok, text): the API server answers; ok is None (a warning) outside kubectl's skew."""
    server_url = cluster_server(settings, environ) or "the API server"
    try:
        server = _kubectl_json(settings, "get", "--raw", "/version")
    except KubectlError as exc:
        return False, f"{server_url} does not answer: {exc}"
    answers = f"{server_url} answers, Kubernetes {server.get('gitVersion')}"
    skew = kubectl_skew(client, server)
    return (None, f"{answers}; {skew}") if skew else (True, answers)


def _check_permission(settings, verb, resource, namespace):
    """(ok, text) of `kubectl auth can-i VERB RESOURCE`."""
    scope = ("-n", namespace) if namespace else ("--all-namespaces",)
    where = f"in namespace {namespace}" if namespace else "in all namespaces"
    try:
        run_kubectl(settings, "auth", "can-i", verb, resource, *scope, "--quiet")
    except KubectlError as exc:
        if exc.stderr.strip():  # --quiet: a "no" is an exit status 1 and nothing said
            return False, f"cannot ask whether it may {verb} {resource}: {exc}"
        return False, f"may not {verb} {resource} {where} (see deploy.yaml's ClusterRole)"
    return True, f"may {verb} {resource} {where}"


def _check_webhook(url, settings, source=CLOUDEVENTS_SOURCE_UNKNOWN):
    """(ok, text): the webhook answers a signed ping with a 2xx."""
    how = "a signed ping" if settings.secret else "an unsigned ping (no secret)"
    started = time.monotonic()
    message_id = new_message_id()
    body, headers = ping_message(settings.format, message_id, source, time.time())
    try:
        endpoint = Endpoint(url, settings, deadline_seconds=CHECK_DEADLINE_SECONDS)
        try:
            response = endpoint.post(body, message_id, headers)
        finally:
            endpoint.close()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{how} failed ({failure_cause(exc)})"
    took = time.monotonic() - started
    if 200 <= response.status_code < 300:
        return True, f"answered {how} with HTTP {response.status_code} in {took:.2f} s"
    return False, (
        f"answered {how} with HTTP {response.status_code}; a receiver must answer 2xx "
        f"(docs/receiving.md, The ping)"
    )


def _check_state(path):
    """(ok, text): the state file (or the folder it will be made in) is writable."""
    if not path:
        return True, "none (no --state): a temporary file, forgotten at exit"
    if os.path.islink(path) or os.path.isdir(path):
        return False, f"{path} is a symbolic link or a folder"
    if os.path.exists(path):
        if not os.access(path, os.R_OK | os.W_OK):
            return False, f"{path} is not readable and writable"
        return True, f"{path} is writable"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return False, f"cannot create {path}: its folder does not exist or is not writable"
    return True, f"{path} does not exist yet and can be created"


def _check_secret(settings):
    """(ok, text): a signing secret is set (never shown)."""
    if not settings.secret:
        return False, (
            "none: deliveries would be unsigned (give --secret-file or K8SVENT_WEBHOOK_SECRET)"
        )
    return True, f"set ({len(settings.secret)} characters)"


SKIPPED = "skipped"  # a check's outcome when an earlier one failed


def run_check(settings, environ, out=None):
    """`k8svent.py check`: one line per check, right or wrong; 0 when all are right, else 1."""
    out = out or sys.stdout
    failed = skipped = 0

    def report(what, ok, text):
        """One line: ok, warn (ok is None: worth knowing, not a failure), FAIL, or skip
        (ok is SKIPPED: it could not run because an earlier check failed)."""
        nonlocal failed, skipped
        failed += ok is False
        skipped += ok is SKIPPED
        mark = {True: "ok  ", None: "warn", False: "FAIL", SKIPPED: "skip"}[ok]
        print(f"{mark} {what}: {escape_controls(text)}", file=out, flush=True)

    ok, text, client = _check_kubectl(settings)
    report("kubectl", ok, text)
    cluster_ok, text = SKIPPED, "not checked without kubectl"
    if client is not None:
        cluster_ok, text = _check_cluster(settings, environ, client)
    report("cluster", cluster_ok, text)
    lease_at = None
    if settings.lease is not None and settings.lease[0] is None and cluster_ok is not False:
        lease_at = lease_namespace(settings, environ)
    for verb, resource, namespace in required_permissions(settings, lease_at):
        ok, text = (
            _check_permission(settings, verb, resource, namespace)
            if cluster_ok in (True, None)
            else (SKIPPED, "not checked without the cluster")
        )
        report(f"permission {verb} {resource}", ok, text)
    source = CLOUDEVENTS_SOURCE_UNKNOWN
    if settings.format != "k8svent" and client is not None:
        source = cloudevents_source(cluster_server(settings, environ))
    for url in settings.urls:
        report(f"webhook {redact_url(url)}", *_check_webhook(url, settings, source))
    if not settings.urls:
        report("webhooks", False, "none given (--url or K8SVENT_WEBHOOKS)")
    report("state", *_check_state(settings.state))
    report("secret", *_check_secret(settings))
    summary = "all is well" if not failed else f"{failed} check{'s' if failed > 1 else ''} failed"
    if skipped:
        summary += f", {skipped} skipped"
    print(summary, file=out, flush=True)
    return 1 if failed or skipped else 0


# --- Main --------------------------------------------------------------------


def version(environ=None):
    """The running version: K8SVENT_VERSION (stamped into the image), else .ci/version's
    for a git checkout, else __version__."""
    environ = os.environ if environ is None else environ
    return environ.get("K8SVENT_VERSION") or _checkout_version() or __version__


@functools.lru_cache(maxsize=1)
def _checkout_version():
    """What .ci/version prints for the checkout this file is in, or None elsewhere."""
    script = Path(__file__).resolve().parent / ".ci" / "version"
    if not script.is_file():
        return None
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=script.parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = done.stdout.strip()
    return found if done.returncode == 0 and parse_version(found) else None


def rfc3339(timestamp):
    """A Unix time as RFC 3339 in UTC with milliseconds, as log pipelines expect."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, with the pod and endpoint where they apply."""

    FIELDS = ("pod", "endpoint", "status", "correlation_id")

    def format(self, record):
        entry = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    """Lines of text whose messages cannot break a line or reach a terminal raw."""

    def formatMessage(self, record):
        return escape_controls(super().formatMessage(record))

    def formatException(self, exc_info):
        # A traceback spans lines; within each, controls are escaped.
        return "\n".join(
            escape_controls(line) for line in super().formatException(exc_info).split("\n")
        )

    def formatStack(self, stack_info):
        return "\n".join(escape_controls(line) for line in stack_info.split("\n"))


def configure_logging(settings):
    """Send k8svent's log to stderr in the chosen level and format."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(settings.log_level.upper())
    log.propagate = False
    # Warnings of libraries (urllib3) and of Python in the same format, so
    # that with json every line of stderr is still one object.
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _exit_now(code, reason):
    """The one place that ends the process without waiting for threads."""
    log.warning("exiting now: %s", reason)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def main(argv=None, environ=None):
    """Run k8svent; return the exit status."""
    environ = os.environ if environ is None else environ
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        if args.get("--help"):
            print(__doc__.strip())
            return 0
        if args.get("--version"):
            print(version())
            return 0
        settings = settings_from(args, environ)
    except SettingsError as exc:
        print(f"k8svent: error: {exc}", file=sys.stderr)
        return 2
    if settings.check:
        return run_check(settings, environ)

    try:
        endpoints = (
            [StdoutEndpoint()]
            if settings.dry_run
            else [Endpoint(url, settings) for url in settings.urls]
        )
    except OSError as exc:  # REQUESTS_CA_BUNDLE names a missing or bad file
        print(
            f"k8svent: error: cannot set up TLS for the webhooks: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    status_server = None
    if settings.listen and not settings.once:
        try:
            status_server = StatusServer(settings.listen)
        except OSError as exc:
            print(
                f"k8svent: error: cannot listen on {settings.listen[0]}:"
                f"{settings.listen[1]}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
    configure_logging(settings)
    if settings.listen and settings.once:
        log.warning("--listen is not served with --once")
    if settings.repeated_urls:
        log.warning(
            "%d webhook URLs were given more than once; each is sent to once",
            settings.repeated_urls,
        )
    # --dry-run must not change what the state file says webhooks received.
    state = None if settings.dry_run else settings.state
    if settings.dry_run and settings.state:
        log.info("--dry-run leaves state file %s alone", settings.state)
    try:
        # A temporary store is new: which cluster it is of needs no asking.
        # So is a CloudEvent's source. The state's scope is the cluster's uid.
        server = cluster_identity(settings, environ) if state else None
        api_server = cluster_server(settings, environ) if settings.format != "k8svent" else None
        store = Store(
            state,
            scope=None if server is None else state_scope(settings, server),
            keep_bodies=settings.mode == "poll",
            kinds=settings.send,
        )
    except StateError as exc:
        if status_server:
            status_server.stop()
        print(f"k8svent: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        if status_server:
            status_server.stop()
        print(f"k8svent: error: cannot open state file {settings.state!r}: {exc}", file=sys.stderr)
        return 2

    if server is None and state:
        log.warning(
            "cannot tell which API server kubectl talks to; the state file's "
            "snapshot is taken to be of it"
        )
    stop = threading.Event()
    store.outbox.set_endpoints([e.id for e in endpoints])
    source = cloudevents_source(api_server)
    elector = None
    gate = None if settings.lease is None else (lambda: elector.may_deliver())
    senders = [Sender(e, store, settings, stop, source=source, gate=gate) for e in endpoints]
    poller = (Watcher if settings.mode == "watch" else Poller)(settings, store, senders)
    if settings.lease is not None:
        namespace, name = settings.lease
        elector = LeaderElector(
            settings,
            namespace or lease_namespace(settings, environ),
            name,
            lease_identity(environ),
            store,
            poller,
            senders,
        )
    metrics.watch(senders, store, version())
    metrics.leader.set_function(lambda: 1 if elector is None or elector.may_deliver() else 0)
    log.info(
        "k8svent %s starting (%s mode): %s; webhooks %s",
        version(),
        settings.mode,
        describe_selection(settings),
        ", ".join(e.label for e in endpoints),
    )
    if status_server:
        status_server.start(Health(poller, settings, senders=senders))
        log.info("listening on %s", status_server.url)
    for sender in senders:
        sender.start()

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if poller.stop_event.is_set():
            log.debug("received %s; already stopping", name)
            return
        log.info("received %s; stopping", name)
        poller.stop()
        if settings.once:
            stop.set()  # give up retries now rather than after their budget

    def on_newer(newer):
        # Runs in the upgrader's thread: it only asks main to stop.
        metrics.set_newer_version(newer)
        poller.stop()

    upgrader = None
    if not settings.once and settings.upgrade != "never":
        upgrader = Upgrader(
            RegistryClient(settings.image, user_agent=f"k8svent/{version()}"),
            version(),
            upgrade_interval_seconds(version(), settings.upgrade_interval),
            on_newer,
            log,
            decide=lambda: upgrade_decision_here(settings, environ),
            ready=poller.first_poll_done,
            on_available=metrics.set_newer_version,
        )

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if settings.once:
            ok = poller.poll_once()
            for sender in senders:
                sender.wait_idle()
            failed = sum(s.failed for s in senders) + sum(s.unfinished() for s in senders)
            status = 0 if ok and not failed else 1
            if failed and not stop.is_set():
                log.error("%d deliveries failed", failed)
        else:
            poller.start()
            if elector is not None:
                elector.start()
            if upgrader is not None:
                upgrader.start()
            while poller.is_alive():
                poller.join(0.5)
                if stop.is_set():  # stdout closed under --dry-run
                    poller.stop()
            if upgrader is not None:
                upgrader.stop()
            status = 0
        if any(s.output_closed for s in senders):
            _quiet_stdout()
            log.info("stdout was closed; stopping")
            status = 0
        return _shut_down(senders, store, stop, status, settings, elector)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if status_server:
            status_server.stop()


def _quiet_stdout():
    """Point a closed stdout at /dev/null, so that exiting does not fail to flush it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def cluster_server(settings, environ):
    """The API server kubectl talks to (with --context and KUBECONFIG), or None if unknown."""
    try:
        server = (
            run_kubectl(
                settings,
                "config",
                "view",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.server}",
            )
            .decode()
            .strip()
        )
    except KubectlError as exc:
        log.debug("cannot tell which API server kubectl uses: %s", exc)
        server = ""
    if not server and environ.get("KUBERNETES_SERVICE_HOST"):  # in a pod
        server = (
            f"https://{environ['KUBERNETES_SERVICE_HOST']}:"
            f"{environ.get('KUBERNETES_SERVICE_PORT', '443')}"
        )
    return server or None


def cluster_identity(settings, environ):
    """Which cluster the state is of: the kube-system namespace's uid, else the API server."""
    # In a pod the server is https://kubernetes.default.svc in every cluster:
    # the uid tells clusters apart (the read needs get on namespaces/kube-system).
    try:
        namespace = orjson.loads(
            run_kubectl(settings, "get", "--raw", "/api/v1/namespaces/kube-system")
        )
        uid = (namespace.get("metadata") or {}).get("uid")
    except (KubectlError, orjson.JSONDecodeError, AttributeError) as exc:
        log.debug("cannot read the uid of namespace kube-system: %s", exc)
        uid = None
    if isinstance(uid, str) and uid:
        return f"{CLUSTER_UID_SCOPE}{uid}"
    return cluster_server(settings, environ)


def upgrade_decision_here(settings, environ):
    """(UpgradePlan or None, why) where we run; KubectlError: ask again later."""
    version_set = bool(environ.get("K8SVENT_VERSION"))
    pod = None
    if settings.upgrade == "auto" and version_set:
        located = locate_own_pod(
            environ.get("POD_NAME"), environ.get("POD_NAMESPACE"), socket.gethostname()
        )
        if located:
            try:
                pod = get_own_pod(settings, *located)
            except KubectlError as exc:
                raise KubectlError(
                    f"cannot look up own pod {located[1]}/{located[0]}: {exc}"
                ) from None
    return upgrade_plan(settings.upgrade, version_set, pod, settings.image, settings.image_given)


def owed_at_stop(owed, state_path):
    """The warning for deliveries still owed at a stop: (webhook, count) pairs, or None."""
    owed = [(label, count) for label, count in owed if count]
    if not owed:
        return None
    where = ", ".join(f"{count} to {label}" for label, count in owed)
    if state_path:
        return f"stopping with deliveries still owed ({where}); state file {state_path} keeps them"
    return (
        f"stopping with deliveries still owed ({where}); they are lost: without --state "
        f"nothing outlives the process (give --state=PATH to keep them for the next start)"
    )


def _report_owed(senders, store, settings):
    """Warn of the deliveries still owed, once the workers have stopped."""
    if settings.dry_run:
        return
    owed = []
    for sender in senders:
        try:
            owed.append((sender.endpoint.label, store.outbox.backlog(sender.endpoint.id)[0]))
        except sqlite3.Error as exc:
            log.warning("cannot count what %s is still owed: %s", sender.endpoint.label, exc)
    message = owed_at_stop(owed, settings.state)
    if message:
        log.warning("%s", message)


def _shut_down(senders, store, stop, status, settings, elector=None):
    """Let deliveries in flight finish (bounded), release the Lease, then close; return status."""
    deadline = time.monotonic() + DRAIN_SECONDS
    stop.set()  # no new deliveries, no more retries
    for sender in senders:
        sender.wake()
    # The store stays open until every worker has ended: one in the middle of
    # an attempt records its outcome first.
    drained = all(s.join(max(0.0, deadline - time.monotonic())) for s in senders)
    for sender in senders:
        sender.close()
    if elector is None or elector.may_deliver():  # a standby owes nothing of its own
        _report_owed(senders, store, settings)
    if elector is not None:
        # With the last watermark: rows still in flight count as owed.
        elector.release()
    if not drained:
        # Not closed under a worker still at work: SQLite's journal makes
        # the state whole again at the next start.
        store.remove_temporary()
        _exit_now(status, f"deliveries still in flight after {DRAIN_SECONDS} s")
    store.close()
    log.info("stopped")
    return status


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before main()'s handlers are in place, or in check
        sys.exit(130)
