# The handful of commands a person types. Everything else lives in cluster/ (python -m cluster).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := redis-server rabbitmq-server nginx prometheus libcurl4 libssl3 python3-venv iproute2 nftables

.PHONY: help install up down status deploy test test-unit lint clean loadtest bench ceiling dashboard

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## install system packages and the Python environment (idempotent)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  if echo " $$missing " | grep -q " prometheus " && [ -d /run/systemd/system ]; then \
	    echo "stopping the prometheus service Debian's package just started (on every address; make up runs its own)"; \
	    $$SUDO systemctl disable --now prometheus; \
	  fi; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing later resolves an unpinned build. Where PyPI's torch is the
	# CUDA build and you want CPU only: make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

up: install  ## bring the whole cluster up and serve (safe to run twice); WORKERS=N adds N Ray worker nodes
	$(if $(WORKERS),INFER_WORKERS=$(WORKERS) )$(PY) -m cluster up

down:  ## stop what `make up` started
	@test -x $(PY) && $(PY) -m cluster down || echo "nothing installed, nothing to stop"

status:  ## each component and whether it answers
	@$(PY) -m cluster status

deploy: install  ## re-deploy cluster/serve_config.yaml to the running cluster
	$(PY) -m cluster deploy

test: install  ## the whole test suite (starts the services it needs, stops what it started)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-unit: install  ## the unit tests only (no services)
	$(PY) -m pytest tests/unit

lint: install  ## ruff
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

LOADTEST_USERS ?= 16
LOADTEST_RATE ?= 4
LOADTEST_TIME ?= 60s
loadtest: up  ## Locust, headless, through NGINX; CSV + HTML report under loadtests/results/
	@dir=loadtests/results/locust-$$(date -u +%Y%m%d-%H%M%S); mkdir -p $$dir; \
	host=$$($(PY) -c "from cluster.settings import get_cluster_settings; print(get_cluster_settings().public_url)"); \
	$(VENV)/bin/locust -f loadtests/locustfile.py --headless -u $(LOADTEST_USERS) -r $(LOADTEST_RATE) \
	  -t $(LOADTEST_TIME) --host $$host --csv $$dir/locust --html $$dir/report.html --only-summary; \
	echo "results: $$dir/report.html and $$dir/locust_stats.csv"

bench: up  ## the side-by-side benchmark; writes docs/benchmarks.md and the chart
	$(PY) -m loadtests.bench

ceiling: install  ## the bare model's ceiling, torch and ONNX, every layout (take it with the cluster down)
	$(PY) -m loadtests.ceiling --json loadtests/results/ceiling.json

WINDOW ?= 15m
OUT ?= docs/dashboard.png
dashboard: install  ## the Grafana dashboard's main charts, from Prometheus, into one PNG (WINDOW=15m OUT=docs/dashboard.png)
	$(PY) -m cluster.dashboard_png --window $(WINDOW) --out $(OUT)$(if $(END), --end $(END))

clean: down  ## stop everything and delete runtime state (.cluster/)
	rm -rf .cluster
