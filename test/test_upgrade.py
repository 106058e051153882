"""Tests of the Versions, Registry and Upgrader sections (issue: stay up to date)."""

import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import requests
import semver

import k8svent
from test import token_server
from test.fake_registry import FakeRegistry

# --- versions -------------------------------------------------------------

ORIGINAL_TAGS = "0.1.0 0.2.0 0.3.0 0.4.0 0.8.0 0.12.0 1.42.12 2.12.22 latest".split()
NOT_SEMVER = "should latest x.y.z 4.5.6.7 1.02.3 1.2.3-x.01 x1.2.3 3.2.1r".split()


@pytest.mark.parametrize(
    "current, tags, expected",
    [
        # the original's vectors (SPEC section 4)
        ("2.12.21", ORIGINAL_TAGS, "2.12.22"),
        ("2.12.23", ORIGINAL_TAGS, None),
        ("0.14.0", ["v0.15.0"], "v0.15.0"),
        ("0.1.0", NOT_SEMVER, None),
        ("0.1.0", NOT_SEMVER + ["0.1.1"], "0.1.1"),
        # build metadata is ignored
        ("1.2.3+build.1", ["1.2.3+build.2", "1.2.3"], None),
        ("1.2.3", ["1.2.4+sha.abc"], "1.2.4+sha.abc"),
        # a release ignores prereleases, a prerelease may move to a release
        ("1.0.0", ["1.1.0-rc.1", "2.0.0-alpha"], None),
        ("1.0.0", ["1.1.0-rc.1", "1.0.1"], "1.0.1"),
        ("1.1.0-rc.1", ["1.1.0"], "1.1.0"),
        ("1.1.0-rc.1", ["1.1.0-rc.2", "1.0.9"], "1.1.0-rc.2"),
        ("1.1.0-rc.2", ["1.1.0-rc.10"], "1.1.0-rc.10"),
        ("2.12.23-dark-side.2017", ["2.12.23"], "2.12.23"),
        ("1.2.3", ["1.2.3-1"], None),
        ("v1.0.0", ["1.0.0", "v1.0.0"], None),
        ("1.0.0", [], None),
    ],
)
def test_newer_version(current, tags, expected):
    assert k8svent.newer_version(current, tags) == expected


@pytest.mark.parametrize("tag", NOT_SEMVER + ["", "v", "V1.2.3", "1.2.3\n", " 1.2.3", "vv1.2.3"])
def test_parse_version_rejects(tag):
    assert k8svent.parse_version(tag) is None


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("1.2.3", "1.2.3"),
        ("v0.15.0", "0.15.0"),
        ("2.12.23-dark-side.2017", "2.12.23-dark-side.2017"),
        ("1.0.0-alpha+001", "1.0.0-alpha+001"),
        ("0.0.0", "0.0.0"),
    ],
)
def test_parse_version(tag, expected):
    assert str(k8svent.parse_version(tag)) == expected


def test_prerelease_precedence():
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
    ]
    versions = [k8svent.parse_version(tag) for tag in ordered]
    assert all(a < b for a, b in zip(versions, versions[1:], strict=False))
    for older, newer in zip(ordered, ordered[1:], strict=False):
        assert k8svent.newer_version(older, [newer]) == newer
        assert k8svent.newer_version(newer, [older]) is None


def test_newer_version_rejects_bad_current():
    with pytest.raises(ValueError):
        k8svent.newer_version("1.02.3", ["1.2.3"])


def test_is_release():
    assert k8svent.is_release(semver.Version.parse("1.0.0+b"))
    assert not k8svent.is_release(semver.Version.parse("1.0.0-rc.1"))


@pytest.mark.parametrize(
    "version, configured, expected",
    [
        ("1.0.0", None, 86400),
        ("1.0.0-rc.1", None, 14400),
        ("1.0.0", 60, 60),
        ("1.0.0-rc.1", 0.5, 0.5),
    ],
)
def test_upgrade_interval_seconds(version, configured, expected):
    assert k8svent.upgrade_interval_seconds(version, configured) == expected


def test_jittered_stays_within_ten_percent():
    rng = random.Random(7)
    values = [k8svent.jittered(1000, rng) for _ in range(1000)]
    assert all(900 <= v <= 1100 for v in values)
    assert max(values) - min(values) > 150


# --- images, channels and policy -------------------------------------------


@pytest.mark.parametrize(
    "image, expected",
    [
        ("docker.io/atomist/k8svent", ("https://registry-1.docker.io", "atomist/k8svent")),
        ("atomist/k8svent", ("https://registry-1.docker.io", "atomist/k8svent")),
        ("docker.io/nginx", ("https://registry-1.docker.io", "library/nginx")),
        ("nginx", ("https://registry-1.docker.io", "library/nginx")),
        ("index.docker.io/atomist/k8svent", ("https://registry-1.docker.io", "atomist/k8svent")),
        ("ghcr.io/atomist/k8svent", ("https://ghcr.io", "atomist/k8svent")),
        ("quay.io/org/team/k8svent", ("https://quay.io", "org/team/k8svent")),
        (
            "mirror.example.com:5000/atomist/k8svent",
            ("https://mirror.example.com:5000", "atomist/k8svent"),
        ),
        ("127.0.0.1:5000/atomist/k8svent", ("http://127.0.0.1:5000", "atomist/k8svent")),
        ("localhost:5000/k8svent", ("http://localhost:5000", "k8svent")),
        ("localhost/k8svent", ("http://localhost", "k8svent")),
        ("[::1]:5000/atomist/k8svent", ("http://[::1]:5000", "atomist/k8svent")),
        ("10.0.0.1:5000/atomist/k8svent", ("https://10.0.0.1:5000", "atomist/k8svent")),
        ("my-registry.local/a__b/c-d.e", ("https://my-registry.local", "a__b/c-d.e")),
    ],
)
def test_parse_image(image, expected):
    assert k8svent.parse_image(image) == expected


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/atomist/k8svent:latest",
        "atomist/k8svent@sha256:" + "0" * 64,
        "ghcr.io/Atomist/k8svent",
        "",
        "docker.io/",
        "ghcr.io//x",
        "a/-b",
        "http://ghcr.io/a",
    ],
)
def test_parse_image_rejects(image):
    with pytest.raises(ValueError):
        k8svent.parse_image(image)


