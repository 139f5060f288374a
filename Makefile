# microturn: `make serve` and `make test` set everything up on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
PRESET ?= tiny

.PHONY: install system-deps serve test lint bench bench-engine train-demo eval-demo clean

# Debian packages the tests need, as COMMAND:PACKAGE (espeak-ng speaks the test and training speech;
# chromium runs the demo page's browser tests)
SYSTEM_DEPS := espeak-ng:espeak-ng chromium:chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The demo model was trained to hear only a background task's final result in text-in.
serve: install
	MICROTURN_BACKGROUND_TEXT_IN=$${MICROTURN_BACKGROUND_TEXT_IN:-result} \
		$(VENV)/bin/microturn serve --host $(HOST) --port $(PORT) --checkpoint $(DEMO_CKPT)

# Missing packages are installed when run as root (one apt-get update); otherwise it names the command.
system-deps:
	@scripts/system-deps $(SYSTEM_DEPS)

test: install system-deps
	$(PY) -m pytest -q -ra

# ruff, then the layer contract ([tool.importlinter] in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: bench-engine

bench-engine: install
	$(VENV)/bin/microturn bench engine --preset $(PRESET) --seconds 5

# The shipped demo checkpoint, seven stages on the 2-core CPU. Stage 1 (about 1.8 h, ~1.9 s/step at batch
# 8 x 32 micro-turns) trains from scratch in fp32 on the base curriculum and is stored in bf16; stage 2
# (about 2 h, ~1.55 s/step) continues from those bf16 weights with a fresh optimiser on the refine
# curriculum (more sums and pauses, digit strings to copy) in bf16 autocast; stage 3 (44 min, ~1.09
# s/step) is 2400 more refine steps at half the learning rate; stage 4 (69 min, ~1.72 s/step) adds the
# CTC loss of what the user said on the audio-in positions (--heard-weight, training/heard.py) and asks for
# digit strings as numbers (--curriculum numbers); stage 5 (about 45 min) is 1500 more such steps at twice
# the transcript weight and 2/3 of the learning rate; stage 6 (46 min, 2.3 s/step on a 2-core AMX host) is
# 1200 steps of --curriculum sums (more single-digit sums); stage 7 (41 min, 2.75 s/step) is 900 steps of
# --curriculum greetings (sums plus greetings holding number-sounding words) at a lower learning rate.
# Each is stored in bf16.
# Those times are from an Intel CPU with AMX. Stages 2-7 say --precision auto: bf16 autocast where the
# CPU runs it natively (AMX / AVX512-BF16), fp32 elsewhere, since an AVX2-only CPU (AMD EPYC, 2 cores)
# emulates bf16 at 56 s/step against 4.5 s/step in fp32; there the recipe takes about 18 h, not 6.5.
# Every run resumes: rerun the command with --resume added.
DEMO_CKPT ?= checkpoints/tiny-demo
DEMO_RUN ?= .train/tiny-demo
DEMO_STEPS ?= 3400
DEMO_REFINE_STEPS ?= 4400
DEMO_MORE_STEPS ?= 2400
DEMO_HEARD_STEPS ?= 2400
DEMO_HEARD_MORE_STEPS ?= 1500
DEMO_SUMS_STEPS ?= 1200
DEMO_GREET_STEPS ?= 900

train-demo: install
	$(VENV)/bin/microturn train --preset tiny --out $(DEMO_RUN) --steps $(DEMO_STEPS) --batch 8 --turns 32 \
		--lr 1e-3 --warmup 100 --seed 0 --save-every 200 --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN) --out $(DEMO_RUN)-stage1 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage1 --out $(DEMO_RUN)-refine --curriculum refine \
		--steps $(DEMO_REFINE_STEPS) --batch 8 --turns 32 --lr 6e-4 --warmup 100 --seed 1 --save-every 200 \
		--precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-refine --out $(DEMO_RUN)-stage2 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage2 --out $(DEMO_RUN)-more --curriculum refine \
		--steps $(DEMO_MORE_STEPS) --batch 8 --turns 32 --lr 3e-4 --warmup 100 --seed 2 --save-every 200 \
		--precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-more --out $(DEMO_RUN)-stage3 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage3 --out $(DEMO_RUN)-heard --curriculum numbers \
		--heard-weight 0.1 --steps $(DEMO_HEARD_STEPS) --batch 8 --turns 32 --lr 3e-4 --warmup 100 --seed 5 \
		--save-every 200 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-heard --out $(DEMO_RUN)-stage4 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage4 --out $(DEMO_RUN)-heard2 --curriculum numbers \
		--heard-weight 0.2 --steps $(DEMO_HEARD_MORE_STEPS) --batch 8 --turns 32 --lr 2e-4 --warmup 100 --seed 6 \
		--save-every 250 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-heard2 --out $(DEMO_RUN)-stage5 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage5 --out $(DEMO_RUN)-sums --curriculum sums \
		--heard-weight 0.2 --steps $(DEMO_SUMS_STEPS) --batch 8 --turns 32 --lr 1.5e-4 --warmup 100 --seed 9 \
		--save-every 200 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-sums --out $(DEMO_RUN)-stage6 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage6 --out $(DEMO_RUN)-greet --curriculum greetings \
		--heard-weight 0.2 --steps $(DEMO_GREET_STEPS) --batch 8 --turns 32 --lr 1e-4 --warmup 50 --seed 11 \
		--save-every 100 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-greet --out $(DEMO_CKPT) --dtype bfloat16

eval-demo: install
	$(VENV)/bin/microturn eval duplex --checkpoint $(DEMO_CKPT) --conversations 240 --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
