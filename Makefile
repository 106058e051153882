# For contributors: `make` lints and tests; `make image` builds a local image.
# Users need none of this (see README.md).

PYTHON ?= python
IMAGE ?= atomist/k8svent
# Deferred, so that only the targets that use it run git; `make image VERSION=...` overrides.
VERSION = $(shell .ci/version)

.PHONY: all lint test image version

all: lint test

# Linters declared in requirements-dev.txt must be installed; hadolint runs if present.
lint:
	$(PYTHON) -m py_compile k8svent.py .ci/version
	if grep -q '^pyflakes' requirements-dev.txt 2>/dev/null; then $(PYTHON) -m pyflakes k8svent.py test; fi
	if grep -q '^ruff' requirements-dev.txt 2>/dev/null; then $(PYTHON) -m ruff check .; fi
	if command -v hadolint >/dev/null; then hadolint Dockerfile; fi

test:
	$(PYTHON) -m pytest

image:
	@test -n "$(VERSION)" || { echo "make: .ci/version gave no version" >&2; exit 1; }
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

version:
	@.ci/version