@pytest.mark.parametrize(
    "image_ref, expected",
    [
        ("atomist/k8svent", "channel"),
        ("atomist/k8svent:latest", "channel"),
        ("docker.io/atomist/k8svent:next", "channel"),
        ("127.0.0.1:5000/atomist/k8svent", "channel"),
        ("127.0.0.1:5000/atomist/k8svent:next", "channel"),
        ("atomist/k8svent:0.5.2", "pinned"),
        ("atomist/k8svent:v1.0.0", "pinned"),
        ("atomist/k8svent:stable", "pinned"),
        ("atomist/k8svent@sha256:" + "a" * 64, "pinned"),
        ("atomist/k8svent:latest@sha256:" + "a" * 64, "pinned"),
    ],
)
def test_image_channel(image_ref, expected):
    assert k8svent.image_channel(image_ref) == expected


@pytest.mark.parametrize(
    "mode, version_env_set, own_image, expected",
    [
        ("never", True, "atomist/k8svent:latest", False),
        ("never", False, None, False),
        ("always", False, None, True),
        ("always", True, "atomist/k8svent:1.0.0", True),
        ("auto", True, "atomist/k8svent:latest", True),
        ("auto", True, "atomist/k8svent:next", True),
        ("auto", True, "atomist/k8svent", True),
        ("auto", True, "atomist/k8svent:1.0.0", False),
        ("auto", True, "atomist/k8svent@sha256:" + "b" * 64, False),
        ("auto", True, None, False),
        ("auto", False, "atomist/k8svent:latest", False),
        ("auto", False, None, False),
    ],
)
def test_upgrade_decision(mode, version_env_set, own_image, expected):
    assert k8svent.upgrade_decision(mode, version_env_set, own_image)[0] is expected


@pytest.mark.parametrize(
    "own_image, words",
    [
        ("atomist/k8svent:1.0.0", "image atomist/k8svent:1.0.0 is pinned"),
        (None, "not found"),
        ("atomist/k8svent:next", "follows a channel"),
    ],
)
def test_upgrade_decision_says_why(own_image, words):
    assert words in k8svent.upgrade_decision("auto", True, own_image)[1]


def test_upgrade_decision_rejects_unknown_mode():
    with pytest.raises(ValueError):
        k8svent.upgrade_decision("sometimes", True, "atomist/k8svent")


def _pod(*containers):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "n"},
        "spec": {"containers": [{"name": n, "image": i} for n, i in containers]},
    }


@pytest.mark.parametrize(
    "pod, expected",
    [
        (
            _pod(("sidecar", "nginx:1"), ("k8svent", "mirror.local/k8svent:next")),
            "mirror.local/k8svent:next",
        ),
        (_pod(("sidecar", "nginx:1"), ("main", "atomist/k8svent:0.3.0")), "atomist/k8svent:0.3.0"),
        (
            _pod(("main", "docker.io/atomist/k8svent@sha256:" + "c" * 64)),
            "docker.io/atomist/k8svent@sha256:" + "c" * 64,
        ),
        (_pod(("sidecar", "nginx:1"), ("other", "ghcr.io/atomist/k8svent:latest")), None),
        (_pod(), None),
        ({}, None),
    ],
)
def test_own_image(pod, expected):
    assert k8svent.own_image(pod, "docker.io/atomist/k8svent") == expected


def test_locate_own_pod(tmp_path):
    namespace_file = tmp_path / "namespace"
    assert k8svent.locate_own_pod("p", "ns", "host", namespace_file) == ("p", "ns")
    assert k8svent.locate_own_pod(None, None, "host", namespace_file) is None
    namespace_file.write_text("k8svent\n")
    assert k8svent.locate_own_pod(None, None, "host", namespace_file) == ("host", "k8svent")
    assert k8svent.locate_own_pod("p", None, "host", namespace_file) == ("p", "k8svent")


# --- header parsing ---------------------------------------------------------


