# blockbackupd: `make test` and `make demo` work on a fresh Debian 12 / Ubuntu
# machine: they install what is missing (apt packages, the venv, the package)
# and nothing else. Every step is idempotent.

# binutils assembles the tests' boot-sector guest; openssl makes their throwaway CA.
# systemd provides systemd-analyze, which checks the unit file.
BASE_APT_PACKAGES := qemu-system-x86 qemu-utils python3-libnbd libnbd-bin python3-venv \
                     binutils openssl systemd
# libvirt-daemon-system (libvirtd, virtlogd, the QEMU driver) and libvirt-clients
# (virsh), for the tests only: tests/vm_manager/test_libvirt.py runs a private
# libvirtd of its own (config and state under a temporary directory; the
# system's libvirt config is neither read nor changed). `make install` leaves them out.
# e2fsprogs: tests/guest and the demo read the Linux guest's ext4 disks
# (debugfs, e2fsck, dumpe2fs) and copy its programs into the guest. The guest's
# kernel, busybox-static and qemu-guest-agent are not installed: `make guest`
# fetches them with apt-get download into its cache (tools/linux_guest).
# ceph-mon, ceph-osd and ceph-common (ceph, rbd), for the tests only: RBD disks
# run on a private cluster of one monitor and one RAM-backed OSD under a
# temporary directory (tools/ceph.py; no systemd unit, /etc/ceph untouched).
# qemu-block-extra is the system QEMU's rbd driver (block-rbd.so); python3-rbd
# (with python3-rados) is the daemon's own way to the cluster, for checkpoints
# kept as RBD snapshots (ceph-common depends on it; named for clarity).
# libguestfs-tools and python3-guestfs: bbctl mount (file-level restore) reads a
# backup's guest filesystems in libguestfs's appliance VM; linux-image-amd64 is
# the kernel supermin builds that appliance from (only a Recommends of supermin,
# and a container has none in /boot); it is not booted on the host.
# openssh-server (sshd) and openssh-client, for the tests only: tests/test_remote.py
# runs an sshd of its own in each network namespace it makes (config, keys and
# users of its own; the system's sshd is neither configured nor started).
# iptables cuts the network between those namespaces mid-backup (a rule that
# drops every packet, as a pulled cable does; only in the test's namespace).
# socat and jq: tests/shell/bbrpc, the client in shell that proves the API
# document (rpc.discover) is all another program needs.
APT_PACKAGES := $(BASE_APT_PACKAGES) libvirt-daemon-system libvirt-clients e2fsprogs \
                openssh-server openssh-client iptables socat jq \
                ceph-mon ceph-osd ceph-common qemu-block-extra python3-rbd python3-rados \
                libguestfs-tools python3-guestfs linux-image-amd64
VENV         := .venv
PYTHON       := $(VENV)/bin/python
# libnbd's Python binding is a distro package for the system Python only.
SYSTEM_PYTHON := /usr/bin/python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: all test demo bench deps system-deps lint check-unit guest qemu10 install clean

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

# Two passes: the system's QEMU 7.2, then the private 10.0 (BB_QEMU, read by
# tools/qemu_build.py; each pass names its QEMU in pytest's header and summary).
# The libvirt tests run the system's QEMU under the system's libvirt whatever
# BB_QEMU says: the second pass deselects them (-m "not libvirt"). Both passes
# run even when the first fails; either failing fails the target.
test: lint check-unit guest qemu10
	@status=0; \
	echo "=== pass 1/2: system QEMU ==="; \
	BB_QEMU=system $(PYTHON) -m pytest || status=1; \
	echo "=== pass 2/2: QEMU 10.0 (libvirt tests deselected: they use the system QEMU) ==="; \
	BB_QEMU=10.0 $(PYTHON) -m pytest -m "not libvirt" || status=1; \
	exit $$status

demo: deps guest
	$(PYTHON) -m tools.demo

# The tests' Linux guest (kernel + initramfs from Debian packages), built into
# /var/cache/blockbackupd-guest ($$BB_GUEST_CACHE) unless already there.
guest: deps
	$(PYTHON) -m tools.linux_guest

# QEMU 10.0 from bookworm-backports, unpacked (not installed: the system's 7.2
# stays) into /var/cache/blockbackupd-qemu10 ($$BB_QEMU10_CACHE) unless already
# there; it prints the version. tools/qemu_build.py.
qemu10: deps
	$(PYTHON) -m tools.qemu_build

bench: deps
	$(PYTHON) -m bench.snapshot_window
	$(PYTHON) -m bench.checkpoint_writes
	$(PYTHON) -m bench.run_all
	$(PYTHON) -m bench.guest_writes
	$(PYTHON) -m bench.backup_begin
	$(PYTHON) -m bench.checkpoint_memory
	$(PYTHON) -m bench.instant_recovery

lint: deps
	$(VENV)/bin/ruff check blockbackupd client tests tools bench
	$(VENV)/bin/mypy

# systemd-analyze verify needs ExecStart to exist: check a copy that runs this
# checkout's daemon (the installed unit runs /usr/local/bin/blockbackupd). It
# exits 0 on unknown keys and bad values, so any message it prints fails.
check-unit: deps
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	sed 's#^ExecStart=/usr/local/bin/blockbackupd#ExecStart=$(CURDIR)/$(VENV)/bin/blockbackupd#' \
	  systemd/blockbackupd.service > "$$tmp/blockbackupd.service" && \
	out=$$(systemd-analyze verify "$$tmp/blockbackupd.service" 2>&1); \
	if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; echo "systemd unit: verified"

# Install as a system service: a venv in $(PREFIX), the commands linked into
# /usr/local/bin, the unit, and the example config unless one exists.
PREFIX := /opt/blockbackupd
install: APT_PACKAGES := $(BASE_APT_PACKAGES)
install: system-deps
	[ -x $(PREFIX)/bin/python ] || $(SYSTEM_PYTHON) -m venv --system-site-packages $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --upgrade pip
	$(PREFIX)/bin/python -m pip install -q --upgrade .
	ln -sf $(PREFIX)/bin/blockbackupd /usr/local/bin/blockbackupd
	ln -sf $(PREFIX)/bin/bbctl /usr/local/bin/bbctl
	ln -sf $(PREFIX)/bin/blockbackupd-ssh-helper /usr/local/bin/blockbackupd-ssh-helper
	install -D -m 0644 systemd/blockbackupd.service /etc/systemd/system/blockbackupd.service
	[ -e /etc/blockbackupd/blockbackupd.toml ] || \
	  install -D -m 0640 etc/blockbackupd.toml /etc/blockbackupd/blockbackupd.toml
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now blockbackupd"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
