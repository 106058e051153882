"""k8svent: send Kubernetes pods, as JSON, to webhook endpoints.

Usage:
  k8svent.py [options] [--url=URL ...]
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
  -l LEVEL, --log-level=LEVEL  debug, info, warning or error.
                               Env: K8SVENT_LOG_LEVEL [default: info].
  --log-format=FORMAT          text, or json for one object per line.
                               Env: K8SVENT_LOG_FORMAT [default: text].
  --listen=ADDR:PORT           Serve /healthz, /readyz and /metrics on this
                               address, such as 0.0.0.0:8080 (default: off).
                               Env: K8SVENT_LISTEN.
  --interval=SECONDS           Seconds between successful polls.
                               Env: K8SVENT_INTERVAL [default: 120].
  --retry-interval=SECONDS     Seconds before polling again after a failure.
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
  --retry-budget=SECONDS       How long to retry one delivery before leaving
                               it owed to the next poll.
                               Env: K8SVENT_RETRY_BUDGET [default: 900].
  --state=PATH                 SQLite file that remembers what each webhook
                               got, across restarts (default: a temporary
                               file, removed at exit). Env: K8SVENT_STATE.
  --image=REPO                 Image repository to watch for newer versions.
                               Env: K8SVENT_IMAGE
                               [default: docker.io/atomist/k8svent].
  --upgrade=MODE               auto, always or never: exit (for Kubernetes to
                               restart onto the new image) when the registry
                               has a newer version; auto only in a pod that
                               runs a channel tag. Env: K8SVENT_UPGRADE
                               [default: auto].
  --upgrade-interval=SECONDS   Seconds between checks (+-10 %); 86400 when
                               running a release, 14400 a prerelease.
                               Env: K8SVENT_UPGRADE_INTERVAL.
  --once                       Poll once, wait for every delivery to succeed
                               or fail for good, exit 0 if all succeeded.
  --dry-run                    Print each payload as a JSON line on stdout
                               instead of posting it; needs no URL.
  --version                    Print the version and exit.
  -h, --help                   Print this help and exit.
"""

import base64
import concurrent.futures
import dataclasses
import email.utils
import fcntl
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import certifi
import docopt
import ijson
import orjson
import prometheus_client
import prometheus_client.core
import prometheus_client.exposition
import requests
import requests.utils
import semver
import sh

__version__ = "0.1.0"

# --- Constants ---------------------------------------------------------------

CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 30
BACKOFF_START_SECONDS = 0.5
BACKOFF_FACTOR = 1.5
BACKOFF_CAP_SECONDS = 60
DRAIN_SECONDS = 10
MAX_SECONDS = 365 * 86400  # far below threading.TIMEOUT_MAX
PIPE_BUFFER_BYTES = 1 << 20
WATCH_TIMEOUT_SECONDS = 300
WATCH_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")
FOREIGN_TEXT_CHARS = 300
RESPONSE_BODY_BYTES = 1 << 16
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SIGNATURE_SHA1_HEADER = "x-atomist-signature"
SIGNATURE_SHA256_HEADER = "X-Hub-Signature-256"
DELETED_PHASE = "Deleted"
DEFAULT_IMAGE = "docker.io/atomist/k8svent"
UPGRADE_MODES = ("auto", "always", "never")
UPGRADE_RELEASE_SECONDS = 86400
UPGRADE_PRERELEASE_SECONDS = 14400
UPGRADE_ERROR_SECONDS = 3600
UPGRADE_JITTER_FRACTION = 0.10
CHANNEL_TAGS = ("latest", "next")
REGISTRY_TIMEOUT_SECONDS = 30
REGISTRY_MAX_PAGES = 1000
REGISTRY_TOKEN_DEFAULT_SECONDS = 60
REGISTRY_CLIENT_ID = "k8svent"
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_API = "https://registry-1.docker.io"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SERVICE_ACCOUNT_NAMESPACE_PATH = Path(
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
)

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
    log_level: str = "info"
    log_format: str = "text"
    listen: tuple | None = None
    interval: float = 120.0
    retry_interval: float = 30.0
    context: str | None = None
    kubectl: str = "kubectl"
    kubectl_timeout: float = 60.0
    chunk_size: int = 5000
    workers: int = 8
    retry_budget: float = 900.0
    state: str | None = None
    image: str = DEFAULT_IMAGE
    upgrade: str = "auto"
    upgrade_interval: float | None = None
    once: bool = False
    dry_run: bool = False

    def __repr__(self):
        # The secret and URL credentials must never reach a log line.
        shown = dataclasses.replace(
            self, secret="***" if self.secret else None,
            urls=tuple(redact_url(u) for u in self.urls))
        fields = ", ".join(f"{f.name}={getattr(shown, f.name)!r}"
                           for f in dataclasses.fields(self))
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
        return docopt.docopt(_DEFAULT_RE.sub("", __doc__), argv,
                             default_help=False)
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
        raise SettingsError(f"{name} must be a finite number of at most "
                            f"{MAX_SECONDS}, not {text!r}")
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {text!r}")
    return value


