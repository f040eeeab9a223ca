# podmeter: `make run` runs the agent on this host; `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= pipelines.yaml
APT_PACKAGES := $(shell grep -v '^\#' .ci/apt-packages.txt | tr '\n' ' ')

.PHONY: install install-dev run test test-deps lint bench docs proto bpf build image lock clean

# Idempotent: re-runs pip only when pyproject.toml or constraints.txt changed.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e .
	touch $@

install-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

run: install build
	$(VENV)/bin/podmeter run --config $(CONFIG)

# System packages for the real parts the tests start (containerd, clang, Prometheus...), as root on Debian.
test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	else echo "not root on Debian: skipping system packages; tests needing them skip (and fail under CI=true)"; fi

# Generated code and objects: gRPC stubs from the project's protos, eBPF objects.
build: proto bpf
proto: install-dev
	@if [ -f receivers/cri/Makefile ]; then $(MAKE) -s -C receivers/cri proto PY=$(abspath $(PY)); fi
	@if [ -f receivers/podresources/Makefile ]; then $(MAKE) -s -C receivers/podresources proto PY=$(abspath $(PY)); fi
bpf:
	@if [ -f receivers/ebpf/Makefile ] && command -v clang >/dev/null && command -v bpftool >/dev/null; then \
	  $(MAKE) -s -C receivers/ebpf; else echo "bpf: clang or bpftool missing, eBPF objects not built"; fi

test: install-dev test-deps build
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check podmeter receivers processors exporters tests bench
	$(VENV)/bin/python -m podmeter.docs --check

docs: install-dev
	$(VENV)/bin/python -m podmeter.docs

bench: install-dev test-deps build
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

image:
	docker build -t podmeter:$$($(PYTHON) -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])') .

# Refresh the lock from a clean resolve (run deliberately; commit constraints.txt).
lock:
	rm -rf /tmp/podmeter-lock && $(PYTHON) -m venv /tmp/podmeter-lock
	/tmp/podmeter-lock/bin/pip install -q -e '.[dev,bench]'
	/tmp/podmeter-lock/bin/pip freeze --exclude-editable | grep -v '^podmeter' > constraints.txt

clean:
	rm -rf $(VENV) build dist *.egg-info