@pytest.mark.parametrize(
    "header, expected",
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:atomist/k8svent:pull"',
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:atomist/k8svent:pull",
            },
        ),
        (
            'bearer Realm="https://ghcr.io/token", Service=ghcr.io , scope="repository:a/b:pull"',
            {
                "realm": "https://ghcr.io/token",
                "service": "ghcr.io",
                "scope": "repository:a/b:pull",
            },
        ),
        (
            'Basic realm="basic", Bearer realm="https://a/t",error="invalid_token"',
            {"realm": "https://a/t", "error": "invalid_token"},
        ),
        (
            'Bearer realm="https://a/t?x=1,2",scope="repository:a:pull,push"',
            {"realm": "https://a/t?x=1,2", "scope": "repository:a:pull,push"},
        ),
        ('Bearer realm="quote\\"d"', {"realm": 'quote"d'}),
        ('Negotiate abc==, Bearer realm="r"', {"realm": "r"}),
        ('Basic realm="registry"', {}),
        ("", {}),
        (None, {}),
        ("Bearer", {}),
    ],
)
def test_parse_www_authenticate(header, expected):
    assert k8svent.parse_www_authenticate(header) == expected


BASE = "https://r.example/v2/a/b/tags/list?n=2"


@pytest.mark.parametrize(
    "header, expected",
    [
        (
            '</v2/a/b/tags/list?n=2&last=b>; rel="next"',
            "https://r.example/v2/a/b/tags/list?n=2&last=b",
        ),
        (
            "<https://other.example/v2/a/b/tags/list?last=c>; rel=next",
            "https://other.example/v2/a/b/tags/list?last=c",
        ),
        (
            '<https://r.example/prev>; rel="prev", <?last=z>; type="x"; rel="last next"',
            "https://r.example/v2/a/b/tags/list?last=z",
        ),
        ('<https://r.example/prev>; rel="prev"', None),
        ("", None),
        (None, None),
    ],
)
def test_parse_link_next(header, expected):
    assert k8svent.parse_link_next(header, BASE) == expected


@pytest.mark.parametrize(
    "value",
    [
        "99999999999",
        "9" * 400,
        "Fri, 31 Dec 9999 23:59:59 GMT",
    ],
)
def test_retry_after_is_clamped_to_a_day(value):
    assert k8svent.retry_after_seconds(value, 1445412420.0) == 86400


@pytest.mark.parametrize(
    "value, expected",
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value, expected):
    now = 1445412420.0  # Wed, 21 Oct 2015 07:27:00 GMT
    assert k8svent.retry_after_seconds(value, now) == expected


# --- registry client against a fake registry --------------------------------


@pytest.fixture
def fake_registry():
    registry = FakeRegistry().start()
    yield registry
    registry.close()


def _client(registry, **kwargs):
    return k8svent.RegistryClient(registry.image, timeout_seconds=5, **kwargs)


@pytest.mark.parametrize("absolute_links", [False, True])
def test_list_tags_follows_link_pages(fake_registry, absolute_links):
    fake_registry.tags = ["0.1.0", "0.2.0", "0.3.0", "latest", "v0.4.0"]
    fake_registry.page_size = 2
    fake_registry.absolute_links = absolute_links
    tags = _client(fake_registry).list_tags()
    assert sorted(tags) == sorted(fake_registry.tags)
    requests_made = fake_registry.tag_requests()
    assert len(requests_made) == 3
    assert requests_made[1]["query"]["last"] == ["0.2.0"]


def test_list_tags_token_flow_and_cache(fake_registry, caplog):
    caplog.set_level(logging.DEBUG, logger="k8svent")
    fake_registry.tags = ["1.0.0", "1.1.0", "1.2.0"]
    fake_registry.page_size = 2
    fake_registry.auth = True
    fake_registry.token_field = "access_token"
    now = [1000.0]
    client = _client(fake_registry, clock=lambda: now[0], user_agent="k8svent/9.9.9")
    assert sorted(client.list_tags()) == ["1.0.0", "1.1.0", "1.2.0"]
    assert client.list_tags()
    (token_request,) = fake_registry.token_requests()
    assert token_request["query"] == {
        "client_id": ["k8svent"],
        "service": ["fake-registry"],
        "scope": ["repository:atomist/k8svent:pull"],
    }
    assert "Authorization" not in token_request["headers"]
    assert token_request["headers"]["User-Agent"] == "k8svent/9.9.9"
    # the default lifetime is 60 s: a later check fetches a new token
    now[0] += 61
    assert client.list_tags()
    assert len(fake_registry.token_requests()) == 2
    for token in fake_registry.tokens:
        assert token not in caplog.text


def test_list_tags_keeps_token_until_expires_in(fake_registry):
    fake_registry.tags = ["1.0.0"]
    fake_registry.auth = True
    fake_registry.expires_in = 300
    now = [0.0]
    client = _client(fake_registry, clock=lambda: now[0])
    client.list_tags()
    now[0] += 299
    client.list_tags()
    assert len(fake_registry.token_requests()) == 1
    now[0] += 2
    client.list_tags()
    assert len(fake_registry.token_requests()) == 2


def test_list_tags_refetches_a_rejected_token(fake_registry):
    fake_registry.tags = ["1.0.0"]
    fake_registry.auth = True
    fake_registry.expires_in = 300
    client = _client(fake_registry)
    client.list_tags()
    fake_registry.tokens.clear()  # the registry forgets it, as after a key rotation
    assert client.list_tags() == ["1.0.0"]
    assert len(fake_registry.token_requests()) == 2


