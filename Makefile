# msb-proxy developer entry points. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROOTFS ?= $(or $(MSB_PROXY_ROOTFS),/var/cache/msb-proxy/rootfs/bookworm-v1)
export MSB_PROXY_ROOTFS := $(ROOTFS)

.PHONY: help install client-key system-deps system-deps-demo rootfs demo test test-nofastpath \
	test-fast lint bench fuzz stress clean

# Debian/Ubuntu packages: demo, test, test-nofastpath and bench install the missing ones first
# (scripts/install-system-deps: as root; a no-op for any user when all are there; one line naming
# them otherwise). install and lint need only python3-venv and run as any user. Elsewhere than
# Debian, install the equivalents of `scripts/install-system-deps --list` and set SYSTEM_DEPS=true.
SYSTEM_DEPS ?= scripts/install-system-deps
# install and rootfs once the system packages are in, also under make -j
PREPARE = +@$(MAKE) --no-print-directory install rootfs
# The session and transfer suites once more with the fast path (msb_proxy/fastpath) off
NOFASTPATH_TESTS := tests/test_exec.py tests/test_pty.py tests/test_transfer.py \
	tests/test_sftp_batch.py tests/test_channels.py tests/test_flow_control.py
# The rootless tier: these suites on the fake backend (msb_proxy/backends/fake.py), as any user,
# with no rootfs; what needs a real guest is skipped, saying what (tests/test_fast_tier.py).
FAST_TESTS := tests/test_exec.py tests/test_pty.py tests/test_channels.py tests/test_transfer.py \
	tests/test_sftp_batch.py tests/test_tunnels.py tests/test_fast_tier.py

help:
	@echo "make help              this list"
	@echo "make install           create $(VENV) with msb-proxy (editable) and its dev tools"
	@echo "make client-key        an ed25519 key in ~/.ssh for a user without one (part of install)"
	@echo "make system-deps       the Debian packages the tests and bench need, the missing ones (root)"
	@echo "make system-deps-demo  the Debian packages the demo needs, the missing ones (root)"
	@echo "make rootfs            build the Debian test rootfs once, into $(ROOTFS)"
	@echo "make demo              ssh, scp and rsync into a local sandbox through the ProxyCommand"
	@echo "make test              the test suite (real ssh/scp/sftp/rsync against the local backend),"
	@echo "                       then test-nofastpath"
	@echo "make test-nofastpath   the session and transfer suites with MSB_PROXY_FASTPATH=0"
	@echo "make test-fast         sessions, terminals, transfers and tunnels on the fake backend:"
	@echo "                       any user, no root, no rootfs, under two minutes"
	@echo "make lint              ruff, mypy --strict and the layering (import contracts, private names)"
	@echo "make bench             msb-proxy against OpenSSH's sshd on the same jail, ratios printed"
	@echo "make fuzz              10,000 mutated SSH streams in-process, 300 through msb-proxy stdio"
	@echo "make stress            50 concurrent mixed connections for 60 s, 1,000 sequential, leaks"
	@echo "make clean             remove $(VENV) and build and tool caches"

$(BIN)/msb-proxy: pyproject.toml setup.py msb_proxy/fastpath/_relay.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q msb_proxy  # bytecode even where PYTHONDONTWRITEBYTECODE is set
	@touch $@

install: $(BIN)/msb-proxy client-key

# ssh offers ~/.ssh/id_* and msb-proxy accepts ~/.ssh/*.pub by default: a user with no key at all
# gets one, so `ssh -F contrib/ssh_config.example msb-demo` works right away.
client-key:
	@for k in id_ed25519 id_ecdsa id_rsa; do [ -e "$$HOME/.ssh/$$k" ] && exit 0; done; \
	mkdir -p -m 700 "$$HOME/.ssh" && ssh-keygen -q -t ed25519 -N '' -f "$$HOME/.ssh/id_ed25519" && \
	echo "created $$HOME/.ssh/id_ed25519 (no passphrase) to log in to sandboxes"

rootfs:
	scripts/build-rootfs "$(ROOTFS)"

system-deps:
	$(SYSTEM_DEPS) --test

system-deps-demo:
	$(SYSTEM_DEPS) --demo

demo: system-deps-demo
	$(PREPARE)
	scripts/demo

test: system-deps
	$(PREPARE)
	$(BIN)/pytest
	MSB_PROXY_FASTPATH=0 $(BIN)/pytest $(NOFASTPATH_TESTS)

test-nofastpath: system-deps
	$(PREPARE)
	MSB_PROXY_FASTPATH=0 $(BIN)/pytest $(NOFASTPATH_TESTS)

# Not system-deps: its list holds the rootfs's tools; this needs only ssh, scp, sftp, rsync, curl.
test-fast: install
	MSB_PROXY_TEST_BACKEND=fake $(BIN)/pytest $(FAST_TESTS)

lint: install
	$(BIN)/ruff check msb_proxy tests bench scripts/check-private-names
	$(BIN)/mypy
	$(BIN)/mypy scripts/check-private-names
	$(BIN)/lint-imports --no-cache  # the layering: pyproject.toml's [tool.importlinter]
	$(BIN)/python scripts/check-private-names  # only msb_proxy/fastpath touches private names

bench: system-deps
	$(PREPARE)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.forks  # issue 15: time to a shell in a fresh fork

# Long runs of our own suite (tests/fuzz, tests/stress.py); make test runs a short fuzz slice.
fuzz: system-deps
	$(PREPARE)
	cd tests && ../$(BIN)/python -m fuzz --findings ../fuzz-findings.jsonl

stress: system-deps
	$(PREPARE)
	$(BIN)/python tests/stress.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
