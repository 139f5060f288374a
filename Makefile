# microturn: `make serve` and `make test` set everything up on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
PRESET ?= tiny

.PHONY: install serve test lint bench bench-engine train-demo eval-demo clean

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

# The shipped demo checkpoint: about 1.7 h on the 2-core CPU (~3.8 s/step at batch 8 x 32 micro-turns).
DEMO_CKPT ?= checkpoints/tiny-demo
DEMO_STEPS ?= 1600

train-demo: install
	$(VENV)/bin/microturn train --preset tiny --out $(DEMO_CKPT) --steps $(DEMO_STEPS) --batch 8 --turns 32 \
		--lr 1e-3 --warmup 100 --seed 0 --save-every 200 --device cpu

eval-demo: install
	$(VENV)/bin/microturn eval duplex --checkpoint $(DEMO_CKPT) --conversations 96 --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