@pytest.mark.parametrize(
    "setup, status, retry_after, words",
    [
        ({"mode": "status", "status": 500}, 500, None, "500"),
        ({"mode": "status", "status": 503}, 503, None, "503"),
        ({"mode": "status", "status": 429, "headers": {"Retry-After": "120"}}, 429, 120.0, "429"),
        ({"mode": "status", "status": 404}, 404, None, "404"),
        ({"mode": "garbage"}, 200, None, "invalid JSON"),
        ({"mode": "no-tags"}, None, None, "no tags"),
        ({"mode": "null-tags"}, None, None, "no tags"),
    ],
)
def test_list_tags_errors(fake_registry, setup, status, retry_after, words):
    for name, value in setup.items():
        setattr(fake_registry, name, value)
    with pytest.raises(k8svent.RegistryError) as caught:
        _client(fake_registry).list_tags()
    assert caught.value.status == status
    assert caught.value.retry_after_seconds == retry_after
    assert words in str(caught.value)
    assert caught.value.url.startswith(f"http://{fake_registry.address}/v2/")


def test_list_tags_registry_down():
    registry = FakeRegistry().start()
    image = registry.image
    registry.close()
    with pytest.raises(k8svent.RegistryError) as caught:
        k8svent.RegistryClient(image, timeout_seconds=5).list_tags()
    assert "ConnectionError" in str(caught.value)
    assert caught.value.status is None


def test_list_tags_401_without_challenge(fake_registry):
    fake_registry.mode = "status"
    fake_registry.status = 401
    with pytest.raises(k8svent.RegistryError, match="without a bearer challenge"):
        _client(fake_registry).list_tags()


# --- the registry as an attack surface --------------------------------------


@pytest.fixture
def other_registry():
    registry = FakeRegistry().start()
    yield registry
    registry.close()


def test_next_link_to_another_origin_is_not_followed(fake_registry, other_registry):
    fake_registry.tags = other_registry.tags = ["1.0.0", "2.0.0"]
    fake_registry.page_size = 1
    fake_registry.auth = True
    fake_registry.link_origin = f"http://{other_registry.address}"
    with pytest.raises(k8svent.RegistryError, match="links to another origin"):
        _client(fake_registry).list_tags()
    assert other_registry.requests == []


def test_redirects_to_another_origin_are_not_followed(fake_registry, other_registry):
    other_registry.tags = ["9.0.0"]
    fake_registry.mode = "redirect"
    fake_registry.location = f"http://{other_registry.address}/v2/atomist/k8svent/tags/list"
    with pytest.raises(k8svent.RegistryError, match="redirects to another origin"):
        _client(fake_registry).list_tags()
    assert other_registry.requests == []


def test_redirects_on_the_same_origin_are_followed(fake_registry):
    fake_registry.tags = ["1.0.0"]
    fake_registry.mode = "redirect"
    fake_registry.location = "/v2/atomist/k8svent/tags/list?again=1"
    client = _client(fake_registry)
    with pytest.raises(k8svent.RegistryError, match="redirects more than 5 times"):
        client.list_tags()
    assert len(fake_registry.tag_requests()) == 6


@pytest.mark.parametrize(
    "realm, words",
    [
        ("http://registry.example/token", "not an https URL"),
        ("ftp://127.0.0.1/token", "not an https URL"),
        ("/token", "not an https URL"),
    ],
)
def test_token_realm_only_over_https(fake_registry, realm, words):
    fake_registry.tags = ["1.0.0"]
    fake_registry.auth = True
    fake_registry.realm = realm
    with pytest.raises(k8svent.RegistryError, match=words):
        _client(fake_registry).list_tags()
    assert fake_registry.token_requests() == []


