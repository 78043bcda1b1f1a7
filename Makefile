# Two commands for a newcomer: `make demo` and `make test`. Both install everything first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml .ci/constraints.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(HASH)
TFLITE_STAMP := $(VENV)/.installed-tflite-$(HASH)
# pip must never resolve a torch other than the CPU wheel pinned here (another one is a multi-GB CUDA build)
TORCH := torch==2.13.0

.PHONY: all install install-tflite system-deps demo test clean

all: demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml .ci/constraints.txt | $(BIN)/python
	@echo "== installing $(TORCH) (CPU), then the project"
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} was installed instead of 2.13.0')"
	rm -f $(VENV)/.installed-*
	touch $@

# The TFLite converter (litert-torch, ~1.2 GB with jax) is an extra: the tests need it, the demo does not.
$(TFLITE_STAMP): $(STAMP)
	@echo "== installing the [tflite] extra (litert-torch, ai-edge-litert; about 1.2 GB)"
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[dev,tflite]'
	touch $@

# System programs: Mosquitto (the local broker and the tests' broker).
# System pieces: mosquitto (a real broker), chromium (the dashboard test), openssh-server (the provisioning
# test's sshd). Installed with apt-get when this is root; otherwise the list to install by hand is printed.
# The demo needs none of them (it falls back to the embedded broker); the tests need all three.
SYSTEM_BINS := mosquitto:/usr/sbin/mosquitto chromium:/usr/bin/chromium openssh-server:/usr/sbin/sshd
system-deps:
	@missing=""; for pair in $(SYSTEM_BINS); do pkg=$${pair%%:*}; bin=$${pair#*:}; \
		[ -x "$$bin" ] || command -v "$$(basename $$bin)" >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "== installing$$missing with apt-get"; \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "!! missing system packages:$$missing; this is not root, install them by hand:"; \
		echo "   sudo apt-get install$$missing"; \
		echo "   Without mosquitto the demo uses the embedded amqtt broker; the tests need all of them."; \
		[ "$(MAKECMDGOALS)" != "test" ]; \
	fi

install: $(STAMP) system-deps

install-tflite: $(TFLITE_STAMP) system-deps

demo: install
	$(BIN)/pipeline deploy --target rpi4 --config deploy.yaml --report demo-report.json

test: install-tflite
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf .edgefleet demo-report.json tests/_output .pytest_cache
