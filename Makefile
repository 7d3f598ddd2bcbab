# blockbackupd: `make test` and `make demo` work on a fresh Debian 12 / Ubuntu
# machine: they install what is missing (apt packages, the venv, the package)
# and nothing else. Every step is idempotent.

# binutils assembles the tests' boot-sector guest; openssl makes their throwaway CA.
APT_PACKAGES := qemu-system-x86 qemu-utils python3-libnbd libnbd-bin python3-venv \
                binutils openssl
VENV         := .venv
PYTHON       := $(VENV)/bin/python
# libnbd's Python binding is a distro package for the system Python only.
SYSTEM_PYTHON := /usr/bin/python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: all test demo bench deps system-deps lint clean

all: test

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml | system-deps
	[ -x $(PYTHON) ] || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

deps: system-deps $(STAMP)

test: lint
	$(PYTHON) -m pytest

demo: deps
	$(PYTHON) -m tools.demo

bench: deps
	$(PYTHON) -m bench.snapshot_window
	$(PYTHON) -m bench.checkpoint_writes

lint: deps
	$(VENV)/bin/ruff check blockbackupd client tests tools bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
