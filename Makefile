# microturn: `make serve` and `make test` set everything up on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
PRESET ?= tiny

.PHONY: install serve test lint bench bench-engine clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: install
	$(VENV)/bin/microturn serve --host $(HOST) --port $(PORT) --preset $(PRESET)

test: install
	$(PY) -m pytest -q -ra

lint: install
	$(VENV)/bin/ruff check .

bench: bench-engine

bench-engine: install
	$(VENV)/bin/microturn bench engine --preset $(PRESET) --seconds 5

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
