# The two commands a newcomer needs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
TORCH_PIN := torch==2.13.0
APT_PACKAGES := prometheus prometheus-alertmanager docker-compose chromium fonts-dejavu-core

.PHONY: install system-deps demo test bench generate

install:  ## the package with its test extras; torch pinned in the same command
	$(PYTHON) -m pip install -q "$(TORCH_PIN)" -e ".[test,sb3]"

system-deps:  ## Debian's Prometheus, Alertmanager, promtool, amtool, docker-compose; npm schema tools
	scripts/system-deps.sh $(APT_PACKAGES)

demo: install  ## train the demo PPO agent with live telemetry on http://127.0.0.1:9842/metrics
	tele-exporter demo

test: install system-deps  ## the whole test suite, real servers included
	$(PYTHON) -m pytest

bench: install  ## telemetry overhead against a plain clip_grad_norm_ step
	tele-exporter bench

generate: install  ## regenerate Prometheus rules, runbook, dashboards and Grafana alerting from the catalog
	tele-exporter generate
