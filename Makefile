# keel: the two commands a new user needs are `make run` and `make test`.
# Every target bootstraps .venv when it is missing or requirements.txt changed.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.keel-installed
ENV ?= dev
PYTEST_ARGS ?=

.PHONY: run stop test test-fast bench lint schema golden docs clean venv

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt setup.cfg pyproject.toml
	@echo "==> bootstrapping .venv (first run installs torch, bokeh, supervisor; about a minute)"
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null
	@$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(VENV_STAMP)
	@echo "==> .venv ready"

run: venv  ## render the dev environment, start supervisord and the stack, print the dashboard URL
	@bin/launch up $(ENV)

stop: venv  ## stop the stack and its supervisord
	@bin/launch down $(ENV)

test: venv  ## the whole suite: unit, integration (real supervisord), browser, ansible
	@$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	@$(PY) -m pytest -m "not slow and not browser and not ansible" $(PYTEST_ARGS)

bench: venv  ## benchmarks; results in bench/results/
	@for b in bench/*_bench.py; do echo "==> $$b"; $(PY) $$b || exit 1; done

lint: venv
	@$(PY) -m compileall -q keel trainer dashboard bin >/dev/null
	@cd ansible && ../.venv/bin/ansible-lint --profile production -q .

schema: venv  ## regenerate configs/schema.json and docs/configuration.md from the config model
	@$(PY) -m keel.config.schema --write

golden: venv  ## regenerate tests/golden/ from configs/ (review the diff)
	@$(PY) -m tests.golden_update

clean:
	rm -rf build var supervisord.conf .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