def _check_url(url):
    """Return the URL if it is an absolute http(s) URL, else raise."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise SettingsError(f"invalid webhook URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Only the scheme: the rest may hold a password or a token.
        raise SettingsError(f"webhook URL must be http or https, not "
                            f"{(parts.scheme or 'no scheme')!r}")
    return url


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def parse_listen(text):
    """(host, port) from ADDR:PORT ([ADDR]:PORT for IPv6), or raise."""
    bad = SettingsError(f"--listen must be ADDR:PORT, such as 0.0.0.0:8080, "
                        f"not {text!r}")
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

    def pick(flag, variable):
        value = args.get(flag)
        if value is None or value is False:
            value = environ.get(variable) or None
        if value is None:
            value = _DEFAULTS.get(flag)
        return value

    urls = args.get("--url") or []
    if not urls:
        urls = [u.strip() for u in environ.get("K8SVENT_WEBHOOKS", "").split(",")]
    urls = tuple(_check_url(u) for u in urls if u)

    secret = args.get("--secret")
    secret_file = args.get("--secret-file")
    if secret is None and secret_file is None:
        secret = environ.get("K8SVENT_WEBHOOK_SECRET") or None
        secret_file = environ.get("K8SVENT_WEBHOOK_SECRET_FILE") or None
    if secret is None and secret_file is not None:
        try:
            with open(secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"cannot read secret file {secret_file!r}: "
                f"{getattr(exc, 'strerror', None) or exc}") from None
        if not secret:
            raise SettingsError(f"secret file {secret_file!r} is empty")

    log_level = pick("--log-level", "K8SVENT_LOG_LEVEL").lower()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"log level must be one of {', '.join(LOG_LEVELS)}, "
                            f"not {log_level!r}")
    log_format = pick("--log-format", "K8SVENT_LOG_FORMAT").lower()
    if log_format not in LOG_FORMATS:
        raise SettingsError(f"log format must be text or json, not {log_format!r}")

    image = pick("--image", "K8SVENT_IMAGE")
    try:
        parse_image(image)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    upgrade = pick("--upgrade", "K8SVENT_UPGRADE").lower()
    if upgrade not in UPGRADE_MODES:
        raise SettingsError(f"upgrade must be auto, always or never, not {upgrade!r}")
    upgrade_interval = pick("--upgrade-interval", "K8SVENT_UPGRADE_INTERVAL")
    if upgrade_interval is not None:
        upgrade_interval = _number("--upgrade-interval", upgrade_interval, minimum=1)
    running = environ.get("K8SVENT_VERSION") or __version__
    if upgrade != "never" and parse_version(running) is None:
        raise SettingsError(f"version {running!r} (K8SVENT_VERSION) is not a "
                            f"semantic version; fix it or use --upgrade=never")
    listen = pick("--listen", "K8SVENT_LISTEN")
    listen = parse_listen(listen) if listen else None

    dry_run = bool(args.get("--dry-run"))
    if not urls and not dry_run:
        raise SettingsError("no webhook URL: give --url or K8SVENT_WEBHOOKS "
                            "(or --dry-run)")

    return Settings(
        urls=urls,
        secret=secret,
        namespace=pick("--namespace", "K8SVENT_NAMESPACE"),
        log_level=log_level,
        log_format=log_format,
        listen=listen,
        interval=_number("--interval", pick("--interval", "K8SVENT_INTERVAL")),
        retry_interval=_number("--retry-interval", pick(
            "--retry-interval", "K8SVENT_RETRY_INTERVAL")),
        context=pick("--context", "K8SVENT_CONTEXT"),
        kubectl=pick("--kubectl", "K8SVENT_KUBECTL"),
        kubectl_timeout=_number("--kubectl-timeout", pick(
            "--kubectl-timeout", "K8SVENT_KUBECTL_TIMEOUT"), minimum=1),
        chunk_size=_number("--chunk-size", pick(
            "--chunk-size", "K8SVENT_CHUNK_SIZE"), int, minimum=1),
        workers=_number("--workers", pick("--workers", "K8SVENT_WORKERS"),
                        int, minimum=1),
        retry_budget=_number("--retry-budget", pick(
            "--retry-budget", "K8SVENT_RETRY_BUDGET")),
        state=pick("--state", "K8SVENT_STATE"),
        image=image,
        upgrade=upgrade,
        upgrade_interval=upgrade_interval,
        once=bool(args.get("--once")),
        dry_run=dry_run,
    )


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
    if not all(container_healthy(s, True)
               for s in status.get("initContainerStatuses") or ()):
        return False
    return all(container_healthy(s, False)
               for s in status.get("containerStatuses") or ())


def pod_under_duress(pod):
    """Whether a pod is re-sent every poll: unhealthy and not completed."""
    # A Succeeded pod (a finished Job) is not in trouble: send it on change.
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", DELETED_PHASE) and not pod_healthy(pod)


def _looks_like_pod(item):
    """Whether a list item has the shape of a pod (objects where pods have them)."""
    return isinstance(item, dict) and isinstance(item.get("metadata"), dict) and \
        all(isinstance(item.get(field, {}), dict) for field in ("spec", "status"))


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


def sign(body, secret):
    """The signature headers for a body: HMAC-SHA1 (Atomist) and -SHA256."""
    key = secret.encode()
    return {
        SIGNATURE_SHA1_HEADER:
            "sha1=" + hmac.new(key, body, hashlib.sha1).hexdigest(),
        SIGNATURE_SHA256_HEADER:
            "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
    }


def redact_url(url):
    """A URL fit for logs: the password replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def endpoint_label(url):
    """scheme://host:port of a URL: no credentials, path or query."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def backoff_delays(rng=random):
    """Delays between delivery attempts: 0.5 s, x1.5, +-50 % jitter, 60 s cap."""
    delay = BACKOFF_START_SECONDS
    while True:
        yield delay * rng.uniform(0.5, 1.5)
        delay = min(delay * BACKOFF_FACTOR, BACKOFF_CAP_SECONDS)


def retry_after_seconds(value, now=None):
    """Seconds to wait from a Retry-After header (seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def cut(text, limit=FOREIGN_TEXT_CHARS):
    """Foreign text (stderr, response bodies) cut to a bounded length."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# --- Versions ----------------------------------------------------------------

# Repository path components, as the OCI distribution spec defines them.
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]+)?"
)


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
        name, tag = name[:colon], name[colon + 1:]
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


def own_image(pod, image_repo):
    """Return the image of the k8svent container in a pod object, else None.

    The container named 'k8svent' wins; else the first whose image is from
    the configured repository.
    """
    containers = (pod.get("spec") or {}).get("containers") or []
    for container in containers:
        if container.get("name") == "k8svent" and container.get("image"):
            return container["image"]
    for container in containers:
        image = container.get("image")
        if image and same_repository(image, image_repo):
            return image
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
_AUTH_PARAM = re.compile(
    r"\s*(" + _AUTH_TOKEN + r')\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)'
)
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


# --- State: what every endpoint was last sent --------------------------------

# Pods and their bodies live apart: a poll reads and writes the small rows
# of every pod, and only the bodies of the pods that changed.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pods (
    key TEXT PRIMARY KEY,
    fp BLOB NOT NULL,
    duress INTEGER NOT NULL,
    deleted INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bodies (key TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS delivered (
    endpoint TEXT NOT NULL,
    key TEXT NOT NULL,
    fp BLOB NOT NULL,
    PRIMARY KEY (endpoint, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS endpoints (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged (
    key TEXT PRIMARY KEY,
    fp BLOB NOT NULL,
    duress INTEGER NOT NULL,
    body BLOB NOT NULL
);
"""
_SCHEMA_VERSION = 2
_SQL_BATCH = 500
OWED_BATCH = 256


def _corrupt(exc):
    """Whether an SQLite error means the file is damaged or not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    # Our own checks (integrity, schema) raise without a code.
    return code is None or code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def state_scope(settings):
    """What a snapshot is of: the kubectl context and namespace ('' for defaults)."""
    if not (settings.context or settings.namespace):
        return ""
    return f"{settings.context or ''}/{settings.namespace or ''}"


def endpoint_id(url):
    """A stable id for an endpoint that keeps its URL out of the state file."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


class Store:
    """The snapshot of pods and what each endpoint last received, in SQLite."""

    def __init__(self, path=None, scope=""):
        self._temporary = path is None
        if path is None:
            fd, path = tempfile.mkstemp(prefix="k8svent-", suffix=".db")
            os.close(fd)
        elif os.path.isdir(path):
            raise StateError(f"state file {path!r} is a directory")
        elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise StateError(f"the folder of state file {path!r} does not exist")
        self.path = path
        self._lock = threading.RLock()
        self._seen = set()
        self._lock_file = None if self._temporary else self._claim(path)
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                self._release()
                raise StateError(f"cannot open state file {path!r}: {exc}") from None
            aside = f"{path}.corrupt-{int(time.time())}"
            os.replace(path, aside)
            # A journal left beside it belongs to the old file, not the new one.
            for suffix in ("-wal", "-shm", "-journal"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, aside + suffix)
            log.error("state file %s is unreadable (%s); moved it to %s and "
                      "starting fresh: every pod will be sent again",
                      path, exc, aside)
            self._db = self._open(path)
        self._check_scope(scope)

    @staticmethod
    def _claim(path):
        """Lock PATH.lock so that two k8svents never share a state file."""
        lock_file = open(path + ".lock", "a")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise StateError(f"state file {path!r} is in use by another "
                             f"k8svent") from None
        return lock_file

    def _release(self):
        """Let another k8svent use the state file."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _check_scope(self, scope):
        """Start afresh if the state was written for another cluster or namespace."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE name='scope'").fetchone()
            if row is not None and row[0] != scope:
                log.warning("state file %s was written for another context or "
                            "namespace (%s, now %s); starting a fresh snapshot",
                            self.path, row[0] or "default", scope or "default")
                for table in ("pods", "bodies", "delivered"):
                    db.execute(f"DELETE FROM {table}")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('scope', ?)", (scope,))

    @staticmethod
    def _open(path):
        """Open (or create) the database and check it is ours and sound."""
        db = sqlite3.connect(path, check_same_thread=False,
                             isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            db.executescript(_SCHEMA)
            row = db.execute(
                "SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)",
                           (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"unknown schema version {row[0]}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self):
        """Close the database; remove it if it was temporary."""
        with self._lock:
            self._db.close()
        self._release()
        if self._temporary:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.remove(self.path + suffix)
                except FileNotFoundError:
                    pass

    def _transaction(self):
        return _Transaction(self._db, self._lock)

    def set_endpoints(self, ids):
        """Record the configured endpoints and forget every other one."""
        with self._transaction() as db:
            db.execute("DELETE FROM endpoints")
            db.executemany("INSERT INTO endpoints VALUES (?)",
                           [(i,) for i in ids])
            db.execute("DELETE FROM delivered WHERE endpoint NOT IN "
                       "(SELECT id FROM endpoints)")

    def begin_poll(self):
        """Start a poll: forget what a failed one had read."""
        self._seen = set()
        with self._transaction() as db:
            db.execute("DELETE FROM staged")

    def apply_page(self, pods):
        """Merge one page of (key, fp, duress, pod_bytes); count by reason."""
        counts = {"new": 0, "changed": 0, "unhealthy": 0}
        keys = [p[0] for p in pods]
        # The keys seen by this poll, for its deletions: in memory for the
        # length of a poll only (about 100 bytes a pod).
        self._seen.update(keys)
        with self._transaction() as db:
            known = {}
            for start in range(0, len(keys), _SQL_BATCH):
                batch = keys[start:start + _SQL_BATCH]
                known.update((k, (fp, deleted)) for k, fp, deleted in db.execute(
                    "SELECT key, fp, deleted FROM pods WHERE key IN (%s)"
                    % ",".join("?" * len(batch)), batch))
            upserts = []
            for key, fp, duress, pod_bytes in pods:
                old = known.get(key)
                if old is None or old[1]:
                    counts["new"] += 1
                elif old[0] != fp:
                    counts["changed"] += 1
                else:
                    if duress:
                        counts["unhealthy"] += 1
                    continue
                upserts.append((key, fp, int(duress), zlib.compress(pod_bytes, 1)))
            # New and changed pods wait in `staged` until the listing is
            # complete: a poll that fails changes nothing.
            db.executemany("INSERT OR REPLACE INTO staged (key, fp, duress, body)"
                           " VALUES (?, ?, ?, ?)", upserts)
        return counts

    def finish_poll(self):
        """After a complete listing: take what changed, mark pods not seen as deleted."""
        seen, self._seen = self._seen, set()
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO pods (key, fp, duress, deleted)"
                       " SELECT key, fp, duress, 0 FROM staged")
            db.execute("INSERT OR REPLACE INTO bodies (key, body)"
                       " SELECT key, body FROM staged")
            db.execute("DELETE FROM staged")
            gone = [key for key, in db.execute(
                "SELECT key FROM pods WHERE deleted = 0") if key not in seen]
            del seen
            rows, bodies = [], []
            for key in gone:
                body, = db.execute("SELECT body FROM bodies WHERE key = ?",
                                   (key,)).fetchone()
                pod_bytes = mark_deleted(zlib.decompress(body))
                rows.append((fingerprint(pod_bytes), key))
                bodies.append((zlib.compress(pod_bytes, 1), key))
            db.executemany("UPDATE pods SET fp=?, deleted=1, duress=0 "
                           "WHERE key=?", rows)
            db.executemany("UPDATE bodies SET body=? WHERE key=?", bodies)
        return len(rows)

    def owed(self, endpoint, after="", limit=-1):
        """Keys owed to an endpoint: (key, force), force for pods under duress.

        In key order, from the first key after `after`, at most `limit`.
        """
        with self._lock:
            return self._db.execute(
                "SELECT p.key, p.duress FROM pods p LEFT JOIN delivered d "
                "ON d.endpoint = ? AND d.key = p.key "
                "WHERE p.key > ? AND (d.fp IS NULL OR d.fp != p.fp OR p.duress = 1) "
                "ORDER BY p.key LIMIT ?", (endpoint, after, limit)).fetchall()

    def latest(self, endpoint, key):
        """(fp, pod_bytes, duress, delivered_fp) of a pod, or None if gone."""
        with self._lock:
            row = self._db.execute(
                "SELECT p.fp, b.body, p.duress, d.fp FROM pods p "
                "JOIN bodies b ON b.key = p.key "
                "LEFT JOIN delivered d ON d.endpoint = ? AND d.key = p.key "
                "WHERE p.key = ?", (endpoint, key)).fetchone()
        if row is None:
            return None
        return row[0], zlib.decompress(row[1]), bool(row[2]), row[3]

    def record_delivery(self, endpoint, key, fp):
        """Remember that an endpoint has received this state of a pod."""
        with self._lock:   # one statement: a transaction of its own
            self._db.execute("INSERT OR REPLACE INTO delivered VALUES (?, ?, ?)",
                             (endpoint, key, fp))

    def prune(self):
        """Forget deleted pods once every endpoint has been told."""
        with self._transaction() as db:
            told = [(key,) for key, in db.execute(
                "SELECT key FROM pods WHERE deleted = 1 AND NOT EXISTS ("
                " SELECT 1 FROM endpoints e WHERE NOT EXISTS ("
                "  SELECT 1 FROM delivered d WHERE d.endpoint = e.id"
                "  AND d.key = pods.key AND d.fp = pods.fp))")]
            for table in ("pods", "bodies", "delivered"):
                db.executemany(f"DELETE FROM {table} WHERE key = ?", told)

    def count(self):
        """How many pods the snapshot holds (deleted ones included)."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM pods").fetchone()[0]


class _Transaction:
    """`with`: hold the store's lock and run the block in one transaction."""

    def __init__(self, db, lock):
        self._db, self._lock = db, lock

    def __enter__(self):
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
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

def pods_url(settings, **query):
    """The API path and query that list or watch the pods (of one namespace or all).

    Parameters that are None are left out, a trailing underscore is dropped
    from a name (``continue_``) and booleans are written true or false.
    """
    path = "/api/v1/pods"
    if settings.namespace:
        path = f"/api/v1/namespaces/{urllib.parse.quote(settings.namespace, safe='')}/pods"
    pairs = [(name.rstrip("_"), str(value).lower() if isinstance(value, bool) else value)
             for name, value in query.items() if value is not None]
    return f"{path}?{urllib.parse.urlencode(pairs)}" if pairs else path


def _kubectl_command(settings):
    """The sh.Command for kubectl, or raise KubectlError."""
    try:
        return sh.Command(settings.kubectl)
    except sh.CommandNotFound:
        raise KubectlError(f"kubectl not found: {settings.kubectl!r}") from None


def _kubectl_failure(exc, settings):
    """The KubectlError for one of sh's exceptions."""
    if isinstance(exc, sh.TimeoutException):
        return KubectlError(f"kubectl killed after {settings.kubectl_timeout:g} s "
                            f"without finishing")
    if isinstance(exc, sh.ErrorReturnCode):
        stderr = exc.stderr or b""
        kind = Expired if any(mark in stderr for mark in (b"(Expired)", b"(Gone)", b" 410")) \
            else KubectlError
        return kind(f"kubectl exited {exc.exit_code}: {cut(stderr)}", stderr)
    return KubectlError(f"cannot run kubectl {settings.kubectl!r}: "
                        f"{exc.strerror or exc}")


def run_kubectl(settings, *args):
    """Run kubectl with args; return its stdout bytes or raise KubectlError."""
    context = ("--context", settings.context) if settings.context else ()
    command = _kubectl_command(settings)
    try:
        return command(*context, *args, _return_cmd=True, _timeout=settings.kubectl_timeout,
                       _out_bufsize=PIPE_BUFFER_BYTES,
                       _internal_bufsize=PIPE_BUFFER_BYTES,
                       _tty_out=False).stdout
    except (sh.TimeoutException, sh.ErrorReturnCode, OSError) as exc:
        raise _kubectl_failure(exc, settings) from None


class _PageHead:
    """kubectl's output as a file, watched for the continue token on the way.

    Kubernetes sends a PodList's metadata before its items, so the (slow)
    event parser that looks for the token is fed only the first chunks.
    """

    def __init__(self, fd):
        self._stream = os.fdopen(fd, "rb", buffering=0)
        self._events = ijson.parse_coro(self)
        self.token = None
        self.has_items = False
        self.has_metadata = False
        self.at_eof = False

    def read(self, size):
        chunk = self._stream.read(size)
        self.at_eof = not chunk
        if chunk and not (self.has_items and self.has_metadata):
            self._events.send(chunk)
        return chunk

    def close(self):
        self._stream.close()

    def send(self, event):
        prefix, kind, value = event
        if prefix == "metadata.continue" and kind == "string":
            self.token = value
        elif prefix == "metadata" and kind == "end_map":
            self.has_metadata = True
        elif prefix == "" and kind == "map_key" and value == "items":
            self.has_items = True


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
        self._process, self.timeout, self._stop = process, timeout, stop
        self._done = threading.Event()
        self.finished = threading.Event()   # killed for taking too long
        self.stopped = threading.Event()    # killed because of a stop

    def run(self):
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.finished.set()
                break
            # Our own watch rather than sh's _timeout, whose watcher notices
            # the end of a process only every 0.1 s: a poll runs one a page.
            if self._done.wait(remaining if self._stop is None
                               else min(remaining, 0.2)):
                return
            if self._stop is not None and self._stop.is_set():
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
        process = command(*context, "get", "--raw", path, _out=write_fd, _bg=True,
                          _bg_exc=False, _tty_out=False)
    except (sh.ErrorReturnCode, OSError) as exc:
        os.close(read_fd)
        raise _kubectl_failure(exc, settings) from None
    finally:
        os.close(write_fd)      # kubectl has its own copy: EOF when it exits
    timer = _Watchdog(process, timeout, stop)
    timer.start()
    return process, timer, read_fd


def _end_get_raw(process, timer, stream):
    """Cancel the watchdog, close the pipe and reap kubectl, killed if still running."""
    timer.cancel()
    stream.close()
    if process.is_alive():
        _stop_quietly(process, kill=True)


def stream_pod_page(settings, path, stop=None):
    """Yield the items of one page as kubectl prints them; return its continue token.

    kubectl writes into a pipe that is parsed as it arrives (ijson), so only
    the pod being read is in memory, whatever the size of the page.
    """
    process, timer, read_fd = _start_get_raw(settings, path, settings.kubectl_timeout, stop)
    head = _PageHead(read_fd)
    try:
        try:
            yield from ijson.items(head, "items.item", use_float=True)
        except ijson.JSONError as exc:
            if head.at_eof:     # a kubectl that failed explains it better
                _wait_kubectl(process, timer, settings)
            raise KubectlError(f"kubectl printed no valid pod list "
                               f"({type(exc).__name__}: {cut(str(exc), 100)})") from None
        _wait_kubectl(process, timer, settings)
        if not head.has_items:
            raise KubectlError("kubectl printed no valid pod list (no items)")
        return head.token
    finally:
        _end_get_raw(process, timer, head)


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


def list_pods(settings, stop=None):
    """Yield the pods of the cluster one at a time, as PodList items, a page per kubectl run."""
    token, restarts = None, 0
    while True:
        try:
            token = yield from stream_pod_page(
                settings, stop=stop,
                path=pods_url(settings, limit=settings.chunk_size, continue_=token))
        except Expired:
            # The list took longer than the server keeps a snapshot: start
            # again; pods already seen merge again as unchanged.
            restarts += 1
            if restarts > 3:
                raise
            log.warning("continue token expired; listing pods again")
            token = None
            continue
        if not token:
            return


def watch_event(line):
    """The (type, object) of one line of a watch, its pod normalised like a list item.

    An ERROR event raises Expired (code 410: list again) or KubectlError;
    a line that is not an event raises KubectlError.
    """
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise KubectlError(f"kubectl printed no valid watch event ({cut(str(exc), 100)})") \
            from None
    kind = event.get("type") if isinstance(event, dict) else None
    obj = event.get("object") if isinstance(event, dict) else None
    if kind not in WATCH_EVENT_TYPES or not isinstance(obj, dict):
        raise KubectlError("kubectl printed no valid watch event (no type or object)")
    if kind == "ERROR":
        error = Expired if obj.get("code") == 410 else KubectlError
        raise error(f"watch failed: {obj.get('code')} {obj.get('reason')}: "
                    f"{cut(str(obj.get('message', '')))}")
    if kind == "BOOKMARK":
        return kind, obj
    if not _looks_like_pod(obj):
        raise KubectlError(f"kubectl printed a {kind} watch event whose object is not a pod")
    return kind, pod_from_item(obj)


def watch_pods(settings, resource_version, stop=None, timeout_seconds=WATCH_TIMEOUT_SECONDS):
    """Yield (type, object) for each pod event after resource_version until the watch ends.

    One kubectl streams the watch for up to timeout_seconds (whole seconds),
    read a line (an event) at a time as it prints it. ADDED, MODIFIED and
    DELETED carry the pod normalised as `pod_from_item` does; a BOOKMARK's
    object is as sent: only its metadata.resourceVersion means anything.
    Returns when the server ends the stream; raises Expired on a 410 (an
    ERROR event or the HTTP status), PollStopped when stop is set, and
    KubectlError on any other failure.
    """
    path = pods_url(settings, watch=1, resourceVersion=resource_version,
                    allowWatchBookmarks=True, timeoutSeconds=math.ceil(timeout_seconds))
    process, timer, read_fd = _start_get_raw(
        settings, path, timeout_seconds + settings.kubectl_timeout, stop)
    stream = os.fdopen(read_fd, "rb")
    try:
        for line in stream:
            if not line.endswith(b"\n"):   # cut short: a kubectl that failed explains it better
                _wait_kubectl(process, timer, settings, "watching pods")
                raise KubectlError("kubectl printed a partial watch event")
            if line.strip():
                yield watch_event(line)
        _wait_kubectl(process, timer, settings, "watching pods")
    finally:
        _end_get_raw(process, timer, stream)


# --- Webhooks ----------------------------------------------------------------

class Response:
    """What a webhook answered: status, headers and (a bounded part of) the body."""

    def __init__(self, status_code, headers, body):
        self.status_code, self.headers, self.body = status_code, headers, body

    def json(self):
        return json.loads(self.body)


class Endpoint:
    """One webhook URL: its label for logs and how to POST to it.

    Each delivery worker keeps one keep-alive http.client connection, to the
    webhook or to its proxy: requests costs several times more per POST. The
    proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) and CA bundle are looked up
    once, as requests would.
    """

    def __init__(self, url, settings):
        parts = urllib.parse.urlsplit(url)
        self.id = endpoint_id(url)
        self.label = endpoint_label(url)
        # For logs: no path or query (tokens often live there), no password.
        self.shown = self.label if parts.username is None else \
            self.label.replace("://", f"://{parts.username}:***@", 1)
        self._secret = settings.secret
        self._headers = {"Content-Type": "application/json",
                         "User-Agent": f"k8svent/{version()}"}
        if parts.username is not None:
            self._headers["Authorization"] = _basic_auth(
                parts.username, parts.password)
        self._host, self._port = parts.hostname, parts.port or \
            {"http": 80, "https": 443}[parts.scheme]
        default_port = {"http": 80, "https": 443}[parts.scheme]
        self._host_header = (f"[{self._host}]" if ":" in self._host else self._host) \
            + ("" if self._port == default_port else f":{self._port}")
        self._tls = parts.scheme == "https"
        self._target = urllib.parse.urlunsplit(
            ("", "", parts.path or "/", parts.query, ""))
        self._proxy = None
        proxies = requests.utils.get_environ_proxies(url)
        proxy = proxies.get(parts.scheme) or proxies.get("all")
        if proxy:
            if "://" not in proxy:
                proxy = "http://" + proxy
            self._proxy = urllib.parse.urlsplit(proxy)
            if not self._tls:   # plain http goes to the proxy as a full URL
                host = f"[{self._host}]" if ":" in self._host else self._host
                self._target = urllib.parse.urlunsplit(
                    ("http", f"{host}:{self._port}", parts.path or "/",
                     parts.query, ""))
                self._headers.update(self._proxy_headers())
        self._context = None
        if self._tls or (self._proxy and self._proxy.scheme == "https"):
            ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or \
                os.environ.get("CURL_CA_BUNDLE") or certifi.where()
            self._context = ssl.create_default_context(
                cafile=None if os.path.isdir(ca_bundle) else ca_bundle,
                capath=ca_bundle if os.path.isdir(ca_bundle) else None)
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
                raise OSError("an https:// proxy for an https:// webhook is "
                              "not supported; use an http:// proxy")
        if tls or tunnel:
            connection = http.client.HTTPSConnection(
                host, port, timeout=CONNECT_TIMEOUT_SECONDS,
                context=self._context)
        else:
            connection = http.client.HTTPConnection(
                host, port, timeout=CONNECT_TIMEOUT_SECONDS)
        if tunnel:
            headers = self._proxy_headers()
            connection.set_tunnel(*tunnel, headers=headers)
        return connection

    def _proxy_headers(self):
        """Proxy-Authorization, when the proxy URL has credentials."""
        if self._proxy is None or self._proxy.username is None:
            return {}
        return {"Proxy-Authorization": _basic_auth(self._proxy.username,
                                                   self._proxy.password)}

    def post(self, body):
        """POST one body; return the Response (redirects are not followed)."""
        started = time.monotonic()
        try:
            return self._post(body)
        finally:
            metrics.posted(self.label, time.monotonic() - started)

    def _post(self, body):
        """post() without the timing."""
        headers = dict(self._headers)
        if self._secret:
            headers.update(sign(body, self._secret))
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            try:
                return self._exchange(connection, body, headers)
            except (ConnectionError, http.client.HTTPException):
                # The server may close an idle keep-alive connection at any
                # time: try once more on a new one.
                self._drop(connection)
        connection = self._connect()
        with self._lock:
            self._connections.add(connection)
        self._local.connection = connection
        try:
            return self._exchange(connection, body, headers)
        except BaseException:
            self._drop(connection)
            raise

    def _exchange(self, connection, body, headers):
        """Send one request on a connection and read the whole answer."""
        if connection.sock is None:
            connection.connect()
            connection.sock.settimeout(READ_TIMEOUT_SECONDS)
        # The request line, headers and body in one write: http.client would
        # build the headers a call at a time and send the body apart.
        lines = [f"POST {self._target} HTTP/1.1", f"Host: {self._host_header}",
                 f"Content-Length: {len(body)}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        connection.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                                + body)
        response = http.client.HTTPResponse(connection.sock, method="POST")
        response.begin()
        data = response.read(RESPONSE_BODY_BYTES)
        if response.will_close or not response.isclosed():
            self._drop(connection)      # closed by the server, or too long to keep
        return Response(response.status, response.headers, data)

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
    credentials = (f"{urllib.parse.unquote(username)}:"
                   f"{urllib.parse.unquote(password or '')}")
    try:
        raw = credentials.encode("latin-1")     # as requests does
    except UnicodeEncodeError:
        raw = credentials.encode()
    return "Basic " + base64.b64encode(raw).decode()


class StdoutEndpoint:
    """--dry-run: print each payload as a line instead of posting it."""

    id = "stdout"
    label = shown = "stdout"

    def __init__(self, stream=None):
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def post(self, body):
        with self._lock:
            self._stream.write(body.decode() + "\n")
            self._stream.flush()
        return None

    def close(self):
        pass


def correlation_id(response):
    """The correlation_id of a JSON response body, if it has one."""
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        found = response.json().get("correlation_id")
    except (ValueError, AttributeError):
        return None
    return cut(str(found), 100) if found is not None else None


def retryable(status):
    """Whether an HTTP status is worth retrying (429 and 5xx)."""
    return status == 429 or status >= 500


class Sender:
    """Delivers what is owed to one endpoint, with its own pool of workers."""

    def __init__(self, endpoint, store, settings, stop, rng=random):
        self.endpoint = endpoint
        self._store = store
        self._settings = settings
        self._stop = stop
        self._rng = rng
        # Reentrant: a worker that is already done runs its callback at once,
        # inside _pump, which holds the lock.
        self._lock = threading.RLock()
        self._pending = {}        # key -> force, in key order
        self._after = ""          # the last key taken from the store
        self._scanning = False    # whether the store may owe more
        self._inflight = set()
        self._futures = set()
        self._idle = threading.Condition(self._lock)
        self.failed = 0           # deliveries that failed for good
        self.succeeded = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.workers,
            thread_name_prefix=f"deliver-{endpoint.label}")

    def offer(self):
        """A poll has finished: go through what the store says is owed."""
        with self._lock:
            # From the first key again: a pod under duress is sent once per
            # poll, and what the last scan has not reached yet only once.
            self._after, self._scanning = "", True
            self._pump()

    def _refill(self):
        """Queue the next owed keys from the store, a batch at a time (lock held)."""
        # The queue stays short however much is owed (every pod, on a first
        # poll): the keys wait in the store, not in memory.
        while self._scanning and len(self._pending) < self._settings.workers:
            owed = self._store.owed(self.endpoint.id, self._after, OWED_BATCH)
            if len(owed) < OWED_BATCH:
                self._scanning = False
            if owed:
                self._after = owed[-1][0]
            for key, force in owed:
                if key in self._pending:
                    self._pending[key] = self._pending[key] or bool(force)
                else:
                    # Also when in flight: that attempt may have read the
                    # state before this one. It waits for it to end, and is
                    # a no-op if the newest state was what got delivered.
                    self._pending[key] = bool(force)

    def _pump(self):
        """Start worker loops while there is work and room for them (lock held)."""
        # A worker takes key after key until none is left: no future, queue
        # hand-off and callback per delivery, which would cost more than the
        # POST itself to a fast receiver.
        self._refill()
        while (self._pending and not self._stop.is_set()
               and len(self._futures) < self._settings.workers):
            future = self._pool.submit(self._work)
            self._futures.add(future)
            future.add_done_callback(self._finished)

    def _take(self):
        """The next key to deliver and its force flag, or None (lock held)."""
        if self._stop.is_set():
            return None
        self._refill()
        for key in self._pending:
            # A key in flight waits for its running delivery to end first.
            if key not in self._inflight:
                self._inflight.add(key)
                return key, self._pending.pop(key)
        return None

    def _work(self):
        """A worker: deliver owed keys one after another while there are any."""
        while True:
            with self._lock:
                taken = self._take()
            if taken is None:
                return
            key, force = taken
            try:
                ok = self._deliver(key, force)
            except Exception:  # a bug, not a delivery failure: log it whole
                log.exception("delivery of %s to %s crashed", key,
                              self.endpoint.label)
                metrics.delivered(self.endpoint.label, "failed")
                ok = False
            with self._lock:
                self._inflight.discard(key)
                if ok:
                    self.succeeded += 1
                elif ok is False:
                    self.failed += 1

    def _finished(self, future):
        """A worker ended: start another if work came meanwhile; wake waiters."""
        if future.exception() is not None:   # a bug: log it whole
            log.error("delivery worker for %s crashed", self.endpoint.label,
                      exc_info=future.exception())
        with self._lock:
            self._futures.discard(future)
            self._pump()
            if not self._futures and (not self._owes() or self._stop.is_set()):
                self._idle.notify_all()

    def _owes(self):
        """Whether keys are queued or may still come from the store (lock held)."""
        return bool(self._pending) or self._scanning

    def unfinished(self):
        """Whether anything owed was left unsent (after a stop)."""
        with self._lock:
            return self._owes() or bool(self._inflight)

    def _deliver(self, key, force):
        """Send the newest state of one pod; True, False (failed) or None."""
        label = self.endpoint.shown
        deadline = time.monotonic() + self._settings.retry_budget
        delays = backoff_delays(self._rng)
        attempt = 0
        while True:
            latest = self._store.latest(self.endpoint.id, key)
            if latest is None:
                return None                     # forgotten: nothing owed
            fp, pod_bytes, duress, delivered_fp = latest
            if delivered_fp == fp and not (force and duress):
                return None                     # someone already sent it
            attempt += 1
            body = payload(pod_bytes)
            status, reason, retry_after = None, None, None
            try:
                response = self.endpoint.post(body)
            except TimeoutError:
                reason = "timed out"
            except (OSError, http.client.HTTPException):
                reason = "connection failed"
            else:
                if response is None or 200 <= response.status_code < 300:
                    self._store.record_delivery(self.endpoint.id, key, fp)
                    metrics.delivered(self.endpoint.label, "success")
                    cid = correlation_id(response) if response is not None \
                        else None
                    log.debug("delivered %s to %s%s", key, label,
                              f" (correlation_id {cid})" if cid else "",
                              extra={"pod": key, "endpoint": self.endpoint.label,
                                     "status": getattr(response, "status_code", None),
                                     "correlation_id": cid})
                    return True
                status = response.status_code
                reason = str(status)
                retry_after = retry_after_seconds(
                    response.headers.get("Retry-After"))
                cid = correlation_id(response)
                if not retryable(status):
                    # Failed for good: this state is not sent again; the
                    # pod's next change (or next poll under duress) is.
                    self._store.record_delivery(self.endpoint.id, key, fp)
                    metrics.delivered(self.endpoint.label, "rejected")
                    log.error("POST of %s to %s rejected (%s%s); not retrying "
                              "this state of the pod", key, label,
                              status, f", correlation_id {cid}" if cid else "",
                              extra={"pod": key, "endpoint": self.endpoint.label,
                                     "status": status, "correlation_id": cid})
                    return False
            delay = next(delays)
            if retry_after is not None:
                delay = max(delay, retry_after)
            remaining = deadline - time.monotonic()
            if delay > remaining or self._stop.is_set():
                metrics.delivered(self.endpoint.label, "failed")
                log.error("giving up on POST of %s to %s after %d attempts (%s); "
                          "it stays owed to the next poll", key, label, attempt,
                          reason, extra={"pod": key, "endpoint": self.endpoint.label,
                                         "status": status})
                return False
            log.warning("attempt %d to POST %s to %s failed (%s); retrying "
                        "in %.1f s", attempt, key, label, reason, delay,
                        extra={"pod": key, "endpoint": self.endpoint.label, "status": status})
            metrics.delivered(self.endpoint.label, "retry")
            if self._stop.wait(delay):
                return False

    def owed(self):
        """How many pods are queued or in flight to this endpoint."""
        with self._lock:
            return len(self._inflight | self._pending.keys())

    def wait_idle(self, timeout=None):
        """Wait until nothing is queued or in flight; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._futures or (self._owes() and not self._stop.is_set()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 1.0)
            return True

    def close(self):
        """Stop the workers without waiting for them."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.endpoint.close()


# --- Registry ----------------------------------------------------------------

class RegistryClient:
    """Lists an image repository's tags over the OCI distribution API.

    One requests.Session, a timeout on every call, anonymous bearer tokens
    fetched on a 401 challenge and kept until they expire. Tokens are never
    logged nor put in an error.
    """

    def __init__(self, image, *, user_agent="k8svent",
                 timeout_seconds=REGISTRY_TIMEOUT_SECONDS,
                 logger=None, clock=time.monotonic, session=None):
        self.base_url, self.repository = parse_image(image)
        self.image = image
        self.timeout_seconds = timeout_seconds
        self.log = logger or logging.getLogger("k8svent")
        self._clock = clock
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = user_agent
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
            if url in seen or len(seen) >= REGISTRY_MAX_PAGES:
                raise RegistryError(f"tags list of {self.image} pages in a loop", url=url)
            seen.add(url)
            response = self._get(url)
            tags.extend(self._page_tags(response, url))
            url = parse_link_next(response.headers.get("Link"), response.url or url)
        if not tags:
            raise RegistryError(f"registry lists no tags for {self.image}", url=self.tags_url())
        return tags

    def _page_tags(self, response, url):
        """Return the tags of one tags/list page, or raise RegistryError."""
        try:
            body = response.json()
        except ValueError as error:
            raise RegistryError(f"invalid JSON in tags list from {url}", url=url,
                                status=response.status_code) from error
        tags = body.get("tags") if isinstance(body, dict) else None
        if tags is None and isinstance(body, dict) and "tags" in body:
            return []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RegistryError(f"no tags array in tags list from {url}", url=url,
                                status=response.status_code)
        return tags

    def _get(self, url):
        """GET a registry URL with a bearer token when one is needed."""
        response = self._request(url, self._valid_token())
        if response.status_code == 401:
            challenge = parse_www_authenticate(response.headers.get("WWW-Authenticate"))
            if not challenge.get("realm"):
                raise RegistryError(f"registry refused {url} (401) without a bearer challenge",
                                    url=url, status=401)
            self._fetch_token(challenge)
            response = self._request(url, self._token)
        if response.status_code != 200:
            self._raise_for(response, url)
        return response

    def _request(self, url, token):
        """Send one GET, turning connection failures into RegistryError."""
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = self._session.get(url, headers=headers, timeout=self.timeout_seconds)
        except requests.RequestException as error:
            raise RegistryError(f"GET {url} failed: {type(error).__name__}",
                                url=url) from error
        self.log.debug("GET %s: %s", url, response.status_code)
        return response

    def _raise_for(self, response, url):
        """Raise the RegistryError that a non-200 answer means."""
        status = response.status_code
        retry_after = None
        if status in (429, 503):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        detail = f": {cut(response.text)}" if response.text and status < 500 else ""
        message = f"GET {url} answered {status}{detail}"
        if retry_after is not None:
            message += f" (retry after {retry_after:.0f} s)"
        raise RegistryError(message, url=url, status=status,
                            retry_after_seconds=retry_after)

    def _valid_token(self):
        """Return the cached token while it has not expired."""
        if self._token and self._clock() < self._token_expires:
            return self._token
        self._token = None
        return None

    def _fetch_token(self, challenge):
        """Get an anonymous token from the challenge's realm and cache it."""
        realm = challenge["realm"]
        params = {"client_id": REGISTRY_CLIENT_ID}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        params["scope"] = challenge.get("scope") or f"repository:{self.repository}:pull"
        try:
            response = self._session.get(realm, params=params, timeout=self.timeout_seconds)
        except requests.RequestException as error:
            raise RegistryError(f"token request to {realm} failed: {type(error).__name__}",
                                url=realm) from error
        self.log.debug("GET %s (token): %s", realm, response.status_code)
        if response.status_code != 200:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise RegistryError(f"token request to {realm} answered {response.status_code}",
                                url=realm, status=response.status_code,
                                retry_after_seconds=retry_after)
        try:
            body = response.json()
        except ValueError as error:
            raise RegistryError(f"invalid JSON from token service {realm}", url=realm,
                                status=200) from error
        token = None
        if isinstance(body, dict):
            token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"no token in answer from {realm}", url=realm, status=200)
        expires_in = body.get("expires_in")
        if not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = REGISTRY_TOKEN_DEFAULT_SECONDS
        self._token = token
        self._token_expires = self._clock() + expires_in


def locate_own_pod(pod_name, pod_namespace, hostname,
                   namespace_path=SERVICE_ACCOUNT_NAMESPACE_PATH):
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


def get_own_image(settings, name, namespace):
    """Ask kubectl for k8svent's own pod; return its container's image, else None."""
    output = run_kubectl(settings, "get", "pod", name, "-n", namespace, "-o", "json")
    try:
        pod = json.loads(output)
    except ValueError:
        raise KubectlError(f"kubectl get pod {name} printed invalid JSON") from None
    return own_image(pod, settings.image) if isinstance(pod, dict) else None


# --- Polling -----------------------------------------------------------------

class Poller:
    """The worker that polls pods on a timer and hands out what is owed."""

    def __init__(self, settings, store, senders):
        self._settings = settings
        self._store = store
        self._senders = senders
        self.stop_event = threading.Event()
        self.last_poll_ok = None
        self.last_progress = time.monotonic()   # for Health: is it stuck?
        self._thread = threading.Thread(target=self.run, name="poller",
                                        daemon=True)

    def poll_once(self):
        """One whole cycle: list, merge, mark deletions, deliver; True if ok."""
        started = time.monotonic()
        store = self._store
        store.begin_poll()
        counts = {"new": 0, "changed": 0, "unhealthy": 0, "deleted": 0}
        seen = 0
        try:
            batch = []
            for item in list_pods(self._settings, self.stop_event):
                if not _looks_like_pod(item):
                    raise KubectlError("kubectl printed a pod list with an item "
                                       "that is not a pod")
                pod = pod_from_item(item)
                pod_bytes = encode_pod(pod)
                batch.append((pod_key(pod), fingerprint(pod_bytes),
                              pod_under_duress(pod), pod_bytes))
                if len(batch) >= _SQL_BATCH:
                    if self.stop_event.is_set():
                        raise PollStopped("stopped while listing pods")
                    self._apply(batch, counts)
                    seen += len(batch)
                    batch = []
            self._apply(batch, counts)
            seen += len(batch)
        except PollStopped:
            log.info("poll stopped before it finished; nothing changed")
            return False
        except KubectlError as exc:
            metrics.polled("failure")
            log.error("poll failed, nothing changed; retrying in %g s: %s",
                      self._settings.retry_interval, exc)
            return False
        counts["deleted"] = store.finish_poll()
        for sender in self._senders:
            sender.offer()
        store.prune()
        self.last_poll_ok = time.time()
        metrics.polled("success", time.monotonic() - started, seen, counts)
        log.info("poll: %d pods seen; sending %d new, %d changed, %d unhealthy, "
                 "%d deleted (%.2f s)", seen, counts["new"], counts["changed"],
                 counts["unhealthy"], counts["deleted"],
                 time.monotonic() - started)
        return True

    def _apply(self, batch, counts):
        """Merge a batch of pods into the store and add up the reasons."""
        for reason, n in self._store.apply_page(batch).items():
            counts[reason] += n
        self.last_progress = time.monotonic()   # for /healthz: not stuck

    def run(self):
        """Poll at once, then every interval (retry interval after a failure)."""
        while not self.stop_event.is_set():
            try:
                ok = self.poll_once()
            except Exception:  # never let the poller die silently
                log.exception("poll crashed; retrying in %g s",
                              self._settings.retry_interval)
                metrics.polled("error")
                ok = False
            self.last_progress = time.monotonic()
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


# --- Upgrades ----------------------------------------------------------------

class Upgrader:
    """Checks the registry for a newer version now and then, in a daemon thread.

    On a newer version it logs it, calls on_newer(version) once and ends; main
    decides how to exit. Errors are logged and retried later; they never end it.
    """

    def __init__(self, client, current_version, interval_seconds,
                 on_newer, logger, *,
                 error_seconds=UPGRADE_ERROR_SECONDS, first_delay_seconds=0.0,
                 rng=None, decide=None):
        self.decide = decide
        self.client = client
        self.current_version = current_version
        self.interval_seconds = interval_seconds
        self.error_seconds = error_seconds
        self.first_delay_seconds = first_delay_seconds
        self.on_newer = on_newer
        self.log = logger
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="k8svent-upgrader",
                                        daemon=True)

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
        """Check, then wait, until stopped or a newer version is found."""
        if self.decide is not None:
            wanted, reason = self.decide()
            if not wanted:
                self.log.info("not checking for newer versions: %s", reason)
                return
        self.log.info("checking %s for a version newer than %s every %.0f s (+-10 %%)",
                      self.client.image, self.current_version, self.interval_seconds)
        delay = self.first_delay_seconds
        while not self._stop.wait(delay):
            delay = self.check_once()
            if delay is None:
                return

    def check_once(self):
        """Do one check; return the seconds to wait before the next, or None when newer."""
        try:
            tags = self.client.list_tags()
            ignored = non_version_tags(tags)
            if ignored:
                self.log.debug("ignoring %d tags that are not semantic versions: %s",
                               len(ignored), cut(" ".join(ignored)))
            newer = newer_version(self.current_version, tags)
        except K8sventError as error:
            return self._after_error(str(error), getattr(error, "retry_after_seconds", None))
        except Exception as error:  # a bug must not end the thread
            self.log.error("upgrade check failed unexpectedly", exc_info=True)
            return self._after_error(type(error).__name__, None)
        if newer is None:
            delay = jittered(self.interval_seconds, self._rng)
            self.log.debug("no version newer than %s among %d tags of %s; next check in %.0f s",
                           self.current_version, len(tags), self.client.image, delay)
            return delay
        self.log.info("newer version %s found (running %s); exiting to upgrade",
                         newer, self.current_version)
        try:
            self.on_newer(newer)
        except Exception:
            self.log.error("upgrade callback failed", exc_info=True)
        return None

    def _after_error(self, reason, retry_after_seconds):
        """Log a failed check in one line and return the delay before the next."""
        delay = self.error_seconds
        if retry_after_seconds is not None:
            delay = max(1.0, retry_after_seconds)
        self.log.warning("upgrade check failed: %s; retrying in %.0f s", reason, delay)
        return delay


