"""DRAFT of k8svent.py's "Versions", "Registry" and "Upgrader" sections.

Merge: the imports and constants go to k8svent.py's blocks of the same name,
the two exception classes replace nothing (delete K8sventError here, keep
RegistryError), and the three sections are pasted after the core's pure
logic, its I/O and before main() respectively.
"""

import email.utils
import json
import logging
import random
import re
import threading
import time
import urllib.parse
from pathlib import Path

import requests
import semver
import sh

# --- constants (merge into the constants block) ---------------------------

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
KUBECTL_TIMEOUT_SECONDS = 30
FOREIGN_TEXT_CHARS = 200


# --- exceptions (K8sventError is the core's: delete this copy at merge) ----

class K8sventError(Exception):
    """Base of every error k8svent reports."""


class RegistryError(K8sventError):
    """A registry or token request failed; never holds a token."""

    def __init__(self, message, url=None, status=None, retry_after_seconds=None):
        super().__init__(message)
        self.url = url
        self.status = status
        self.retry_after_seconds = retry_after_seconds


# ---------------------------------------------------------------------------
# Versions (pure)
# ---------------------------------------------------------------------------

# Repository path components, as the OCI distribution spec defines them.
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
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


def upgrade_wanted(mode, version_env_set, own_image_ref):
    """Tell whether to check the registry for newer versions (see upgrade_decision)."""
    return upgrade_decision(mode, version_env_set, own_image_ref)[0]


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


def parse_retry_after(value, now):
    """Return the seconds a Retry-After value asks to wait (delta or HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def cut(text, limit=FOREIGN_TEXT_CHARS):
    """Cut foreign text to a bounded, single-line length for logs and errors."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# Registry (I/O)
# ---------------------------------------------------------------------------

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
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
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
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
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


def get_own_image(kubectl, name, namespace, image_repo,
                  timeout_seconds=KUBECTL_TIMEOUT_SECONDS):
    """Ask kubectl for k8svent's own pod and return its container's image, else None."""
    command = sh.Command(kubectl)
    try:
        output = command("get", "pod", name, "-n", namespace, "-o", "json",
                         _timeout=timeout_seconds, _tty_out=False)
    except (sh.ErrorReturnCode, sh.TimeoutException, sh.CommandNotFound, OSError) as error:
        stderr = getattr(error, "stderr", b"") or b""
        raise K8sventError(
            f"kubectl get pod {name} -n {namespace} failed: "
            f"{cut(stderr.decode('utf-8', 'replace') or type(error).__name__)}"
        ) from error
    try:
        pod = json.loads(str(output))
    except ValueError as error:
        raise K8sventError(f"kubectl get pod {name} printed invalid JSON") from error
    return own_image(pod, image_repo) if isinstance(pod, dict) else None


# ---------------------------------------------------------------------------
# Upgrader (long-lived thread)
# ---------------------------------------------------------------------------

class Upgrader:
    """Checks the registry for a newer version now and then, in a daemon thread.

    On a newer version it logs it, calls on_newer(version) once and ends; main
    decides how to exit. Errors are logged and retried later; they never end it.
    """

    def __init__(self, client, current_version, interval_seconds,
                 on_newer, logger, *,
                 error_seconds=UPGRADE_ERROR_SECONDS, first_delay_seconds=0.0,
                 rng=None):
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
