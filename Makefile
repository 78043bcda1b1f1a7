# Two commands for a newcomer: `make demo` and `make test`. Both install everything first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml .ci/constraints.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(HASH)
TFLITE_STAMP := $(VENV)/.installed-tflite-$(HASH)
# pip must never resolve a torch other than the CPU wheel pinned here (another one is a multi-GB CUDA build)
TORCH_VERSION := 2.13.0
TORCH := torch==$(TORCH_VERSION)

.PHONY: all install install-tflite system-deps demo test test-fast clean

all: demo

# Every install step prints one line; pip's own output (its warnings included) goes to $(LOG), and its tail is
# printed only when the step fails.
LOG := $(VENV)/install.log
comma := ,
DEV := .[dev]
DEV_TFLITE := .[dev$(comma)tflite]
# $(call step,WHAT,COMMAND): "== WHAT", then COMMAND with its output appended to $(LOG)
define step
	@mkdir -p $(VENV); echo "== $(1)"; echo "== $(1): $(2)" >>$(LOG); from=$$(wc -l <$(LOG)); \
	if ! ( $(2) ) >>$(LOG) 2>&1; then \
		echo "!! $(1) failed; its output, from $(LOG):"; tail -n +$$((from + 1)) $(LOG) | tail -n 40; exit 1; fi
endef

$(BIN)/python:
	$(call step,creating the virtual environment $(VENV),$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --upgrade pip)

# What the virtual environment takes with the [tflite] extra (2.7 GB measured) and a little of pip's unpacking
NEED_MB := 3000
# $(call room,DIR): fail with what is free and where, unless DIR's file system has NEED_MB free
define room
	@free=$$(df -Pm "$(1)" | awk 'NR==2 {print $$4}'); if [ "$$free" -lt $(NEED_MB) ]; then \
		echo "!! installing needs about $(NEED_MB) MB free; $(1) has $$free MB (df -h $(1))"; exit 1; fi
endef

$(STAMP): pyproject.toml .ci/constraints.txt | $(BIN)/python
	$(call room,$(VENV))
	$(call room,$${TMPDIR:-/tmp})
	$(call step,installing torch $(TORCH_VERSION) (CPU),$(BIN)/pip install $(TORCH))
	$(call step,installing edgefleet with the [dev] extra,$(BIN)/pip install -c .ci/constraints.txt -e '$(DEV)')
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else f'torch {v} was installed instead of $(TORCH_VERSION)')"
	@rm -f $(VENV)/.installed-*
	@touch $@

# The TFLite converter (litert-torch, ~1.2 GB with jax) is an extra: the tests need it, the demo does not.
$(TFLITE_STAMP): $(STAMP)
	$(call step,installing the [tflite] extra (litert-torch$(comma) ai-edge-litert; about 1.2 GB),$(BIN)/pip install -c .ci/constraints.txt -e '$(DEV_TFLITE)')
	@touch $@

# System pieces: mosquitto (a real broker), chromium (the dashboard test), openssh-server (the provisioning
# test's sshd), prometheus (its promtool checks /metrics), postgresql (the fleet store's tests start a server;
# Debian keeps initdb in /usr/lib/postgresql/<major>/bin). Installed with apt-get when this is root; otherwise
# the list to install by hand is printed. The demo needs none of them (it falls back to the embedded broker);
# the tests need all of them.
SYSTEM_BINS := mosquitto:/usr/sbin/mosquitto chromium:/usr/bin/chromium openssh-server:/usr/sbin/sshd \
	prometheus:/usr/bin/promtool qemu-user-static:/usr/bin/qemu-x86_64-static postgresql:initdb
system-deps:
	@missing=""; for pair in $(SYSTEM_BINS); do pkg=$${pair%%:*}; bin=$${pair#*:}; \
		[ -x "$$bin" ] || command -v "$$(basename $$bin)" >/dev/null 2>&1 \
		|| ls /usr/lib/postgresql/*/bin/$$bin >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "== installing$$missing with apt-get"; mkdir -p $(VENV); \
		{ apt-get update -qq || true; } >>$(LOG) 2>&1; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >>$(LOG) 2>&1 \
			|| { echo "!! apt-get install$$missing failed; the end of $(LOG):"; tail -n 40 $(LOG); exit 1; }; \
	else \
		echo "!! missing system packages:$$missing; this is not root, install them by hand:"; \
		echo "   sudo apt-get install$$missing"; \
		echo "   Without mosquitto the demo uses the embedded amqtt broker; the tests need all of them."; \
		case " $(MAKECMDGOALS) " in *" test "*|*" test-fast "*) exit 1;; esac; \
	fi

install: $(STAMP) system-deps

install-tflite: $(TFLITE_STAMP) system-deps

demo: install
	$(BIN)/pipeline deploy --target rpi4 --config deploy.yaml --report demo-report.json

# The whole suite, then its wall time (pytest's own summary line stays the last line pytest prints).
test: install-tflite
	@start=$$(date +%s); $(BIN)/python -m pytest -q -ra --durations=15; rc=$$?; s=$$(( $$(date +%s) - start )); \
	echo "== test suite wall time: $$((s / 60)) min $$((s % 60)) s"; exit $$rc

# For development: everything but the tests marked slow (they train, or deliver end to end).
test-fast: install-tflite
	@start=$$(date +%s); $(BIN)/python -m pytest -q -ra -m "not slow"; rc=$$?; s=$$(( $$(date +%s) - start )); \
	echo "== fast tests wall time: $$((s / 60)) min $$((s % 60)) s"; exit $$rc

clean:
	rm -rf .edgefleet demo-report.json tests/_output .pytest_cache
