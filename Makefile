# msb-proxy developer entry points. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROOTFS ?= $(or $(MSB_PROXY_ROOTFS),/var/cache/msb-proxy/rootfs/bookworm-v1)
export MSB_PROXY_ROOTFS := $(ROOTFS)

.PHONY: help install client-key rootfs demo test lint bench clean

help:
	@echo "make install  create $(VENV) with msb-proxy (editable) and its dev tools"
	@echo "make rootfs   build the Debian test rootfs once, into $(ROOTFS)"
	@echo "make demo     ssh, scp and rsync into a local sandbox through the ProxyCommand"
	@echo "make test     the test suite (real ssh/scp/sftp/rsync against the local backend)"
	@echo "make lint     ruff and mypy --strict"
	@echo "make bench    msb-proxy against OpenSSH's sshd on the same jail, ratios printed"

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

demo: install rootfs
	scripts/demo

test: install rootfs
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check msb_proxy tests bench
	$(BIN)/mypy

bench: install rootfs
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