def test_netrc_credentials_are_never_sent(fake_registry, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password NETRCSECRET\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    fake_registry.tags = ["1.0.0"]
    fake_registry.auth = True
    assert _client(fake_registry).list_tags() == ["1.0.0"]
    for request in fake_registry.requests:
        assert "Basic" not in request["headers"].get("Authorization", "")


def test_proxies_from_the_environment_still_apply(fake_registry, monkeypatch):
    fake_registry.tags = ["1.0.0"]
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(k8svent.RegistryError, match="ProxyError|ConnectionError"):
        _client(fake_registry).list_tags()
    assert fake_registry.requests == []


def test_a_huge_page_is_refused(fake_registry):
    fake_registry.mode = "huge"
    with pytest.raises(k8svent.RegistryError, match="more than 1048576 bytes"):
        _client(fake_registry).list_tags()


def test_page_count_is_capped(fake_registry):
    fake_registry.tags = [f"0.0.{i}" for i in range(150)]
    fake_registry.page_size = 1
    with pytest.raises(k8svent.RegistryError, match="more than 100 pages"):
        _client(fake_registry).list_tags()
    assert len(fake_registry.tag_requests()) == 100


def test_registry_bodies_are_logged_cut_and_on_one_line(fake_registry):
    fake_registry.mode = "status"
    fake_registry.status = 404
    fake_registry.body = b"nope\n2030-01-01 00:00:00,000 ERROR forged\x1b[2J" + b"x" * 5000
    with pytest.raises(k8svent.RegistryError) as caught:
        _client(fake_registry).list_tags()
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 600
    assert "forged\\x1b[2J" in message


def test_a_huge_retry_after_waits_a_day(fake_registry, mocker):
    fake_registry.mode = "status"
    fake_registry.status = 429
    fake_registry.headers = {"Retry-After": "99999999999"}
    upgrader, calls, recorder = _upgrader(fake_registry, "1.0.0", mocker, 1)
    upgrader.start()
    upgrader.join(10)
    assert not upgrader.is_alive()
    assert recorder.delays == [0.0, 86400]


# --- upgrader ---------------------------------------------------------------


class RecordedWaits:
    """Replaces an Upgrader's Event.wait: records each delay, stops after `count` waits."""

    def __init__(self, upgrader, count):
        self.delays = []
        self.count = count
        self._real_wait = upgrader._stop.wait
        self._stop = upgrader._stop

    def __call__(self, timeout=None):
        self.delays.append(timeout)
        if len(self.delays) > self.count:
            self._stop.set()
        return self._real_wait(0)


def _upgrader(registry, current, mocker, waits, **kwargs):
    calls = []
    upgrader = k8svent.Upgrader(
        _client(registry),
        current,
        1000,
        calls.append,
        logging.getLogger("k8svent"),
        rng=random.Random(1),
        **kwargs,
    )
    recorder = RecordedWaits(upgrader, waits)
    mocker.patch.object(upgrader._stop, "wait", side_effect=recorder)
    return upgrader, calls, recorder


def test_upgrader_calls_on_newer_once_and_ends(fake_registry, mocker, caplog):
    caplog.set_level(logging.INFO, logger="k8svent")
    fake_registry.tags = ["1.0.0", "1.1.0", "1.2.0-rc.1", "latest"]
    upgrader, calls, recorder = _upgrader(fake_registry, "1.0.0", mocker, 5)
    upgrader.start()
    upgrader.join(10)
    assert not upgrader.is_alive()
    assert calls == ["1.1.0"]
    assert recorder.delays == [0.0]
    assert "newer version 1.1.0 found (running 1.0.0); exiting to upgrade" in caplog.text


def test_upgrader_waits_jittered_interval_when_up_to_date(fake_registry, mocker):
    fake_registry.tags = ["0.9.0", "1.0.0", "2.0.0-rc.1"]
    upgrader, calls, recorder = _upgrader(fake_registry, "1.0.0", mocker, 3)
    upgrader.start()
    upgrader.join(10)
    assert calls == []
    assert recorder.delays[0] == 0.0
    assert all(900 <= d <= 1100 for d in recorder.delays[1:])
    assert len(fake_registry.tag_requests()) == 3


@pytest.mark.parametrize(
    "setup, delay",
    [
        ({"mode": "status", "status": 500}, 3600),
        ({"mode": "garbage"}, 3600),
        ({"mode": "no-tags"}, 3600),
        ({"mode": "status", "status": 429, "headers": {"Retry-After": "120"}}, 120),
    ],
)
def test_upgrader_survives_registry_errors(fake_registry, mocker, caplog, setup, delay):
    for name, value in setup.items():
        setattr(fake_registry, name, value)
    fake_registry.tags = ["9.9.9"]
    upgrader, calls, recorder = _upgrader(fake_registry, "1.0.0", mocker, 2)
    upgrader.start()
    upgrader.join(10)
    assert not upgrader.is_alive()
    assert calls == []
    assert recorder.delays == [0.0, delay, delay]
    assert len(fake_registry.tag_requests()) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(
        r.getMessage().startswith("upgrade check failed: ")
        and r.exc_info is None
        and "\n" not in r.getMessage()
        for r in warnings
    )


def test_upgrader_recovers_after_error(fake_registry, mocker):
    fake_registry.mode = "status"
    fake_registry.tags = ["1.0.1"]
    upgrader, calls, recorder = _upgrader(fake_registry, "1.0.0", mocker, 5)

    def heal_then_wait(timeout=None):
        if recorder.delays:
            fake_registry.mode = "ok"
        return recorder(timeout)

    upgrader._stop.wait.side_effect = heal_then_wait
    upgrader.start()
    upgrader.join(10)
    assert calls == ["1.0.1"]
    assert recorder.delays == [0.0, 3600]


def test_upgrader_survives_a_bug(mocker, caplog):
    client = mocker.Mock(image="x")
    client.list_tags.side_effect = [KeyError("boom"), ["2.0.0"]]
    calls = []
    upgrader = k8svent.Upgrader(client, "1.0.0", 1000, calls.append, logging.getLogger("k8svent"))
    assert upgrader.check_once() == 3600
    assert upgrader.check_once() is None
    assert calls == ["2.0.0"]


def test_upgrader_stop_ends_a_long_wait(fake_registry):
    fake_registry.tags = ["1.0.0"]
    upgrader = k8svent.Upgrader(
        _client(fake_registry), "1.0.0", 86400, lambda v: None, logging.getLogger("k8svent")
    )
    upgrader.start()
    deadline = time.monotonic() + 10
    while not fake_registry.tag_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    upgrader.stop()
    upgrader.join(5)
    assert not upgrader.is_alive()


# --- a real registry: Debian's docker-registry with token auth --------------

REAL_TAGS = ["0.1.0", "0.14.0", "v0.15.0", "1.0.0-rc.1", "latest", "next", "not-a-version"]


def _need(program):
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs it with apt-get)")
        pytest.skip(f"{program} is not installed (apt-get install docker-registry skopeo)")
    return path


