# vmforge developer entry points.  `make help` lists them.
#
# Every target that runs Python depends on `setup`, which is idempotent and fast once
# done: it installs missing Debian packages (only when something is missing) and keeps
# .venv in step with pyproject.toml through a stamp file.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

# Debian packages the tests and demo need.  qemu-img (qemu-utils) is the test oracle;
# extend with e.g. qemu-system-x86 e2fsprogs busybox-static when tests need them.
APT_PACKAGES ?= qemu-utils qemu-system-x86 e2fsprogs busybox-static fdisk openssl

PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
STAMP      := $(VENV)/.stamp
PYTEST_ARGS ?=
BENCH_ARGS  ?=
RUNTIME_BENCH_ARGS ?=

.PHONY: help setup apt venv demo test lint bench clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: apt venv  ## install missing apt packages, create/refresh .venv (idempotent)
	@# an editable install leaves bytecode compiling to the first import (or to every
	@# run under PYTHONDONTWRITEBYTECODE): compile once, as pip does for an installed package
	@$(VPY) -m compileall -q src

# Installs only what dpkg says is missing; `apt-get update` runs only in that case.
# Without root or sudo it prints the command instead of failing, so a developer
# without privileges can still lint and run what does not need the oracle.
apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "setup: please install these packages (or their equivalents):$$missing" >&2; exit 0; \
	fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "setup: not root and no sudo; please run: apt-get install$$missing" >&2; exit 0; fi; \
	echo "setup: installing$$missing"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-run pip only when pyproject.toml changed since the last successful install.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@# the editable build leaves src/*.egg-info behind (a copy of the README); the
	@# installed metadata lives in the venv's dist-info, so src/ keeps only sources
	@rm -rf src/*.egg-info
	@touch $@

demo: setup  ## build a sample disk, convert it to every format and verify with qemu-img
	$(VPY) scripts/demo.py

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: setup lint  ## lint, then run the test suite in parallel (pytest-xdist)
	@rc=0; $(VPY) -m pytest -n auto $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: setup  ## ruff on all Python, mypy --strict on src
	$(VPY) -m ruff check src tests scripts bench
	$(VPY) -m mypy src/vmforge

bench: setup  ## convert vs qemu-img, then the runtime (boot, migration, clones); updates BENCHMARKS.md
	$(VPY) bench/convert.py --markdown BENCHMARKS.md $(BENCH_ARGS)
	$(VPY) bench/runtime.py --markdown BENCHMARKS.md $(RUNTIME_BENCH_ARGS)

clean:  ## remove caches and build leftovers (keeps .venv and the bench image cache)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0r rm -rf
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist src/*.egg-info

distclean: clean  ## also remove .venv and the cached benchmark images
	rm -rf $(VENV) bench/.cache
