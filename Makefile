# For contributors: `make` lints and tests; `make image` builds a local image.
# Users need none of this (see README.md).

PYTHON ?= python
IMAGE ?= atomist/k8svent
# Deferred, so that only the targets that use it run git; `make image VERSION=...` overrides.
VERSION = $(shell .ci/version)

.PHONY: all lint test image version lock

all: lint test

# ruff (configured in pyproject.toml) lints and checks the formatting;
# hadolint checks the Dockerfile. All come with requirements-dev.txt.
lint:
	$(PYTHON) -m py_compile k8svent.py .ci/version
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	hadolint Dockerfile

test:
	$(PYTHON) -m pytest

image:
	@test -n "$(VERSION)" || { echo "make: .ci/version gave no version" >&2; exit 1; }
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

version:
	@.ci/version

# The locks: every package, with its dependencies, pinned with the sha256 of each
# file PyPI has for it. `make lock` keeps the pins already there and adds what a
# changed requirements file needs; `make lock UPGRADE=1` moves everything to the
# newest versions that fit. uv comes with requirements-dev.txt (docs/dependencies.md).
UV_COMPILE = $(PYTHON) -m uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)

lock:
	$(UV_COMPILE) --output-file requirements.lock requirements.txt
	$(UV_COMPILE) --constraint requirements.lock --output-file requirements-dev.lock requirements-dev.txt