def _listening_ports(pid):
    """Return the TCP ports a process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _write_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _write_oci_layout(layout):
    """Write a minimal OCI image layout: one tiny layer, a config, a manifest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        data = b"k8svent test layer\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(tar_bytes.getvalue()).hexdigest()
    layer = _write_blob(layout, gzip.compress(tar_bytes.getvalue(), mtime=0))
    config = _write_blob(
        layout,
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode(),
    )
    manifest = _write_blob(
        layout,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
            }
        ).encode(),
    )
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        **manifest,
                        "annotations": {"org.opencontainers.image.ref.name": "k8svent"},
                    }
                ],
            }
        )
    )
    return manifest["digest"]


@pytest.fixture(scope="module")
def real_registry(tmp_path_factory):
    """Start docker-registry on 127.0.0.1 (port 0) with token auth; push REAL_TAGS with skopeo."""
    registry_bin, skopeo = _need("docker-registry"), _need("skopeo")
    base = tmp_path_factory.mktemp("registry")
    tokens = token_server.TokenServer().start()
    (base / "root.pem").write_bytes(tokens.cert_pem())
    (base / "config.yml").write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(base / "storage")},
                    "maintenance": {"uploadpurging": {"enabled": False}},
                },
                "http": {"addr": "127.0.0.1:0", "secret": "k8svent-test-secret"},
                "auth": {
                    "token": {
                        "realm": tokens.realm,
                        "service": token_server.SERVICE,
                        "issuer": token_server.ISSUER,
                        "rootcertbundle": str(base / "root.pem"),
                    }
                },
            }
        )
    )  # JSON is YAML
    log_file = open(base / "registry.log", "wb")
    process = subprocess.Popen(
        [registry_bin, "serve", str(base / "config.yml")], stdout=log_file, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        ports = set()
        while not ports:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "docker-registry did not start: " + (base / "registry.log").read_text()[-2000:]
                )
            time.sleep(0.05)
            ports = _listening_ports(process.pid)
        (port,) = ports
        address = f"127.0.0.1:{port}"
        layout = base / "oci"
        digest = _write_oci_layout(layout)
        (base / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        env = {**os.environ, "HOME": str(base), "XDG_RUNTIME_DIR": str(base)}
        for tag in REAL_TAGS:
            subprocess.run(
                [
                    skopeo,
                    "--policy",
                    str(base / "policy.json"),
                    "copy",
                    "--quiet",
                    "--dest-tls-verify=false",
                    f"--dest-creds={token_server.PUSH_USER}:{token_server.PUSH_PASSWORD}",
                    f"oci:{layout}:k8svent",
                    f"docker://{address}/atomist/k8svent:{tag}",
                ],
                check=True,
                env=env,
                timeout=120,
                capture_output=True,
            )
        yield {"address": address, "tokens": tokens, "digest": digest}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()
        tokens.close()


def test_real_registry_lists_tags_through_token_flow(real_registry, caplog):
    caplog.set_level(logging.DEBUG, logger="k8svent")
    tokens = real_registry["tokens"]
    pushed_tokens = len(tokens.issued)
    client = k8svent.RegistryClient(
        f"{real_registry['address']}/atomist/k8svent", timeout_seconds=10
    )
    tags = client.list_tags()
    assert sorted(tags) == sorted(REAL_TAGS)
    anonymous = [r for r in tokens.requests if r["user"] == ""]
    assert anonymous and anonymous[-1]["query"] == {
        "client_id": ["k8svent"],
        "service": [token_server.SERVICE],
        "scope": ["repository:atomist/k8svent:pull"],
    }
    assert len(tokens.issued) == pushed_tokens + 1
    tags_url = f"http://{real_registry['address']}/v2/atomist/k8svent/tags/list"
    assert [r.getMessage() for r in caplog.records] == [
        f"GET {tags_url}: 401",
        f"GET {tokens.realm} (token): 200",
        f"GET {tags_url}: 200",
    ]
    for token in tokens.issued:
        assert token not in caplog.text
    assert k8svent.newer_version("0.14.0", tags) == "v0.15.0"
    assert k8svent.newer_version("0.15.0", tags) is None
    assert k8svent.newer_version("0.15.0", tags + ["0.15.1-rc.1"]) is None
    assert k8svent.newer_version("1.0.0-alpha", tags) == "1.0.0-rc.1"


def test_real_registry_upgrader_finds_newer(real_registry, mocker, caplog):
    caplog.set_level(logging.DEBUG, logger="k8svent")
    calls = []
    client = k8svent.RegistryClient(
        f"{real_registry['address']}/atomist/k8svent", timeout_seconds=10
    )
    upgrader = k8svent.Upgrader(client, "0.14.0", 1000, calls.append, logging.getLogger("k8svent"))
    upgrader.start()
    upgrader.join(30)
    assert calls == ["v0.15.0"]
    assert "newer version v0.15.0 found (running 0.14.0); exiting to upgrade" in caplog.text
    for token in real_registry["tokens"].issued:
        assert token not in caplog.text


def test_real_registry_gives_the_channel_tags_digest(real_registry):
    client = k8svent.RegistryClient(
        f"{real_registry['address']}/atomist/k8svent", timeout_seconds=10
    )
    assert client.manifest_digest("latest") == real_registry["digest"]
    with pytest.raises(k8svent.RegistryError) as caught:
        client.manifest_digest("no-such-tag")
    assert caught.value.status == 404


@pytest.mark.parametrize("running, exits", [("same", False), ("other", True)])
def test_real_registry_upgrader_exits_only_when_the_tag_moved(
    real_registry, caplog, running, exits
):
    caplog.set_level(logging.INFO, logger="k8svent")
    image = f"{real_registry['address']}/atomist/k8svent"
    digest = real_registry["digest"] if running == "same" else "sha256:" + "0" * 64
    calls, available = [], []
    upgrader = k8svent.Upgrader(
        k8svent.RegistryClient(image, timeout_seconds=10),
        "0.14.0",
        1000,
        calls.append,
        logging.getLogger("k8svent"),
        on_available=available.append,
        decide=lambda: (k8svent.UpgradePlan(image, "latest", digest), "a channel"),
    )
    delay = upgrader.check_once()
    if exits:
        assert delay is None and calls == ["v0.15.0"] and available == []
        assert "exiting to upgrade" in caplog.text
    else:
        assert 900 <= delay <= 1100 and calls == [] and available == ["v0.15.0"]
        assert "latest is still the image running; not restarting" in caplog.text
        upgrader.check_once()
        assert caplog.text.count("newer version v0.15.0 found") == 1
        assert available == ["v0.15.0", "v0.15.0"]


def test_real_registry_unknown_repository(real_registry):
    client = k8svent.RegistryClient(
        f"{real_registry['address']}/atomist/nothing", timeout_seconds=10
    )
    with pytest.raises(k8svent.RegistryError) as caught:
        client.list_tags()
    assert caught.value.status == 404
    for token in real_registry["tokens"].issued:
        assert token not in str(caught.value)


# --- the whole process: own pod through kubectl, exit to upgrade -------------

from test.pods import make_pod  # noqa: E402
from test.test_e2e import start  # noqa: E402,F401  (a fixture)

RUNNING = "sha256:" + "a" * 64
MOVED = "sha256:" + "b" * 64


def _own_pod(image, digest=RUNNING):
    pod = make_pod("k8svent", "k8svent-5d8f7c9b6-x2x4q")
    pod["spec"]["containers"][0].update(name="k8svent", image=image)
    pod["status"]["containerStatuses"][0].update(
        name="k8svent",
        image=image,
        imageID=f"{k8svent.split_image_ref(image)[0]}@{digest}" if digest else "",
    )
    return pod


def test_get_own_image_through_kubectl(kubeapi, kubeconfig, kubectl_path):
    kubeapi.put_pod(_own_pod("atomist/k8svent:next"))
    settings = k8svent.Settings(kubectl=kubectl_path)
    assert (
        k8svent.get_own_image(settings, "k8svent-5d8f7c9b6-x2x4q", "k8svent")
        == "atomist/k8svent:next"
    )
    with pytest.raises(k8svent.KubectlError, match="NotFound|not found"):
        k8svent.get_own_image(settings, "missing", "k8svent")


def _upgrade_env():
    return {
        "K8SVENT_VERSION": "1.0.0",
        "POD_NAME": "k8svent-5d8f7c9b6-x2x4q",
        "POD_NAMESPACE": "k8svent",
    }


def test_process_exits_0_to_upgrade_on_a_channel(kubeapi, start, receivers, fake_registry):
    fake_registry.tags = ["0.9.0", "1.0.0", "1.1.0-next.3", "1.1.0", "latest", "next"]
    fake_registry.digests = {"latest": MOVED, "next": RUNNING}
    kubeapi.put_pod(_own_pod("atomist/k8svent:latest"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", f"--image={fake_registry.image}", env=_upgrade_env())
    assert service.wait(timeout=30) == 0
    log = service.log()
    assert "newer version 1.1.0 found (running 1.0.0); exiting to upgrade" in log
    assert "stopped" in log
    # The first check follows the first poll, and asks for the channel tag's digest.
    assert log.index("poll: ") < log.index("checking ")
    (head,) = fake_registry.manifest_requests()
    assert head["path"].endswith("/manifests/latest") and head["method"] == "HEAD"
    accepted = head["headers"]["Accept"]
    for media_type in (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ):
        assert media_type in accepted


def test_process_stays_while_the_channel_tag_is_the_image_running(
    kubeapi, start, receivers, fake_registry
):
    # A stray newer tag (a release whose image did not build, a lagging
    # mirror): restarting would pull the same image, again and again.
    fake_registry.tags = ["1.0.0", "1.1.0", "latest"]
    fake_registry.digests = {"latest": RUNNING}
    kubeapi.put_pod(_own_pod("atomist/k8svent:latest"))
    receiver = receivers()
    service = start(
        f"--url={receiver.url}",
        f"--image={fake_registry.image}",
        "--upgrade-interval=1",
        "--listen=127.0.0.1:0",
        env=_upgrade_env(),
    )
    service.wait_log(
        "newer version 1.1.0 found .*but .*:latest is still the image running; not restarting"
    )
    _wait_until(lambda: len(fake_registry.manifest_requests()) >= 3)
    assert service.count("newer version 1.1.0 found") == 1
    port = re.search(r"listening on http://127.0.0.1:(\d+)", service.log())[1]
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'k8svent_newer_version_available{version="1.1.0"} 1.0' in metrics
    # Once the tag moves, it restarts.
    fake_registry.digests = {"latest": MOVED}
    assert service.wait(timeout=30) == 0
    assert "newer version 1.1.0 found (running 1.0.0); exiting to upgrade" in service.log()


def test_process_watches_the_repository_its_pod_runs(kubeapi, start, receivers, fake_registry):
    fake_registry.tags = ["1.0.0", "1.1.0"]
    fake_registry.digests = {"next": MOVED}
    kubeapi.put_pod(_own_pod(f"{fake_registry.image}:next"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", env=_upgrade_env())  # no --image
    assert service.wait(timeout=30) == 0
    assert f"checking {fake_registry.image} for a version newer than 1.0.0" in service.log()
    assert fake_registry.manifest_requests()[0]["path"].endswith("/manifests/next")


def test_process_retries_a_failed_look_up_of_its_pod(mocker, fake_registry):
    fake_registry.tags = ["1.0.0", "1.1.0"]
    fake_registry.digests = {"latest": MOVED}
    answers = [
        k8svent.KubectlError("cannot look up own pod k8svent/x: NotFound"),
        (k8svent.UpgradePlan(fake_registry.image, "latest", RUNNING), "a channel"),
    ]

    def decide():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    upgrader, calls, recorder = _upgrader(fake_registry, "1.0.0", mocker, 5, decide=decide)
    upgrader.start()
    upgrader.join(10)
    assert calls == ["1.1.0"]
    assert recorder.delays == [0.0, 3600]


def _wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "image, digest, given, expected",
    [
        (
            "ghcr.io/me/k8svent:latest",
            RUNNING,
            False,
            k8svent.UpgradePlan("ghcr.io/me/k8svent", "latest", RUNNING),
        ),
        (
            "ghcr.io/me/k8svent",
            RUNNING,
            False,
            k8svent.UpgradePlan("ghcr.io/me/k8svent", "latest", RUNNING),
        ),
        (
            "ghcr.io/me/k8svent:next",
            RUNNING,
            True,
            k8svent.UpgradePlan("docker.io/atomist/k8svent", "next", RUNNING),
        ),
        (
            "atomist/k8svent:latest",
            "",
            False,
            k8svent.UpgradePlan("atomist/k8svent", "latest", None),
        ),
        ("atomist/k8svent:1.0.0", RUNNING, False, None),
    ],
)
def test_upgrade_plan_in_auto(image, digest, given, expected):
    pod = _own_pod(image, digest)
    plan, _ = k8svent.upgrade_plan("auto", True, pod, "docker.io/atomist/k8svent", given)
    assert plan == expected


def test_upgrade_plan_always_watches_the_configured_repository():
    plan, _ = k8svent.upgrade_plan("always", False, None, "docker.io/atomist/k8svent", False)
    assert plan == k8svent.UpgradePlan("docker.io/atomist/k8svent")


def test_process_pinned_does_not_check(kubeapi, start, receivers, fake_registry):
    fake_registry.tags = ["1.0.0", "1.1.0"]
    kubeapi.put_pod(_own_pod("atomist/k8svent:1.0.0"))
    receiver = receivers()
    service = start(f"--url={receiver.url}", f"--image={fake_registry.image}", env=_upgrade_env())
    service.wait_log("not checking for newer versions: image atomist/k8svent:1.0.0 is pinned")
    service.wait_polls(3)
    assert fake_registry.tag_requests() == []
    assert service.stop() == 0


def test_process_by_hand_never_checks_unless_asked(kubeapi, start, receivers, fake_registry):
    fake_registry.tags = ["1.0.0", "9.0.0"]
    receiver = receivers()
    service = start(f"--url={receiver.url}", f"--image={fake_registry.image}")
    service.wait_log("not checking for newer versions: not running from the k8svent image")
    service.wait_polls(2)
    assert fake_registry.tag_requests() == []
    assert service.stop() == 0
    always = start(f"--url={receiver.url}", f"--image={fake_registry.image}", "--upgrade=always")
    assert always.wait(timeout=30) == 0
    assert "newer version 9.0.0 found" in always.log()


@pytest.mark.parametrize(
    "setup, reason",
    [
        ({"mode": "status", "status": 500}, "answered 500"),
        ({"mode": "garbage"}, "invalid JSON"),
        ({"mode": "no-tags"}, "no tags"),
        ({"tags": ["0.9.0", "1.0.0", "1.1.0-next.1"]}, None),  # a release ignores prereleases
    ],
)
def test_process_keeps_running_when_no_upgrade(
    kubeapi, start, receivers, fake_registry, setup, reason
):
    for name, value in setup.items():
        setattr(fake_registry, name, value)
    receiver = receivers()
    service = start(
        f"--url={receiver.url}",
        f"--image={fake_registry.image}",
        "--upgrade=always",
        env={"K8SVENT_VERSION": "1.0.0"},
    )
    if reason:
        service.wait_log(r"upgrade check failed: .*" + reason + r".*; retrying in 3600 s")
    else:
        service.wait_log("no version newer than 1.0.0")
    service.wait_polls(3)
    assert fake_registry.tag_requests()
    assert service.stop() == 0


def test_process_prerelease_moves_to_newer_prerelease(kubeapi, start, receivers, fake_registry):
    fake_registry.tags = ["1.0.0", "1.0.1-next.2", "1.0.1-next.10"]
    receiver = receivers()
    service = start(
        f"--url={receiver.url}",
        f"--image={fake_registry.image}",
        "--upgrade=always",
        env={"K8SVENT_VERSION": "1.0.1-next.3"},
    )
    assert service.wait(timeout=30) == 0
    assert "newer version 1.0.1-next.10 found (running 1.0.1-next.3)" in service.log()
