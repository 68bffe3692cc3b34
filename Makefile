# Open-AutoGLM: every command lives here; CI calls these targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
export AUTOGLM_VAR_DIR ?= $(CURDIR)/var

.PHONY: help setup up down run test test-fast lint format bench demo models asyncapi clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv (Python 3.11) with every dependency and the autoglm command

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: Python 3.11 is required: install python3.11"; exit 1; }
	@test -x $(PY) || { echo "creating $(VENV) ..."; $(PYTHON) -m venv $(VENV); }
	@echo "installing dependencies into $(VENV) (first run downloads torch: several minutes) ..."
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@
	@echo "setup done: $(VENV)/bin/autoglm --help"

up: setup  ## start local Kafka, PostgreSQL (unless AUTOGLM_KAFKA_BOOTSTRAP / AUTOGLM_DATABASE_URL) and Jaeger, create topics, migrate
	bash deploy/local/kafka.sh start
	bash deploy/local/postgres.sh start
	bash deploy/local/jaeger.sh start
	$(VENV)/bin/autoglm topics create
	$(VENV)/bin/autoglm db migrate

down:  ## stop local Kafka, PostgreSQL and Jaeger
	bash deploy/local/jaeger.sh stop
	bash deploy/local/kafka.sh stop
	bash deploy/local/postgres.sh stop

models: setup  ## build the tiny light and heavy checkpoints if missing
	$(VENV)/bin/autoglm models build-tiny

run: up models  ## the whole stack with local defaults; Ctrl-C stops it
	$(VENV)/bin/autoglm run

demo:  ## one chat completion against a running stack (with AUTOGLM_ADMIN_KEY or the key make run keeps in var/admin.key)
	@key="$${AUTOGLM_ADMIN_KEY:-$$(cat $(AUTOGLM_VAR_DIR)/admin.key 2>/dev/null)}"; \
	test -n "$$key" || { echo "no API key: start the stack with make run (it writes var/admin.key) or set AUTOGLM_ADMIN_KEY"; exit 1; }; \
	headers=$$(mktemp); \
	curl -s -D "$$headers" 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' -H "Authorization: Bearer $$key" \
	  -d '{"model":"auto","messages":[{"role":"user","content":"hi"}]}'; echo; \
	trace=$$(sed -n 's/^x-trace-id: *\([0-9a-f]*\).*/\1/ip' "$$headers"); rm -f "$$headers"; \
	test -z "$$trace" || echo "its trace: $${AUTOGLM_TELEMETRY__TRACES_UI:-http://127.0.0.1:16686}/trace/$$trace"

test: setup  ## every test: unit, in-memory handlers, end to end on real Kafka + PostgreSQL
	$(PY) -m pytest

test-fast: setup  ## unit and in-memory handler tests only
	$(PY) -m pytest -m "not e2e"

lint: setup  ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared services

format: setup  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup  ## throughput and latency through the real stack, router decisions/s, exporter rows/s vs raw COPY (writes bench/results/*.json)
	$(PY) -m tests.bench.serving
	$(PY) -m tests.bench.router
	$(PY) -m tests.bench.exporter

asyncapi: setup  ## regenerate docs/asyncapi.json
	$(VENV)/bin/autoglm asyncapi -o docs/asyncapi.json

clean: down  ## stop everything and delete var/ (data, logs, built models)
	rm -rf var
