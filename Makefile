# cnvm — everything runs as root on a Debian host (namespaces, runc, CRIU).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: deps test unit lint typecheck demo bench clean-labs install soak

deps:
	scripts/install-deps

## test: install everything, then run the whole suite (unit + integration + VM lane);
## in CI (CI or CNVM_SLOW set) also the slow lane: the 200-teleport soak
test: deps
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)
	@if [ -n "$${CI:-}$${CNVM_SLOW:-}" ]; then $(MAKE) --no-print-directory soak; fi

## soak: 200 consecutive teleports of a busy cnvm; resources must stay flat (prints a table)
soak: deps
	CNVM_SOAK_TELEPORTS=$${CNVM_SOAK_TELEPORTS:-200} $(PY) -m pytest -s tests/integration/test_soak.py $(PYTEST_ARGS)

unit: deps
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: deps
	$(PY) -m ruff check .

## typecheck: mypy over proto/, cnvmd/, cnvmctl/, cnvmlab/ (settings in pyproject.toml)
typecheck: deps
	$(PY) -m mypy

## demo: the one-machine demo (3-node lab, teleport a cnvm around)
demo: deps
	$(PY) -m cnvmctl demo

## install: put cnvmd/cnvmctl and the systemd unit in place on this host
install: deps
	scripts/install-host
