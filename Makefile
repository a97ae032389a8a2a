# mlpipe: every target does its own set-up (venv + pinned requirements) on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# the suite on 3 pytest-xdist workers on the 2 cores (most tests wait on a service: 2 left the CPUs ~45% idle;
# tests/support/parallel.py says how it is split); PYTEST_XDIST= runs it serially
PYTEST_XDIST ?= -n 3 --dist loadgroup
CHAOS_ARGS ?=
# the model project of demo / bench (models/<name>/spec.yaml): digits, shapes or your own
MODEL ?= digits

.PHONY: help setup demo demo-regression test test-long bench chaos up down status clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	@echo ">> setting up $(VENV) with $(PYTHON) (pinned requirements; first time takes a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .  # the `mlpipe` command
	$(PY) -m pip check
	@touch $(STAMP)

setup: $(STAMP) ## create the venv and install the pinned requirements

demo: $(STAMP) ## run the retrain pipeline end to end on a generated drop (MODEL=digits|shapes|yours); writes var/demo/summary.json
	$(VENV)/bin/mlpipe demo --model $(MODEL)

demo-regression: $(STAMP) ## the demo, then a deliberately worse model that the QC gate must block
	$(VENV)/bin/mlpipe demo --model $(MODEL) --regression

test: $(STAMP) ## run the test suite (starts its own local services)
	@bash .ci/ensure-chromium
	@bash .ci/ensure-prometheus
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-long: $(STAMP) ## the runs `make test` shortens: the retrain DAG for every injected fault, the pipeline DAG's regression run
	MLPIPE_TEST_LONG=1 $(PY) -m pytest $(PYTEST_XDIST) tests/e2e/test_retrain_dag.py tests/e2e/test_pipeline_dag.py $(PYTEST_ARGS)

bench: $(STAMP) ## streaming benchmark (MODEL=digits): ORT in-process vs naive vs the consumer; writes var/bench/results.{json,md}
	$(VENV)/bin/mlpipe bench --model $(MODEL)

chaos: $(STAMP) ## fault injection (kill -9, stalls, broker restarts, poison) on the local stack under a steady stream; writes var/chaos/results.{json,md}
	$(VENV)/bin/mlpipe chaos $(CHAOS_ARGS)

up: $(STAMP) ## start the local stack (Airflow UI on 127.0.0.1:8080, Triton, broker, consumer, gateway, metrics exporter, Prometheus on :9090) and its supervisor; after a crash, clean up and restart
	@bash .ci/ensure-prometheus
	$(VENV)/bin/mlpipe stack up

down: ## stop the local stack started by `make up` (its supervisor, then each service's process group; within 10 s)
	@if [ -x $(PY) ]; then $(VENV)/bin/mlpipe stack down; else echo "no venv: nothing was started"; fi

status: $(STAMP) ## health of the local stack's services, URLs, the UI login and the CPU cost per 1,000 frames
	@$(VENV)/bin/mlpipe stack status || true

clean: ## remove generated state (var/)
	rm -rf var

distclean: clean ## also remove the venv
	rm -rf $(VENV)
