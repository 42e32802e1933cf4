# keel: the two commands a new user needs are `make run` and `make test`.
# Every target bootstraps .venv when it is missing or requirements.txt changed.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.keel-installed
ENV ?= dev
PYTEST_ARGS ?=

.PHONY: run stop test test-fast bench lint schema golden docs clean venv deps imports monitoring

# System packages the suite uses, as `command:package` (chromium for the browser tests,
# systemd-analyze for the unit checks, promtool and node_exporter for the Prometheus tests).
SYSTEM_DEPS := chromium:chromium systemd-analyze:systemd promtool:prometheus \
               prometheus-node-exporter:prometheus-node-exporter
# pytest-xdist: 2 workers fit a 2-core box. --dist loadfile keeps each test file on one worker, in
# order, so a module's shared stack/server/browser is built once (loadgroup's xdist_group does not
# take with pytest 9: xdist 3.8 rewrites item._nodeid, which pytest 9 no longer reads).
PYTEST_WORKERS ?= 2
PYTEST_XDIST = -n $(PYTEST_WORKERS) --dist loadfile

# Installs what is missing as root with apt (quietly, once: a second run only runs `command -v`);
# anywhere else it stops with the one command to run.
deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
	  command -v "$${dep%%:*}" >/dev/null 2>&1 || missing="$$missing $${dep#*:}"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make deps: missing system packages; run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	echo "==> installing system packages:$$missing"; \
	log="$${TMPDIR:-/tmp}/keel-make-deps.log"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing; } \
	  >"$$log" 2>&1 || { cat "$$log" >&2; echo "make deps: apt-get failed (log above, also in $$log)" >&2; exit 1; }

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt setup.cfg pyproject.toml
	@echo "==> bootstrapping .venv (first run installs torch, bokeh, supervisor; about a minute)"
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null
	@$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(VENV_STAMP)
	@echo "==> .venv ready"

run: venv deps  ## render the dev environment, start supervisord and the stack, print the dashboard URL
	@bin/launch up $(ENV)

stop: venv  ## stop the stack and its supervisord
	@bin/launch down $(ENV)

test: venv deps imports  ## the whole suite: import contracts, unit, integration (real supervisord), browser, ansible
	@$(PY) -m pytest $(PYTEST_XDIST) --durations=15 $(PYTEST_ARGS)

test-fast: venv imports  ## the unit tier: no real stacks, no browser, no ansible
	@$(PY) -m pytest $(PYTEST_XDIST) -m "not slow and not browser and not ansible" $(PYTEST_ARGS)

imports: venv  ## the architecture as code: the import-linter contracts in .importlinter
	@.venv/bin/lint-imports --config .importlinter --no-cache --no-logo

bench: venv  ## benchmarks; results in bench/results/
	@for b in bench/*_bench.py; do echo "==> $$b"; $(PY) $$b || exit 1; done

lint: venv
	@$(PY) -m compileall -q keel trainer dashboard bin >/dev/null
	@cd ansible && ../.venv/bin/ansible-lint --profile production -q .

schema: venv  ## regenerate configs/schema.json and docs/configuration.md from the config model
	@$(PY) -m keel.config.schema --write

golden: venv  ## regenerate tests/golden/ from configs/ (review the diff)
	@$(PY) -m tests.golden_update

monitoring: venv  ## regenerate monitoring/keel-fleet.json (the Grafana board) from monitoring/board.py
	@$(PY) -m monitoring.board

clean:
	rm -rf build var supervisord.conf .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