# --- Health and metrics ------------------------------------------------------

# The poller counts as stuck when it has made no progress (a page listed, a
# poll finished or failed) for this many intervals plus one kubectl timeout.
STUCK_INTERVALS = 3
POLL_DURATION_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                           10, 30)
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
            "k8svent_polls", "Polls of the pod list by outcome: success, "
            "failure (kubectl failed; nothing changed) or error (a bug).",
            ["outcome"], registry=registry)
        self.poll_duration = prometheus_client.Histogram(
            "k8svent_poll_duration_seconds",
            "Seconds a successful poll took: list, compare, hand out.",
            buckets=POLL_DURATION_BUCKETS_SECONDS, registry=registry)
        self.pods_seen = prometheus_client.Gauge(
            "k8svent_pods_seen", "Pods listed by the last successful poll.",
            registry=registry)
        self.pods_selected = prometheus_client.Counter(
            "k8svent_pods_selected", "Pods chosen to send, by reason: new, "
            "changed, unhealthy or deleted.", ["reason"], registry=registry)
        self.deliveries = prometheus_client.Counter(
            "k8svent_deliveries", "Deliveries by endpoint and outcome: success, "
            "retry (an attempt failed, another follows), rejected (a 3xx or "
            "4xx, not retried) or failed (retry budget spent).",
            ["endpoint", "outcome"], registry=registry)
        self.latency = prometheus_client.Histogram(
            "k8svent_delivery_latency_seconds",
            "Seconds from sending a POST to its answer (or error), by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS_SECONDS, registry=registry)
        self.last_poll = prometheus_client.Gauge(
            "k8svent_last_successful_poll_timestamp_seconds",
            "Unix time at which the last successful poll finished.",
            registry=registry)
        self.newer_version = prometheus_client.Gauge(
            "k8svent_newer_version_available",
            "1 when the registry has a newer version (its label), else 0.",
            ["version"], registry=registry)
        self.build = prometheus_client.Info(
            "k8svent_build", "The running version of k8svent.",
            registry=registry)
        registry.register(_OwedCollector(self))
        self._lock = threading.Lock()
        self.senders = ()
        for outcome in POLL_OUTCOMES:
            self.polls.labels(outcome)
        for reason in SELECT_REASONS:
            self.pods_selected.labels(reason)
        self.set_newer_version(None)

    def watch(self, senders, running_version):
        """Report the build and these senders' endpoints from now on."""
        self.build.info({"version": running_version})
        self.senders = tuple(senders)
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
            self.pods_selected.labels(reason).inc(count)
        self.last_poll.set_to_current_time()

    def delivered(self, endpoint, outcome):
        """Count one delivery outcome (or retried attempt) for an endpoint."""
        self.deliveries.labels(endpoint, outcome).inc()

    def posted(self, endpoint, seconds):
        """Observe how long one POST to an endpoint took."""
        self.latency.labels(endpoint).observe(seconds)

    def set_newer_version(self, newer):
        """Say which newer version the registry has, or None for none."""
        with self._lock:
            self.newer_version.clear()
            self.newer_version.labels(newer or "").set(1 if newer else 0)


class _OwedCollector:
    """k8svent_deliveries_owed, read from the senders at each scrape."""

    NAME = "k8svent_deliveries_owed"
    HELP = "Pods queued or in flight to an endpoint, by endpoint."

    def __init__(self, metrics):
        self._metrics = metrics

    def describe(self):
        yield prometheus_client.core.GaugeMetricFamily(
            self.NAME, self.HELP, labels=["endpoint"])

    def collect(self):
        family = prometheus_client.core.GaugeMetricFamily(
            self.NAME, self.HELP, labels=["endpoint"])
        owed = {}
        # URLs on one scheme://host:port share a label, so they share a series.
        for sender in self._metrics.senders:
            label = sender.endpoint.label
            owed[label] = owed.get(label, 0) + sender.owed()
        for label, count in owed.items():
            family.add_metric([label], count)
        yield family


metrics = Metrics()


def stuck_after_seconds(settings):
    """How long the poller may make no progress before it counts as stuck."""
    return (STUCK_INTERVALS * max(settings.interval, settings.retry_interval)
            + settings.kubectl_timeout)


def poller_trouble(alive, idle_seconds, limit_seconds):
    """Why the poller is not healthy, or None if it is."""
    if not alive:
        return "the poller thread is not running"
    if idle_seconds > limit_seconds:
        return (f"the poller has made no progress for {idle_seconds:.0f} s "
                f"(limit {limit_seconds:g} s)")
    return None


class Health:
    """Liveness and readiness of a Poller, for the probes."""

    def __init__(self, poller, settings, clock=time.monotonic):
        self._poller = poller
        self._limit = stuck_after_seconds(settings)
        self._clock = clock

    def live(self):
        """(True, text) while the poller runs and progresses, else (False, why)."""
        trouble = poller_trouble(self._poller.is_alive(),
                                 self._clock() - self._poller.last_progress,
                                 self._limit)
        return trouble is None, trouble or "ok"

    def ready(self):
        """(True, text) once a poll has succeeded, else (False, why)."""
        if self._poller.last_poll_ok is None:
            return False, "no successful poll yet"
        return True, "ok"


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """GET /healthz, /readyz and /metrics."""

    def version_string(self):
        return f"k8svent/{version()}"

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = prometheus_client.exposition.choose_encoder(
                self.headers.get("Accept", ""))
            self._send(200, encoder(metrics.registry), content_type)
        elif path in ("/healthz", "/readyz"):
            health = self.server.health
            ok, text = health.live() if path == "/healthz" else health.ready()
            self._send(200 if ok else 503, f"{text}\n".encode(),
                       "text/plain; charset=utf-8")
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
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Probes and scrapers hang up early; that is no reason for a traceback.
        log.debug("status server: request from %s failed", client_address[0],
                  exc_info=True)


class _StatusHTTPServer6(_StatusHTTPServer):
    address_family = socket.AF_INET6


class StatusServer:
    """The --listen server: /healthz, /readyz, /metrics, in a daemon thread."""

    def __init__(self, address):
        """Bind the address at once (raises OSError), serve after start()."""
        host, port = address
        kind = _StatusHTTPServer6 if ":" in host else _StatusHTTPServer
        self._server = kind((host, port), _StatusHandler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="status", daemon=True)

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


# --- Main --------------------------------------------------------------------

def version():
    """The running version: K8SVENT_VERSION (stamped by the image) or ours."""
    return os.environ.get("K8SVENT_VERSION") or __version__


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, with the pod and endpoint where they apply."""

    FIELDS = ("pod", "endpoint", "status", "correlation_id")

    def format(self, record):
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
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


def configure_logging(settings):
    """Send k8svent's log to stderr in the chosen level and format."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(message)s"))
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

    status_server = None
    if settings.listen and not settings.once:
        try:
            status_server = StatusServer(settings.listen)
        except OSError as exc:
            print(f"k8svent: error: cannot listen on {settings.listen[0]}:"
                  f"{settings.listen[1]}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    configure_logging(settings)
    if settings.listen and settings.once:
        log.warning("--listen is not served with --once")
    try:
        store = Store(settings.state, scope=state_scope(settings))
    except StateError as exc:
        if status_server:
            status_server.stop()
        print(f"k8svent: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        if status_server:
            status_server.stop()
        print(f"k8svent: error: cannot open state file {settings.state!r}: {exc}",
              file=sys.stderr)
        return 2

    stop = threading.Event()
    endpoints = [StdoutEndpoint()] if settings.dry_run else \
        [Endpoint(url, settings) for url in settings.urls]
    store.set_endpoints([e.id for e in endpoints])
    senders = [Sender(e, store, settings, stop) for e in endpoints]
    poller = Poller(settings, store, senders)
    metrics.watch(senders, version())
    log.info("k8svent %s starting: %s, webhooks %s", version(),
             f"namespace {settings.namespace}" if settings.namespace
             else "all namespaces", ", ".join(e.shown for e in endpoints))
    if status_server:
        status_server.start(Health(poller, settings))
        log.info("listening on %s", status_server.url)

    def on_signal(signum, frame):
        log.info("received %s; stopping", signal.Signals(signum).name)
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
            version(), upgrade_interval_seconds(version(), settings.upgrade_interval),
            on_newer, log, decide=lambda: upgrade_decision_here(settings, environ))

    previous = {s: signal.signal(s, on_signal)
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if settings.once:
            ok = poller.poll_once()
            for sender in senders:
                sender.wait_idle()
            failed = sum(s.failed for s in senders) + \
                sum(s.unfinished() for s in senders)
            status = 0 if ok and not failed else 1
            if failed:
                log.error("%d deliveries failed", failed)
        else:
            poller.start()
            if upgrader is not None:
                upgrader.start()
            while poller.is_alive():
                poller.join(0.5)
            if upgrader is not None:
                upgrader.stop()
            status = 0
        return _shut_down(senders, store, stop, status)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if status_server:
            status_server.stop()


def upgrade_decision_here(settings, environ):
    """Whether to check for newer versions where we run, and why."""
    version_set = bool(environ.get("K8SVENT_VERSION"))
    image = None
    if settings.upgrade == "auto" and version_set:
        located = locate_own_pod(environ.get("POD_NAME"),
                                 environ.get("POD_NAMESPACE"), socket.gethostname())
        if located:
            try:
                image = get_own_image(settings, *located)
            except KubectlError as exc:
                log.warning("cannot look up own pod %s/%s: %s", located[1],
                            located[0], exc)
    return upgrade_decision(settings.upgrade, version_set, image)


def _shut_down(senders, store, stop, status):
    """Let deliveries in flight finish (bounded), then close; return status."""
    deadline = time.monotonic() + DRAIN_SECONDS
    stop.set()  # no new deliveries, no more retries
    drained = all(s.wait_idle(max(0.0, deadline - time.monotonic()))
                  for s in senders)
    for sender in senders:
        sender.close()
    if not drained:
        store.close()
        _exit_now(status, f"deliveries still in flight after {DRAIN_SECONDS} s")
    store.close()
    log.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
