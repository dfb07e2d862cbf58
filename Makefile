# Two commands for a fresh machine (Debian, root, Python 3.11):
#   make run    installs everything and runs the agent and its Envoy on examples/gateway
#   make test   installs everything and runs lint, type checks and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mesh run --manifests examples/gateway --echo 127.0.0.1:18080

test: $(STAMP)
	$(VENV)/bin/ruff check mesh meshxds tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m 'not slow'

bench: $(STAMP)
	$(PY) benchmarks/xds_push.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
