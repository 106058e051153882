"""Fixtures shared by the test suite: a fake API server and the real kubectl."""

import shutil
import sys
from pathlib import Path

import pytest

from test.kubeapi import FakeKubeAPI
from test.receivers import Receiver


@pytest.fixture
def kubeapi():
    """A started FakeKubeAPI on 127.0.0.1, stopped after the test."""
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def kubeconfig(kubeapi, tmp_path, monkeypatch):
    """A kubeconfig for ``kubeapi``, with KUBECONFIG (and a private KUBECACHEDIR) set."""
    path = kubeapi.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(path))
    # kubectl caches discovery under ~/.kube/cache unless told otherwise.
    monkeypatch.setenv("KUBECACHEDIR", str(tmp_path / "kube-cache"))
    return path


@pytest.fixture(scope="session")
def kubectl_path():
    """The absolute path of kubectl: the virtualenv's first, then PATH's."""
    path = shutil.which(Path(sys.executable).parent / "kubectl") or shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found next to the Python interpreter nor on PATH")
    return str(Path(path).absolute())


@pytest.fixture
def receivers():
    """A factory of webhook receivers on 127.0.0.1, closed after the test."""
    made = []

    def make(answers=(), secret=None, respond=None):
        receiver = Receiver(answers, secret, respond)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()
    for receiver in made:
        assert not receiver.problems, f"requests that did not verify: {receiver.problems}"
